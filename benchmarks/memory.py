"""Generation's device memory: the estimate made before any weight exists vs the measured peak.

For each row (model, batch x prompt length, 128 new tokens, greedy), in its own process:
`jaxqlora.generate.generation_memory` compiles prefill and the decode loop over the
abstract NF4 model (random-weight twin of `benchmarks/common.py`, blocksize 64, double
quantization, bf16) and estimates its memory, as ``jaxqlora generate`` does before loading;
then the weights are placed (made on the host, one leaf at a time, so that building them
adds no device temporaries), `jaxqlora.generate` runs with those executables,
and JAX's ``peak_bytes_in_use`` is read. The training estimate (``finetune --dry-run``)
is the "estimate" column of `benchmarks/train.py`.

    python benchmarks/memory.py            # on one GPU, about 3 minutes
    python benchmarks/memory.py --smoke    # tiny shapes on the CPU (checks the script; no peak there)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

ROWS = [("smollm2-135m", 1, 512), ("smollm2-135m", 8, 512), ("llama3-8b", 1, 512), ("llama3-8b", 8, 512),
        ("llama3-8b", 32, 512)]
SMOKE_ROWS = [("smoke", 2, 32)]


def worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxqlora.generate import generate, generation_memory

    cfg = common.MODELS[args.model]
    tok = common.TokenIds()
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.length)).tolist()
    abstract = common.abstract_nf4_model(cfg)
    est, ex = generation_memory(abstract, tok, prompts, max_new_tokens=args.new)
    # weights made on the host and placed leaf by leaf: no device temporaries (common.random_nf4_model's
    # on-device RNG would set the peak for the small model); constant values (memory only, not timed)
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    lm = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, [
        jax.device_put(np.full(x.shape, 0.01 if jnp.issubdtype(x.dtype, jnp.floating) else 1, x.dtype))
        for x in leaves]))
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(nnx.state(lm)))
    ids = generate(lm, tok, prompts, max_new_tokens=args.new, return_ids=True, executables=ex)
    jax.block_until_ready(ids)
    return {"estimate": est["peak_bytes"], "worst": est["worst"], "peak": common.peak_bytes(), "weights": weights,
            "device": jax.devices()[0].device_kind}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget", type=float, default=500.0)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--length", type=int)
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args(argv)
    if args.worker:
        common.emit(worker(args))
        return 0
    t0 = time.perf_counter()
    env = {"JAX_PLATFORMS": "cpu"} if args.smoke else {}
    new = 8 if args.smoke else args.new
    results = []
    for model, batch, length in SMOKE_ROWS if args.smoke else ROWS:
        r = common.run_worker(__file__, ["--worker", "--model", model, "--batch", str(batch), "--length", str(length),
                                         "--new", str(new)], args.budget - (time.perf_counter() - t0), env)
        results.append((model, batch, length, r))
        print(f"# {model} {batch}x{length}: {r}", file=sys.stderr, flush=True)
    device = next((r["device"] for *_, r in results if "device" in r), "?")
    print(f"\n# generation memory: estimate before loading vs measured peak, {time.strftime('%Y-%m-%d')} | {device} "
          f"| NF4+DQ bf16, {new} new tokens")
    print("| model | batch x prompt | weights GB | estimate GB (largest step) | peak GB | estimate / peak |")
    print("|---|---|---|---|---|---|")
    for model, batch, length, r in results:
        if "estimate" not in r:
            print(f"| {model} | {batch}x{length} | {r.get('error', '?')} | | | |")
            continue
        ratio = f"{r['estimate'] / r['peak']:.3f}" if r["peak"] else "n/a"
        print(f"| {model} | {batch}x{length} | {r['weights'] / 1e9:.2f} | {r['estimate'] / 1e9:.2f} ({r['worst']}) | "
              f"{common.gb(r['peak'])} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
