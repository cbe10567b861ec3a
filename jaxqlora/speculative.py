"""Speculative decoding: draft k tokens cheaply, verify them in one cached forward of the target.

Each step of the loop (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling"):

1. draft ``k`` tokens per row, by prompt lookup (`ngram_drafts`: the continuation of the
   longest, most recent n-gram match of the row's own prompt and output so far, as
   transformers' ``prompt_lookup_num_tokens`` and vLLM's n-gram proposer; no second model)
   or with a small draft model that shares the tokenizer (`draft_tokens`);
2. run the target over the last accepted token plus the k drafts, M = k + 1 rows, in ONE
   cached forward (on a GPU the NF4 GEMV reads each weight once for all M rows);
3. accept the longest agreeing prefix plus one token of the target's own (`accept`):
   greedy compares with the target's argmax; sampling uses speculative rejection sampling
   (accept draft ``d`` with probability ``min(1, p(d) / q(d))``, on the first rejection
   sample from ``norm(max(p - q, 0))``, after k acceptances from ``p``), so every emitted
   token has exactly the target's distribution;
4. roll the KV cache back past the rejected tokens (`rollback`).

The loop runs as `jaxqlora.decode`'s does: chunks of `SPEC_CHUNK` steps, each a
``lax.fori_loop`` with a static trip count (`speculative_chunk`), finished rows masked, each
chunk queued from the host before the previous one's counts are read back, so the device never
waits for the host between steps (a ``while_loop`` stopping on EOS would read its predicate back
every step). k is fixed and acceptance lengths only move masks and dynamic indices: one program
serves every chunk.

Batched rows accept different lengths: every step writes M slots at each row's own ``index``,
each row keeps the slots of its accepted tokens, marks the rest invalid in ``valid`` and
advances its ``index`` past them. RoPE
positions come from each row's count of valid slots (`CausalLM.hidden_states`), so a row with
holes in its cache sees exactly the positions and keys of plain decoding; the stale K/V of the
holes are masked (and overwritten when the cache is compacted). The cache holds
``prompt_len + max_new_tokens + k`` slots; when the next write would not fit (only batched rows
with holes get there), `compact_cache` moves every row's valid slots to the front.

Greedy speculative output equals plain greedy decoding token for token up to floating-point
reassociation (an M-row forward sums in another order than M one-row forwards; a float32 model
agrees, a bf16 model can differ where two logits tie to within rounding).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxqlora.decode import SamplingConfig, cache_spec, inference_model, prefill, prefill_key, sampling_logits
from jaxqlora.model import CausalLM, KVCache

METHODS = ("ngram", "draft")
SPEC_CHUNK = 4  # speculative steps per compiled call (each emits 1..k + 1 tokens per row)


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """How tokens are drafted and verified (hashable: a static argument of the compiled loop).

    Attributes:
      method: ``"ngram"`` (prompt lookup, no second model) or ``"draft"`` (a draft model,
        passed separately as ``draft_model``).
      num_draft: k, draft tokens verified per step (the target runs k + 1 rows).
      max_ngram, min_ngram: prompt lookup tries suffix n-grams from ``max_ngram`` down to
        ``min_ngram`` tokens; the longest size that occurs earlier wins, and among its
        occurrences the most recent.
      residual: on a rejection, sample from the residual ``norm(max(p - q, 0))`` (True,
        correct). False samples from ``p`` instead, which biases the output towards the
        drafts; it exists so that the distribution test can show it fails.

    Raises:
      ValueError: unknown method, ``num_draft < 1`` or bad n-gram sizes.
    """

    method: str = "ngram"
    num_draft: int = 4
    max_ngram: int = 3
    min_ngram: int = 1
    residual: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {METHODS}, got {self.method!r}")
        if self.num_draft < 1:
            raise ValueError(f"num_draft must be >= 1, got {self.num_draft}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")


def speculative_config(speculative, draft_model=None, num_draft: int | None = None) -> SpeculativeConfig | None:
    """Normalise `jaxqlora.generate`'s ``speculative=`` argument.

    Args:
      speculative: None (off, unless ``draft_model`` is given: then ``"draft"``), ``"ngram"``,
        ``"draft"`` or a `SpeculativeConfig`.
      draft_model: the draft `CausalLM` or None.
      num_draft: overrides the config's k when given.

    Returns:
      A `SpeculativeConfig`, or None for plain decoding.

    Raises:
      ValueError: an unknown method, ``"draft"`` without a draft model, or a draft model with
        ``"ngram"``.
    """
    if speculative is None:
        if draft_model is None:
            return None
        speculative = "draft"
    if isinstance(speculative, str):
        speculative = SpeculativeConfig(method=speculative)
    if not isinstance(speculative, SpeculativeConfig):
        raise ValueError(f"speculative must be None, 'ngram', 'draft' or a SpeculativeConfig, got {speculative!r}")
    if num_draft is not None:
        speculative = dataclasses.replace(speculative, num_draft=int(num_draft))
    if speculative.method == "draft" and draft_model is None:
        raise ValueError("speculative='draft' needs draft_model=")
    if speculative.method == "ngram" and draft_model is not None:
        raise ValueError("draft_model= is only used with speculative='draft'")
    return speculative


def check_draft_model(model: CausalLM, draft_model: CausalLM) -> None:
    """Raise ValueError unless ``draft_model`` can draft for ``model`` (same vocabulary size:
    the draft's token ids are the target's)."""
    if draft_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft_model.config.vocab_size}) differs from the "
                         f"target's ({model.config.vocab_size}); a draft model must share the tokenizer")


# ------------------------------------------------------------------ sampling


def target_probs(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """float32 probabilities ``[..., vocab]`` of the token `sample_token` would draw from
    ``logits [..., vocab]`` (softmax of `sampling_logits`)."""
    return jax.nn.softmax(sampling_logits(logits, cfg), axis=-1)


def accept(logits: jax.Array, drafts: jax.Array, draft_probs: jax.Array | None, key: jax.Array,
           sampling: SamplingConfig, *, residual: bool = True) -> tuple[jax.Array, jax.Array]:
    """Accept the longest valid prefix of the drafts and pick the target's own next token.

    Args:
      logits: float32 ``[B, k + 1, vocab]``, the target's logits after the last accepted token
        (row 0) and after each draft (rows 1..k).
      drafts: int32 ``[B, k]``.
      draft_probs: float32 ``[B, k, vocab]``, the draft distribution ``q`` each draft was
        sampled from, or None for deterministic drafts (prompt lookup: ``q`` is a point mass).
        Unused when greedy.
      key: PRNG key (unused when greedy).
      sampling: greedy (temperature 0) or the sampling settings of the target.
      residual: see `SpeculativeConfig.residual`.

    Returns:
      ``(n, token)``: int32 ``[B]`` accepted draft count in ``0..k`` and int32 ``[B]`` the
      token after the accepted drafts. Greedy: ``n`` counts the leading drafts equal to the
      target's argmax, ``token`` is the argmax after them. Sampling: draft j is accepted with
      probability ``min(1, p_j(d_j) / q_j(d_j))`` while all before it were; ``token`` is drawn
      from ``norm(max(p_n - q_n, 0))`` after a rejection and from ``p_k`` after k acceptances,
      so that each emitted token is distributed as under the target alone.

    Source: Leviathan et al. 2023, Algorithm 1; Chen et al. 2023, Algorithm 2.
    """
    b, m, _ = logits.shape
    k = m - 1
    rows = jnp.arange(b)
    if sampling.temperature == 0.0:
        target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, M]
        n = jnp.sum(jnp.cumprod(drafts == target[:, :k], axis=1), axis=1).astype(jnp.int32)
        return n, target[rows, n]
    k_u, k_s = jax.random.split(key)
    p = target_probs(logits, sampling)  # [B, M, V]
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, k]
    if draft_probs is None:
        q_d = jnp.ones_like(p_d)
        q_all = jax.nn.one_hot(drafts, p.shape[-1], dtype=p.dtype)
    else:
        q_d = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
        q_all = draft_probs
    u = jax.random.uniform(k_u, (b, k), jnp.float32)
    ok = u * q_d < p_d  # probability min(1, p/q)
    n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
    p_n = p[rows, n]  # [B, V]
    if residual:
        q_n = jnp.where((n < k)[:, None], q_all[rows, jnp.minimum(n, k - 1)], 0.0)
        r = jnp.maximum(p_n - q_n, 0.0)
        r = jnp.where(jnp.sum(r, axis=-1, keepdims=True) > 0, r, p_n)  # p == q to rounding: any p-sample is right
    else:
        r = p_n
    token = jax.random.categorical(k_s, jnp.log(r), axis=-1).astype(jnp.int32)
    return n, token


# ------------------------------------------------------------------ drafting


def ngram_drafts(hist: jax.Array, hist_len: jax.Array, num_draft: int, max_ngram: int = 3,
                 min_ngram: int = 1) -> jax.Array:
    """Prompt-lookup drafts: the continuation of the row's last n-gram where it occurred before.

    Args:
      hist: int32 ``[B, H]``, each row's tokens (prompt, then output so far), left-aligned.
      hist_len: int32 ``[B]``, how many tokens of each row are real (>= 1).
      num_draft: k.
      max_ngram, min_ngram: n-gram sizes tried; the longest size with an earlier occurrence
        wins, and among its occurrences the most recent one.

    Returns:
      int32 ``[B, k]``: the k tokens that followed the match. A continuation running into the
      end of the history continues by copying (a repeating loop keeps repeating); a row without
      any match drafts its last token k times.

    Source: transformers ``PromptLookupCandidateGenerator`` (prompt lookup decoding, A. Saxena
    2023), vLLM's n-gram proposer.
    """
    b, h = hist.shape
    pos = jnp.arange(h)
    start = hist_len - 1  # no match: repeat the last token
    for n in range(min_ngram, max_ngram + 1):  # a longer match overrides a shorter one
        idx = jnp.clip(hist_len[:, None] - n + jnp.arange(n), 0, h - 1)
        suffix = jnp.take_along_axis(hist, idx, axis=1)  # [B, n]
        match = (pos[None, :] + n < hist_len[:, None]) & (hist_len[:, None] > n)
        for i in range(n):
            window = jnp.pad(hist[:, i:], ((0, 0), (0, i)), constant_values=-1)  # window[:, p] = hist[:, p + i]
            match &= window == suffix[:, i:i + 1]
        last = jnp.max(jnp.where(match, pos[None, :], -1), axis=1)
        start = jnp.where(last >= 0, last + n, start)
    ext = jnp.concatenate([hist, jnp.zeros((b, num_draft), hist.dtype)], axis=1)
    rows = jnp.arange(b)
    drafts = []
    for j in range(num_draft):  # start + j < hist_len + j: a known token or an earlier draft
        d = ext[rows, start + j]
        ext = ext.at[rows, hist_len + j].set(d)
        drafts.append(d)
    return jnp.stack(drafts, axis=1).astype(jnp.int32)


def draft_tokens(draft: CausalLM, cache: KVCache, token: jax.Array, pending: jax.Array, pending_token: jax.Array,
                 active: jax.Array, key: jax.Array, sampling: SamplingConfig,
                 num_draft: int) -> tuple[jax.Array, jax.Array | None, KVCache]:
    """Draft ``num_draft`` tokens with the draft model, one cached forward each.

    Args:
      draft: the draft `CausalLM`.
      cache: its `KVCache`, holding every accepted token before ``token`` except a pending one.
      token: int32 ``[B]``, the last accepted token (not in either cache yet).
      pending, pending_token: bool / int32 ``[B]``: the last draft of the previous step, accepted
        and so in the target's cache but never fed to the draft; fed now together with
        ``token`` (a 2-token forward), or masked out where ``pending`` is False.
      active: bool ``[B]``; finished rows write only invalid slots.
      key: PRNG key (sampling).
      sampling: greedy (argmax drafts) or the sampling settings (drafts sampled from ``q``).

    Returns:
      ``(drafts, q, cache)``: int32 ``[B, k]``; float32 ``[B, k, vocab]`` (None when greedy);
      the cache with ``k + 1`` new slots at its old ``index``: the pending token, ``token``
      and drafts 1..k-1 (`rollback` keeps the accepted ones).
    """
    greedy = sampling.temperature == 0.0

    def pick(logits, key):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
        z = sampling_logits(logits, sampling)
        return jax.random.categorical(key, z, axis=-1).astype(jnp.int32), jax.nn.softmax(z, axis=-1)

    ids = jnp.stack([pending_token, token], axis=1)
    mask = jnp.stack([pending & active, active], axis=1)
    hidden, cache = draft.hidden_states(ids, mask, cache=cache)
    keys = jax.random.split(key, num_draft)
    d, q = pick(draft.logits(hidden[:, -1]), keys[0])
    if num_draft == 1:
        return d[:, None], None if greedy else q[:, None], cache

    def body(carry, key):
        d, cache = carry
        hidden, cache = draft.hidden_states(d[:, None], active[:, None], cache=cache)
        nxt, q = pick(draft.logits(hidden[:, -1]), key)
        return (nxt, cache), (nxt, q)

    (_, cache), (ds, qs) = jax.lax.scan(body, (d, cache), keys[1:])
    drafts = jnp.concatenate([d[:, None], ds.T], axis=1)
    if greedy:
        return drafts, None, cache
    return drafts, jnp.concatenate([q[:, None], jnp.moveaxis(qs, 0, 1)], axis=1), cache


# ------------------------------------------------------------------ the cache


def rollback(cache: KVCache, start: jax.Array, keep: jax.Array) -> KVCache:
    """Forget rejected tokens: of the ``M`` slots each row b wrote at ``start[b]`` (int32
    ``[B]``), keep those where ``keep`` (bool ``[B, M]``) and the slot was valid; each row's
    ``index`` moves to just after its last kept slot (``start[b]`` when none). K/V stay;
    invalid slots are masked everywhere and overwritten later. Returns the new `KVCache`."""
    m = keep.shape[1]
    rows = jnp.arange(keep.shape[0])[:, None]
    cols = start[:, None] + jnp.arange(m)[None, :]
    old = cache.valid.at[rows, cols].get(mode="fill", fill_value=False)
    kept = old & keep
    valid = cache.valid.at[rows, cols].set(kept, mode="drop")
    used = jnp.max(jnp.where(kept, jnp.arange(1, m + 1)[None, :], 0), axis=1)
    return cache.replace(valid=valid, index=(start + used).astype(jnp.int32))


def compact_cache(cache: KVCache) -> KVCache:
    """Move each row's valid slots to the front (in order), so that the free slots are at the
    end; each row's ``index`` becomes its valid count. Positions, which come from the count of
    valid slots, and attention, which sees only valid slots, do not change. One gather of the
    whole cache: ``k``/``v`` ``[layers, B, S, Hkv, D]``."""
    order = jnp.argsort(~cache.valid, axis=1, stable=True)  # valid slots first, in slot order
    take = lambda x: jnp.take_along_axis(x, order[None, :, :, None, None], axis=2)  # noqa: E731
    count = jnp.sum(cache.valid, axis=1, dtype=jnp.int32)
    valid = jnp.arange(cache.max_len)[None, :] < count[:, None]
    return cache.replace(k=take(cache.k), v=take(cache.v), valid=valid, index=count)


def _fit(cache: KVCache, m: int) -> KVCache:
    """The cache, compacted first when ``m`` more slots at some row's ``index`` would not fit."""
    return jax.lax.cond(jnp.any(cache.index + m > cache.max_len), compact_cache, lambda c: c, cache)


