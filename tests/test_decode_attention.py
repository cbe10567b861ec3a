"""pallas_kernels.decode_attention (split-KV flash decoding) against a float64 NumPy oracle.

The oracle is softmax attention written out in NumPy float64 with transformers'
``repeat_kv`` head mapping (query head ``i`` reads KV head ``i // (Hq // Hkv)``). Cases
cover odd head counts (6/2, 7/1, 3/3), per-sequence ``starts``/``lengths`` that are not
multiples of the tile or the chunk, mask holes, more splits than tiles (empty splits),
a sequence with no valid key (zeros, not NaN), and a head size that is not a power of two.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from kernel_checks import INTERPRET, ON_GPU, assert_close, f64
from pallas_kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,
    default_block_k,
    default_num_splits,
)

BF16, F16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)


def oracle_decode_attention(q, k, v, lengths, starts, mask=None):
    """float64 NumPy softmax attention of one query per row; zeros where no key is valid."""
    q, k, v = f64(q), f64(k), f64(v)
    b, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    k = np.repeat(k, hq // hkv, axis=2)  # [B, S, Hq, D], head i -> kv head i // G
    v = np.repeat(v, hq // hkv, axis=2)
    scores = np.einsum("bhd,bshd->bhs", q, k) / math.sqrt(d)
    t = np.arange(s_len)
    valid = (t >= np.asarray(starts)[:, None]) & (t < np.asarray(lengths)[:, None])
    if mask is not None:
        valid &= np.asarray(mask)
    scores = np.where(valid[:, None, :], scores, -np.inf)
    m = np.max(scores, axis=-1, keepdims=True)
    p = np.where(valid[:, None, :], np.exp(scores - np.where(np.isfinite(m), m, 0.0)), 0.0)
    total = p.sum(axis=-1, keepdims=True)
    p = np.divide(p, total, out=np.zeros_like(p), where=total > 0)
    return np.einsum("bhs,bshd->bhd", p, v)


def _inputs(seed, b, hq, hkv, s_len, d, dtype, mask_holes):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, hq, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, s_len, hkv, d)), dtype)
    v = jnp.asarray(rng.normal(0.2, 1.0, (b, s_len, hkv, d)), dtype)
    mask = rng.random((b, s_len)) > 0.25 if mask_holes else None
    return q, k, v, mask


# (B, Hq, Hkv, S, D, dtype, lengths, starts, mask holes, block_k, num_splits)
CASES = [
    (2, 6, 2, 100, 16, F32, [100, 37], [0, 5], False, 16, 3),
    (3, 7, 1, 77, 32, BF16, [77, 50, 3], [10, 0, 2], True, None, None),
    (1, 3, 3, 40, 64, F32, [33], [0], False, 16, 8),      # 8 splits > 3 tiles: empty splits
    (2, 4, 2, 300, 24, BF16, 257, None, False, 32, None),  # scalar length, D not a power of 2
    (3, 8, 4, 50, 16, F16, [50, 20, 7], [0, 20, 3], True, 16, 4),  # row 1 has no valid key
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-S{c[3]}-D{c[4]}-{c[5]}")
def test_decode_attention_kernel_matches_float64(case):
    b, hq, hkv, s_len, d, dtype, lengths, starts, holes, block_k, num_splits = case
    q, k, v, mask = _inputs(s_len + hq, b, hq, hkv, s_len, d, dtype, holes)
    out = decode_attention(q, k, v, jnp.asarray(lengths),
                           None if starts is None else jnp.asarray(starts),
                           mask=None if mask is None else jnp.asarray(mask), block_k=block_k,
                           num_splits=num_splits, impl="pallas", interpret=INTERPRET)
    assert out.dtype == dtype and out.shape == (b, hq, d)
    lengths_b = np.broadcast_to(lengths, (b,))
    starts_b = np.zeros(b, int) if starts is None else np.asarray(starts)
    expected = oracle_decode_attention(q, k, v, lengths_b, starts_b, mask)
    assert_close(out, expected, what="out")
    empty = starts_b >= lengths_b
    assert np.all(np.asarray(out, np.float32)[empty] == 0.0)


def test_reference_matches_float64():
    q, k, v, mask = _inputs(3, 3, 6, 2, 45, 16, F32, True)
    lengths, starts = np.array([45, 30, 9]), np.array([4, 0, 9])  # row 2 empty
    out = decode_attention_reference(q, k, v, jnp.asarray(lengths), jnp.asarray(starts),
                                     mask=jnp.asarray(mask))
    assert_close(out, oracle_decode_attention(q, k, v, lengths, starts, mask), what="reference")
    out_xla = decode_attention(q, k, v, jnp.asarray(lengths), jnp.asarray(starts),
                               mask=jnp.asarray(mask), impl="xla")
    np.testing.assert_array_equal(np.asarray(out_xla), np.asarray(out))


def test_default_split_count_fills_an_h200():
    """32k keys, B=1, Hkv=8, D=128 (the speed target): at least 264 programs (two per SM of
    132 SMs), and never more splits than tiles."""
    block_k = default_block_k(32768, 128)
    splits = default_num_splits(1, 8, 32768, block_k)
    assert 8 * splits >= 264 and splits <= 32768 // block_k
    block_k = default_block_k(200, 128)
    assert default_num_splits(4, 8, 200, block_k) <= -(-200 // block_k)


def test_bad_inputs_raise():
    q, k, v, _ = _inputs(1, 2, 6, 4, 20, 16, F32, False)
    lengths = jnp.asarray([20, 10])
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        decode_attention(q, k, v, lengths)
    q, k, v, _ = _inputs(1, 2, 4, 2, 20, 16, F32, False)
    with pytest.raises(TypeError, match="v must have k's dtype"):
        decode_attention(q, k, v.astype(jnp.bfloat16), lengths)
    with pytest.raises(TypeError, match="lengths must be integer"):
        decode_attention(q, k, v, lengths.astype(jnp.float32))
    with pytest.raises(ValueError, match="mask must have shape"):
        decode_attention(q, k, v, lengths, mask=jnp.ones((2, 19), bool))
    with pytest.raises(ValueError, match="block_k"):
        decode_attention(q, k, v, lengths, block_k=24, impl="pallas", interpret=INTERPRET)
    if not ON_GPU:
        with pytest.raises(ValueError, match="GPU backend"):
            decode_attention(q, k, v, lengths, impl="pallas")


def test_stacked_cache_with_layer_index():
    """``layer`` attends one layer of a stacked ``[L, B, S, Hkv, D]`` cache (read in place
    by the kernel); matches the float64 oracle of that layer on both paths."""
    layers, b, hq, hkv, s_len, d = 3, 2, 6, 2, 70, 32
    parts = [_inputs(40 + i, b, hq, hkv, s_len, d, F32, True) for i in range(layers)]
    q = parts[0][0]
    k = jnp.stack([p[1] for p in parts])
    v = jnp.stack([p[2] for p in parts])
    mask = parts[2][3]
    lengths, starts = np.array([70, 41]), np.array([3, 0])
    expected = oracle_decode_attention(q, parts[2][1], parts[2][2], lengths, starts, mask)
    for impl in ("pallas", "xla"):
        out = decode_attention(q, k, v, jnp.asarray(lengths), jnp.asarray(starts), mask=jnp.asarray(mask),
                               block_k=16, impl=impl, interpret=INTERPRET, layer=jnp.int32(2))
        assert_close(out, expected, what=f"stacked {impl}")


def test_stacked_cache_with_more_rows_than_queries():
    """A query batch of B rows over a stacked cache of B' > B rows (the serving engine's decode
    over its first B slots) attends rows 0..B-1 of the layer; the other rows are ignored."""
    layers, b, extra, hq, hkv, s_len, d = 2, 3, 2, 4, 2, 45, 16
    parts = [_inputs(60 + i, b + extra, hq, hkv, s_len, d, F32, True) for i in range(layers)]
    q = parts[0][0][:b]
    k = jnp.stack([p[1] for p in parts])
    v = jnp.stack([p[2] for p in parts])
    mask = parts[1][3][:b]
    lengths, starts = np.array([45, 20, 33]), np.array([0, 2, 5])
    expected = oracle_decode_attention(q, parts[1][1][:b], parts[1][2][:b], lengths, starts, mask)
    for impl in ("pallas", "xla"):
        out = decode_attention(q, k, v, jnp.asarray(lengths), jnp.asarray(starts), mask=jnp.asarray(mask),
                               block_k=16, impl=impl, interpret=INTERPRET, layer=jnp.int32(1))
        assert_close(out, expected, what=f"first rows {impl}")
