"""The ``jaxqlora`` command.

    jaxqlora finetune [--model PATH] [--data FILE --text-column C --label-column L | --task causal-lm ...
                      | --task chat [--messages-column M]] [--packing]
                      [--rank R --alpha A --targets ...] [--max-steps N --epochs E --batch-size B
                      --grad-accum G --lr LR --max-seq-len T] [--output DIR] [--resume | --overwrite]
                      [--remat [full|dots]] [--scan-layers scan|unroll] [--precompile-only | --dry-run]
                      [--mesh data=N,fsdp=M] [--distributed [--coordinator-address HOST:PORT
                      --num-processes P --process-id I]]
    jaxqlora eval     --adapter DIR [--model PATH] [--data FILE ...]
    jaxqlora merge    --adapter DIR --output DIR [--model PATH]
    jaxqlora generate --prompt "What is the capital of France?" | --messages JSON|FILE [--model PATH] [--adapter DIR]
                      [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                      [--speculative {ngram,draft} [--draft-model PATH] [--num-draft N]]
    jaxqlora serve    [--model PATH] [--adapter NAME=DIR ...] [--host 127.0.0.1] [--port 8000]
                      [--max-batch N] [--max-model-len N] [--max-queue N] [--prefill-chunk N]
                      [--decode-steps K] [--prefill-batch P] [--grace S] [--keep-quantized] [--kernel-codes] [--dtype ...]

``--model`` takes an HF folder or a ``.gguf`` file; without it the embedded
SmolLM2-135M-Instruct is used, and without ``--data`` the embedded Rotten Tomatoes set.

Every argument is checked before anything is loaded (argparse's ``error:`` line, exit code 2):
sizes and counts must be positive, rates in range, paths must exist, ``--output`` must not be a
file, and a ``finetune --output`` that holds an earlier run needs ``--resume`` or ``--overwrite``.
``jaxqlora COMMAND --help`` lists every option with its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

# --- argument types: each refuses a bad value with argparse's "error: argument --x: ..." and exit code 2,
# before anything is imported, loaded or compiled.


def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _bounded_number(kind: type, minimum: int, inclusive: bool):
    """An argparse type: a ``kind`` (an int, or a finite float) >= ``minimum`` (``inclusive``)
    or > ``minimum``; its messages call it "a positive ..." or "a non-negative ..." and give
    the bound, e.g. ``must be a positive integer (>= 1), got 0``."""
    sign = "non-negative" if inclusive and minimum == 0 else "positive"
    what = f"a {sign} {'integer' if kind is int else 'number'}"
    bound = f"{'>=' if inclusive else '>'} {minimum}"

    def check(text: str):
        value = _number(text, kind, what)
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {what} ({bound}), got {value if kind is int else f'{value:g}'}")
        return value

    check.__name__ = check.__qualname__ = f"{sign.replace('-', '')}_{kind.__name__}"
    check.__doc__ = f"argparse type: {'an integer' if kind is int else 'a finite number'} {bound}."
    return check


positive_int = _bounded_number(int, 1, inclusive=True)
nonnegative_int = _bounded_number(int, 0, inclusive=True)
positive_float = _bounded_number(float, 0, inclusive=False)
nonnegative_float = _bounded_number(float, 0, inclusive=True)


def probability(text: str) -> float:
    """argparse type: a number in (0, 1] (top-p)."""
    value = _number(text, float, "a number in (0, 1]")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


def layer_loop(text: str) -> bool:
    """argparse type: ``scan`` -> True, ``unroll`` -> False (`jaxqlora.model.CausalLM.scan_layers`)."""
    loops = {"scan": True, "unroll": False}
    if text not in loops:
        raise argparse.ArgumentTypeError(f"must be scan or unroll, got {text!r}")
    return loops[text]


def dropout_rate(text: str) -> float:
    """argparse type: a number in [0, 1) (dropout probability)."""
    value = _number(text, float, "a number in [0, 1)")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value:g}")
    return value


def nonempty_str(text: str) -> str:
    """argparse type: a string that is not empty or blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def existing_file(text: str) -> str:
    """argparse type: the path of an existing file."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a file")
    return text


def chat_messages(text: str) -> list:
    """argparse type: a conversation to continue, as JSON text or the path of a JSON file:
    ``[{"role": "system" | "user" | "assistant", "content": "..."}, ...]``."""
    import json

    from jaxqlora.chat import ROLES

    source = text
    if not text.lstrip().startswith("[") and Path(text).is_file():
        source = Path(text).read_text(encoding="utf-8")
    try:
        messages = json.loads(source)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a JSON list of messages, nor a file holding one ({e})") from None
    if not isinstance(messages, list) or not messages:
        raise argparse.ArgumentTypeError("must be a non-empty JSON list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise argparse.ArgumentTypeError(f"messages[{i}] must be an object with a role among "
                                             f"{', '.join(ROLES)} and a string content")
    return messages


def existing_dir(text: str) -> str:
    """argparse type: the path of an existing folder."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a folder")
    return text


