"""Split-KV flash decoding: one query token per sequence against a KV cache, as Pallas.

The math, per sequence ``b`` and query head ``i`` (grouped-query attention: query head
``i`` reads KV head ``i // G`` with ``G = Hq / Hkv``, transformers' ``repeat_kv`` order)::

    s_t = scale * q[b, i] . k[b, t, i // G]          for valid t
    out[b, i] = sum_t softmax(s)_t * v[b, t, i // G]

where key position ``t`` is valid iff ``starts[b] <= t < lengths[b]`` (and
``mask[b, t]`` when a mask is given). A row with no valid key gets zeros.

Algorithm: "Flash-Decoding" (Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for
long-context inference"; the online softmax of FlashAttention-2, Dao 2023): the valid key
range of each sequence is cut into ``num_splits`` chunks that run in parallel; each
program keeps a running max ``m``, running sum ``l`` and an unnormalised float32
accumulator over its chunk, and a log-sum-exp combine in jnp merges the chunks::

    M = max_j m_j;  w_j = exp(m_j - M);  out = sum_j w_j acc_j / sum_j w_j l_j

The file reads top to bottom like jax's ``pallas/ops/gpu/decode_attention.py``: the kernel,
the wrapper that picks the tiles and the number of splits and does the combine, the
public `decode_attention`, and the plain-jnp `decode_attention_reference` at the bottom.
There is no backward (decoding only).

Kernel structure (Pallas, Triton backend; also runs with ``interpret=True``):

* Grid ``(B, Hkv, num_splits)``. A program loads the ``G`` query rows of its KV head
  (``q[b, h*G : h*G+G]``, padded with masked rows to ``block_g = max(16,
  next_power_of_2(G))`` for the MMA), so the ``G`` query heads of one KV head share every
  K/V tile it loads: K/V are read once per decode step.
* The cache is read in its own layout ``[B, S, Hkv, D]`` (jaxqlora's `KVCache`): a K tile
  is ``k[b, t0:t0+block_k, h, :]``, a strided 2-D load, with no transposed copy.
* The chunk of split ``j`` is computed at run time from the sequence's own valid range:
  ``chunk = round_up(cdiv(lengths[b] - starts[b], num_splits), block_k)``, split ``j``
  scans ``[starts[b] + j*chunk, min(starts[b] + (j+1)*chunk, lengths[b]))`` in
  ``block_k`` tiles (a loop with a run-time trip count; ragged tiles masked). So the work
  is balanced across splits whatever the fill of the cache, and a split past the end
  does no loads at all.
* Masked scores are set to a large finite negative value and their probabilities to 0,
  so fully masked tiles and splits (``m = -1e30, l = 0, acc = 0``) never make NaNs; the
  combine gives zeros where ``sum_j w_j l_j = 0``.
* ``p`` is rounded to the cache dtype for the ``p @ V`` MMA (float32 accumulation), as in
  FlashAttention; float32 operands use IEEE float32 MMAs.

Speed target (H200, bf16, B=1, Hkv=8, D=128, 32k keys): about 40 us, i.e. the 128 MiB
of K/V at HBM bandwidth; the default split count gives ``B*Hkv*num_splits`` of about 528
programs (four per SM of a 132-SM H100/H200).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import (
    check_float_dtype,
    dot_f32 as _dot,
    plgpu,
    require_pallas_backend,
    resolve_impl,
    triton_compiler_params,
    zero,
)

__all__ = ["decode_attention", "decode_attention_reference"]

#: Score of a masked key (finite, so that exp(m_prev - m_new) never sees inf - inf).
_NEG = -1e30
#: Programs the default split count aims for: four per SM of a 132-SM H100/H200 (the
#: best of 33..264 splits at 32k context, B = 1, 8 KV heads in benchmarks/nf4_tune.py).
_TARGET_PROGRAMS = 528


# ---------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------


def decode_attention_kernel(layer_ref, q_ref, k_ref, v_ref, lengths_ref, starts_ref, *refs,
                            scale: float, num_splits: int, block_g: int, block_k: int,
                            block_d: int, has_mask: bool):
    """Split ``j`` of KV head ``h`` of sequence ``b``: partial ``acc [G, D]``, ``m``, ``l``.
    ``k, v`` are ``[L, B, S, Hkv, D]`` (L stacked layers' caches); layer ``layer_ref[0]``
    is read in place."""
    if has_mask:
        mask_ref, o_ref, m_ref, l_ref = refs
    else:
        mask_ref, (o_ref, m_ref, l_ref) = None, refs
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    g, d = o_ref.shape[3], o_ref.shape[4]
    mask_g = jnp.arange(block_g, dtype=jnp.int32) < g
    mask_d = jnp.arange(block_d, dtype=jnp.int32) < d
    q = plgpu.load(q_ref.at[b, pl.ds(h * g, block_g), pl.ds(0, block_d)],
                   mask=mask_g[:, None] & mask_d[None, :], other=zero(q_ref.dtype))

    start, length = starts_ref[b], lengths_ref[b]
    per_split = lax.div(jnp.maximum(length - start, 0) + (num_splits - 1), num_splits)
    chunk = lax.div(per_split + (block_k - 1), block_k) * block_k
    lo = start + j * chunk
    hi = jnp.minimum(lo + chunk, length)
    n_tiles = lax.div(jnp.maximum(hi - lo, 0) + (block_k - 1), block_k)

    def body(i, carry):
        acc, m_prev, l_prev = carry
        t0 = lo + i * block_k
        valid = t0 + jnp.arange(block_k, dtype=jnp.int32) < hi
        if mask_ref is not None:
            keep = plgpu.load(mask_ref.at[b, pl.ds(t0, block_k)], mask=valid,
                              other=zero(mask_ref.dtype))
            valid = valid & (keep != 0)
        kv_mask = valid[:, None] & mask_d[None, :]
        k = plgpu.load(k_ref.at[layer, b, pl.ds(t0, block_k), h, pl.ds(0, block_d)],
                       mask=kv_mask, other=zero(k_ref.dtype))
        s = jnp.where(valid[None, :], _dot(q, k, 1) * scale, _NEG)  # [block_g, block_k]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        v = plgpu.load(v_ref.at[layer, b, pl.ds(t0, block_k), h, pl.ds(0, block_d)],
                       mask=kv_mask, other=zero(v_ref.dtype))
        acc = acc * alpha[:, None] + _dot(p.astype(v_ref.dtype), v, 0)
        return acc, m_new, l_prev * alpha + jnp.sum(p, axis=1)

    init = (jnp.zeros((block_g, block_d), jnp.float32),
            jnp.full((block_g,), _NEG, jnp.float32),
            jnp.zeros((block_g,), jnp.float32))
    acc, m, l = lax.fori_loop(0, n_tiles, body, init)
    plgpu.store(o_ref.at[b, h, j, pl.ds(0, block_g), pl.ds(0, block_d)], acc,
                mask=mask_g[:, None] & mask_d[None, :])
    plgpu.store(m_ref.at[b, h, j, pl.ds(0, block_g)], m, mask=mask_g)
    plgpu.store(l_ref.at[b, h, j, pl.ds(0, block_g)], l, mask=mask_g)


# ---------------------------------------------------------------------------
# Wrapper: tiles, split count, pallas_call and the log-sum-exp combine
# ---------------------------------------------------------------------------


def default_block_k(seq_len: int, head_dim: int) -> int:
    """Keys per tile: 128 for ``head_dim <= 64``, else 64, at most ``max(16, next_pow2(S))``.

    A bf16 K+V tile pair is then 32 KiB for ``D = 128``: with 2 pipeline stages, 64 KiB of
    shared memory per program, so a few programs share an SM and keep HBM busy.
    """
    return min(128 if head_dim <= 64 else 64, max(16, pl.next_power_of_2(seq_len)))


def default_num_splits(batch: int, kv_heads: int, seq_len: int, block_k: int) -> int:
    """Splits so that ``batch * kv_heads * splits`` is about 528 programs (four per SM of
    a 132-SM H100/H200), at most one tile per split of a full cache, at least 1."""
    want = pl.cdiv(_TARGET_PROGRAMS, batch * kv_heads)
    return max(1, min(pl.cdiv(seq_len, block_k), want))


def combine_splits(acc, m, l):
    """Log-sum-exp merge of per-split partials: ``acc [..., P, G, D]``, ``m, l [..., P, G]``
    (float32) -> ``[..., G, D]`` float32; zeros where no split saw a valid key."""
    m_max = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp(m - m_max)
    total = jnp.sum(l * w, axis=-2)
    out = jnp.sum(acc * w[..., None], axis=-3)
    return jnp.where(total[..., None] > 0, out / jnp.where(total > 0, total, 1.0)[..., None],
                     0.0)


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "num_splits", "interpret",
                                             "num_warps", "num_stages"))
def decode_attention_pallas(q, k, v, lengths, starts, mask=None, layer=None, *, scale: float,
                            block_k: int, num_splits: int, interpret: bool = False,
                            num_warps: int = 4, num_stages: int = 2):
    """The Pallas call and the combine on validated operands; float32 ``[B, Hq, D]``.

    ``q [B, Hq, D]`` in the cache dtype, ``k, v [B, S, Hkv, D]`` (or ``[L, B, S, Hkv, D]``
    with an int32 scalar ``layer``, read in place), ``lengths, starts`` int32 ``[B]``
    clipped to ``[0, S]``, ``mask`` int8 ``[B, S]`` or None. Use `decode_attention`; this
    skips its checks.
    """
    if layer is None:
        k, v, layer = k[None], v[None], 0
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    batch, hq, d = q.shape
    kv_heads = k.shape[3]
    g = hq // kv_heads
    block_g = max(16, pl.next_power_of_2(g))
    block_d = max(16, pl.next_power_of_2(d))
    has_mask = mask is not None
    kernel = functools.partial(
        decode_attention_kernel, scale=scale, num_splits=num_splits, block_g=block_g,
        block_k=block_k, block_d=block_d, has_mask=has_mask)
    part = (batch, kv_heads, num_splits, g)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_splits),
        out_shape=[jax.ShapeDtypeStruct((*part, d), jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32)],
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="decode_attention",
    )(layer, q, k, v, lengths, starts, *((mask,) if has_mask else ()))
    return combine_splits(acc, m, l).reshape(batch, hq, d)


# ---------------------------------------------------------------------------
# The public op
# ---------------------------------------------------------------------------


def _positions(name: str, a, batch: int, seq_len: int) -> jax.Array:
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer, got {a.dtype}")
    if a.shape not in ((), (batch,)):
        raise ValueError(f"{name} must be a scalar or [B] = [{batch}], got {a.shape}")
    return jnp.clip(jnp.broadcast_to(a, (batch,)).astype(jnp.int32), 0, seq_len)


def decode_attention(q, k, v, lengths, starts=None, *, mask=None, scale: float | None = None,
                     block_k: int | None = None, num_splits: int | None = None,
                     impl: str | None = "auto", interpret: bool = False, layer=None) -> jax.Array:
    """Attention of one query token per sequence over a KV cache (split-KV flash decoding).

    Source: Flash-Decoding (Dao, Haziza, Massa, Sizov 2023) with FlashAttention-2's
    online softmax; GQA as transformers' ``repeat_kv`` (query head ``i`` uses KV head
    ``i // (Hq // Hkv)``). See the module docstring for the kernel.

    Args:
      q: ``[B, Hq, D]`` bfloat16/float16/float32 queries (RoPE applied).
      k, v: ``[B, S, Hkv, D]`` cache (jaxqlora's `KVCache` layout), one dtype
        (bfloat16/float16/float32), ``Hq % Hkv == 0``.
      lengths: int ``[B]`` (or a scalar): keys ``t < lengths[b]`` may be attended.
      starts: int ``[B]`` (or a scalar), default 0: keys ``t >= starts[b]`` may be
        attended (left-padded prompts). Both are clipped to ``[0, S]``.
      mask: optional bool ``[B, S]``: additionally only keys with ``mask[b, t]`` (holes
        in the cache, e.g. right-padded prompts).
      scale: score scale, default ``1 / sqrt(D)``.
      block_k: keys per tile on the Pallas path (a power of two >= 16), default
        `default_block_k`.
      num_splits: KV chunks per sequence and KV head on the Pallas path, default
        `default_num_splits` (about 528 programs in all).
      impl: None/'auto' -> the Pallas kernel when ``jax.default_backend() == 'gpu'`` (or
        ``interpret=True``), else `decode_attention_reference`; ``$JAXQLORA_KERNELS``
        ('pallas'/'xla') overrides auto; 'pallas'/'xla' force one path.
      interpret: run the Pallas kernel in interpret mode (CPU testing).
      layer: int32 scalar: ``k, v`` are stacked caches ``[L, B', S, Hkv, D]`` (``B' >= B``),
        and layer ``layer``, rows ``0..B-1``, is read in place (a decode over the first B
        rows of a larger cache, as the serving engine runs).

    Returns:
      ``[B, Hq, D]`` in ``q.dtype`` (softmax and accumulation in float32); zeros for a
      row with no valid key. Not differentiable (no backward).

    Raises:
      TypeError: a dtype not listed above, ``k``/``v`` of different dtypes, non-integer
        ``lengths``/``starts``, a non-bool ``mask``.
      ValueError: naming the argument: shape mismatches, ``Hq % Hkv != 0``, a bad
        ``block_k``/``num_splits``/``impl``; 'pallas' without a GPU and without
        ``interpret``.
    """
    mode = resolve_impl(impl, interpret)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    stacked = None
    if layer is not None:
        if k.ndim != 5 or v.shape != k.shape:
            raise ValueError(f"with layer, k and v must have shape [L, B, S, Hkv, D], got {k.shape}, {v.shape}")
        layer = jnp.asarray(layer, jnp.int32)
        stacked = (k, v)
        # checks (and the reference path) use the layer's slice; a stacked cache may hold more
        # rows than q (a decode over its first B rows): the kernel reads rows b < B in place
        k, v = k[layer, :q.shape[0]], v[layer, :q.shape[0]]
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_float_dtype(name, a)
    if v.dtype != k.dtype:
        raise TypeError(f"v must have k's dtype {k.dtype}, got {v.dtype}")
    if q.ndim != 3:
        raise ValueError(f"q must have shape [B, Hq, D], got {q.shape}")
    batch, hq, d = q.shape
    if k.ndim != 4 or k.shape[0] != batch or k.shape[3] != d:
        raise ValueError(f"k must have shape [B, S, Hkv, D] = [{batch}, S, Hkv, {d}], "
                         f"got {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}")
    seq_len, kv_heads = k.shape[1], k.shape[2]
    if kv_heads == 0 or hq % kv_heads:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({kv_heads})")
    lengths = _positions("lengths", lengths, batch, seq_len)
    starts = _positions("starts", 0 if starts is None else starts, batch, seq_len)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be bool, got {mask.dtype}")
        if mask.shape != (batch, seq_len):
            raise ValueError(f"mask must have shape [B, S] = [{batch}, {seq_len}], "
                             f"got {mask.shape}")
    scale = float(1.0 / math.sqrt(d) if scale is None else scale)
    if mode == "xla" or q.size == 0 or seq_len == 0:
        return decode_attention_reference(q, k, v, lengths, starts, mask=mask, scale=scale)

    require_pallas_backend("decode_attention", interpret)
    block_k = default_block_k(seq_len, d) if block_k is None else block_k
    if not isinstance(block_k, (int, np.integer)) or block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k!r}")
    if num_splits is None:
        num_splits = default_num_splits(batch, kv_heads, seq_len, int(block_k))
    if not isinstance(num_splits, (int, np.integer)) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive integer, got {num_splits!r}")
    if stacked is not None:  # the kernel reads the layer in place; the slices above are dead
        k, v = stacked
    out = decode_attention_pallas(
        q.astype(k.dtype), k, v, lengths, starts,
        None if mask is None else mask.astype(jnp.int8), layer,
        scale=scale, block_k=int(block_k), num_splits=int(num_splits),
        interpret=bool(interpret))
    return out.astype(q.dtype)


# ---------------------------------------------------------------------------
# Plain-jnp reference (the XLA path and the test oracle)
# ---------------------------------------------------------------------------


def decode_attention_reference(q, k, v, lengths, starts=None, *, mask=None,
                               scale: float | None = None) -> jax.Array:
    """`decode_attention` in plain jnp, float32 throughout (``[B, Hq, D]`` in q.dtype).

    ``q [B, Hq, D]``, ``k, v [B, S, Hkv, D]``; key ``t`` of row ``b`` is valid iff
    ``starts[b] <= t < lengths[b]`` (and ``mask[b, t]``); rows without a valid key give
    zeros.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    batch, hq, d = q.shape
    seq_len, kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.astype(jnp.float32).reshape(batch, kv_heads, hq // kv_heads, d)
    s = jnp.einsum("bhgd,bshd->bhgs", qf, k.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST) * scale
    t = jnp.arange(seq_len)
    starts = jnp.zeros((batch,), jnp.int32) if starts is None else jnp.broadcast_to(starts, (batch,))
    lengths = jnp.broadcast_to(lengths, (batch,))
    valid = (t >= starts[:, None]) & (t < lengths[:, None])
    if mask is not None:
        valid = valid & jnp.asarray(mask, bool)
    valid = valid[:, None, None, :]
    s = jnp.where(valid, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhgs,bshd->bhgd", p, v.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST)
    out = jnp.where(total > 0, out / jnp.where(total > 0, total, 1.0), 0.0)
    return out.reshape(batch, hq, d).astype(q.dtype)
