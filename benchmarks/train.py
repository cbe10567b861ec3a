"""QLoRA training-step speed and peak GPU memory: jaxqlora vs transformers + PEFT + bitsandbytes.

One optimizer step of QLoRA on random weights: NF4 projections with double quantization
(blocksize 64), bf16 compute, LoRA r=16 alpha=32 (dropout ``--dropout``) on all seven
projections, AdamW (gradient clipping 0.3), causal-LM loss over every token. Rows
(batch x sequence length, rematerialisation):

| config | peer tok/s, GB (issue 5) | target |
|---|---|---|
| Llama-3-8B 4x2048 with checkpointing | 7,706, 21.2 | >= 11,500 at <= 22 GB |
| Llama-3-8B 4x2048 without | 10,867, 76.2 | >= 16,000 at <= 76 GB |
| Llama-3-8B 1x8192 with checkpointing | 7,021, 21.2 | >= 10,500 at <= 22 GB |
| SmolLM2-135M 16x512 without | 41,730 | >= 125,000 |
| SmolLM2-135M 16x64 without (the shape of `jaxqlora finetune`'s steps) | - | - |
| SmolLM2-135M 16x64 classification step (`jaxqlora finetune`'s own: last-token head, no LM head) | - | - |

Checkpointing rows run once per policy of ``--policies`` (``full``: keep layer inputs only;
``dots``: keep matmul outputs, recompute elementwise work; see
`jaxqlora.model.remat_policy`); the peer uses transformers' (non-reentrant) gradient
checkpointing. Every row is its own subprocess, so peak memory is per configuration:
JAX ``memory_stats()["peak_bytes_in_use"]``, torch ``max_memory_allocated`` (after the
weights are built). tokens/s = batch x length / median step time (warm-up, then ``--rounds``
rounds of ``--calls`` queued steps, one sync each). The compile column is `Trainer.precompile`'s
time for the step (lowering + XLA compile, or the persistent-cache load if warm), done as
`jaxqlora.finetune` does it: over the shapes-only model, before the weights exist.

    python benchmarks/train.py                 # on one GPU, < 10 minutes
    python benchmarks/train.py --smoke         # tiny shapes on the CPU (checks the script)
    python benchmarks/train.py --only smollm2  # rows whose name contains "smollm2"
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

# name, model, batch, seq_len, checkpointing, peer (tok/s, GB), target (tok/s, GB)
ROWS = [
    ("8b-4x2048-ckpt", "llama3-8b", 4, 2048, True, (7706, 21.2), (11500, 22)),
    ("8b-4x2048", "llama3-8b", 4, 2048, False, (10867, 76.2), (16000, 76)),
    ("8b-1x8192-ckpt", "llama3-8b", 1, 8192, True, (7021, 21.2), (10500, 22)),
    ("smollm2-16x512", "smollm2-135m", 16, 512, False, (41730, None), (125000, None)),
    # the fine-tune's batch shape (16 rows of <= 64 tokens): `--only smollm2-16x64 --in-place both`
    # times the small step that issue 27's 60-steps/s loop target is about, without the data
    ("smollm2-16x64", "smollm2-135m", 16, 64, False, (None, None), (None, None)),
    # the fine-tune's own step: last-token classification head, no LM head (see CLASSIFICATION)
    ("smollm2-cls-16x64", "smollm2-135m", 16, 64, False, (None, None), (None, None)),
]
SMOKE_ROWS = [
    ("smoke-2x64-ckpt", "smoke", 2, 64, True, (None, None), (None, None)),
    ("smoke-4x32", "smoke", 4, 32, False, (None, None), (None, None)),
    ("smoke-cls-4x32", "smoke", 4, 32, False, (None, None), (None, None)),
]
#: rows that time `jaxqlora finetune`'s classification step (`SequenceClassifier`, two labels,
#: last-token pooling, `classification_loss`) instead of the causal-LM step; no peer, no MFU
SCAN = {"default": None, "scan": True, "unroll": False}  # --scan-layers -> CausalLM.scan_layers
CLASSIFICATION = {"smollm2-cls-16x64", "smoke-cls-4x32"}


#: Dense bfloat16 tensor-core peak (FLOP/s, no sparsity) by device name: the NVIDIA H100 SXM
#: and H200 datasheets (989.4 TFLOP/s each); other devices get no MFU column.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12}


def model_flops_per_token(cfg, length: int) -> float:
    """Model FLOPs per trained token of a QLoRA step (the MFU numerator): ``4 N`` for the
    frozen projections and the LM head (forward ``2 N`` plus the input gradients ``2 N``;
    frozen weights get no weight gradient) plus ``12 L T d_attn`` for attention (the PaLM
    paper's convention, appendix B: QK^T and PV, forward and backward, not halved for the
    causal mask). LoRA's rank-16 products (<1%) and recomputation are not counted."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f
    n = cfg.num_hidden_layers * per_layer + d * cfg.vocab_size
    return 4.0 * n + 12.0 * cfg.num_hidden_layers * length * q