def adapter_spec(text: str) -> tuple[str, str]:
    """argparse type: ``NAME=DIR``, a LoRA adapter to serve under NAME (the request's ``model``
    field; no blanks) from the PEFT adapter folder DIR, which must exist. Returns ``(NAME, DIR)``."""
    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    if name != name.strip() or any(c.isspace() for c in name):
        raise argparse.ArgumentTypeError(f"the adapter name must not contain blanks, got {name!r}")
    return name, existing_dir(folder)


def port_number(text: str) -> int:
    """argparse type: a TCP port in [0, 65535] (0: any free port, printed when the server is ready)."""
    value = _number(text, int, "a port number in [0, 65535]")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {value}")
    return value


def existing_path(text: str) -> str:
    """argparse type: an existing file or folder (a checkpoint: HF folder or ``.gguf`` file)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return text


def output_dir(text: str) -> str:
    """argparse type: a folder to write into: absent (it is created) or an existing folder, not a
    file, and not below a file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a folder")
            break
    return text


def mesh_spec(text: str) -> str:
    """argparse type: a ``data=N,fsdp=M`` mesh spec (checked by `jaxqlora.sharding.parse_mesh`; the
    device count is checked later, when the mesh is built)."""
    from jaxqlora.errors import JaxQLoRAError
    from jaxqlora.sharding import parse_mesh

    try:
        parse_mesh(text)
    except JaxQLoRAError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: ...)`` to every option that takes a value and has a default
    (flags and options whose default is None say what happens in their help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is argparse.SUPPRESS or action.nargs == 0
                or not action.option_strings):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


def _add_model_args(p: argparse.ArgumentParser, generation: bool = False, training: bool = False,
                    serving: bool = False) -> None:
    p.add_argument("--model", type=existing_path, default=None, metavar="PATH",
                   help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    if generation:  # resolved by _check_generate
        p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                       help="parameter and activation dtype (default on a CPU, where XLA runs bfloat16 matmuls and "
                            "cache writes through float32 copies: float16, or float32 with --keep-quantized, whose "
                            "weights stay in their blocks; bfloat16 elsewhere)")
    elif training:  # finetune, eval: resolved by FinetuneConfig (jaxqlora.finetune.default_dtype)
        p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                       help="parameter and activation dtype (default: float32 on a CPU, where XLA runs bfloat16 "
                            "matmuls and stacked activations through float32 copies; bfloat16 elsewhere)")
    elif serving:  # resolved by _check_serve
        p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                       help="parameter and activation dtype (default: float32 on a CPU when the model is kept "
                            "quantized, see --keep-quantized; bfloat16 otherwise)")
    else:
        p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                       help="parameter and activation dtype")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def _add_keep_quantized(p: argparse.ArgumentParser, auto: bool = False) -> None:
    text = ("a .gguf --model: keep its weights in their GGUF formats on the device (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, "
            "Q6_K; others are dequantized with a notice) instead of dequantizing to --dtype")
    if not auto:
        p.add_argument("--keep-quantized", action="store_true", help=text)
        return
    p.add_argument("--keep-quantized", action=argparse.BooleanOptionalAction, default=None,
                   help=text + " (default: on a CPU when the file's weights are all Q4_0 / Q4_1 / Q8_0, as the "
                               "embedded model's: they decode faster kept in their blocks there; off elsewhere)")


def _cpu_keeps_quantized(model) -> bool:
    """The default of ``generate`` / ``serve --keep-quantized``: True on a CPU for a .gguf model
    (the embedded one when ``model`` is None) whose quantized weights are all in a format of the
    CPU GGUF kernel (`pallas_kernels.gguf_cpu.FORMATS`: Q4_0, Q4_1, Q8_0). Kept in its blocks such
    a file decodes faster on a CPU than a float16 copy, through the kernel (1.9x on 2 cores) and
    also through XLA's path where the kernel cannot be built (1.1-1.3x; benchmarks/RESULTS.md).
    Reads the tensor table only (about 0.1 s). Never raises: a missing or bad file is left for the
    load to report."""
    import jax

    if jax.default_backend() != "cpu":
        return False
    try:
        from jaxqlora.io.embedded import embedded_model_path
        from jaxqlora.io.gguf import gguf_tensor_types
        from pallas_kernels import gguf_cpu

        path = Path(model) if model is not None else embedded_model_path(verify=False)
        if path.suffix.lower() != ".gguf" or not path.is_file():
            return False
        return set(gguf_tensor_types(path).values()) <= set(gguf_cpu.FORMATS) | {"F32", "F16"}
    except Exception:  # noqa: BLE001 - the load reports what is wrong with the file
        return False


