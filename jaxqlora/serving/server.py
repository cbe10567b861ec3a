"""The OpenAI-compatible HTTP API on the decode engine (``jaxqlora serve``).

`create_app` builds a FastAPI application over a started `jaxqlora.serving.engine.Engine`
(or anything with its API: ``submit``, ``cancel``, ``tokenizer``, ``model_name``,
``adapter_names``, ``chat_template``, ``num_running``, ``num_waiting``, ``config.max_model_len``).

Routes (request and response shapes: the OpenAI API reference, https://platform.openai.com/docs/api-reference;
the legacy completions endpoint for ``/v1/completions``):

- ``POST /v1/completions``: ``prompt`` (a string, a list of strings, a list of token ids or a
  list of such lists; each prompt is its own engine request and its own choice, indexed in
  order), ``max_tokens`` (default 16; 0 allowed), ``temperature`` (default 1), ``top_p``
  (default 1), ``top_k`` (vLLM's extension; 0 or -1 = off), ``seed``, ``stop`` (a string or a
  list), ``stream``, ``stream_options.include_usage``, ``logprobs`` (alternatives per token,
  0..20), ``echo`` (the prompt's text before the completion; with ``logprobs``, the prompt
  tokens' log-probabilities too, the first one null: what lm-evaluation-harness's
  loglikelihood requests ask), ``n`` (1 only), ``user``; vLLM's ``stop_token_ids`` and
  ``ignore_eos``.
- ``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template (an
  adapter's recorded one for an adapter), ``max_completion_tokens`` / ``max_tokens``
  (default: up to the engine's ``max_model_len``), ``temperature``, ``top_p``, ``top_k``,
  ``seed``, ``stop``, ``stream`` (``chat.completion.chunk`` events with ``delta``: the first
  carries the role), ``logprobs`` / ``top_logprobs`` in the chat format.
- ``GET /v1/models`` (the base model and every adapter), ``GET /health``, ``GET /metrics``
  (Prometheus text: running and waiting requests, prompt and generated tokens, finished
  requests by finish reason, time to first token and inter-token latency histograms; each
  application has its own registry).

Streams are server-sent events (``data: {json}`` lines, a blank line after each, ``data: [DONE]``
last). Errors are OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for
malformed JSON, a wrong type, an out-of-range value (``param`` names the field), a prompt
longer than the context (``code: context_length_exceeded``) and unsupported options (``n``
> 1, penalties, ``logit_bias``...); 404 for an unknown ``model`` (``code: model_not_found``)
or route; 503 with ``Retry-After`` when the engine's queue is full or the engine is stopping;
500 when a request failed inside the engine (only that request: the others go on). A stream
that fails after its first event ends with a ``data: {"error": ...}`` event, then ``[DONE]``.
A client that disconnects (streaming or not) has its engine requests cancelled.

Fault injection (tests): with the environment variable ``JAXQLORA_FAULT_INJECTION=1``, a
request whose ``user`` field is ``"jaxqlora-fault-injection"`` is submitted with
``Request(fault=True)``: the engine fails it after its first token.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import time
import uuid
from typing import Any, AsyncIterator

import prometheus_client as prom
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxqlora.errors import ContextLengthError
from jaxqlora.serving.request import (MAX_LOGPROBS, EngineStoppedError, Output, QueueFullError, Request, RequestError,
                                      SamplingParams, TokenLogprob, UnknownModelError)

FAULT_INJECTION_ENV = "JAXQLORA_FAULT_INJECTION"
"""Environment variable that, set to ``1``, turns fault injection on (tests only)."""

FAULT_INJECTION_USER = "jaxqlora-fault-injection"
"""The OpenAI ``user`` value that asks for an injected fault (with `FAULT_INJECTION_ENV` on)."""

RETRY_AFTER_S = 1
"""Seconds a 503 response's ``Retry-After`` header asks the client to wait."""

DISCONNECT_POLL_S = 0.25
"""Seconds between checks that the client is still connected while no event arrives."""

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
"""Time-to-first-token histogram buckets, seconds (vLLM's)."""

ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5)
"""Inter-token latency histogram buckets, seconds."""

