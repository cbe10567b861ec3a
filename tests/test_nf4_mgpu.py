"""The Mosaic GPU NF4 matmul (`pallas_kernels.nf4_mgpu`) against float64 NumPy.

The kernel itself runs only on a Hopper GPU (Mosaic GPU has no CPU interpreter for TMA
pipelines): those tests are skipped elsewhere and run on the H200 through the device tool
(``python -m pytest -q tests/test_nf4_mgpu.py``). On the CPU the kernel layout of the
scales, the plain-jnp reference and the kernel's lowering for CUDA are checked.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.nf4_mgpu import (
    nf4_kernel_codes,
    nf4_kernel_scale,
    nf4_mgpu_matmul,
    nf4_mgpu_matmul_multi,
    nf4_mgpu_reference,
    nf4_mgpu_supported,
)

#: bitsandbytes' NF4 codebook (``bitsandbytes.functional.get_4bit_type('nf4')``, QLoRA
#: App. E), written out here as the independent reference.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])

ON_HOPPER = nf4_mgpu_supported(1, 64, 64, 64, jnp.bfloat16)


def random_weight(rng, n, k, blocksize=64, layers=None):
    lead = () if layers is None else (layers,)
    packed = rng.integers(0, 256, (*lead, n, k // 2), dtype=np.uint8)
    absmax = rng.uniform(0.01, 0.1, (*lead, n, k // blocksize)).astype(np.float32)
    return packed, absmax


def dense64(packed, absmax, blocksize=64):
    """float64 W [N, K] from bnb packed bytes (element 2i in the HIGH nibble)."""
    n, kh = packed.shape
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(n, 2 * kh)
    return NF4[codes] * np.repeat(absmax.astype(np.float64), blocksize, axis=1)


def test_kernel_scale_layout():
    rng = np.random.default_rng()
    n, k, bs = 24, 256, 128
    _, absmax = random_weight(rng, n, k, bs)
    s = np.asarray(nf4_kernel_scale(jnp.asarray(absmax), n, k, bs).astype(jnp.float32))
    assert s.shape == (k // 64, n)
    want = np.repeat(absmax, bs // 64, axis=1).T
    np.testing.assert_allclose(s, want, rtol=2 ** -8)  # one rounding to bfloat16
    stacked = nf4_kernel_scale(jnp.asarray(np.stack([absmax, 2 * absmax])), n, k, bs)
    np.testing.assert_allclose(np.asarray(stacked[1].astype(jnp.float32)), 2 * want, rtol=2 ** -8)


def test_reference_matches_float64():
    rng = np.random.default_rng()
    m, n, k = 3, 40, 192
    packed, absmax = random_weight(rng, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    scale = nf4_kernel_scale(jnp.asarray(absmax), n, k, 64)
    y = np.asarray(nf4_mgpu_reference(jnp.asarray(x, jnp.bfloat16), jnp.asarray(packed), scale))
    want = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64) @ dense64(packed, absmax).T
    assert np.linalg.norm(y - want) / np.linalg.norm(want) < 5e-3


def test_lowers_for_cuda():
    """The kernel (layouts, the inline PTX, the pipeline) is built for CUDA without a GPU."""
    x = jax.ShapeDtypeStruct((5, 320), jnp.bfloat16)
    p = jax.ShapeDtypeStruct((3, 200, 160), jnp.uint8)
    s = jax.ShapeDtypeStruct((3, 5, 200), jnp.bfloat16)
    text = jax.jit(nf4_mgpu_matmul).trace(x, p, s, jnp.int32(1)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU NF4 kernel needs a Hopper GPU")
@pytest.mark.parametrize("m,n,k,layers", [(1, 200, 320, None), (3, 136, 512, 3),
                                          (16, 1024, 1024, None), (17, 264, 256, 2),
                                          (64, 520, 768, None), (200, 512, 768, None)])
def test_matches_float64(m, n, k, layers):
    rng = np.random.default_rng()
    packed, absmax = random_weight(rng, n, k, layers=layers)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    if layers is None:
        scale = nf4_kernel_scale(jnp.asarray(absmax), n, k, 64)
        y = nf4_mgpu_matmul(x, jnp.asarray(packed), scale)
        p64, a64 = packed, absmax
    else:
        layer = layers - 1
        scale = nf4_kernel_scale(jnp.asarray(absmax), n, k, 64)
        y = nf4_mgpu_matmul(x, jnp.asarray(packed), scale, jnp.int32(layer))
        p64, a64 = packed[layer], absmax[layer]
    want = np.asarray(x.astype(jnp.float32), np.float64) @ dense64(p64, a64).T
    y = np.asarray(y.astype(jnp.float32), np.float64)
    assert np.isfinite(y).all()
    assert np.linalg.norm(y - want) / np.linalg.norm(want) < 1e-2


def test_with_kernel_layout_matches_bnb_absmax():
    """`with_kernel_layout` derives the kernel scales from bnb's decoded absmax (double
    quantization included), per layer for a stacked weight."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    import torch

    from jaxqlora.nf4 import quantize_nf4, with_kernel_layout
    from jaxqlora.stacked import stack_trees

    n, k = 48, 256
    ws = [np.random.default_rng().standard_normal((n, k)).astype(np.float32) for _ in range(2)]
    qs = [with_kernel_layout(quantize_nf4(jnp.asarray(w)), force=True) for w in ws]
    stacked = with_kernel_layout(stack_trees([quantize_nf4(jnp.asarray(w)) for w in ws]), force=True)
    for i, (w, q) in enumerate(zip(ws, qs)):
        _, state = bnbf.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                      compress_statistics=True)
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        want = absmax.numpy().reshape(n, k // 64).T  # [K // 64, N], blocksize 64
        for got in (q.kernel_scale, stacked.kernel_scale[i]):
            np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=2 ** -8)