def _cmd_generate(args) -> int:
    import jax
    import jax.numpy as jnp

    from jaxqlora.io import load_pretrained, load_tokenizer

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        print(f"error: {args.model} has no tokenizer.json", file=sys.stderr)
        return 2
    record = None
    if args.adapter:
        from jaxqlora.io.peft import read_task

        record = read_task(args.adapter)
        if record and record["chat_template"]:  # prompt with the template the chat fine-tune rendered with
            tokenizer.chat_template = record["chat_template"]
        if record and record["task"] == "causal-lm" and not args.no_chat:
            print("note: the adapter was trained on raw prompt/response text (task causal-lm); --no-chat prompts "
                  "it the same way", file=sys.stderr)
    if args.messages is not None:
        prompt = args.messages
    elif args.no_chat:
        prompt = args.prompt
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
    executables = None
    check_s = 0.0
    if not args.speculative:  # the device memory it needs, before the weights are placed
        t_check = time.perf_counter()
        executables = _generation_check(args, tokenizer, prompt)
        if executables is None:
            return 0  # --dry-run
        check_s = time.perf_counter() - t_check
        t0 += check_s  # "load" below counts the weights and tokenizer, not the compile of the check
    model, tokenizer = load_pretrained(args.model, dtype=getattr(jnp, args.dtype), keep_quantized=args.keep_quantized)
    if args.adapter:
        from jaxqlora.io.peft import load_adapter

        load_adapter(model, args.adapter)
        if record and record["chat_template"]:
            tokenizer.chat_template = record["chat_template"]
    if args.kernel_codes:
        from jaxqlora.quantize import use_kernel_codes

        use_kernel_codes(model)
    load_s = time.perf_counter() - t0
    if args.speculative:
        return _generate_speculative(args, model, tokenizer, prompt, load_s)
    t1 = time.perf_counter()
    first = None
    n = 0
    from flax import nnx

    from jaxqlora.generate import stream

    if executables is not None and nnx.graphdef(model) != executables.graphdef:
        executables = None  # compiled for the dense twin (quantized weights or an adapter): stream compiles its own
    for piece in stream(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        executables=None if executables is None else executables.compiled):
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
    compiled = f"compile {check_s:.1f} s (memory check) | " if executables else ""
    print(f"[{compiled}load {load_s:.1f} s | first token {((first or end) - t1):.1f} s"
          f"{'' if executables else ' (compiles prefill and decode)'} | "
          f"{n} pieces, {rate} | {jax.default_backend()}]", file=sys.stderr)
    return 0


class _Estimated(NamedTuple):
    compiled: Any  # jaxqlora.compile.Executables
    graphdef: Any


def _generation_check(args, tokenizer, prompt) -> _Estimated | None:
    """``generate``'s memory check before loading: compile `stream` over the model's shapes,
    estimate (`jaxqlora.generate.generation_memory`), print it; None after ``--dry-run``.

    Raises:
      MemoryEstimateError: the estimate exceeds the device's memory.
    """
    import jax.numpy as jnp
    from flax import nnx

    from jaxqlora.generate import generation_memory
    from jaxqlora.io import load_config
    from jaxqlora.memory import MemoryEstimateError, checkpoint_device_bytes, device_memory, format_memory
    from jaxqlora.model import CausalLM

    dtype = getattr(jnp, args.dtype)
    cfg = load_config(args.model)
    dense = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    weights = checkpoint_device_bytes(args.model, dtype, keep_quantized=args.keep_quantized,
                                      kernel_codes=args.kernel_codes)
    estimate, ex = generation_memory(dense, tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_k,
                                     args.top_p, stream=True, weight_bytes=weights)
    capacity = device_memory()
    print(format_memory(estimate, capacity), file=sys.stderr)
    fits = capacity is None or estimate["peak_bytes"] <= capacity
    if args.dry_run:
        print("fits" if fits else "does not fit")
        return None
    if not fits:
        raise MemoryEstimateError(estimate, capacity, None, what="generation")
    return _Estimated(ex, nnx.graphdef(dense))


