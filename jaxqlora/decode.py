"""The decode loop's device side, shared by `jaxqlora.generate` (``generate``, ``stream``),
`jaxqlora.speculative` and the serving engine (`jaxqlora.serving.engine`): one place where a
token is sampled and one cached decode step is taken.

- `SamplingConfig`, `sampling_logits`, `sample_token`: one setting for a whole batch.
- `SlotState` and `sample_rows`: per-row settings (temperature, top-k, top-p, PRNG key,
  adapter, active) for batches whose rows are independent requests.
- `prefill`: a left-padded batch of prompts into a fresh cache; `prefill_chunk`: a chunk of
  one prompt into one row of a shared cache (chunked prefill).
- `decode_chunk`: ``steps`` cached one-token steps over every row, a loop with a static trip
  count (``lax.fori_loop``: no host round trip per token; the caller reads tokens once per
  chunk and masks what a row made after it finished).

Sources: nucleus sampling (Holtzman et al. 2019); the prefill / insert / generate shape of
JetStream and continuous batching (Yu et al. 2022, "Orca").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxqlora.model import CausalLM, KVCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked.

    Attributes:
      temperature: 0 for greedy (argmax); otherwise logits are divided by it.
      top_k: keep the k most likely tokens (0 = all).
      top_p: keep the smallest set of tokens whose probability sums to at least top_p
        (nucleus sampling, Holtzman et al. 2019; 1.0 = all).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sampling_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """The logits `sample_token` samples from: divided by the temperature, top-k and top-p
    filtered (removed tokens at ``-inf``). float32 ``[..., vocab]`` in and out.

    Raises:
      ValueError: greedy settings (temperature 0: no distribution).
    """
    if cfg.temperature == 0.0:
        raise ValueError("greedy decoding (temperature 0) has no sampling distribution")
    shape = logits.shape
    logits = logits.reshape(-1, shape[-1]) / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        sorted_logits = jnp.where(before >= cfg.top_p, -jnp.inf, sorted_logits)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return logits.reshape(shape)


def sample_token(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Pick one token per row from float32 ``logits [B, vocab]``; returns int32 ``[B]``."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, sampling_logits(logits, cfg), axis=-1).astype(jnp.int32)


# ------------------------------------------------------------ per-row sampling


@flax.struct.dataclass
class SlotState:
    """The per-row state of a decode batch (every field ``[B]``).

    Attributes:
      tokens: int32, each row's last token (the next step's input).
      keys: PRNG keys (``jax.random.key``), each row's own stream: a request's samples do not
        depend on the other rows.
      temperature: float32, 0 = greedy.
      top_k: int32, 0 = off.
      top_p: float32, 1 = off.
      adapter: int32, the LoRA adapter of the row (0 = base; see
        `jaxqlora.io.peft.load_adapters`).
      active: bool; an inactive row's cache row is left as it is (no slot written, ``index``
        kept) and its tokens are to be ignored.
    """

    tokens: jax.Array
    keys: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    adapter: jax.Array
    active: jax.Array

    @classmethod
    def init(cls, batch: int) -> "SlotState":
        """``batch`` inactive greedy rows."""
        return cls(tokens=jnp.zeros((batch,), jnp.int32), keys=jax.random.split(jax.random.key(0), batch),
                   temperature=jnp.zeros((batch,), jnp.float32), top_k=jnp.zeros((batch,), jnp.int32),
                   top_p=jnp.ones((batch,), jnp.float32), adapter=jnp.zeros((batch,), jnp.int32),
                   active=jnp.zeros((batch,), bool))


def sample_rows(logits: jax.Array, slots: SlotState, greedy_only: bool) -> tuple[jax.Array, jax.Array]:
    """One token per row of float32 ``logits [B, vocab]`` with each row's own settings.

    Greedy rows (temperature 0) take the argmax; the others sample from the temperature-scaled
    distribution restricted to the ``top_k`` most likely tokens (ties broken by index), then to
    the smallest prefix of those, by probability, whose mass reaches ``top_p``. Every row's key
    advances once per call, whether it samples or not.

    Args:
      logits: float32 ``[B, vocab]``.
      slots: the rows' `SlotState`.
      greedy_only: every row is greedy (static): argmax alone, no sort.

    Returns:
      ``(tokens int32 [B], next keys [B])``.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    split = jax.vmap(lambda k: jax.random.split(k))(slots.keys)
    keys, subs = split[:, 0], split[:, 1]
    if greedy_only:
        return greedy, keys
    vocab = logits.shape[-1]
    z = logits / jnp.where(slots.temperature > 0, slots.temperature, 1.0)[:, None]
    order = jnp.argsort(-z, axis=-1, stable=True)
    zs = jnp.take_along_axis(z, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    zs = jnp.where((slots.top_k[:, None] == 0) | (rank < slots.top_k[:, None]), zs, -jnp.inf)
    probs = jax.nn.softmax(zs, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    zs = jnp.where((before < slots.top_p[:, None]) | (rank == 0), zs, -jnp.inf)
    pick = jax.vmap(lambda k, l: jax.random.categorical(k, l))(subs, zs)
    sampled = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(slots.temperature > 0, sampled, greedy), keys


def token_logprobs(logits: jax.Array, tokens: jax.Array, top_n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities of the model's distribution (float32 ``log_softmax`` of ``logits
    [..., vocab]``, before any sampling setting): of ``tokens [...]``, and the ``top_n`` most
    likely ``(ids int32 [..., top_n], logprobs [..., top_n])``."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(lp, top_n)
    return chosen, top_ids.astype(jnp.int32), top_lp


# ------------------------------------------------------------ jitted pieces


def inference_model(graphdef, state) -> CausalLM:
    """The model inside a jitted function, with dropout (LoRA) switched off."""
    model = nnx.merge(graphdef, state, copy=True)  # fresh Variables at this trace level (loop bodies)
    model.eval()
    return model


def cache_spec(model_cfg, batch: int, max_len: int, dtype: Any) -> KVCache:
    """The abstract `KVCache` (``jax.ShapeDtypeStruct`` leaves) of ``batch`` rows of ``max_len`` slots."""
    return jax.eval_shape(lambda: KVCache.init(model_cfg, batch, max_len, dtype))


def prefill_key(batch: int, prompt_len: int, max_new_tokens: int, sampling: SamplingConfig, graphdef):
    """The `jaxqlora.compile.BucketKey` of `prefill`'s executable for this batch and bucket."""
    from jaxqlora.compile import BucketKey

    return BucketKey("prefill", (batch, prompt_len), (max_new_tokens, sampling, graphdef))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "sampling"))
