"""What a serving request asks for and what the engine hands back: the contract between
`jaxqlora.serving.engine.Engine` and its callers (the HTTP server, `generate`, `stream`).

A `Request` is prompt token ids + `SamplingParams` + an optional adapter name. The engine
reports progress by calling the request's callback with `Output` events from its own thread:
zero or more events with new tokens, then exactly one event with ``finished=True`` (which may
carry tokens too). Text in events is the detokenized delta of the new tokens, with stop strings
removed and held back while a stop string may still be forming (so concatenating every event's
``text`` gives the final completion text).

Field names follow the OpenAI completions API and vLLM's ``SamplingParams``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

from jaxqlora.errors import JaxQLoRAError

MAX_LOGPROBS = 20
"""The most alternatives per token `SamplingParams.logprobs` may ask for (OpenAI's
``top_logprobs`` limit)."""

_ids = itertools.count()


class RequestError(JaxQLoRAError, ValueError):
    """A request field is out of range or inconsistent (HTTP 400).

    Attributes:
      param: the request field concerned (OpenAI's ``error.param``), e.g. ``"temperature"``.
    """

    def __init__(self, message: str, param: str | None = None):
        self.param = param
        super().__init__(message)


class UnknownModelError(JaxQLoRAError, LookupError):
    """A request names a model (base or adapter) the engine does not serve (HTTP 404)."""


class QueueFullError(JaxQLoRAError, RuntimeError):
    """The engine's waiting queue holds ``max_queue`` requests already (HTTP 503)."""


class EngineStoppedError(JaxQLoRAError, RuntimeError):
    """The engine is shutting down or has stopped and takes no new request (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI completions / vLLM ``SamplingParams`` names).

    Attributes:
      max_tokens: new tokens at most (0: none; with ``prompt_logprobs`` that scores the prompt).
      temperature: 0 = greedy (argmax); else logits are divided by it.
      top_p: nucleus sampling mass in (0, 1]; 1 = off.
      top_k: keep the k most likely tokens; 0 = off.
      seed: PRNG seed of this request's samples (same seed, same prompt, same settings: same
        tokens, whatever else is in the batch); None = a fresh one.
      stop: strings that end the completion (not included in the text).
      stop_token_ids: token ids that end the completion besides the model's EOS ids.
      ignore_eos: do not stop at the model's EOS ids (benchmarks).
      logprobs: with each new token, its log-probability and this many most likely
        alternatives (0..`MAX_LOGPROBS`); None = no log-probabilities.
      prompt_logprobs: the log-probability of every prompt token given the ones before it
        (the first token has none) and ``logprobs or 0`` alternatives: OpenAI ``echo`` with
        ``logprobs``, what lm-evaluation-harness loglikelihood tasks ask.

    Log-probabilities are those of the model's distribution (float32 ``log_softmax`` of the
    logits, before temperature, top-k and top-p), as vLLM reports them.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self):
        def bad(msg, param):
            raise RequestError(msg, param)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            bad(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}", "max_tokens")
        if not (0.0 <= float(self.temperature) <= 100.0):
            bad(f"temperature must be in [0, 100], got {self.temperature!r}", "temperature")
        if not (0.0 < float(self.top_p) <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}", "top_k")
        if self.seed is not None and not (isinstance(self.seed, int) and -2**63 <= self.seed < 2**64):
            bad(f"seed must be an integer, got {self.seed!r}", "seed")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop must be non-empty strings", "stop")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}", "logprobs")


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the most likely alternatives at its position.

    Attributes:
      token_id: the token.
      logprob: its natural-log probability (float32 ``log_softmax``).
      top: ``(token_id, logprob)`` pairs, most likely first (as many as asked).
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass
class Output:
    """One progress event of a request (see the module docstring).

    Attributes:
      request_id: the `Request`'s id.
      token_ids: the new tokens of this event (an EOS or stop token id is not included).
      text: their text (a stop string and what follows it removed; UTF-8 held back until whole).
      logprobs: one `TokenLogprob` per id in ``token_ids`` when the request asked, else None.
      prompt_logprobs: on the first event only, when asked: one entry per prompt token, None
        for the first.
      finished: the last event of the request.
      finish_reason: on the last event: ``"stop"`` (EOS, stop token or stop string),
        ``"length"`` (``max_tokens`` reached), ``"abort"`` (cancelled, or not finished
        within a shutdown's grace period) or ``"error"``.
      error: the exception that failed the request (``finish_reason == "error"``).
      prompt_tokens: prompt length in tokens.
      completion_tokens: new tokens so far (an EOS or stop token counted, as vLLM does).
    """

    request_id: str
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: BaseException | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclasses.dataclass
class Request:
    """A completion request for the engine.

    Attributes:
      prompt_ids: the prompt's token ids (non-empty).
      params: `SamplingParams`.
      callback: called from the engine's thread with each `Output` (must not block; an
        exception it raises fails the request).
      adapter: name of a LoRA adapter the engine serves, or None for the base model.
      request_id: unique id (default: ``"req-<n>"``).
      fault: testing only: the engine raises inside this request's processing after its
        first token (the fault-isolation test of the server).
    """

    prompt_ids: list[int]
    params: SamplingParams
    callback: Callable[[Output], None]
    adapter: str | None = None
    request_id: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")
    fault: bool = False
