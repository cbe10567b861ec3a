"""NF4 matmul: ``y = x @ W.T`` with a 4-bit NormalFloat weight, dequantized on the fly.

The weight layout is bitsandbytes' (``bitsandbytes.functional.quantize_4bit(w,
quant_type="nf4")``, the QLoRA paper: Dettmers et al. 2023, "QLoRA: Efficient
Finetuning of Quantized LLMs", Sec. 3 and App. E):

* ``W`` is ``[N, K] = [out_features, in_features]``; element ``(n, k)`` has the flat
  index ``f = n*K + k``.
* ``packed`` (uint8) holds two 4-bit codes per byte: element ``f`` is in byte
  ``f // 2``, in the HIGH nibble when ``f`` is even and the LOW nibble when odd.
  A code indexes the 16-entry NF4 codebook `NF4_CODE` (or a user ``code``).
* Blocks of ``blocksize`` consecutive flat elements share one scale:
  ``W[n, k] = code[nibble(f)] * absmax[f // blocksize]``.
* Double quantization (QLoRA Sec. 3, bnb ``compress_statistics=True``): ``absmax``
  is then uint8 codes and its float value is
  ``nested_code[absmax[i]] * nested_absmax[i // nested_blocksize] + offset`` for
  the flat block index ``i`` (``nested_blocksize`` is 256 in bnb).

The file reads top to bottom like ``jax/experimental/pallas/ops/gpu/rms_norm.py``:
the forward Pallas kernel and the wrapper that picks its tiles, the transposed
(backward, ``dx = dy @ W``) kernel and its wrapper, the ``jax.custom_vjp``
binding with the public `nf4_matmul`, and the plain-jnp references at the bottom
(`nf4_dequantize_reference`, `nf4_matmul_reference`; the XLA path and the oracle).

Kernel structure (Pallas, Triton backend; also runs with ``interpret=True``):

* Forward grid ``(cdiv(M, block_m), cdiv(N, block_n))``; each program owns one
  ``[block_m, block_n]`` tile of ``y`` and loops over ``K`` in steps of
  ``block_k``, a power of two that DIVIDES ``blocksize`` (so ``K % block_k == 0``
  and a K step lies inside one quantization block: every row ``n`` of the W tile
  has one scale). Per step it loads ``x[block_m, block_k]`` and the packed bytes
  ``[block_n, block_k // 2]``, splits the nibbles and interleaves them (high,
  low) into ``[block_n, block_k]`` codes, looks the codes up in the codebook (a
  gather from the 16-entry ``code`` ref), runs one MMA with float32
  accumulation, and scales the partial product's columns by the block scales
  ``s[block_n]`` (``acc += (x @ codes.T) * s``). Ragged M and N edges are masked
  (loads with ``mask``/``other=0``, masked stores); there is no ragged K edge
  because ``K % blocksize == 0`` is required on this path.
* Backward (``dx = dy @ W``, a ``[M, K]`` output) grid
  ``(cdiv(M, block_m), K // block_k)``; each program loops over ``N`` in steps
  of ``block_n`` (masked at the edge), scales the ``dy`` columns by ``s`` in
  float32, and accumulates ``dy_scaled @ codes`` in float32.
* Double quantization is dequantized INSIDE both kernels: per K step the uint8
  absmax codes of the ``block_n`` rows are loaded, looked up in the 256-entry
  ``nested_code`` table by a gather (ref indexing with an integer array, which
  Pallas' Triton lowering turns into a pointer gather), and combined with the
  gathered ``nested_absmax[i // nested_blocksize]`` and ``offset``. Neither the
  dequantized ``W`` nor the float absmax is ever written to HBM.
* The weight is frozen: the custom VJP returns zero cotangents for ``packed``,
  ``absmax``, ``nested_absmax``, ``nested_code``, ``offset`` and ``code``
  (``float0`` for the integer ones).

Numerics: ``x`` in bfloat16/float16 multiplies codes rounded to ``x.dtype``
(about 2**-9 relative for bfloat16, the same size as bnb's dequantize-to-bf16),
float32 ``x`` uses IEEE float32 MMAs (no TF32); accumulation is always float32
and the result is cast to ``x.dtype``.

Status: correctness first. Checked in interpret mode (jax 0.10) and compiled on
an H200 with jax 0.11.2 (whose Pallas Triton backend emits a DeprecationWarning
pointing to Mosaic GPU). Not tuned: the per-element codebook gather and the
re-dequantization of each W tile by every M tile keep it at about 50 TFLOP/s:
roughly on par with the XLA path (dequantize + cuBLAS) for M <= 16 and 4-10x
slower for M >= 512 on an H200; see ``benchmarks/nf4_matmul.py``.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

try:  # The Triton-specific Pallas API (``plgpu`` in jax's own GPU ops).
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - very old / unusual jax builds.
    plgpu = None

__all__ = [
    "NF4_CODE",
    "nf4_matmul",
    "nf4_dequantize_reference",
    "nf4_matmul_reference",
]

#: The 16 NF4 code values, index 0..15 (QLoRA paper App. E; bnb
#: ``functional.get_4bit_type("nf4")``), float32 [16], sorted ascending.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
NF4_CODE.setflags(write=False)

#: Environment variable that overrides ``impl=None``/``'auto'``: 'pallas' or 'xla'.
KERNELS_ENV = "JAXQLORA_KERNELS"

_X_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


# ---------------------------------------------------------------------------
# Shared in-kernel helpers
# ---------------------------------------------------------------------------


def _zero(dtype) -> jax.Array:
    """A 0-d zero of ``dtype``, for ``other=`` of masked loads (types must match)."""
    return jnp.zeros((), dtype)


def _dot(a: jax.Array, b: jax.Array, contract_b: int) -> jax.Array:
    """``a @ b`` (contract_b=0) or ``a @ b.T`` (contract_b=1), float32 accumulation.

    ``Precision.HIGHEST`` makes float32 operands IEEE float32 on Triton (no TF32);
    for 16-bit operands it is the plain MMA.
    """
    return lax.dot_general(
        a,
        b,
        (((1,), (contract_b,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


def _load_codes(packed_ref, code_ref, n0, byte0, mask_n, *, block_n: int, block_k: int):
    """Codebook values of the W tile ``[n0:n0+block_n, 2*byte0 : 2*byte0+block_k]``.

    Loads ``packed[n0:n0+block_n, byte0:byte0+block_k//2]`` (rows past ``N``
    masked to byte 0), splits each byte into (high, low) nibbles, interleaves them
    along K (high nibble = even k) and gathers ``code[nibble]``: float32
    ``[block_n, block_k]``.
    """
    half = block_k // 2
    mask = jnp.broadcast_to(mask_n[:, None], (block_n, half))
    p = plgpu.load(
        packed_ref.at[pl.ds(n0, block_n), pl.ds(byte0, half)],
        mask=mask,
        other=_zero(packed_ref.dtype),
    ).astype(jnp.int32)
    nibbles = jnp.stack([p >> 4, p & 15], axis=-1).reshape(block_n, block_k)
    return plgpu.load(code_ref.at[nibbles])


def _load_scales(absmax_ref, nested_refs, n0, kb, mask_n, *, block_n: int,
                 nested_blocksize: int):
    """Float32 block scales ``absmax[n0:n0+block_n, kb]`` (0 for rows past ``N``).

    With double quantization (``nested_refs = (nested_absmax_ref, nested_code_ref,
    offset_ref)``) the uint8 codes are dequantized here:
    ``nested_code[q] * nested_absmax[(n*K/blocksize + kb) // nested_blocksize] +
    offset``, both tables read by gathers.
    """
    q = plgpu.load(absmax_ref.at[pl.ds(n0, block_n), kb], mask=mask_n,
                   other=_zero(absmax_ref.dtype))
    if nested_refs is None:
        return q.astype(jnp.float32)
    nested_absmax_ref, nested_code_ref, offset_ref = nested_refs
    n_kblocks = absmax_ref.shape[1]
    block_index = (n0 + jnp.arange(block_n, dtype=jnp.int32)) * n_kblocks + kb
    nested = plgpu.load(
        nested_absmax_ref.at[lax.div(block_index, jnp.int32(nested_blocksize))],
        mask=mask_n,
        other=_zero(jnp.float32),
    )
    values = plgpu.load(nested_code_ref.at[q.astype(jnp.int32)])
    scale = values * nested + offset_ref[...]
    return jnp.where(mask_n, scale, 0.0)


# ---------------------------------------------------------------------------
# Forward kernel: y[M, N] = x[M, K] @ W[N, K].T
# ---------------------------------------------------------------------------


def nf4_matmul_kernel(x_ref, packed_ref, absmax_ref, code_ref, *refs,
                      blocksize: int, nested_blocksize: int, double_quant: bool,
                      block_m: int, block_n: int, block_k: int):
    """One ``[block_m, block_n]`` tile of ``y``; loops over K in ``block_k`` steps."""
    if double_quant:
        *nested_refs, o_ref = refs
    else:
        nested_refs, (o_ref,) = None, refs
    m, k = x_ref.shape
    n = packed_ref.shape[0]
    m0 = pl.program_id(0) * block_m
    n0 = pl.program_id(1) * block_n
    mask_m = m0 + jnp.arange(block_m, dtype=jnp.int32) < m
    mask_n = n0 + jnp.arange(block_n, dtype=jnp.int32) < n
    x_mask = jnp.broadcast_to(mask_m[:, None], (block_m, block_k))
    steps_per_block = blocksize // block_k

    def body(kt, acc):
        x = plgpu.load(
            x_ref.at[pl.ds(m0, block_m), pl.ds(kt * block_k, block_k)],
            mask=x_mask,
            other=_zero(x_ref.dtype),
        )
        codes = _load_codes(packed_ref, code_ref, n0, kt * (block_k // 2), mask_n,
                            block_n=block_n, block_k=block_k)
        scale = _load_scales(absmax_ref, nested_refs, n0,
                             lax.div(kt, jnp.int32(steps_per_block)), mask_n,
                             block_n=block_n, nested_blocksize=nested_blocksize)
        return acc + _dot(x, codes.astype(x.dtype), 1) * scale[None, :]

    acc = lax.fori_loop(0, k // block_k, body,
                        jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(
        o_ref.at[pl.ds(m0, block_m), pl.ds(n0, block_n)],
        acc.astype(o_ref.dtype),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def _block_k(blocksize: int, cap: int = 128) -> int:
    """The largest power of two dividing ``blocksize``, at most ``cap``."""
    return min(blocksize & -blocksize, cap)


def _block_m(m: int) -> int:
    # Triton's dot needs every tile dim >= 16; rows past M are masked.
    return min(max(pl.next_power_of_2(m), 16), 64)


def _compiler_params(num_warps: int, num_stages: int):
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def _nested_args(nested_absmax, nested_code, offset):
    if nested_absmax is None:
        return ()
    return (nested_absmax, nested_code, offset)


@functools.partial(
    jax.jit,
    static_argnames=("blocksize", "nested_blocksize", "interpret", "block_m",
                     "block_n", "block_k", "num_warps", "num_stages"),
)
def nf4_matmul_pallas(x, packed, absmax, code, nested_absmax=None, nested_code=None,
                      offset=None, *, blocksize: int, nested_blocksize: int = 256,
                      interpret: bool = False, block_m: int | None = None,
                      block_n: int | None = None, block_k: int | None = None,
                      num_warps: int = 4, num_stages: int = 2):
    """Forward Pallas call on validated 2-D operands: ``x[M, K] @ W.T -> [M, N]``.

    ``packed`` uint8 [N, K//2], ``absmax`` float32 or uint8 [N, K//blocksize],
    ``code`` float32 [16], nested operands float32 [ceil(nblocks/nested_blocksize)],
    [256] and [] (or all None). Tiles default from the shape: ``block_m`` =
    next power of two of M clamped to [16, 64], ``block_n`` = 64, ``block_k`` = the
    largest power of two dividing ``blocksize`` capped at 128 (it must divide
    ``blocksize``). Use `nf4_matmul`; this skips its checks.
    """
    m, k = x.shape
    n = packed.shape[0]
    block_m = block_m or _block_m(m)
    block_n = block_n or 64
    block_k = block_k or _block_k(blocksize)
    assert blocksize % block_k == 0 and block_k % 32 == 0, (blocksize, block_k)
    nested = _nested_args(nested_absmax, nested_code, offset)
    kernel = functools.partial(
        nf4_matmul_kernel, blocksize=blocksize, nested_blocksize=nested_blocksize,
        double_quant=bool(nested), block_m=block_m, block_n=block_n, block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_m), pl.cdiv(n, block_n)),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="nf4_matmul",
    )(x, packed, absmax, code, *nested)


# ---------------------------------------------------------------------------
# Transposed (backward) kernel: dx[M, K] = dy[M, N] @ W[N, K]
# ---------------------------------------------------------------------------


def nf4_matmul_t_kernel(dy_ref, packed_ref, absmax_ref, code_ref, *refs,
                        blocksize: int, nested_blocksize: int, double_quant: bool,
                        block_m: int, block_n: int, block_k: int):
    """One ``[block_m, block_k]`` tile of ``dx``; loops over N in ``block_n`` steps."""
    if double_quant:
        *nested_refs, o_ref = refs
    else:
        nested_refs, (o_ref,) = None, refs
    m, n = dy_ref.shape
    m0 = pl.program_id(0) * block_m
    kt = pl.program_id(1)
    kb = lax.div(kt, jnp.int32(blocksize // block_k))  # one quant block per K tile
    mask_m = m0 + jnp.arange(block_m, dtype=jnp.int32) < m

    def body(nt, acc):
        n0 = nt * block_n
        mask_n = n0 + jnp.arange(block_n, dtype=jnp.int32) < n
        dy = plgpu.load(
            dy_ref.at[pl.ds(m0, block_m), pl.ds(n0, block_n)],
            mask=mask_m[:, None] & mask_n[None, :],
            other=_zero(dy_ref.dtype),
        )
        scale = _load_scales(absmax_ref, nested_refs, n0, kb, mask_n,
                             block_n=block_n, nested_blocksize=nested_blocksize)
        dy = (dy.astype(jnp.float32) * scale[None, :]).astype(dy_ref.dtype)
        codes = _load_codes(packed_ref, code_ref, n0, kt * (block_k // 2), mask_n,
                            block_n=block_n, block_k=block_k)
        return acc + _dot(dy, codes.astype(dy_ref.dtype), 0)

    acc = lax.fori_loop(0, pl.cdiv(n, block_n), body,
                        jnp.zeros((block_m, block_k), jnp.float32))
    plgpu.store(
        o_ref.at[pl.ds(m0, block_m), pl.ds(kt * block_k, block_k)],
        acc.astype(o_ref.dtype),
        mask=jnp.broadcast_to(mask_m[:, None], (block_m, block_k)),
    )


@functools.partial(
    jax.jit,
    static_argnames=("blocksize", "nested_blocksize", "interpret", "block_m",
                     "block_n", "block_k", "num_warps", "num_stages"),
)
def nf4_matmul_t_pallas(dy, packed, absmax, code, nested_absmax=None, nested_code=None,
                        offset=None, *, blocksize: int, nested_blocksize: int = 256,
                        interpret: bool = False, block_m: int | None = None,
                        block_n: int | None = None, block_k: int | None = None,
                        num_warps: int = 4, num_stages: int = 2):
    """Transposed Pallas call: ``dy[M, N] @ W -> [M, K]`` (operands as in
    `nf4_matmul_pallas`; ``block_n`` is the reduction step here)."""
    m, n = dy.shape
    k = packed.shape[1] * 2
    block_m = block_m or _block_m(m)
    block_n = block_n or 64
    block_k = block_k or _block_k(blocksize)
    assert blocksize % block_k == 0 and block_k % 32 == 0, (blocksize, block_k)
    nested = _nested_args(nested_absmax, nested_code, offset)
    kernel = functools.partial(
        nf4_matmul_t_kernel, blocksize=blocksize, nested_blocksize=nested_blocksize,
        double_quant=bool(nested), block_m=block_m, block_n=block_n, block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_m), k // block_k),
        out_shape=jax.ShapeDtypeStruct((m, k), dy.dtype),
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="nf4_matmul_t",
    )(dy, packed, absmax, code, *nested)


# ---------------------------------------------------------------------------
# custom_vjp binding and the public op
# ---------------------------------------------------------------------------


class _Config(NamedTuple):
    impl: str  # 'pallas' or 'xla'
    shape: tuple[int, int]  # (N, K)
    blocksize: int
    nested_blocksize: int
    interpret: bool


def _forward(cfg: _Config, x, packed, absmax, nested_absmax, nested_code, offset, code):
    n, k = cfg.shape
    batch = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return jnp.zeros((*batch, n), x.dtype)
    if cfg.impl == "xla":
        y = nf4_matmul_reference(x2, packed, absmax, nested_absmax, nested_code, offset,
                                 code=code, blocksize=cfg.blocksize,
                                 nested_blocksize=cfg.nested_blocksize, shape=cfg.shape)
    else:
        y = nf4_matmul_pallas(x2, packed, absmax, code, nested_absmax, nested_code,
                              offset, blocksize=cfg.blocksize,
                              nested_blocksize=cfg.nested_blocksize,
                              interpret=cfg.interpret)
    return y.reshape(*batch, n)


def _backward_dx(cfg: _Config, dy, packed, absmax, nested_absmax, nested_code, offset,
                 code):
    n, k = cfg.shape
    batch = dy.shape[:-1]
    dy2 = dy.reshape(-1, n)
    if dy2.shape[0] == 0:
        return jnp.zeros((*batch, k), dy.dtype)
    if cfg.impl == "xla":
        w = nf4_dequantize_reference(packed, absmax, nested_absmax, nested_code, offset,
                                     code=code, blocksize=cfg.blocksize,
                                     nested_blocksize=cfg.nested_blocksize,
                                     shape=cfg.shape)
        dx = _dot(dy2, w.astype(dy.dtype), 0).astype(dy.dtype)
    else:
        dx = nf4_matmul_t_pallas(dy2, packed, absmax, code, nested_absmax, nested_code,
                                 offset, blocksize=cfg.blocksize,
                                 nested_blocksize=cfg.nested_blocksize,
                                 interpret=cfg.interpret)
    return dx.reshape(*batch, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _nf4_matmul_vjp(cfg, x, packed, absmax, nested_absmax, nested_code, offset, code):
    return _forward(cfg, x, packed, absmax, nested_absmax, nested_code, offset, code)


def _nf4_matmul_fwd(cfg, x, packed, absmax, nested_absmax, nested_code, offset, code):
    y = _forward(cfg, x, packed, absmax, nested_absmax, nested_code, offset, code)
    return y, (packed, absmax, nested_absmax, nested_code, offset, code)


def _zero_cotangent(a):
    if a is None:
        return None
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros(a.shape, a.dtype)
    return np.zeros(a.shape, dtype=jax.dtypes.float0)


def _nf4_matmul_bwd(cfg, residuals, dy):
    dx = _backward_dx(cfg, dy, *residuals)
    return (dx, *(_zero_cotangent(a) for a in residuals))


_nf4_matmul_vjp.defvjp(_nf4_matmul_fwd, _nf4_matmul_bwd)


def _resolve_impl(impl: str | None, interpret: bool) -> str:
    """'pallas' or 'xla' from ``impl``, ``$JAXQLORA_KERNELS`` and the backend."""
    if impl in ("pallas", "xla"):
        return impl
    if impl not in (None, "auto"):
        raise ValueError(f"impl must be None, 'auto', 'pallas' or 'xla', got {impl!r}")
    env = os.environ.get(KERNELS_ENV, "").strip().lower()
    if env:
        if env not in ("pallas", "xla"):
            raise ValueError(f"${KERNELS_ENV} must be 'pallas' or 'xla', got {env!r}")
        return env
    if interpret or jax.default_backend() == "gpu":
        return "pallas"
    return "xla"


def _as_f32(name: str, a, shape_hint: str) -> jax.Array:
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating {shape_hint}, got {a.dtype}")
    return a.astype(jnp.float32)


def nf4_matmul(x, packed, absmax, nested_absmax=None, nested_code=None, offset=None, *,
               code=None, blocksize: int = 64, nested_blocksize: int = 256,
               impl: str | None = None, interpret: bool = False) -> jax.Array:
    """``y = x @ W.T`` for an NF4-quantized, frozen weight ``W[N, K]`` (bnb layout).

    Args:
      x: ``[..., K]`` bfloat16, float16 or float32 activations.
      packed: uint8 ``[N, K//2]``, two codes per byte (high nibble = even flat
        index; see the module docstring). On the 'xla' path the flat bnb layout
        (any shape with ``(N*K+1)//2`` elements, e.g. ``[(N*K+1)//2, 1]``) is
        accepted too, with ``N`` inferred; the 'pallas' path needs ``[N, K//2]``.
      absmax: float32 ``[N, K//blocksize]`` block scales, or uint8 codes of that
        shape with double quantization. A flat ``[nblocks]`` array is accepted;
        on the 'xla' path ``nblocks = ceil(N*K/blocksize)`` (ragged last block).
      nested_absmax: float32 ``[ceil(nblocks/nested_blocksize)]`` (double quant only).
      nested_code: float32 ``[256]`` lookup table of the uint8 absmax codes.
      offset: float32 scalar added to the dequantized absmax (bnb's mean).
      code: float32 ``[16]`` codebook; default `NF4_CODE`.
      blocksize: elements per absmax block, even, 32..4096 (bnb: powers of two).
      nested_blocksize: absmax blocks per ``nested_absmax`` entry (bnb: 256).
      impl: None/'auto' -> 'pallas' when ``jax.default_backend() == 'gpu'`` (or
        ``interpret=True``), else 'xla'; ``$JAXQLORA_KERNELS`` ('pallas'/'xla')
        overrides auto. 'pallas' / 'xla' force one path. The 'xla' path is
        `nf4_matmul_reference` (jnp dequantize + dot).
      interpret: run the Pallas kernels in interpret mode (CPU testing).

    Returns:
      ``[..., N]`` array of ``x.dtype`` (float32 accumulation). Differentiable in
      ``x`` only (``dx = dy @ W`` through the transposed NF4 kernel on the 'pallas'
      path); every quantization operand gets a zero cotangent (``float0`` for the
      integer ones): the weight is frozen.

    Raises:
      TypeError: a wrong dtype (``x`` not bf16/f16/f32, ``packed`` not uint8,
        ``absmax`` neither floating nor uint8).
      ValueError: naming the argument: shape mismatches between ``x``,
        ``packed``, ``absmax``, ``nested_*``, ``code``; missing or unexpected
        nested operands; a bad ``blocksize``/``impl``; 'pallas' without a GPU
        backend and without ``interpret``; on the 'pallas' path
        ``K % blocksize != 0`` or ``blocksize`` not a multiple of 32 (the kernel's
        K tile is a power of two dividing ``blocksize``).
    """
    mode = _resolve_impl(impl, interpret)
    x = jnp.asarray(x)
    if jnp.dtype(x.dtype) not in _X_DTYPES:
        raise TypeError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x must have shape [..., K], got a scalar")
    k = x.shape[-1]
    if not isinstance(blocksize, (int, np.integer)) or not (
            32 <= blocksize <= 4096 and blocksize % 2 == 0):
        raise ValueError(f"blocksize must be an even integer in [32, 4096], got {blocksize!r}")
    if not isinstance(nested_blocksize, (int, np.integer)) or nested_blocksize < 1:
        raise ValueError(f"nested_blocksize must be a positive integer, got {nested_blocksize!r}")
    blocksize, nested_blocksize = int(blocksize), int(nested_blocksize)

    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if packed.ndim == 2 and 2 * packed.shape[1] == k:
        n = packed.shape[0]
    elif mode == "xla" and k > 0 and (((2 * packed.size) // k) * k + 1) // 2 == packed.size:
        n = (2 * packed.size) // k
    else:
        raise ValueError(
            f"packed must be uint8 [N, K//2] with K = x.shape[-1] = {k}"
            + (" (or flat [(N*K+1)//2] on the 'xla' path)" if mode == "xla" else "")
            + f", got shape {packed.shape}")

    if mode == "pallas":
        if not interpret and jax.default_backend() != "gpu":
            raise ValueError(
                f"impl: the pallas path needs a GPU backend (or interpret=True); the "
                f"default backend is {jax.default_backend()!r}, use impl='xla'")
        if k % blocksize:
            raise ValueError(
                f"blocksize: the pallas path needs K % blocksize == 0, got K = {k} "
                f"(x.shape[-1]) and blocksize = {blocksize}; use impl='xla'")
        if blocksize % 32:
            raise ValueError(
                f"blocksize must be a multiple of 32 on the pallas path, got {blocksize}")
    nblocks = -(-n * k // blocksize)

    absmax = jnp.asarray(absmax)
    if k % blocksize == 0:
        want, ok_2d = f"[{n}, {k // blocksize}] or [{nblocks}]", (n, k // blocksize)
    else:  # only reachable on the 'xla' path
        want, ok_2d = f"[{nblocks}]", None
    if absmax.size != nblocks or not (absmax.ndim == 1 or absmax.shape == ok_2d):
        raise ValueError(f"absmax must have shape {want} (N={n}, K={k}, "
                         f"blocksize={blocksize}), got {absmax.shape}")
    double_quant = absmax.dtype == jnp.uint8
    if double_quant:
        for name, val in (("nested_absmax", nested_absmax), ("nested_code", nested_code),
                          ("offset", offset)):
            if val is None:
                raise ValueError(f"{name} is required when absmax is uint8 (double quant)")
        nested_absmax = _as_f32("nested_absmax", nested_absmax, "[nblocks/nested_blocksize]")
        nested_code = _as_f32("nested_code", nested_code, "[256]")
        offset = _as_f32("offset", offset, "scalar")
        n_nested = -(-nblocks // nested_blocksize)
        if nested_absmax.size != n_nested or nested_absmax.ndim > 1:
            raise ValueError(f"nested_absmax must have shape [{n_nested}] "
                             f"(ceil({nblocks} / {nested_blocksize})), got {nested_absmax.shape}")
        if nested_code.shape != (256,):
            raise ValueError(f"nested_code must have shape [256], got {nested_code.shape}")
        if offset.size != 1:
            raise ValueError(f"offset must be a scalar, got shape {offset.shape}")
        nested_absmax, offset = nested_absmax.reshape(n_nested), offset.reshape(())
    else:
        absmax = _as_f32("absmax", absmax, "(or uint8 for double quant)")
        for name, val in (("nested_absmax", nested_absmax), ("nested_code", nested_code),
                          ("offset", offset)):
            if val is not None:
                raise ValueError(f"{name} is only valid with uint8 absmax (double quant)")

    code = jnp.asarray(NF4_CODE if code is None else code)
    code = _as_f32("code", code, "[16]")
    if code.shape != (16,):
        raise ValueError(f"code must have shape [16], got {code.shape}")

    if mode == "pallas":
        packed = packed.reshape(n, k // 2)
        absmax = absmax.reshape(n, k // blocksize)
    cfg = _Config(mode, (n, k), blocksize, nested_blocksize, bool(interpret))
    return _nf4_matmul_vjp(cfg, x, packed, absmax, nested_absmax, nested_code, offset, code)


# ---------------------------------------------------------------------------
# Plain-jnp references (the XLA path and the test oracle)
# ---------------------------------------------------------------------------


def nf4_dequantize_reference(packed, absmax, nested_absmax=None, nested_code=None,
                             offset=None, *, shape: tuple[int, int], code=None,
                             blocksize: int = 64, nested_blocksize: int = 256) -> jax.Array:
    """Dequantize a bnb NF4 weight with jnp: float32 ``[N, K]`` (``shape=(N, K)``).

    Works for any ``N*K`` (ragged last block, odd element count), so it also
    serves as the XLA path of the library.

    Args:
      packed: uint8 with ``(N*K+1)//2`` elements, any shape (flat, ``[N, K//2]``
        or bnb's ``[(N*K+1)//2, 1]``); high nibble = even flat index.
      absmax: float ``[nblocks]`` (or any shape of that size, e.g.
        ``[N, K//blocksize]``), ``nblocks = ceil(N*K / blocksize)``; or uint8 codes
        with double quantization.
      nested_absmax, nested_code, offset: the double-quant operands (float32
        ``[ceil(nblocks/nested_blocksize)]``, ``[256]``, scalar); required iff
        ``absmax`` is uint8.
      shape: ``(N, K)`` of the weight.
      code: float32 ``[16]`` codebook, default `NF4_CODE`.

    Raises:
      ValueError: sizes inconsistent with ``shape``/``blocksize``, or missing
        nested operands.
    """
    n, k = (int(s) for s in shape)
    numel = n * k
    blocksize, nested_blocksize = int(blocksize), int(nested_blocksize)
    if blocksize < 1 or nested_blocksize < 1:
        raise ValueError(f"blocksize and nested_blocksize must be positive, got "
                         f"{blocksize}, {nested_blocksize}")
    nblocks = -(-numel // blocksize)
    packed = jnp.asarray(packed).reshape(-1)
    absmax = jnp.asarray(absmax).reshape(-1)
    if packed.size != (numel + 1) // 2:
        raise ValueError(f"packed must have (N*K+1)//2 = {(numel + 1) // 2} elements "
                         f"for shape {shape}, got {packed.size}")
    if absmax.size != nblocks:
        raise ValueError(f"absmax must have ceil(N*K/blocksize) = {nblocks} elements, "
                         f"got {absmax.size}")
    code = jnp.asarray(NF4_CODE if code is None else code, jnp.float32)
    if absmax.dtype == jnp.uint8:
        if nested_absmax is None or nested_code is None or offset is None:
            raise ValueError("nested_absmax, nested_code and offset are required "
                             "when absmax is uint8 (double quant)")
        nested_absmax = jnp.asarray(nested_absmax, jnp.float32).reshape(-1)
        if nested_absmax.size != -(-nblocks // nested_blocksize):
            raise ValueError(f"nested_absmax must have ceil(nblocks/nested_blocksize) = "
                             f"{-(-nblocks // nested_blocksize)} elements, got "
                             f"{nested_absmax.size}")
        scales = (jnp.asarray(nested_code, jnp.float32)[absmax.astype(jnp.int32)]
                  * jnp.repeat(nested_absmax, nested_blocksize)[:nblocks]
                  + jnp.asarray(offset, jnp.float32).reshape(()))
    else:
        scales = absmax.astype(jnp.float32)
    nibbles = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:numel]
    values = code[nibbles.astype(jnp.int32)]
    values = jnp.pad(values, (0, nblocks * blocksize - numel)).reshape(nblocks, blocksize)
    return (values * scales[:, None]).reshape(-1)[:numel].reshape(n, k)


def nf4_matmul_reference(x, packed, absmax, nested_absmax=None, nested_code=None,
                         offset=None, *, code=None, blocksize: int = 64,
                         nested_blocksize: int = 256,
                         shape: tuple[int, int] | None = None) -> jax.Array:
    """``x @ W.T`` by `nf4_dequantize_reference` + one XLA dot.

    ``W`` is dequantized in float32, rounded to ``x.dtype``, and multiplied with
    float32 accumulation (``Precision.HIGHEST``: no TF32 for float32 ``x``); the
    result has ``x.dtype``. ``shape`` defaults to ``(packed.shape[0], K)`` for a
    ``[N, K//2]`` ``packed``, else ``N`` is inferred from the flat size.
    """
    x = jnp.asarray(x)
    k = x.shape[-1]
    if shape is None:
        p = jnp.shape(packed)
        n = p[0] if len(p) == 2 and 2 * p[1] == k else (2 * math.prod(p)) // k
        shape = (n, k)
    w = nf4_dequantize_reference(packed, absmax, nested_absmax, nested_code, offset,
                                 shape=shape, code=code, blocksize=blocksize,
                                 nested_blocksize=nested_blocksize)
    y = lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                        precision=lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
