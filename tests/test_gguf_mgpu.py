"""The Mosaic GPU GGUF GEMVs (`pallas_kernels.gguf_mgpu`) against float64 NumPy products of
``gguf.quants.dequantize``.

The kernel runs only on a Hopper GPU (Mosaic GPU has no CPU interpreter for TMA
pipelines): those tests are skipped elsewhere and run on the H100/H200 with
``python3 -m pytest -q tests/test_gguf_mgpu.py``. On the CPU: the kernel layout decoded
back to weights, the kernel's in-register decode (its PTX op list emulated bit for bit in
NumPy, and assembled by ``ptxas`` where one is installed), the plain-jnp reference at
ragged shapes, a mixed Q4_K/Q6_K stack, the capability check on faked devices, and the
kernel's CUDA lowering for every format.

Every weight is fresh random GGUF blocks (any bytes with finite f16 fields are valid
blocks); every activation fresh random bfloat16.
"""

from __future__ import annotations

import shutil
import subprocess

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import random_blocks, stacked_planes

from pallas_kernels import gguf_q4_0, gguf_q4_1, gguf_q4_k, gguf_q6_k, gguf_q8_0
from pallas_kernels.gguf_matmul import F16, split_blocks, union_layout
from pallas_kernels.gguf_mgpu import (
    MGPU_FORMATS,
    decode_program,
    emulate_program,
    gguf_kernel_layout,
    gguf_mgpu_dequantize,
    gguf_mgpu_kernel,
    gguf_mgpu_matmul,
    gguf_mgpu_reference,
    gguf_mgpu_supported,
    program_ptx,
)

T = gguf.GGMLQuantizationType
MODULES = {m.NAME: m for m in (gguf_q4_0, gguf_q4_1, gguf_q8_0, gguf_q4_k, gguf_q6_k)}
SUB = {"Q4_K": 32, "Q6_K": 16, "Q4_0": 32, "Q4_1": 32, "Q8_0": 32}
ON_HOPPER = gguf_mgpu_supported(1, 64, 256, ("Q4_K",), jnp.bfloat16)



def dense64(raw, qtype, n, k):
    """float64 ``W [n, k]`` by ``gguf.quants.dequantize`` (the independent oracle)."""
    return gguf.quants.dequantize(raw, T[qtype]).reshape(n, k).astype(np.float64)


def planes_of(raw, qtype, k):
    return {f: jnp.asarray(p) for f, p in split_blocks(raw, MODULES[qtype], k).items()}



def bf16_x(rng, m, k):
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    return x, np.asarray(x.astype(jnp.float32), np.float64)


