"""A small stand-in for `jaxqlora.serving.engine.Engine`, for the HTTP tests: the same API
(``submit``, ``cancel``, ``start``, ``shutdown``, ``num_running``, ``num_waiting``,
``tokenizer``, ``model_name``, ``adapter_names``, ``chat_template``, ``config``), no model.

Tokens are bytes (ids 0..255) plus an EOS (256). A request's completion is a fixed
function of its prompt and settings, so tests know what to expect:

- greedy (temperature 0): the bytes of ``"abcdefghijklmnopqrstuvwxyz"`` in turn, starting at
  ``len(prompt) % 26``; with an adapter, upper case.
- sampled: random lower-case letters from ``random.Random(seed)`` (same seed: same letters).
- a prompt containing ``"EOS"`` ends with the EOS token after 3 letters (finish ``stop``).

Stop strings end a completion (the stop string and what follows are cut). Log-probabilities
are made up but fixed: the chosen token -0.5 and alternatives -1.5, -2.5...; a prompt
token i > 0 gets -(i / 10). ``fault=True`` fails the request after its first token.
``engine.pause()`` stops every step (requests stay where they are) until ``engine.resume()``.

Run as a script, it is ``jaxqlora`` with this engine and tokenizer in place of the real ones
(``python tests/fake_engine.py serve ...``): the CLI test of ``serve`` without a model.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time

from jaxqlora.errors import ContextLengthError
from jaxqlora.serving.engine import EngineConfig
from jaxqlora.serving.request import (EngineStoppedError, Output, QueueFullError, Request, RequestError, TokenLogprob,
                                      UnknownModelError)

EOS = 256
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
STRICT_TEMPLATE = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('no assistant first') }}{% endif %}"
                   + TEMPLATE)


class FakeTokenizer:
    """Bytes as tokens (0..255) and one EOS (256, text ``</s>``)."""

    vocab_size = 257
    eos_token_ids = {EOS}
    chat_template = STRICT_TEMPLATE

    def encode(self, text, add_special_tokens=True):
        """UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=False):
        """Text of byte ids (EOS as ``</s>``)."""
        out, buf = [], bytearray()
        for i in ids:
            if i == EOS:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append("" if skip_special_tokens else "</s>")
            else:
                buf.append(int(i))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt=True, chat_template=None, **kw):
        """Render with jinja2 (``raise_exception`` as in transformers)."""
        import jinja2

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        env = jinja2.Environment()
        env.globals["raise_exception"] = raise_exception
        return env.from_string(chat_template or self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt)


def FakeConfig(**kw) -> EngineConfig:  # noqa: N802 - stands where the EngineConfig class stands
    """The real `EngineConfig` (its fields and checks), with a 256-token ``max_model_len`` by default."""
    return EngineConfig(**{"max_model_len": 256, **kw})


@dataclasses.dataclass
class _Slot:
    req: Request
    script: list[int]  # the completion's tokens (EOS last when it stops on EOS)
    stop_text: str | None  # the completion's text when a stop string ends it
    pos: int = 0
    emitted_text: int = 0
    first: bool = True


