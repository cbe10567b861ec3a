"""Text generation: prefill, then the shared decode loop, over a preallocated KV cache.

`generate` prefills the prompts as one left-padded batch (`jaxqlora.decode.prefill`), then
runs `jaxqlora.decode.decode_chunk` (the decode loop of the whole code base, shared with the
serving engine) in chunks of `DECODE_CHUNK` tokens with a static trip count, each chunk queued
before the previous one's tokens are read, so the device does not wait for the host; the host
stops at each row's end-of-sequence token. `stream` does the same with chunks of
`STREAM_CHUNK` tokens and yields text as it comes. Prompts of different lengths are
left-padded into one batch, and the batch to a prompt-length bucket
(`jaxqlora.compile.PROMPT_BUCKETS`); the cache masks the padding.

`precompile_generate` compiles prefill and the decode chunk for each prompt bucket ahead of
time, from the model's shapes alone; given those executables, `generate` and `stream` compile
nothing, and a prompt needing a bucket that was not compiled raises
`jaxqlora.compile.BucketError`.
"""

from __future__ import annotations

import time
import warnings
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxqlora.compile import (PROMPT_BUCKETS, BucketError, BucketKey, Executables, Job, abstract, bucket_for,
                              call_executable, precompile)
from jaxqlora.decode import (SamplingConfig, SlotState, cache_spec, decode_chunk, prefill, prefill_key,
                             sample_token, sampling_logits)
from jaxqlora.errors import ContextLengthError
from jaxqlora.model import CausalLM

# The cache is donated so the GPU updates it in place; the CPU backend cannot and warns.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


# The sampling settings and the jitted pieces live in `jaxqlora.decode` (shared with the
# serving engine and speculative decoding); re-exported here for the public API.
__all__ = ["SamplingConfig", "sample_token", "sampling_logits", "generate", "stream", "precompile_generate",
           "generation_memory", "DECODE_CHUNK", "STREAM_CHUNK"]

DECODE_CHUNK = 16
"""Tokens per compiled decode call of `generate` (`jaxqlora.decode.decode_chunk`, a loop with
a static trip count): the host reads tokens and checks for EOS once per chunk, with the next
chunk already queued, so the device never waits for the host; a row that finishes inside a
chunk wastes at most the rest of it."""

STREAM_CHUNK = 4
"""Tokens per compiled decode call of `stream` (each queued before the previous one's tokens
are read back): small, so that pieces show as they are made."""


# ------------------------------------------------------------------- public API


def _is_single(prompts) -> bool:
    """A prompt is a string, a chat message list, or a list of token ids; else a batch."""
    return isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (dict, int, np.integer)))


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """Token ids of each prompt (what `generate` takes: a string, a chat message list (the
    chat template with the generation prompt), token ids, or a list of any of these).

    Raises:
      ValueError: an empty prompt.
    """
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
    rows = encode_prompts(tokenizer, prompts)
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
                                prefill_key(len(rows), 0, max_new_tokens + extra_slots, sampling, graphdef))
    ids, mask = _left_pad(rows, _pad_id(tokenizer), prompt_len)
    return rows, ids, mask, sampling, graphdef, state, np.asarray(seed, np.int32), prompt_len


# ------------------------------------------------------------ executables


def _decode_key(batch, max_len, steps, greedy, graphdef) -> BucketKey:
    return BucketKey("decode", (batch, max_len), (steps, greedy, graphdef))


def _generation_jobs(graphdef, state, model_cfg, dtype, batch, prompt_len, max_new_tokens, sampling,
                     *, loop: bool = True, step: bool = False) -> dict[BucketKey, Job]:
    """Jobs compiling prefill and the decode chunk of `generate` (``loop``, `DECODE_CHUNK`
    steps) and/or of `stream` (``step``, `STREAM_CHUNK` steps) for one prompt bucket."""
    state = abstract(state)
    max_len = prompt_len + max_new_tokens
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
    seed = jax.ShapeDtypeStruct((), jnp.int32)
    jobs = {prefill_key(batch, prompt_len, max_new_tokens, sampling, graphdef): Job(
        prefill, (graphdef, state, tokens, tokens, seed), dict(max_len=max_len, sampling=sampling))}
    cache = cache_spec(model_cfg, batch, max_len, dtype)
    slots = jax.eval_shape(lambda: SlotState.init(batch))
    greedy = sampling.temperature == 0.0
    for steps in ([DECODE_CHUNK] if loop else []) + ([STREAM_CHUNK] if step else []):
        jobs[_decode_key(batch, max_len, steps, greedy, graphdef)] = Job(
            decode_chunk, (graphdef, state, cache, slots, slots.active),
            dict(steps=steps, greedy_only=greedy, top_n=0))
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
                                     sampling, loop=not stream, step=stream))
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

    rows = encode_prompts(tokenizer, prompts)
    bucket = bucket_for(max(len(r) for r in rows), PROMPT_BUCKETS, allow_new=True)
    ex = precompile_generate(model, tokenizer, batch_size=len(rows), prompt_lens=(bucket,),
                             max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             stream=stream, allow_new_buckets=True, log=log)
    own = state_bytes(nnx.state(model))
    return memory_estimate(ex, own if weight_bytes is None else weight_bytes,
                           None if weight_bytes is None else (own, weight_bytes)), ex


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
                                    sampling)

        first, cache, key = call_executable(executables, prefill_key(b, prompt_len, max_new_tokens, sampling, graphdef), jobs,
                                  prefill, (state, *jax.device_put((ids, mask)), seed),
                                  dict(max_len=max_len, sampling=sampling), graphdef)
        if return_stats:
            jax.block_until_ready(first)
            stats["prefill_s"] = time.perf_counter() - t0
        rows_out = [[] for _ in range(b)]
        for new in _decode_rows(executables, jobs, graphdef, state, first, cache, key, sampling, max_len,
                                max_new_tokens, eos_ids, DECODE_CHUNK):
            for r, toks in zip(rows_out, new):
                r.extend(toks)
        n = max(len(r) for r in rows_out)
        out = np.full((b, n), pad_id, np.int32)
        for i, r in enumerate(rows_out):
            out[i, :len(r)] = r
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