_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered with OpenAI's error body.

    Attributes:
      status: the HTTP status (400, 404, 500, 503).
      message: what is wrong, for a person.
      type: OpenAI's ``error.type`` (``invalid_request_error``, ``server_error``).
      param: the request field concerned, or None.
      code: OpenAI's ``error.code`` (``context_length_exceeded``, ``model_not_found``...), or None.
      headers: extra response headers (``Retry-After`` for 503).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The JSON response: this body, status and headers."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error(e: BaseException, prompt_param: str = "prompt") -> APIError:
    """The `APIError` for an exception raised by ``Engine.submit`` or carried by a failed
    request's ``Output.error``.

    Args:
      e: the exception.
      prompt_param: the request field of the prompt (``"prompt"`` or ``"messages"``), named
        by a context-length error.

    Returns:
      `RequestError` -> 400 (its ``param``); `ContextLengthError` -> 400
      ``context_length_exceeded``; `UnknownModelError` -> 404 ``model_not_found``;
      `QueueFullError` / `EngineStoppedError` -> 503 with ``Retry-After``; anything else -> 500.
    """
    if isinstance(e, APIError):
        return e
    if isinstance(e, RequestError):
        return APIError(400, str(e), param=e.param)
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), param=prompt_param, code="context_length_exceeded")
    if isinstance(e, UnknownModelError):
        return APIError(404, str(e), param="model", code="model_not_found")
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(e, QueueFullError):
        return APIError(503, f"the server is busy: {e}", type="server_error", code="queue_full", headers=retry)
    if isinstance(e, EngineStoppedError):
        return APIError(503, f"the server is shutting down: {e}", type="server_error", code="engine_stopped",
                        headers=retry)
    return APIError(500, f"the request failed inside the server: {type(e).__name__}: {e}", type="server_error")


# --- request bodies: pydantic checks the types (strict: no "5" for 5, no 1 for true); union-typed
# fields (prompt, stop, messages) are checked by hand for clearer messages; ranges by SamplingParams.


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    """OpenAI ``stream_options``: ``include_usage`` adds a last chunk with ``usage`` and no choices."""

    include_usage: bool | None = False


class _Common(_Body):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Any = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False


class CompletionRequest(_Common):
    """The body of ``POST /v1/completions`` (OpenAI's legacy completions API; see the module
    docstring for each field). Unknown fields are ignored."""

    prompt: Any = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(_Common):
    """The body of ``POST /v1/chat/completions`` (OpenAI's chat completions API; see the
    module docstring for each field). Unknown fields are ignored."""

    messages: Any = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def _bad(message: str, param: str | None) -> APIError:
    return APIError(400, message, param=param)


