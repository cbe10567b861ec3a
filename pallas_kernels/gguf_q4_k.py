"""GGUF Q4_K: 256 values per 144-byte super-block, ``w = d * sc * q - dmin * m``.

ggml ``block_q4_K`` (``ggml-common.h``): f16 ``d``, f16 ``dmin``, 12 bytes ``scales`` (eight
6-bit scales ``sc`` and mins ``m``, one per 32-value sub-block, packed as in
``get_scale_min_k4``), 128 bytes ``qs``: bytes ``32c .. 32c+31`` hold sub-block ``2c`` in
their low nibbles and ``2c+1`` in their high nibbles (``dequantize_row_q4_K`` in
``ggml-quants.c``). Scales and mins are decoded once per super-block from their 12 bytes.
Read top to bottom: layout, in-kernel decode (run by
`pallas_kernels.gguf_matmul.gguf_matmul_kernel`), wrapper, reference.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from pallas_kernels.gguf_matmul import F16, gguf_dequantize_reference, gguf_matmul

NAME, BLOCK, TYPE_SIZE, SUB = "Q4_K", 256, 144, 32
LAYOUT = (("d", F16), ("dmin", F16), ("scales", 12), ("qs", 128))


def scale_min(s, j):
    """The 6-bit scale and min of sub-block ``j`` (0..7) from the 12 scale bytes ``s``
    (a list of int32 arrays), int32 (ggml ``get_scale_min_k4``)."""
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def decode(ld):
    """Yield ``(j, q [..., 32], d * sc, -(dmin * m))`` for the eight sub-blocks."""
    d, dmin = ld("d", 0), ld("dmin", 0)
    s = [ld("scales", i) for i in range(12)]  # each byte loaded once per super-block
    for c in range(4):
        qs = ld("qs", 32 * c, 32)
        for h in range(2):
            j = 2 * c + h
            sc, m = scale_min(s, j)
            yield j, ((qs >> (4 * h)) & 15).astype(d.dtype), d * sc.astype(d.dtype), -(dmin * m.astype(d.dtype))


def q4_k_matmul(x, planes, *, layer=None, impl=None, interpret=False):
    """``x @ W.T`` for a Q4_K weight ``W [N, K]`` held as field planes
    (`pallas_kernels.gguf_matmul.split_blocks`; ``[L, ...]`` with ``layer``); see
    `pallas_kernels.gguf_matmul.gguf_matmul` for shapes, dtypes and errors."""
    return gguf_matmul(x, planes, 0, fmts=(_SELF,), layer=layer, impl=impl, interpret=interpret)


# ---------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------


def q4_k_dequantize_reference(planes):
    """float32 ``[N, K]``, bit-identical to ``gguf.quants.dequantize(..., Q4_K)``."""
    return gguf_dequantize_reference(planes, fmts=(_SELF,))


def reference_scale_min(scales):
    """uint8 ``[..., 12]`` -> int32 scales and mins ``[..., 8]`` (gguf.quants ``Q4_K.get_scale_min``)."""
    s = jnp.asarray(scales)[..., :12].astype(jnp.int32)
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = jnp.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=-1)
    mn = jnp.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=-1)
    return sc, mn


def reference(planes):
    """Vectorized jnp decode: float32 ``[..., nb, 256]`` (gguf.quants' operations)."""
    d = jnp.asarray(planes["d"]).astype(jnp.float32)
    dmin = jnp.asarray(planes["dmin"]).astype(jnp.float32)
    sc, mn = reference_scale_min(planes["scales"])
    qs = jnp.asarray(planes["qs"])[..., :128]
    qs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    q = jnp.concatenate([qs & 15, qs >> 4], axis=-2).reshape(*qs.shape[:-3], 8, 32).astype(jnp.float32)
    scale = (d[..., None] * sc.astype(jnp.float32))[..., None]
    dm = (dmin[..., None] * mn.astype(jnp.float32))[..., None]
    return (scale * q - dm).reshape(*q.shape[:-2], 256)


_SELF = sys.modules[__name__]