def cache_slots(prompt_len: int, max_new_tokens: int, num_draft: int) -> int:
    """Slots of the target's and the draft's cache for speculative decoding: the prompt bucket,
    the new tokens and k more (one step writes k + 1 slots after at most ``max_new_tokens - 1``
    accepted ones)."""
    return prompt_len + max_new_tokens + num_draft


# ------------------------------------------------------------------ the loop


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _draft_prefill(graphdef, state, input_ids, attention_mask, *, max_len):
    """The draft model's cache filled with the (left-padded) prompt."""
    model = inference_model(graphdef, state)
    cache = KVCache.init(model.config, input_ids.shape[0], max_len, model.dtype)
    return model.hidden_states(input_ids, attention_mask, cache=cache)[1]


class SpeculativeStats(NamedTuple):
    """Counts of one speculative generation, per row (int ``[B]``) unless said otherwise.

    Attributes:
      steps: verification steps the row took part in (target forwards of k + 1 tokens).
      drafted: draft tokens proposed to the row (k per step).
      accepted: draft tokens accepted (each step also emits one token of the target's own).
      lengths: int ``[k + 1]``, over all rows and steps: how often 0, 1, ..., k drafts were
        accepted.
    """

    steps: Any
    drafted: Any
    accepted: Any
    lengths: Any


