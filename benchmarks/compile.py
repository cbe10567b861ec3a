"""Ahead-of-time compile times, cold and with a warm persistent cache.

For the Llama-3-8B-shaped and SmolLM2-135M-shaped QLoRA models (NF4 + double quant, bf16,
LoRA r=16 alpha=32 on all seven projections), from the models' shapes alone (no weights):

- ``train``: `jaxqlora.train.Trainer.precompile` of one train step (8B: 4x2048 with
  ``--remat`` (default dots); SmolLM2: 16x512 without remat);
- ``generate``: `jaxqlora.generate.precompile_generate` for one sequence, a 512-token
  prompt bucket and 128 new tokens (prefill and decode loop).

Each model runs twice in fresh processes sharing a new, empty cache folder
(``JAXQLORA_COMPILE_CACHE``): the first compiles (cold), the second reads the cache (warm).
Times are `precompile`'s: lowering (tracing to StableHLO, never cached) plus compile.

    python benchmarks/compile.py            # on one GPU, < 10 minutes
    python benchmarks/compile.py --smoke    # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

# model, train batch, train length, remat
MODELS = [("llama3-8b", 4, 2048, None), ("smollm2-135m", 16, 512, "none")]
SMOKE = [("smoke", 2, 64, None)]


def worker(args) -> dict:
    import jax

    from jaxqlora.generate import precompile_generate
    from jaxqlora.train import Trainer, causal_lm_loss, make_optimizer

    cfg = common.MODELS[args.model]
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    optimizer, _ = make_optimizer(2e-4, total_steps=1000)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    trainer = Trainer(common.abstract_nf4_model(cfg, lora=True, remat=args.remat), causal_lm_loss, optimizer)
    train = trainer.precompile(args.batch, (args.length,), log=log)
    gen = precompile_generate(common.abstract_nf4_model(cfg), common.TokenIds(), prompt_lens=(512,),
                              max_new_tokens=128, ignore_eos=True, log=log)
    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "train": [train.total("lower"), train.total("compile")], "generate": [gen.total("lower"), gen.total("compile")]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--only", default="")
    ap.add_argument("--remat", default="dots", help="remat policy of the 8B train step")
    ap.add_argument("--budget", type=float, default=570.0)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--length", type=int)
    ap.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (compile time vs depth)")
    args = ap.parse_args(argv)
    if args.worker:
        common.emit(worker(args))
        return 0

    t_start = time.perf_counter()
    env = {"JAX_PLATFORMS": "cpu"} if args.smoke else {}
    results = []
    for model, batch, length, remat in (SMOKE if args.smoke else MODELS):
        if args.only not in model:
            continue
        remat = remat or args.remat
        folder = tempfile.mkdtemp(prefix="jaxqlora-compile-bench-")
        wargs = ["--worker", "--model", model, "--batch", str(batch), "--length", str(length), "--remat", remat,
                 "--layers", str(args.layers)]
        runs = []
        for _ in ("cold", "warm"):
            left = args.budget - (time.perf_counter() - t_start)
            runs.append(common.run_worker(__file__, wargs, left, dict(env, JAXQLORA_COMPILE_CACHE=folder)))
            print(f"# {model}: {runs[-1]}", file=sys.stderr, flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        layers = f", {args.layers} layers" if args.layers else ""
        results.append((model, f"{batch}x{length} remat={remat}{layers}", *runs))

    device = next((f"{r['device']} | jax {r['jax']}" for _, _, c, w in results for r in (c, w) if "device" in r), "?")
    print(f"\n# precompile, {time.strftime('%Y-%m-%d')} | {device} | NF4+DQ bf16 LoRA r=16; seconds = lower + compile")
    print("| model | executables | cold s (lower + compile) | warm s (lower + compile) | warm speedup | "
          "compile-stage speedup |")
    print("|---|---|---|---|---|---|")
    for model, train_desc, cold, warm in results:
        for what, desc in (("train", f"train step {train_desc}"), ("generate", "prefill + decode, 1x512, 128 new")):
            if what not in cold or what not in warm:
                print(f"| {model} | {desc} | {cold.get('error', '')} | {warm.get('error', '')} | | |")
                continue
            (cl, cc), (wl, wc) = cold[what], warm[what]
            print(f"| {model} | {desc} | {cl + cc:.1f} ({cl:.1f} + {cc:.1f}) | {wl + wc:.1f} ({wl:.1f} + {wc:.1f}) | "
                  f"{(cl + cc) / (wl + wc):.1f}x | {cc / max(wc, 1e-9):.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
