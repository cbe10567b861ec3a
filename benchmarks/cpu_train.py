"""The CPU train step of ``jaxqlora finetune`` (issue 26 section 1): this tree against another
commit in the same run.

What it times is what the README's first command runs, with each tree's own defaults
(``jaxqlora finetune``: the embedded SmolLM2-135M-Instruct, NF4, LoRA r=16 on the seven
projections, last-token classification head, the embedded Rotten Tomatoes training split, the
``--dtype`` its parser gives on this machine):

- ``train L``: one optimizer step of 16 x L tokens, for every bucket L the default run's 350
  steps use (with the CPU buckets of 2026-12-07, 16, 24, 32, 40, 48 and 64; before, 32 and 64),
  on the first training batch of that bucket in the run's data order; seconds per step over
  ``--calls`` queued steps and one sync;
- ``eval L``: one evaluation batch of 64 x L tokens, for every bucket the validation and test
  splits use.

Each tree counts its own default run's batches per bucket (its own buckets, data order and
step count) and times its own buckets. Each tree is one worker process that builds the model as
`jaxqlora.finetune` does (compiled over the shapes-only model, then the weights loaded and
attached) and warms every step up; the rounds
then alternate between the workers (one call at a time, never two at once), so that whatever else
runs on the machine falls on both alike. Every figure is the median of ``--rounds`` rounds with its
[min-max]; the ratio is base time over this tree's. The last rows weigh the medians by the default
run's batch counts (350 train steps, 58 evaluation batches) to estimate its training and
evaluation time. The base tree is a ``git worktree`` of ``--base`` (removed afterwards).

    python benchmarks/cpu_train.py                      # base: main before issue 26 section 1
    python benchmarks/cpu_train.py --base 90a11ac --rounds 7
    python benchmarks/cpu_train.py --profile 64         # this tree's step, split by what XLA:CPU runs
    python benchmarks/cpu_train.py --floor              # this tree's calls against their matmuls alone

``--floor`` times, in one process, each call of the default run and the float32 matmuls it
cannot avoid: the frozen projections of every layer (``x @ W.T`` and, for a train step, the input
gradient ``g @ W``) at the call's token count, as plain XLA:CPU dots of the same shapes on fresh
random data. Their sum over the default run's batch counts is the time the run's matmuls need at
the speed this machine's XLA:CPU gives them, before any dequantization, attention, LoRA,
elementwise work, compilation or loading. Each round times every call, then every call's dots;
a call's figure is its median over the rounds, its dots' figure the fastest round (the least the
products took on this machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "bb558bd"  # main just before issue 26 section 1 (the CPU train step): the parent of its first commit


# ------------------------------------------------------------------ worker side


def _setup():
    """finetune's default trainer on this tree, compiled and attached, with the first training batch
    ``[1, 16, L]`` and test batch ``[64, L]`` of each bucket the default run uses, and the run's batch
    counts ``{"train L" | "eval L": count}``: ``(cfg, trainer, train, evals, compile_s, work)``."""
    import jax.numpy as jnp

    from jaxqlora import data as D
    from jaxqlora import finetune as F
    from jaxqlora.cli import build_parser
    from jaxqlora.train import Trainer, classification_loss, make_optimizer

    args = build_parser().parse_args(["finetune"])
    fields = {f.name for f in dataclasses.fields(F.FinetuneConfig)}
    cfg = F.FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    pad_id, parts, enc, _, _ = F._prepare(cfg)
    per_epoch = max(1, D.num_batches(len(enc["train"].ids), cfg.batch_size) // cfg.grad_accum)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, int(round(cfg.epochs * per_epoch)))
    if cfg.buckets is None and hasattr(F, "default_buckets"):  # as finetune chooses them (trees since 2026-12-07)
        cfg = dataclasses.replace(cfg, buckets=F.default_buckets(total * cfg.batch_size * cfg.grad_accum))
    optimizer, _ = make_optimizer(cfg.lr, total_steps=cfg.max_steps, warmup_ratio=cfg.warmup_ratio,
                                  schedule=cfg.schedule, weight_decay=cfg.weight_decay,
                                  max_grad_norm=cfg.max_grad_norm)
    trainer = Trainer(F._abstract_model(cfg, len(parts["train"].label_names)), classification_loss, optimizer)
    t0 = time.perf_counter()
    F._precompile(trainer, cfg, lambda *_: None)
    compile_s = time.perf_counter() - t0
    trainer.attach(F._load_model(cfg, len(parts["train"].label_names), lambda *_: None))

    # The default run's batches: its train steps in data order, then validation and test.
    train, evals, work = {}, {}, {}
    for i, (_, b) in enumerate(F._epoch_batches(enc["train"], cfg, pad_id, 0, 0)):
        if i == total:
            break
        n = b["input_ids"].shape[-1]
        train.setdefault(n, {k: jnp.asarray(v) for k, v in b.items()})
        work[f"train {n}"] = work.get(f"train {n}", 0) + 1
    for split in ("validation", "test"):
        for b in D.batches(enc[split], cfg.eval_batch_size, F._buckets(cfg), pad_id=pad_id, group_by_length=True):
            n = b["input_ids"].shape[1]
            evals.setdefault(n, b)
            work[f"eval {n}"] = work.get(f"eval {n}", 0) + 1
    return cfg, trainer, train, evals, compile_s, work


def _worker(calls: int) -> None:
    """Build finetune's default trainer (`_setup`), warm up, then answer one command per stdin
    line ("train L" | "eval L") with one JSON line: seconds per call."""
    import jax

    cfg, trainer, train, evals, compile_s, work = _setup()

    def run(kind: str, length: int) -> float:
        t0 = time.perf_counter()
        out = [trainer.step(train[length]) if kind == "train" else trainer.evaluate_batch(evals[length])
               for _ in range(calls)]
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / calls

    for key in work:  # warm up
        kind, length = key.split()
        run(kind, int(length))
    import jaxqlora

    print(json.dumps({"ready": True, "dtype": cfg.param_dtype.name if hasattr(cfg, "param_dtype") else cfg.dtype,
                      "backend": jax.default_backend(), "compile_s": compile_s, "work": work,
                      "package": str(Path(jaxqlora.__file__).parent)}), flush=True)
    for line in sys.stdin:
        if line.strip():
            kind, length = line.split()
            print(json.dumps({"s": run(kind, int(length))}), flush=True)


# ------------------------------------------------------------------ floor (this tree)


def _floor(calls: int, rounds: int) -> None:
    """Each call of the default run (`_setup`) and the float32 XLA:CPU dots of its frozen
    projections alone, ``rounds`` rounds of ``calls`` queued calls; prints the table (see the
    module docstring)."""
    import common
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxqlora.io.pretrained import load_config

    cfg, trainer, train, evals, compile_s, work = _setup()
    mc = load_config(cfg.model)
    d, f = mc.hidden_size, mc.intermediate_size
    q, kv = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    shapes = [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]  # q k v o gate up down: W [out, in]
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]

    @jax.jit
    def fwd(xs, ws):
        return [x @ w.T for x, w in zip(xs, ws)]

    @jax.jit
    def fwd_dx(xs, gs, ws):
        return [x @ w.T for x, w in zip(xs, ws)] + [g @ w for g, w in zip(gs, ws)]

    def timed(fn, *a):
        t0 = time.perf_counter()
        out = [fn(*a) for _ in range(calls)]
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / calls

    keys = sorted(work, key=lambda k: (k.split()[0] != "train", int(k.split()[1])))
    layers = mc.num_hidden_layers
    plan = {}
    for k in keys:
        kind, n = k.split()
        tokens = (train if kind == "train" else evals)[int(n)]["input_ids"].size  # the call's rows x length
        xs = [jnp.asarray(rng.standard_normal((tokens, w.shape[1])), jnp.float32) for w in weights]
        gs = [jnp.asarray(rng.standard_normal((tokens, w.shape[0])), jnp.float32) for w in weights]
        dots = (lambda xs=xs, gs=gs: fwd_dx(xs, gs, weights)) if kind == "train" else (lambda xs=xs: fwd(xs, weights))
        call = ((lambda n=int(n): trainer.step(train[n])) if kind == "train"
                else (lambda n=int(n): trainer.evaluate_batch(evals[n])))
        flop = (4 if kind == "train" else 2) * tokens * layers * sum(a * b for a, b in shapes)
        plan[k] = (dots, call, flop)
        timed(dots), timed(call)  # warm up
    times = {(k, what): [] for k in keys for what in ("call", "dots")}
    for r in range(rounds):  # a round: every call, then every call's dots (each after the others' dots)
        for k in keys:
            times[(k, "call")].append(timed(plan[k][1]))
        for k in keys:
            times[(k, "dots")].append(timed(plan[k][0]) * layers)  # one layer's products, times the layers
        print(f"# round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    # the calls: median; the dots: the fastest round (a floor: the least these products took here)
    med = {key: (statistics.median if key[1] == "call" else min)(v) for key, v in times.items()}
    head, dirty = common.tree_state()
    print(f"CPU calls of `jaxqlora finetune` (defaults, {cfg.param_dtype.name}) against the "
          f"float32 XLA:CPU dots of their frozen projections ({layers} layers), {os.cpu_count()} cores, tree {head}"
          f"{' + uncommitted changes' if dirty else ''}; seconds per call over {rounds} rounds of {calls} "
          f"queued calls\n")
    print("| call (batches in the run) | this tree s (median [min-max]) | projections' dots alone s (fastest [min-max]) "
          "| GFLOP/s of the dots | call / dots |")
    print("|---|---|---|---|---|")
    for k in keys:
        kind, n = k.split()
        rows = (train if kind == "train" else evals)[int(n)]["input_ids"].size // int(n)
        what = f"train step {rows}x{n}" if kind == "train" else f"eval batch {rows}x{n}"
        print(f"| {what} ({work[k]}) | {common.spread(times[(k, 'call')])} | {common.spread(times[(k, 'dots')])} | "
              f"{plan[k][2] / med[(k, 'dots')] / 1e9:.0f} | {med[(k, 'call')] / med[(k, 'dots')]:.2f}x |")
    for kind, label in (("train", "the default run's train steps, s"), ("eval", "validation + test, s")):
        est = {w: sum(c * med[(k, w)] for k, c in work.items() if k.startswith(kind)) for w in ("call", "dots")}
        print(f"| {label} | {est['call']:.0f} | {est['dots']:.0f} | | {est['call'] / est['dots']:.2f}x |")
    print(f"\ncompile (this process, cold or from the persistent cache): {compile_s:.1f} s")


# ------------------------------------------------------------------ profile (this tree)

def _profile(length: int, steps: int = 2) -> None:
    """Profile ``steps`` train steps of 16 x ``length`` tokens on this tree (``jax.profiler`` trace
    after a warm-up) and print the time of XLA:CPU's compute threads per step, split by what each
    executed HLO instruction computes: its fused computation's ops (a dot; uint8 codes looked up in
    the NF4 codebook; a dynamic-update-slice into a ``[layers, ...]`` stack) and the source files and
    functions of their stack frames (nf4_matmul, lora, Attention, optax). Thread time, not wall
    time: on a busy machine a thread's time includes what others took from it. Another tree:
    ``PYTHONPATH=that_tree python benchmarks/cpu_train.py --profile 64``."""
    import collections
    import glob
    import re

    import jax

    from jaxqlora.compile import BucketKey

    cfg, trainer, train, _, _, _ = _setup()
    batch = train[length]
    for _ in range(2):
        jax.block_until_ready(trainer.step(batch))
    hlo = trainer.executables[BucketKey("train", tuple(batch["input_ids"].shape))].as_text()
    tmp = tempfile.mkdtemp(prefix="cpu_train_profile_")
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp):
        for _ in range(steps):
            jax.block_until_ready(trainer.step(batch))
    wall = (time.perf_counter() - t0) / steps
    data = jax.profiler.ProfileData.from_file(glob.glob(tmp + "/**/*.xplane.pb", recursive=True)[0])
    shutil.rmtree(tmp, ignore_errors=True)

    # the optimized HLO: stack frames, and each instruction's frames and fused computation
    section, files, funcs, locs, frames = None, {}, {}, {}, {}
    comps, calls, meta, comp = collections.defaultdict(list), {}, {}, None
    for line in hlo.split("\n"):
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if section and not line.strip():
            section = None
            continue
        if section == "FileNames":
            i, name = line.split(" ", 1)
            files[int(i)] = name.strip('"')
        elif section == "FunctionNames":
            i, name = line.split(" ", 1)
            funcs[int(i)] = name.strip('"')
        elif section == "FileLocations":
            m = re.match(r"(\d+) \{file_name_id=(\d+) function_name_id=(\d+)", line)
            locs[int(m[1])] = f"{files[int(m[2])]}:{funcs[int(m[3])]}"
        elif section == "StackFrames":  # printed parent ids are one more than the parent's id (0: none)
            m = re.match(r"(\d+) \{file_location_id=(\d+)(?: parent_frame_id=(\d+))?", line)
            frames[int(m[1])] = (locs[int(m[2])], int(m[3]) - 1 if m[3] else 0)
        elif re.match(r"^(ENTRY )?%\S+ .*\{$", line):
            comp = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        elif comp and re.match(r"^\s+(ROOT )?%\S+ = ", line):
            name = re.match(r"^\s+(?:ROOT )?%(\S+) = ", line)[1]
            frame = re.search(r"stack_frame_id=(\d+)", line)
            fns = []
            f = int(frame[1]) if frame else 0
            while f:
                loc, f = frames[f]
                fns.append(loc)
            fns = [x for x in fns if "SequenceClassifier" not in x and "classification_loss" not in x
                   and "micro" not in x and "compile.py" not in x and "_train_step_flat" not in x]
            comps[comp].append((line, fns))
            meta[name] = (line, fns)
            c = re.search(r"calls=%([\w.\-]+)", line)
            if c:
                calls[name] = c[1]

    layers = trainer.model.lm.num_layers

    def group(name: str) -> str:
        own = [meta[name]] + comps.get(calls.get(name, ""), [])
        body = "\n".join(line for line, _ in own)
        fns = " ".join(f for _, fs in own for f in fs)
        if "u8[" in body and "gather(" in body:
            return "NF4 dequantization"
        if " dot(" in body:
            for key, label in (("nf4_matmul.py", "NF4 base projections: matmuls"), ("lora.py", "LoRA: matmuls"),
                               ("Attention", "attention: matmuls")):
                if key in fns:
                    return label
        elif "dynamic-update-slice(" in body and re.search(rf"= \w+\[{layers},", meta[name][0]):
            return f"scanned stack of saved activations (dynamic-update-slice into [{layers}, ...])"
        elif "lora.py" in fns:
            return "LoRA: dropout masks (threefry bits), adds, copies"
        elif "optax" in fns or "scale_by_lr_schedule" in fns:
            return "optimizer (AdamW, clipping, schedule)"
        return "other: norms, RoPE, SwiGLU, softmax, layer slices, zero-init, copies"

    per = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # XLA:CPU's compute threads
                continue
            for ev in line.events:
                if ev.name in meta:
                    per[group(ev.name)] += ev.duration_ns / 1e9 / steps
    total = sum(per.values())
    print(f"CPU train step 16x{length} of `jaxqlora finetune` (defaults, {cfg.param_dtype.name if hasattr(cfg, 'param_dtype') else cfg.dtype}), "
          f"{os.cpu_count()} cores: {wall:.2f} s wall per step under the trace, {total:.2f} s of XLA compute-thread "
          f"time per step\n")
    print("| part | thread s per step | share |")
    print("|---|---|---|")
    for label, t in per.most_common():
        print(f"| {label} | {t:.2f} | {100 * t / total:.1f}% |")


# ------------------------------------------------------------------ driver side




def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", default=BASE, help="commit to compare with (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    ap.add_argument("--calls", type=int, default=2, help="queued calls per timing (one sync)")
    ap.add_argument("--profile", type=int, metavar="L", help="profile this tree's train step of 16 x L tokens instead")
    ap.add_argument("--floor", action="store_true",
                    help="this tree's calls against the float32 dots of their projections alone (no base tree)")
    args = ap.parse_args()
    if args.floor:
        _floor(args.calls, args.rounds)
        return 0
    if args.profile:
        _profile(args.profile)
        return 0
    if args.worker:
        _worker(args.calls)
        return 0
    import common  # the driver only: a worker imports nothing from this tree but its own jaxqlora

    head, dirty = common.tree_state()
    workers = {}
    with common.base_tree(args.base, "cpu_train_base_") as base_root:
        try:
            for tree, root in (("base", base_root), ("ours", ROOT)):
                t0 = time.perf_counter()
                workers[tree] = w = common.TreeWorker(tree, root, __file__, ["--calls", str(args.calls)])
                print(f"# {tree}: {w.info['package']}, {w.info['dtype']} on {w.info['backend']}, compiled in "
                      f"{w.info['compile_s']:.0f} s, ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                      flush=True)
            keys = sorted({k for w in workers.values() for k in w.info["work"]},
                          key=lambda k: (k.split()[0] != "train", int(k.split()[1])))
            times = {(tree, k): [] for tree, w in workers.items() for k in keys if k in w.info["work"]}
            for r in range(args.rounds):
                for k in keys:
                    for tree, w in workers.items():
                        if (tree, k) in times:
                            times[(tree, k)].append(w.ask(k)["s"])
                print(f"# round {r + 1}/{args.rounds}: " + ", ".join(f"{t} {k} {v[-1]:.2f}s" for (t, k), v in
                                                                   times.items()), file=sys.stderr, flush=True)
        finally:
            for w in workers.values():
                w.close()
    print(f"CPU train step of `jaxqlora finetune` (defaults), {os.cpu_count()} cores; ours = {head}"
          f"{' + uncommitted changes' if dirty else ''} ({workers['ours'].info['dtype']}), base = {args.base} "
          f"({workers['base'].info['dtype']}); seconds per call, median [min-max] of {args.rounds} alternating rounds "
          f"of {args.calls} queued calls\n")
    print("| call | base s (batches) | ours s (batches) | ratio (base / ours) |")
    print("|---|---|---|---|")
    med = {key: statistics.median(v) for key, v in times.items()}
    for k in keys:
        kind, n = k.split()
        what = f"train step 16x{n}" if kind == "train" else f"eval batch 64x{n}"
        cells = [f"{common.spread(times[(t, k)])} ({workers[t].info['work'][k]})" if (t, k) in times else "-"
                 for t in ("base", "ours")]
        ratio = f"{med[('base', k)] / med[('ours', k)]:.2f}x" if all((t, k) in med for t in workers) else "-"
        print(f"| {what} | {cells[0]} | {cells[1]} | {ratio} |")
    for kind, label in (("train", "the default run's train steps, s"), ("eval", "validation + test, s")):
        est = {t: sum(c * med[(t, k)] for k, c in workers[t].info["work"].items() if k.startswith(kind))
               for t in workers}
        print(f"| {label} | {est['base']:.0f} | {est['ours']:.0f} | {est['base'] / est['ours']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