def test_with_kernel_layout_codes():
    """``with_kernel_layout(codes=True)`` adds the kernel layout of the codes (checked
    against its element-by-element definition, per layer for a stacked weight) and keeps
    the bnb bytes; without ``codes`` none is derived; on this machine (no Hopper) nothing
    is derived unless forced."""
    from jaxqlora.nf4 import quantize_nf4, with_kernel_layout
    from jaxqlora.stacked import stack_trees

    n, k = 40, 192
    rng = np.random.default_rng()
    qs = [quantize_nf4(jnp.asarray(rng.standard_normal((n, k)), jnp.float32)) for _ in range(2)]
    one = with_kernel_layout(qs[0], codes=True, force=True)
    stacked = with_kernel_layout(stack_trees(qs), codes=True, force=True)
    assert with_kernel_layout(qs[0], force=True).kernel_codes is None
    np.testing.assert_array_equal(np.asarray(one.packed), np.asarray(qs[0].packed))
    assert one.nbytes == qs[0].nbytes + n * k // 32 + n * k // 2
    for got, q in ((one.kernel_codes, qs[0]), (stacked.kernel_codes[0], qs[0]),
                   (stacked.kernel_codes[1], qs[1])):
        want = _kernel_words64(np.asarray(q.packed).reshape(n, k // 2))
        np.testing.assert_array_equal(np.asarray(got), want)
    if not ON_HOPPER:
        assert with_kernel_layout(qs[0], codes=True) is qs[0]


class _FakeDevice:
    platform = "gpu"

    def __init__(self, cc):
        self.compute_capability = cc


@pytest.mark.parametrize("cc,args,want", [
    ("9.0", (1, 4096, 4096, 64, jnp.bfloat16), True),
    ("9.0", (64, 576, 1536, 64, jnp.bfloat16), True),
    ("8.0", (1, 4096, 4096, 64, jnp.bfloat16), False),   # Ampere: the Triton kernels
    ("9.0", (1, 4096, 4000, 64, jnp.bfloat16), False),   # K not a multiple of 64
    ("9.0", (1, 4100, 4096, 64, jnp.bfloat16), False),   # N not a multiple of 8
    ("9.0", (1, 4096, 4096, 32, jnp.bfloat16), False),   # blocksize 32
    ("9.0", (1, 4096, 4096, 64, jnp.float32), False),    # float32 activations
])
def test_dispatch_by_capability(monkeypatch, cc, args, want):
    monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice(cc)])
    assert nf4_mgpu_supported(*args) is want