def _generate_speculative(args, model, tokenizer, prompt, load_s: float) -> int:
    """``generate --speculative``: compile for the prompt's bucket, generate the whole text, print it and
    a line of statistics (acceptance rate, tokens/s) to stderr."""
    import jax
    import jax.numpy as jnp

    from jaxqlora.compile import PROMPT_BUCKETS, bucket_for
    from jaxqlora.generate import encode_prompts, generate, precompile_generate
    from jaxqlora.io import load_pretrained
    from jaxqlora.speculative import SpeculativeConfig

    t0 = time.perf_counter()
    draft = None
    if args.draft_model:
        draft, _ = load_pretrained(args.draft_model, dtype=getattr(jnp, args.dtype))
    load_s += time.perf_counter() - t0
    spec = SpeculativeConfig(args.speculative, num_draft=args.num_draft)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    bucket = bucket_for(len(encode_prompts(tokenizer, prompt)[0]), PROMPT_BUCKETS, allow_new=True)
    t1 = time.perf_counter()
    ex = precompile_generate(model, tokenizer, batch_size=1, prompt_lens=(bucket,), speculative=spec,
                             draft_model=draft, log=lambda m: None, **kw)
    compile_s = time.perf_counter() - t1
    text, st = generate(model, tokenizer, prompt, seed=args.seed, executables=ex, speculative=spec,
                        draft_model=draft, return_stats=True, **kw)
    print(text)
    print(f"[load {load_s:.1f} s | compile {compile_s:.1f} s | prefill {st['prefill_s']:.2f} s | "
          f"{st['new_tokens']} tokens, {st['tokens_per_s']:.1f} tokens/s after the first | speculative "
          f"{args.speculative} k={args.num_draft}: acceptance {st['acceptance_rate']:.0%} "
          f"({st['accepted']}/{st['drafted']} drafts), {st['tokens_per_step']:.2f} tokens per target step | "
          f"{jax.default_backend()}]", file=sys.stderr)
    return 0


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=existing_file, default=None, metavar="FILE",
                   help="CSV, JSONL or JSON file, optionally .gz/.bz2 (default: the embedded Rotten Tomatoes set)")
    p.add_argument("--task", default="classification", choices=["classification", "causal-lm", "chat"],
                   help="sequence classification head, next-token loss on the response, or chat (a messages "
                        "column rendered with the chat template, loss on the assistant turns)")
    p.add_argument("--text-column", type=nonempty_str, default="text", help="classification: column of the text")
    p.add_argument("--label-column", type=nonempty_str, default="label", help="classification: column of the label")
    p.add_argument("--prompt-column", type=nonempty_str, default="prompt", help="causal-lm: column of the prompt")
    p.add_argument("--response-column", type=nonempty_str, default="response",
                   help="causal-lm: column of the response")
    p.add_argument("--messages-column", type=nonempty_str, default="messages",
                   help="chat: column of the conversations (JSONL list, or JSON text in a CSV cell)")
    p.add_argument("--max-seq-len", type=positive_int, default=64, help="tokens per example; longer ones are truncated")


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

    cfg = _finetune_config(args)  # --overwrite: finetune removes the earlier run when training starts
    results = finetune(cfg, log=lambda m: print(m, file=sys.stderr))
    if cfg.precompile_only:
        print(f"precompiled {len(results['precompiled'])} executables in {results['compile_seconds']:.1f} s "
              f"(persistent cache: {jax_cache_dir()})")
        return 0
    if cfg.dry_run:
        from jaxqlora.memory import format_memory

        print(format_memory(results["memory"], results["capacity_bytes"]))
        print("fits" if results["fits"] else "does not fit: drop --dry-run to get settings that fit")
        return 0
    if cfg.distributed:
        from jaxqlora.sharding import is_primary

        if not is_primary():
            return 0
    for split in ("validation", "test", "baseline"):
        _print_metrics(split, results[split])
    print(f"{results['steps']} steps ({results['epochs']:g} epochs of {results['train_rows']} rows) "
          f"in {results['train_seconds']:.0f} s "
          f"({results['train_seconds'] / max(results['steps'], 1):.2f} s/step incl. compilation); "
          f"total {results['seconds']:.0f} s; adapter in {cfg.output}/adapter")
    return 0


def _cmd_eval(args) -> int:
    from jaxqlora.finetune import evaluate_adapter

    cfg = _finetune_config(args)
    for split, metrics in evaluate_adapter(cfg, args.adapter, log=lambda m: print(m, file=sys.stderr),
                                           keep_quantized=args.keep_quantized).items():
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


#: the served name of the embedded default model (``jaxqlora serve`` without --model).
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"

#: ``serve --max-model-len`` when not given (or the model's context if shorter).
DEFAULT_MAX_MODEL_LEN = 2048


def served_model_name(model: str | None) -> str:
    """The name ``jaxqlora serve`` serves a base model under (the ``model`` field of requests):
    the embedded model's name, a ``.gguf`` file's stem or an HF folder's name."""
    if model is None:
        return EMBEDDED_MODEL_NAME
    path = Path(model).resolve()
    return path.stem if path.is_file() else path.name


def _serve_memory_check(args) -> None:
    """``serve``'s check before loading: weights (`jaxqlora.memory.checkpoint_device_bytes`) + the
    KV cache of ``--max-batch`` slots of ``--max-model-len`` tokens (2 x layers x slots x tokens x
    KV heads x head dim x dtype bytes) against `jaxqlora.memory.device_memory` (skipped when unknown);
    prints the figures to stderr. Sets ``args.max_model_len`` when it was not given.

    Raises:
      ContextLengthError: ``--max-model-len`` is above the model's ``max_position_embeddings``.
      MemoryEstimateError: the sum exceeds the device's memory.
    """
    import jax.numpy as jnp

    from jaxqlora.errors import ContextLengthError
    from jaxqlora.io import load_config
    from jaxqlora.memory import MemoryEstimateError, checkpoint_device_bytes, device_memory

    cfg = load_config(args.model)
    if args.max_model_len is None:
        args.max_model_len = min(DEFAULT_MAX_MODEL_LEN, cfg.max_position_embeddings)
    if args.max_model_len > cfg.max_position_embeddings:
        raise ContextLengthError(f"--max-model-len {args.max_model_len} is above the model's context "
                                 f"(max_position_embeddings {cfg.max_position_embeddings})")
    dtype = getattr(jnp, args.dtype)
    weights = checkpoint_device_bytes(args.model, dtype, keep_quantized=args.keep_quantized,
                                      kernel_codes=args.kernel_codes)
    kv = (2 * cfg.num_hidden_layers * args.max_batch * args.max_model_len * cfg.num_key_value_heads * cfg.head_dim
          * jnp.dtype(dtype).itemsize)
    capacity = device_memory()
    parts = (f"weights {weights / 1e9:.2f} GB + KV cache {kv / 1e9:.2f} GB for --max-batch {args.max_batch} x "
             f"--max-model-len {args.max_model_len}")
    cap = "unknown" if capacity is None else f"{capacity / 1e9:.2f} GB"
    print(f"memory: {parts} = {(weights + kv) / 1e9:.2f} GB; device memory {cap}", file=sys.stderr)
    if capacity is not None and weights + kv > capacity:
        raise MemoryEstimateError({"peak_bytes": weights + kv, "worst": parts + "; lower either"}, capacity, None,
                                  what="server")


