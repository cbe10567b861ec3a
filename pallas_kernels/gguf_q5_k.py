"""GGUF Q5_K: 256 values per 176-byte super-block, ``w = d * sc * q - dmin * m``, 5-bit ``q``.

ggml ``block_q5_K`` (``ggml-common.h``): as Q4_K (``d``, ``dmin``, 12 bytes of 6-bit scales
and mins) plus 32 bytes ``qh`` before ``qs``: bit ``j`` of ``qh[l]`` is the fifth bit of
value ``l`` of sub-block ``j`` (``dequantize_row_q5_K``). Read top to bottom: layout,
in-kernel decode (run by `pallas_kernels.gguf_matmul.gguf_matmul_kernel`), wrapper,
reference.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from pallas_kernels.gguf_matmul import F16, gguf_dequantize_reference, gguf_matmul
from pallas_kernels.gguf_q4_k import reference_scale_min, scale_min

NAME, BLOCK, TYPE_SIZE, SUB = "Q5_K", 256, 176, 32
LAYOUT = (("d", F16), ("dmin", F16), ("scales", 12), ("qh", 32), ("qs", 128))


def decode(ld):
    """Yield ``(j, q [..., 32], d * sc, -(dmin * m))`` for the eight sub-blocks."""
    d, dmin = ld("d", 0), ld("dmin", 0)
    s = [ld("scales", i) for i in range(12)]  # each byte loaded once per super-block
    qh = ld("qh", 0, 32)
    for c in range(4):
        qs = ld("qs", 32 * c, 32)
        for h in range(2):
            j = 2 * c + h
            sc, m = scale_min(s, j)
            q = ((qs >> (4 * h)) & 15) | (((qh >> j) & 1) << 4)
            yield j, q.astype(d.dtype), d * sc.astype(d.dtype), -(dmin * m.astype(d.dtype))


def q5_k_matmul(x, planes, *, layer=None, impl=None, interpret=False):
    """``x @ W.T`` for a Q5_K weight ``W [N, K]`` held as field planes
    (`pallas_kernels.gguf_matmul.split_blocks`; ``[L, ...]`` with ``layer``); see
    `pallas_kernels.gguf_matmul.gguf_matmul` for shapes, dtypes and errors."""
    return gguf_matmul(x, planes, 0, fmts=(_SELF,), layer=layer, impl=impl, interpret=interpret)


# ---------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------


def q5_k_dequantize_reference(planes):
    """float32 ``[N, K]``, bit-identical to ``gguf.quants.dequantize(..., Q5_K)``."""
    return gguf_dequantize_reference(planes, fmts=(_SELF,))


def reference(planes):
    """Vectorized jnp decode: float32 ``[..., nb, 256]`` (gguf.quants' operations)."""
    d = jnp.asarray(planes["d"]).astype(jnp.float32)
    dmin = jnp.asarray(planes["dmin"]).astype(jnp.float32)
    sc, mn = reference_scale_min(planes["scales"])
    qs = jnp.asarray(planes["qs"])[..., :128]
    qs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    ql = jnp.concatenate([qs & 15, qs >> 4], axis=-2).reshape(*qs.shape[:-3], 8, 32)
    qh = jnp.asarray(planes["qh"])[..., None, :32] >> jnp.arange(8, dtype=jnp.uint8)[:, None]
    q = (ql | ((qh & 1) << 4)).astype(jnp.float32)
    scale = (d[..., None] * sc.astype(jnp.float32))[..., None]
    dm = (dmin[..., None] * mn.astype(jnp.float32))[..., None]
    return (scale * q - dm).reshape(*q.shape[:-2], 256)


_SELF = sys.modules[__name__]
