"""``jaxqlora serve`` end to end (issue 24, section 5): the real command in a subprocess on a free
port with the embedded SmolLM2-135M-Instruct in float32 and two LoRA adapters of different
ranks and targets, driven by the official ``openai`` client and ``httpx``.

Checked: chat and streaming, completions ``echo`` + ``logprobs`` against our own scoring of the
same tokens (1e-4), 16 concurrent greedy requests of different lengths equal to the same
requests served one at a time, a mixed-adapter batch equal to single-adapter serving, bad
inputs (400 / 404 / 503), a client that disconnects mid-stream, a fault in one request, and
SIGTERM draining (the last test: it stops the server).

"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest


pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

BASE = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 256
MAX_BATCH = 4
MAX_QUEUE = 16
FAULT_USER = "jaxqlora-fault-injection"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _write_adapter(folder, cfg, r: int, targets: tuple[str, ...], seed: int, use_rslora: bool = False):
    """A PEFT LoRA adapter for the embedded model with random non-zero factors, written from
    the config alone (no model loaded)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (inter, h),
              "up_proj": (inter, h), "down_proj": (h, inter)}
    tensors = {}
    for i in range(cfg.num_hidden_layers):
        for t in targets:
            out, inp = shapes[t]
            kind = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{i}.{kind}.{t}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, 1 / np.sqrt(inp), (r, inp)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, 0.05, (out, r)).astype(np.float32)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "use_rslora": use_rslora, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
        "lora_bias": False}))
    return folder


class _Server:
    def __init__(self, args, env):
        self.proc = subprocess.Popen([sys.executable, "-m", "jaxqlora.cli", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout], daemon=True).start()
        threading.Thread(target=lambda: [self.stderr.append(x) for x in self.proc.stderr], daemon=True).start()
        try:
            line = self.lines.get(timeout=900)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError("serve did not start in 900 s:\n" + "".join(self.stderr)) from None
        m = re.fullmatch(r"serving (\S+) at (http://\S+) \(OpenAI base URL: (\S+)\)\n", line)
        assert m, line + "".join(self.stderr)
        self.name, self.url, self.base_url = m.groups()
        self.client = openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=300)
        self.http = httpx.Client(base_url=self.url, timeout=300)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.http.close()
        self.client.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from jaxqlora.io import load_config

    cfg = load_config(None)
    root = tmp_path_factory.mktemp("serve")
    a1 = _write_adapter(root / "a1", cfg, r=4, targets=("q_proj", "v_proj"), seed=1)
    a2 = _write_adapter(root / "a2", cfg, r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"), seed=2, use_rslora=True)
    env = {**os.environ, "JAXQLORA_FAULT_INJECTION": "1", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    args = ["--dtype", "float32", "--no-keep-quantized", "--max-batch", MAX_BATCH, "--max-model-len", MAX_MODEL_LEN, "--max-queue", MAX_QUEUE,
            "--prefill-chunk", 64,  # prompts over 64 tokens are prefilled in chunks between decode steps
            "--grace", 120, "--adapter", f"a1={a1}", "--adapter", f"a2={a2}"]
    s = _Server([str(a) for a in args], env)
    yield s
    s.stop()


def _complete(server, prompt, max_tokens, model=BASE, **kw):
    out = server.client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)
    return out.choices[0].text, out.choices[0].finish_reason


def test_models(server):
    assert server.name == BASE
    assert [m.id for m in server.client.models.list().data] == [BASE, "a1", "a2"]
    assert server.http.get("/health").status_code == 200


def test_chat_equals_generate(server, ours_f32):
    from jaxqlora.generate import generate

    model, tokenizer = ours_f32
    out = server.client.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=24, temperature=0)
    ids = generate(model, tokenizer, QUESTION, max_new_tokens=24, temperature=0.0, return_ids=True)
    ids = ids[0] if ids and isinstance(ids[0], (list, tuple, np.ndarray)) else ids
    ids = [int(i) for i in ids]
    eos = [i for i, t in enumerate(ids) if t in tokenizer.eos_token_ids]
    expected = tokenizer.decode(ids[:eos[0]] if eos else ids)
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == ("stop" if eos else "length")
    assert out.usage.completion_tokens == len(ids[:eos[0] + 1] if eos else ids)