class SpecState(NamedTuple):
    """What the speculative loop carries from one chunk to the next, besides the caches (small:
    not donated, so the host can read a chunk's ``n_out``/``done`` after queuing the next).

    Attributes:
      token: int32 ``[B]``, each row's last accepted token (in neither cache yet).
      pending, pending_tok: bool / int32 ``[B]``, see `draft_tokens` (method ``"draft"``).
      hist, hist_len: int32 ``[B, H]`` / ``[B]``, prompt and output so far (method
        ``"ngram"``; None otherwise).
      out: int32 ``[B, max_new_tokens + k + 1]``, the new tokens, ``pad_id`` after them.
      n_out: int32 ``[B]``, new tokens per row so far.
      done: bool ``[B]``, the row hit EOS or ``max_new_tokens``.
      keys: PRNG keys ``[B]`` (`jaxqlora.decode.prefill`'s); the loop draws from the first.
      stats: `SpeculativeStats` so far.
    """

    token: Any
    pending: Any
    pending_tok: Any
    hist: Any
    hist_len: Any
    out: Any
    n_out: Any
    done: Any
    keys: Any
    stats: Any


def speculative_start(first: np.ndarray, keys, hist, hist_len, *, max_new_tokens: int, num_draft: int,
                      eos_ids: tuple[int, ...], pad_id: int) -> SpecState:
    """The loop's first `SpecState` from the prefill's first tokens (``first`` int32 ``[B]``, on
    the host) and PRNG ``keys [B]``; ``hist``/``hist_len`` for prompt lookup or None. Built with
    NumPy, so that starting compiles nothing."""
    b = first.shape[0]
    m = num_draft + 1
    out = np.full((b, max_new_tokens + m), pad_id, np.int32)
    out[:, 0] = first
    zeros = np.zeros((b,), np.int32)
    done = np.isin(first, np.asarray(eos_ids, np.int32)) | (max_new_tokens <= 1)
    return SpecState(token=first.astype(np.int32), pending=np.zeros((b,), bool),
                     pending_tok=np.full((b,), pad_id, np.int32), hist=hist, hist_len=hist_len, out=out,
                     n_out=np.ones((b,), np.int32), done=done, keys=keys,
                     stats=SpeculativeStats(zeros, zeros, zeros, np.zeros((m,), np.int32)))