def _bind(host: str, port: int):
    """A TCP socket bound to ``host:port`` (not yet listening), so that a port in use is reported
    before the model is loaded.

    Raises:
      OSError: the host does not resolve or the port cannot be bound (the message names both).
    """
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise OSError(e.errno, f"cannot resolve --host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _cmd_serve(args) -> int:
    """``jaxqlora serve``: bind, check memory, load, compile (``Engine.start``), serve until SIGTERM /
    SIGINT, then drain: uvicorn stops accepting connections while ``Engine.shutdown(--grace)``
    lets in-flight requests finish (or aborts them at the end of the grace); exit code 0."""
    import asyncio
    import signal
    import threading

    import jax.numpy as jnp
    import uvicorn

    from jaxqlora.io import load_pretrained

    sock = _bind(args.host, args.port)
    engine = None
    try:
        _serve_memory_check(args)
        t0 = time.perf_counter()
        model, tokenizer = load_pretrained(args.model, dtype=getattr(jnp, args.dtype),
                                           keep_quantized=args.keep_quantized)
        if args.kernel_codes:
            from jaxqlora.quantize import use_kernel_codes

            use_kernel_codes(model)
        from jaxqlora.serving.engine import Engine, EngineConfig
        from jaxqlora.serving.server import create_app

        name = served_model_name(args.model)
        config = EngineConfig(max_batch=args.max_batch, max_model_len=args.max_model_len, max_queue=args.max_queue,
                              prefill_chunk=args.prefill_chunk, decode_steps=args.decode_steps,
                              prefill_batch=args.prefill_batch)
        engine = Engine(model, tokenizer, config, adapters=dict(args.adapter or ()), model_name=name)
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        engine.start()
        print(f"[load {load_s:.1f} s | compile {time.perf_counter() - t1:.1f} s]", file=sys.stderr)
        app = create_app(engine)
    except BaseException:
        sock.close()
        if engine is not None:
            engine.shutdown(0)
        raise

    draining = threading.Thread(target=engine.shutdown, args=(args.grace,), name="jaxqlora-drain", daemon=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # uvicorn's, without re-raising the signal after the shutdown
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for connections
            self.should_exit = True
            if not draining.is_alive() and draining.ident is None:
                print(f"{signal.Signals(sig).name}: no new requests; finishing those in flight "
                      f"(grace {args.grace:g} s)", file=sys.stderr, flush=True)
                draining.start()

    host = sock.getsockname()[0]
    port = sock.getsockname()[1]
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if args.adapter:
        print(f"adapters: {', '.join(n for n, _ in args.adapter)}", file=sys.stderr)
    server = Server(uvicorn.Config(app, host=args.host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=args.grace + 5))

    async def serve():
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            print(f"serving {engine.model_name} at http://{netloc} (OpenAI base URL: http://{netloc}/v1)",
                  flush=True)
        await task

    try:
        asyncio.run(serve())
    finally:
        if draining.ident is None:
            draining.start()
        draining.join()
        sock.close()
    print("stopped", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``jaxqlora`` command (finetune, eval, merge, generate, serve).

    Every value is checked by its ``type=`` (`positive_int`, `positive_float`, `probability`,
    `output_dir`, ...), so a bad argument stops with argparse's ``error:`` line and exit code 2
    before anything is loaded; ``--help`` of each command lists every option with its default.
    """
    from jaxqlora.lora import ALL_TARGETS

    parser = argparse.ArgumentParser(prog="jaxqlora", description="QLoRA fine-tuning and 4-bit inference in JAX",
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{finetune,eval,merge,generate,serve}")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)

    f = command("finetune", "QLoRA fine-tuning (defaults: embedded model and data)")
    _add_model_args(f, training=True)
    _add_data_args(f)
    f.add_argument("--pooling", default="last", choices=["last", "mean"],
                   help="classification: pool the last real token or the mean of all tokens")
    f.add_argument("--no-quantize", dest="quantize", action="store_false",
                   help="keep the base weights in --dtype (plain LoRA) instead of NF4")
    f.add_argument("--rank", type=positive_int, default=16, help="LoRA rank r")
    f.add_argument("--alpha", type=positive_float, default=32.0, help="LoRA alpha (scale alpha/r, or alpha/sqrt(r))")
    f.add_argument("--dropout", type=dropout_rate, default=0.05, help="LoRA dropout probability, in [0, 1)")
    f.add_argument("--targets", nargs="+", default=list(ALL_TARGETS), choices=list(ALL_TARGETS), metavar="MODULE",
                   help=f"projections that get a LoRA adapter, among {' '.join(ALL_TARGETS)}")
    f.add_argument("--rslora", dest="use_rslora", action="store_true", help="rank-stabilised scale alpha/sqrt(r)")
    f.add_argument("--epochs", type=positive_float, default=None,
                   help="passes over the training split (may be fractional); alone it sets the run's length")
    f.add_argument("--max-steps", type=positive_int, default=None,
                   help="optimizer steps; overrides --epochs (default: 350 without --epochs)")
    f.add_argument("--batch-size", type=positive_int, default=16, help="rows per micro-batch")
    f.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    f.add_argument("--packing", action="store_true",
                   help="causal-lm / chat: pack training examples into rows of --max-seq-len tokens (first-fit "
                        "decreasing; attention and positions stay per example)")
    f.add_argument("--lr", type=positive_float, default=2e-4, help="peak learning rate")
    f.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="learning-rate schedule")
    f.add_argument("--output", type=output_dir, default="runs/finetune", metavar="DIR",
                   help="folder for the adapter, metrics, results and checkpoints")
    f.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    f.add_argument("--overwrite", action="store_true",
                   help="delete an earlier run's adapter, metrics, results and checkpoints in --output when "
                        "training starts (a run that fails before leaves them; without --overwrite or --resume, "
                        "an --output that holds a run is refused)")
    f.add_argument("--checkpoint-every", type=nonnegative_int, default=0,
                   help="steps between checkpoints; 0 = only at the end")
    f.add_argument("--log-every", type=positive_int, default=10, help="steps between metrics.jsonl records")
    f.add_argument("--seed", type=nonnegative_int, default=0, help="data order, LoRA initialisation and dropout")
    f.add_argument("--remat", nargs="?", const="full", default=None, choices=["none", "full", "dots", "offload"],
                   help="recompute decoder layers in the backward pass: full (keep layer inputs only; the "
                        "default of a bare --remat), dots (keep matmul outputs, recompute elementwise work) or "
                        "offload (matmul outputs kept in pinned host memory), none; without the flag: none, or "
                        "the first of dots and full that fits the device's memory when the run does not")
    f.add_argument("--scan-layers", type=layer_loop, default=None, metavar="{scan,unroll}",
                   help="the decoder's layer loop in the train/eval steps: scan (one layer in the compiled "
                        "program) or unroll (every layer written out: no per-layer copies, a longer compile; "
                        "slower than the scan for SmolLM2 on an H100); without the flag: the library's default (scan)")
    f.add_argument("--precompile-only", action="store_true",
                   help="compile every train/eval step for its shape buckets (warming the on-disk cache) and exit")
    f.add_argument("--dry-run", action="store_true",
                   help="compile (shapes only), print the device memory the run needs and the device's, and exit "
                        "without loading weights")
    f.add_argument("--mesh", type=mesh_spec, default=None, metavar="data=N,fsdp=M",
                   help="train on N x M devices: batch split over all, frozen weights sharded over fsdp "
                        "(default: one device)")
    f.add_argument("--distributed", action="store_true",
                   help="several processes/hosts: jax.distributed.initialize (flags below or environment)")
    f.add_argument("--coordinator-address", type=nonempty_str, default=None, metavar="HOST:PORT",
                   help="HOST:PORT of process 0 (default: $JAX_COORDINATOR_ADDRESS)")
    f.add_argument("--num-processes", type=positive_int, default=None,
                   help="number of processes (default: $JAX_NUM_PROCESSES)")
    f.add_argument("--process-id", type=nonnegative_int, default=None,
                   help="this process's index (default: $JAX_PROCESS_ID)")
    f.set_defaults(func=_cmd_finetune, check=functools.partial(_check_finetune, f))

    e = command("eval", "evaluate a saved adapter on the validation and test splits")
    _add_model_args(e, training=True)
    _add_data_args(e)
    e.add_argument("--adapter", type=existing_dir, required=True, metavar="DIR", help="PEFT adapter folder (from finetune)")
    e.add_argument("--no-quantize", dest="quantize", action="store_false",
                   help="keep the base weights in --dtype instead of NF4 (as the adapter was trained)")
    _add_keep_quantized(e)
    e.set_defaults(func=_cmd_eval, check=functools.partial(_check_data, e))

    m = command("merge", "fold an adapter into the base and write an HF folder")
    _add_model_args(m)
    m.add_argument("--adapter", type=existing_dir, required=True, metavar="DIR", help="PEFT adapter folder")
    m.add_argument("--output", type=output_dir, required=True, metavar="DIR", help="folder for the merged HF model")
    m.set_defaults(func=_cmd_merge)

    g = command("generate", "generate text (chat template applied by default)")
    _add_model_args(g, generation=True)
    g.add_argument("--adapter", type=existing_dir, default=None, metavar="DIR",
                   help="PEFT LoRA adapter folder to apply (default: none)")
    _add_keep_quantized(g, auto=True)
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", type=nonempty_str, help="the user message (or raw text with --no-chat)")
    source.add_argument("--messages", type=chat_messages, metavar="JSON|FILE",
                        help='a conversation to continue with the chat template, as JSON or a JSON file: '
                             '[{"role": "system"|"user"|"assistant", "content": "..."}, ...]')
    g.add_argument("--system", default=None, help="optional system message (default: none)")
    g.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    g.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens to generate at most")
    g.add_argument("--temperature", type=nonnegative_float, default=0.0, help="sampling temperature; 0 = greedy")
    g.add_argument("--top-k", type=nonnegative_int, default=0, help="sample among the k most likely tokens; 0 = off")
    g.add_argument("--top-p", type=probability, default=1.0,
                   help="nucleus sampling: smallest set of tokens with this total probability, in (0, 1]; 1 = off")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="sampling seed")
    g.add_argument("--speculative", default=None, choices=["ngram", "draft"],
                   help="speculative decoding: prompt lookup (ngram) or a draft model (draft, needs --draft-model); "
                        "the text is printed when complete, with the acceptance rate (default: off)")
    g.add_argument("--draft-model", type=existing_path, default=None, metavar="PATH",
                   help="HF folder or .gguf file of a draft model sharing the tokenizer (default: none)")
    g.add_argument("--num-draft", type=positive_int, default=4,
                   help="--speculative: draft tokens verified per step (k)")
    g.add_argument("--kernel-codes", action="store_true",
                   help="NF4 weights on a Hopper GPU: keep a second copy of the codes in the decode kernel's layout "
                        "(Llama-3-8B decodes about 14%% faster on an H200, for half a byte per weight: +3.5 GB); GGUF "
                        "weights kept quantized (Q4_0/Q4_1/Q8_0/Q4_K/Q6_K): decode through the Mosaic GPU GEMV "
                        "over a second copy of the blocks in its layout (8B Q4_K_M: 1.74x on an H100, +4.9 GB). "
                        "Off by default for that memory")
    g.add_argument("--dry-run", action="store_true",
                   help="compile from shapes, print the device memory generation needs (weights, KV cache, "
                        "temporaries) and the device's, and exit without loading weights")
    g.set_defaults(func=_cmd_generate, check=functools.partial(_check_generate, g))

    s = command("serve", "an OpenAI-compatible HTTP server (continuous batching, several LoRA adapters per batch)")
    _add_model_args(s, serving=True)
    s.add_argument("--adapter", type=adapter_spec, action="append", default=None, metavar="NAME=DIR",
                   help="serve the PEFT LoRA adapter in DIR under NAME (a request's \"model\": NAME); repeatable "
                        "(default: none)")
    s.add_argument("--host", type=nonempty_str, default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=port_number, default=8000, help="TCP port; 0 = any free port")
    s.add_argument("--max-batch", type=positive_int, default=8, help="decode slots (requests decoded together)")
    s.add_argument("--max-model-len", type=positive_int, default=None,
                   help="tokens per request at most (prompt + completion); sizes the KV cache (default: 2048, or "
                        "the model's context if shorter)")
    s.add_argument("--max-queue", type=positive_int, default=256,
                   help="requests waiting for a slot at most; more are answered 503 with Retry-After")
    s.add_argument("--prefill-chunk", type=positive_int, default=512,
                   help="prompt tokens prefilled per engine step (a longer prompt takes several)")
    s.add_argument("--decode-steps", type=positive_int, default=1, help="decode steps per engine iteration")
    s.add_argument("--prefill-batch", type=positive_int, default=1,
                   help="prompts prefilled together in one call at most (cheaper per prompt; decode steps wait "
                        "longer behind the call)")
    s.add_argument("--grace", type=nonnegative_float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM / SIGINT (then aborted)")
    _add_keep_quantized(s, auto=True)
    s.add_argument("--kernel-codes", action="store_true",
                   help="NF4 weights on a Hopper GPU: keep a second copy of the codes in the decode kernel's layout "
                        "(faster decoding, for half a byte per weight)")
    s.set_defaults(func=_cmd_serve, check=functools.partial(_check_serve, s))
    return parser


#: what a finetune run writes into --output (jaxqlora.finetune).
RUN_ENTRIES = ("adapter", "checkpoints", "metrics.jsonl", "results.json")


def _earlier_run(output: str) -> list[str]:
    folder = Path(output)
    return [name for name in RUN_ENTRIES if (folder / name).exists()] if folder.is_dir() else []


def _check_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.task in ("causal-lm", "chat") and args.max_seq_len < 2:
        parser.error(f"argument --max-seq-len: must be at least 2 for --task {args.task}, got {args.max_seq_len}")


def _check_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--speculative draft`` needs ``--draft-model`` and ``--draft-model`` needs it. A classification
    adapter (PEFT ``task_type`` SEQ_CLS) is refused: its LoRA weights were trained with a score head in
    place of the LM head, which ``generate`` does not use. No ``--keep-quantized`` / ``--no-keep-quantized``:
    `_cpu_keeps_quantized`. No ``--dtype``: on a CPU float16, or float32 kept quantized (the weights stay in
    their blocks); elsewhere bfloat16."""
    if args.messages is not None and (args.no_chat or args.system is not None):
        parser.error(f"argument --messages: not allowed with {'--no-chat' if args.no_chat else '--system'} (put "
                     "a system message in the conversation)")
    if args.speculative == "draft" and args.draft_model is None:
        parser.error("argument --speculative: draft needs --draft-model PATH")
    if args.draft_model is not None and args.speculative != "draft":
        parser.error("argument --draft-model: only used with --speculative draft")
    if args.adapter is not None:
        import json

        config = Path(args.adapter) / "adapter_config.json"
        try:
            task = json.loads(config.read_text()).get("task_type")
        except (OSError, ValueError, AttributeError):
            task = None  # load_adapter reports a missing or damaged adapter_config.json with its typed error
        if task == "SEQ_CLS":
            parser.error(f"argument --adapter: {args.adapter} is a classification adapter (task_type SEQ_CLS, "
                         "trained with a score head instead of the LM head); generate needs a causal-LM adapter "
                         "(jaxqlora finetune --task causal-lm); use jaxqlora eval for a classification adapter")
    # Defaults last, after every refusal (the first reads the GGUF tensor table).
    if args.keep_quantized is None:
        args.keep_quantized = _cpu_keeps_quantized(args.model)
    if args.dtype is None:
        import jax

        if jax.default_backend() != "cpu":
            args.dtype = "bfloat16"
        else:
            args.dtype = "float32" if args.keep_quantized else "float16"


def _check_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``serve --adapter``: names are unique and differ from the base model's served name; a
    classification adapter (PEFT ``task_type`` SEQ_CLS) is refused, as ``generate`` does."""
    import json

    base = served_model_name(args.model)
    seen = set()
    for name, folder in args.adapter or ():
        if name in seen:
            parser.error(f"argument --adapter: the name {name!r} is given twice")
        if name == base:
            parser.error(f"argument --adapter: the name {name!r} is the base model's served name")
        seen.add(name)
        try:
            task = json.loads((Path(folder) / "adapter_config.json").read_text()).get("task_type")
        except (OSError, ValueError, AttributeError):
            continue  # the engine's load_adapter reports a missing or damaged adapter_config.json
        if task == "SEQ_CLS":
            parser.error(f"argument --adapter: {folder} is a classification adapter (task_type SEQ_CLS, trained "
                         "with a score head instead of the LM head); serve needs causal-LM adapters")
    # Defaults last, after every refusal (as generate's): kept quantized in float32 where the CPU kernel
    # reads the file's blocks, else bfloat16.
    if args.keep_quantized is None:
        args.keep_quantized = _cpu_keeps_quantized(args.model)
    if args.dtype is None:
        import jax

        args.dtype = "float32" if args.keep_quantized and jax.default_backend() == "cpu" else "bfloat16"


def _check_finetune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks between finetune's arguments (each one alone passed its ``type=``)."""
    _check_data(parser, args)
    if args.packing and args.task == "classification":
        parser.error("argument --packing: works for --task causal-lm and chat; classification keeps one example "
                     "per row")
    if args.resume and args.overwrite:
        parser.error("argument --overwrite: not allowed with --resume")
    if not (args.resume or args.overwrite or args.precompile_only or args.dry_run):
        earlier = _earlier_run(args.output)
        if earlier:
            parser.error(f"argument --output: {args.output} already holds a run ({', '.join(earlier)}); "
                         "pass --resume to continue it or --overwrite to replace it")
    if args.num_processes is not None and args.process_id is not None and args.process_id >= args.num_processes:
        parser.error(f"argument --process-id: must be below --num-processes {args.num_processes}, "
                     f"got {args.process_id}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxqlora`` console script; returns the exit code.

    A bad argument prints argparse's usage and ``error:`` line and returns 2 before anything
    is loaded (``--help`` returns 0). Errors raised on purpose by jaxqlora (bad checkpoint or
    data file, prompt too long, missing embedded model) and operating-system errors (a disk
    that is full, a folder that cannot be written) print one ``error:`` line to stderr and
    return 2; ``--debug`` shows their traceback instead. Ctrl-C returns 130 (during
    ``finetune``'s training, after the current step and a checkpoint: ``--resume`` continues).
    """
    from jaxqlora.errors import JaxQLoRAError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check = getattr(args, "check", None)
        if check is not None:
            check(args)
    except SystemExit as e:  # argparse: --help (0) or a bad argument (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.func(args)
    except (JaxQLoRAError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # finetune's TrainingInterrupted says where it stopped and what was saved
        if getattr(args, "debug", False):
            raise
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
