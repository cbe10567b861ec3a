"""GGUF Q8_0: 32 values per 34-byte block, ``w = d * q`` with int8 ``q``.

ggml ``block_q8_0`` (``ggml-common.h``): f16 ``d``, 32 int8 ``qs`` (``dequantize_row_q8_0``).
The int8 bytes are stored as uint8 planes and sign-extended by arithmetic. Read top to
bottom: layout, in-kernel decode (run by `pallas_kernels.gguf_matmul.gguf_matmul_kernel`),
wrapper, reference.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from pallas_kernels.gguf_matmul import F16, gguf_dequantize_reference, gguf_matmul, _signed8

NAME, BLOCK, TYPE_SIZE, SUB = "Q8_0", 32, 34, 32
LAYOUT = (("d", F16), ("qs", 32))


def decode(ld):
    """Yield ``(0, q [..., 32], d, None)``: one 32-value sub-block."""
    d = ld("d", 0)
    yield 0, _signed8(ld("qs", 0, 32)).astype(d.dtype), d, None


def q8_0_matmul(x, planes, *, layer=None, impl=None, interpret=False):
    """``x @ W.T`` for a Q8_0 weight ``W [N, K]`` held as field planes
    (`pallas_kernels.gguf_matmul.split_blocks`; ``[L, ...]`` with ``layer``); see
    `pallas_kernels.gguf_matmul.gguf_matmul` for shapes, dtypes and errors."""
    return gguf_matmul(x, planes, 0, fmts=(_SELF,), layer=layer, impl=impl, interpret=interpret)


# ---------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------


def q8_0_dequantize_reference(planes):
    """float32 ``[N, K]``, bit-identical to ``gguf.quants.dequantize(..., Q8_0)``."""
    return gguf_dequantize_reference(planes, fmts=(_SELF,))


def reference(planes):
    """Vectorized jnp decode: float32 ``[..., nb, 32]`` (gguf.quants' operations)."""
    d = jnp.asarray(planes["d"]).astype(jnp.float32)
    q = jax.lax.bitcast_convert_type(jnp.asarray(planes["qs"])[..., :32], jnp.int8).astype(jnp.float32)
    return q * d[..., None]


_SELF = sys.modules[__name__]
