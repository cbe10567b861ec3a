"""Generation speed: jaxqlora vs transformers + bitsandbytes, same run, random NF4 weights.

For a Llama-3-8B-shaped and a SmolLM2-135M-shaped model (NF4 projections with double
quantization, bf16 compute; random weights, EOS ignored, greedy):

- single sequence (batch 1): time to first token (prefill + first sample) and decode
  tokens/s for a 512-token prompt and at 8k context (an 8,064-token prompt), 128 new
  tokens; issue 5: peers 32.1 (8B) and 37.8 (SmolLM2) tokens/s, targets 590 and 1000;
- batched decode, 8 and 32 sequences of 512-token prompts: tokens/s over all rows;
- the bound: bytes read per decode step (NF4 projections, LM head, norms, the KV cache at
  the mean context) over the measured device-to-device copy bandwidth, in tokens/s;
- transformers + bitsandbytes ``generate`` (bf16, ``Linear4bit`` NF4 projections), CUDA only.

decode tokens/s = batch x 127 / (time of 128 new tokens - time to first token); each time
is the median of ``--rounds`` runs after one warm-up. jaxqlora's calls go through
executables from `jaxqlora.generate.precompile_generate` (prompts padded to the prompt
bucket: 512, and 8192 for the 8k row). Each model and each library runs in its own
subprocess. Cold/warm compile times: benchmarks/compile.py.

    python benchmarks/generate.py            # on one GPU, < 10 minutes
    python benchmarks/generate.py --smoke    # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

# (model, peer tok/s from issue 5, target tok/s of single-sequence decode at 512)
MODELS = [("llama3-8b", 32.1, 590), ("smollm2-135m", 37.8, 1000)]
SHAPES = [(1, 512), (1, 8064), (8, 512), (32, 512)]  # (batch, prompt tokens)
NEW = 128
SMOKE = dict(models=[("smoke", None, None)], shapes=[(1, 32), (1, 200), (2, 32), (4, 32)], new=8)


def _prompts(cfg, batch, length, seed=0):
    import numpy as np

    return np.random.default_rng(seed).integers(1, cfg.vocab_size, (batch, length)).astype(np.int32)


def _rate(batch, new, total, ttft) -> float:
    """Decode tokens/s from the time of ``new`` tokens and of the first; NaN when timing
    noise makes the difference non-positive (tiny CPU smoke runs)."""
    return batch * (new - 1) / (total - ttft) if total > ttft else float("nan")


def _decode_bytes(lm, cfg, batch, context) -> int:
    """Bytes one decode step reads: every parameter except the embedding table (one row per
    sequence; tied tables are read whole as the LM head), plus K and V of ``context`` slots."""
    import jax
    from flax import nnx

    total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(nnx.state(lm)))
    emb = lm.model.embed_tokens.weight[...]
    if not cfg.tie_word_embeddings:
        total -= emb.size * emb.dtype.itemsize
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # bf16 K and V per slot
    return total + batch * (context * kv + cfg.hidden_size * emb.dtype.itemsize)


def worker_ours(args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from jaxqlora.compile import PROMPT_BUCKETS, bucket_for
    from jaxqlora.generate import _left_pad, generate, precompile_generate

    cfg = common.MODELS[args.model]
    lm = common.random_nf4_model(cfg, seed=args.seed)
    lm.scan_layers = {"auto": None, "scan": True, "unroll": False}[args.scan_layers]
    tok = common.TokenIds()
    state = nnx.split(lm)[1]
    bw = common.copy_bandwidth(1 << 26 if args.model == "smoke" else 1 << 30)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "copy_gbs": bw / 1e9, "rows": {},
           "compile_s": 0.0}
    for batch, length in args.shapes:
        bucket = bucket_for(length, PROMPT_BUCKETS)
        ex = precompile_generate(lm, tok, batch_size=batch, prompt_lens=(bucket,), max_new_tokens=args.new,
                                 ignore_eos=True, log=lambda m: print(m, file=sys.stderr))
        out["compile_s"] += ex.total()
        ids = _prompts(cfg, batch, length, args.seed)
        padded, mask = _left_pad(np.asarray(ids).tolist(), 0, bucket)  # as generate pads prompts
        prefill = next(c for k, c in ex.items() if k.kind == "prefill")  # first token = prefill + sample
        dev = jax.device_put((padded, mask))
        ttft = common.bench(lambda: prefill(state, *dev, np.int32(0))[0], calls=1, rounds=args.rounds, warmup=1)
        rows = ids.tolist()
        total = common.bench(lambda: generate(lm, tok, rows, max_new_tokens=args.new, ignore_eos=True,
                                              return_ids=True, executables=ex), calls=1, rounds=args.rounds, warmup=1)
        context = length + args.new // 2
        bound = batch * bw / _decode_bytes(lm, cfg, batch, context)
        out["rows"][f"{batch}x{length}"] = {"ttft_s": ttft, "tok_s": _rate(batch, args.new, total, ttft),
                                            "bound_tok_s": bound}
        print(f"# {args.model} {batch}x{length}: {out['rows'][f'{batch}x{length}']}", file=sys.stderr, flush=True)
    return out


def worker_peer(args) -> dict:
    import numpy as np
    import torch
    import transformers

    cfg = common.MODELS[args.model]
    torch.manual_seed(args.seed)
    model = common.peer_model(cfg).eval()
    out = {"versions": f"torch {torch.__version__}, transformers {transformers.__version__}", "rows": {}}
    for batch, length in args.shapes:
        x = torch.tensor(np.asarray(_prompts(cfg, batch, length, args.seed)), dtype=torch.long, device="cuda")

        def run(n):
            def f():
                with torch.no_grad():
                    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)
            return f

        ttft = common.torch_time(run(1), calls=1, rounds=args.rounds, warmup=1)
        total = common.torch_time(run(args.new), calls=1, rounds=args.rounds, warmup=1)
        out["rows"][f"{batch}x{length}"] = {"ttft_s": ttft, "tok_s": _rate(batch, args.new, total, ttft)}
        print(f"# peer {args.model} {batch}x{length}: {out['rows'][f'{batch}x{length}']}", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, no peer")
    ap.add_argument("--only", default="", help="models whose name contains this")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=570.0, help="seconds for the whole run")
    ap.add_argument("--worker", choices=["ours", "peer"])
    ap.add_argument("--model")
    ap.add_argument("--shapes", default="", help="worker: batch x prompt pairs, e.g. 1x512,8x512")
    ap.add_argument("--new", type=int, default=NEW)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scan-layers", choices=["auto", "scan", "unroll"], default="auto",
                    help="CausalLM.scan_layers: auto (default_scan per call), always scan, always unroll")
    args = ap.parse_args(argv)

    if args.worker:
        args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        common.emit(worker_ours(args) if args.worker == "ours" else worker_peer(args))
        return 0

    t_start = time.perf_counter()
    models, shapes, new = (SMOKE["models"], SMOKE["shapes"], SMOKE["new"]) if args.smoke else (MODELS, SHAPES, NEW)
    if args.smoke:
        args.rounds = 2
    models = [m for m in models if args.only in m[0]]
    peer_reason = "--smoke" if args.smoke else "--no-peer" if args.no_peer else common.peer_available()
    env = {"JAX_PLATFORMS": "cpu"} if args.smoke else {}
    shape_arg = ",".join(f"{b}x{p}" for b, p in shapes)
    results = {}
    for model, _, _ in models:
        wargs = ["--model", model, "--shapes", shape_arg, "--new", str(new), "--rounds", str(args.rounds),
                 "--scan-layers", args.scan_layers]
        results[(model, "ours")] = common.run_worker(__file__, ["--worker", "ours"] + wargs,
                                                     args.budget - (time.perf_counter() - t_start), env)
        if peer_reason is None:
            results[(model, "peer")] = common.run_worker(__file__, ["--worker", "peer"] + wargs,
                                                         args.budget - (time.perf_counter() - t_start))

    device = next((f"{r['device']} | jax {r['jax']} | copy {r['copy_gbs']:.0f} GB/s"
                   for r in results.values() if "device" in r), "?")
    print(f"\n# generation, {time.strftime('%Y-%m-%d')} | {device} | NF4+DQ bf16 random weights, greedy, "
          f"{new} new tokens, median of {args.rounds}" + ("" if peer_reason is None else f" | peer not run: {peer_reason}"))
    print("| model | batch x prompt | run | first token ms | decode tokens/s | bound tokens/s | of bound "
          "| vs peer (same run) | vs peer (issue) | target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, ref, target in models:
        ours, peer = results.get((model, "ours"), {}), results.get((model, "peer"), {})
        for run, r in (("jaxqlora", ours), ("transformers+bnb", peer)):
            if not r:
                continue
            if "rows" not in r:
                print(f"| {model} | | {run} | {r.get('error', '?')} | | | | | | |")
                continue
            for (batch, length) in shapes:
                row = r["rows"].get(f"{batch}x{length}")
                if row is None:
                    continue
                bound = row.get("bound_tok_s") or ours.get("rows", {}).get(f"{batch}x{length}", {}).get("bound_tok_s")
                same = peer.get("rows", {}).get(f"{batch}x{length}") if run == "jaxqlora" else None
                single512 = batch == 1 and length == 512
                vs_issue = f"{row['tok_s'] / ref:.1f}x" if ref and single512 else ""
                tgt = ""
                if target and single512 and run == "jaxqlora":
                    tgt = f">= {target}" + (" met" if row["tok_s"] >= target else " not met")
                bound_s = "" if bound is None else f"{bound:,.0f}"
                frac = "" if bound is None else f"{row['tok_s'] / bound:.0%}"
                vs_now = f"{row['tok_s'] / same['tok_s']:.1f}x" if same else ""
                print(f"| {model} | {batch}x{length} | {run} | {row['ttft_s'] * 1e3:.1f} | {row['tok_s']:,.1f} | "
                      f"{bound_s} | {frac} | {vs_now} | {vs_issue} | {tgt} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
