"""The ``jaxqlora`` command.

    jaxqlora generate --prompt "What is the capital of France?" [--model PATH]
                      [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                      [--seed S] [--system TEXT] [--no-chat] [--dtype bfloat16|float32]

``--model`` takes an HF folder or a ``.gguf`` file; without it the embedded
SmolLM2-135M-Instruct is used. Tokens stream to stdout; timing goes to stderr.
"""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``jaxqlora`` command (subcommands: generate)."""
    parser = argparse.ArgumentParser(prog="jaxqlora", description="QLoRA fine-tuning and 4-bit inference in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (chat template applied by default)")
    _add_model_args(g)
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