def _decode_rows(executables, jobs, graphdef, state, first, cache, key, sampling: SamplingConfig, max_len: int,
                 max_new_tokens: int, eos_ids: tuple[int, ...], steps: int) -> Iterator[list[list[int]]]:
    """The host side of the decode loop for a batch that starts together: yields, per chunk,
    each row's new tokens (the first, from the prefill, in the first yield), cut after the
    row's EOS and at ``max_new_tokens``; stops when every row is done. Each
    `jaxqlora.decode.decode_chunk` call (``steps`` tokens) is queued before the previous
    one's tokens are read back; finished rows are switched off for the chunks after."""
    b = first.shape[0]
    greedy = sampling.temperature == 0.0
    slots = SlotState(tokens=first, keys=key, temperature=np.full((b,), sampling.temperature, np.float32),
                      top_k=np.full((b,), sampling.top_k, np.int32), top_p=np.full((b,), sampling.top_p, np.float32),
                      adapter=np.zeros((b,), np.int32), active=np.ones((b,), bool))
    key_ = _decode_key(b, max_len, steps, greedy, graphdef)
    eos = set(eos_ids)
    counts = [0] * b
    done = np.zeros((b,), bool)

    def take(row: int, toks) -> list[int]:
        kept = []
        for t in toks:
            if done[row]:
                break
            kept.append(int(t))
            counts[row] += 1
            done[row] = int(t) in eos or counts[row] >= max_new_tokens
        return kept

    def chunk(cache, slots, active):
        return call_executable(executables, key_, jobs, decode_chunk, (state, cache, slots, active),
                     dict(steps=steps, greedy_only=greedy, top_n=0), graphdef)

    first = np.asarray(jax.device_get(first))
    yield [take(i, [first[i]]) for i in range(b)]
    made = 1  # tokens per row so far, including ones made after a row finished
    queued = None if done.all() else chunk(cache, slots, np.ones((b,), bool))
    while queued is not None:
        cache, slots, toks = queued
        made += steps
        queued = None if made >= max_new_tokens else chunk(cache, slots, ~done)  # before this chunk is read
        toks = np.asarray(jax.device_get(toks))
        yield [take(i, toks[i]) for i in range(b)]
        if done.all():
            return


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
    `precompile_generate(..., stream=True)`), and the same tokens (sampled ones too: each
    row's PRNG key advances once per token whatever the chunk size). Decoding runs the shared
    decode chunk (`jaxqlora.decode.decode_chunk`) of `STREAM_CHUNK` tokens per call, each
    call queued before the previous call's tokens are read back, so the device does not wait
    for the host. A piece is yielded once it decodes to whole characters.
    """
    rows, ids, mask, sampling, graphdef, state, seed, prompt_len = _prepare(
        model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, executables)
    if len(rows) != 1:
        raise ValueError("stream takes one prompt")
    max_len = prompt_len + max_new_tokens
    eos_ids = _eos_ids(tokenizer, False)

    def jobs():
        return _generation_jobs(graphdef, state, model.config, model.dtype, 1, prompt_len, max_new_tokens, sampling,
                                loop=False, step=True)

    first, cache, key = call_executable(executables, prefill_key(1, prompt_len, max_new_tokens, sampling, graphdef), jobs,
                              prefill, (state, *jax.device_put((ids, mask)), seed),
                              dict(max_len=max_len, sampling=sampling), graphdef)
    toks: list[int] = []
    shown = ""
    for (new,) in _decode_rows(executables, jobs, graphdef, state, first, cache, key, sampling, max_len,
                               max_new_tokens, eos_ids, STREAM_CHUNK):
        for t in new:
            if t in eos_ids:
                return
            toks.append(t)
            text = tokenizer.decode(toks, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
                yield text[len(shown):]
                shown = text
