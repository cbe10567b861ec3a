"""Text generation: prefill, then a decode loop compiled once, over a preallocated KV cache.

`generate` runs the whole decode loop as one ``lax.while_loop`` (stopping when every row
has produced an end-of-sequence token); `stream` runs the same loop in chunks of up to
`STREAM_CHUNK` tokens per compiled call, each queued before the previous one's tokens are
read, for interactive output. Prompts of different lengths
are left-padded into one batch, and the batch to a prompt-length bucket
(`jaxqlora.compile.PROMPT_BUCKETS`); the cache masks the padding.

`precompile_generate` compiles prefill, decode loop (or the chunked loop of `stream`)
for each prompt bucket ahead of time, from the model's shapes alone; given those
executables, `generate` and `stream` compile nothing, and a prompt needing a bucket that
was not compiled raises `jaxqlora.compile.BucketError`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxqlora.compile import (PROMPT_BUCKETS, BucketError, BucketKey, Executables, Job, abstract, bucket_for,
                              precompile)
from jaxqlora.errors import ContextLengthError
from jaxqlora.model import CausalLM, KVCache

# The cache is donated so the GPU updates it in place; the CPU backend cannot and warns.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


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


# ---------------------------------------------------------------- jitted pieces


def _inference_model(graphdef, state) -> CausalLM:
    """The model inside a jitted function, with dropout (LoRA) switched off."""
    model = nnx.merge(graphdef, state, copy=True)  # fresh Variables at this trace level (see _decode_loop)
    model.eval()
    return model


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "sampling"))
def _prefill(graphdef, state, input_ids, attention_mask, seed, *, max_len, sampling):
    """First token, filled cache and the PRNG key for decoding (``seed``: int32 scalar)."""
    model = _inference_model(graphdef, state)
    key, sub = jax.random.split(jax.random.key(seed))
    cache = KVCache.init(model.config, input_ids.shape[0], max_len, model.dtype)
    hidden, cache = model.hidden_states(input_ids, attention_mask, cache=cache)
    logits = model.logits(hidden[:, -1])
    return sample_token(logits, sub, sampling), cache, key


def _step(model, token, cache, key, sampling):
    hidden, cache = model.hidden_states(token[:, None], cache=cache)
    return sample_token(model.logits(hidden[:, -1]), key, sampling), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _decode_step(graphdef, state, token, cache, key, *, sampling):
    key, sub = jax.random.split(key)
    nxt, cache = _step(_inference_model(graphdef, state), token, cache, sub, sampling)
    return nxt, cache, key


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "eos_ids", "pad_id"),
                   donate_argnames=("cache",))
def _decode_loop(graphdef, state, first, cache, key, *, max_new_tokens, sampling, eos_ids, pad_id):
    b = first.shape[0]
    eos = jnp.asarray(eos_ids, jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)

    def cond(c):
        i, _, _, done, _, _ = c
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(c):
        i, token, cache, done, out, key = c
        key, sub = jax.random.split(key)
        # the model is merged inside the loop body: the layers write their (LoRA dropout) RNG
        # state back, which must happen at the body's trace level
        nxt, cache = _step(_inference_model(graphdef, state), token, cache, sub, sampling)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, cache, done | jnp.isin(nxt, eos), out, key

    n, _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, done, out, key))
    return out, n


STREAM_CHUNK = 32
"""The most tokens one `_stream_chunk` call makes (its output buffer); calls start with
fewer (4, 8, 16, then 32) so that the first pieces show quickly. Each call has a fixed
cost besides its tokens (on CPU the decode program converts every weight once per call,
about one token's time), which longer chunks spread."""


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_ids"), donate_argnames=("cache",))
def _stream_chunk(graphdef, state, token, cache, key, remaining, steps, *, sampling, eos_ids):
    """Up to ``min(steps, remaining)`` tokens after ``token`` (batch 1) in one compiled loop,
    stopping after an end-of-sequence token (none if ``token`` is one). ``steps`` and
    ``remaining`` are int32 scalars (no recompilation for other values; at most
    `STREAM_CHUNK` steps). Returns ``(tokens [STREAM_CHUNK] (-1 past the end), count, last
    token, cache, key, remaining - count)``: the last four feed the next call directly,
    so it can be queued before this one's tokens are read."""
    eos = jnp.asarray(eos_ids, jnp.int32)
    limit = jnp.minimum(jnp.minimum(steps, remaining), STREAM_CHUNK)

    def cond(c):
        i, token, _, _, _ = c
        return (i < limit) & ~jnp.any(jnp.isin(token, eos))

    def body(c):
        i, token, cache, key, out = c
        key, sub = jax.random.split(key)
        nxt, cache = _step(_inference_model(graphdef, state), token, cache, sub, sampling)  # as in _decode_loop
        return i + 1, nxt, cache, key, out.at[i].set(nxt[0])

    out = jnp.full((STREAM_CHUNK,), -1, jnp.int32)
    n, token, cache, key, out = jax.lax.while_loop(cond, body, (jnp.int32(0), token, cache, key, out))
    return out, n, token, cache, key, remaining - n


# ------------------------------------------------------------------- public API


def _is_single(prompts) -> bool:
    """A prompt is a string, a chat message list, or a list of token ids; else a batch."""
    return isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (dict, int, np.integer)))