def _check_unsupported(body: _Common) -> None:
    if body.n is not None and body.n != 1:
        raise _bad(f"n must be 1 (one choice per prompt is supported), got {body.n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value not in (None, 0):
            raise _bad(f"{name} is not supported (only 0), got {value:g}", name)
    if body.logit_bias:
        raise _bad("logit_bias is not supported", "logit_bias")
    if isinstance(body, CompletionRequest):
        if body.best_of not in (None, 1):
            raise _bad(f"best_of must be 1, got {body.best_of}", "best_of")
        if body.suffix:
            raise _bad("suffix is not supported", "suffix")
    if isinstance(body, ChatCompletionRequest):
        if body.tools:
            raise _bad("tools are not supported", "tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise _bad(f"response_format {body.response_format.get('type')!r} is not supported (only text)",
                       "response_format")


def _parse_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop must be a string or a list of strings", "stop")
    if not all(stop):
        raise _bad("stop strings must not be empty", "stop")
    return tuple(stop)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_prompt(prompt: Any, tokenizer) -> list[tuple[list[int], str | None]]:
    """``[(ids, text or None)]``: one entry per prompt of a completions request."""
    if prompt is None:
        raise _bad("prompt: Field required", "prompt")
    if isinstance(prompt, str):
        texts, ids = [prompt], None
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts, ids = prompt, None
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        texts, ids = None, [prompt]
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt)):
        texts, ids = None, prompt
    else:
        raise _bad("prompt must be a string, a non-empty list of strings, a list of token ids or a list of "
                   "lists of token ids", "prompt")
    if texts is not None:
        out = [(tokenizer.encode(t), t) for t in texts]
    else:
        vocab = getattr(tokenizer, "vocab_size", None)
        for p in ids:
            bad = [t for t in p if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                raise _bad(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        out = [(list(p), None) for p in ids]
    for i, (p, _) in enumerate(out):
        if not p:
            raise _bad("prompt must not be empty" + (f" (prompt {i})" if len(out) > 1 else ""), "prompt")
    return out


def _parse_messages(messages: Any) -> list[dict]:
    if messages is None:
        raise _bad("messages: Field required", "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with role and content", where)
        role = m.get("role")
        if role not in _CHAT_ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(_CHAT_ROLES)}, got {role!r}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _bad(f"{where}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                               "supported", f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise _bad(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append({"role": _CHAT_ROLES[role], "content": content})
    return out


def _sampling(body: _Common, max_tokens: int, logprobs: int | None, prompt_logprobs: bool) -> SamplingParams:
    top_k = body.top_k
    if top_k == -1:  # vLLM's "off"
        top_k = 0
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p),
            top_k=0 if top_k is None else top_k,
            seed=body.seed,
            stop=_parse_stop(body.stop),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=bool(body.ignore_eos),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except RequestError as e:
        raise APIError(400, str(e), param=e.param) from None


# --- the bridge from the engine's thread to the event loop


class _Metrics:
    """The application's Prometheus metrics, in its own registry."""

    def __init__(self, engine):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        prom.Gauge("jaxqlora_requests_running", "Requests in a decode slot.", registry=r).set_function(
            lambda: engine.num_running)
        prom.Gauge("jaxqlora_requests_waiting", "Requests waiting for a decode slot.", registry=r).set_function(
            lambda: engine.num_waiting)
        self.prompt_tokens = prom.Counter("jaxqlora_prompt_tokens", "Prompt tokens of submitted requests.",
                                          registry=r)
        self.generation_tokens = prom.Counter("jaxqlora_generation_tokens",
                                              "Generated tokens (an EOS or stop token counted).", registry=r)
        self.finished = prom.Counter("jaxqlora_requests_finished", "Finished engine requests by finish reason.",
                                     ["finish_reason"], registry=r)
        self.ttft = prom.Histogram("jaxqlora_time_to_first_token_seconds",
                                   "Seconds from the HTTP request's arrival to its first generated token.",
                                   buckets=TTFT_BUCKETS, registry=r)
        self.itl = prom.Histogram("jaxqlora_inter_token_latency_seconds",
                                  "Seconds between consecutive generated tokens of a request (an event of k tokens "
                                  "counts k latencies of 1/k of its interval).", buckets=ITL_BUCKETS, registry=r)


class _Tracked:
    """One engine request of an HTTP request: its events go to the HTTP request's queue as
    ``(index, output)``; metrics are taken at arrival (in the engine's thread)."""

    def __init__(self, index: int, request_id: str, queue: asyncio.Queue, loop, metrics: _Metrics, t0: float):
        self.index, self.request_id, self.queue, self.loop, self.metrics = index, request_id, queue, loop, metrics
        self.t_last = t0
        self.first_token = True
        self.counted = 0
        self.finished = False  # seen by the event loop

    def callback(self, out: Output) -> None:
        """The engine's callback (its thread): never raises, never blocks."""
        t = time.perf_counter()
        try:
            m = self.metrics
            n = len(out.token_ids)
            if n:
                if self.first_token:  # tokens that came with the first one have no latency of their own
                    m.ttft.observe(t - self.t_last)
                    self.first_token = False
                else:
                    for _ in range(n):
                        m.itl.observe((t - self.t_last) / n)
                self.t_last = t
            if out.completion_tokens > self.counted:
                m.generation_tokens.inc(out.completion_tokens - self.counted)
                self.counted = out.completion_tokens
            if out.finished:
                m.finished.labels(out.finish_reason or "unknown").inc()
        except Exception:  # noqa: BLE001 - metrics must not fail a request
            pass
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, out))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class _Disconnected(Exception):
    pass