def prefill(graphdef, state, input_ids, attention_mask, seed, *, max_len, sampling):
    """Left-padded prompts ``input_ids, attention_mask [B, P]`` into a fresh cache of
    ``max_len`` slots: ``(first token int32 [B], cache, PRNG keys [B])``: each row's own key
    for what follows (`SlotState.keys`); ``seed``: int32 scalar; one ``sampling`` setting for
    the batch."""
    model = inference_model(graphdef, state)
    key, sub = jax.random.split(jax.random.key(seed))
    cache = KVCache.init(model.config, input_ids.shape[0], max_len, model.dtype)
    hidden, cache = model.hidden_states(input_ids, attention_mask, cache=cache)
    logits = model.logits(hidden[:, -1])
    return sample_token(logits, sub, sampling), cache, jax.random.split(key, input_ids.shape[0])


@functools.partial(jax.jit, static_argnames=("graphdef", "top_n"), donate_argnames=("cache",))
def prefill_chunk(graphdef, state, cache, slots, tokens, n_real, reset, adapter, next_ids, *, top_n):
    """One chunk of each of R prompts into rows ``slots`` of the shared ``cache`` (chunked
    prefill, several prompts per call).

    Args:
      cache: the `KVCache` of every decode row (donated: updated in place; the R rows are
        gathered, run and scattered back).
      slots: int32 ``[R]``, the rows (a repeated row must repeat its whole input: padding).
      tokens: int32 ``[R, C]``, the chunks, each right-padded after ``n_real[r]`` tokens.
      n_real: int32 ``[R]``, real tokens per chunk (>= 1).
      reset: bool ``[R]``: a prompt's first chunk (its row is emptied first).
      adapter: int32 ``[R]``, the rows' LoRA adapters.
      next_ids: int32 ``[R, C]``, the token after each position (for ``top_n``).
      top_n: static; > 0 also returns the prompts' log-probabilities (`token_logprobs` of
        ``next_ids`` at each position and the ``top_n`` alternatives: ``[R, C]``, ``[R, C,
        top_n]``).

    Returns:
      ``(cache, logits float32 [R, vocab] of each chunk's last real token)``, plus the three
      log-probability arrays when ``top_n``. Each row's ``index`` ends after its real tokens
      (the padding's slots are written, invalid, and overwritten by what comes next).
    """
    model = inference_model(graphdef, state)
    rows = KVCache(k=cache.k[:, slots], v=cache.v[:, slots], valid=cache.valid[slots], index=cache.index[slots])
    rows = rows.replace(valid=jnp.where(reset[:, None], False, rows.valid), index=jnp.where(reset, 0, rows.index))
    start = rows.index
    mask = (jnp.arange(tokens.shape[1])[None, :] < n_real[:, None]).astype(jnp.int32)
    hidden, rows = model.hidden_states(tokens, mask, cache=rows, adapter=adapter)
    cache = KVCache(k=cache.k.at[:, slots].set(rows.k), v=cache.v.at[:, slots].set(rows.v),
                    valid=cache.valid.at[slots].set(rows.valid), index=cache.index.at[slots].set(start + n_real))
    last = model.logits(hidden[jnp.arange(tokens.shape[0]), n_real - 1])
    if not top_n:
        return cache, last
    return (cache, last) + token_logprobs(model.logits(hidden), next_ids, top_n)


