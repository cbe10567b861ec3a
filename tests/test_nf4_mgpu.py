"""The Mosaic GPU NF4 matmul (`pallas_kernels.nf4_mgpu`) against float64 NumPy.

The kernel itself runs only on a Hopper GPU (Mosaic GPU has no CPU interpreter for TMA
pipelines): those tests are skipped elsewhere and run on the H200 through the device tool
(``python -m pytest -q tests/test_nf4_mgpu.py``). On the CPU the kernel layout of the
scales, the plain-jnp reference and the kernel's lowering for CUDA are checked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.nf4_mgpu import (
    nf4_kernel_scale,
    nf4_mgpu_matmul,
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
    Mosaic kernel, ``dx`` through the custom VJP's transposed kernel, both against float64."""
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
    y, vjp = jax.vjp(f, x)
    (dx,) = vjp(dy)
    w = dense64(packed, absmax)
    for got, want in ((y, np.asarray(x.astype(jnp.float32), np.float64) @ w.T),
                      (dx, np.asarray(dy.astype(jnp.float32), np.float64) @ w)):
        got = np.asarray(got.astype(jnp.float32), np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
