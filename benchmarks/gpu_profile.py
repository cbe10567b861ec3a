"""Where the time goes: a `jax.profiler` trace of the QLoRA train step and of 4-bit decoding.

Runs the Llama-3-8B-shaped NF4 model of `benchmarks/common.py` with ``--layers`` decoder
layers (per-layer work is the same as in the 32-layer model; fewer layers compile faster),
traces ``--steps`` train steps (batch x length, remat policy) and a short greedy
generation (1 x 512 prompt), writes the Perfetto trace that ``jax.profiler.trace`` makes,
and prints the GPU time per kernel category and the top kernels, summed over the traced
steps, as a share of all GPU kernel time.

``--decode-only`` profiles decoding alone, per token: two traced generations of N and 3N
new tokens after the same 512-token prompt, differenced, give the kernels one decoded token
launches, their GPU busy time against the wall span they take, and the time per kernel
category and per kernel (the kernel count and idle time the issue-13 decode targets ask for).

    python benchmarks/gpu_profile.py --layers 4            # GPU; traces land in runs/profile/
    python benchmarks/gpu_profile.py --decode-only --layers 32 --decode-batches 1,32
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

CATEGORIES = (  # first match wins
    ("NF4 GEMV (Mosaic GPU)", ("nf4_mgpu", "_kernel_body", "mosaic")),
    ("NF4 GEMV (Pallas)", ("nf4_gemv",)),
    ("NF4 dequantize (Pallas)", ("nf4_dequantize",)),
    ("split-KV decode (Pallas)", ("decode_attention",)),
    ("RMSNorm (Pallas)", ("rms_norm",)),
    ("SwiGLU (Pallas)", ("swiglu",)),
    ("matmul (cuBLAS/cuDNN)", ("gemm", "cublas", "cutlass", "nvjet", "sm90_xmma", "matmul", "dot")),
    ("attention (cuDNN/XLA)", ("flash", "fmha", "softmax", "cudnn")),
    ("XLA fusions", ("fusion", "loop_", "input_", "reduce", "convert", "copy", "transpose", "slice",
                     "concatenate", "broadcast", "select", "scatter", "gather", "dynamic")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def gpu_kernel_events(trace_dir: Path) -> list[dict]:
    """The complete ("X") events on a GPU stream of the Perfetto trace under ``trace_dir`` (the
    one ``jax.profiler.trace(..., create_perfetto_trace=True)`` writes); prints the processes
    it holds when none is a GPU."""
    path = next(trace_dir.rglob("perfetto_trace.json.gz"))
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "/device:GPU" in str(e.get("args", {}).get("name", ""))}
    if not gpu_pids:
        names = sorted({str(e.get("args", {}).get("name")) for e in events if e.get("name") == "process_name"})
        print(f"# no GPU process in {path}; processes: {names}")
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e]


def device_events(trace_dir: Path, with_ts: bool = False, module: str | None = None):
    """(name, dur_us) of every kernel event on a GPU stream in the Perfetto trace
    (``(name, dur_us, ts_us, in_cuda_graph)`` with ``with_ts``); with ``module``, only the
    kernels of the XLA modules whose name contains it (the events' ``hlo_module``)."""
    out = []
    for e in gpu_kernel_events(trace_dir):
        args = e.get("args", {})
        if module is not None and module not in str(args.get("hlo_module", "")):
            continue
        out.append((e["name"], float(e["dur"]))
                   + ((float(e["ts"]), "cuda_graph_id" in args) if with_ts else ()))
    return out


def module_profile(trace_dir: Path) -> dict:
    """GPU kernel time per XLA module (the events' ``hlo_module``, e.g. ``jit_decode_chunk``)
    in the Perfetto trace under ``trace_dir``: ``{"span_us": first kernel start to last kernel
    end, "busy_us": all kernels' summed time, "modules": {module: (kernels, busy_us)}}``."""
    mods = collections.defaultdict(lambda: [0, 0.0])
    t0, t1 = float("inf"), float("-inf")
    for e in gpu_kernel_events(trace_dir):
        m = mods[str(e.get("args", {}).get("hlo_module", "?"))]
        m[0] += 1
        m[1] += float(e["dur"])
        t0, t1 = min(t0, float(e["ts"])), max(t1, float(e["ts"]) + float(e["dur"]))
    return {"span_us": max(t1 - t0, 0.0), "busy_us": sum(b for _, b in mods.values()),
            "modules": {k: tuple(v) for k, v in mods.items()}}


def per_token(short, long, tokens: int) -> dict:
    """What one decoded token adds: the events of a ``long`` generation minus those of a
    ``short`` one (same prompt and prefill) over the ``tokens`` between them. Returns the
    kernel count, the GPU busy time and the span from the first to the last kernel (us),
    and the per-kernel-name counts and busy times, and the share of the kernels launched
    from a CUDA graph (XLA command buffers)."""
    if not short or not long:
        raise SystemExit("no GPU kernel events traced (decoding is profiled on a GPU only)")

    def span(ev):
        return max(t + d for _, d, t, _ in ev) - min(t for _, _, t, _ in ev)
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for sign, ev in ((1, long), (-1, short)):
        for name, d, _, _ in ev:
            by_name[name][0] += sign
            by_name[name][1] += sign * d
    return {"kernels": (len(long) - len(short)) / tokens,
            "busy_us": (sum(d for _, d, _, _ in long) - sum(d for _, d, _, _ in short)) / tokens,
            "in_graph": sum(g for *_, g in long) / len(long),
            "span_us": (span(long) - span(short)) / tokens,
            "by_name": {k: (c / tokens, d / tokens) for k, (c, d) in by_name.items()}}


def report_decode(title: str, tok: dict, batch: int = 1) -> None:
    """Print `per_token`'s result: kernels per token, busy vs span (and the tokens/s the span
    gives for ``batch`` sequences), categories, top kernels."""
    busy, span = tok["busy_us"], tok["span_us"]
    print(f"\n# {title}: {1e6 * batch / span:.1f} tokens/s from the traced span")
    print(f"\n## {title}: {tok['kernels']:.1f} kernels per token, GPU busy {busy:.1f} us of a "
          f"{span:.1f} us span per token ({100 * busy / span:.1f}% busy; "
          f"{(span - busy) / max(tok['kernels'], 1):.2f} us idle per kernel; "
          f"{100 * tok['in_graph']:.0f}% of the loop's kernels launched from CUDA graphs)")
    cats = collections.defaultdict(lambda: [0.0, 0.0])
    for name, (c, d) in tok["by_name"].items():
        cats[category(name)][0] += c
        cats[category(name)][1] += d
    print("| category | kernels per token | us per token | share of busy |\n|---|---|---|---|")
    for cat, (c, d) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
        print(f"| {cat} | {c:.1f} | {d:.1f} | {100 * d / busy:.1f}% |")
    print("\n| top kernels | per token | us per token | us per call |\n|---|---|---|---|")
    for name, (c, d) in sorted(tok["by_name"].items(), key=lambda kv: -kv[1][1])[:16]:
        print(f"| `{name[:70]}` | {c:.1f} | {d:.1f} | {d / c if c else 0:.2f} |")


def report(title: str, events, steps: int) -> None:
    """Print GPU time per category and the top kernels of ``steps`` traced steps; with
    ``device_events(..., with_ts=True)`` events, also kernels per step, the span from the
    first kernel's start to the last one's end per step (busy against span: a span far
    above the busy time means the GPU waits for the host) and the share launched from CUDA
    graphs."""
    total = sum(e[1] for e in events) or 1.0
    by_cat, by_name = collections.Counter(), collections.Counter()
    for name, dur, *_ in events:
        by_cat[category(name)] += dur
        by_name[name] += dur
    print(f"\n## {title}: GPU kernel time {total / steps / 1e3:.2f} ms per step ({len(events)} kernels traced)")
    if events and len(events[0]) == 4:
        span = max(t + d for _, d, t, _ in events) - min(t for _, _, t, _ in events)
        print(f"{len(events) / steps:.1f} kernels per step; GPU busy {total / steps / 1e3:.2f} ms of a "
              f"{span / steps / 1e3:.2f} ms span per step ({100 * total / span:.1f}% busy; "
              f"{(span - total) / len(events):.2f} us idle per kernel; "
              f"{100 * sum(g for *_, g in events) / len(events):.0f}% launched from CUDA graphs)")
    print("| category | ms per step | share |\n|---|---|---|")
    for cat, d in by_cat.most_common():
        print(f"| {cat} | {d / steps / 1e3:.3f} | {100 * d / total:.1f}% |")
    print("\n| top kernels | ms per step | share |\n|---|---|---|")
    for name, d in by_name.most_common(12):
        print(f"| `{name[:70]}` | {d / steps / 1e3:.3f} | {100 * d / total:.1f}% |")


def report_ops(events: list[dict], steps: int, n: int) -> None:
    """Print the ``n`` HLO ops (each kernel event's ``hlo_op`` argument, with its kernel name)
    that take the most GPU time per step, with their launches per step: maps a kernel such
    as ``memcpy32_post`` back to the ops of the optimized HLO (``XLA_FLAGS=--xla_dump_to``)."""
    time, count = collections.Counter(), collections.Counter()
    for e in events:
        key = (str(e.get("args", {}).get("hlo_op", "?")), e["name"][:48])
        time[key] += float(e["dur"])
        count[key] += 1
    print("\n| hlo_op | kernel | launches per step | ms per step |\n|---|---|---|---|")
    for (op, name), d in time.most_common(n):
        print(f"| `{op[:60]}` | `{name}` | {count[(op, name)] / steps:.1f} | {d / steps / 1e3:.3f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--remat", default="dots")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--new", type=int, default=16, help="decode steps traced")
    ap.add_argument("--out", default="runs/profile")
    ap.add_argument("--decode-only", action="store_true",
                    help="skip the train step; profile decoding per token (see --decode-batches)")
    ap.add_argument("--decode-batches", default="1",
                    help="with --decode-only: comma-separated batch sizes, 512-token prompts")
    ap.add_argument("--in-place", choices=["default", "on", "off"], default="default",
                    help="train step: CausalLM.params_in_place (default: the library's, on for a GPU)")
    ap.add_argument("--ops", type=int, default=0, metavar="N",
                    help="train step: also print the N HLO ops (the events' hlo_op) with the most GPU time")
    ap.add_argument("--train-only", action="store_true", help="skip the generation profile")
    ap.add_argument("--kernel-codes", action="store_true",
                    help="jaxqlora.quantize.use_kernel_codes first (the GEMV's layout of the codes)")
    args = ap.parse_args()

    import jax
    import numpy as np

    from jaxqlora.generate import generate, precompile_generate
    from jaxqlora.lora import apply_lora
    from jaxqlora.train import Trainer, causal_lm_loss, make_optimizer

    cfg = dataclasses.replace(common.MODELS[args.model], num_hidden_layers=args.layers)
    out = Path(args.out)
    print(f"# {common.device_line()} | {args.model} shape, {args.layers} layers | "
          f"train {args.batch}x{args.length} remat={args.remat} | decode 1x512")

    lm = common.random_nf4_model(cfg)
    if args.kernel_codes:
        from jaxqlora.quantize import use_kernel_codes

        print(f"# use_kernel_codes: {use_kernel_codes(lm) / 1e9:.2f} GB added")
    if args.decode_only:
        return decode_profile(lm, cfg, args, out)
    apply_lora(lm, r=16, alpha=32.0, dropout=0.05)
    lm.remat = args.remat  # "none": no remat
    lm.params_in_place = common.IN_PLACE[args.in_place]
    trainer = Trainer(lm, causal_lm_loss, make_optimizer(2e-4, total_steps=100)[0])
    trainer.precompile(args.batch, (args.length,), log=lambda m: None)
    batch = jax.device_put(common.causal_batch(cfg, args.batch, args.length))
    jax.block_until_ready(trainer.step(batch)["loss"])
    with jax.profiler.trace(str(out / "train"), create_perfetto_trace=True):
        for _ in range(args.steps):
            m = trainer.step(batch)
        jax.block_until_ready(m["loss"])
    report(f"train step {args.batch}x{args.length} remat={args.remat}", device_events(out / "train", with_ts=True),
           args.steps)
    if args.ops:
        report_ops(gpu_kernel_events(out / "train"), args.steps, args.ops)
    if args.train_only:
        return 0

    trainer.sync_model()  # the step donated the LoRA buffers: write the live ones back
    lm.remat = False
    tok = common.TokenIds()
    ex = precompile_generate(lm, tok, batch_size=1, prompt_lens=(512,), max_new_tokens=args.new,
                             ignore_eos=True, log=lambda m: None)
    prompt = np.random.default_rng(1).integers(1, cfg.vocab_size, (1, 512)).tolist()
    generate(lm, tok, prompt, max_new_tokens=args.new, ignore_eos=True, return_ids=True, executables=ex)
    with jax.profiler.trace(str(out / "decode"), create_perfetto_trace=True):
        generate(lm, tok, prompt, max_new_tokens=args.new, ignore_eos=True, return_ids=True, executables=ex)
    report(f"generate 1x512 + {args.new} tokens (prefill included)", device_events(out / "decode"), args.new)
    return 0


def decode_profile(lm, cfg, args, out: Path) -> int:
    """Per-token kernel profile of greedy decoding: two traced generations of ``args.new``
    and ``3 * args.new`` tokens after the same 512-token prompt, differenced (`per_token`),
    counting only the decode loop's kernels (the two prefills are separate executables
    with their own kernel names)."""
    import jax
    import numpy as np

    from jaxqlora.generate import generate, precompile_generate

    tok = common.TokenIds()
    short, long = args.new, 3 * args.new
    for b in (int(x) for x in args.decode_batches.split(",")):
        prompt = np.random.default_rng(b).integers(1, cfg.vocab_size, (b, 512)).tolist()
        events = {}
        for new in (short, long):
            ex = precompile_generate(lm, tok, batch_size=b, prompt_lens=(512,), max_new_tokens=new,
                                     ignore_eos=True, log=lambda m: None)
            for _ in range(2):
                generate(lm, tok, prompt, max_new_tokens=new, ignore_eos=True, return_ids=True,
                         executables=ex)
            d = out / f"decode_b{b}_n{new}"
            with jax.profiler.trace(str(d), create_perfetto_trace=True):
                generate(lm, tok, prompt, max_new_tokens=new, ignore_eos=True, return_ids=True,
                         executables=ex)
            events[new] = device_events(d, with_ts=True, module="decode_chunk")
        report_decode(f"decode batch {b} x 512-token prompt, {cfg.num_hidden_layers} layers "
                      f"(tokens {short + 1}..{long})", per_token(events[short], events[long], long - short), b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