def mfu(cfg, length: int, tok_s: float, device: str) -> float | None:
    """Model FLOPs utilisation: `model_flops_per_token` x tokens/s over `PEAK_BF16`."""
    peak = next((v for k, v in PEAK_BF16.items() if k in device), None)
    return None if peak is None else model_flops_per_token(cfg, length) * tok_s / peak


def worker_ours(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import nf4_matmul

    if args.gemm in ("on", "off"):
        nf4_matmul.MGPU_GEMM = args.gemm == "on"

    from flax import nnx

    from jaxqlora.lora import apply_lora
    from jaxqlora.memory import memory_estimate, trainer_bytes
    from jaxqlora.train import SequenceClassifier, Trainer, causal_lm_loss, classification_loss, make_optimizer

    cfg = common.MODELS[args.model]
    hits = []
    jax.monitoring.register_event_listener(
        lambda e, **k: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
    remat = tuple(args.remat.split("+")) if "+" in args.remat else args.remat  # "none": no remat
    optimizer, _ = make_optimizer(2e-4, total_steps=1000)
    # as `jaxqlora.finetune`: compile over the shapes-only model, then build the weights and attach
    dtype = None if args.dtype == "bfloat16" else jnp.dtype(args.dtype)  # the compute dtype (NF4 codes either way)
    abstract = common.abstract_nf4_model(cfg, dtype=dtype, lora=True, remat=remat, dropout=args.dropout)
    abstract.params_in_place = common.IN_PLACE[args.in_place]  # jaxqlora.model.CausalLM.params_in_place
    abstract.scan_layers = SCAN[args.scan_layers]  # jaxqlora.model.CausalLM.scan_layers
    cls = args.task == "classification"
    if cls:  # as `jaxqlora finetune` builds it: the head on the decoder, shapes only
        abstract = nnx.eval_shape(lambda: SequenceClassifier(abstract, 2, pooling="last", seed=args.seed))
    trainer = Trainer(abstract, classification_loss if cls else causal_lm_loss, optimizer)
    ex = trainer.precompile(args.batch, (args.length,), log=lambda m: print(m, file=sys.stderr))
    step_hits = len(hits)
    compiled = next(iter(ex.values()))
    mem = compiled.memory_analysis()
    memory = {k: getattr(mem, k + "_in_bytes", None) for k in ("temp_size", "argument_size", "output_size",
                                                               "alias_size", "host_temp_size")}
    # what `jaxqlora finetune --dry-run` prints for this step, before any weight exists
    memory["estimate"] = memory_estimate(ex, trainer_bytes(trainer))["peak_bytes"]
    if args.precompile_only:
        return {"compile_s": ex.total(), "compile_cache_hits": step_hits, "memory_analysis": memory}
    t0 = time.perf_counter()
    lm = common.random_nf4_model(cfg, seed=args.seed, dtype=dtype)
    apply_lora(lm, r=16, alpha=32.0, dropout=args.dropout, seed=args.seed)
    lm.remat = remat
    lm.params_in_place = common.IN_PLACE[args.in_place]
    lm.scan_layers = SCAN[args.scan_layers]
    trainer.attach(SequenceClassifier(lm, 2, pooling="last", seed=args.seed) if cls else lm)
    build_s = time.perf_counter() - t0
    batch = common.causal_batch(cfg, args.batch, args.length, args.seed)
    if cls:  # random labels for the same random tokens, every row counted
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "weight")}
        batch["labels"] = np.random.default_rng(args.seed).integers(0, 2, batch["weight"].shape).astype(np.int32)
    batch = jax.device_put(batch)
    losses = []

    def step():
        m = trainer.step(batch)
        losses.append(m["loss"])
        return m["loss"]

    sec = common.bench(step, calls=args.calls, rounds=args.rounds)
    return {"tok_s": args.batch * args.length / sec, "step_s": sec, "peak": common.peak_bytes(),
            "compile_s": ex.total(), "compile_cache_hits": step_hits, "build_s": build_s, "memory_analysis": memory,
            "loss": float(losses[-1]), "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def worker_peer(args) -> dict:
    import peft
    import torch

    cfg = common.MODELS[args.model]
    torch.manual_seed(args.seed)
    model = common.peer_model(cfg)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules=list(common.TARGETS),
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    if args.remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    ids = common.causal_batch(cfg, args.batch, args.length, args.seed)["input_ids"]
    x = torch.tensor(ids[0], dtype=torch.long, device="cuda")

    def step():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = common.torch_time(step, calls=args.calls, rounds=args.rounds)
    return {"tok_s": args.batch * args.length / sec, "step_s": sec, "peak": torch.cuda.max_memory_allocated(),
            "versions": f"torch {torch.__version__}, peft {peft.__version__}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, no peer")
    ap.add_argument("--only", default="", help="run rows whose name contains this")
    ap.add_argument("--policies", default="dots,full",
                    help="remat policies of the checkpointing rows: full, dots, offload, or names joined by + "
                         "(e.g. q_proj+k_proj+v_proj+attention+o_proj+lora_a)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gemm", choices=["default", "on", "off", "both"], default="default",
                    help="the Mosaic NF4 GEMM for large M on Hopper (pallas_kernels.nf4_matmul.MGPU_GEMM): the "
                         "library's default, on, off (the bf16 W + cuBLAS path), or both rows in the same run")
    ap.add_argument("--in-place", choices=["default", "off", "on", "both"], default="default",
                    help="CausalLM.params_in_place: the library's default (jaxqlora.model.default_params_in_place: "
                         "on for a GPU), on (frozen weights read in place, LoRA factors sliced by the scan), off "
                         "(the scan slices every parameter), or both rows in the same run")
    ap.add_argument("--scan-layers", choices=["default", "scan", "unroll", "both"], default="default",
                    help="CausalLM.scan_layers: the library's default (jaxqlora.model.default_scan: the layer scan for "
                         "training), scan, unroll (30 layers as straight-line code: no per-layer slice or stacked "
                         "residual copies, a longer compile), or both rows in the same run")
    ap.add_argument("--budget", type=float, default=570.0, help="seconds for the whole run (rows past it are skipped)")
    # worker arguments
    ap.add_argument("--worker", choices=["ours", "peer"])
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--length", type=int)
    ap.add_argument("--remat", default="none")
    ap.add_argument("--task", choices=["causal-lm", "classification"], default="causal-lm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="worker: compute dtype (float32 is what `jaxqlora finetune` uses on a CPU)")
    ap.add_argument("--precompile-only", action="store_true",
                    help="worker: compile the step into the persistent cache and report its memory analysis")
    args = ap.parse_args(argv)

    if args.worker:
        common.emit(worker_ours(args) if args.worker == "ours" else worker_peer(args))
        return 0

    t_start = time.perf_counter()
    rows = [r for r in (SMOKE_ROWS if args.smoke else ROWS) if args.only in r[0]]
    policies = [p for p in args.policies.split(",") if p]
    peer_reason = "--smoke" if args.smoke else "--no-peer" if args.no_peer else common.peer_available()
    env = {"JAX_PLATFORMS": "cpu"} if args.smoke else {}
    if args.smoke:
        args.calls, args.rounds = 1, 1
    common_args = ["--worker", "", "--dropout", str(args.dropout), "--calls", str(args.calls),
                   "--rounds", str(args.rounds)]
    results = []
    for name, model, batch, length, ckpt, peer_ref, target in rows:
        base = ["--model", model, "--batch", str(batch), "--length", str(length),
                "--task", "classification" if name in CLASSIFICATION else "causal-lm"]
        for policy in (policies if ckpt else ["none"]):
            for gemm, in_place, scan in itertools.product(
                    ("on", "off") if args.gemm == "both" else (args.gemm,),
                    ("off", "on") if args.in_place == "both" else (args.in_place,),
                    ("scan", "unroll") if args.scan_layers == "both" else (args.scan_layers,)):
                remaining = args.budget - (time.perf_counter() - t_start)
                wa = list(common_args)
                wa[1] = "ours"
                r = common.run_worker(__file__, wa + base + ["--remat", policy, "--gemm", gemm, "--in-place",
                                                             in_place, "--scan-layers", scan], timeout=remaining,
                                      env=env)
                run = (f"jaxqlora remat={policy}" + ("" if gemm == "default" else f" gemm={gemm}")
                       + ("" if args.in_place == "default" else f" in-place={in_place}")
                       + ("" if args.scan_layers == "default" else f" layers={scan}"))
                results.append((name, run, r, peer_ref, target))
                print(f"# {name} {run}: {r}", file=sys.stderr, flush=True)
        if peer_reason is None and name not in CLASSIFICATION:
            remaining = args.budget - (time.perf_counter() - t_start)
            wa = list(common_args)
            wa[1] = "peer"
            r = common.run_worker(__file__, wa + base + ["--remat", "full" if ckpt else "none"], timeout=remaining)
            results.append((name, "transformers+PEFT+bnb" + (" ckpt" if ckpt else ""), r, peer_ref, target))
            print(f"# {name} peer: {r}", file=sys.stderr, flush=True)

    device = next((r["device"] + " | jax " + r["jax"] for _, _, r, _, _ in results if "device" in r), "?")
    print(f"\n# QLoRA train step, {time.strftime('%Y-%m-%d')} | {device} | NF4+DQ bf16, LoRA r=16 a=32 all 7 "
          f"projections, dropout {args.dropout}, AdamW | median of {args.rounds} x {args.calls} steps"
          + ("" if peer_reason is None else f" | peer not run: {peer_reason}"))
    print("| config | run | tokens/s | MFU | peak GB | estimate GB (dry-run) / peak | compile s | vs peer (same run) | "
          "vs peer (issue) | target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    models = {name: (common.MODELS[model], length) for name, model, _, length, *_ in (SMOKE_ROWS + ROWS)}
    peer_now = {name: r for name, run, r, _, _ in results if run.startswith("transformers") and "tok_s" in r}
    for name, run, r, (ref_tok, ref_gb), (tgt_tok, tgt_gb) in results:
        if "tok_s" not in r:
            print(f"| {name} | {run} | {r.get('error', '?')} | | | | | | | |")
            continue
        same = peer_now.get(name)
        vs_now = f"{r['tok_s'] / same['tok_s']:.2f}x" if same and not run.startswith("transformers") else ""
        vs_issue = f"{r['tok_s'] / ref_tok:.2f}x" if ref_tok else ""
        target = "" if tgt_tok is None else (f">= {tgt_tok:,}" + (f" at <= {tgt_gb} GB" if tgt_gb else ""))
        if tgt_tok is not None and not run.startswith("transformers"):
            ok = r["tok_s"] >= tgt_tok and (tgt_gb is None or (r["peak"] is not None and r["peak"] / 1e9 <= tgt_gb))
            target += " met" if ok else " not met"
        comp = f"{r['compile_s']:.1f}" + (" (cache)" if r.get("compile_cache_hits") else "") if "compile_s" in r else ""
        est = (r.get("memory_analysis") or {}).get("estimate")
        est = "" if est is None else f"{est / 1e9:.2f}" + (f" / {est / r['peak']:.3f}" if r.get("peak") else "")
        u = None if name in CLASSIFICATION else mfu(*models[name], r["tok_s"], device)
        u = "" if u is None else f"{100 * u:.1f}%"
        print(f"| {name} | {run} | {r['tok_s']:,.0f} | {u} | {common.gb(r['peak'])} | {est} | {comp} | {vs_now} | "
              f"{vs_issue} | {target} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
