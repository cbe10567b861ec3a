"""The continuous-batching decode engine: a fixed number of decode slots over one stacked KV
cache ``[layers, max_batch, max_model_len, kv_heads, head_dim]``, requests prefilled and
inserted into free slots between decode steps, each slot freed the moment its request ends.

The shape is JetStream's (prefill, insert, generate) with Orca's iteration-level scheduling
(Yu et al. 2022) and chunked prefill (Agrawal et al. 2023, "SARATHI"): each iteration of the
engine thread

1. drops cancelled requests (their slots are free for the next step);
2. prefills about ``prefill_chunk`` prompt tokens (`jaxqlora.decode.prefill_chunk`: a chunk
   of up to ``prefill_batch`` prompts per call, each into its own slot's cache row), so a
   long prompt delays the running decodes by one chunk at most; a prompt whose last chunk
   is done is inserted (`jaxqlora.decode.insert`: its first token is sampled, its slot
   becomes active);
3. queues one decode call (`jaxqlora.decode.decode_chunk`, ``decode_steps`` tokens for every
   active slot, each with its own sampling settings, PRNG key and LoRA adapter), then reads
   back the previous call's tokens, so the device always has the next step queued.

Every program is compiled in `Engine.start` for the configured slot count, prefill buckets and
sampling modes (greedy-only, or per-row sampling with log-probabilities); after that the engine
compiles nothing. Tokens are turned into text, stop strings and stop ids are found, and
``max_tokens`` is counted on the host (`_Active`).

Sources: JetStream (google/JetStream, ``engine_api.py``), vLLM's scheduler and incremental
detokenizer (``vllm/transformers_utils/detokenizer_utils.py``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxqlora.compile import Executables, Job, abstract, precompile
from jaxqlora.decode import SlotState, cache_spec, decode_chunk, insert, prefill_chunk
from jaxqlora.errors import ContextLengthError
from jaxqlora.model import CausalLM, KVCache
from jaxqlora.serving.request import (MAX_LOGPROBS, EngineStoppedError, Output, QueueFullError, Request,
                                      RequestError, TokenLogprob, UnknownModelError)

log = logging.getLogger("jaxqlora.serving")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Sizes of the engine (everything is compiled for them).

    Attributes:
      max_batch: decode slots (requests decoded together).
      max_model_len: cache slots per request: prompt + ``max_tokens`` at most.
      max_queue: requests waiting for a slot at most; more are refused (`QueueFullError`).
      prefill_chunk: prompt tokens prefilled per engine iteration at most (a longer prompt is
        prefilled in chunks between decode steps).
      prefill_buckets: lengths a prompt's last chunk is padded to (None: powers of two from
        16 up to ``prefill_chunk``, and ``prefill_chunk``).
      decode_steps: tokens per decode call (a loop with a static trip count); 1 gives the
        lowest inter-token latency.
      prefill_batch: prompts prefilled together in one call at most (a prefill call reads
        every weight once, so several prompts per call cost less each; the decode steps wait
        longer behind it).
    """

    max_batch: int = 8
    max_model_len: int = 2048
    max_queue: int = 256
    prefill_chunk: int = 512
    prefill_buckets: tuple[int, ...] | None = None
    decode_steps: int = 1
    prefill_batch: int = 1

    def __post_init__(self):
        for name in ("max_batch", "max_model_len", "max_queue", "prefill_chunk", "decode_steps", "prefill_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)!r}")

    @property
    def row_buckets(self) -> tuple[int, ...]:
        """Decode batch sizes compiled: powers of two below ``max_batch``, and ``max_batch``.
        Requests take the lowest free slots, and each decode call runs the smallest size that
        covers the highest busy slot (`jaxqlora.decode.decode_chunk`'s ``rows``)."""
        return _powers_up_to(self.max_batch)

    @property
    def prefill_rows(self) -> tuple[int, ...]:
        """Prompts per prefill call compiled: powers of two below ``prefill_batch`` (at most
        ``max_batch``), and that."""
        return _powers_up_to(min(self.prefill_batch, self.max_batch))

    @property
    def chunk(self) -> int:
        """Prompt tokens per prefill call: ``prefill_chunk``, at most ``max_model_len``."""
        return min(self.prefill_chunk, self.max_model_len)

    @property
    def buckets(self) -> tuple[int, ...]:
        """The prefill lengths compiled (ascending; the last is `chunk`)."""
        if self.prefill_buckets:
            return tuple(sorted({min(int(b), self.chunk) for b in self.prefill_buckets} | {self.chunk}))
        out, b = [], 16
        while b < self.chunk:
            out.append(b)
            b *= 2
        return tuple(out) + (self.chunk,)


