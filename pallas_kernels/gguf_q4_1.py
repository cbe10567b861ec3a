"""GGUF Q4_1: 32 values per 20-byte block, ``w = d * q + m``.

ggml ``block_q4_1`` (``ggml-common.h``): f16 ``d``, f16 ``m``, 16 bytes ``qs`` (nibbles as
Q4_0: low nibbles are values 0..15, high nibbles 16..31; ``dequantize_row_q4_1``). Read top
to bottom: layout, in-kernel decode (run by `pallas_kernels.gguf_matmul.gguf_matmul_kernel`),
wrapper, reference.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from pallas_kernels.gguf_matmul import F16, gguf_dequantize_reference, gguf_matmul

NAME, BLOCK, TYPE_SIZE, SUB = "Q4_1", 32, 20, 16
LAYOUT = (("d", F16), ("m", F16), ("qs", 16))


def decode(ld):
    """Yield ``(j, q [..., 16], d, m)`` for the two 16-value sub-blocks."""
    d, m, qs = ld("d", 0), ld("m", 0), ld("qs", 0, 16)
    for j in range(2):
        yield j, ((qs >> (4 * j)) & 15).astype(d.dtype), d, m


def q4_1_matmul(x, planes, *, layer=None, impl=None, interpret=False):
    """``x @ W.T`` for a Q4_1 weight ``W [N, K]`` held as field planes
    (`pallas_kernels.gguf_matmul.split_blocks`; ``[L, ...]`` with ``layer``); see
    `pallas_kernels.gguf_matmul.gguf_matmul` for shapes, dtypes and errors."""
    return gguf_matmul(x, planes, 0, fmts=(_SELF,), layer=layer, impl=impl, interpret=interpret)


# ---------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------


def q4_1_dequantize_reference(planes):
    """float32 ``[N, K]``, bit-identical to ``gguf.quants.dequantize(..., Q4_1)``."""
    return gguf_dequantize_reference(planes, fmts=(_SELF,))


def reference(planes):
    """Vectorized jnp decode: float32 ``[..., nb, 32]`` (gguf.quants' operations)."""
    d = jnp.asarray(planes["d"]).astype(jnp.float32)
    m = jnp.asarray(planes["m"]).astype(jnp.float32)
    qs = jnp.asarray(planes["qs"])[..., :16]
    q = jnp.stack([qs & 15, qs >> 4], axis=-2).reshape(*qs.shape[:-1], 32).astype(jnp.float32)
    return d[..., None] * q + m[..., None]


_SELF = sys.modules[__name__]