def test_rms_norm_auto_picks_xla_on_gpu(monkeypatch):
    from pallas_kernels import dispatch
    from pallas_kernels.rms_norm import RMS_NORM_GPU_DEFAULT

    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert dispatch.resolve_impl("auto") == "pallas"
    assert dispatch.resolve_impl("auto", gpu_default=RMS_NORM_GPU_DEFAULT) == "xla"
    assert dispatch.resolve_impl("pallas", gpu_default="xla") == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert dispatch.resolve_impl("auto") == "xla"


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU NF4 kernel needs a Hopper GPU")
def test_nf4_matmul_takes_mosaic_path_and_differentiates():
    """`nf4_matmul` with ``kernel_scale`` (a weight >= MGPU_MIN_WEIGHT): forward through the
    Mosaic kernel, ``dx`` through the custom VJP's Mosaic transposed kernel, both against
    float64."""
    from pallas_kernels.nf4_matmul import MGPU_MIN_WEIGHT, nf4_matmul

    rng = np.random.default_rng()
    m, n, k = 3, 2048, 2048 + 64
    assert n * k >= MGPU_MIN_WEIGHT
    packed, absmax = random_weight(rng, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    scale = nf4_kernel_scale(jnp.asarray(absmax), n, k, 64)
    f = lambda x: nf4_matmul(x, jnp.asarray(packed), jnp.asarray(absmax), blocksize=64,
                             kernel_scale=scale)
    assert "mosaic_gpu" in jax.jit(f).lower(x).as_text()
    grad_text = jax.jit(lambda x, dy: jax.vjp(f, x)[1](dy)).lower(x, dy).as_text()
    assert _calls(grad_text, "nf4_mgpu_matmul_t") == 1 and "nf4_gemv_t" not in grad_text
    y, vjp = jax.vjp(f, x)
    (dx,) = vjp(dy)
    w = dense64(packed, absmax)
    for got, want in ((y, np.asarray(x.astype(jnp.float32), np.float64) @ w.T),
                      (dx, np.asarray(dy.astype(jnp.float32), np.float64) @ w)):
        got = np.asarray(got.astype(jnp.float32), np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


# ---------------------------------------------------------------------------
# Several weights in one launch: nf4_mgpu_matmul_multi and nf4_matmul_multi
# ---------------------------------------------------------------------------


def _mosaic_calls(text: str) -> int:
    return len(re.findall(r"custom_call @mosaic_gpu", text))


def _calls(text: str, fn: str) -> int:
    """Calls of the jitted function ``fn`` in lowered StableHLO (one lowered function
    per distinct signature: ``@fn``, ``@fn_0``, ...)."""
    return len(re.findall(rf"call @{fn}(_\d+)?\(", text))


def test_multi_lowers_for_cuda():
    """Three weights (q/k/v-like rows, N not a multiple of 64, stacked over layers) lower
    to ONE Mosaic GPU kernel for CUDA without a GPU (each weight's pipeline under its own
    branch of the row-tile index)."""
    x = jax.ShapeDtypeStruct((5, 320), jnp.bfloat16)
    ns = (200, 64, 136)
    ps = tuple(jax.ShapeDtypeStruct((3, n, 160), jnp.uint8) for n in ns)
    ss = tuple(jax.ShapeDtypeStruct((3, 5, n), jnp.bfloat16) for n in ns)
    text = jax.jit(nf4_mgpu_matmul_multi).trace(x, ps, ss, jnp.int32(1)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert _mosaic_calls(text) == 1
    out = jax.eval_shape(nf4_mgpu_matmul_multi, x, ps, ss, jnp.int32(1))
    assert [o.shape for o in out] == [(5, n) for n in ns]
    assert all(o.dtype == jnp.bfloat16 for o in out)


def test_multi_rejects_mismatched_operands():
    x = jnp.zeros((1, 128), jnp.bfloat16)
    p, s = jnp.zeros((64, 64), jnp.uint8), jnp.zeros((2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="one of each per weight"):
        nf4_mgpu_matmul_multi(x, (p, p), (s,))
    with pytest.raises(ValueError, match="disagree"):
        nf4_mgpu_matmul_multi(x, (p, jnp.zeros((64, 32), jnp.uint8)), (s, s))


def _fake_hopper(monkeypatch):
    """Make `nf4_matmul_multi` take its Mosaic path on this machine (for tracing and CUDA
    lowering only): a GPU default backend and a Hopper for `nf4_mgpu_supported`."""
    from pallas_kernels import dispatch, nf4_matmul as op

    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    real = op.nf4_mgpu_supported

    def on_hopper(*args):  # the real shape and dtype checks, on a faked compute capability
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(jax, "devices", lambda *a: [_FakeDevice("9.0")])
            return real(*args)

    monkeypatch.setattr(op, "nf4_mgpu_supported", on_hopper)


def _weights(rng, ns, k, *, layers=None, kernel_scale=True, blocksize=64, double_quant=False):
    """``nf4_matmul_multi`` weight mappings (NumPy random codes) and their float64 dense
    weights (layer ``layers - 1`` when stacked)."""
    from jaxqlora.nf4 import absmax_float32, quantize_nf4

    ws, dense = [], []
    for n in ns:
        if double_quant:  # a real bnb double-quantized weight, per layer
            qs = [quantize_nf4(jnp.asarray(rng.standard_normal((n, k)), jnp.float32),
                               blocksize=blocksize) for _ in range(layers or 1)]
            stack = lambda f: jnp.stack([f(q) for q in qs]) if layers else f(qs[0])
            w = dict(packed=stack(lambda q: q.packed.reshape(n, k // 2)),
                     absmax=stack(lambda q: q.absmax.reshape(n, k // blocksize)),
                     nested_absmax=stack(lambda q: q.nested_absmax),
                     nested_code=stack(lambda q: q.nested_code), offset=stack(lambda q: q.offset),
                     blocksize=blocksize)
            last = qs[-1]
            p64 = np.asarray(last.packed).reshape(n, k // 2)
            a64 = np.asarray(absmax_float32(last)).reshape(n, k // blocksize)
            absmax = np.stack([np.asarray(absmax_float32(q)).reshape(n, k // blocksize) for q in qs])
            absmax = absmax if layers else absmax[0]
        else:
            packed, absmax = random_weight(rng, n, k, blocksize, layers=layers)
            w = dict(packed=jnp.asarray(packed), absmax=jnp.asarray(absmax), blocksize=blocksize)
            p64, a64 = (packed, absmax) if layers is None else (packed[-1], absmax[-1])
        if kernel_scale:
            w["kernel_scale"] = nf4_kernel_scale(jnp.asarray(absmax), n, k, blocksize)
        ws.append(w)
        dense.append(dense64(p64, a64, blocksize))
    return ws, dense


def test_multi_dispatch_lowers_one_kernel_for_cuda(monkeypatch):
    """On a (faked) Hopper, Llama-8B's q/k/v and gate/up at M = 1 and 16 take ONE Mosaic
    launch each; a weight without kernel_scale, M > MGPU_MAX_M or float32 x take the
    separate path (no Mosaic multi kernel)."""
    from pallas_kernels.nf4_matmul import MGPU_MAX_M, nf4_matmul_multi

    _fake_hopper(monkeypatch)

    def spec(n, k, ks=True):  # the arrays of one weight (blocksize 64, the default)
        w = dict(packed=jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
                 absmax=jax.ShapeDtypeStruct((n, k // 64), jnp.float32))
        if ks:
            w["kernel_scale"] = jax.ShapeDtypeStruct((k // 64, n), jnp.bfloat16)
        return w

    def lowered(m, shapes, dtype=jnp.bfloat16, ks=True):
        ws = [spec(n, k, ks) for n, k in shapes]

        def f(x, ws):
            ys, fused = nf4_matmul_multi(x, ws, return_fused=True)
            assert [y.shape for y in ys] == [(m, n) for n, _ in shapes]
            return ys, fused

        fused = []
        text = jax.jit(lambda x, ws: f(x, ws)[0]).trace(
            jax.ShapeDtypeStruct((m, shapes[0][1]), dtype), ws).lower(
            lowering_platforms=("cuda",)).as_text()
        jax.eval_shape(lambda x, ws: fused.append(f(x, ws)[1]),
                       jax.ShapeDtypeStruct((m, shapes[0][1]), dtype), ws)
        return text, fused[0]

    qkv, gate_up = ((4096, 4096), (1024, 4096), (1024, 4096)), ((14336, 4096),) * 2
    for m in (1, 16):
        for shapes in (qkv, gate_up):
            text, fused = lowered(m, shapes)
            assert fused and _mosaic_calls(text) == 1, (m, shapes)
    # training through it: the custom VJP's backward (one Mosaic transposed kernel per
    # weight; k and v share one lowered function, called twice) lowers
    ws = [spec(n, k) for n, k in qkv]
    loss = lambda x, ws: sum(jnp.sum(y.astype(jnp.float32)) for y in nf4_matmul_multi(x, ws))
    text = jax.jit(jax.value_and_grad(loss)).trace(
        jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16), ws).lower(
        lowering_platforms=("cuda",)).as_text()
    assert _calls(text, "nf4_mgpu_matmul_multi") == 1
    assert _calls(text, "nf4_mgpu_matmul_t") == 3 and "nf4_gemv_t" not in text
    _, fused = lowered(1, qkv, ks=False)
    assert not fused
    _, fused = lowered(MGPU_MAX_M + 1, qkv)
    assert not fused
    _, fused = lowered(1, qkv, dtype=jnp.float32)
    assert not fused


@pytest.mark.parametrize("layers,double_quant", [(None, False), (3, True)])
def test_multi_fallback_equals_separate_calls_on_cpu(layers, double_quant):
    """Where the Mosaic kernel does not apply (here: the CPU), `nf4_matmul_multi` is one
    `nf4_matmul` per weight: the same outputs and the same input gradient."""
    from pallas_kernels.nf4_matmul import nf4_matmul, nf4_matmul_multi

    rng = np.random.default_rng(0)
    ns, k = (192, 64, 72), 256
    ws, dense = _weights(rng, ns, k, layers=layers, double_quant=double_quant)
    layer = None if layers is None else jnp.int32(layers - 1)
    x = jnp.asarray(rng.standard_normal((2, 3, k)), jnp.bfloat16)
    dys = [jnp.asarray(rng.standard_normal((2, 3, n)), jnp.bfloat16) for n in ns]

    def multi(x):
        ys, fused = nf4_matmul_multi(x, ws, layer=layer, return_fused=True)
        assert not fused
        return ys

    def separate(x):
        return tuple(nf4_matmul(x, **w, layer=layer) for w in ws)

    got, vjp_got = jax.vjp(multi, x)
    want, vjp_want = jax.vjp(separate, x)
    for g, w, d in zip(got, want, dense):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        ref = np.asarray(x.astype(jnp.float32), np.float64) @ d.T
        assert np.linalg.norm(np.asarray(g, np.float64) - ref) / np.linalg.norm(ref) < 1e-2
    np.testing.assert_array_equal(np.asarray(vjp_got(tuple(dys))[0]),
                                  np.asarray(vjp_want(tuple(dys))[0]))


def test_multi_fallback_interpret_mode():
    """``interpret=True`` (the Pallas GEMV kernels on the CPU) never takes the Mosaic
    kernel: one interpreted GEMV per weight, equal to the separate calls."""
    from pallas_kernels.nf4_matmul import nf4_matmul, nf4_matmul_multi

    rng = np.random.default_rng(1)
    ws, _ = _weights(rng, (64, 40), 128)
    x = jnp.asarray(rng.standard_normal((1, 128)), jnp.bfloat16)
    ys, fused = nf4_matmul_multi(x, ws, interpret=True, return_fused=True)
    assert not fused
    for y, w in zip(ys, ws):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(nf4_matmul(x, **w, interpret=True)))


def test_multi_rejects_bad_weights():
    from pallas_kernels.nf4_matmul import nf4_matmul_multi

    rng = np.random.default_rng(2)
    ws, _ = _weights(rng, (64,), 128)
    x = jnp.zeros((1, 128), jnp.float32)
    with pytest.raises(ValueError, match="empty"):
        nf4_matmul_multi(x, [])
    with pytest.raises(TypeError, match="keys"):
        nf4_matmul_multi(x, [dict(ws[0], bias=1.0)])
    with pytest.raises(TypeError, match="keys"):
        nf4_matmul_multi(x, [dict(packed=ws[0]["packed"])])
    # K of x disagrees with the weight's (named by the first check that sees it: the absmax
    # count on CPU, the packed shape where the weights carry a kernel_scale)
    with pytest.raises(ValueError, match=r"absmax|K = x\.shape\[-1\]"):
        nf4_matmul_multi(jnp.zeros((1, 64), jnp.float32), ws)


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU NF4 kernel needs a Hopper GPU")
@pytest.mark.parametrize("m", [1, 3, 16, 17])
@pytest.mark.parametrize("ns,k,layers", [((512, 128, 128), 256, None),
                                         ((512, 128, 128), 1024, 3),
                                         ((200, 264), 512, None),
                                         ((136, 64, 72), 768, 2)])
def test_multi_matches_float64(m, ns, k, layers):
    """`nf4_mgpu_matmul_multi` (2 and 3 weights of different N, N not a multiple of 64,
    stacked layers read at an index) against float64 NumPy, weight by weight."""
    rng = np.random.default_rng()
    ws, dense = _weights(rng, ns, k, layers=layers)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    layer = None if layers is None else jnp.int32(layers - 1)
    ys = nf4_mgpu_matmul_multi(x, tuple(w["packed"] for w in ws),
                               tuple(w["kernel_scale"] for w in ws), layer)
    assert len(ys) == len(ns)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    for y, n, d in zip(ys, ns, dense):
        assert y.shape == (m, n) and y.dtype == jnp.bfloat16
        y = np.asarray(y.astype(jnp.float32), np.float64)
        want = x64 @ d.T
        assert np.isfinite(y).all()
        assert np.linalg.norm(y - want) / np.linalg.norm(want) < 1e-2


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU NF4 kernel needs a Hopper GPU")
@pytest.mark.parametrize("m,layers", [(1, None), (16, 2)])
def test_multi_op_fuses_and_differentiates(monkeypatch, m, layers):
    """`nf4_matmul_multi` on the GPU: ONE Mosaic launch forward (the op says it fused),
    outputs and ``dx`` (the custom VJP's transposed kernels, summed) against the separate
    `nf4_matmul` calls and float64."""
    from pallas_kernels import nf4_matmul as op

    monkeypatch.setattr(op, "MGPU_MIN_WEIGHT", 0)  # small test weights still fuse
    rng = np.random.default_rng()
    ns, k = (512, 128, 192), 1024
    ws, dense = _weights(rng, ns, k, layers=layers, double_quant=layers is not None)
    layer = None if layers is None else jnp.int32(layers - 1)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    dys = tuple(jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16) for n in ns)
    multi = lambda x: op.nf4_matmul_multi(x, ws, layer=layer)
    separate = lambda x: tuple(op.nf4_matmul(x, **w, layer=layer) for w in ws)
    assert op.nf4_matmul_multi(x, ws, layer=layer, return_fused=True)[1]
    assert _mosaic_calls(jax.jit(multi).lower(x).as_text()) == 1
    got, vjp_got = jax.vjp(multi, x)
    want, vjp_want = jax.vjp(separate, x)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    rel = lambda a, b: np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)
    for g, w, d in zip(got, want, dense):
        assert rel(g.astype(jnp.float32), x64 @ d.T) < 1e-2
        assert rel(g.astype(jnp.float32), np.asarray(w.astype(jnp.float32), np.float64)) < 1e-2
    (dx,), (dx_sep,) = vjp_got(dys), vjp_want(dys)
    dx64 = sum(np.asarray(dy.astype(jnp.float32), np.float64) @ d for dy, d in zip(dys, dense))
    assert rel(dx.astype(jnp.float32), dx64) < 1e-2
    assert rel(dx.astype(jnp.float32), np.asarray(dx_sep.astype(jnp.float32), np.float64)) < 1e-2


# ---------------------------------------------------------------------------
# The transposed kernel: nf4_mgpu_matmul_t (dx = dy @ W) and the backward's dispatch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("m,n,k,layers,kw", [
    (1, 4096, 4096, None, {}),                      # decode, the default plan
    (5, 200, 320, 3, {}),                           # ragged N (padded dy), 5 K tiles, stacked
    (16, 11008, 4096, None, {}),                    # block_n 64, 4 splits of 43 steps
    (17, 264, 256, 2, dict(in_flight=0)),           # M padded to 24, one SMEM tile
    (3, 512, 128, None, dict(block_n=128, stages=2)),
    (64, 512, 128, None, dict(block_n=256, splits=1)),
    (100, 512, 256, None, {}),                      # M > 64: 128-row M tiles, padded to 104
    (8, 1024, 128, None, dict(block_m=256, block_n=256)),  # no room for two tiles: in_flight 0
])
def test_t_lowers_for_cuda(m, n, k, layers, kw):
    """The transposed kernel (int4 codes, dequant in registers, the bf16 tile stored to
    swizzled SMEM and read transposed by wgmma, the pipeline) is built for CUDA without a
    GPU, for the default plan and explicit tiles."""
    from pallas_kernels.nf4_mgpu import nf4_mgpu_matmul_t

    lead = () if layers is None else (layers,)
    args = [jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((*lead, n, k // 2), jnp.uint8),
            jax.ShapeDtypeStruct((*lead, k // 64, n), jnp.bfloat16)]
    if layers is not None:
        args.append(jnp.int32(layers - 1))
    f = lambda *a: nf4_mgpu_matmul_t(*a, **kw)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert _mosaic_calls(text) == 1
    out = jax.eval_shape(f, *args)
    assert out.shape == (m, k) and out.dtype == jnp.bfloat16


def test_t_default_plan():
    """The default tiles of the transposed kernel for Llama shapes (H200 decode): every
    split has at least two steps, padding adds at most an eighth of the N steps, no split
    is empty, and each case has at least 256 programs where the N steps allow it."""
    from pallas_kernels.nf4_mgpu import _default_block_n, _default_splits

    for (n, k, want), block_m in [(c, 8) for c in ((4096, 4096, 64), (11008, 4096, 64), (4096, 11008, 64),
                                                 (14336, 4096, 64), (4096, 14336, 64), (1024, 4096, 64))] + \
            [(c, 16) for c in ((4096, 4096, 128), (11008, 4096, 128), (14336, 4096, 128))]:
        programs = k // 64
        block_n = _default_block_n(n, programs, block_m)
        steps = -(-n // block_n)
        splits = _default_splits(programs, steps)
        assert block_n == want, (n, k, block_n)
        per = -(-steps // splits)
        assert per >= 2 and 8 * (per * splits - steps) <= steps and (splits - 1) * per < steps
        assert programs * splits >= 256, (n, k, block_n, splits)


def test_t_reference_matches_float64():
    from pallas_kernels.nf4_mgpu import nf4_mgpu_reference_t

    rng = np.random.default_rng()
    m, n, k = 3, 40, 192
    packed, absmax = random_weight(rng, n, k)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    scale = nf4_kernel_scale(jnp.asarray(absmax), n, k, 64)
    dx = np.asarray(nf4_mgpu_reference_t(dy, jnp.asarray(packed), scale))
    want = np.asarray(dy.astype(jnp.float32), np.float64) @ dense64(packed, absmax)
    assert dx.shape == (m, k)
    assert np.linalg.norm(dx - want) / np.linalg.norm(want) < 5e-3


def test_t_rejects_bad_operands():
    from pallas_kernels.nf4_mgpu import nf4_mgpu_matmul_t

    dy = jnp.zeros((1, 64), jnp.bfloat16)
    p, s = jnp.zeros((64, 64), jnp.uint8), jnp.zeros((2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="disagree"):
        nf4_mgpu_matmul_t(dy, jnp.zeros((72, 64), jnp.uint8), s)
    with pytest.raises(ValueError, match="disagree"):
        nf4_mgpu_matmul_t(dy, p, jnp.zeros((3, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match="multiple of 64"):
        nf4_mgpu_matmul_t(dy, jnp.zeros((64, 48), jnp.uint8), jnp.zeros((1, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match="in_flight"):
        nf4_mgpu_matmul_t(dy, p, s, in_flight=2)
    with pytest.raises(ValueError, match="block_n"):
        nf4_mgpu_matmul_t(dy, p, s, block_n=96)
    with pytest.raises(ValueError, match="splits"):
        nf4_mgpu_matmul_t(jnp.zeros((1, 192), jnp.bfloat16), jnp.zeros((192, 64), jnp.uint8),
                          jnp.zeros((2, 192), jnp.bfloat16), block_n=64, splits=4)


def test_nf4_matmul_kernel_codes_dispatch(monkeypatch):
    """`nf4_matmul` with ``kernel_codes``: on a (faked) Hopper the forward's Mosaic kernel
    reads the uint32 words and the backward's transposed kernel the bnb bytes; elsewhere
    the codes are ignored (the CPU result is the one without them); a wrong shape or
    dtype is a ValueError naming ``kernel_codes``."""
    from pallas_kernels.nf4_matmul import nf4_matmul

    rng = np.random.default_rng()
    n, k = 64, 128
    packed, absmax = random_weight(rng, n, k)
    x = jnp.asarray(rng.standard_normal((2, k)), jnp.bfloat16)
    scale = nf4_kernel_scale(jnp.asarray(absmax), n, k, 64)
    codes = nf4_kernel_codes(jnp.asarray(packed), n, k)
    plain = nf4_matmul(x, packed, absmax, impl="xla")
    np.testing.assert_array_equal(np.asarray(nf4_matmul(x, packed, absmax, impl="xla", kernel_scale=scale,
                                                         kernel_codes=codes)), np.asarray(plain))
    with pytest.raises(ValueError, match="kernel_codes"):
        nf4_matmul(x, packed, absmax, interpret=True, kernel_scale=scale, kernel_codes=codes[:, :8])
    with pytest.raises(ValueError, match="kernel_codes"):
        nf4_matmul(x, packed, absmax, interpret=True, kernel_scale=scale, kernel_codes=packed)

    _fake_hopper(monkeypatch)
    n, k = 4096, 4096
    w = dict(packed=jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
             absmax=jax.ShapeDtypeStruct((n, k // 64), jnp.float32),
             kernel_scale=jax.ShapeDtypeStruct((k // 64, n), jnp.bfloat16),
             kernel_codes=jax.ShapeDtypeStruct((n, k // 8), jnp.uint32))
    fwd = jax.jit(lambda x, w: nf4_matmul(x, **w)).trace(
        jax.ShapeDtypeStruct((1, k), jnp.bfloat16), w).lower(lowering_platforms=("cuda",)).as_text()
    assert _mosaic_calls(fwd) == 1 and f"tensor<1x{n}x{k // 8}xui32>" in fwd
    grad = jax.jit(lambda x, dy, w: jax.vjp(lambda x: nf4_matmul(x, **w), x)[1](dy)[0]).trace(
        jax.ShapeDtypeStruct((1, k), jnp.bfloat16), jax.ShapeDtypeStruct((1, n), jnp.bfloat16), w).lower(
        lowering_platforms=("cuda",)).as_text()
    assert _calls(grad, "nf4_mgpu_matmul_t") == 1 and "nf4_gemv_t" not in grad


def test_backward_dispatch_on_faked_hopper(monkeypatch):
    """On a (faked) Hopper the backward of `nf4_matmul` lowers to the Mosaic transposed
    kernel where the forward takes the Mosaic kernel (bfloat16, M <= MGPU_MAX_M, a weight
    >= MGPU_MIN_WEIGHT with ``kernel_scale``; stacked layers too) and to the Triton path
    otherwise (float32, no ``kernel_scale``, M > MGPU_MAX_M, a small weight)."""
    from pallas_kernels.nf4_matmul import MGPU_MAX_M, nf4_matmul

    _fake_hopper(monkeypatch)

    def lowered(m, n, k, dtype=jnp.bfloat16, ks=True, layers=None):
        lead = () if layers is None else (layers,)
        w = dict(packed=jax.ShapeDtypeStruct((*lead, n, k // 2), jnp.uint8),
                 absmax=jax.ShapeDtypeStruct((*lead, n, k // 64), jnp.float32))
        if ks:
            w["kernel_scale"] = jax.ShapeDtypeStruct((*lead, k // 64, n), jnp.bfloat16)
        layer = None if layers is None else jnp.int32(layers - 1)

        def grad(x, dy, w):
            return jax.vjp(lambda x: nf4_matmul(x, **w, layer=layer), x)[1](dy)[0]

        return jax.jit(grad).trace(jax.ShapeDtypeStruct((m, k), dtype),
                                   jax.ShapeDtypeStruct((m, n), dtype), w).lower(
            lowering_platforms=("cuda",)).as_text()

    for m, n, k, layers in ((1, 4096, 4096, None), (1, 11008, 4096, None),
                            (16, 4096, 11008, None), (MGPU_MAX_M, 4096, 4096, None),
                            (1, 4096, 4096, 3)):
        text = lowered(m, n, k, layers=layers)
        assert _calls(text, "nf4_mgpu_matmul_t") == 1, (m, n, k, layers)
        assert "nf4_gemv_t" not in text and "nf4_dequantize" not in text
    for kw, old in ((dict(m=1, dtype=jnp.float32), "nf4_gemv_t"),
                    (dict(m=1, ks=False), "nf4_gemv_t"),
                    (dict(m=MGPU_MAX_M + 1), "nf4_dequantize"),
                    (dict(m=1, n=1024, k=2048), "nf4_gemv_t")):  # 2M elements < MGPU_MIN_WEIGHT
        args = dict(n=4096, k=4096) | kw
        text = lowered(**args)
        assert _calls(text, "nf4_mgpu_matmul_t") == 0 and _mosaic_calls(text) == 0, kw
        assert old in text, kw


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU NF4 kernel needs a Hopper GPU")
@pytest.mark.parametrize("m", [1, 3, 16, 17])
@pytest.mark.parametrize("n,k,layers,kw", [
    (200, 320, None, {}),                           # ragged N (not a multiple of 64)
    (136, 512, 3, {}),                              # ragged N, stacked layers by index
    (1024, 1024, None, {}),                         # the default plan
    (1024, 1024, None, dict(in_flight=0)),          # one SMEM tile, a wait per step
    (264, 256, 2, dict(block_n=128)),               # ragged last step of 128 rows
    (2048, 192, None, dict(block_n=256, splits=2)),  # 3 K tiles, 4 steps per split
    (520, 768, None, dict(block_n=64, splits=1, stages=2)),
])
def test_t_matches_float64(m, n, k, layers, kw):
    """`nf4_mgpu_matmul_t` (``dy @ W``) against float64 NumPy: M = 1, 3 (one 8-row tile
    past M), 16, 17 (padded to 24), N not a multiple of 64, stacked layers by index, both
    ``in_flight`` modes and explicit tiles."""
    from pallas_kernels.nf4_mgpu import nf4_mgpu_matmul_t

    rng = np.random.default_rng()
    packed, absmax = random_weight(rng, n, k, layers=layers)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    scale = nf4_kernel_scale(jnp.asarray(absmax), n, k, 64)
    if layers is None:
        dx = nf4_mgpu_matmul_t(dy, jnp.asarray(packed), scale, **kw)
        p64, a64 = packed, absmax
    else:
        layer = layers - 2  # not the last layer: the index is read, not assumed
        dx = nf4_mgpu_matmul_t(dy, jnp.asarray(packed), scale, jnp.int32(layer), **kw)
        p64, a64 = packed[layer], absmax[layer]
    assert dx.shape == (m, k) and dx.dtype == jnp.bfloat16
    want = np.asarray(dy.astype(jnp.float32), np.float64) @ dense64(p64, a64)
    dx = np.asarray(dx.astype(jnp.float32), np.float64)
    assert np.isfinite(dx).all()
    assert np.linalg.norm(dx - want) / np.linalg.norm(want) < 1e-2


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU NF4 kernel needs a Hopper GPU")
@pytest.mark.parametrize("m,layers", [(1, None), (16, 3), (17, None)])
def test_nf4_matmul_dx_through_mosaic_t(monkeypatch, m, layers):
    """``dx`` of `nf4_matmul` through the custom VJP on the Mosaic path (the transposed
    Mosaic kernel in the lowered gradient) against float64, for a stacked weight read at
    its layer index too."""
    from pallas_kernels import nf4_matmul as op

    monkeypatch.setattr(op, "MGPU_MIN_WEIGHT", 0)  # a test-sized weight takes the kernel
    rng = np.random.default_rng()
    n, k = 520, 1024
    packed, absmax = random_weight(rng, n, k, layers=layers)
    scale = nf4_kernel_scale(jnp.asarray(absmax), n, k, 64)
    layer = None if layers is None else jnp.int32(1)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    f = lambda x: op.nf4_matmul(x, jnp.asarray(packed), jnp.asarray(absmax), blocksize=64,
                                kernel_scale=scale, layer=layer)
    grad_text = jax.jit(lambda x, dy: jax.vjp(f, x)[1](dy)).lower(x, dy).as_text()
    assert _calls(grad_text, "nf4_mgpu_matmul_t") == 1
    (dx,) = jax.vjp(f, x)[1](dy)
    p64, a64 = (packed, absmax) if layers is None else (packed[1], absmax[1])
    want = np.asarray(dy.astype(jnp.float32), np.float64) @ dense64(p64, a64)
    got = np.asarray(dx.astype(jnp.float32), np.float64)
    assert dx.shape == x.shape and dx.dtype == jnp.bfloat16
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


@pytest.mark.parametrize("kernel,shape,kw", [
    ("forward", (1, 4096, 11008), {}),            # 43 steps of 256: 8 splits of 6, padded
    ("forward", (1, 200, 320), dict(splits=2)),   # 5 steps of 64: 3 + 2 (+ 1 past K)
    ("transposed", (1, 11008, 128), {}),          # 172 N steps of 64, uneven splits
])
def test_uneven_splits_lower_for_cuda(kernel, shape, kw):
    """Split counts that do not divide the steps (the last split runs past the end on TMA's
    zero fill) are built for CUDA; a split with no step at all is refused."""
    from pallas_kernels.nf4_mgpu import _default_splits, nf4_mgpu_matmul_t

    m, n, k = shape
    if kernel == "forward":
        assert _default_splits(n // 64, 43) == 8
        args = [jax.ShapeDtypeStruct((m, k), jnp.bfloat16)]
        f = lambda *a: nf4_mgpu_matmul(*a, **kw)  # noqa: E731
    else:
        args = [jax.ShapeDtypeStruct((m, n), jnp.bfloat16)]
        f = lambda *a: nf4_mgpu_matmul_t(*a, **kw)  # noqa: E731
    args += [jax.ShapeDtypeStruct((n, k // 2), jnp.uint8), jax.ShapeDtypeStruct((k // 64, n), jnp.bfloat16)]
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert _mosaic_calls(text) == 1
    with pytest.raises(ValueError, match="no step"):
        nf4_mgpu_matmul(jnp.zeros((1, 320), jnp.bfloat16), jnp.zeros((64, 160), jnp.uint8),
                        jnp.zeros((5, 64), jnp.bfloat16), block_k=64, splits=4)


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU NF4 kernel needs a Hopper GPU")
@pytest.mark.parametrize("kernel,m,n,k,kw", [
    ("forward", 1, 200, 320, dict(splits=2)),
    ("forward", 3, 136, 11008, {}),
    ("forward", 16, 264, 11008, dict(splits=5)),
    ("transposed", 1, 11008, 128, {}),
    ("transposed", 5, 320, 320, dict(splits=3, block_n=64)),  # 5 N steps: 2 + 2 + 1 (+ 1 past N)
])
def test_uneven_splits_match_float64(kernel, m, n, k, kw):
    """Uneven split counts (steps past K or N read as zeros) against float64 NumPy."""
    from pallas_kernels.nf4_mgpu import nf4_mgpu_matmul_t

    rng = np.random.default_rng()
    packed, absmax = random_weight(rng, n, k)
    scale = nf4_kernel_scale(jnp.asarray(absmax), n, k, 64)
    w64 = dense64(packed, absmax)
    if kernel == "forward":
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        y = nf4_mgpu_matmul(x, jnp.asarray(packed), scale, **kw)
        want = np.asarray(x.astype(jnp.float32), np.float64) @ w64.T
    else:
        dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
        y = nf4_mgpu_matmul_t(dy, jnp.asarray(packed), scale, **kw)
        want = np.asarray(dy.astype(jnp.float32), np.float64) @ w64
    y = np.asarray(y.astype(jnp.float32), np.float64)
    assert np.isfinite(y).all()
    assert np.linalg.norm(y - want) / np.linalg.norm(want) < 1e-2


def _kernel_words64(packed):
    """The `nf4_kernel_codes` words from bnb bytes, element by element in NumPy (the
    layout's definition: word ``8j + 2q + e``, nibble ``2t + b`` holds column
    ``64j + 8(4e + t) + 2q + b``)."""
    n, kh = packed.shape
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(n, 2 * kh).astype(np.uint64)
    words = np.zeros((n, 2 * kh // 8), np.uint64)
    for j in range(2 * kh // 64):
        for q in range(4):
            for e in range(2):
                for t in range(4):
                    for b in range(2):
                        words[:, 8 * j + 2 * q + e] |= codes[:, 64 * j + 8 * (4 * e + t) + 2 * q + b] << (4 * (2 * t + b))
    return words.astype(np.uint32)


@pytest.mark.parametrize("n,k,layers", [(8, 64, None), (40, 192, None), (24, 128, 3)])
def test_kernel_codes_layout_and_round_trip(n, k, layers):
    """`nf4_kernel_codes` matches its element-by-element definition, and
    `nf4_codes_from_kernel` gives back the bnb bytes exactly."""
    from pallas_kernels.nf4_mgpu import nf4_codes_from_kernel

    rng = np.random.default_rng()
    packed, _ = random_weight(rng, n, k, layers=layers)
    words = np.asarray(nf4_kernel_codes(jnp.asarray(packed), n, k))
    assert words.dtype == np.uint32 and words.shape == packed.shape[:-1] + (k // 8,)
    flat_p = packed.reshape(-1, n, k // 2)
    for w, p in zip(words.reshape(-1, n, k // 8), flat_p):
        np.testing.assert_array_equal(w, _kernel_words64(p))
    back = np.asarray(nf4_codes_from_kernel(jnp.asarray(words), n, k))
    np.testing.assert_array_equal(back, packed)
    with pytest.raises(ValueError, match="multiple of 64"):
        nf4_kernel_codes(jnp.zeros((8, 48), jnp.uint8), 8, 96)


def test_kernel_codes_lower_for_cuda():
    """The forward kernel over the `nf4_kernel_codes` layout (one and several weights,
    stacked, ragged N) is built for CUDA without a GPU."""
    x = jax.ShapeDtypeStruct((3, 512), jnp.bfloat16)
    ps = (jax.ShapeDtypeStruct((2, 200, 64), jnp.uint32), jax.ShapeDtypeStruct((2, 136, 64), jnp.uint32))
    ss = (jax.ShapeDtypeStruct((2, 8, 200), jnp.bfloat16), jax.ShapeDtypeStruct((2, 8, 136), jnp.bfloat16))
    text = jax.jit(nf4_mgpu_matmul_multi).trace(x, ps, ss, jnp.int32(1)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert _mosaic_calls(text) == 1
    text = jax.jit(lambda x, p, s: nf4_mgpu_matmul(x, p, s, block_k=128)).trace(
        jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16), jax.ShapeDtypeStruct((11008, 512), jnp.uint32),
        jax.ShapeDtypeStruct((64, 11008), jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
    assert _mosaic_calls(text) == 1
    with pytest.raises(ValueError, match="disagree"):
        nf4_mgpu_matmul_multi(jnp.zeros((1, 512), jnp.bfloat16),
                              (jnp.zeros((64, 64), jnp.uint32), jnp.zeros((64, 256), jnp.uint8)),
                              (jnp.zeros((8, 64), jnp.bfloat16),) * 2)


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU NF4 kernel needs a Hopper GPU")
@pytest.mark.parametrize("m,ns,k,layers", [(1, (200,), 320, None), (3, (136, 520), 512, 3),
                                           (16, (1024,), 1024, None), (17, (264, 72), 768, 2),
                                           (1, (4096,), 11008, None)])
def test_kernel_codes_match_float64(m, ns, k, layers):
    """The forward kernel over the `nf4_kernel_codes` layout against float64 NumPy, and
    bit-identical to the kernel over the bnb bytes (same products, same order)."""
    rng = np.random.default_rng()
    ws, dense = _weights(rng, ns, k, layers=layers)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    layer = None if layers is None else jnp.int32(layers - 1)
    words = tuple(nf4_kernel_codes(w["packed"], n, k) for w, n in zip(ws, ns))
    scales = tuple(w["kernel_scale"] for w in ws)
    ys = nf4_mgpu_matmul_multi(x, words, scales, layer)
    base = nf4_mgpu_matmul_multi(x, tuple(w["packed"] for w in ws), scales, layer)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    for y, b, n, d in zip(ys, base, ns, dense):
        y = np.asarray(y.astype(jnp.float32), np.float64)
        want = x64 @ d.T
        assert y.shape == (m, n) and np.isfinite(y).all()
        assert np.linalg.norm(y - want) / np.linalg.norm(want) < 1e-2
        np.testing.assert_array_equal(y, np.asarray(b.astype(jnp.float32), np.float64))


def _run_ptx(asm: str, args: dict) -> dict:
    """A tiny interpreter of the PTX in `_ASM` / `_ASM8` (and, shr, or, mov, prmt in its
    default mode, fma.rn.bf16x2), over 32-bit registers; ``args`` maps ``$i`` to values.
    prmt (PTX ISA, "prmt"): byte i of the result is byte ``c[4i+2:4i]`` of the pool
    ``{b, a}`` (a's bytes 0-3, b's 4-7), or that byte's sign replicated if ``c[4i+3]``."""
    import ml_dtypes

    regs = dict(args)

    def val(tok):
        tok = tok.strip()
        return regs[tok] if tok in regs else int(tok, 0)

    def bf16x2(word):
        return np.array([word & 0xFFFF, word >> 16], np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)

    for line in asm.strip().strip("{}").splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *src = [t.strip() for t in rest.split(",")]
        a = [val(t) for t in src]
        if op == "and.b32":
            r = a[0] & a[1]
        elif op == "or.b32":
            r = a[0] | a[1]
        elif op == "shr.u32":
            r = a[0] >> a[1]
        elif op == "mov.b32":
            r = a[0]
        elif op == "prmt.b32":
            pool = [(a[0] >> (8 * i)) & 0xFF for i in range(4)] + [(a[1] >> (8 * i)) & 0xFF for i in range(4)]
            r = 0
            for i in range(4):
                s = (a[2] >> (4 * i)) & 0xF
                byte = pool[s & 7]
                if s & 8:
                    byte = 0xFF if byte & 0x80 else 0
                r |= byte << (8 * i)
        elif op == "fma.rn.bf16x2":
            f = (bf16x2(a[0]) * bf16x2(a[1]) + bf16x2(a[2])).astype(ml_dtypes.bfloat16)
            r = int(f.view(np.uint16)[0]) | (int(f.view(np.uint16)[1]) << 16)
        else:
            raise AssertionError(f"unexpected PTX op {op}")
        regs[dst] = r & 0xFFFFFFFF
    return regs


def test_lookup_ptx_gives_nf4_times_scale():
    """The register lookups (`_ASM`: two bnb bytes; `_ASM8`: one `nf4_kernel_codes` word),
    run by a PTX interpreter over fresh random codes and scales, give
    ``bf16(bf16(NF4[code]) * bf16(scale))`` per element (the product exact in float64, one
    rounding, as ``fma.rn``) in the order the kernels expect, against NumPy."""
    import ml_dtypes

    from pallas_kernels.nf4_mgpu import _ASM, _ASM8

    rng = np.random.default_rng()

    def word_bf16(x):
        u = np.asarray(x, ml_dtypes.bfloat16).view(np.uint16)
        return int(u[0]) | (int(u[1]) << 16)

    def pair(word):
        return np.array([word & 0xFFFF, word >> 16], np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)

    def bf(v):
        return float(np.asarray(v, ml_dtypes.bfloat16))

    def want(code, scale):  # the kernels' numerics: bf16(bf16(NF4[code]) * bf16(scale)), one rounding
        return bf(bf(NF4[code]) * bf(scale))

    for _ in range(50):
        codes = rng.integers(0, 16, 8)
        s = rng.uniform(0.01, 2.0, 2)
        sb = [word_bf16([v, v]) for v in s]
        # _ASM: register a = bnb byte (c0 high, c1 low), register b = (c2 high, c3 low)
        sel = ((codes[0] << 4) | codes[1]) | (((codes[2] << 4) | codes[3]) << 8)
        r = _run_ptx(_ASM, {"$2": int(sel), "$3": sb[0], "$4": sb[1]})
        np.testing.assert_array_equal(pair(r["$0"]), [want(codes[0], s[0]), want(codes[1], s[0])])
        np.testing.assert_array_equal(pair(r["$1"]), [want(codes[2], s[1]), want(codes[3], s[1])])
        # _ASM8: code i in nibble i; pair t = codes 2t, 2t+1
        word = sum(int(c) << (4 * i) for i, c in enumerate(codes))
        r = _run_ptx(_ASM8, {"$4": word, "$5": sb[0]})
        for t in range(4):
            np.testing.assert_array_equal(pair(r[f"${t}"]),
                                          [want(codes[2 * t], s[0]), want(codes[2 * t + 1], s[0])])
