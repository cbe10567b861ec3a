"""The CPU GGUF GEMV (`pallas_kernels.gguf_cpu`, a C++ kernel through XLA's FFI) against
float64 NumPy products of ``gguf.quants.dequantize`` (the gguf package's own decoder), on
tensors quantized by ``gguf.quants.quantize``.

* Q4_0, Q4_1 and Q8_0 at ragged shapes: N rows not a multiple of the kernel's row chunk, K of
  1 to 7 blocks, M = 1 to 16 rows of x (tiles of 4 and the remainders), fresh random data.
* A stacked weight read by a traced layer index inside ``lax.scan`` (nothing sliced).
* Derivatives in x (through the XLA path) equal ``dy @ W`` in float64.
* ``jaxqlora.ggml.xla_matmul`` takes the kernel for decode-sized products and XLA's path for
  more rows, with ``JAXQLORA_CPU_KERNELS=0``, and for the k-quants; without a compiler it
  falls back to XLA's path.

The embedded SmolLM2 model served quantized decodes through this kernel on a CPU; its greedy
tokens are checked against the dense model's argmax in
``tests/test_gguf_quant.py::test_embedded_q4_1_served_quantized``.
"""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxqlora.ggml import from_blocks, stack_weights, xla_matmul
from pallas_kernels import gguf_cpu

T = gguf.GGMLQuantizationType
FORMATS = ("Q4_0", "Q4_1", "Q8_0")

pytestmark = pytest.mark.skipif(not gguf_cpu.available(), reason=f"CPU kernel: {gguf_cpu.unavailable_reason()}")


@pytest.fixture(autouse=True)
def on_the_cpu():
    """Every computation here on the CPU device (on a GPU machine the jitted products would
    otherwise run on the GPU, where `gguf_gemv` takes its XLA fallback)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _quantized(rng, qtype, n, k, layers=None):
    shape = (n, k) if layers is None else (layers, n, k)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.02, 2.0)
    return gguf.quants.quantize(w, T[qtype])


def _check(got, want, what, magnitude=None):
    """``got`` equals the float64 ``want`` to float32 accumulation: a few ulps of the products'
    magnitude. ``magnitude``: float64 ``|x| @ |W|.T`` (`_magnitude`), the scale of each output's
    rounding error when its terms cancel (a small output of large terms); without it, the
    largest output."""
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape and np.isfinite(got).all(), what
    # float32 products summed per block then over blocks: a few ulps of the largest partial sums
    scale = np.abs(want).max() if magnitude is None else np.maximum(magnitude, np.abs(want).max())
    tol = 4e-6 * scale * np.sqrt(want.shape[-1]) + 1e-6
    assert (np.abs(got - want) <= tol).all(), (what, float(np.abs(got - want).max()), float(np.min(tol)))


def _magnitude(x, raw, qtype, shape):
    """float64 ``|x| @ |W|.T`` with W from ``gguf.quants.dequantize``."""
    w = np.abs(gguf.quants.dequantize(np.asarray(raw, np.uint8), T[qtype]).reshape(shape).astype(np.float64))
    return np.abs(np.asarray(x, np.float64)) @ w.T


def _nan_fallback(n):
    """A fallback that gives NaN (both branches of ``platform_dependent`` are traced; on a
    CPU only the kernel's may run, so a NaN in a result means the fallback ran)."""
    return lambda x: jnp.full((x.shape[0], n), jnp.nan, jnp.float32)


@pytest.mark.parametrize("qtype", FORMATS)
def test_gemv_ragged_shapes(qtype):
    rng = np.random.default_rng()
    for n, blocks in ((1, 1), (37, 3), (301, 7), (2053, 2)):
        k = 32 * blocks
        raw = _quantized(rng, qtype, n, k)
        w = from_blocks(raw, qtype, (n, k))
        for m in (1, 2, 3, 4, 5, 7, 16):
            x = rng.standard_normal((m, k)).astype(np.float32)
            got = jax.jit(lambda x, p: gguf_cpu.gguf_gemv(x, p, qtype, fallback=_nan_fallback(n)))(
                jnp.asarray(x), w.planes)
            _check(got, gguf_cpu.gguf_gemv_reference(x, raw, qtype, (n, k)), f"{qtype} {n}x{k} M={m}",
                   _magnitude(x, raw, qtype, (n, k)))


@pytest.mark.parametrize("qtype", FORMATS)
def test_stacked_layers_in_scan(qtype):
    """Three layers stacked, multiplied one after another inside ``lax.scan`` by the traced
    layer index; the kernel reads each layer in place."""
    rng = np.random.default_rng()
    n, k, layers = 45, 96, 3
    raws = [_quantized(rng, qtype, n, k) for _ in range(layers)]
    w = stack_weights([from_blocks(r, qtype, (n, k)) for r in raws])
    x = rng.standard_normal((2, k)).astype(np.float32)

    def body(carry, i):
        return carry, gguf_cpu.gguf_gemv(carry, w.planes, qtype, i, fallback=_nan_fallback(n))

    _, ys = jax.jit(lambda x: jax.lax.scan(body, x, jnp.arange(layers)))(jnp.asarray(x))
    for i, raw in enumerate(raws):
        _check(ys[i], gguf_cpu.gguf_gemv_reference(x, raw, qtype, (n, k)), f"{qtype} layer {i}")


def test_gradient_in_x_is_dy_times_w():
    """``d/dx sum(c * (x @ W.T)) = c @ W``: the derivative runs XLA's path (float64 oracle)."""
    rng = np.random.default_rng()
    n, k = 29, 64
    raw = _quantized(rng, "Q4_1", n, k)
    w = from_blocks(raw, "Q4_1", (n, k))
    x = rng.standard_normal((3, k)).astype(np.float32)
    c = rng.standard_normal((3, n)).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.asarray(c) * xla_matmul(x, w))))(jnp.asarray(x))
    dense = gguf.quants.dequantize(raw, T.Q4_1).reshape(n, k).astype(np.float64)
    _check(grad, c.astype(np.float64) @ dense, "dx")


