"""Scaling of the QLoRA train step over GPUs: data-parallel and FSDP (jaxqlora.sharding).

The model is Llama-3-8B-shaped (hidden 4096, MLP 14336, 32 heads / 8 KV heads of 128,
vocab 128256, untied head, 32 layers) with random weights built directly as NF4
(blocksize 64, double quantization: random packed codes and absmax codes; no bf16 copy
of the weights ever exists), bf16 embeddings / LM head / activations, LoRA r=16,
alpha=32, dropout 0.05 on all seven projections, AdamW. Each device gets the same
number of rows (``--rows`` x ``--seq`` tokens per device per step), so the global batch
grows with the device count.

Configurations, each in its own process (clean peak-memory counters): one device (no
mesh), one device through the mesh code path (``mesh1``: a (1, 1) mesh, so the per-device
``shard_map`` wrappers are in the program; its cost alone), then for every device count n in ``--devices`` (default 2, and 4 when present):
data-parallel ``data=n`` and FSDP ``fsdp=n``. Per configuration: tokens/s (median over
``--rounds`` rounds of ``--steps`` queued steps after compilation and a warm-up step),
the frozen state each device holds (`jaxqlora.sharding.bytes_per_device`) and the peak
bytes in use per device (``device.memory_stats()["peak_bytes_in_use"]``, GPU only).
Ratios against one device come last. Targets (issue 7): data-parallel on 2 GPUs
>= 1.8x tokens/s; FSDP on 2 GPUs frozen bytes per device <= 0.55x.

Usage (repository root)::

    python benchmarks/scaling.py                 # GPUs; under 10 minutes on 2 H200s
    python benchmarks/scaling.py --layers 16     # fewer layers (printed in the header)
    python benchmarks/scaling.py --smoke         # tiny model, 8 forced CPU devices (checks it runs)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import common  # benchmarks/common.py; puts the repository root on sys.path
from jaxqlora.config import ModelConfig

ROOT = str(common.ROOT)

# every projection's rows split into 8 shards of whole 64-element blocks (--smoke runs fsdp=8)
SMOKE = ModelConfig(arch="llama", vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64)


# ------------------------------------------------------------------------ worker


def build_model(cfg, shardings_for):
    """A `CausalLM` with random NF4 projections and bf16 embeddings, created on device by
    one jitted function whose outputs have the shardings ``shardings_for(state)`` gives."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxqlora.nf4 import NF4_CODE, create_dynamic_map

    graphdef, state = nnx.split(common.abstract_nf4_model(cfg))  # shapes only (bf16, NF4 bs 64, double quant)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    shardings = jax.tree_util.tree_leaves(shardings_for(state),
                                          is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    nested_code, code = create_dynamic_map(signed=True), np.asarray(NF4_CODE)

    def init(key):
        out = []
        for i, (path, leaf) in enumerate(leaves):
            key_i = jax.random.fold_in(key, i)
            field = getattr(path[-1], "name", None)
            if field in ("packed", "absmax"):
                out.append(jax.random.bits(key_i, leaf.shape, jnp.uint8))
            elif field == "nested_absmax":
                out.append(jnp.full(leaf.shape, 0.01, jnp.float32))
            elif field == "offset":
                out.append(jnp.full((), 0.02, jnp.float32))
            elif field == "nested_code":
                out.append(jnp.asarray(nested_code))
            elif field == "code":
                out.append(jnp.asarray(code))
            elif len(leaf.shape) == 2:  # embeddings, LM head
                out.append((0.02 * jax.random.normal(key_i, leaf.shape, jnp.float32)).astype(leaf.dtype))
            else:  # norms
                out.append(jnp.ones(leaf.shape, leaf.dtype))
        return out

    values = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))


