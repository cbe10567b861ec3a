"""The HTTP layer of ``jaxqlora serve`` (`jaxqlora.serving.server`) and its CLI command, over a
fake engine (tests/fake_engine.py): no model, a few seconds on a CPU.

Each test drives a real uvicorn server on a free port (in a thread) with the official ``openai``
client where it fits and raw ``httpx`` for status codes, headers and SSE framing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from fake_engine import STRICT_TEMPLATE, FakeConfig, FakeEngine
from jaxqlora.serving.request import SamplingParams
from jaxqlora.serving.server import FAULT_INJECTION_ENV, FAULT_INJECTION_USER, create_app

BASE = "fake-base"
AD2_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "


class Served:
    """A uvicorn server in a thread over ``create_app(engine)``, on a free port."""

    def __init__(self, engine):
        self.engine = engine
        engine.start()
        self.app = create_app(engine)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=10)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=10)

    def close(self):
        self.http.close()
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.shutdown(0)

    def post(self, path, body, **kw):
        if isinstance(body, (dict, list)):
            return self.http.post(path, json=body, **kw)
        return self.http.post(path, content=body, headers={"content-type": "application/json"}, **kw)

    @property
    def last(self):
        return self.engine.submitted[-1]


def make_engine(**kw):
    cfg = FakeConfig(**{k: kw.pop(k) for k in list(kw) if k in ("max_batch", "max_model_len", "max_queue")})
    return FakeEngine(config=cfg, adapters={"ad1": "/dir1", "ad2": "/dir2", "notemplate": "/dir3"}, model_name=BASE,
                      templates={"ad2": AD2_TEMPLATE, "notemplate": None}, **kw)


@pytest.fixture(scope="module")
def srv():
    s = Served(make_engine())
    yield s
    s.close()


@pytest.fixture
def fresh():
    """Its own server, for tests that pause or stop the engine."""
    made = []

    def make(**kw):
        s = Served(make_engine(**kw))
        made.append(s)
        return s

    yield make
    for s in made:
        s.engine.resume()
        s.close()


def sse_events(text: str) -> list:
    """The ``data:`` payloads of an SSE body, checking the framing: every event is one ``data: ``
    line followed by a blank line, and ``[DONE]`` is last."""
    assert text.endswith("\n\n"), text[-50:]
    blocks = text[:-2].split("\n\n")
    out = []
    for b in blocks:
        assert b.startswith("data: ") and "\n" not in b, b
        out.append(b[len("data: "):])
    assert out[-1] == "[DONE]" and "[DONE]" not in out[:-1]
    return [json.loads(x) for x in out[:-1]]


def greedy(prompt_len: int, n: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(letters[(prompt_len + i) % 26] for i in range(n))


def check_error(r: httpx.Response, status: int, param=..., code=..., type=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    if type is not None:
        assert err["type"] == type, err
    return err


# --- routes


def test_models_lists_base_and_adapters(srv):
    models = srv.client.models.list()
    assert [m.id for m in models.data] == [BASE, "ad1", "ad2", "notemplate"]
    raw = srv.http.get("/v1/models").json()
    assert raw["object"] == "list" and all(m["object"] == "model" for m in raw["data"])
    assert [m["parent"] for m in raw["data"]] == [None, BASE, BASE, BASE]


def test_health(srv):
    r = srv.http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completion_with_openai_client(srv):
    out = srv.client.completions.create(model=BASE, prompt="hello", max_tokens=5, temperature=0)
    assert out.object == "text_completion" and out.model == BASE
    assert [c.text for c in out.choices] == [greedy(5, 5)]
    assert out.choices[0].finish_reason == "length" and out.choices[0].index == 0
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (5, 5, 10)
    assert srv.last.adapter is None and srv.last.prompt_ids == list(b"hello")


def test_completion_defaults_are_openai_s(srv):
    srv.post("/v1/completions", {"prompt": "hi"}).raise_for_status()
    assert srv.last.params == SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0, top_k=0, seed=None)
    assert srv.last.fault is False


def test_completion_request_to_sampling_params(srv):
    r = srv.post("/v1/completions", {"model": "ad1", "prompt": "hi", "max_tokens": 7, "temperature": 0.5,
                                     "top_p": 0.9, "top_k": 40, "seed": 123, "stop": "xyz", "logprobs": 3,
                                     "user": "someone", "stop_token_ids": [7], "ignore_eos": True,
                                     "presence_penalty": 0, "frequency_penalty": 0.0, "n": 1})
    r.raise_for_status()
    assert srv.last.adapter == "ad1"
    assert srv.last.params == SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, seed=123,
                                             stop=("xyz",), stop_token_ids=(7,), ignore_eos=True, logprobs=3,
                                             prompt_logprobs=False)
    srv.post("/v1/completions", {"prompt": "hi", "top_k": -1, "stop": ["a", "b"], "echo": True, "logprobs": 0,
                                 "temperature": 0, "max_tokens": 0}).raise_for_status()
    p = srv.last.params
    assert (p.top_k, p.stop, p.logprobs, p.prompt_logprobs, p.max_tokens, p.temperature) == (0, ("a", "b"), 0, True,
                                                                                              0, 0.0)
    srv.post("/v1/completions", {"prompt": "hi", "echo": True}).raise_for_status()
    assert srv.last.params.prompt_logprobs is False  # echo without logprobs: the text only
    srv.post("/v1/completions", {"prompt": "hi", "temperature": None, "max_tokens": None}).raise_for_status()
    assert (srv.last.params.temperature, srv.last.params.max_tokens) == (1.0, 16)  # null: the default


def test_chat_request_to_sampling_params(srv):
    msgs = [{"role": "user", "content": "hi"}]
    srv.post("/v1/chat/completions", {"messages": msgs, "temperature": 0}).raise_for_status()
    prompt = srv.last.prompt_ids
    assert bytes(prompt).decode() == "<user>hi\n<assistant>"
    assert srv.last.params.max_tokens == 256 - len(prompt)  # default: up to max_model_len
    assert srv.last.params.logprobs is None
    srv.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 9, "max_completion_tokens": 4, "seed": 5,
                                      "stop": ["\n"], "logprobs": True, "top_logprobs": 2}).raise_for_status()
    p = srv.last.params
    assert (p.max_tokens, p.seed, p.stop, p.logprobs, p.prompt_logprobs) == (4, 5, ("\n",), 2, False)
    srv.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 9, "logprobs": True}).raise_for_status()
    assert (srv.last.params.max_tokens, srv.last.params.logprobs) == (9, 0)


def test_several_prompts_are_separate_requests(srv):
    before = len(srv.engine.submitted)
    out = srv.client.completions.create(model=BASE, prompt=["a", "bcd", "efghij"], max_tokens=4, temperature=0)
    assert len(srv.engine.submitted) == before + 3
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [greedy(1, 4), greedy(3, 4), greedy(6, 4)]
    assert out.usage.prompt_tokens == 10 and out.usage.completion_tokens == 12
    ids = {r.request_id for r in srv.engine.submitted[before:]}
    assert len(ids) == 3


def test_token_id_prompts(srv):
    out = srv.client.completions.create(model=BASE, prompt=[104, 105], max_tokens=3, temperature=0)
    assert out.choices[0].text == greedy(2, 3) and srv.last.prompt_ids == [104, 105]
    out = srv.client.completions.create(model=BASE, prompt=[[104], [104, 105, 106]], max_tokens=2, temperature=0,
                                        echo=True)
    assert [c.text for c in out.choices] == ["h" + greedy(1, 2), "hij" + greedy(3, 2)]


def test_adapter_routing_and_chat_template(srv):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = srv.client.chat.completions.create(model="ad2", messages=msgs, max_tokens=3, temperature=0)
    assert srv.last.adapter == "ad2"
    prompt = bytes(srv.last.prompt_ids).decode()
    assert prompt == "[system] be brief\n[user] hi\n[assistant] "  # the adapter's template
    assert out.choices[0].message.content == greedy(len(prompt), 3).upper()
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion" and out.model == "ad2"
    out = srv.client.chat.completions.create(model="ad1", messages=msgs, max_tokens=3, temperature=0)
    assert bytes(srv.last.prompt_ids).decode().startswith("<system>be brief\n")  # the tokenizer's template
    # content parts and the developer role (= system)
    srv.post("/v1/chat/completions", {"model": BASE, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]},
        {"role": "user", "content": "q"}]}).raise_for_status()
    assert bytes(srv.last.prompt_ids).decode() == "<system>xy\n<user>q\n<assistant>"


def test_finish_reasons_stop_and_length(srv):
    # "hello" -> f g h i j ...: stop at "hi" cuts before it
    out = srv.client.completions.create(model=BASE, prompt="hello", max_tokens=10, temperature=0, stop=["hi"])
    assert out.choices[0].text == "fg" and out.choices[0].finish_reason == "stop"
    out = srv.client.completions.create(model=BASE, prompt="say EOS", max_tokens=10, temperature=0)
    assert out.choices[0].text == greedy(7, 3) and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 4  # the EOS counted
    out = srv.client.completions.create(model=BASE, prompt="hello", max_tokens=0)
    assert out.choices[0].text == "" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 0


def test_same_seed_same_sample(srv):
    a = srv.client.completions.create(model=BASE, prompt="x", max_tokens=8, temperature=1, seed=7)
    b = srv.client.completions.create(model=BASE, prompt="x", max_tokens=8, temperature=1, seed=7)
    assert a.choices[0].text == b.choices[0].text and srv.last.params.seed == 7


# --- logprobs


def test_echo_logprobs_lm_eval_loglikelihood(srv):
    """lm-evaluation-harness ``local-completions`` loglikelihood: echo, max_tokens 0, logprobs 1,
    and it sums token_logprobs[ctxlen:]."""
    prompt = "The cat"
    r = srv.post("/v1/completions", {"model": BASE, "prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 1,
                                     "temperature": 0, "seed": 1234})
    r.raise_for_status()
    choice = r.json()["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == list(prompt)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([-i / 10 for i in range(1, len(prompt))])
    assert lp["top_logprobs"][1] == {"h": pytest.approx(-0.1)}
    assert lp["text_offset"] == list(range(len(prompt)))


def test_echo_logprobs_with_completion(srv):
    r = srv.post("/v1/completions", {"prompt": "ab", "echo": True, "max_tokens": 2, "logprobs": 2,
                                     "temperature": 0})
    choice = r.json()["choices"][0]
    assert choice["text"] == "ab" + greedy(2, 2)
    lp = choice["logprobs"]
    assert lp["tokens"] == ["a", "b", "c", "d"]
    assert lp["token_logprobs"] == [None, pytest.approx(-0.1), -0.5, -0.5]
    assert lp["text_offset"] == [0, 1, 2, 3]
    assert lp["top_logprobs"][2] == {"c": -0.5, "d": -1.5}


def test_completion_logprobs_without_echo(srv):
    r = srv.post("/v1/completions", {"prompt": "hello", "max_tokens": 3, "logprobs": 2, "temperature": 0})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == list(greedy(5, 3)) and lp["token_logprobs"] == [-0.5] * 3
    assert lp["text_offset"] == [5, 6, 7]  # offsets in prompt + completion (OpenAI's)
    assert lp["top_logprobs"] == [{"f": -0.5, "g": -1.5}, {"g": -0.5, "h": -1.5}, {"h": -0.5, "i": -1.5}]
    r = srv.post("/v1/completions", {"prompt": "hello", "max_tokens": 1, "logprobs": 0, "temperature": 0})
    assert r.json()["choices"][0]["logprobs"]["top_logprobs"] == [{"f": -0.5}]  # the chosen token always
    r = srv.post("/v1/completions", {"prompt": "hello", "max_tokens": 1})
    assert r.json()["choices"][0]["logprobs"] is None


def test_chat_logprobs(srv):
    out = srv.client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                             temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    text = out.choices[0].message.content
    assert [c.token for c in content] == list(text) and [c.logprob for c in content] == [-0.5, -0.5]
    assert content[0].bytes == list(text[0].encode())
    assert [t.logprob for t in content[0].top_logprobs] == [-0.5, -1.5]
    out = srv.client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert out.choices[0].logprobs is None


# --- streaming


def test_completion_stream_framing(srv):
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = srv.post("/v1/completions", body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    *chunks, usage = events
    assert all(c["object"] == "text_completion" and c["model"] == BASE for c in events)
    assert len({c["id"] for c in events}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy(5, 4)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 4,
                                                         "total_tokens": 9}
    r = srv.post("/v1/completions", {**body, "stream_options": None, "prompt": ["ab", "cde"], "echo": True,
                                     "logprobs": 1})
    events = sse_events(r.text)
    assert all("usage" not in e or e["usage"] is None for e in events)
    by_index = {0: "", 1: ""}
    offsets = {0: [], 1: []}
    for e in events:
        (c,) = e["choices"]
        by_index[c["index"]] += c["text"]
        offsets[c["index"]] += c["logprobs"]["text_offset"]
    assert by_index == {0: "ab" + greedy(2, 4), 1: "cde" + greedy(3, 4)}
    assert offsets == {0: list(range(6)), 1: list(range(7))}


def test_completion_stream_with_openai_client(srv):
    pieces = list(srv.client.completions.create(model="ad1", prompt="hello", max_tokens=6, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == greedy(5, 6).upper()
    assert pieces[-1].choices[0].finish_reason == "length"


def test_chat_stream(srv):
    msgs = [{"role": "user", "content": "hi"}]
    chunks = list(srv.client.chat.completions.create(model=BASE, messages=msgs, max_tokens=5, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    prompt_len = len(srv.last.prompt_ids)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(prompt_len, 5)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    r = srv.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 2, "stream": True, "logprobs": True})
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["delta"] == {} and events[-1]["choices"][0]["finish_reason"] == "length"
    assert [len(e["choices"][0]["logprobs"]["content"]) for e in events[1:-1]] == [1, 1]


# --- errors


COMPLETION_BAD = [
    ('{"prompt": "x",', None, "malformed JSON"),
    ("[1, 2]", None, "JSON object"),
    ("", None, "JSON object"),
    ('{"prompt": "x", "temperature": NaN}', "temperature", "finite"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "number"),
    ({"prompt": "x", "temperature": -0.5}, "temperature", "temperature"),
    ({"prompt": "x", "temperature": 1000}, "temperature", "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p", "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p", "top_p"),
    ({"prompt": "x", "top_k": -2}, "top_k", "top_k"),
    ({"prompt": "x", "top_k": 2.5}, "top_k", "integer"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens", "integer"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "integer"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens", "integer"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "logprobs"),
    ({"prompt": "x", "logprobs": -1}, "logprobs", "logprobs"),
    ({"prompt": "x", "seed": "s"}, "seed", "integer"),
    ({"prompt": "x", "seed": 2 ** 70}, "seed", "seed"),
    ({"prompt": "x", "stream": "yes"}, "stream", "boolean"),
    ({"prompt": "x", "echo": 1}, "echo", "boolean"),
    ({"prompt": "x", "stop": 5}, "stop", "stop"),
    ({"prompt": "x", "stop": [""]}, "stop", "stop"),
    ({"prompt": "x", "stop": ["a", 3]}, "stop", "stop"),
    ({"prompt": "x", "stop_token_ids": [1, "a"]}, "stop_token_ids[1]", "integer"),
    ({"prompt": "x", "model": 3}, "model", "string"),
    ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "boolean"),
    ({}, "prompt", "required"),
    ({"prompt": 5}, "prompt", "prompt"),
    ({"prompt": []}, "prompt", "prompt"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": ["a", ""]}, "prompt", "empty"),
    ({"prompt": [[1], []]}, "prompt", "empty"),
    ({"prompt": [1, "a"]}, "prompt", "prompt"),
    ({"prompt": [1, 300]}, "prompt", "300"),
    ({"prompt": [True]}, "prompt", "prompt"),
    ({"prompt": "x", "n": 2}, "n", "n must be 1"),
    ({"prompt": "x", "n": 0}, "n", "n must be 1"),
    ({"prompt": "x", "best_of": 3}, "best_of", "best_of"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"prompt": "x", "frequency_penalty": -1}, "frequency_penalty", "not supported"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    ({"prompt": "x", "suffix": "end"}, "suffix", "not supported"),
]


@pytest.mark.parametrize("body,param,text", COMPLETION_BAD, ids=[str(i) for i in range(len(COMPLETION_BAD))])
def test_completion_bad_input_is_400(srv, body, param, text):
    n = len(srv.engine.submitted)
    err = check_error(srv.post("/v1/completions", body), 400, param=param, type="invalid_request_error")
    assert text.lower() in err["message"].lower(), err
    assert len(srv.engine.submitted) == n  # nothing reached the engine


CHAT_BAD = [
    ({}, "messages", "required"),
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": "hi"}, "messages", "non-empty"),
    ({"messages": ["hi"]}, "messages[0]", "object"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content",
     "text parts"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "messages", "no assistant first"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", "at least 1"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}, "max_completion_tokens",
     "at least 1"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs", "boolean"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature", "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "n", "n must be 1"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     "response_format", "not supported"),
    ({"model": "notemplate", "messages": [{"role": "user", "content": "x"}]}, "model", "chat template"),
]


@pytest.mark.parametrize("body,param,text", CHAT_BAD, ids=[str(i) for i in range(len(CHAT_BAD))])
def test_chat_bad_input_is_400(srv, body, param, text):
    n = len(srv.engine.submitted)
    err = check_error(srv.post("/v1/chat/completions", body), 400, param=param, type="invalid_request_error")
    assert text.lower() in err["message"].lower(), err
    assert len(srv.engine.submitted) == n


def test_context_length_is_400(srv):
    # max_model_len 256: 250 + 16 (the default max_tokens) does not fit
    err = check_error(srv.post("/v1/completions", {"prompt": "x" * 250}), 400, param="prompt",
                      code="context_length_exceeded")
    assert "256" in err["message"]
    check_error(srv.post("/v1/completions", {"prompt": ["ok", "x" * 250], "max_tokens": 10}), 400,
                code="context_length_exceeded")
    srv.post("/v1/completions", {"prompt": "x" * 250, "max_tokens": 6}).raise_for_status()  # exactly 256
    msgs = [{"role": "user", "content": "y" * 300}]
    check_error(srv.post("/v1/chat/completions", {"messages": msgs}), 400, param="messages",
                code="context_length_exceeded")
    msgs = [{"role": "user", "content": "y" * 200}]
    check_error(srv.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 100}), 400, param="messages",
                code="context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.completions.create(model=BASE, prompt="x" * 300)
    assert e.value.code == "context_length_exceeded"


def test_unknown_model_is_404(srv):
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        err = check_error(srv.post(path, {**body, "model": "nope"}), 404, param="model", code="model_not_found")
        assert "nope" in err["message"] and BASE in err["message"]
    with pytest.raises(openai.NotFoundError):
        srv.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_unknown_route_and_method(srv):
    check_error(srv.http.get("/v1/nothing"), 404)
    check_error(srv.http.get("/v1/completions"), 405)


def test_openai_client_sees_400(srv):
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.completions.create(model=BASE, prompt="x", temperature=-1)
    assert e.value.param == "temperature"


def test_queue_full_is_503_with_retry_after(fresh):
    s = fresh(max_batch=1, max_queue=1)
    s.engine.pause()
    results = []
    t = threading.Thread(target=lambda: results.append(s.post("/v1/completions", {"prompt": "a", "max_tokens": 2})))
    t.start()
    deadline = time.monotonic() + 5
    while s.engine.num_waiting < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r = s.post("/v1/completions", {"prompt": "b"})
    check_error(r, 503, code="queue_full", type="server_error")
    assert r.headers["retry-after"] == "1"
    # several prompts: the second is refused, the first (already queued) is cancelled
    n = len(s.engine.submitted)
    s.engine.resume()
    t.join(5)
    assert results[0].status_code == 200
    s.engine.pause()
    r = s.post("/v1/completions", {"prompt": ["c", "d"], "max_tokens": 2})
    check_error(r, 503, code="queue_full")
    assert len(s.engine.submitted) == n + 1
    assert s.engine.cancelled[-1] == s.engine.submitted[-1].request_id
    s.engine.resume()
    deadline = time.monotonic() + 5
    while s.engine.num_waiting or s.engine.num_running:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_stopped_engine_is_503(fresh):
    s = fresh()
    s.engine.shutdown(0)
    r = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    check_error(r, 503, code="engine_stopped", type="server_error")
    assert r.headers["retry-after"] == "1"


# --- faults and disconnects


def test_fault_fails_one_request_others_fine(srv, monkeypatch):
    monkeypatch.setenv(FAULT_INJECTION_ENV, "1")
    results = {}

    def normal(i):
        results[i] = srv.client.completions.create(model=BASE, prompt="p" * (i + 1), max_tokens=20, temperature=0)

    threads = [threading.Thread(target=normal, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    r = srv.post("/v1/completions", {"prompt": "boom", "max_tokens": 20, "user": FAULT_INJECTION_USER})
    err = check_error(r, 500, type="server_error")
    assert "injected fault" in err["message"]
    assert srv.last.fault or any(q.fault for q in srv.engine.submitted[-8:])
    # streaming: the fault comes after the first token, so it ends the stream with an error event
    r = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True,
                                          "user": FAULT_INJECTION_USER, "max_tokens": 20})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert "injected fault" in events[-1]["error"]["message"] and events[0]["choices"][0]["delta"]["role"]
    with pytest.raises(openai.APIError):
        list(srv.client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}],
                                                stream=True, user=FAULT_INJECTION_USER, max_tokens=20))
    with pytest.raises(openai.InternalServerError):
        srv.client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}],
                                           user=FAULT_INJECTION_USER, max_tokens=20)
    for t in threads:
        t.join(10)
    assert [results[i].choices[0].text for i in range(6)] == [greedy(i + 1, 20) for i in range(6)]
    out = srv.client.completions.create(model=BASE, prompt="after", max_tokens=3, temperature=0)
    assert out.choices[0].text == greedy(5, 3)


def test_fault_needs_the_environment(srv, monkeypatch):
    monkeypatch.delenv(FAULT_INJECTION_ENV, raising=False)
    r = srv.post("/v1/completions", {"prompt": "boom", "max_tokens": 3, "user": FAULT_INJECTION_USER})
    assert r.status_code == 200 and srv.last.fault is False


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_stream_disconnect_cancels(fresh):
    s = fresh(step_s=0.01)
    with s.http.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 200, "stream": True}) as r:
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("data: ")
        rid = s.last.request_id
    # the response is closed: the server cancels the engine request
    wait_for(lambda: rid in s.engine.cancelled)
    wait_for(lambda: s.engine.num_running == 0)


def test_non_stream_disconnect_cancels(fresh):
    s = fresh()
    s.engine.pause()
    with pytest.raises(httpx.TimeoutException):
        s.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=0.3)
    rid = s.last.request_id
    wait_for(lambda: rid in s.engine.cancelled)  # while it is still waiting for a slot


def test_engine_error_before_streaming_is_500(fresh):
    """A request the engine fails before its first event gets a 500 status, not a 200 stream."""
    s = fresh()
    original = s.engine.submit

    def failing_submit(request):
        original(request)
        from jaxqlora.serving.request import Output

        s.engine.cancel(request.request_id)  # make sure the engine does not run it
        request.callback(Output(request.request_id, finished=True, finish_reason="error",
                                error=ValueError("bad slot")))

    s.engine.submit = failing_submit
    for stream in (False, True):
        err = check_error(s.post("/v1/completions", {"prompt": "x", "stream": stream}), 500, type="server_error")
        assert "bad slot" in err["message"]


# --- metrics


def test_metrics(srv):
    srv.client.completions.create(model=BASE, prompt="metrics", max_tokens=5, temperature=0)
    r = srv.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text

    def value(name):
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        assert m, name
        return float(m.group(1))

    assert value("jaxqlora_requests_running") == 0 and value("jaxqlora_requests_waiting") == 0
    assert value("jaxqlora_generation_tokens_total") >= 5
    assert value("jaxqlora_prompt_tokens_total") >= 7
    assert value("jaxqlora_time_to_first_token_seconds_count") >= 1
    assert value("jaxqlora_inter_token_latency_seconds_count") >= 4
    assert 'jaxqlora_requests_finished_total{finish_reason="length"}' in text
    assert 'jaxqlora_time_to_first_token_seconds_bucket{le="+Inf"}' in text
    # each app has its own registry: a second app on the same engine starts from zero
    other = create_app(srv.engine)
    from prometheus_client import generate_latest

    assert "jaxqlora_generation_tokens_total 0.0" in generate_latest(other.state.metrics.registry).decode()


def test_metrics_running_gauge(fresh):
    s = fresh(step_s=0.01)
    with s.http.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 100, "stream": True}) as r:
        next(r.iter_lines())
        text = s.http.get("/metrics").text
        assert "jaxqlora_requests_running 1.0" in text


# --- the serve command


@pytest.fixture
def nothing_is_loaded(monkeypatch):
    import jaxqlora.io

    def forbidden(*args, **kwargs):
        raise AssertionError("a bad argument reached the loader")

    monkeypatch.setattr(jaxqlora.io, "load_pretrained", forbidden)


def refused(argv, capsys, *expected):
    from jaxqlora.cli import main

    t0 = time.perf_counter()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert time.perf_counter() - t0 < 5.0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.mark.parametrize("args,expected", [
    (["--port", "-1"], ["--port", "[0, 65535]"]),
    (["--port", "70000"], ["--port", "[0, 65535]"]),
    (["--port", "http"], ["--port", "'http'"]),
    (["--max-batch", "0"], ["--max-batch", "positive integer"]),
    (["--max-model-len", "-5"], ["--max-model-len", "positive integer"]),
    (["--max-queue", "0"], ["--max-queue", "positive integer"]),
    (["--prefill-chunk", "0"], ["--prefill-chunk", "positive integer"]),
    (["--decode-steps", "0"], ["--decode-steps", "positive integer"]),
    (["--grace", "-1"], ["--grace", "non-negative"]),
    (["--grace", "nan"], ["--grace", "'nan'"]),
    (["--adapter", "noequals"], ["--adapter", "NAME=DIR"]),
    (["--adapter", "=dir"], ["--adapter", "NAME=DIR"]),
    (["--adapter", "a b=dir"], ["--adapter", "blanks"]),
    (["--adapter", "a=/no/such/dir"], ["--adapter", "no such folder"]),
    (["--host", ""], ["--host", "empty"]),
    (["--model", "/no/such/model"], ["--model", "no such file or folder"]),
    (["--dtype", "float16"], ["--dtype"]),
])
def test_serve_bad_arguments(args, expected, capsys, nothing_is_loaded):
    refused(["serve", *args], capsys, *expected)


def test_serve_adapter_checks(tmp_path, capsys, nothing_is_loaded):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    refused(["serve", "--adapter", f"x={a}", "--adapter", f"x={b}"], capsys, "--adapter", "twice")
    refused(["serve", "--adapter", f"SmolLM2-135M-Instruct={a}"], capsys, "--adapter", "base model")
    (b / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS"}))
    refused(["serve", "--adapter", f"cls={b}"], capsys, "--adapter", "classification")


def test_serve_port_in_use(capsys, nothing_is_loaded):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = refused(["serve", "--port", port], capsys, f"127.0.0.1:{port}")
    assert "cannot listen" in line


@pytest.fixture
def tiny_hf(tmp_path):
    """An HF folder whose config and safetensors header are all ``serve``'s memory check reads
    (the fake engine's loader reads nothing): 2 layers, 1 KV head of 8, 512 positions."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}))
    save_file({"model.embed_tokens.weight": np.zeros((64, 16), np.float32)}, str(folder / "model.safetensors"))
    return folder


def test_serve_memory_check(monkeypatch, capsys, nothing_is_loaded, tiny_hf):
    import jaxqlora.memory

    # weights 64 x 16 x 4 bytes = 4096; KV cache 2 x 2 layers x 4 slots x 100 tokens x 1 x 8 x 4 bytes = 51,200
    monkeypatch.setattr(jaxqlora.memory, "device_memory", lambda device=None: 55_000)
    line = refused(["serve", "--model", tiny_hf, "--port", "0", "--max-batch", "4", "--max-model-len", "100",
                    "--dtype", "float32"], capsys, "the server needs about 0.00 GB", "KV cache", "device has 0.00 GB")
    assert "--max-batch 4 x --max-model-len 100" in line
    refused(["serve", "--model", tiny_hf, "--port", "0", "--max-model-len", "1000"], capsys, "--max-model-len 1000",
            "max_position_embeddings 512")


def _start_cli(*args, env=None):
    """``python tests/fake_engine.py serve --port 0 ...``: the real CLI with the fake engine."""
    script = Path(__file__).with_name("fake_engine.py")
    proc = subprocess.Popen([sys.executable, str(script), "serve", "--port", "0", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    line = proc.stdout.readline()
    m = re.fullmatch(r"serving (\S+) at (http://127\.0\.0\.1:\d+) \(OpenAI base URL: (\S+)\)\n", line)
    if not m:
        proc.kill()
        raise AssertionError(line + proc.stderr.read())
    assert m.group(3) == m.group(2) + "/v1"
    return proc, m.group(2), m.group(1)


def test_serve_cli_sigterm_drains(tmp_path, tiny_hf):
    adapter = tmp_path / "ad"
    adapter.mkdir()
    proc, url, name = _start_cli("--model", tiny_hf, "--grace", "10", "--adapter", f"mine={adapter}")
    try:
        assert name == "tiny-llama"
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [name, "mine"]
        with httpx.stream("POST", url + "/v1/completions", timeout=20,
                          json={"prompt": "x", "max_tokens": 40, "stream": True, "temperature": 0}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.4)
            with pytest.raises(httpx.ConnectError):  # no new connection
                httpx.get(url + "/health", timeout=2)
            rest = "\n".join(lines)
        assert rest.rstrip().endswith("data: [DONE]")
        assert '"finish_reason":"length"' in rest  # the in-flight request finished
        assert proc.wait(20) == 0
        err = proc.stderr.read()
        assert "SIGTERM" in err and "Traceback" not in err
    finally:
        proc.kill()


def test_serve_cli_grace_aborts(tiny_hf):
    proc, url, _ = _start_cli("--model", tiny_hf, "--grace", "0.3")
    try:
        with httpx.stream("POST", url + "/v1/completions", timeout=20,
                          json={"prompt": "x", "max_tokens": 500, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGINT)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and "aborted" in rest[-2]
        assert proc.wait(20) == 0
    finally:
        proc.kill()
