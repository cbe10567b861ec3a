"""The ``jaxqlora`` command.

    jaxqlora finetune [--model PATH] [--data FILE --text-column C --label-column L | --task causal-lm ...]
                      [--rank R --alpha A --targets ...] [--max-steps N --epochs E --batch-size B
                      --grad-accum G --lr LR --max-seq-len T] [--output DIR] [--resume]
                      [--remat [full|dots]] [--precompile-only]
                      [--mesh data=N,fsdp=M] [--distributed [--coordinator-address HOST:PORT
                      --num-processes P --process-id I]]
    jaxqlora eval     --adapter DIR [--model PATH] [--data FILE ...]
    jaxqlora merge    --adapter DIR --output DIR [--model PATH]
    jaxqlora generate --prompt "What is the capital of France?" [--model PATH] [--adapter DIR]
                      [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]

``--model`` takes an HF folder or a ``.gguf`` file; without it the embedded
SmolLM2-135M-Instruct is used, and without ``--data`` the embedded Rotten Tomatoes set.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="parameter/activation dtype")


def _cmd_generate(args) -> int:
    import jax
    import jax.numpy as jnp

    from jaxqlora.generate import stream
    from jaxqlora.io import load_pretrained

    t0 = time.perf_counter()
    model, tokenizer = load_pretrained(args.model, dtype=getattr(jnp, args.dtype))
    if tokenizer is None:
        print(f"error: {args.model} has no tokenizer.json", file=sys.stderr)
        return 2
    if args.adapter:
        from jaxqlora.io.peft import load_adapter

        load_adapter(model, args.adapter)
    load_s = time.perf_counter() - t0
    if args.no_chat:
        prompt = args.prompt
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
    t1 = time.perf_counter()
    first = None
    n = 0
    for piece in stream(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        if first is None:
            first = time.perf_counter()
        n += 1
        sys.stdout.write(piece)
        sys.stdout.flush()
    end = time.perf_counter()
    sys.stdout.write("\n")
    if first is not None and n > 1:
        rate = f"{(n - 1) / (end - first):.1f} tokens/s after the first"
    else:
        rate = "n/a"
    print(f"[load {load_s:.1f} s | first token {((first or end) - t1):.1f} s (compiles prefill and decode) | "
          f"{n} pieces, {rate} | {jax.default_backend()}]", file=sys.stderr)
    return 0


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="CSV/JSONL file (default: embedded Rotten Tomatoes)")
    p.add_argument("--task", default="classification", choices=["classification", "causal-lm"])
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--response-column", default="response")
    p.add_argument("--max-seq-len", type=int, default=64, help="longer texts are truncated")


def _finetune_config(args):
    from jaxqlora.finetune import FinetuneConfig

    keys = {f.name for f in dataclasses.fields(FinetuneConfig)}
    kw = {k: v for k, v in vars(args).items() if k in keys and v is not None}
    if kw.get("epochs") is not None and getattr(args, "max_steps", None) is None:
        kw["max_steps"] = 0  # --epochs alone means whole epochs
    if "targets" in kw:
        kw["targets"] = tuple(kw["targets"])
    return FinetuneConfig(**kw)


def jax_cache_dir() -> str:
    """JAX's persistent compilation cache folder in use, or ``"off"``."""
    import jax

    return jax.config.jax_compilation_cache_dir or "off"


def _print_metrics(name: str, metrics: dict) -> None:
    print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def _cmd_finetune(args) -> int:
    from jaxqlora.finetune import finetune

    cfg = _finetune_config(args)
    results = finetune(cfg, log=lambda m: print(m, file=sys.stderr))
    if cfg.precompile_only:
        print(f"precompiled {len(results['precompiled'])} executables in {results['compile_seconds']:.1f} s "
              f"(persistent cache: {jax_cache_dir()})")
        return 0
    if cfg.distributed:
        from jaxqlora.sharding import is_primary

        if not is_primary():
            return 0
    for split in ("validation", "test", "baseline"):
        _print_metrics(split, results[split])
    print(f"{results['steps']} steps in {results['train_seconds']:.0f} s "
          f"({results['train_seconds'] / max(results['steps'], 1):.2f} s/step incl. compilation); "
          f"total {results['seconds']:.0f} s; adapter in {cfg.output}/adapter")
    return 0