def check_f32(got, x64, w64, sub, what=""):
    """``got`` against ``x64 @ w64.T`` to float32 summation: every product ``q * x`` is
    exact (bfloat16 integers times bfloat16), so each element's error is at most (the
    length of its chain of float32 additions, scalings and offsets: ``S`` in a sub-block,
    two per sub-block, the split-K partials) * 2**-23 * ``sum |x w|``; and the error over
    all elements is far below what one bfloat16 rounding of the weights would give
    (2**-9 relative per element, about 2**-9 of ``|y|`` summed at random)."""
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    want = x64 @ w64.T
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all(), what
    depth = sub + 2 * (w64.shape[1] // sub) + 16
    bound = depth * 2.0 ** -23 * (np.abs(x64) @ np.abs(w64).T) + 1e-30
    err = np.abs(got - want)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert (err <= bound).all(), f"{what}: error {err[worst]} > bound {bound[worst]} at {worst}"
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel <= 2.0 ** -16, f"{what}: relative error {rel} (a bfloat16 weight gives ~2**-9)"


#: (format, N, K): N not a multiple of the 64-row tile; K = 3 super-blocks (not a
#: multiple of a two-step split) or 9 legacy blocks (not a multiple of the 256-value step).
RAGGED = [("Q4_K", 200, 768), ("Q6_K", 136, 768), ("Q4_0", 200, 288), ("Q4_1", 72, 288),
          ("Q8_0", 40, 288)]


# ------------------------------------------------------------------ CPU checks


@pytest.mark.parametrize("qtype,n,k", RAGGED)
def test_layout_and_decode_give_gguf_weights(qtype, n, k):
    """The kernel layout holds the file's weights: the kernel's decode program (its PTX
    ops emulated bit for bit) on each code word, times the scales decoded as the kernel
    decodes them, equals ``gguf.quants.dequantize`` (to the one float32 rounding of
    ``scale * q + bias`` that gguf's own float32 arithmetic makes)."""
    from pallas_kernels.gguf_mgpu import _reference_parts

    rng = np.random.default_rng()
    raw = random_blocks(rng, qtype, n, k, scale=2.0)
    ops = {a: np.asarray(v) for a, v in gguf_kernel_layout(planes_of(raw, qtype, k), (qtype,)).items()}
    words = ops["codes"]
    wi = np.arange(words.shape[1])  # word 32 G + 8 g + 2 p + e: sub-block 2 g + e, quad p
    grp, g, p, e = wi // 32, wi % 32 // 8, wi % 8 // 2, wi % 2
    j = 2 * g + e
    if qtype == "Q6_K":  # the hi2 word of 32-value group j, its half j % 2
        hw = ops["hi2"][:, 16 * grp + 8 * (j // 4) + 2 * p + (j // 2) % 2]
        out = np.where((j % 2 == 0)[None, :, None, None],
                       emulate_program(decode_program(qtype, 0), words, hw),
                       emulate_program(decode_program(qtype, 1), words, hw))
    elif qtype == "Q8_0":
        out = emulate_program(decode_program(qtype), words, ops["hi4"])
    else:
        out = emulate_program(decode_program(qtype), words)  # [n, words, pair t, half b]
    t, b = np.arange(4)[:, None], np.arange(2)[None, :]
    col = (256 * grp + 32 * j + 2 * p)[:, None, None] + 8 * t + b
    q = np.zeros((n, words.shape[1] * 8), np.float64)
    q[:, col] = out
    _, scale, bias = _reference_parts(qtype, {a: jnp.asarray(v) for a, v in ops.items()}, n, k)
    s = SUB[qtype]
    w = q[:, :k].reshape(n, k // s, s) * np.asarray(scale, np.float64)[..., None]
    if bias is not None:
        w = w + np.asarray(bias, np.float64)[..., None]
    want = dense64(raw, qtype, n, k)
    np.testing.assert_allclose(w.reshape(n, k), want, rtol=2.0 ** -23, atol=2.0 ** -24 * np.abs(want).max())
    assert np.abs(want).max() > 0


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="no ptxas on this machine")
def test_decode_ptx_assembles():
    """Every inline-PTX decode block assembles for sm_90a (``ptxas``), inside a kernel that
    feeds it loaded words and stores its four outputs."""
    import tempfile

    blocks = []
    for fmt, h in [(f, 0) for f in MGPU_FORMATS] + [("Q6_K", 1)]:
        asm = program_ptx(decode_program(fmt, h), fmt in ("Q6_K", "Q8_0"))
        for i, r in enumerate(("%o0", "%o1", "%o2", "%o3", "%iw", "%ih")):
            asm = asm.replace(f"${i}", r)
        blocks.append(asm)
    ptx = "\n".join([".version 8.0", ".target sm_90a", ".address_size 64",
                     ".visible .entry k(.param .u64 p){",
                     ".reg .b32 %o0, %o1, %o2, %o3, %iw, %ih;", ".reg .b64 %rd;",
                     "ld.param.u64 %rd, [p];", "ld.global.u32 %iw, [%rd];",
                     "ld.global.u32 %ih, [%rd+4];", *blocks,
                     *(f"st.global.u32 [%rd+{4 * i}], %o{i};" for i in range(4)), "ret;", "}"])
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.ptx", "w") as f:
            f.write(ptx)
        r = subprocess.run(["ptxas", "-arch=sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                           check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("qtype,n,k", RAGGED)
def test_reference_matches_float64(qtype, n, k):
    """`gguf_mgpu_reference` (the kernel's arithmetic over the kernel layout: float32 sums
    per sub-block, scaled) at ragged N and K, M = 1 and 3, against float64 products of
    gguf's weights."""
    rng = np.random.default_rng()
    raw = random_blocks(rng, qtype, n, k)
    ops = gguf_kernel_layout(planes_of(raw, qtype, k), (qtype,))
    w64 = dense64(raw, qtype, n, k)
    for m in (1, 3):
        x, x64 = bf16_x(rng, m, k)
        check_f32(gguf_mgpu_reference(x, ops, fmts=(qtype,)), x64, w64, SUB[qtype], f"{qtype} M={m}")


def test_mixed_stack_reference_by_layer():
    """A stacked projection whose layers are Q4_K, Q6_K, Q4_K (a Q4_K_M file's ffn_down):
    one kernel layout, each layer against its own float64 product."""
    rng = np.random.default_rng()
    n, k = 72, 512
    types = ("Q4_K", "Q6_K", "Q4_K")
    raws = [random_blocks(rng, q, n, k) for q in types]
    planes, kind, names = stacked_planes(raws, types, k)
    ops = gguf_kernel_layout(planes, names, kind)
    x, x64 = bf16_x(rng, 1, k)
    ref = jax.jit(gguf_mgpu_reference, static_argnames="fmts")
    deq = jax.jit(gguf_mgpu_dequantize, static_argnames=("k", "fmts"))
    for layer, (raw, q) in enumerate(zip(raws, types)):
        want = dense64(raw, q, n, k)
        got = ref(x, ops, kind, jnp.int32(layer), fmts=names)
        check_f32(got, x64, want, 16, f"layer {layer} ({q})")
        w = np.asarray(deq(ops, k=k, kind=kind, layer=jnp.int32(layer), fmts=names), np.float64)
        np.testing.assert_allclose(w, want, rtol=2.0 ** -23, atol=2.0 ** -24 * np.abs(want).max())


class _FakeDevice:
    platform = "gpu"

    def __init__(self, cc):
        self.compute_capability = cc


@pytest.mark.parametrize("cc,args,want", [
    ("9.0", (1, 4096, 4096, ("Q4_K",), jnp.bfloat16), True),
    ("9.0", (1, 4096, 14336, (gguf_q4_k, gguf_q6_k), jnp.bfloat16), True),
    ("9.0", (3, 200, 288, ("Q4_0",), jnp.bfloat16), True),
    ("8.0", (1, 4096, 4096, ("Q4_K",), jnp.bfloat16), False),      # Ampere: the Triton kernel
    ("9.0", (1, 4096, 4096, ("Q4_K",), jnp.float32), False),       # float32 x would be rounded
    ("9.0", (1, 4096, 4096, ("Q5_K",), jnp.bfloat16), False),      # no Mosaic kernel
    ("9.0", (1, 4096, 4096, ("Q4_0", "Q8_0"), jnp.bfloat16), False),
    ("9.0", (1, 4096, 4000, ("Q4_K",), jnp.bfloat16), False),      # K not whole super-blocks
    ("9.0", (17, 4096, 4096, ("Q4_K",), jnp.bfloat16), False),     # prefill: not a GEMV
])
def test_supported_by_capability(monkeypatch, cc, args, want):
    monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice(cc)])
    assert gguf_mgpu_supported(*args) is want


def _layout_shapes(types, n, k, layers):
    """ShapeDtypeStructs of the kernel layout of a stack of ``types`` (no data)."""
    names = tuple(sorted(set(types)))
    layout = union_layout([MODULES[q] for q in names])
    nb = k // MODULES[names[0]].BLOCK
    planes = {f: jax.ShapeDtypeStruct((layers, n, nb) if kd == F16 else (layers, n, nb, int(kd)),
                                      jnp.float16 if kd == F16 else jnp.uint8)
              for f, kd in layout.items()}
    kind = jax.ShapeDtypeStruct((layers,), jnp.int32)
    return jax.eval_shape(lambda p, kd: gguf_kernel_layout(p, names, kd), planes, kind), names


@pytest.mark.parametrize("types,m", [(("Q4_K",), 1), (("Q6_K",), 3), (("Q4_0",), 1),
                                     (("Q4_1",), 9), (("Q8_0",), 1), (("Q4_K", "Q6_K"), 1)])
def test_lowers_for_cuda(types, m):
    """The kernel (TMA pipeline, inline PTX decode, wgmma per sub-block, the scale fold) is
    built for CUDA without a GPU: one Mosaic GPU custom call per projection, a mixed stack
    included; ragged N and K."""
    n = 200
    k = 768 if MODULES[types[0]].BLOCK == 256 else 288
    ops, names = _layout_shapes(types, n, k, 3)
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    kind = jax.ShapeDtypeStruct((3,), jnp.int32)
    lowered = jax.jit(lambda x, o, kd, i: gguf_mgpu_kernel(x, o, kd, i, fmts=names)).trace(
        x, ops, kind, jnp.int32(1)).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("custom_call @mosaic_gpu") == 1
    out = jax.eval_shape(lambda x, o, kd: gguf_mgpu_kernel(x, o, kd, jnp.int32(1), fmts=names), x, ops, kind)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16


def test_backward_lowers_for_cuda():
    """`gguf_mgpu_matmul` under ``jax.grad`` (a LoRA step through a frozen GGUF weight):
    the forward is the Mosaic kernel, ``dx`` an XLA dot with W decoded from the layout."""
    ops, names = _layout_shapes(("Q4_K", "Q6_K"), 72, 512, 2)
    x = jax.ShapeDtypeStruct((1, 512), jnp.bfloat16)
    kind = jax.ShapeDtypeStruct((2,), jnp.int32)
    loss = lambda x, o, kd: jnp.sum(gguf_mgpu_matmul(x, None, kd, fmts=names, layer=jnp.int32(1),
                                                     kernel_layout=o).astype(jnp.float32) ** 2)
    text = jax.jit(jax.grad(loss)).trace(x, ops, kind).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


def test_rejects_bad_operands():
    with pytest.raises(ValueError, match="no Mosaic GPU kernel"):
        gguf_kernel_layout({"qs": jnp.zeros((4, 1, 128), jnp.uint8)}, ("Q5_K",))
    with pytest.raises(TypeError, match="bfloat16"):
        gguf_mgpu_matmul(jnp.zeros((1, 256), jnp.float32), None, 0, fmts=("Q4_K",),
                         kernel_layout={})


# ------------------------------------------------------------------ on the GPU

hopper = pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU GGUF kernels need a Hopper GPU")


@hopper
@pytest.mark.parametrize("qtype,n,k", RAGGED + [("Q4_K", 4096, 4096), ("Q6_K", 1000, 2048),
                                                 ("Q4_0", 520, 1056), ("Q8_0", 264, 512),
                                                 ("Q4_1", 5, 32)])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_kernel_matches_float64(qtype, n, k, m):
    """The compiled kernel (float32 out) against float64 ``x @ gguf.dequantize(W).T`` at
    float32-summation tolerance; the bfloat16 result within one bfloat16 rounding of it."""
    rng = np.random.default_rng()
    raw = random_blocks(rng, qtype, n, k)
    ops = gguf_kernel_layout(planes_of(raw, qtype, k), (qtype,))
    x, x64 = bf16_x(rng, m, k)
    w64 = dense64(raw, qtype, n, k)
    got = gguf_mgpu_kernel(x, ops, 0, fmts=(qtype,), out_dtype=jnp.float32)
    check_f32(got, x64, w64, SUB[qtype], f"{qtype} {n}x{k} M={m}")
    y = gguf_mgpu_matmul(x, planes_of(raw, qtype, k), 0, fmts=(MODULES[qtype],))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), np.asarray(got), rtol=2 ** -8, atol=1e-30)


@hopper
def test_matmul_gradient_matches_float64():
    """``dx`` of `gguf_mgpu_matmul` (W decoded from the kernel layout, one XLA dot) against
    float64 ``dy @ W``, and the forward it differentiates against float64."""
    rng = np.random.default_rng()
    n, k = 200, 768
    raw = random_blocks(rng, "Q4_K", n, k)
    ops = gguf_kernel_layout(planes_of(raw, "Q4_K", k), ("Q4_K",))
    x, x64 = bf16_x(rng, 2, k)
    dy = jnp.asarray(rng.standard_normal((2, n)), jnp.bfloat16)
    y, vjp = jax.vjp(lambda x: gguf_mgpu_matmul(x, None, 0, fmts=("Q4_K",), kernel_layout=ops), x)
    (dx,) = vjp(dy)
    w64 = dense64(raw, "Q4_K", n, k)
    for got, want in ((y, x64 @ w64.T), (dx, np.asarray(dy.astype(jnp.float32), np.float64) @ w64)):
        got = np.asarray(got.astype(jnp.float32), np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2 ** -7  # bf16 rounding of W, dx


@hopper
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_kernel_splits(splits):
    """Split-K over 1, 2 and 3 programs (3 does not divide the 12 steps' pairs evenly: the
    last split runs past K on TMA's zero fill)."""
    rng = np.random.default_rng()
    n, k = 136, 12 * 256
    raw = random_blocks(rng, "Q4_K", n, k)
    ops = gguf_kernel_layout(planes_of(raw, "Q4_K", k), ("Q4_K",))
    x, x64 = bf16_x(rng, 1, k)
    got = gguf_mgpu_kernel(x, ops, 0, fmts=("Q4_K",), splits=splits, out_dtype=jnp.float32)
    check_f32(got, x64, dense64(raw, "Q4_K", n, k), 32, f"splits={splits}")


@hopper
@pytest.mark.parametrize("m", [1, 5])
def test_kernel_mixed_stack_by_layer(m):
    """Q4_K, Q6_K, Q4_K layers in one stack, the layer a traced index read in place: one
    launch, each layer against float64."""
    rng = np.random.default_rng()
    n, k = 200, 1024
    types = ("Q4_K", "Q6_K", "Q4_K")
    raws = [random_blocks(rng, q, n, k) for q in types]
    planes, kind, names = stacked_planes(raws, types, k)
    ops = gguf_kernel_layout(planes, names, kind)
    x, x64 = bf16_x(rng, m, k)
    f = jax.jit(lambda x, o, kd, i: gguf_mgpu_kernel(x, o, kd, i, fmts=names, out_dtype=jnp.float32))
    for layer, (raw, q) in enumerate(zip(raws, types)):
        got = f(x, ops, kind, jnp.int32(layer))
        check_f32(got, x64, dense64(raw, q, n, k), 16, f"layer {layer} ({q}) M={m}")