class _Job:
    """The engine requests of one HTTP request (one per prompt) and their merged events."""

    def __init__(self, app_state, http_request: HTTPRequest, t0: float):
        self.engine = app_state.engine
        self.metrics = app_state.metrics
        self.http_request = http_request
        self.t0 = t0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tracked: list[_Tracked] = []

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], adapter: str | None, fault: bool,
               base_id: str, prompt_param: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                t = _Tracked(i, rid, self.queue, loop, self.metrics, self.t0)
                self.engine.submit(Request(prompt_ids=list(ids), params=p, callback=t.callback, adapter=adapter,
                                           request_id=rid, fault=fault))
                self.tracked.append(t)
                self.metrics.prompt_tokens.inc(len(ids))
        except Exception as e:  # noqa: BLE001 - mapped to the HTTP status
            self.cancel()
            raise api_error(e, prompt_param) from e

    @property
    def done(self) -> bool:
        return all(t.finished for t in self.tracked)

    async def next(self) -> tuple[int, Output]:
        """The next event of any of the requests; raises `_Disconnected` if the client left."""
        while True:
            try:
                async with asyncio.timeout(DISCONNECT_POLL_S):
                    index, out = await self.queue.get()
            except TimeoutError:
                if await self.http_request.is_disconnected():
                    raise _Disconnected() from None
                continue
            if out.finished:
                self.tracked[index].finished = True
            return index, out

    async def events(self) -> AsyncIterator[tuple[int, Output]]:
        """Every event until each request has finished."""
        while not self.done:
            yield await self.next()

    def cancel(self) -> None:
        """Cancel the requests that have not finished (a client gone, an error elsewhere)."""
        for t in self.tracked:
            if not t.finished:
                try:
                    self.engine.cancel(t.request_id)
                except Exception:  # noqa: BLE001 - best effort: the engine may have finished it already
                    pass


# --- responses


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


_DONE = "data: [DONE]\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_error(out: Output) -> APIError | None:
    if out.finish_reason == "error" or out.error is not None:
        err = out.error or RuntimeError("the engine reported an error")
        return api_error(err) if isinstance(err, (RequestError, ContextLengthError, UnknownModelError)) else APIError(
            500, f"the request failed inside the server: {type(err).__name__}: {err}", type="server_error")
    if out.finish_reason == "abort":
        return APIError(503, "the request was aborted (the server is shutting down)", type="server_error",
                        code="aborted", headers={"Retry-After": str(RETRY_AFTER_S)})
    return None


class _CompletionLogprobs:
    """OpenAI legacy completions ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs``
    (``{token text: logprob}`` of the chosen token and the asked alternatives; null for the
    prompt's first token) and ``text_offset`` (character offset of each token in the prompt
    text followed by the completion text)."""

    def __init__(self, token_text, offset: int):
        self.token_text = token_text
        self.offset = offset

    def build(self, entries: list[TokenLogprob | None], ids: list[int]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, e in zip(ids, entries):
            text = self.token_text(tid)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if e is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_lp(e.logprob))
            top = {self.token_text(t): _lp(lp) for t, lp in e.top}
            top.setdefault(self.token_text(e.token_id), _lp(e.logprob))
            out["top_logprobs"].append(top)
        return out


def _lp(x: float) -> float:
    """A log-probability for JSON: -inf (and NaN) become -9999.0, as vLLM writes them."""
    x = float(x)
    return x if math.isfinite(x) else -9999.0