def _cmd_eval(args) -> int:
    from jaxqlora.finetune import evaluate_adapter

    cfg = _finetune_config(args)
    for split, metrics in evaluate_adapter(cfg, args.adapter).items():
        _print_metrics(split, metrics)
    return 0


def _cmd_merge(args) -> int:
    import jax.numpy as jnp

    from jaxqlora.io import load_pretrained
    from jaxqlora.io.export import merge_lora, save_pretrained
    from jaxqlora.io.peft import load_adapter

    model, tokenizer = load_pretrained(args.model, dtype=getattr(jnp, args.dtype))
    load_adapter(model, args.adapter)
    save_pretrained(merge_lora(model, dtype=getattr(jnp, args.dtype)), args.output, tokenizer=tokenizer,
                    dtype=getattr(jnp, args.dtype))
    print(f"merged model written to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``jaxqlora`` command (finetune, eval, merge, generate)."""
    from jaxqlora.lora import ALL_TARGETS

    parser = argparse.ArgumentParser(prog="jaxqlora", description="QLoRA fine-tuning and 4-bit inference in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    f = sub.add_parser("finetune", help="QLoRA fine-tuning (defaults: embedded model and data)")
    _add_model_args(f)
    _add_data_args(f)
    f.add_argument("--pooling", default="last", choices=["last", "mean"])
    f.add_argument("--no-quantize", dest="quantize", action="store_false", help="keep bf16 base weights (plain LoRA)")
    f.add_argument("--rank", type=int, default=16)
    f.add_argument("--alpha", type=float, default=32.0)
    f.add_argument("--dropout", type=float, default=0.05)
    f.add_argument("--targets", nargs="+", default=list(ALL_TARGETS), choices=list(ALL_TARGETS))
    f.add_argument("--rslora", dest="use_rslora", action="store_true")
    f.add_argument("--epochs", type=float, default=None)
    f.add_argument("--max-steps", type=int, default=None, help="overrides --epochs (default 350 without --epochs)")
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--grad-accum", type=int, default=1)
    f.add_argument("--lr", type=float, default=2e-4)
    f.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    f.add_argument("--output", default="runs/finetune")
    f.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    f.add_argument("--checkpoint-every", type=int, default=0)
    f.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl records")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--remat", nargs="?", const="full", default=None, choices=["none", "full", "dots"],
                   help="recompute decoder layers in the backward pass: full (keep layer inputs only; the "
                        "default of a bare --remat) or dots (keep matmul outputs, recompute elementwise work)")
    f.add_argument("--precompile-only", action="store_true",
                   help="compile every train/eval step for its shape buckets (warming the on-disk cache) and exit")
    f.add_argument("--mesh", default=None, metavar="data=N,fsdp=M",
                   help="train on N x M devices: batch split over all, frozen weights sharded over fsdp")
    f.add_argument("--distributed", action="store_true",
                   help="several processes/hosts: jax.distributed.initialize (flags below or environment)")
    f.add_argument("--coordinator-address", default=None, help="HOST:PORT of process 0 ($JAX_COORDINATOR_ADDRESS)")
    f.add_argument("--num-processes", type=int, default=None, help="number of processes ($JAX_NUM_PROCESSES)")
    f.add_argument("--process-id", type=int, default=None, help="this process's index ($JAX_PROCESS_ID)")
    f.set_defaults(func=_cmd_finetune)

    e = sub.add_parser("eval", help="evaluate a saved adapter on the validation and test splits")
    _add_model_args(e)
    _add_data_args(e)
    e.add_argument("--adapter", required=True)
    e.add_argument("--no-quantize", dest="quantize", action="store_false")
    e.set_defaults(func=_cmd_eval)

    m = sub.add_parser("merge", help="fold an adapter into the base and write an HF folder")
    _add_model_args(m)
    m.add_argument("--adapter", required=True)
    m.add_argument("--output", required=True)
    m.set_defaults(func=_cmd_merge)

    g = sub.add_parser("generate", help="generate text (chat template applied by default)")
    _add_model_args(g)
    g.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder to apply")
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", default=None, help="optional system message")
    g.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxqlora`` console script; returns the exit code.

    Errors raised on purpose by jaxqlora (bad checkpoint, prompt too long, missing
    embedded model) print one line to stderr and exit with code 2.
    """
    from jaxqlora.errors import JaxQLoRAError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JaxQLoRAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
