"""Helpers shared by the Pallas kernel tests (rms_norm, swiglu, decode_attention, the GGUF
kernels; `benchmarks/gguf_mgpu.py` takes its random GGUF blocks from here too).

On CPU the kernels run with ``interpret=True``, whose output buffers start as NaN (jax's
``uninitialized_value``), so an element a kernel never writes shows up as non-finite; on
a GPU backend the same tests run the compiled Triton kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU

#: Tolerance per output dtype, relative to the float64 oracle: elementwise
#: ``|a - ref| <= tol * |ref| + tol * max|ref|``. bfloat16 and float16 allow about two
#: roundings to the dtype (2**-8 and 2**-11 relative each); float32 a few ulps of float32
#: arithmetic (more on GPU, whose exp/rsqrt are approximate to about 2**-22).
TOL = {
    jnp.dtype(jnp.float32): 1e-5 if ON_GPU else 2e-6,
    jnp.dtype(jnp.float16): 3e-3,
    jnp.dtype(jnp.bfloat16): 1.6e-2,
}


def f64(a) -> np.ndarray:
    """``a`` (any float dtype, bf16 included) as a float64 NumPy array."""
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def assert_close(actual, expected, dtype=None, what: str = ""):
    """Every element of ``actual`` is finite and within `TOL` of float64 ``expected``."""
    dtype = jnp.dtype(actual.dtype if dtype is None else dtype)
    a = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    assert np.isfinite(a).all(), f"{what}: non-finite elements"
    tol = TOL[dtype]
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol * float(np.max(np.abs(e))), err_msg=what)


def _gguf_formats() -> dict:
    from pallas_kernels import gguf_q4_0, gguf_q4_1, gguf_q4_k, gguf_q5_k, gguf_q6_k, gguf_q8_0

    return {m.NAME: m for m in (gguf_q4_0, gguf_q4_1, gguf_q8_0, gguf_q4_k, gguf_q5_k, gguf_q6_k)}


def random_blocks(rng, qtype: str, n: int, k: int, scale: float = 1.0) -> np.ndarray:
    """Random bytes of an ``[n, k]`` GGUF tensor of ``qtype`` (uint8 ``[n, k / BLOCK *
    TYPE_SIZE]``, ``gguf.GGUFReader``'s rows) with finite f16 fields uniform in ``±scale``:
    any such bytes are a valid block (the oracle is ``gguf.quants.dequantize``)."""
    from pallas_kernels.gguf_matmul import F16

    fmt = _gguf_formats()[qtype]
    nb = k // fmt.BLOCK
    raw = rng.integers(0, 256, (n, nb, fmt.TYPE_SIZE), dtype=np.uint8)
    at = 0
    for _, kind in fmt.LAYOUT:
        if kind == F16:
            raw[:, :, at:at + 2] = rng.uniform(-scale, scale, (n, nb)).astype(np.float16)[..., None].view(np.uint8)
            at += 2
        else:
            at += kind
    return raw.reshape(n, nb * fmt.TYPE_SIZE)


def stacked_planes(raws, types, k: int):
    """One stack ``[L, ...]`` of GGUF layers whose types mix (the union layout of
    `pallas_kernels.gguf_matmul.union_layout`, as a Q4_K_M file's projections): the field
    planes, the int32 ``kind [L]`` and the sorted type names ``kind`` indexes."""
    from pallas_kernels.gguf_matmul import F16, split_blocks, union_layout

    formats = _gguf_formats()
    names = tuple(sorted(set(types)))
    layout = union_layout([formats[q] for q in names])
    layers = []
    for raw, q in zip(raws, types):
        p = split_blocks(raw, formats[q], k)
        ref = next(iter(p.values()))
        full = {}
        for f, kind in layout.items():
            if kind == F16:
                full[f] = p.get(f, np.zeros(ref.shape[:2], np.float16))
            else:
                a = np.zeros(ref.shape[:2] + (int(kind),), np.uint8)
                if f in p:
                    a[..., :p[f].shape[-1]] = p[f]
                full[f] = a
        layers.append(full)
    planes = {f: jnp.asarray(np.stack([lay[f] for lay in layers])) for f in layout}
    return planes, jnp.asarray([names.index(q) for q in types], jnp.int32), names
