"""Generation speed of the embedded SmolLM2-135M-Instruct: jaxqlora vs transformers, same run.

Times greedy generation of ``--new`` tokens after a chat prompt (EOS ignored), for our
bf16 and NF4 models and transformers' model (float32 on CPU, bf16 on GPU) on the same
device. Prefill is timed with ``max_new_tokens=1``; decode tokens/s = (new - 1) /
(total - prefill). Each figure is the median of ``--rounds`` runs after one warm-up.

    python benchmarks/generate.py [--new 64] [--rounds 5] [--no-torch]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import jax
import jax.numpy as jnp


def _median_time(fn, rounds):
    fn()  # warm-up (compiles)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)

    import jaxqlora
    from jaxqlora.io.embedded import embedded_model_path
    from jaxqlora.quantize import quantize_model

    prompt = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a map."}]
    rows = []
    t0 = time.perf_counter()
    model, tok = jaxqlora.load_pretrained()
    load_s = time.perf_counter() - t0
    ids = tok.encode(tok.apply_chat_template(prompt), add_special_tokens=False)

    def ours(m, n):
        return lambda: jaxqlora.generate(m, tok, ids, max_new_tokens=n, return_ids=True, ignore_eos=True)

    for name, m in (("jaxqlora bf16", model), ("jaxqlora NF4", None)):
        if m is None:
            m, _ = jaxqlora.load_pretrained()
            quantize_model(m)
        pre = _median_time(ours(m, 1), args.rounds)
        total = _median_time(ours(m, args.new), args.rounds)
        rows.append((name, pre, (args.new - 1) / (total - pre)))

    if not args.no_torch:
        import torch
        from transformers import AutoModelForCausalLM

        path = embedded_model_path()
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        dt = torch.bfloat16 if dev == "cuda" else torch.float32
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dt).to(dev).eval()
        x = torch.tensor([ids], device=dev)

        def theirs(n):
            def run():
                with torch.no_grad():
                    hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
                if dev == "cuda":
                    torch.cuda.synchronize()
            return run

        pre = _median_time(theirs(1), args.rounds)
        total = _median_time(theirs(args.new), args.rounds)
        rows.append((f"transformers {str(dt).split('.')[-1]} ({dev})", pre, (args.new - 1) / (total - pre)))

    ref = rows[-1][2]
    print(f"# {datetime.date.today()} | {jax.devices()[0].device_kind} | jax {jax.__version__} | "
          f"prompt {len(ids)} tokens, {args.new} new, greedy, median of {args.rounds} | load {load_s:.1f} s")
    print(f"| {'model':28s} | prefill ms | decode tokens/s | vs last row |")
    print("|---|---|---|---|")
    for name, pre, rate in rows:
        print(f"| {name:28s} | {pre * 1e3:10.1f} | {rate:15.1f} | {rate / ref:10.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