def _merge_logprobs(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    for k in a:
        a[k].extend(b[k])
    return a


def _chat_logprobs(entries: list[TokenLogprob], token_text) -> list[dict]:
    def item(tid, lp):
        text = token_text(tid)
        return {"token": text, "logprob": _lp(lp), "bytes": list(text.encode("utf-8"))}

    return [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]


def create_app(engine) -> FastAPI:
    """The OpenAI-compatible application over ``engine`` (routes, errors: the module docstring).

    Args:
      engine: a started `jaxqlora.serving.engine.Engine` (or an object with its API).

    Returns:
      A ``fastapi.FastAPI``; serve it with uvicorn (``jaxqlora serve`` does). ``app.state``
      holds ``engine`` and ``metrics`` (``metrics.registry``: the app's own Prometheus
      ``CollectorRegistry``).
    """
    app = FastAPI(title="jaxqlora", description="OpenAI-compatible API of a jaxqlora engine", version="1")
    app.state.engine = engine
    app.state.metrics = _Metrics(engine)
    app.state.created = int(time.time())
    tokenizer = engine.tokenizer

    @functools.lru_cache(maxsize=65536)
    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    def max_model_len() -> int:
        return int(engine.config.max_model_len)

    def resolve_model(model: str | None) -> str | None:
        """The adapter name for a request's ``model`` (None: the base model)."""
        if model is None or model == engine.model_name:
            return None
        if model in engine.adapter_names:
            return model
        served = ", ".join([engine.model_name, *engine.adapter_names])
        raise APIError(404, f"the model {model!r} does not exist; this server serves: {served}", param="model",
                       code="model_not_found")

    def fault_requested(body: _Common) -> bool:
        return os.environ.get(FAULT_INJECTION_ENV) == "1" and body.user == FAULT_INJECTION_USER

    # --- errors

    @app.exception_handler(APIError)
    async def _on_api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request, exc: RequestValidationError):
        return _validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return APIError(exc.status_code, str(message), type=kind, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _on_exception(request, exc: Exception):
        return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error").response()

    # --- routes

    @app.get("/health")
    async def health() -> dict:
        """200 ``{"status": "ok", "running", "waiting"}`` while the server answers."""
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition of the app's registry."""
        return Response(prom.generate_latest(app.state.metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        """OpenAI's model list: the base model, then every adapter (``parent``: the base)."""
        base = engine.model_name

        def card(name, parent):
            return {"id": name, "object": "model", "created": app.state.created, "owned_by": "jaxqlora",
                    "root": name, "parent": parent, "max_model_len": max_model_len()}

        return {"object": "list", "data": [card(base, None)] + [card(a, base) for a in engine.adapter_names]}

    async def begin(request: HTTPRequest, model_cls):
        """The start of both completion routes: the arrival time, the checked body, and the
        adapter its ``model`` names (None: the base)."""
        t0 = time.perf_counter()
        body = await _parse_body(request, model_cls)
        _check_unsupported(body)
        return t0, body, resolve_model(body.model)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        """OpenAI completions (the legacy API), streaming or not."""
        t0, body, adapter = await begin(request, CompletionRequest)
        prompts = _parse_prompt(body.prompt, tokenizer)
        if body.max_tokens is None:
            body.max_tokens = 16
        echo = bool(body.echo)
        params = _sampling(body, body.max_tokens, body.logprobs, prompt_logprobs=echo and body.logprobs is not None)
        for ids, _ in prompts:  # the same message as the engine's, before anything is submitted
            if len(ids) + body.max_tokens > max_model_len():
                raise APIError(400, f"the prompt has {len(ids)} tokens and max_tokens is {body.max_tokens}: "
                                    f"{len(ids) + body.max_tokens} > max_model_len {max_model_len()}",
                               param="prompt", code="context_length_exceeded")
        job = _Job(app.state, request, t0)
        base_id = f"cmpl-{uuid.uuid4().hex}"
        job.submit([p for p, _ in prompts], [params] * len(prompts), adapter, fault_requested(body), base_id,
                   "prompt")
        name = body.model or engine.model_name
        created = int(time.time())
        texts = [t if t is not None else tokenizer.decode(p) for p, t in prompts]
        lp = [_CompletionLogprobs(token_text, 0 if echo else len(t)) for t in texts]
        want_lp = body.logprobs is not None

        def render(index: int, out: Output, first: bool) -> tuple[str, dict | None]:
            """The text and logprobs of one event (with the echoed prompt before the first)."""
            text, logprobs = out.text, None
            if first and echo:
                text = texts[index] + text
                if want_lp:
                    prompt_ids = prompts[index][0]
                    entries = out.prompt_logprobs or [None] * len(prompt_ids)
                    logprobs = lp[index].build(list(entries), prompt_ids)
            if want_lp:
                logprobs = _merge_logprobs(logprobs, lp[index].build(out.logprobs or [], out.token_ids))
            return text, logprobs

        if not body.stream:
            acc = [{"text": "", "logprobs": None, "finish_reason": None, "seen": False, "p": 0, "c": 0}
                   for _ in prompts]
            try:
                async for index, out in job.events():
                    err = _finish_error(out)
                    if err is not None:
                        raise err
                    a = acc[index]
                    text, logprobs = render(index, out, not a["seen"])
                    a["seen"] = True
                    a["text"] += text
                    if want_lp:
                        a["logprobs"] = _merge_logprobs(a["logprobs"], logprobs)
                    if out.finished:
                        a["finish_reason"], a["p"], a["c"] = out.finish_reason, out.prompt_tokens, out.completion_tokens
            except _Disconnected:
                return Response(status_code=499)
            finally:
                job.cancel()
            choices = [{"index": i, "text": a["text"], "logprobs": a["logprobs"], "finish_reason": a["finish_reason"]}
                       for i, a in enumerate(acc)]
            usage = _usage(sum(a["p"] or len(p) for a, (p, _) in zip(acc, prompts)), sum(a["c"] for a in acc))
            return {"id": base_id, "object": "text_completion", "created": created, "model": name,
                    "choices": choices, "usage": usage}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choice: dict) -> str:
            return _sse({"id": base_id, "object": "text_completion", "created": created, "model": name,
                         "choices": [choice]})

        async def stream(first_event) -> AsyncIterator[str]:
            seen = [False] * len(prompts)
            usage = [[len(p), 0] for p, _ in prompts]
            try:
                event = first_event
                while event is not None:
                    index, out = event
                    err = _finish_error(out)
                    if err is not None:
                        yield _sse(err.body())
                        break
                    text, logprobs = render(index, out, not seen[index])
                    seen[index] = True
                    if out.finished:
                        usage[index] = [out.prompt_tokens or usage[index][0], out.completion_tokens]
                    if text or (want_lp and out.token_ids) or out.finished:  # no empty chunk (held-back UTF-8)
                        yield chunk({"index": index, "text": text, "logprobs": logprobs,
                                     "finish_reason": out.finish_reason if out.finished else None})
                    event = None if job.done else await job.next()
                else:
                    if include_usage:
                        yield _sse({"id": base_id, "object": "text_completion", "created": created, "model": name,
                                    "choices": [], "usage": _usage(sum(u[0] for u in usage),
                                                                   sum(u[1] for u in usage))})
                yield _DONE
            except _Disconnected:
                pass
            finally:
                job.cancel()

        return await _start_stream(job, stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        """OpenAI chat completions, streaming or not."""
        t0, body, adapter = await begin(request, ChatCompletionRequest)
        messages = _parse_messages(body.messages)
        name = body.model or engine.model_name
        template = engine.chat_template(name)
        if template is None:
            raise APIError(400, f"the model {name!r} has no chat template; use /v1/completions", param="model")
        try:
            rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, chat_template=template)
        except Exception as e:  # noqa: BLE001 - jinja2's raise_exception (role order...) or a bad template
            raise APIError(400, f"the chat template refused the conversation: {e}", param="messages") from None
        ids = tokenizer.encode(rendered, add_special_tokens=False)
        if not ids:
            raise APIError(400, "the rendered conversation is empty", param="messages")
        limit = max_model_len()
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        which = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{which} must be at least 1, got {max_tokens}", param=which)
        if len(ids) >= limit:
            raise APIError(400, f"the conversation has {len(ids)} tokens; max_model_len is {limit} (room for no "
                                "new token)", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = limit - len(ids)
        elif len(ids) + max_tokens > limit:
            raise APIError(400, f"the conversation has {len(ids)} tokens and {which} is {max_tokens}: "
                                f"{len(ids) + max_tokens} > max_model_len {limit}", param="messages",
                           code="context_length_exceeded")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {body.top_logprobs}",
                           param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = _sampling(body, max_tokens, logprobs, prompt_logprobs=False)
        job = _Job(app.state, request, t0)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        job.submit([ids], [params], adapter, fault_requested(body), rid, "messages")
        created = int(time.time())

        if not body.stream:
            text, entries, final = "", [], None
            try:
                async for _, out in job.events():
                    err = _finish_error(out)
                    if err is not None:
                        raise err
                    text += out.text
                    entries += out.logprobs or []
                    final = out
            except _Disconnected:
                return Response(status_code=499)
            finally:
                job.cancel()
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": {"content": _chat_logprobs(entries, token_text), "refusal": None}
                      if logprobs is not None else None,
                      "finish_reason": final.finish_reason}
            return {"id": rid, "object": "chat.completion", "created": created, "model": name, "choices": [choice],
                    "usage": _usage(final.prompt_tokens or len(ids), final.completion_tokens)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict, logprobs=None, finish_reason=None, **extra) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                         "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": finish_reason}], **extra})

        async def stream(first_event) -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                event, final = first_event, None
                while event is not None:
                    _, out = event
                    err = _finish_error(out)
                    if err is not None:
                        yield _sse(err.body())
                        break
                    if out.text or (out.token_ids and logprobs is not None):
                        lp = ({"content": _chat_logprobs(out.logprobs or [], token_text), "refusal": None}
                              if logprobs is not None else None)
                        yield chunk({"content": out.text}, logprobs=lp)
                    if out.finished:
                        final = out
                        yield chunk({}, finish_reason=out.finish_reason)
                    event = None if job.done else await job.next()
                else:
                    if include_usage and final is not None:
                        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                                    "choices": [], "usage": _usage(final.prompt_tokens or len(ids),
                                                                   final.completion_tokens)})
                yield _DONE
            except _Disconnected:
                pass
            finally:
                job.cancel()

        return await _start_stream(job, stream)

    return app