@functools.partial(jax.jit, static_argnames=("top_n",), donate_argnames=("slots",))
def insert(slots: SlotState, slot, logits, row, temperature, top_k, top_p, seed, adapter, *, top_n):
    """Start row ``slot`` of a decode batch from its prompt's last logits, row ``row`` of
    ``logits [R, vocab]`` (`prefill_chunk`'s output): set its
    settings (scalars), its PRNG key (``jax.random.key(seed)``, ``seed`` uint32), sample its
    first token and mark it active. Returns ``(slots, token, logprob, top ids [top_n], top
    logprobs [top_n])``."""
    logits = jax.lax.dynamic_index_in_dim(logits, row, 0, keepdims=False)
    one = SlotState(tokens=slots.tokens[:1], keys=jax.random.key(seed)[None], temperature=temperature[None],
                    top_k=top_k[None], top_p=top_p[None], adapter=adapter[None], active=jnp.ones((1,), bool))
    token, key = sample_rows(logits[None], one, greedy_only=False)
    lp, top_ids, top_lp = token_logprobs(logits[None], token, top_n)
    upd = lambda x, v: x.at[slot].set(v[0])  # noqa: E731
    slots = SlotState(tokens=upd(slots.tokens, token), keys=upd(slots.keys, key),
                      temperature=upd(slots.temperature, one.temperature), top_k=upd(slots.top_k, one.top_k),
                      top_p=upd(slots.top_p, one.top_p), adapter=upd(slots.adapter, one.adapter),
                      active=upd(slots.active, one.active))
    return slots, token[0], lp[0], top_ids[0], top_lp[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "greedy_only", "top_n", "rows"),
                   donate_argnames=("cache", "slots"))
def decode_chunk(graphdef, state, cache, slots, active, *, steps, greedy_only, top_n, rows=None):
    """``steps`` cached one-token decode steps over every row: THE decode loop.

    A ``lax.fori_loop`` with a static trip count: the device runs the whole chunk without the
    host (no per-token predicate read back). Rows where ``active`` (bool ``[B]``) is False
    write nothing and keep their ``index``; rows that finish inside the chunk (EOS, a stop
    token) go on to its end, and the caller drops what they made after finishing.

    Args:
      cache: `KVCache` ``[layers, B, S, ...]`` (donated). Writes past S are dropped.
      slots: `SlotState` (donated); ``active`` overrides its field.
      steps: tokens per row (static).
      greedy_only: every active row is greedy (static; argmax alone).
      top_n: > 0: also the log-probability of each token and the ``top_n`` alternatives.
      rows: static; decode only rows ``0 .. rows-1`` (None: all B). The serving engine keeps
        its requests in the lowest slots and picks the smallest compiled ``rows`` that covers
        them, so a lone request costs a batch-1 step, not a ``max_batch`` one; the cache's
        K/V stay whole and are written in place.

    Returns:
      ``(cache, slots, tokens int32 [R, steps])`` (R = ``rows`` or B), plus ``(logprobs [R,
      steps], top ids [R, steps, top_n], top logprobs [R, steps, top_n])`` when ``top_n``.
    """
    full_b = slots.tokens.shape[0]
    if rows is None or rows >= full_b:
        return _decode_steps(graphdef, state, cache, slots, active, steps, greedy_only, top_n)
    cut = lambda x: x[:rows]  # noqa: E731
    part_cache, part_slots, *out = _decode_steps(
        graphdef, state, cache.replace(valid=cut(cache.valid), index=cut(cache.index)), jax.tree.map(cut, slots),
        cut(active), steps, greedy_only, top_n)  # K/V stay whole: rows < R are written in place
    cache = part_cache.replace(valid=cache.valid.at[:rows].set(part_cache.valid),
                               index=cache.index.at[:rows].set(part_cache.index))
    slots = jax.tree.map(lambda full, part: full.at[:rows].set(part), slots, part_slots)
    return (cache, slots, *out)


def _decode_steps(graphdef, state, cache, slots, active, steps, greedy_only, top_n):
    """`decode_chunk`'s loop over every row of ``slots`` (traced inside it)."""
    b = slots.tokens.shape[0]
    slots = slots.replace(active=active)
    out = [jnp.zeros((b, steps), jnp.int32)]
    if top_n:
        out += [jnp.zeros((b, steps), jnp.float32), jnp.zeros((b, steps, top_n), jnp.int32),
                jnp.zeros((b, steps, top_n), jnp.float32)]

    def body(i, carry):
        cache, slots, out = carry
        # merged inside the loop body: the layers write their (LoRA dropout) RNG state back,
        # which must happen at the body's trace level
        model = inference_model(graphdef, state)
        hidden, new = model.hidden_states(slots.tokens[:, None], active[:, None].astype(jnp.int32), cache=cache,
                                          adapter=slots.adapter)
        cache = new.replace(index=jnp.where(active, new.index, cache.index))
        logits = model.logits(hidden[:, -1])
        token, keys = sample_rows(logits, slots, greedy_only)
        slots = slots.replace(tokens=jnp.where(active, token, slots.tokens), keys=keys)
        values = [token] + (list(token_logprobs(logits, token, top_n)) if top_n else [])
        return cache, slots, [o.at[:, i].set(v) for o, v in zip(out, values)]

    cache, slots, out = jax.lax.fori_loop(0, steps, body, (cache, slots, out))
    return (cache, slots, *out)