def _encode_prompts(tokenizer, prompts) -> list[list[int]]:
    items = [prompts] if _is_single(prompts) else list(prompts)
    out = []
    for p in items:
        if isinstance(p, str):
            out.append(tokenizer.encode(p))
        elif p and isinstance(p[0], dict):
            out.append(tokenizer.encode(tokenizer.apply_chat_template(p, add_generation_prompt=True),
                                        add_special_tokens=False))
        else:
            out.append([int(t) for t in p])
        if not out[-1]:
            raise ValueError("empty prompt")
    return out


def _left_pad(rows: list[list[int]], pad_id: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), n), pad_id, np.int32)
    mask = np.zeros((len(rows), n), np.int32)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = r
        mask[i, n - len(r):] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def _eos_ids(tokenizer, ignore_eos: bool) -> tuple[int, ...]:
    return () if ignore_eos else tuple(sorted(int(t) for t in tokenizer.eos_token_ids))


def _prompt_bucket(executables: Executables | None, longest: int, prefill_key: BucketKey) -> int:
    """The prompt bucket: any of `PROMPT_BUCKETS` on the plain-jit path, else one of the
    precompiled prefill lengths of this batch size and these settings."""
    if not executables:
        return bucket_for(longest, PROMPT_BUCKETS, allow_new=True)
    have = executables.lengths("prefill",
                               lambda k: k.shape[0] == prefill_key.shape[0] and k.static == prefill_key.static)
    if not have and not executables.allow_new_buckets:
        raise BucketError(f"no prefill was precompiled for a batch of {prefill_key.shape[0]} with these settings "
                          f"(max_new_tokens, sampling, ignore_eos, model); precompiled: "
                          f"{sorted(str(k) for k in executables if k.kind == 'prefill') or 'none'}")
    return bucket_for(longest, have or PROMPT_BUCKETS, allow_new=executables.allow_new_buckets)