def _powers_up_to(n: int) -> tuple[int, ...]:
    out, r = [], 1
    while r < n:
        out.append(r)
        r *= 2
    return tuple(out) + (n,)


class _Active:
    """Host state of one admitted request: its slot, prefill progress, generated ids and
    the incremental detokenizer (vLLM's prefix/read offsets) with stop-string hold-back."""

    def __init__(self, request: Request, slot: int, adapter: int, eos_ids: frozenset[int]):
        self.request, self.slot, self.adapter = request, slot, adapter
        self.params = request.params
        self.prefilled = 0
        self.stop_ids = frozenset(self.params.stop_token_ids) | (frozenset() if self.params.ignore_eos else eos_ids)
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # detokenized so far
        self.sent = 0  # characters of text already sent
        self.completion_tokens = 0
        self.inflight = 0  # queued decode calls that include this request
        self.prompt_logprobs: list | None = [None] if self.params.prompt_logprobs else None
        self.first_event = True
        self.finished = False


class Engine:
    """Continuous batching over `jaxqlora.decode` with several LoRA adapters per batch.

    Args:
      model: a `CausalLM` without LoRA layers when ``adapters`` are given (they are attached
        with `jaxqlora.io.peft.load_adapters`), else any (an adapter already merged in or
        attached is served as the base).
      tokenizer: a `jaxqlora.tokenizer.Tokenizer`.
      config: `EngineConfig`.
      adapters: ``{name: PEFT adapter folder}`` served beside the base model.
      model_name: the base model's served name.

    Raises:
      ValueError: ``max_model_len`` above the model's ``max_position_embeddings``, an adapter
        name equal to the model name, or a model that has LoRA layers with ``adapters``.
      CheckpointError: a damaged adapter (naming its file).
    """

    def __init__(self, model: CausalLM, tokenizer, config: EngineConfig = EngineConfig(),
                 adapters: Mapping[str, str] | None = None, model_name: str = "model"):
        from jaxqlora.io.peft import load_adapters, read_task

        ctx = model.config.max_position_embeddings
        if config.max_model_len > ctx:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context of {ctx} tokens "
                             "(max_position_embeddings)")
        self.config, self.tokenizer, self.model_name = config, tokenizer, model_name
        adapters = dict(adapters or {})
        if model_name in adapters:
            raise ValueError(f"adapter name {model_name!r} is the base model's name")
        self._adapter_index = {model_name: 0}
        self._templates = {model_name: getattr(tokenizer, "chat_template", None)}
        if adapters:
            names = load_adapters(model, adapters)
            for i, name in enumerate(names[1:], start=1):
                self._adapter_index[name] = i
                task = read_task(adapters[name])
                self._templates[name] = (task or {}).get("chat_template") or self._templates[model_name]
        self.adapter_names = list(adapters)
        self._graphdef, self._state = nnx.split(model)
        self._model_cfg, self._dtype = model.config, model.dtype
        self._eos = frozenset(int(t) for t in tokenizer.eos_token_ids)
        self._vocab = model.config.vocab_size
        self._top_n = min(MAX_LOGPROBS, self._vocab)
        self._exec: Executables | None = None
        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancelled: set[str] = set()
        self._slots: list[_Active | None] = [None] * config.max_batch
        self._prefilling: list[_Active] = []
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stop = False
        self._abort_at: float | None = None
        self.error: BaseException | None = None

    # -------------------------------------------------------------- public API

    @property
    def num_running(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return sum(s is not None for s in self._slots)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiting)

    def chat_template(self, model: str) -> str | None:
        """The chat template of ``model`` (an adapter's recorded one, else the tokenizer's).

        Raises:
          UnknownModelError: ``model`` is neither the base nor an adapter.
        """
        if model not in self._templates:
            raise UnknownModelError(f"model {model!r} is not served; served: {', '.join(self._templates)}")
        return self._templates[model]

    def start(self, log_fn=None) -> None:
        """Compile every program (`jobs`), allocate the cache and start the engine thread."""
        self._exec = precompile(self.jobs(), log=log_fn or (lambda m: log.info(m)), desc="compile serving engine")
        cfg = self.config
        self._cache = KVCache.init(self._model_cfg, cfg.max_batch, cfg.max_model_len, self._dtype)
        self._dev_slots = jax.jit(SlotState.init, static_argnums=0)(cfg.max_batch)  # warmed here, never again
        self._active = np.zeros((cfg.max_batch,), bool)
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="jaxqlora-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue ``request`` (thread-safe); its callback then receives `Output` events.

        Raises:
          RequestError: an empty prompt or a token id outside the vocabulary.
          UnknownModelError: ``request.adapter`` is not served.
          ContextLengthError: prompt + ``max_tokens`` exceed ``max_model_len``.
          QueueFullError: ``max_queue`` requests are waiting.
          EngineStoppedError: the engine is not running (not started, shutting down, failed).
        """
        ids = request.prompt_ids
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        if any(not (0 <= int(t) < self._vocab) for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {self._vocab})", "prompt")
        name = request.adapter or self.model_name
        if name not in self._adapter_index:
            raise UnknownModelError(f"model {name!r} is not served; served: {', '.join(self._adapter_index)}")
        need = len(ids) + request.params.max_tokens
        if need > self.config.max_model_len:
            raise ContextLengthError(f"prompt of {len(ids)} tokens plus max_tokens={request.params.max_tokens} "
                                     f"exceeds max_model_len={self.config.max_model_len}")
        with self._lock:
            if not self._accepting:
                raise EngineStoppedError("the engine is not accepting requests" +
                                         (f" (it failed: {self.error})" if self.error else ""))
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (max_queue)")
            self._waiting.append(request)
            self._lock.notify()

    def cancel(self, request_id: str) -> None:
        """Abort a request (thread-safe): it ends with ``finish_reason="abort"`` and its slot is
        free within one decode step. Unknown or finished ids are ignored."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify()

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let running and waiting requests finish for up to ``grace_s``
        seconds, abort what is left, and join the engine thread."""
        with self._lock:
            self._accepting = False
            self._abort_at = time.monotonic() + grace_s
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    # -------------------------------------------------------------- programs

    def jobs(self) -> dict:
        """The engine's programs as `jaxqlora.compile.Job`s: a prefill chunk per bucket (and,
        for prompt log-probabilities, at ``prefill_chunk``), insert, and the decode call in
        its two modes (greedy-only; per-row sampling with log-probabilities) for each of
        `EngineConfig.row_buckets`; prefill and insert for each of `EngineConfig.prefill_rows`."""
        from jaxqlora.compile import BucketKey

        cfg = self.config
        g, state = self._graphdef, abstract(self._state)
        cache = cache_spec(self._model_cfg, cfg.max_batch, cfg.max_model_len, self._dtype)
        slots = jax.eval_shape(lambda: SlotState.init(cfg.max_batch))
        i32, f32 = (jax.ShapeDtypeStruct((), d) for d in (jnp.int32, jnp.float32))
        one = jax.ShapeDtypeStruct((1,), jnp.int32)
        jobs = {}
        for r in cfg.prefill_rows:
            vec = jax.ShapeDtypeStruct((r,), jnp.int32)
            for c in cfg.buckets:
                rows = jax.ShapeDtypeStruct((r, c), jnp.int32)
                args = (g, state, cache, vec, rows, vec, jax.ShapeDtypeStruct((r,), bool), vec, rows)
                jobs[BucketKey("prefill", (r, c), 0)] = Job(prefill_chunk, args, dict(top_n=0))
                if c == cfg.chunk and r == 1:  # prompt log-probabilities: one prompt per call
                    jobs[BucketKey("prefill", (r, c), self._top_n)] = Job(prefill_chunk, args,
                                                                          dict(top_n=self._top_n))
            logits = jax.ShapeDtypeStruct((r, self._vocab), jnp.float32)
            jobs[BucketKey("insert", (cfg.max_batch, r))] = Job(
                insert, (slots, i32, logits, i32, f32, i32, f32, jax.ShapeDtypeStruct((), jnp.uint32), i32),
                dict(top_n=self._top_n))
        for rows in cfg.row_buckets:
            for greedy in (True, False):
                jobs[BucketKey("decode", (rows, cfg.decode_steps), greedy)] = Job(
                    decode_chunk, (g, state, cache, slots, slots.active),
                    dict(steps=cfg.decode_steps, greedy_only=greedy, top_n=0 if greedy else self._top_n, rows=rows))
        return jobs

    def _call(self, kind, shape, static, *args):
        from jaxqlora.compile import BucketKey

        return self._exec[BucketKey(kind, shape, static)](*args)

    # -------------------------------------------------------------- the thread

    def _run(self) -> None:
        pending = None  # the queued decode call: (outputs, the _Active of each slot at dispatch)
        try:
            while True:
                with self._lock:
                    while (not self._waiting and not self._prefilling and not any(self._slots)
                           and not self._cancelled and not self._stop and pending is None):
                        self._lock.wait()
                    cancelled, self._cancelled = self._cancelled, set()
                    if self._abort_at is not None and time.monotonic() >= self._abort_at:
                        cancelled |= {r.request_id for r in self._waiting}
                        cancelled |= {a.request.request_id for a in self._slots if a is not None}
                    for r in [r for r in self._waiting if r.request_id in cancelled]:
                        self._waiting.remove(r)
                        self._emit_final(r, "abort")
                    admit = []
                    while self._waiting and None in self._slots:
                        r = self._waiting.popleft()
                        slot = self._slots.index(None)
                        a = _Active(r, slot, self._adapter_index[r.adapter or self.model_name], self._eos)
                        self._slots[slot] = a
                        admit.append(a)
                    done = self._stop and not self._waiting and not any(self._slots) and pending is None
                if done:
                    return
                for a in [a for a in self._slots if a is not None and a.request.request_id in cancelled]:
                    self._finish(a, "abort")
                self._prefilling.extend(admit)
                self._prefill_some()
                queued = self._dispatch_decode()
                if pending is not None:
                    self._read_decode(*pending)
                pending = queued
        except BaseException as e:  # the engine itself failed: fail every request, refuse new ones
            log.exception("serving engine failed")
            with self._lock:
                self.error, self._accepting = e, False
                waiting, self._waiting = list(self._waiting), collections.deque()
            for a in [a for a in self._slots if a is not None]:
                self._finish(a, "error", e)
            for r in waiting:
                self._emit_final(r, "error", e)

    def _prefill_some(self) -> None:
        """Prefill about ``prefill_chunk`` prompt tokens of the prefilling requests, in order:
        one call over up to ``prefill_batch`` of them (a chunk each), again while the calls so
        far stayed under ``prefill_chunk`` tokens; a prompt whose last chunk is done is
        inserted."""
        budget = self.config.chunk
        while budget > 0:
            self._prefilling = [a for a in self._prefilling if not a.finished]
            if not self._prefilling:
                return
            group = self._prefilling[:1]
            if not group[0].params.prompt_logprobs:  # a scored prompt goes alone
                more = [a for a in self._prefilling[1:] if not a.params.prompt_logprobs]
                group += more[:self.config.prefill_batch - 1]
            try:
                n, logits = self._prefill_group(group)
                budget -= n
            except Exception as e:  # noqa: BLE001 - the failure is these requests', not the engine's
                for a in group:
                    self._finish(a, "error", e)
                continue
            for i, a in enumerate(group):
                if a.prefilled == len(a.request.prompt_ids) and not a.finished:
                    self._prefilling.remove(a)
                    try:
                        self._insert(a, logits, i)
                    except Exception as e:  # noqa: BLE001
                        self._finish(a, "error", e)

    def _prefill_group(self, group: list[_Active]) -> int:
        """One `jaxqlora.decode.prefill_chunk` call: the next chunk of each request of
        ``group``, padded to a compiled row count (repeating the first request) and bucket;
        returns the real tokens prefilled and the chunks' last logits (``[R, vocab]``, on the
        device, for `_insert`)."""
        cfg = self.config
        logprobs = group[0].params.prompt_logprobs
        ns = [min(len(a.request.prompt_ids) - a.prefilled, cfg.chunk) for a in group]
        bucket = cfg.chunk if logprobs else next(b for b in cfg.buckets if b >= max(ns))
        r = next(x for x in cfg.prefill_rows if x >= len(group))
        tokens, nxt = np.zeros((r, bucket), np.int32), np.zeros((r, bucket), np.int32)
        slots, n_real, adapter = np.zeros((r,), np.int32), np.ones((r,), np.int32), np.zeros((r,), np.int32)
        reset = np.zeros((r,), bool)
        afters = []
        for i in range(r):
            j = i if i < len(group) else 0  # padding repeats the first row, whole
            a, n = group[j], ns[j]
            ids = a.request.prompt_ids
            tokens[i, :n] = ids[a.prefilled:a.prefilled + n]
            after = ids[a.prefilled + 1:a.prefilled + n + 1]
            nxt[i, :len(after)] = after
            slots[i], n_real[i], adapter[i], reset[i] = a.slot, n, a.adapter, a.prefilled == 0
            afters.append(after)
        out = self._call("prefill", (r, bucket), self._top_n if logprobs else 0, self._state, self._cache,
                         slots, tokens, n_real, reset, adapter, nxt)
        self._cache, logits = out[0], out[1]
        if logprobs:
            a, after = group[0], afters[0]
            lp, top_ids, top_lp = jax.device_get(out[2:])
            k = a.params.logprobs or 0
            for i in range(len(after)):
                a.prompt_logprobs.append(TokenLogprob(int(after[i]), float(lp[0, i]), tuple(
                    (int(t), float(v)) for t, v in zip(top_ids[0, i, :k], top_lp[0, i, :k]))))
        for a, n in zip(group, ns):
            a.prefilled += n
        return sum(ns), logits

    def _insert(self, a: _Active, logits, row: int) -> None:
        p = a.params
        if p.max_tokens == 0:  # scoring only (echo): no token is made
            self._emit(a, [], [], finished=True, reason="length")
            self._release(a)
            return
        seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(4), "little")
        self._dev_slots, token, lp, top_ids, top_lp = self._call(
            "insert", (self.config.max_batch, logits.shape[0]), (), self._dev_slots, np.int32(a.slot),
            logits, np.int32(row), np.float32(p.temperature), np.int32(p.top_k), np.float32(p.top_p), np.uint32(seed % 2**32),
            np.int32(a.adapter))
        token, lp, top_ids, top_lp = jax.device_get((token, lp, top_ids, top_lp))
        self._active[a.slot] = True
        self._tokens(a, [int(token)], [(float(lp), top_ids, top_lp)])

    def _dispatch_decode(self):
        """Queue one decode call over the slots that may still need a token (a request whose
        queued calls already reach its ``max_tokens`` sits this one out), in the smallest
        compiled row bucket; None when no slot needs one."""
        cfg = self.config
        active = self._active.copy()
        for slot, a in enumerate(self._slots):
            if active[slot] and a.completion_tokens + a.inflight * cfg.decode_steps >= a.params.max_tokens:
                active[slot] = False
        if not active.any():
            return None
        rows = next(r for r in cfg.row_buckets if r > int(np.flatnonzero(active)[-1]))
        greedy = not any(a is not None and active[i] and (a.params.temperature > 0 or a.params.logprobs is not None)
                         for i, a in enumerate(self._slots))
        out = self._call("decode", (rows, cfg.decode_steps), greedy, self._state, self._cache, self._dev_slots,
                         active)
        self._cache, self._dev_slots = out[0], out[1]
        for slot in np.flatnonzero(active):
            self._slots[slot].inflight += 1
        return out[2:], list(self._slots), active

    def _read_decode(self, out, owners, active) -> None:
        host = jax.device_get(out)
        toks = host[0]
        for slot, a in enumerate(owners):
            if a is None or not active[slot]:
                continue
            a.inflight -= 1
            if a.finished:
                continue  # finished or cancelled since this call was queued
            lps = None
            if len(host) > 1:
                lps = [(float(host[1][slot, i]), host[2][slot, i], host[3][slot, i]) for i in range(toks.shape[1])]
            self._tokens(a, [int(t) for t in toks[slot]], lps)

    # -------------------------------------------------------------- per request

    def _tokens(self, a: _Active, tokens: list[int], lps) -> None:
        """New tokens of ``a``: stop ids, ``max_tokens``, text with stop strings; one event."""
        try:
            p = a.params
            new, new_lps, reason = [], [], None
            for i, t in enumerate(tokens):
                a.completion_tokens += 1
                if t in a.stop_ids:
                    reason = "stop"
                    break
                new.append(t)
                if lps is not None and p.logprobs is not None:
                    lp, ids, vals = lps[i]
                    new_lps.append(TokenLogprob(t, lp, tuple((int(x), float(v))
                                                             for x, v in zip(ids[:p.logprobs], vals[:p.logprobs]))))
                if a.completion_tokens >= p.max_tokens:
                    reason = "length"
                    break
            if a.request.fault and a.completion_tokens > 1:
                raise RuntimeError("injected fault (testing the server's fault isolation)")
            text, stopped = self._detokenize(a, new, final=reason is not None)
            if stopped:
                reason = "stop"
            self._emit(a, new, new_lps if p.logprobs is not None else None, finished=reason is not None,
                       reason=reason, text=text)
            if reason is not None:
                self._release(a)
        except Exception as e:  # noqa: BLE001 - fails this request only
            self._finish(a, "error", e)

    def _detokenize(self, a: _Active, new: list[int], final: bool) -> tuple[str, bool]:
        """The text to send for ``new`` ids (vLLM's incremental detokenization: decode from a
        prefix offset so that byte-level and SentencePiece merges come out right; an
        incomplete UTF-8 character is held back), cut at the first stop string; text that
        may be the start of a stop string is held back until it is not (or the end)."""
        a.ids.extend(new)
        if new:
            prefix = self.tokenizer.decode(a.ids[a.prefix_offset:a.read_offset], skip_special_tokens=True)
            full = self.tokenizer.decode(a.ids[a.prefix_offset:], skip_special_tokens=True)
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                a.text += full[len(prefix):]
                a.prefix_offset, a.read_offset = a.read_offset, len(a.ids)
        stops = a.params.stop
        end = len(a.text)
        stopped = False
        for s in stops:
            at = a.text.find(s, max(0, a.sent - len(s) + 1))
            if at != -1 and at < end:
                end, stopped = at, True
        if not stopped and not final:
            for s in stops:  # hold back a suffix that may begin a stop string
                for k in range(min(len(s) - 1, end - a.sent), 0, -1):
                    if a.text.endswith(s[:k]):
                        end = min(end, len(a.text) - k)
                        break
        out = a.text[a.sent:end] if end > a.sent else ""
        a.sent = max(a.sent, end)
        return out, stopped

    def _emit(self, a: _Active, tokens, lps, *, finished: bool, reason: str | None, text: str = "") -> None:
        out = Output(a.request.request_id, token_ids=list(tokens), text=text, logprobs=lps,
                     prompt_logprobs=a.prompt_logprobs if a.first_event else None, finished=finished,
                     finish_reason=reason, prompt_tokens=len(a.request.prompt_ids),
                     completion_tokens=a.completion_tokens)
        a.first_event = False
        a.finished = finished
        a.request.callback(out)

    def _finish(self, a: _Active, reason: str, error: BaseException | None = None) -> None:
        """End ``a`` now (abort or error) and free its slot."""
        if a.finished:
            return
        a.finished = True
        self._release(a)
        self._emit_final(a.request, reason, error, a.completion_tokens)

    def _emit_final(self, r: Request, reason: str, error: BaseException | None = None, completion: int = 0) -> None:
        try:
            r.callback(Output(r.request_id, finished=True, finish_reason=reason, error=error,
                              prompt_tokens=len(r.prompt_ids), completion_tokens=completion))
        except Exception:  # noqa: BLE001 - a broken callback must not stop the engine
            log.exception("callback of %s failed", r.request_id)

    def _release(self, a: _Active) -> None:
        a.finished = True
        if self._slots[a.slot] is a:
            self._slots[a.slot] = None
            self._active[a.slot] = False
        if a in self._prefilling:
            self._prefilling.remove(a)
        with self._lock:
            self._lock.notify()
