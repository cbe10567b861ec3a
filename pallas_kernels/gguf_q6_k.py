"""GGUF Q6_K: 256 values per 210-byte super-block, ``w = d * sc * (q - 32)``, 6-bit ``q``.

ggml ``block_q6_K`` (``ggml-common.h``): 128 bytes ``ql`` (low 4 bits; stored in the plane
``qs`` so that Q4_K/Q6_K projections share it), 64 bytes ``qh`` (high 2 bits), 16 int8
``scales`` (one per 16 values), f16 ``d``. Value ``p = 128*half + 64*nib + 32*part + 16*lh
+ l`` takes nibble ``nib`` of ``ql[64*half + 32*part + 16*lh + l]`` and bits ``2*(part +
2*nib)`` of ``qh[32*half + 16*lh + l]``; its scale is ``scales[p // 16]``
(``dequantize_row_q6_K``). Read top to bottom: layout, in-kernel decode (run by
`pallas_kernels.gguf_matmul.gguf_matmul_kernel`), wrapper, reference.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from pallas_kernels.gguf_matmul import F16, gguf_dequantize_reference, gguf_matmul, _signed8

NAME, BLOCK, TYPE_SIZE, SUB = "Q6_K", 256, 210, 16
LAYOUT = (("qs", 128), ("qh", 64), ("scales", 16), ("d", F16))


def decode(ld):
    """Yield ``(j, q - 32 [..., 16], d * sc, None)`` for the sixteen sub-blocks."""
    d = ld("d", 0)
    for half in range(2):
        for lh in range(2):
            qh = ld("qh", 32 * half + 16 * lh, 16)
            for part in range(2):
                ql = ld("qs", 64 * half + 32 * part + 16 * lh, 16)
                for nib in range(2):
                    j = 8 * half + 4 * nib + 2 * part + lh
                    q = ((ql >> (4 * nib)) & 15) | (((qh >> (2 * (part + 2 * nib))) & 3) << 4)
                    sc = _signed8(ld("scales", j)).astype(d.dtype)
                    yield j, q.astype(d.dtype) - 32.0, d * sc, None


def q6_k_matmul(x, planes, *, layer=None, impl=None, interpret=False):
    """``x @ W.T`` for a Q6_K weight ``W [N, K]`` held as field planes
    (`pallas_kernels.gguf_matmul.split_blocks`; ``[L, ...]`` with ``layer``); see
    `pallas_kernels.gguf_matmul.gguf_matmul` for shapes, dtypes and errors."""
    return gguf_matmul(x, planes, 0, fmts=(_SELF,), layer=layer, impl=impl, interpret=interpret)


# ---------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------


def q6_k_dequantize_reference(planes):
    """float32 ``[N, K]``, bit-identical to ``gguf.quants.dequantize(..., Q6_K)``."""
    return gguf_dequantize_reference(planes, fmts=(_SELF,))


def reference(planes):
    """Vectorized jnp decode: float32 ``[..., nb, 256]`` (gguf.quants' operations)."""
    d = jnp.asarray(planes["d"]).astype(jnp.float32)
    sc = jax.lax.bitcast_convert_type(jnp.asarray(planes["scales"])[..., :16], jnp.int8).astype(jnp.float32)
    ql = jnp.asarray(planes["qs"])[..., :128]
    ql = ql.reshape(*ql.shape[:-1], 2, 1, 64)
    ql = jnp.concatenate([ql & 15, ql >> 4], axis=-2).reshape(*ql.shape[:-3], 8, 32)
    qh = jnp.asarray(planes["qh"])[..., :64]
    qh = qh.reshape(*qh.shape[:-1], 2, 1, 32) >> jnp.asarray([0, 2, 4, 6], jnp.uint8)[:, None]
    qh = (qh & 3).reshape(*qh.shape[:-3], 8, 32)
    q = ((ql | (qh << 4)).astype(jnp.int8) - 32).astype(jnp.float32).reshape(*ql.shape[:-2], 16, 16)
    scale = (d[..., None] * sc)[..., None]
    return (scale * q).reshape(*q.shape[:-2], 256)


_SELF = sys.modules[__name__]