def _prepare(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, seed, executables,
             extra_slots: int = 0):
    rows = _encode_prompts(tokenizer, prompts)
    longest = max(len(r) for r in rows)
    ctx = model.config.max_position_embeddings
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if longest + max_new_tokens > ctx:
        raise ContextLengthError(
            f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {ctx} tokens (max_position_embeddings)")
    sampling = SamplingConfig(float(temperature), int(top_k or 0), float(top_p))
    graphdef, state = nnx.split(model)
    prompt_len = _prompt_bucket(executables, longest,
                                _prefill_key(len(rows), 0, max_new_tokens + extra_slots, sampling, graphdef))
    ids, mask = _left_pad(rows, _pad_id(tokenizer), prompt_len)
    return rows, ids, mask, sampling, graphdef, state, np.asarray(seed, np.int32), prompt_len


# ------------------------------------------------------------ executables


def _prefill_key(batch, prompt_len, max_new_tokens, sampling, graphdef) -> BucketKey:
    return BucketKey("prefill", (batch, prompt_len), (max_new_tokens, sampling, graphdef))


def _decode_key(batch, max_len, max_new_tokens, sampling, eos_ids, pad_id, graphdef) -> BucketKey:
    return BucketKey("decode", (batch, max_len), (max_new_tokens, sampling, eos_ids, pad_id, graphdef))


def _stream_key(max_len, sampling, eos_ids, graphdef) -> BucketKey:
    return BucketKey("stream", (1, max_len), (sampling, eos_ids, graphdef))


def _cache_spec(model_cfg, batch, max_len, dtype) -> KVCache:
    return jax.eval_shape(lambda: KVCache.init(model_cfg, batch, max_len, dtype))


def _generation_jobs(graphdef, state, model_cfg, dtype, batch, prompt_len, max_new_tokens, sampling, eos_ids, pad_id,
                     *, loop: bool = True, step: bool = False) -> dict[BucketKey, Job]:
    """Jobs compiling prefill, the decode loop and/or `stream`'s loop (``step``) for one prompt bucket."""
    state = abstract(state)
    max_len = prompt_len + max_new_tokens
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
    token = jax.ShapeDtypeStruct((batch,), jnp.int32)
    cache = _cache_spec(model_cfg, batch, max_len, dtype)
    key = jax.eval_shape(lambda: jax.random.key(0))
    seed = jax.ShapeDtypeStruct((), jnp.int32)
    jobs = {_prefill_key(batch, prompt_len, max_new_tokens, sampling, graphdef): Job(
        _prefill, (graphdef, state, tokens, tokens, seed), dict(max_len=max_len, sampling=sampling))}
    if loop:
        jobs[_decode_key(batch, max_len, max_new_tokens, sampling, eos_ids, pad_id, graphdef)] = Job(
            _decode_loop, (graphdef, state, token, cache, key),
            dict(max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id))
    if step:
        jobs[_stream_key(max_len, sampling, eos_ids, graphdef)] = Job(
            _stream_chunk, (graphdef, state, token, cache, key, seed, seed), dict(sampling=sampling, eos_ids=eos_ids))
    return jobs


def precompile_generate(model: CausalLM, tokenizer, *, batch_size: int = 1, prompt_lens=PROMPT_BUCKETS[:6],
                        max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                        ignore_eos: bool = False, stream: bool = False, allow_new_buckets: bool = False,
                        log=print, speculative=None, draft_model: CausalLM | None = None) -> Executables:
    """Compile generation ahead of time for ``batch_size`` prompts in each bucket of ``prompt_lens``.

    Args:
      model: a `CausalLM`, or its abstract twin (``nnx.eval_shape``; no weights needed).
      tokenizer: gives the end-of-sequence and padding ids.
      batch_size: number of prompts per call.
      prompt_lens: prompt-length buckets (tokens); prompts are left-padded to the next one.
        Default 16 ... 512.
      max_new_tokens, temperature, top_k, top_p, ignore_eos: as the later `generate` calls
        will pass them (they are compiled in).
      stream: compile `stream`'s loop instead of `generate`'s decode loop (batch size 1).
      allow_new_buckets: later calls needing another bucket compile it (logged) instead
        of raising `BucketError`.
      log: receives per-executable compile times.
      speculative, draft_model: compile speculative generation instead (as `generate` takes
        them; `jaxqlora.speculative.speculative_jobs`); ``draft_model`` may be abstract too.

    Returns:
      `Executables` to pass as ``executables=`` to `generate` / `stream`.
    """
    sampling = SamplingConfig(float(temperature), int(top_k or 0), float(top_p))
    graphdef, state = nnx.split(model)
    out = Executables(allow_new_buckets=allow_new_buckets, log=log)
    jobs = {}
    if speculative is not None or draft_model is not None:
        from jaxqlora.speculative import speculative_config, speculative_jobs

        spec = speculative_config(speculative, draft_model)
        for p in sorted(set(prompt_lens)):
            jobs.update(speculative_jobs(model, draft_model, batch_size, p, max_new_tokens, sampling,
                                         _eos_ids(tokenizer, ignore_eos), _pad_id(tokenizer), spec))
        return precompile(jobs, into=out, desc="precompile speculative generate")
    for p in sorted(set(prompt_lens)):
        jobs.update(_generation_jobs(graphdef, state, model.config, model.dtype, batch_size, p, max_new_tokens,
                                     sampling, _eos_ids(tokenizer, ignore_eos), _pad_id(tokenizer),
                                     loop=not stream, step=stream))
    return precompile(jobs, into=out, desc="precompile generate")


def generation_memory(model: CausalLM, tokenizer, prompts, max_new_tokens: int = 128, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, *, stream: bool = False, weight_bytes: int | None = None,
                      log=lambda *_: None) -> tuple[dict, Executables]:
    """The device memory `generate` (or `stream`) needs for ``prompts``, before any weight is placed.

    Compiles prefill and the decode loop (``stream``: `stream`'s chunked loop) for the
    prompts' batch size and bucket from the model's shapes (``model`` may be abstract,
    ``nnx.eval_shape``) and reads XLA's memory analysis (`jaxqlora.memory.memory_estimate`):
    weights + KV cache (``2 x layers x batch x (bucket + max_new_tokens) x kv_heads x
    head_dim`` in the model's dtype) + the step's temporaries.

    Args:
      model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p: as `generate`.
      stream: estimate `stream` (one prompt) instead of `generate`.
      weight_bytes: the bytes the weights will really take (`jaxqlora.memory.
        checkpoint_device_bytes`) when ``model`` is a dense twin of a model kept quantized;
        None: the model's own state.
      log: receives compile times.

    Returns:
      ``(estimate, executables)``: the estimate (bytes; keys as `memory_estimate`), and the
      executables, which `generate` / `stream` can take when the real model has the same
      structure as ``model`` (`nnx.graphdef` equal; a plain checkpoint loaded with the dtype).
    """
    from jaxqlora.memory import memory_estimate, state_bytes

    rows = _encode_prompts(tokenizer, prompts)
    bucket = bucket_for(max(len(r) for r in rows), PROMPT_BUCKETS, allow_new=True)
    ex = precompile_generate(model, tokenizer, batch_size=len(rows), prompt_lens=(bucket,),
                             max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             stream=stream, allow_new_buckets=True, log=log)
    own = state_bytes(nnx.state(model))
    return memory_estimate(ex, own if weight_bytes is None else weight_bytes,
                           None if weight_bytes is None else (own, weight_bytes)), ex


def _call(executables: Executables | None, key: BucketKey, jobs, jitted, dynamic_args, static_kwargs, graphdef):
    """Run a precompiled executable (looked up by ``key``) or, without executables, the jitted function."""
    if not executables:
        return jitted(graphdef, *dynamic_args, **static_kwargs)
    return executables.lookup(key, lambda: jobs()[key])(*dynamic_args)


def generate(model: CausalLM, tokenizer, prompts, max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, return_ids: bool = False,
             ignore_eos: bool = False, executables: Executables | None = None, speculative=None,
             draft_model: CausalLM | None = None, return_stats: bool = False):
    """Generate a continuation for one prompt or a batch of prompts.

    Args:
      model: a `CausalLM`.
      tokenizer: a `jaxqlora.tokenizer.Tokenizer`.
      prompts: a string, a chat message list (``[{"role": "user", "content": ...}]``, the
        chat template is applied with the generation prompt), a list of token ids, or a
        list of any of these (a batch; rows of different lengths are left-padded).
      max_new_tokens: at most this many new tokens per row.
      temperature, top_k, top_p: see `SamplingConfig` (temperature 0 = greedy).
      seed: PRNG seed for sampling.
      return_ids: return the new token ids (lists, EOS included) instead of text.
      ignore_eos: always make ``max_new_tokens`` tokens (for benchmarks).
      executables: from `precompile_generate` with the same settings; then nothing is
        compiled here. Without them, each prompt bucket compiles on first use.
      speculative: speculative decoding (`jaxqlora.speculative`): ``"ngram"`` (prompt
        lookup), ``"draft"`` (needs ``draft_model``) or a
        `jaxqlora.speculative.SpeculativeConfig` (k = ``num_draft``, default 4). Greedy output
        equals plain greedy decoding; sampled output has the target's distribution.
      draft_model: a `CausalLM` sharing the tokenizer (same vocabulary size); alone it means
        ``speculative="draft"``.
      return_stats: also return a dict of statistics: ``new_tokens`` (emitted, EOS
        included), ``prefill_s``, ``decode_s`` (after the first token, read-back included),
        ``tokens_per_s`` (new tokens after the first over ``decode_s``, all rows), and with
        speculation ``steps`` (target forwards per row, summed), ``drafted``, ``accepted``,
        ``acceptance_rate`` (accepted / drafted), ``tokens_per_step`` and
        ``accept_lengths`` (how often 0..k drafts were accepted).

    Returns:
      The generated text (special tokens and the stop token removed); a list for a batch;
      ``(that, stats)`` with ``return_stats``.

    Raises:
      ContextLengthError: prompt length + max_new_tokens exceeds ``max_position_embeddings``.
      BucketError: ``executables`` lack this batch size, these settings, or a prompt
        bucket long enough (unless they allow new buckets).
      ValueError: empty prompt, bad sampling settings, or bad speculative settings (see
        `jaxqlora.speculative.speculative_config`, `jaxqlora.speculative.check_draft_model`).
    """
    spec = None
    if speculative is not None or draft_model is not None:
        from jaxqlora.speculative import speculative_config

        spec = speculative_config(speculative, draft_model)
    rows, ids, mask, sampling, graphdef, state, seed, prompt_len = _prepare(
        model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, seed, executables,
        spec.num_draft if spec else 0)
    b, max_len = len(rows), prompt_len + max_new_tokens
    eos_ids, pad_id = _eos_ids(tokenizer, ignore_eos), _pad_id(tokenizer)
    stats = {}
    t0 = time.perf_counter()
    if spec is not None:
        from jaxqlora.speculative import speculative_decode

        res = speculative_decode(model, ids, mask, max_new_tokens=max_new_tokens, spec=spec, draft_model=draft_model,
                                 sampling=sampling, seed=int(seed), eos_ids=eos_ids, pad_id=pad_id,
                                 executables=executables, timings=stats if return_stats else None)
        out, n = res.tokens, res.columns
        st = res.stats
        stats.update(steps=int(st.steps.sum()), drafted=int(st.drafted.sum()), accepted=int(st.accepted.sum()),
                     acceptance_rate=float(st.accepted.sum() / max(int(st.drafted.sum()), 1)),
                     accept_lengths=[int(v) for v in st.lengths])
    else:
        def jobs():
            return _generation_jobs(graphdef, state, model.config, model.dtype, b, prompt_len, max_new_tokens,
                                    sampling, eos_ids, pad_id)

        first, cache, key = _call(executables, _prefill_key(b, prompt_len, max_new_tokens, sampling, graphdef), jobs,
                                  _prefill, (state, *jax.device_put((ids, mask)), seed),
                                  dict(max_len=max_len, sampling=sampling), graphdef)
        if return_stats:
            jax.block_until_ready(first)
            stats["prefill_s"] = time.perf_counter() - t0
        out, n = _call(executables, _decode_key(b, max_len, max_new_tokens, sampling, eos_ids, pad_id, graphdef),
                       jobs, _decode_loop, (state, first, cache, key),
                       dict(max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id),
                       graphdef)
        out, n = jax.device_get((out, n))  # one read-back
    if return_stats:
        stats["decode_s"] = time.perf_counter() - t0 - stats["prefill_s"]
    out = out[:, : int(n)]
    results = []
    for row in out:
        toks = []
        for t in row:
            toks.append(int(t))
            if int(t) in eos_ids:
                break
        results.append(toks if return_ids else tokenizer.decode(
            [t for t in toks if t not in eos_ids], skip_special_tokens=True))
    results = results[0] if _is_single(prompts) else results
    if not return_stats:
        return results
    made = sum(_emitted(row, eos_ids, pad_id) for row in out)
    stats["new_tokens"] = made
    stats["tokens_per_s"] = (made - b) / stats["decode_s"] if stats["decode_s"] > 0 else float("nan")
    if spec is not None:
        stats["tokens_per_step"] = (made - b) / max(stats["steps"], 1)
    return results, stats


def _emitted(row, eos_ids, pad_id) -> int:
    """New tokens in one output row: up to and including its first EOS, else the whole row."""
    for i, t in enumerate(row):
        if int(t) in eos_ids:
            return i + 1
    return len(row)


def stream(model: CausalLM, tokenizer, prompt, max_new_tokens: int = 128, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           executables: Executables | None = None) -> Iterator[str]:
    """Yield the text of one prompt's continuation piece by piece, as tokens are made.

    Same arguments and errors as `generate` (one prompt only; ``executables`` from
    `precompile_generate(..., stream=True)`), and the same tokens. Decoding runs as a
    compiled loop of up to `STREAM_CHUNK` tokens per call (4, 8, 16, then 32), and each call
    is queued before the previous call's tokens are read back, so the device does not wait
    for the host; the program is the same for every chunk size and prompt of a bucket, and
    is kept in the persistent compilation cache. A piece is yielded once it decodes to
    whole characters.
    """
    rows, ids, mask, sampling, graphdef, state, seed, prompt_len = _prepare(
        model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, executables)
    if len(rows) != 1:
        raise ValueError("stream takes one prompt")
    max_len = prompt_len + max_new_tokens
    eos_ids = _eos_ids(tokenizer, False)

    def jobs():
        return _generation_jobs(graphdef, state, model.config, model.dtype, 1, prompt_len, max_new_tokens, sampling,
                                eos_ids, _pad_id(tokenizer), loop=False, step=True)

    token, cache, key = _call(executables, _prefill_key(1, prompt_len, max_new_tokens, sampling, graphdef), jobs,
                              _prefill, (state, *jax.device_put((ids, mask)), seed),
                              dict(max_len=max_len, sampling=sampling), graphdef)
    chunk_key = _stream_key(max_len, sampling, eos_ids, graphdef)

    def chunk(token, cache, key, remaining, steps):
        return _call(executables, chunk_key, jobs, _stream_chunk,
                     (state, token, cache, key, remaining, np.asarray(steps, np.int32)),
                     dict(sampling=sampling, eos_ids=eos_ids), graphdef)

    toks: list[int] = []
    shown = ""
    steps = 4
    # queued at once (it makes no token after an end-of-sequence one or when none is left)
    queued = chunk(token, cache, key, np.asarray(max_new_tokens - 1, np.int32), steps)
    pending = [int(np.asarray(token)[0])]
    while True:
        for t in pending:
            if t in eos_ids:
                return
            toks.append(t)
            text = tokenizer.decode(toks, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
                yield text[len(shown):]
                shown = text
        if len(toks) >= max_new_tokens:
            return
        out, n, token, cache, key, remaining = queued
        steps = min(2 * steps, STREAM_CHUNK)
        queued = chunk(token, cache, key, remaining, steps)  # queued before this chunk is read back
        out, n = jax.device_get((out, n))
        if int(n) == 0:
            return
        pending = [int(t) for t in out[: int(n)]]