def _has_kernel(fn, *args) -> bool:
    return "jaxqlora_gguf_gemv" in jax.jit(lambda *a: fn(*a)).lower(*args).as_text()  # a fresh trace


def test_xla_matmul_takes_the_kernel_for_decode_only(monkeypatch):
    """Decode-sized products take the kernel; a prefill-sized one, a k-quant, and every
    product with ``JAXQLORA_CPU_KERNELS=0`` (in a fresh state) keep XLA's path, with the same
    numbers."""
    rng = np.random.default_rng()
    n, k = 40, 128
    raw = _quantized(rng, "Q4_1", n, k)
    w = from_blocks(raw, "Q4_1", (n, k))
    x1 = jnp.asarray(rng.standard_normal((1, k)), jnp.float32)
    big = jnp.asarray(rng.standard_normal((gguf_cpu.MAX_M + 1, k)), jnp.float32)
    assert _has_kernel(xla_matmul, x1, w)
    assert not _has_kernel(xla_matmul, big, w)
    _check(xla_matmul(big, w), gguf_cpu.gguf_gemv_reference(np.asarray(big), raw, "Q4_1", (n, k)), "M=17")
    kq = from_blocks(np.zeros((n, 256 // 256 * 144), np.uint8), "Q4_K", (n, 256))
    assert not _has_kernel(xla_matmul, jnp.ones((1, 256), jnp.float32), kq)
    monkeypatch.setattr(gguf_cpu, "_state", {})
    monkeypatch.setenv(gguf_cpu.ENV, "0")
    assert not gguf_cpu.available() and "JAXQLORA_CPU_KERNELS" in gguf_cpu.unavailable_reason()
    assert not _has_kernel(xla_matmul, x1, w)
    _check(xla_matmul(x1, w), gguf_cpu.gguf_gemv_reference(np.asarray(x1), raw, "Q4_1", (n, k)), "off, M=1")


def test_no_compiler_falls_back_to_xla(monkeypatch, tmp_path):
    """Without a working compiler (and nothing in the cache) the kernel is unavailable, the
    reason names the compiler's failure, and products take XLA's path with the same numbers."""
    rng = np.random.default_rng()
    n, k = 33, 96
    raw = _quantized(rng, "Q8_0", n, k)
    w = from_blocks(raw, "Q8_0", (n, k))
    x = jnp.asarray(rng.standard_normal((2, k)), jnp.float32)
    monkeypatch.setattr(gguf_cpu, "_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    assert not gguf_cpu.available() and "no-such-c++" in gguf_cpu.unavailable_reason()
    assert not _has_kernel(xla_matmul, x, w)
    _check(xla_matmul(x, w), gguf_cpu.gguf_gemv_reference(np.asarray(x), raw, "Q8_0", (n, k)), "no compiler")
