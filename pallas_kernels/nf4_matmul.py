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
shared in-kernel helpers, the GEMV kernels (forward and transposed) and their
wrappers, the dequantize kernel, the two-path dispatch by M, the
``jax.custom_vjp`` binding with the public `nf4_matmul`, and the plain-jnp
references at the bottom (`nf4_dequantize_reference`, `nf4_matmul_reference`;
the XLA path and the oracle).

Two paths, chosen by M (the rows of ``x``; Pallas Triton backend, also runs
with ``interpret=True``):

* M <= `GEMV_MAX_M` (decode): `nf4_gemv_pallas`, a split-K GEMV. Grid
  ``(cdiv(N, block_n), splits)``: the programs together stream the packed weight
  once. Each loads ``[block_n, block_k // 2]`` packed bytes per step, looks up
  both codes of a byte with ONE gather from a 256-entry table of bf16 pairs
  (`_pair_luts`; two exact float32 tables for float32 ``x``), multiplies the
  high nibbles (even K) by ``x[:, 0::2]`` and the low ones by ``x[:, 1::2]`` (no
  interleave), and applies the block scales to per-block partial sums. Float32
  partials ``[splits, M, N]`` are summed by one small XLA reduction. M = 1 runs
  on the CUDA cores; 1 < M <= 16 uses two MMAs per step with M padded to 16.
  The transposed GEMV `nf4_gemv_t_pallas` (``dx = dy @ W``) splits N instead.
* M > `GEMV_MAX_M` (prefill, training): `nf4_dequantize_pallas` writes W once in
  ``x.dtype`` (a bandwidth-bound kernel over the flat block view, every load and
  store contiguous), then one dense matmul on the matrix units (cuBLAS through
  XLA). The same for ``dy @ W``. A fused tile-dequantizing Triton GEMM was
  measured 10x slower than this on an H200 (an earlier version of
  ``benchmarks/nf4_tune.py``; ``benchmarks/RESULTS.md``): the
  per-element dequantization of every W tile by every M tile costs more CUDA-core
  time than the transient bf16 W costs bandwidth.
* With ``kernel_scale`` on a Hopper GPU, bfloat16 M <= `MGPU_MAX_M` and a weight of
  at least `MGPU_MIN_WEIGHT` elements (`_mgpu_takes`): the Mosaic GPU kernels of
  `pallas_kernels.nf4_mgpu` instead, ``nf4_mgpu_matmul`` forward and
  ``nf4_mgpu_matmul_t`` for ``dx = dy @ W``.
* With `MGPU_GEMM` set (off by default: slower than the dequantize path so far), on a Hopper GPU, bfloat16
  M > `MGPU_MAX_M` and a weight of at least `MGPU_MIN_WEIGHT` elements (`_gemm_takes`): the
  Mosaic GPU GEMMs of
  `pallas_kernels.nf4_mgpu_gemm` instead of the bfloat16 W in HBM, ``nf4_mgpu_gemm``
  forward and ``nf4_mgpu_gemm_t`` for ``dx = dy @ W``: W decoded tile by tile into shared
  memory with float32 scales, bit for bit the bfloat16 W of the dequantize path (issue 27).
* Double quantization is dequantized INSIDE the kernels: the uint8 absmax codes
  are looked up in the 256-entry ``nested_code`` table by a gather and combined
  with the gathered ``nested_absmax[i // nested_blocksize]`` and ``offset``.
* The weight is frozen: the custom VJP returns zero cotangents for ``packed``,
  ``absmax``, ``nested_absmax``, ``nested_code``, ``offset`` and ``code``
  (``float0`` for the integer ones).

Numerics: 16-bit ``x`` multiplies codes rounded to bfloat16 (about 2**-9
relative, the size of bnb's dequantize-to-bf16); float32 ``x`` uses exact
float32 codes and IEEE float32 products (no TF32); accumulation is float32 and
the result has ``x.dtype``. Speed: ``benchmarks/kernels.py`` and
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.nf4_mgpu_gemm import (
    nf4_kernel_scale_f32,
    nf4_mgpu_gemm,
    nf4_mgpu_gemm_supported,
    nf4_mgpu_gemm_t,
)
from pallas_kernels.nf4_mgpu import (
    nf4_mgpu_matmul,
    nf4_mgpu_matmul_multi,
    nf4_mgpu_matmul_t,
    nf4_mgpu_supported,
)
from pallas_kernels.dispatch import (
    zero_cotangent,
    check_float_dtype,
    dot_f32 as _dot,
    plgpu,
    require_pallas_backend,
    resolve_impl,
    triton_compiler_params as _compiler_params,
    zero as _zero,
)

__all__ = [
    "NF4_CODE",
    "nf4_matmul",
    "nf4_matmul_multi",
    "nf4_dequantize_reference",
    "nf4_matmul_reference",
    "double_quant_absmax",
    "opaque_f32",
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


# ---------------------------------------------------------------------------
# Shared in-kernel helpers
# ---------------------------------------------------------------------------


def _load_codes(packed_ref, code_ref, n0, byte0, mask_n, *, block_n: int, block_k: int,
                lead: tuple = ()):
    """Codebook values of the W tile ``[n0:n0+block_n, 2*byte0 : 2*byte0+block_k]``.

    Loads ``packed[*lead, n0:n0+block_n, byte0:byte0+block_k//2]`` (rows past ``N``
    masked to byte 0), splits each byte into (high, low) nibbles, interleaves them
    along K (high nibble = even k) and gathers ``code[*lead, nibble]``: float32
    ``[block_n, block_k]``.
    """
    half = block_k // 2
    mask = jnp.broadcast_to(mask_n[:, None], (block_n, half))
    p = plgpu.load(
        packed_ref.at[(*lead, pl.ds(n0, block_n), pl.ds(byte0, half))],
        mask=mask,
        other=_zero(packed_ref.dtype),
    ).astype(jnp.int32)
    nibbles = jnp.stack([p >> 4, p & 15], axis=-1).reshape(block_n, block_k)
    return plgpu.load(code_ref.at[(*lead, nibbles)])


def _nested_scale(q, block_index, mask, nested_refs, *, nested_blocksize: int, lead: tuple = ()):
    """Double quantization: the float32 scale of the uint8 absmax codes ``q``.

    ``nested_code[q] * nested_absmax[block_index // nested_blocksize] + offset`` for
    the flat block indices ``block_index`` (``nested_refs = (nested_absmax_ref,
    nested_code_ref, offset_ref)``), both tables read by gathers.
    """
    nested_absmax_ref, nested_code_ref, offset_ref = nested_refs
    nested = plgpu.load(
        nested_absmax_ref.at[(*lead, lax.div(block_index, jnp.int32(nested_blocksize)))],
        mask=mask, other=_zero(jnp.float32))
    offset = offset_ref[lead] if lead else offset_ref[...]
    return plgpu.load(nested_code_ref.at[(*lead, q.astype(jnp.int32))]) * nested + offset


def _load_scales(absmax_ref, nested_refs, n0, kb0, mask_n, *, block_n: int, nkb: int,
                 nested_blocksize: int, lead: tuple = ()):
    """Float32 block scales of rows ``n0:n0+block_n`` (0 for rows past ``N``).

    ``absmax[n0:n0+block_n, kb0]`` as ``[block_n]`` when ``nkb == 1`` (a K tile
    inside one quantization block), else ``absmax[n0:n0+block_n, kb0:kb0+nkb]`` as
    ``[block_n, nkb]`` (a K tile spanning ``nkb`` blocks). With double quantization
    (``nested_refs`` not None) the uint8 codes are dequantized by `_nested_scale`.
    ``lead``: indices of leading axes (the layer of a stacked ``[L, N, K//blocksize]``).
    """
    rows = n0 + jnp.arange(block_n, dtype=jnp.int32)
    n_kblocks = absmax_ref.shape[-1]
    if nkb == 1:
        mask = mask_n
        q = plgpu.load(absmax_ref.at[(*lead, pl.ds(n0, block_n), kb0)], mask=mask,
                       other=_zero(absmax_ref.dtype))
        block_index = rows * n_kblocks + kb0
    else:
        mask = jnp.broadcast_to(mask_n[:, None], (block_n, nkb))
        q = plgpu.load(absmax_ref.at[(*lead, pl.ds(n0, block_n), pl.ds(kb0, nkb))], mask=mask,
                       other=_zero(absmax_ref.dtype))
        block_index = (rows[:, None] * n_kblocks + kb0
                       + jnp.arange(nkb, dtype=jnp.int32)[None, :])
    if nested_refs is None:
        return q.astype(jnp.float32)
    scale = _nested_scale(q, block_index, mask, nested_refs,
                          nested_blocksize=nested_blocksize, lead=lead)
    return jnp.where(mask, scale, 0.0)


def _nested_args(nested_absmax, nested_code, offset):
    if nested_absmax is None:
        return ()
    return (nested_absmax, nested_code, offset)


# ---------------------------------------------------------------------------
# GEMV kernels (M <= 16, decode): split-K forward and split-N transposed
# ---------------------------------------------------------------------------


def _dequant_tile(packed_ref, absmax_ref, code_ref, nested_refs, n0, k0, mask_n, *,
                  blocksize: int, nested_blocksize: int, block_n: int, block_k: int):
    """Float32 ``W[n0:n0+block_n, k0:k0+block_k]`` (rows with ``mask_n`` false are 0).

    ``block_k`` either divides ``blocksize`` (one scale per row) or is a multiple
    of it (``block_k // blocksize`` scales per row, broadcast over their blocks).
    """
    codes = _load_codes(packed_ref, code_ref, n0, k0 // 2, mask_n,
                        block_n=block_n, block_k=block_k)
    nkb = max(1, block_k // blocksize)
    scale = _load_scales(absmax_ref, nested_refs, n0, k0 // blocksize, mask_n,
                         block_n=block_n, nkb=nkb, nested_blocksize=nested_blocksize)
    if nkb == 1:
        return codes * scale[:, None]
    w = codes.reshape(block_n, nkb, blocksize) * scale[:, :, None]
    return w.reshape(block_n, block_k)


def _pair_luts(code, dtype) -> tuple[jax.Array, ...]:
    """Byte -> (code[high nibble], code[low nibble]) lookup tables for the GEMV
    (``code [..., 16]`` -> tables ``[..., 256]``).

    For 16-bit activations one int32 table ``[256]`` holds both values as bf16
    bit patterns (high value in the upper half-word): one gather per byte. For
    float32 activations two exact float32 tables ``[256]`` (high, low).
    """
    byte = jnp.arange(256, dtype=jnp.int32)
    hi, lo = code[..., byte >> 4], code[..., byte & 15]
    if jnp.dtype(dtype) == jnp.float32:
        return hi, lo
    bits = lambda v: lax.bitcast_convert_type(v.astype(jnp.bfloat16), jnp.uint16).astype(jnp.int32)
    return ((bits(hi) << 16) | bits(lo),)


def _load_pairs(packed_ref, lut_refs, n0, byte0, mask_n, *, block_n: int, half: int,
                lead: tuple = ()):
    """(high, low) float32 code values of ``packed[*lead, n0:n0+block_n, byte0:byte0+half]``.

    ``high`` holds the even K columns, ``low`` the odd ones (bnb's nibble order);
    rows with ``mask_n`` false read byte 0.
    """
    p = plgpu.load(packed_ref.at[(*lead, pl.ds(n0, block_n), pl.ds(byte0, half))],
                   mask=jnp.broadcast_to(mask_n[:, None], (block_n, half)),
                   other=_zero(packed_ref.dtype)).astype(jnp.int32)
    if len(lut_refs) == 2:
        return plgpu.load(lut_refs[0].at[(*lead, p)]), plgpu.load(lut_refs[1].at[(*lead, p)])
    v = plgpu.load(lut_refs[0].at[(*lead, p)])
    hi = lax.bitcast_convert_type(v & jnp.int32(-65536), jnp.float32)
    lo = lax.bitcast_convert_type(v << 16, jnp.float32)
    return hi, lo


def nf4_gemv_kernel(layer_ref, xe_ref, xo_ref, packed_ref, absmax_ref, *refs, n_luts: int,
                    blocksize: int, nested_blocksize: int, double_quant: bool,
                    block_m: int, block_n: int, block_k: int, steps: int):
    """Partial ``y`` of one ``block_n`` slice of N over one K split.

    Every weight operand holds L stacked weights (the decoder's layers; L = 1 for one
    weight): ``packed [L, N, K//2]``, ``absmax [L, N, K//blocksize]``, the pair tables
    ``[L, 256]``, ``nested_absmax [L, n]``, ``nested_code [L, 256]``, ``offset [L]``;
    layer ``layer_ref[0]`` is read in place.

    Program ``(i, s)`` covers rows ``[i*block_n, (i+1)*block_n)`` and the K tiles
    ``[s*steps, (s+1)*steps)`` (tiles past K are masked out) and writes
    ``o[s, :M, rows]``. The packed bytes are never interleaved: the high nibbles
    (even K) multiply ``xe = x[:, 0::2]`` and the low nibbles ``xo = x[:, 1::2]``.
    The block scales multiply per-block partial sums, not elements.
    ``block_m == 1`` works on the CUDA cores (an elementwise float32 accumulator,
    one row sum at the end); otherwise two
    MMAs per K tile with the rows past M masked.
    """
    lut_refs, refs = refs[:n_luts], refs[n_luts:]
    if double_quant:
        *nested_refs, o_ref = refs
    else:
        nested_refs, (o_ref,) = None, refs
    m, k_half = xe_ref.shape
    k = 2 * k_half
    n = packed_ref.shape[1]
    lead = (layer_ref[0],)
    half = block_k // 2
    nkb = max(1, block_k // blocksize)
    n0 = pl.program_id(0) * block_n
    split = pl.program_id(1)
    mask_n = n0 + jnp.arange(block_n, dtype=jnp.int32) < n
    mask_m = jnp.arange(block_m, dtype=jnp.int32) < m

    def body(t, acc):
        k0 = (split * steps + t) * block_k
        in_k = k0 < k
        rows_ok = mask_n & in_k
        hi, lo = _load_pairs(packed_ref, lut_refs, n0, k0 // 2, rows_ok,
                             block_n=block_n, half=half, lead=lead)
        scale = _load_scales(absmax_ref, nested_refs, n0, k0 // blocksize, rows_ok,
                             block_n=block_n, nkb=nkb, nested_blocksize=nested_blocksize,
                             lead=lead)
        xmask = jnp.broadcast_to(mask_m[:, None] & in_k, (block_m, half))
        xe = plgpu.load(xe_ref.at[pl.ds(0, block_m), pl.ds(k0 // 2, half)], mask=xmask,
                        other=_zero(xe_ref.dtype))
        xo = plgpu.load(xo_ref.at[pl.ds(0, block_m), pl.ds(k0 // 2, half)], mask=xmask,
                        other=_zero(xo_ref.dtype))
        if block_m == 1:  # elementwise accumulator, one row sum at the end
            prod = hi * xe.astype(jnp.float32) + lo * xo.astype(jnp.float32)
            if nkb == 1:
                return acc + prod * scale[:, None]
            s = jnp.broadcast_to(scale[:, :, None], (block_n, nkb, blocksize // 2))
            return acc + prod * s.reshape(block_n, half)
        dt = xe_ref.dtype
        if nkb == 1:
            return acc + (_dot(xe, hi.astype(dt), 1) + _dot(xo, lo.astype(dt), 1)) * scale[None, :]
        s3 = scale[:, :, None]
        hi = (hi.reshape(block_n, nkb, blocksize // 2) * s3).reshape(block_n, half)
        lo = (lo.reshape(block_n, nkb, blocksize // 2) * s3).reshape(block_n, half)
        return acc + _dot(xe, hi.astype(dt), 1) + _dot(xo, lo.astype(dt), 1)

    if block_m == 1:
        acc = lax.fori_loop(0, steps, body, jnp.zeros((block_n, half), jnp.float32))
        acc = jnp.sum(acc, axis=1)[None, :]
    else:
        acc = lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(o_ref.at[split, pl.ds(0, block_m), pl.ds(n0, block_n)],
                acc.astype(o_ref.dtype), mask=mask_m[:, None] & mask_n[None, :])


def nf4_gemv_t_kernel(dy_ref, packed_ref, absmax_ref, code_ref, *refs, blocksize: int,
                      nested_blocksize: int, double_quant: bool, block_m: int,
                      block_n: int, block_k: int, steps: int):
    """Partial ``dx = dy @ W`` of one ``block_k`` slice of K over one N split.

    Program ``(j, s)`` covers columns ``[j*block_k, (j+1)*block_k)`` and the N
    tiles ``[s*steps, (s+1)*steps)`` (masked past N) and writes ``o[s, :M, cols]``.
    """
    if double_quant:
        *nested_refs, o_ref = refs
    else:
        nested_refs, (o_ref,) = None, refs
    m, n = dy_ref.shape
    k0 = pl.program_id(0) * block_k
    split = pl.program_id(1)
    mask_m = jnp.arange(block_m, dtype=jnp.int32) < m

    def body(t, acc):
        n0 = (split * steps + t) * block_n
        mask_n = n0 + jnp.arange(block_n, dtype=jnp.int32) < n
        w = _dequant_tile(packed_ref, absmax_ref, code_ref, nested_refs, n0, k0, mask_n,
                          blocksize=blocksize, nested_blocksize=nested_blocksize,
                          block_n=block_n, block_k=block_k)
        if block_m == 1:
            d = plgpu.load(dy_ref.at[pl.ds(0, 1), pl.ds(n0, block_n)],
                           mask=mask_n[None, :], other=_zero(dy_ref.dtype))
            return acc + jnp.sum(w * d.astype(jnp.float32).reshape(block_n, 1),
                                 axis=0)[None, :]
        d = plgpu.load(dy_ref.at[pl.ds(0, block_m), pl.ds(n0, block_n)],
                       mask=mask_m[:, None] & mask_n[None, :], other=_zero(dy_ref.dtype))
        return acc + _dot(d, w.astype(dy_ref.dtype), 0)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_k), jnp.float32))
    plgpu.store(o_ref.at[split, pl.ds(0, block_m), pl.ds(k0, block_k)],
                acc.astype(o_ref.dtype),
                mask=jnp.broadcast_to(mask_m[:, None], (block_m, block_k)))


def _as_stacked(packed, absmax, code, nested_absmax, nested_code, offset, layer):
    """The weight operands with a leading layer axis (one weight: L = 1, layer 0) and
    ``layer`` as int32 ``[1]``: what the kernels that read a layer in place take."""
    if layer is None:
        packed, absmax, code, layer = packed[None], absmax[None], code[None], 0
        if nested_absmax is not None:
            nested_absmax, nested_code, offset = nested_absmax[None], nested_code[None], offset[None]
    return packed, absmax, code, nested_absmax, nested_code, offset, jnp.asarray(layer, jnp.int32).reshape(1)


def _pow2_divisor(k: int, cap: int) -> int:
    """The largest power of two dividing ``k``, at most ``cap``."""
    return min(k & -k, cap)


def _gemv_plan(tiles: int, splits: int, m: int, mma: bool | None):
    """``(splits, steps, mma, block_m)``: tiles per split, no empty split, MMA for M > 1
    by default (M padded to 16 rows, the smallest Triton dot), else one row."""
    steps = pl.cdiv(tiles, splits)
    mma = m > 1 if mma is None else mma
    return pl.cdiv(tiles, steps), steps, mma, (max(pl.next_power_of_2(m), 16) if mma else 1)


def _row_by_row(gemv, a, *operands, **kw):
    """``gemv`` on the CUDA-core path (``mma=False``) one row of ``a`` at a time."""
    return jnp.concatenate([gemv(a[i:i + 1], *operands, mma=False, **kw)
                            for i in range(a.shape[0])])


_GEMV_STATIC = ("blocksize", "nested_blocksize", "interpret", "block_n", "block_k",
                "splits", "num_warps", "num_stages", "mma")


def _gemv_call(kernel_fn, name, operands, nested, *, grid0: int, splits: int, rows: int,
               out_len: int, dtype, num_warps: int, num_stages: int, interpret: bool,
               **kernel_kw):
    """Grid ``(grid0, splits)`` of ``kernel_fn`` writing ``[splits, rows, out_len]``
    partials (float32, or ``dtype`` when ``splits == 1``), summed by XLA to ``dtype``."""
    kernel = functools.partial(kernel_fn, double_quant=bool(nested), **kernel_kw)
    out = pl.pallas_call(
        kernel,
        grid=(grid0, splits),
        out_shape=jax.ShapeDtypeStruct((splits, rows, out_len),
                                       dtype if splits == 1 else jnp.float32),
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=name,
    )(*operands, *nested)
    return out[0] if splits == 1 else out.sum(axis=0).astype(dtype)


@functools.partial(jax.jit, static_argnames=_GEMV_STATIC)
def nf4_gemv_pallas(x, packed, absmax, code, nested_absmax=None, nested_code=None,
                    offset=None, layer=None, *, blocksize: int, nested_blocksize: int = 256,
                    interpret: bool = False, block_n: int | None = None,
                    block_k: int | None = None, splits: int | None = None,
                    num_warps: int = 4, num_stages: int = 2, mma: bool | None = None):
    """Split-K GEMV: ``x[M, K] @ W.T -> [M, N]`` for small M (decode, M <= 16).

    With ``layer`` (int32 scalar) every weight operand carries a leading axis of L
    stacked weights (``packed [L, N, K//2]``, ``absmax [L, N, K//blocksize]``, ``code
    [L, 16]``, ``nested_absmax [L, n]``, ``nested_code [L, 256]``, ``offset [L]``; a
    scanned decoder's layers), of which layer ``layer`` is multiplied, read in place: no
    copy of the slice, no extra kernel per operand.

    Grid ``(cdiv(N, block_n), splits)``: each program streams the packed bytes of
    ``block_n`` rows over ``cdiv(K/block_k, splits)`` K tiles, looks each byte's
    two code values up at once (`_pair_luts`), applies the (possibly
    double-quantized) block scales to per-block partial sums, and writes a float32
    partial result; the ``splits`` partials are summed by one small XLA reduction
    (none when ``splits == 1``). ``mma`` (default: ``M > 1``) uses the matrix
    units with M padded to 16 rows; otherwise the CUDA cores. Operands as in
    `nf4_matmul_pallas`.
    """
    m, k = x.shape
    packed, absmax, code, nested_absmax, nested_code, offset, layer = _as_stacked(
        packed, absmax, code, nested_absmax, nested_code, offset, layer)
    n = packed.shape[1]
    # Defaults from benchmarks/nf4_tune.py on an H200 (W 4096x11008): M = 1 best with
    # 64-row tiles of 128 K and 16 splits; M = 2..16 with 32 x 256 tiles and 4 splits.
    block_n = block_n or (64 if m == 1 else 32)
    block_k = block_k or _pow2_divisor(k, 128 if m == 1 else 256)
    tiles = k // block_k
    want = 16 if m == 1 else 4
    splits = min(splits or max(1, min(want, 1024 // pl.cdiv(n, block_n))), tiles)
    splits, steps, mma, block_m = _gemv_plan(tiles, splits, m, mma)
    if not mma and m > 1:
        return _row_by_row(nf4_gemv_pallas, x, packed, absmax, code, nested_absmax, nested_code,
                           offset, layer[0], blocksize=blocksize, nested_blocksize=nested_blocksize,
                           interpret=interpret, block_n=block_n, block_k=block_k, splits=splits,
                           num_warps=num_warps, num_stages=num_stages)
    luts = _pair_luts(code, x.dtype)
    return _gemv_call(nf4_gemv_kernel, "nf4_gemv", (layer, x[:, 0::2], x[:, 1::2], packed, absmax,
                                                    *luts),
                      _nested_args(nested_absmax, nested_code, offset),
                      grid0=pl.cdiv(n, block_n), splits=splits, rows=m, out_len=n,
                      dtype=x.dtype, num_warps=num_warps, num_stages=num_stages,
                      interpret=interpret, n_luts=len(luts), blocksize=blocksize,
                      nested_blocksize=nested_blocksize, block_m=block_m, block_n=block_n,
                      block_k=block_k, steps=steps)


@functools.partial(jax.jit, static_argnames=_GEMV_STATIC)
def nf4_gemv_t_pallas(dy, packed, absmax, code, nested_absmax=None, nested_code=None,
                      offset=None, *, blocksize: int, nested_blocksize: int = 256,
                      interpret: bool = False, block_n: int | None = None,
                      block_k: int | None = None, splits: int | None = None,
                      num_warps: int = 4, num_stages: int = 3, mma: bool | None = None):
    """Split-N transposed GEMV: ``dy[M, N] @ W -> [M, K]`` for small M.

    Grid ``(K / block_k, splits)``: each program dequantizes ``[block_n, block_k]``
    W tiles down its N range and accumulates ``dy @ W_tile`` in float32; the
    ``splits`` partials are summed by XLA. Operands as in `nf4_matmul_pallas`.
    """
    m, n = dy.shape
    k = packed.shape[1] * 2
    block_n = block_n or 32
    block_k = block_k or _pow2_divisor(k, 256)
    tiles = pl.cdiv(n, block_n)
    splits = min(splits or max(1, min(tiles, 512 // (k // block_k))), tiles)
    splits, steps, mma, block_m = _gemv_plan(tiles, splits, m, mma)
    if not mma and m > 1:
        return _row_by_row(nf4_gemv_t_pallas, dy, packed, absmax, code, nested_absmax,
                           nested_code, offset, blocksize=blocksize,
                           nested_blocksize=nested_blocksize, interpret=interpret,
                           block_n=block_n, block_k=block_k, splits=splits,
                           num_warps=num_warps, num_stages=num_stages)
    return _gemv_call(nf4_gemv_t_kernel, "nf4_gemv_t", (dy, packed, absmax, code),
                      _nested_args(nested_absmax, nested_code, offset),
                      grid0=k // block_k, splits=splits, rows=m, out_len=k, dtype=dy.dtype,
                      num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                      blocksize=blocksize, nested_blocksize=nested_blocksize,
                      block_m=block_m, block_n=block_n, block_k=block_k, steps=steps)


# ---------------------------------------------------------------------------
# Dequantize kernel (large M: dequantize once, then the matrix units)
# ---------------------------------------------------------------------------


def nf4_dequantize_kernel(layer_ref, packed_ref, absmax_ref, code_ref, *refs, blocksize: int,
                          nested_blocksize: int, double_quant: bool, block_rows: int):
    """``block_rows`` quantization blocks of W: ``o[r, :] = code[nibbles] * scale[r]``.

    Works on the flat block view of L stacked weights (``packed [L, nblocks,
    blocksize/2]``, ``absmax [L, nblocks]``, ``code [L, 16]``, nested operands ``[L,
    ...]``; L = 1 for one weight), layer ``layer_ref[0]`` read in place, ``o [nblocks,
    blocksize]``: every load and store is one contiguous run of memory.
    """
    if double_quant:
        *nested_refs, o_ref = refs
    else:
        (o_ref,) = refs
    lead = (layer_ref[0],)
    nblocks = packed_ref.shape[1]
    r0 = pl.program_id(0) * block_rows
    rows = r0 + jnp.arange(block_rows, dtype=jnp.int32)
    mask = rows < nblocks
    codes = _load_codes(packed_ref, code_ref, r0, 0, mask, block_n=block_rows,
                        block_k=blocksize, lead=lead)
    q = plgpu.load(absmax_ref.at[(*lead, pl.ds(r0, block_rows))], mask=mask,
                   other=_zero(absmax_ref.dtype))
    if double_quant:
        scale = _nested_scale(q, rows, mask, nested_refs, nested_blocksize=nested_blocksize,
                              lead=lead)
    else:
        scale = q.astype(jnp.float32)
    plgpu.store(o_ref.at[pl.ds(r0, block_rows), :],
                (codes * scale[:, None]).astype(o_ref.dtype),
                mask=jnp.broadcast_to(mask[:, None], (block_rows, blocksize)))


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "blocksize",
                                             "nested_blocksize", "interpret",
                                             "block_rows", "num_warps", "num_stages"))
def nf4_dequantize_pallas(packed, absmax, code, nested_absmax=None, nested_code=None,
                          offset=None, layer=None, *, shape: tuple[int, int], dtype=jnp.bfloat16,
                          blocksize: int, nested_blocksize: int = 256,
                          interpret: bool = False, block_rows: int | None = None,
                          num_warps: int = 4, num_stages: int = 1):
    """Dequantize ``W`` to ``dtype [N, K]`` with one bandwidth-bound Pallas kernel.

    Needs ``blocksize`` a power of two and ``N*K % blocksize == 0``. Reads the
    packed codes and the (possibly double-quantized) absmax once and writes W
    once: the large-M matmul path then runs W on the matrix units. With ``layer``
    (int32 scalar) every operand carries a leading axis of L stacked weights (the
    scanned decoder's layers) and layer ``layer`` is read in place: nothing is sliced
    or copied before the kernel (as `nf4_gemv_pallas`).
    """
    n, k = shape
    nblocks = n * k // blocksize
    block_rows = block_rows or max(1, 8192 // blocksize)
    packed, absmax, code, nested_absmax, nested_code, offset, layer = _as_stacked(
        packed, absmax, code, nested_absmax, nested_code, offset, layer)
    stack = packed.shape[0]
    nested = _nested_args(nested_absmax, nested_code, offset)
    kernel = functools.partial(
        nf4_dequantize_kernel, blocksize=blocksize, nested_blocksize=nested_blocksize,
        double_quant=bool(nested), block_rows=block_rows)
    w = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(nblocks, block_rows),),
        out_shape=jax.ShapeDtypeStruct((nblocks, blocksize), dtype),
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="nf4_dequantize",
    )(layer, packed.reshape(stack, nblocks, blocksize // 2), absmax.reshape(stack, nblocks), code, *nested)
    return w.reshape(n, k)


# ---------------------------------------------------------------------------
# The two paths by M
# ---------------------------------------------------------------------------

#: Largest M (rows of ``x``) that takes the Mosaic GPU kernel when ``kernel_scale`` is
#: given (H200, 2026-11-30: W 11008x4096 at M = 64 in 33.5-38.8 us against 33.3 us for the
#: dense bf16 matmul and 66.8 us for the Triton GEMV; at M = 4096 it took 2x the dense time).
MGPU_MAX_M = 64

#: Smallest weight (N*K elements) that takes the Mosaic GPU kernel: below it the launch of
#: its output reduction costs more than the kernel saves (H200, 2026-11-30: SmolLM2-135M,
#: whose largest projection is 1536x576, decoded 590 tokens/s through it against 731-743
#: through the Triton GEMV; Llama-3-8B shapes, >= 4096x4096, went from 155-163 to 245).
MGPU_MIN_WEIGHT = 1 << 22

#: Whether a product with more than `MGPU_MAX_M` rows takes the Mosaic GPU GEMM
#: `pallas_kernels.nf4_mgpu_gemm` on Hopper (`_gemm_takes`) instead of the bfloat16 W
#: written by `nf4_dequantize_pallas` and cuBLAS. Off: on an H100 (2026-12-07) the GEMMs
#: passed every test of tests/test_nf4_mgpu_gemm.py but took 1.50-2.43x the dense bf16 dot
#: at M = 4096 against 1.11-1.30x for the dequantize path (benchmarks/nf4_gemm.py,
#: benchmarks/RESULTS.md). Set it to True to use them (benchmarks/train.py ``--gemm on``).
MGPU_GEMM = False

#: Largest M (rows of x or dy) that takes the GEMV kernels; above it W is
#: dequantized once by `nf4_dequantize_pallas` and multiplied on the matrix units.
GEMV_MAX_M = 16


def nf4_matmul_pallas(x, packed, absmax, code, nested_absmax=None, nested_code=None,
                      offset=None, layer=None, *, blocksize: int, nested_blocksize: int = 256,
                      interpret: bool = False):
    """Forward on validated 2-D operands: ``x[M, K] @ W.T -> [M, N]``, ``x.dtype``.

    ``packed`` uint8 [N, K//2], ``absmax`` float32 or uint8 [N, K//blocksize],
    ``code`` float32 [16], nested operands float32
    [ceil(nblocks/nested_blocksize)], [256] and [] (or all None); ``blocksize`` a
    power of two >= 32 dividing K. M <= `GEMV_MAX_M`: the split-K GEMV kernel
    (`nf4_gemv_pallas`); larger M: `nf4_dequantize_pallas` to ``x.dtype`` and one
    dense matmul. With ``layer``, ``packed`` and ``absmax`` are stacked ``[L, ...]``
    (`nf4_gemv_pallas`); the GEMV and the dequantize kernel read the layer in place.
    Use `nf4_matmul`; this skips its checks.
    """
    kw = dict(blocksize=blocksize, nested_blocksize=nested_blocksize, interpret=interpret)
    if x.shape[0] <= GEMV_MAX_M:
        return nf4_gemv_pallas(x, packed, absmax, code, nested_absmax, nested_code,
                               offset, layer, **kw)
    n = packed.shape[-2]
    w = nf4_dequantize_pallas(packed, absmax, code, nested_absmax, nested_code, offset, layer,
                              shape=(n, x.shape[1]), dtype=x.dtype, **kw)
    return _dot(x, w, 1).astype(x.dtype)


def _layer_of(layer, *operands):
    """Layer ``layer`` of stacked operands (None stays None)."""
    return tuple(None if a is None else a[layer] for a in operands)


def nf4_matmul_t_pallas(dy, packed, absmax, code, nested_absmax=None, nested_code=None,
                        offset=None, layer=None, *, blocksize: int, nested_blocksize: int = 256,
                        interpret: bool = False):
    """Transposed (backward) product ``dy[M, N] @ W -> [M, K]`` (operands as in
    `nf4_matmul_pallas`; a stacked weight is sliced for the GEMV, read in place by the
    dequantize kernel): `nf4_gemv_t_pallas` for M <= `GEMV_MAX_M`, else dequantize + one
    dense matmul."""
    kw = dict(blocksize=blocksize, nested_blocksize=nested_blocksize, interpret=interpret)
    if dy.shape[0] <= GEMV_MAX_M:
        if layer is not None:
            packed, absmax, code, nested_absmax, nested_code, offset = _layer_of(
                layer, packed, absmax, code, nested_absmax, nested_code, offset)
        return nf4_gemv_t_pallas(dy, packed, absmax, code, nested_absmax, nested_code,
                                 offset, **kw)
    w = nf4_dequantize_pallas(packed, absmax, code, nested_absmax, nested_code, offset, layer,
                              shape=(packed.shape[-2], 2 * packed.shape[-1]),
                              dtype=dy.dtype, **kw)
    return _dot(dy, w, 0).astype(dy.dtype)


# ---------------------------------------------------------------------------
# custom_vjp binding and the public op
# ---------------------------------------------------------------------------


class _Config(NamedTuple):
    impl: str  # 'pallas' or 'xla' ('pallas' takes `nf4_mgpu_matmul` when kernel_scale is given)
    shape: tuple[int, int]  # (N, K)
    blocksize: int
    nested_blocksize: int
    interpret: bool


def _mgpu_applies(cfg: _Config, x2, kernel_scale) -> bool:
    """Whether the Mosaic GPU kernel takes this product of ``x2 [M, K]`` (the weight size
    `MGPU_MIN_WEIGHT` is the caller's test): the 'pallas' path, not interpreted, with
    ``kernel_scale``, ``1 <= M <=`` `MGPU_MAX_M` and `nf4_mgpu_supported` shapes."""
    n, k = cfg.shape
    m = x2.shape[0]
    return (cfg.impl == "pallas" and kernel_scale is not None and not cfg.interpret
            and 1 <= m <= MGPU_MAX_M
            and nf4_mgpu_supported(m, n, k, cfg.blocksize, x2.dtype))


def _mgpu_takes(cfg: _Config, a2, kernel_scale) -> bool:
    """Whether ONE product takes a Mosaic GPU kernel: the forward ``x2 [M, K] @ W.T``
    (`nf4_mgpu_matmul`) and the backward ``dy2 [M, N] @ W`` (`nf4_mgpu_matmul_t`) alike
    (``a2`` is ``x2`` or ``dy2``: its rows and dtype count): `_mgpu_applies` and a
    weight of at least `MGPU_MIN_WEIGHT` elements."""
    n, k = cfg.shape
    return _mgpu_applies(cfg, a2, kernel_scale) and n * k >= MGPU_MIN_WEIGHT


def _gemm_takes(cfg: _Config, a2) -> bool:
    """Whether ONE product of ``a2`` (``x2 [M, K]`` forward, ``dy2 [M, N]`` transposed)
    takes the Mosaic GPU GEMM `pallas_kernels.nf4_mgpu_gemm` (codes decoded into shared
    memory, no bfloat16 W in HBM): the 'pallas' path, not interpreted, more than
    `MGPU_MAX_M` rows, `nf4_mgpu_gemm_supported` (Hopper, bfloat16, K and blocksize
    multiples of 64) and a weight of at least `MGPU_MIN_WEIGHT` elements."""
    n, k = cfg.shape
    m = a2.shape[0]
    return (MGPU_GEMM and cfg.impl == "pallas" and not cfg.interpret and m > MGPU_MAX_M
            and n * k >= MGPU_MIN_WEIGHT
            and nf4_mgpu_gemm_supported(m, n, k, cfg.blocksize, a2.dtype))


def _gemm(cfg: _Config, kernel, a2, packed, absmax, nested_absmax, nested_code, offset,
          layer, kernel_codes):
    """`nf4_mgpu_gemm` (``kernel``) or `nf4_mgpu_gemm_t` on weight ``layer`` (stacked
    operands sliced) with float32 scales (`nf4_kernel_scale_f32` of the decoded absmax):
    W bit for bit the bfloat16 W of the dequantize path, so the same products. Double
    quantization as bnb rounds it: ``nested_code[absmax] * nested_absmax`` rounded to
    float32, then ``+ offset``."""
    n, k = cfg.shape
    if layer is not None:
        packed, absmax, nested_absmax, nested_code, offset, kernel_codes = _layer_of(
            layer, packed, absmax, nested_absmax, nested_code, offset, kernel_codes)
    a = absmax.reshape(-1)
    if a.dtype == jnp.uint8:
        a = double_quant_absmax(a, nested_absmax, nested_code, offset, cfg.nested_blocksize)
    scale = nf4_kernel_scale_f32(a, n, k, cfg.blocksize)
    return kernel(a2, packed if kernel_codes is None else kernel_codes, scale)


def _forward(cfg: _Config, x, packed, absmax, nested_absmax, nested_code, offset, code, layer,
             kernel_scale, kernel_codes=None):
    n, k = cfg.shape
    batch = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return jnp.zeros((*batch, n), x.dtype)
    if _gemm_takes(cfg, x2):
        y = _gemm(cfg, nf4_mgpu_gemm, x2, packed, absmax, nested_absmax, nested_code, offset,
                  layer, kernel_codes)
    elif _mgpu_takes(cfg, x2, kernel_scale):
        y = nf4_mgpu_matmul(x2, packed if kernel_codes is None else kernel_codes, kernel_scale, layer)
    elif cfg.impl == "xla":
        y = nf4_matmul_reference(x2, packed, absmax, nested_absmax, nested_code, offset,
                                 code=code, blocksize=cfg.blocksize,
                                 nested_blocksize=cfg.nested_blocksize, shape=cfg.shape)
    else:
        y = nf4_matmul_pallas(x2, packed, absmax, code, nested_absmax, nested_code,
                              offset, layer, blocksize=cfg.blocksize,
                              nested_blocksize=cfg.nested_blocksize,
                              interpret=cfg.interpret)
    return y.reshape(*batch, n)


def _backward_dx(cfg: _Config, dy, packed, absmax, nested_absmax, nested_code, offset,
                 code, layer, kernel_scale=None, kernel_codes=None):
    """``dx = dy @ W`` (the custom VJP's input gradient; also each weight's term of
    `nf4_matmul_multi`'s): the Mosaic GPU transposed kernel `nf4_mgpu_matmul_t` where the
    forward would take the Mosaic kernel (`_mgpu_takes`, judged on ``dy``'s rows and
    dtype), else the XLA reference or `nf4_matmul_t_pallas` as ``cfg.impl`` says. Every
    path reads the bnb ``packed`` bytes (``kernel_codes`` serves the forward only)."""
    n, k = cfg.shape
    batch = dy.shape[:-1]
    dy2 = dy.reshape(-1, n)
    if dy2.shape[0] == 0:
        return jnp.zeros((*batch, k), dy.dtype)
    if _gemm_takes(cfg, dy2):
        dx = _gemm(cfg, nf4_mgpu_gemm_t, dy2, packed, absmax, nested_absmax, nested_code,
                   offset, layer, kernel_codes)
    elif _mgpu_takes(cfg, dy2, kernel_scale):
        dx = nf4_mgpu_matmul_t(dy2, packed, kernel_scale, layer)
    elif cfg.impl == "xla":
        w = nf4_dequantize_reference(packed, absmax, nested_absmax, nested_code, offset,
                                     code=code, blocksize=cfg.blocksize,
                                     nested_blocksize=cfg.nested_blocksize,
                                     shape=cfg.shape)
        dx = _dot(dy2, w.astype(dy.dtype), 0).astype(dy.dtype)
    else:
        dx = nf4_matmul_t_pallas(dy2, packed, absmax, code, nested_absmax, nested_code,
                                 offset, layer, blocksize=cfg.blocksize,
                                 nested_blocksize=cfg.nested_blocksize,
                                 interpret=cfg.interpret)
    return dx.reshape(*batch, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _nf4_matmul_vjp(cfg, x, packed, absmax, nested_absmax, nested_code, offset, code, layer,
                    kernel_scale, kernel_codes):
    return _forward(cfg, x, packed, absmax, nested_absmax, nested_code, offset, code, layer,
                    kernel_scale, kernel_codes)


def _nf4_matmul_fwd(cfg, x, packed, absmax, nested_absmax, nested_code, offset, code, layer,
                    kernel_scale, kernel_codes):
    y = _forward(cfg, x, packed, absmax, nested_absmax, nested_code, offset, code, layer,
                 kernel_scale, kernel_codes)
    return y, (packed, absmax, nested_absmax, nested_code, offset, code, layer, kernel_scale,
               kernel_codes)


def _nf4_matmul_bwd(cfg, residuals, dy):
    dx = _backward_dx(cfg, dy, *residuals)
    return (dx, *(zero_cotangent(a) for a in residuals))


_nf4_matmul_vjp.defvjp(_nf4_matmul_fwd, _nf4_matmul_bwd)


def _as_f32(name: str, a, shape_hint: str) -> jax.Array:
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating {shape_hint}, got {a.dtype}")
    return a.astype(jnp.float32)


def nf4_matmul(x, packed, absmax, nested_absmax=None, nested_code=None, offset=None, *,
               code=None, blocksize: int = 64, nested_blocksize: int = 256,
               impl: str | None = None, interpret: bool = False, layer=None,
               kernel_scale=None, kernel_codes=None) -> jax.Array:
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
      layer: optional int32 scalar. With it, every quantization operand carries a
        leading axis of L stacked weights (``packed [L, N, K//2]``, ``absmax
        [L, N, K//blocksize]`` or ``[L, nblocks]``, ``nested_absmax [L, ...]``,
        ``nested_code [L, 256]``, ``offset [L]``, ``code [L, 16]``), and weight
        ``layer`` is used: the GEMV kernel (M <= `GEMV_MAX_M`) reads it in place, the
        other paths slice it. Used by a scanned decoder's cached decoding.
      kernel_scale: optional bfloat16 ``[K // 64, N]`` (``[L, K // 64, N]`` with
        ``layer``), the Hopper kernel layout of the decoded block scales
        (`pallas_kernels.nf4_mgpu.nf4_kernel_scale`; ``jaxqlora.nf4.with_kernel_layout``).
        With it, on a Hopper GPU, bfloat16 ``x`` with at most `MGPU_MAX_M` rows and a
        weight of at least `MGPU_MIN_WEIGHT` elements takes the Mosaic GPU kernel
        `pallas_kernels.nf4_mgpu.nf4_mgpu_matmul`, and its backward (bfloat16 ``dy``, the
        same conditions) the transposed `pallas_kernels.nf4_mgpu.nf4_mgpu_matmul_t` (NF4
        codebook only; about 2**-8 relative difference per weight element from the bnb
        bf16 dequantize).
      kernel_codes: optional uint32 ``[N, K // 8]`` (``[L, N, K // 8]`` with ``layer``), the
        same codes in the forward kernel's layout
        (`pallas_kernels.nf4_mgpu.nf4_kernel_codes` of ``packed``; ``with_kernel_layout(q,
        codes=True)``). Used with ``kernel_scale`` by the Mosaic GPU forward, which then
        issues fewer instructions per weight (bit-identical results); ignored elsewhere.

    Returns:
      ``[..., N]`` array of ``x.dtype`` (float32 accumulation). Differentiable in
      ``x`` only (``dx = dy @ W`` through a transposed NF4 kernel on the 'pallas'
      path: the Mosaic GPU one with ``kernel_scale`` as above, else
      `nf4_matmul_t_pallas`); every quantization operand gets a zero cotangent (``float0`` for the
      integer ones): the weight is frozen.

    Raises:
      TypeError: a wrong dtype (``x`` not bf16/f16/f32, ``packed`` not uint8,
        ``absmax`` neither floating nor uint8).
      ValueError: naming the argument: shape mismatches between ``x``,
        ``packed``, ``absmax``, ``nested_*``, ``code``; missing or unexpected
        nested operands; a bad ``blocksize``/``impl``; 'pallas' without a GPU
        backend and without ``interpret``; on the 'pallas' path
        ``K % blocksize != 0`` or ``blocksize`` not a power of two >= 32.
    """
    cfg, x, operands = _prepare(x, packed, absmax, nested_absmax, nested_code, offset,
                                code=code, blocksize=blocksize,
                                nested_blocksize=nested_blocksize, impl=impl,
                                interpret=interpret, layer=layer,
                                kernel_scale=kernel_scale, kernel_codes=kernel_codes)
    return _nf4_matmul_vjp(cfg, x, *operands)


def _prepare(x, packed, absmax, nested_absmax=None, nested_code=None, offset=None, *,
             code=None, blocksize: int = 64, nested_blocksize: int = 256,
             impl: str | None = None, interpret: bool = False, layer=None,
             kernel_scale=None, kernel_codes=None):
    """`nf4_matmul`'s checks and normalisation: ``(cfg, x, operands)`` with ``operands =
    (packed, absmax, nested_absmax, nested_code, offset, code, layer, kernel_scale,
    kernel_codes)``
    as `_forward` and `_backward_dx` take them (errors as `nf4_matmul` documents)."""
    mode = resolve_impl(impl, interpret)
    x = jnp.asarray(x)
    check_float_dtype("x", x)
    if x.ndim < 1:
        raise ValueError("x must have shape [..., K], got a scalar")
    k = x.shape[-1]
    if not isinstance(blocksize, (int, np.integer)) or not (
            32 <= blocksize <= 4096 and blocksize % 2 == 0):
        raise ValueError(f"blocksize must be an even integer in [32, 4096], got {blocksize!r}")
    if not isinstance(nested_blocksize, (int, np.integer)) or nested_blocksize < 1:
        raise ValueError(f"nested_blocksize must be a positive integer, got {nested_blocksize!r}")
    blocksize, nested_blocksize = int(blocksize), int(nested_blocksize)

    stacked = None
    if layer is not None:
        layer = jnp.asarray(layer, jnp.int32)
        if code is None:
            code = jnp.broadcast_to(jnp.asarray(NF4_CODE), (jnp.shape(packed)[0], 16))
        operands = (packed, absmax, nested_absmax, nested_code, offset, code)
        operands = tuple(None if a is None else jnp.asarray(a) for a in operands)
        if mode == "pallas":  # checked on layer 0's shapes; the kernels index `layer`
            stacked = operands
            packed, absmax, nested_absmax, nested_code, offset, code = _layer_of(0, *operands)
        else:
            packed, absmax, nested_absmax, nested_code, offset, code = _layer_of(layer, *operands)
            layer = None

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
        require_pallas_backend("nf4_matmul", interpret)
        if k % blocksize:
            raise ValueError(
                f"blocksize: the pallas path needs K % blocksize == 0, got K = {k} "
                f"(x.shape[-1]) and blocksize = {blocksize}; use impl='xla'")
        if blocksize & (blocksize - 1):  # >= 32 is checked above
            raise ValueError(
                f"blocksize must be a power of two >= 32 on the pallas path, got {blocksize}")
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

    code = _as_f32("code", NF4_CODE if code is None else code, "[16]")
    if code.shape != (16,):
        raise ValueError(f"code must have shape [16], got {code.shape}")

    if mode == "pallas":
        lead = ()
        if stacked is not None:  # the stacked operands, cast and shaped as layer 0's were
            like = (packed, absmax, nested_absmax, nested_code, offset, code)
            packed, absmax, nested_absmax, nested_code, offset, code = (
                None if a is None else a.astype(b.dtype).reshape(a.shape[0], *b.shape)
                for a, b in zip(stacked, like))
            lead = packed.shape[:1]
        packed = packed.reshape(*lead, n, k // 2)
        absmax = absmax.reshape(*lead, n, k // blocksize)
    if kernel_scale is not None:
        kernel_scale = jnp.asarray(kernel_scale)
        want = (k // 64, n) if layer is None or mode != "pallas" else (packed.shape[0], k // 64, n)
        if mode != "pallas":
            kernel_scale = None  # the reference path computes from absmax
        elif kernel_scale.shape != want or kernel_scale.dtype != jnp.bfloat16:
            raise ValueError(f"kernel_scale must be bfloat16 {list(want)}, got "
                             f"{kernel_scale.dtype} {list(kernel_scale.shape)}")
    if kernel_codes is not None:
        kernel_codes = jnp.asarray(kernel_codes)
        want = (n, k // 8) if layer is None or mode != "pallas" else (packed.shape[0], n, k // 8)
        if mode != "pallas" or kernel_scale is None:
            kernel_codes = None  # only the Mosaic GPU forward (with kernel_scale) reads them
        elif kernel_codes.shape != want or kernel_codes.dtype != jnp.uint32 or k % 64:
            raise ValueError(f"kernel_codes must be uint32 {list(want)} (K = {k} a multiple "
                             f"of 64), got {kernel_codes.dtype} {list(kernel_codes.shape)}")
    cfg = _Config(mode, (n, k), blocksize, nested_blocksize, bool(interpret))
    return cfg, x, (packed, absmax, nested_absmax, nested_code, offset, code, layer,
                    kernel_scale, kernel_codes)


# ---------------------------------------------------------------------------
# Several weights, one x: the multi-weight op (q/k/v, gate/up)
# ---------------------------------------------------------------------------

#: The keys of one weight in `nf4_matmul_multi` (`nf4_matmul`'s weight arguments).
WEIGHT_KEYS = ("packed", "absmax", "nested_absmax", "nested_code", "offset", "code",
               "blocksize", "nested_blocksize", "kernel_scale", "kernel_codes")


def _multi_applies(cfgs, x, operands) -> bool:
    """Whether `nf4_mgpu_matmul_multi` takes every product at once: more than one weight,
    each of which the Mosaic kernel would take (`_mgpu_applies`: the 'pallas' path, not
    interpreted, bfloat16 ``x`` of at most `MGPU_MAX_M` rows, Hopper, ``kernel_scale``
    given, supported shapes), together at least `MGPU_MIN_WEIGHT` elements (the fixed cost
    of one launch is what fusing saves; see `nf4_matmul_multi`)."""
    if len(cfgs) < 2:
        return False
    x2 = x.reshape(-1, x.shape[-1])
    return (all(_mgpu_applies(c, x2, ops[7]) for c, ops in zip(cfgs, operands))
            and sum(c.shape[0] * c.shape[1] for c in cfgs) >= MGPU_MIN_WEIGHT)


def _multi_forward(cfgs, x, operands):
    k = cfgs[0].shape[1]
    batch = x.shape[:-1]
    layer = operands[0][6]
    # The kernel layout of the codes where every weight has it, else the bnb bytes of all.
    codes = tuple(ops[8] for ops in operands)
    if any(c is None for c in codes):
        codes = tuple(ops[0] for ops in operands)
    ys = nf4_mgpu_matmul_multi(x.reshape(-1, k), codes, tuple(ops[7] for ops in operands), layer)
    return tuple(y.reshape(*batch, c.shape[0]) for y, c in zip(ys, cfgs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _nf4_multi_vjp(cfgs, x, operands):
    return _multi_forward(cfgs, x, operands)


def _nf4_multi_fwd(cfgs, x, operands):
    return _multi_forward(cfgs, x, operands), operands


def _nf4_multi_bwd(cfgs, operands, dys):
    dx = sum(_backward_dx(c, dy, *ops).astype(jnp.float32)
             for c, dy, ops in zip(cfgs, dys, operands))
    return dx.astype(dys[0].dtype), jax.tree.map(zero_cotangent, operands)


_nf4_multi_vjp.defvjp(_nf4_multi_fwd, _nf4_multi_bwd)


def nf4_matmul_multi(x, weights, *, impl: str | None = None, interpret: bool = False,
                     layer=None, return_fused: bool = False):
    """``(x @ W_0.T, x @ W_1.T, ...)`` for several frozen NF4 weights of one ``K`` (a
    decoder layer's q/k/v projections, or gate/up), in ONE kernel launch where it can.

    On a Hopper GPU, bfloat16 ``x`` with at most `MGPU_MAX_M` rows and weights that all
    carry ``kernel_scale`` (together at least `MGPU_MIN_WEIGHT` elements) run
    `pallas_kernels.nf4_mgpu.nf4_mgpu_matmul_multi`: one Mosaic GPU launch over every
    weight's row tiles, each weight read in place from its own arrays (nothing is
    concatenated or copied; the design of tokamax's sm90 quantized kernel, codes in
    bitsandbytes' NF4 layout). Decoding pays a fixed cost per launch (H200: ~16 us of
    the 20.5 us a 4096x4096 GEMV takes at M = 1), which this pays once. Everything else
    (CPU, the XLA path, ``interpret``, not Hopper, not bfloat16, M > `MGPU_MAX_M`, small
    weights, a weight without ``kernel_scale``, one weight) is exactly one `nf4_matmul`
    per weight.

    Args:
      x: ``[..., K]`` bfloat16, float16 or float32 activations, shared by every weight.
      weights: a sequence of mappings, one per weight, with `nf4_matmul`'s weight
        arguments as keys (`WEIGHT_KEYS`: ``packed`` and ``absmax`` required;
        ``nested_absmax``, ``nested_code``, ``offset``, ``code``, ``blocksize`` (default
        64), ``nested_blocksize`` (256), ``kernel_scale``, ``kernel_codes`` optional),
        shapes and dtypes as `nf4_matmul` documents; each weight has its own ``N_i`` and
        blocksize. The fused kernel reads ``kernel_codes`` when every weight has them,
        else every weight's bnb ``packed`` bytes.
      impl, interpret: as in `nf4_matmul`, for every weight.
      layer: optional int32 scalar: every weight's operands are stacked over layers and
        layer ``layer`` of each is multiplied (read in place by the kernels).
      return_fused: also return whether the one fused kernel ran.

    Returns:
      A tuple of ``[..., N_i]`` arrays of ``x.dtype``, one per weight (float32
      accumulation); with ``return_fused``, ``(that tuple, fused: bool)``.
      Differentiable in ``x``: the fused op's custom VJP computes each ``dy_i @ W_i``
      with `nf4_matmul`'s transposed path, chosen per weight (on a Hopper the Mosaic GPU
      `pallas_kernels.nf4_mgpu.nf4_mgpu_matmul_t` for a weight that would take the
      Mosaic forward on its own), and sums them in float32 (one rounding to
      ``x.dtype``); every weight operand gets a zero cotangent (frozen weights).

    Raises:
      TypeError: a weight mapping with keys outside `WEIGHT_KEYS`, or missing ``packed``
        / ``absmax``; and every TypeError of `nf4_matmul`.
      ValueError: no weights; and every ValueError of `nf4_matmul` (per weight).
    """
    weights = tuple(weights)
    if not weights:
        raise ValueError("nf4_matmul_multi: weights is empty")
    prepared = []
    for i, w in enumerate(weights):
        w = dict(w)
        unknown = sorted(set(w) - set(WEIGHT_KEYS))
        if unknown or "packed" not in w or "absmax" not in w:
            raise TypeError(f"nf4_matmul_multi: weights[{i}] must have keys among "
                            f"{WEIGHT_KEYS} including packed and absmax; got {sorted(w)}")
        prepared.append(_prepare(x, **w, impl=impl, interpret=interpret, layer=layer))
    cfgs = tuple(p[0] for p in prepared)
    x = prepared[0][1]
    operands = tuple(p[2] for p in prepared)
    fused = _multi_applies(cfgs, x, operands)
    if fused:
        ys = _nf4_multi_vjp(cfgs, x, operands)
    else:
        ys = tuple(_nf4_matmul_vjp(c, x, *ops) for c, ops in zip(cfgs, operands))
    return (ys, fused) if return_fused else ys


# ---------------------------------------------------------------------------
# Plain-jnp references (the XLA path and the test oracle)
# ---------------------------------------------------------------------------


def opaque_f32(x, nonneg) -> jax.Array:
    """float32 ``x`` unchanged, but opaque to XLA/LLVM: a constant is not folded, and a
    product is materialized (not contracted into an FMA with a following add).

    ``nonneg`` must be >= +0: its sign bit (a runtime 0 the compiler cannot see) is OR-ed
    into ``x``'s bits.
    """
    sign = lax.shift_right_logical(lax.bitcast_convert_type(jnp.asarray(nonneg, jnp.float32), jnp.uint32),
                                   jnp.uint32(31))
    bits = lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32) | sign
    return lax.bitcast_convert_type(bits, jnp.float32)


def double_quant_absmax(absmax, nested_absmax, nested_code, offset,
                        nested_blocksize: int = 256) -> jax.Array:
    """The float32 absmax of every 4-bit block from bnb's double quantization, ``[nblocks]``.

    ``nested_code[absmax[i]] * nested_absmax[i // nested_blocksize] + offset``, the product
    rounded to float32 before the add as bnb does it (``dequantize_blockwise(absmax, state2)
    + offset`` in ``bitsandbytes.functional.dequantize_4bit``: two kernels); a plain
    ``a * b + c`` may be contracted into one FMA by XLA and differ in the last bit.

    Args:
      absmax: uint8 codes ``[nblocks]`` (any shape of that size).
      nested_absmax: float32 ``[ceil(nblocks / nested_blocksize)]``, each >= +0 (a max of
        absolute values; its sign bit is the opaque zero `opaque_f32` uses).
      nested_code: float32 ``[256]`` (bnb's dynamic map).
      offset: float32 scalar (the mean bnb subtracted before the nested quantization).
    """
    a = jnp.asarray(absmax).reshape(-1).astype(jnp.int32)
    blk = jnp.arange(a.shape[0], dtype=jnp.int32) // int(nested_blocksize)
    scale = jnp.asarray(nested_absmax, jnp.float32).reshape(-1)[blk]
    prod = jnp.asarray(nested_code, jnp.float32)[a] * scale
    return opaque_f32(prod, scale) + jnp.asarray(offset, jnp.float32).reshape(())


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
        scales = double_quant_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
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