class FakeEngine:
    """The engine's API over scripted completions (see the module docstring).

    Args:
      config: `FakeConfig` (or the real EngineConfig).
      adapters: ``{name: anything}``.
      model_name: the base model's name.
      step_s: seconds per decode step (one token per running request).
      templates: ``{model name: chat template or None}`` overriding the tokenizer's.
    """

    def __init__(self, model=None, tokenizer=None, config=None, adapters=None, model_name="fake-base",
                 step_s: float = 0.002, templates: dict | None = None):
        self.tokenizer = tokenizer or FakeTokenizer()
        self.config = config or FakeConfig()
        self.model_name = model_name
        self.adapter_names = list(adapters or {})
        self.step_s = step_s
        self.templates = templates or {}
        self.submitted: list[Request] = []
        self.cancelled: list[str] = []
        self._lock = threading.Condition()
        self._waiting: list[Request] = []
        self._running: dict[str, _Slot] = {}
        self._cancel: set[str] = set()
        self._paused = threading.Event()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.shutdown_calls: list[float] = []

    # --- API
    def chat_template(self, model):
        """The model's chat template."""
        return self.templates.get(model, self.tokenizer.chat_template)

    def start(self):
        """Start the engine thread."""
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)
        self._thread.start()

    @property
    def num_running(self):
        """Requests in a slot."""
        return len(self._running)

    @property
    def num_waiting(self):
        """Requests waiting for a slot."""
        return len(self._waiting)

    def submit(self, request: Request):
        """Queue a request (the real engine's checks and errors)."""
        if not request.prompt_ids:
            raise RequestError("prompt_ids must not be empty", "prompt")
        if request.adapter is not None and request.adapter not in self.adapter_names:
            raise UnknownModelError(f"no adapter {request.adapter!r}")
        n = len(request.prompt_ids) + request.params.max_tokens
        if n > self.config.max_model_len:
            raise ContextLengthError(f"prompt ({len(request.prompt_ids)}) + max_tokens "
                                     f"({request.params.max_tokens}) > max_model_len {self.config.max_model_len}")
        with self._lock:
            if not self._accepting:
                raise EngineStoppedError("the engine is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (max_queue {self.config.max_queue})")
            self.submitted.append(request)
            self._waiting.append(request)
            self._lock.notify_all()

    def cancel(self, request_id: str):
        """Abort a request at the next step."""
        with self._lock:
            self.cancelled.append(request_id)
            self._cancel.add(request_id)
            self._lock.notify_all()

    def shutdown(self, grace_s: float):
        """Stop accepting; finish or abort at the end of the grace; join."""
        self.shutdown_calls.append(grace_s)
        with self._lock:
            self._accepting = False
        end = time.monotonic() + grace_s
        while time.monotonic() < end and (self._waiting or self._running):
            time.sleep(0.005)
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        for r in list(self._waiting) + [s.req for s in self._running.values()]:
            r.callback(Output(r.request_id, finished=True, finish_reason="abort", prompt_tokens=len(r.prompt_ids)))
        self._waiting.clear()
        self._running.clear()

    def pause(self):
        """Hold every step until `resume`."""
        self._paused.set()

    def resume(self):
        """Go on stepping."""
        self._paused.clear()

    # --- the scripted completion
    def script(self, req: Request) -> tuple[list[int], str | None]:
        """``(token ids, cut text or None)`` the request will produce."""
        p = req.params
        letters = "abcdefghijklmnopqrstuvwxyz"
        n = p.max_tokens
        if p.temperature == 0:
            start = len(req.prompt_ids) % 26
            text = "".join(letters[(start + i) % 26] for i in range(n))
        else:
            rng = random.Random(p.seed)
            text = "".join(rng.choice(letters) for _ in range(n))
        if req.adapter is not None:
            text = text.upper()
        ids = list(text.encode())
        if b"EOS" in bytes(b for b in req.prompt_ids if b < 256) and n > 3 and not p.ignore_eos:
            ids = ids[:3] + [EOS]
        for i, t in enumerate(ids):
            if t in p.stop_token_ids:
                ids = ids[:i + 1]
                break
        cut = None
        for s in p.stop:
            at = text.find(s)
            if at >= 0:
                ids = ids[:at + len(s)]
                cut = text[:at]
                break
        return ids, cut

    def _logprob(self, tid: int, k: int) -> TokenLogprob:
        top = [(tid, -0.5)] + [((tid + j) % 256, -0.5 - j) for j in range(1, k)]
        return TokenLogprob(tid, -0.5, tuple(top[:k]))

    def _loop(self):
        while True:
            if self._paused.is_set() and not self._stop:
                time.sleep(0.001)
                continue
            with self._lock:
                if self._stop:
                    return
                while self._waiting and len(self._running) < self.config.max_batch:
                    r = self._waiting.pop(0)
                    ids, cut = self.script(r)
                    self._running[r.request_id] = _Slot(r, ids, cut)
                cancelled, self._cancel = self._cancel, set()
            for rid in cancelled:
                slot = self._running.pop(rid, None)
                req = slot.req if slot else next((r for r in self._waiting if r.request_id == rid), None)
                if req is None:
                    continue
                if slot is None:
                    with self._lock:
                        self._waiting.remove(req)
                req.callback(Output(rid, finished=True, finish_reason="abort", prompt_tokens=len(req.prompt_ids),
                                    completion_tokens=slot.pos if slot else 0))
            for rid, slot in list(self._running.items()):
                self._step(slot)
                if slot.pos >= len(slot.script) or slot.req.params.max_tokens == 0:
                    self._running.pop(rid, None)
            time.sleep(self.step_s)

    def _step(self, slot: _Slot):
        r, p = slot.req, slot.req.params
        out = Output(r.request_id, prompt_tokens=len(r.prompt_ids))
        if slot.first and p.prompt_logprobs:
            k = min(1, p.logprobs or 0)
            out.prompt_logprobs = [None] + [TokenLogprob(t, -i / 10, ((t, -i / 10),) * k)
                                            for i, t in enumerate(r.prompt_ids) if i > 0]
        if p.max_tokens == 0 or not slot.script:
            out.finished, out.finish_reason = True, "length"
            r.callback(out)
            return
        if r.fault and not slot.first:
            out.finished, out.finish_reason, out.error = True, "error", RuntimeError("injected fault")
            out.completion_tokens = slot.pos
            slot.pos = len(slot.script)
            r.callback(out)
            return
        slot.first = False
        tid = slot.script[slot.pos]
        slot.pos += 1
        out.completion_tokens = slot.pos
        visible = tid != EOS and tid not in p.stop_token_ids and (slot.stop_text is None
                                                                   or slot.pos <= len(slot.stop_text))
        if visible:
            out.token_ids = [tid]
            out.text = bytes([tid]).decode("utf-8", errors="replace")
            if p.logprobs is not None:
                out.logprobs = [self._logprob(tid, p.logprobs)]
        if slot.pos >= len(slot.script):
            out.finished = True
            stopped = not visible or slot.stop_text is not None
            out.finish_reason = "stop" if stopped else "length"
        r.callback(out)


def main(argv=None):
    """``jaxqlora`` with `FakeEngine` as the engine and a stub loader (the CLI test)."""
    import sys
    import types

    import jaxqlora.io

    def load_pretrained(path=None, dtype=None, keep_quantized=False):
        return object(), FakeTokenizer()

    jaxqlora.io.load_pretrained = load_pretrained
    module = types.ModuleType("jaxqlora.serving.engine")

    def engine(model, tokenizer, config, adapters=None, model_name="fake"):
        return FakeEngine(model, tokenizer, config, adapters=adapters, model_name=model_name, step_s=0.02)

    module.Engine = engine
    module.EngineConfig = FakeConfig
    sys.modules["jaxqlora.serving.engine"] = module
    from jaxqlora.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