@functools.partial(jax.jit, static_argnames=("graphdef", "draft_graphdef", "steps", "max_new_tokens", "sampling",
                                             "eos_ids", "pad_id", "spec"), donate_argnames=("cache", "draft_cache"))
def speculative_chunk(graphdef, state, draft_state, cache, draft_cache, st: SpecState, *, draft_graphdef, steps,
                      max_new_tokens, sampling, eos_ids, pad_id, spec):
    """``steps`` speculative steps (draft k, verify k + 1 in one forward, accept, roll back) over
    every row: a ``lax.fori_loop`` with a static trip count, like `jaxqlora.decode.decode_chunk`,
    so the device runs the chunk without reading a predicate back to the host. Finished rows
    (``st.done``) are masked: they write only invalid slots and emit nothing, so running a
    chunk past the end changes no output. Returns ``(cache, draft_cache, SpecState)``;
    ``cache``/``draft_cache`` (the target's and the draft's `KVCache`) are donated."""
    def models():
        # merged inside the loop body, as `jaxqlora.decode.decode_chunk` does: the layers
        # write their (LoRA dropout) RNG state back, which must happen at the body's trace level
        model = inference_model(graphdef, state)
        if model.scan_layers is None:  # k + 1 rows read the weights as one-token decoding does: unrolled
            model.scan_layers = False
        draft = None if draft_graphdef is None else inference_model(draft_graphdef, draft_state)
        return model, draft

    k = spec.num_draft
    m = k + 1
    b = st.token.shape[0]
    rows = jnp.arange(b)
    j = jnp.arange(m)[None, :]
    eos = jnp.asarray(eos_ids, jnp.int32)

    def body(_, c):
        cache, dcache, st = c
        token, pending, pending_tok, hist, hlen, out, n_out, done, keys, stats = (
            st.token, st.pending, st.pending_tok, st.hist, st.hist_len, st.out, st.n_out, st.done, st.keys, st.stats)
        model, draft = models()
        active = ~done
        key, k_draft, k_accept = jax.random.split(keys[0], 3)
        cache = _fit(cache, m)
        if draft is None:
            drafts, q = ngram_drafts(hist, hlen, k, spec.max_ngram, spec.min_ngram), None
        else:
            dcache = _fit(dcache, m)
            dstart = dcache.index
            drafts, q, dcache = draft_tokens(draft, dcache, token, pending, pending_tok, active, k_draft, sampling, k)
        start = cache.index
        hidden, cache = model.hidden_states(jnp.concatenate([token[:, None], drafts], axis=1), cache=cache)
        n, nxt = accept(model.logits(hidden), drafts, q, k_accept, sampling, residual=spec.residual)
        keep = jnp.where(active, n + 1, 0)
        cache = rollback(cache, start, j < keep[:, None])
        if draft is not None:  # slot 0: the pending token; slots 1..k: token, drafts 1..k-1
            dcache = rollback(dcache, dstart, (j == 0) | ((j <= n[:, None] + 1) & active[:, None]))
            pending, pending_tok = active & (n == k), drafts[:, k - 1]
        # emitted: the accepted drafts, then the target's token; cut at max_new_tokens and at EOS
        emitted = jnp.where(j < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
        count = jnp.minimum(keep, max_new_tokens - n_out)
        is_eos = jnp.isin(emitted, eos) & (j < count[:, None])
        hit = jnp.any(is_eos, axis=1)
        count = jnp.where(hit, jnp.argmax(is_eos, axis=1) + 1, count)
        vals = jnp.where(j < count[:, None], emitted, pad_id)
        out = out.at[rows[:, None], n_out[:, None] + j].set(vals, mode="drop")
        if hist is not None:
            hist = hist.at[rows[:, None], hlen[:, None] + j].set(vals, mode="drop")
            hlen = hlen + count
        n_out = n_out + count
        stats = SpeculativeStats(stats.steps + active, stats.drafted + k * active,
                                 stats.accepted + jnp.where(active, n, 0),
                                 stats.lengths + jnp.sum(jax.nn.one_hot(n, m, dtype=jnp.int32) * active[:, None], 0))
        done = done | hit | (n_out >= max_new_tokens)
        st = SpecState(token=jnp.where(active, nxt, pad_id), pending=pending, pending_tok=pending_tok, hist=hist,
                       hist_len=hlen, out=out, n_out=n_out, done=done, keys=keys.at[0].set(key), stats=stats)
        return cache, dcache, st

    return jax.lax.fori_loop(0, steps, body, (cache, draft_cache, st))


class SpeculativeResult(NamedTuple):
    """What `speculative_decode` returns.

    Attributes:
      tokens: int32 ``[B, max_new_tokens]``: the new tokens, ``pad_id`` after a row's EOS and
        in unused columns.
      columns: int, how many columns any row used.
      stats: `SpeculativeStats` (NumPy).
      cache: the target's final `KVCache` (valid slots: the prompt, then the output except its
        last token, and possibly accepted tokens beyond ``max_new_tokens``).
      draft_cache: the draft model's final `KVCache`, or None.
    """

    tokens: np.ndarray
    columns: int
    stats: SpeculativeStats
    cache: KVCache
    draft_cache: KVCache | None


def _history(rows: list[list[int]], first: np.ndarray, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's real prompt tokens and first new token, left-aligned in ``[B, width]``, and their counts."""
    hist = np.full((len(rows), width), pad_id, np.int32)
    for i, r in enumerate(rows):
        hist[i, :len(r)] = r
        hist[i, len(r)] = first[i]
    return hist, np.asarray([len(r) + 1 for r in rows], np.int32)


def _loop_key(batch, prompt_len, max_new_tokens, sampling, eos_ids, pad_id, graphdef, draft_graphdef, spec):
    from jaxqlora.compile import BucketKey

    return BucketKey("speculative", (batch, cache_slots(prompt_len, max_new_tokens, spec.num_draft)),
                     (SPEC_CHUNK, max_new_tokens, sampling, eos_ids, pad_id, graphdef, draft_graphdef, spec))


def _chunk_kwargs(draft_graphdef, max_new_tokens, sampling, eos_ids, pad_id, spec) -> dict:
    return dict(draft_graphdef=draft_graphdef, steps=SPEC_CHUNK, max_new_tokens=max_new_tokens, sampling=sampling,
                eos_ids=eos_ids, pad_id=pad_id, spec=spec)


def _draftprefill_key(batch, prompt_len, max_new_tokens, draft_graphdef, spec):
    from jaxqlora.compile import BucketKey

    return BucketKey("draft_prefill", (batch, prompt_len), (cache_slots(prompt_len, max_new_tokens, spec.num_draft),
                                                            draft_graphdef))


def speculative_jobs(model: CausalLM, draft_model: CausalLM | None, batch: int, prompt_len: int, max_new_tokens: int,
                     sampling: SamplingConfig, eos_ids: tuple[int, ...], pad_id: int, spec: SpeculativeConfig) -> dict:
    """`jaxqlora.compile.Job`s for one prompt bucket of speculative generation: the target's
    prefill (with the larger cache, `cache_slots`), the draft model's prefill (method
    ``"draft"``) and the speculative loop, keyed by `jaxqlora.compile.BucketKey`.
    ``model``/``draft_model`` may be abstract (``nnx.eval_shape``)."""
    from jaxqlora.compile import Job, abstract

    graphdef, state = nnx.split(model)
    state = abstract(state)
    max_len = cache_slots(prompt_len, max_new_tokens, spec.num_draft)
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
    row = jax.ShapeDtypeStruct((batch,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    seed = jax.ShapeDtypeStruct((), jnp.int32)
    jobs = {prefill_key(batch, prompt_len, max_len - prompt_len, sampling, graphdef): Job(
        prefill, (graphdef, state, tokens, tokens, seed), dict(max_len=max_len, sampling=sampling))}
    cache = cache_spec(model.config, batch, max_len, model.dtype)
    draft_graphdef = draft_state = draft_cache = hist = hist_len = None
    if spec.method == "draft":
        draft_graphdef, draft_state = nnx.split(draft_model)
        draft_state = abstract(draft_state)
        draft_cache = cache_spec(draft_model.config, batch, max_len, draft_model.dtype)
        jobs[_draftprefill_key(batch, prompt_len, max_new_tokens, draft_graphdef, spec)] = Job(
            _draft_prefill, (draft_graphdef, draft_state, tokens, tokens), dict(max_len=max_len))
    else:
        hist, hist_len = jax.ShapeDtypeStruct((batch, max_len + 1), jnp.int32), row
    first = np.zeros((batch,), np.int32)
    st = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), speculative_start(
        first, None, None, None, max_new_tokens=max_new_tokens, num_draft=spec.num_draft, eos_ids=eos_ids,
        pad_id=pad_id))
    st = st._replace(keys=key, hist=hist, hist_len=hist_len)
    jobs[_loop_key(batch, prompt_len, max_new_tokens, sampling, eos_ids, pad_id, graphdef, draft_graphdef, spec)] = Job(
        speculative_chunk, (graphdef, state, draft_state, cache, draft_cache, st),
        _chunk_kwargs(draft_graphdef, max_new_tokens, sampling, eos_ids, pad_id, spec))
    return jobs


def speculative_decode(model: CausalLM, input_ids, attention_mask, *, max_new_tokens: int,
                       spec: SpeculativeConfig, draft_model: CausalLM | None = None,
                       sampling: SamplingConfig = SamplingConfig(), seed: int = 0, eos_ids: tuple[int, ...] = (),
                       pad_id: int = 0, executables=None, timings: dict | None = None) -> SpeculativeResult:
    """Speculative decoding of left-padded prompts: prefill(s), then the compiled loop.

    Args:
      model: the target `CausalLM`.
      input_ids, attention_mask: int32 ``[B, P]``, prompts left-padded to ``P`` (a prompt
        bucket), mask 1 on real tokens.
      max_new_tokens: new tokens per row at most (the first comes from the prefill).
      spec: a `SpeculativeConfig`.
      draft_model: the draft `CausalLM` when ``spec.method == "draft"``.
      sampling: greedy or sampling settings (`SamplingConfig`).
      seed: PRNG seed.
      eos_ids: a row stops after emitting any of these.
      pad_id: fills the output after a row stops.
      executables: `jaxqlora.compile.Executables` holding `speculative_jobs`' programs
        (`jaxqlora.generate.precompile_generate` with ``speculative=``); None jits on first use.
      timings: a dict that receives ``prefill_s``, the seconds until the prefill(s) finished
        (waiting for them costs a synchronisation), or None.

    Returns:
      A `SpeculativeResult`.

    Raises:
      ValueError: ``spec.method == "draft"`` without a draft model, or a draft model with
        another vocabulary size (`check_draft_model`).
      BucketError: ``executables`` lack one of the programs (and do not allow new buckets).
    """
    from jaxqlora.compile import call_executable

    ids, mask = np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32)
    b, p = ids.shape
    if spec.method == "draft":
        if draft_model is None:
            raise ValueError("speculative method 'draft' needs a draft model")
        check_draft_model(model, draft_model)
    eos_ids, pad_id = tuple(int(t) for t in eos_ids), int(pad_id)
    max_len = cache_slots(p, max_new_tokens, spec.num_draft)
    graphdef, state = nnx.split(model)
    draft_graphdef = draft_state = None
    if spec.method == "draft":
        draft_graphdef, draft_state = nnx.split(draft_model)

    def jobs():
        return speculative_jobs(model, draft_model, b, p, max_new_tokens, sampling, eos_ids, pad_id, spec)

    t0 = time.perf_counter()
    dev = jax.device_put((ids, mask))
    first, cache, key = call_executable(executables, prefill_key(b, p, max_len - p, sampling, graphdef), jobs, prefill,
                              (state, *dev, np.int32(seed)), dict(max_len=max_len, sampling=sampling), graphdef)
    draft_cache = hist = hist_len = None
    if spec.method == "draft":
        draft_cache = call_executable(executables, _draftprefill_key(b, p, max_new_tokens, draft_graphdef, spec), jobs,
                            _draft_prefill, (draft_state, *dev), dict(max_len=max_len), draft_graphdef)
    first = np.asarray(jax.device_get(first))
    if spec.method != "draft":
        rows = [list(r[mk.astype(bool)]) for r, mk in zip(ids, mask)]
        hist, hist_len = _history(rows, first, max_len + 1, pad_id)
    if timings is not None:
        jax.block_until_ready(draft_cache)
        timings["prefill_s"] = time.perf_counter() - t0
    st = speculative_start(first, key, hist, hist_len, max_new_tokens=max_new_tokens, num_draft=spec.num_draft,
                           eos_ids=eos_ids, pad_id=pad_id)
    loop_key = _loop_key(b, p, max_new_tokens, sampling, eos_ids, pad_id, graphdef, draft_graphdef, spec)
    kwargs = _chunk_kwargs(draft_graphdef, max_new_tokens, sampling, eos_ids, pad_id, spec)

    def chunk(cache, draft_cache, st):
        return call_executable(executables, loop_key, jobs, speculative_chunk,
                               (state, draft_state, cache, draft_cache, st), kwargs, graphdef)

    # every step emits >= 1 token per unfinished row: max_new_tokens - 1 steps finish every row
    calls = -(-(max_new_tokens - 1) // SPEC_CHUNK)
    queued = chunk(cache, draft_cache, st) if calls > 0 and not st.done.all() else None
    made = 0
    while queued is not None:
        cache, draft_cache, st = queued
        made += 1
        queued = chunk(cache, draft_cache, st) if made < calls else None  # before this chunk's counts are read
        if np.asarray(jax.device_get(st.done)).all():
            if queued is not None:  # finished rows are masked: the queued chunk changes nothing
                cache, draft_cache, st = queued
            break
    out, n_out, stats = jax.device_get((st.out, st.n_out, st.stats))
    return SpeculativeResult(out[:, :max_new_tokens], int(np.max(n_out)), SpeculativeStats(*stats), cache,
                             draft_cache)