def test_chat_stream_equals_non_stream(server):
    full = server.client.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=20, temperature=0)
    chunks = list(server.client.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=20, temperature=0,
                                                        stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [
        full.choices[0].finish_reason]


def test_echo_logprobs_equal_our_scoring(server, ours_f32):
    """lm-evaluation-harness loglikelihood: echo, max_tokens 0, logprobs 1, token-id prompt."""
    import jax
    import jax.numpy as jnp

    model, tokenizer = ours_f32
    for text in ("The capital of France is Paris.", "Question: 2 + 2 = ? Answer: 4"):
        ids = tokenizer.encode(text)
        r = server.http.post("/v1/completions", json={"model": BASE, "prompt": ids, "echo": True, "max_tokens": 0,
                                                      "logprobs": 1, "temperature": 0})
        r.raise_for_status()
        choice = r.json()["choices"][0]
        assert choice["text"] == tokenizer.decode(ids)
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) and lp["token_logprobs"][0] is None
        logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray([ids], jnp.int32))[0].astype(jnp.float32), -1))
        ref = np.array([logp[i - 1, ids[i]] for i in range(1, len(ids))])
        np.testing.assert_allclose(np.array(lp["token_logprobs"][1:]), ref, atol=1e-4, rtol=0)
        best = np.array([max(top.values()) for top in lp["top_logprobs"][1:]])
        np.testing.assert_allclose(best, logp[:-1].max(-1), atol=1e-4, rtol=0)
        # text prompt, echo without logprobs: the prompt's text then the completion
        out = server.client.completions.create(model=BASE, prompt=text, echo=True, max_tokens=3, temperature=0)
        assert out.choices[0].text.startswith(text)


def test_concurrent_greedy_equals_one_at_a_time(server):
    prompts = [" ".join(["word"] * (2 + 7 * i)) + f" {i}:" for i in range(16)]
    lengths = [4 + (i * 5) % 9 for i in range(16)]
    alone = [_complete(server, p, n) for p, n in zip(prompts, lengths)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda a: _complete(server, *a), zip(prompts, lengths)))
    assert together == alone


def test_mixed_adapters_equal_single_adapter(server):
    jobs = [(f"Tell me about {topic}.", 8, model) for topic in ("cats", "the sea", "Paris")
            for model in (BASE, "a1", "a2")]
    alone = [_complete(server, p, n, model=m) for p, n, m in jobs]
    assert len({t for t, _ in alone[:3]}) == 3  # the adapters change the output
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: _complete(server, j[0], j[1], model=j[2]), jobs))
    assert together == alone


BAD = [
    ("/v1/completions", '{"prompt": "x",', 400, None, None),
    ("/v1/completions", {"model": BASE, "prompt": "x", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"model": BASE, "prompt": "x", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", None),
    ("/v1/completions", {"model": BASE, "prompt": "x", "n": 2}, 400, "n", None),
    ("/v1/completions", {"model": BASE, "prompt": "x " * 300}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "x " * 300}]}, 400,
     "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "nope", "messages": QUESTION}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": BASE, "messages": []}, 400, "messages", None),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(server, path, body, status, param, code):
    kw = {"json": body} if isinstance(body, dict) else {"content": body, "headers": {"content-type":
                                                                                     "application/json"}}
    r = server.http.post(path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["code"] == code


def test_queue_full_is_503(server):
    def one(i):
        return server.http.post("/v1/completions", json={"model": BASE, "prompt": f"Count to {i}:",
                                                         "max_tokens": 8, "temperature": 0})

    with ThreadPoolExecutor(3 * (MAX_BATCH + MAX_QUEUE)) as pool:
        responses = list(pool.map(one, range(3 * (MAX_BATCH + MAX_QUEUE))))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    assert all(r.headers.get("retry-after") for r in responses if r.status_code == 503)
    assert server.http.get("/health").status_code == 200


def _metric(server, name):
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", server.http.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def test_disconnect_frees_the_slot(server):
    aborted = _metric(server, 'jaxqlora_requests_finished_total{finish_reason="abort"}')
    with server.http.stream("POST", "/v1/completions", json={"model": BASE, "prompt": "Write a long story.",
                                                             "max_tokens": 200, "stream": True, "temperature": 0,
                                                             "ignore_eos": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: {") for x in got)
        assert _metric(server, "jaxqlora_requests_running") == 1
    deadline = time.monotonic() + 10
    while _metric(server, "jaxqlora_requests_running") != 0:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)
    assert _metric(server, 'jaxqlora_requests_finished_total{finish_reason="abort"}') == aborted + 1


def test_fault_fails_only_its_request(server):
    prompts = [f"Name a colour ({i})." for i in range(3)]
    alone = [_complete(server, p, 10) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        normal = [pool.submit(_complete, server, p, 10) for p in prompts]
        bad = pool.submit(server.http.post, "/v1/completions",
                          json={"model": BASE, "prompt": "boom", "max_tokens": 10, "user": FAULT_USER})
        assert [f.result() for f in normal] == alone
        r = bad.result()
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert _complete(server, prompts[0], 10) == alone[0]  # the engine goes on


def test_sigterm_drains_and_exits_0(server):
    """Last: it stops the server."""
    with server.http.stream("POST", "/v1/completions", json={"model": BASE, "prompt": "Once upon a time",
                                                             "max_tokens": 40, "stream": True, "temperature": 0,
                                                             "ignore_eos": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=5)
        rest = "\n".join(lines)
    assert '"finish_reason":"length"' in rest and rest.rstrip().endswith("data: [DONE]")
    assert server.proc.wait(120) == 0
    assert "Traceback" not in "".join(server.stderr)