def worker(args) -> dict:
    """One configuration: returns tokens/s, frozen bytes and peak bytes per device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxqlora import sharding
    from jaxqlora.lora import apply_lora
    from jaxqlora.train import Trainer, causal_lm_loss, make_optimizer

    cfg = SMOKE if args.smoke else common.MODELS["llama3-8b"]
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    data, fsdp = args.data, args.fsdp
    n = data * fsdp
    devices = jax.devices()[:n]
    if n == 1 and args.worker == "single":
        mesh = None
        one = jax.sharding.SingleDeviceSharding(devices[0])
        shardings_for = lambda state: jax.tree_util.tree_map(lambda _: one, state)  # noqa: E731
    else:
        mesh = sharding.make_mesh(data, fsdp, devices=devices)
        shardings_for = lambda state: sharding.frozen_shardings(state, mesh)[0]  # noqa: E731
    t0 = time.perf_counter()
    model = build_model(cfg, shardings_for)
    apply_lora(model, r=16, alpha=32.0, dropout=0.05, seed=1)
    model.remat = args.remat
    opt, _ = make_optimizer(2e-4, total_steps=1000)
    trainer = Trainer(model, causal_lm_loss, opt, mesh=mesh)
    build_s = time.perf_counter() - t0

    rows = args.rows * n
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, cfg.vocab_size, (1, rows, args.seq)).astype(np.int32),
             "attention_mask": np.ones((1, rows, args.seq), np.int32),
             "loss_mask": np.ones((1, rows, args.seq), np.float32),
             "weight": np.ones((1, rows), np.float32)}
    batch = ({k: jnp.asarray(v) for k, v in batch.items()} if mesh is None
             else sharding.shard_batch(batch, mesh))
    t0 = time.perf_counter()
    jax.block_until_ready(trainer.step(batch))
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(trainer.step(batch))  # warm-up
    times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            m = trainer.step(batch)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t0) / args.steps)
    step_s = statistics.median(times)
    peaks = []
    for d in devices:
        stats = d.memory_stats() or {}
        peaks.append(stats.get("peak_bytes_in_use"))
    frozen = sharding.bytes_per_device(trainer.frozen)
    return {"config": args.worker, "devices": n, "data": data, "fsdp": fsdp, "rows": rows, "seq": args.seq,
            "tokens_per_step": rows * args.seq, "step_s": step_s, "tokens_per_s": rows * args.seq / step_s,
            "compile_s": compile_s, "build_s": build_s, "loss": float(m["loss"]),
            "frozen_bytes_per_device": max(frozen.values()),
            "peak_bytes_per_device": None if None in peaks else max(peaks),
            "device_kind": devices[0].device_kind, "jax": jax.__version__, "layers": cfg.num_hidden_layers}


# ------------------------------------------------------------------ orchestrator


def _env(args) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    if args.smoke:
        env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    if args.impl:
        env["JAXQLORA_KERNELS"] = args.impl
    return env


def _device_count(args) -> int:
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"], env=_env(args),
                         capture_output=True, text=True, timeout=300)
    return int(out.stdout.strip().splitlines()[-1])


def _run(args, config, data, fsdp) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, "--data", str(data), "--fsdp", str(fsdp),
           "--rows", str(args.rows), "--seq", str(args.seq), "--steps", str(args.steps), "--rounds", str(args.rounds)]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--remat"] if args.remat else []
    cmd += ["--layers", str(args.layers)] if args.layers else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(args), capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r["wall_s"] = time.perf_counter() - t0
            print(f"# {config}: {r['tokens_per_s']:.0f} tokens/s, compile {r['compile_s']:.0f} s, "
                  f"wall {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
            return r
    print(f"# {config} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", file=sys.stderr, flush=True)
    return None


def _mb(x):
    return "n/a" if x is None else f"{x / 1e6:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on 8 forced CPU devices")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 32, smoke 2)")
    p.add_argument("--rows", type=int, default=None, help="rows per device per step (default 4, smoke 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 512, smoke 32)")
    p.add_argument("--steps", type=int, default=5, help="queued steps per timing round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--devices", type=int, nargs="+", default=None,
                   help="device counts beyond 1 (default 2, and 4 when available)")
    p.add_argument("--remat", action="store_true", help="recompute each decoder layer in the backward pass")
    p.add_argument("--impl", choices=["pallas", "xla"], default=None, help="NF4 matmul path (default: auto)")
    p.add_argument("--timeout", type=int, default=540, help="seconds per configuration")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--fsdp", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rows = args.rows or (2 if args.smoke else 4)
    args.seq = args.seq or (32 if args.smoke else 512)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    t_start = time.perf_counter()
    available = _device_count(args)
    counts = args.devices or [c for c in (2, 4) if c <= available]
    configs = [("single", 1, 1), ("mesh1", 1, 1)]  # mesh1: one device through the mesh code path
    for c in counts:
        if c > available:
            print(f"# skipping {c} devices: only {available} visible", file=sys.stderr)
            continue
        configs += [(f"dp{c}", c, 1), (f"fsdp{c}", 1, c)]
    results = [r for r in (_run(args, *c) for c in configs) if r is not None]
    if not results or results[0]["config"] != "single":
        print("the one-device run failed; no table", file=sys.stderr)
        return 1
    base = results[0]
    print(f"# {datetime.date.today()} | {base['device_kind']} x{available} | jax {base['jax']} | "
          f"{'smoke config' if args.smoke else 'Llama-3-8B shape'}, {base['layers']} layers, NF4 (bs 64, double "
          f"quant) + LoRA r=16 all projections, bf16 | {args.rows} rows x {args.seq} tokens per device per step | "
          f"NF4 path {args.impl or 'auto'}{' | remat' if args.remat else ''} | total {time.perf_counter() - t_start:.0f} s")
    print("| config | devices | mesh (data, fsdp) | tokens/step | step ms | tokens/s | frozen MB/device | "
          "peak MB/device | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mesh = "-" if r["config"] == "single" else f"({r['data']}, {r['fsdp']})"
        print(f"| {r['config']} | {r['devices']} | {mesh} | {r['tokens_per_step']} | {r['step_s'] * 1e3:.1f} | "
              f"{r['tokens_per_s']:.0f} | {_mb(r['frozen_bytes_per_device'])} | {_mb(r['peak_bytes_per_device'])} | "
              f"{r['compile_s']:.0f} |")
    print()
    print("| config | tokens/s vs 1 device | frozen bytes/device vs 1 device | peak bytes/device vs 1 device |")
    print("|---|---|---|---|")
    for r in results[1:]:
        peak = ("n/a" if r["peak_bytes_per_device"] is None or base["peak_bytes_per_device"] is None
                else f"{r['peak_bytes_per_device'] / base['peak_bytes_per_device']:.2f}")
        print(f"| {r['config']} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
              f"{r['frozen_bytes_per_device'] / base['frozen_bytes_per_device']:.2f}x | {peak} |")
    by = {r["config"]: r for r in results}
    if "dp2" in by:
        print(f"\ndata-parallel, 2 devices: {by['dp2']['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s "
              "(target >= 1.8x)")
    if "fsdp2" in by:
        print(f"FSDP, 2 devices: frozen bytes per device "
              f"{by['fsdp2']['frozen_bytes_per_device'] / base['frozen_bytes_per_device']:.2f}x (target <= 0.55x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
