"""GGUF Q4_0: 32 values per 18-byte block, ``w = d * (q - 8)``.

ggml ``block_q4_0`` (``ggml-common.h``): f16 ``d``, 16 bytes ``qs``; value ``l < 16`` is
the low nibble of ``qs[l]``, value ``l + 16`` its high nibble (``dequantize_row_q4_0`` in
``ggml-quants.c``). Read top to bottom: the layout, the in-kernel decode of a tile of
blocks (run by the shared kernel `pallas_kernels.gguf_matmul.gguf_matmul_kernel`), the
wrapper, and the reference.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from pallas_kernels.gguf_matmul import F16, gguf_dequantize_reference, gguf_matmul

NAME, BLOCK, TYPE_SIZE, SUB = "Q4_0", 32, 18, 16
LAYOUT = (("d", F16), ("qs", 16))


def decode(ld):
    """Yield ``(j, q [..., 16], scale, None)`` for the two 16-value sub-blocks."""
    d, qs = ld("d", 0), ld("qs", 0, 16)
    for j in range(2):
        yield j, ((qs >> (4 * j)) & 15).astype(d.dtype) - 8.0, d, None


def q4_0_matmul(x, planes, *, layer=None, impl=None, interpret=False):
    """``x @ W.T`` for a Q4_0 weight ``W [N, K]`` held as field planes
    (`pallas_kernels.gguf_matmul.split_blocks`; ``[L, ...]`` with ``layer``); see
    `pallas_kernels.gguf_matmul.gguf_matmul` for shapes, dtypes and errors."""
    return gguf_matmul(x, planes, 0, fmts=(_SELF,), layer=layer, impl=impl, interpret=interpret)


# ---------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------


def q4_0_dequantize_reference(planes):
    """float32 ``[N, K]``, bit-identical to ``gguf.quants.dequantize(..., Q4_0)``."""
    return gguf_dequantize_reference(planes, fmts=(_SELF,))


def reference(planes):
    """Vectorized jnp decode: float32 ``[..., nb, 32]`` (gguf.quants' operations)."""
    d = jnp.asarray(planes["d"]).astype(jnp.float32)
    qs = jnp.asarray(planes["qs"])[..., :16]
    q = jnp.stack([qs & 15, qs >> 4], axis=-2).reshape(*qs.shape[:-1], 32)
    return d[..., None] * (q.astype(jnp.int8) - 8).astype(jnp.float32)


_SELF = sys.modules[__name__]