async def _start_stream(job: _Job, stream) -> Response:
    """Wait for the first event before answering, so that a request that fails before it
    gets its HTTP status (not a 200 stream holding an error); then stream."""
    try:
        first = await job.next()
    except _Disconnected:
        job.cancel()
        return Response(status_code=499)
    except BaseException:
        job.cancel()
        raise
    err = _finish_error(first[1]) if first[1].finished else None
    if err is not None:
        job.cancel()
        return err.response()
    return StreamingResponse(stream(first), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _param_path(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


async def _parse_body(request: HTTPRequest, model: type[_Body]) -> _Body:
    """The request's JSON body as ``model`` (whatever its Content-Type says: ``curl -d`` sends
    form-encoded).

    Raises:
      APIError: 400 for a body that is not JSON, not a JSON object, or has a field of a wrong type.
    """
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object" + (
            "" if data is None else f", got {type(data).__name__}"))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _validation_error(errors: list[dict]) -> APIError:
    """A pydantic validation error as a 400 with OpenAI's body (``param``: the field)."""
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    loc = list(err.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error")
        return APIError(400, "malformed JSON body" + (f": {detail}" if detail else ""))
    if not loc:
        return APIError(400, f"the request body must be a JSON object ({err.get('msg', '')})")
    param = _param_path(loc)
    return APIError(400, f"{param}: {err.get('msg', 'invalid value')}", param=param)


__all__ = ["APIError", "ChatCompletionRequest", "CompletionRequest", "FAULT_INJECTION_ENV", "FAULT_INJECTION_USER",
           "api_error", "create_app"]
