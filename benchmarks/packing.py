"""Packed vs padded causal-LM training: supervised tokens per second at equal loss (issue 17).

The embedded Rotten Tomatoes set as prompt/response pairs (``"Review: <text>\\nSentiment:"``
-> ``" positive"`` / ``" negative"`` + EOS, `jaxqlora.data.sentiment_as_prompts`), tokenized
with the embedded SmolLM2 tokenizer, ``--max-seq-len`` 256. Both paths train, in the same
process and from the same LoRA initialisation, on the same ``--steps x --batch-size``
training examples, one pass each, so they see the same supervised tokens:

- **padded** (the baseline, what ``jaxqlora finetune --task causal-lm`` does): ``--batch-size``
  examples per step, length-grouped (``group_by_length``), each batch padded to its bucket
  (32, 64, 128, 256);
- **padded, random order** (``group_by_length`` off; transformers' ``Trainer`` default): for
  reference, the baseline most QLoRA users compare with;
- **packed** (``--packing``): the examples packed first-fit decreasing into rows of 256
  tokens (`jaxqlora.data.pack`), ``--rows`` rows per step (default: as many as hold
  ``--batch-size`` examples on average, so both paths take about the same optimizer steps).

Supervised tokens/s = the response tokens trained on (the loss's count) / the seconds of the
training loop (batches made and put on the device beforehand, every step compiled and
run once beforehand; the paths run in alternating blocks of ``--block`` steps, so that a
machine busy with other work slows them alike; median of ``--rounds`` such passes). The
loss compared is the validation loss (``--eval-examples`` held-out
examples, one padded evaluation program for both) after the pass; also the mean training
loss of the last quarter of the steps. AdamW, lr ``--lr``, constant after 3% warmup, LoRA
r=16 alpha=32 on all seven projections, NF4 base (random weights for a shape name, the real
weights for ``embedded``).

    python benchmarks/packing.py                                   # CPU: tiny model, a few minutes
    python benchmarks/packing.py --model embedded --steps 300 --rounds 3   # GPU: SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from jaxqlora.config import ModelConfig  # noqa: E402

#: CPU shape: SmolLM2's vocabulary (the real tokenizer's ids) with a narrow, 2-layer decoder.
TINY = ModelConfig(arch="llama", vocab_size=49152, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
                   rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)


def build_model(name: str, dtype, seed: int):
    """``embedded``: the real SmolLM2-135M-Instruct, NF4-quantized; ``tiny`` or a
    `common.MODELS` name: random NF4 weights of that shape."""
    from jaxqlora.io import load_pretrained
    from jaxqlora.quantize import quantize_model

    if name == "embedded":
        lm, _ = load_pretrained(None, dtype=dtype)
        quantize_model(lm)
        return lm
    cfg = TINY if name == "tiny" else common.MODELS[name]
    lm = common.random_nf4_model(cfg, seed=seed, dtype=dtype)
    if name == "tiny":  # tied embeddings of std 0.1 instead of 0.02: 128-wide hidden states can then reach
        emb = lm.model.embed_tokens.weight  # logits that fit the answers (std 0.02 caps them near 2.6)
        emb[...] = emb[...] * 5
    return lm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny (CPU), embedded (real weights), or a shape of "
                    f"benchmarks/common.py MODELS: {', '.join(common.MODELS)}")
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps of the padded path")
    ap.add_argument("--batch-size", type=int, default=16, help="examples per padded step (finetune's default)")
    ap.add_argument("--rows", type=int, default=0, help="packed rows per step (0: about --batch-size examples)")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--eval-examples", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1, help="timed passes per path (median)")
    ap.add_argument("--block", type=int, default=4, help="steps per path before switching to the next path")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="auto: float32 on a CPU (XLA's CPU bf16 matmuls are slow), else bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxqlora import data as D
    from jaxqlora.compile import buckets_up_to
    from jaxqlora.io import load_tokenizer
    from jaxqlora.lora import apply_lora
    from jaxqlora.train import Trainer, causal_lm_loss, make_optimizer

    t0 = time.perf_counter()
    tok = load_tokenizer(None)
    parts = D.split(D.sentiment_as_prompts(D.load_classification(None)), seed=args.seed)
    n_train = args.steps * args.batch_size
    rng = np.random.default_rng(args.seed)
    train = parts["train"].subset(rng.permutation(len(parts["train"]))[:n_train])
    val = parts["validation"].subset(np.arange(min(args.eval_examples, len(parts["validation"]))))
    enc = D.encode(tok, train, args.max_seq_len)
    val_enc = D.encode(tok, val, args.max_seq_len)
    packed = D.pack(enc, args.max_seq_len)
    per_row = len(enc.ids) / len(packed.ids)
    rows = args.rows or max(1, round(args.batch_size / per_row))
    buckets = buckets_up_to(args.max_seq_len)
    pad = tok.pad_token_id
    padded_batches = [{k: v[None] for k, v in b.items()} for b in
                      D.batches(enc, args.batch_size, buckets, pad_id=pad, shuffle=True, seed=args.seed,
                                group_by_length=True)]
    random_batches = [{k: v[None] for k, v in b.items()} for b in
                      D.batches(enc, args.batch_size, buckets, pad_id=pad, shuffle=True, seed=args.seed)]
    packed_batches = [{k: v[None] for k, v in b.items()} for b in
                      D.batches(packed, rows, (args.max_seq_len,), pad_id=pad, shuffle=True, seed=args.seed)]
    eval_len = max(len(r) for r in val_enc.ids)
    eval_bucket = next(b for b in buckets if b >= eval_len)
    eval_bs = 64
    eval_batches = list(D.batches(val_enc, eval_bs, (eval_bucket,), pad_id=pad))
    prep_s = time.perf_counter() - t0

    if args.dtype == "auto":
        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    dtype = getattr(jnp, args.dtype)
    lm = build_model(args.model, dtype, args.seed)
    apply_lora(lm, r=16, alpha=32.0, dropout=args.dropout, seed=args.seed)

    def optimizer(steps):
        return make_optimizer(args.lr, total_steps=steps, schedule="constant")[0]

    trainer = Trainer(lm, causal_lm_loss, optimizer(len(padded_batches)))
    t1 = time.perf_counter()
    padded_lens = sorted({b["input_ids"].shape[-1] for b in padded_batches + random_batches})
    trainer.precompile(args.batch_size, padded_lens, eval_batch_size=None, train_seq_lens=padded_lens,
                       log=lambda *_: None, desc="compile padded steps")
    trainer.precompile(rows, (eval_bucket,), train_seq_lens=(args.max_seq_len,), eval_batch_size=eval_bs,
                       log=lambda *_: None, desc="compile packed step")
    compile_s = time.perf_counter() - t1

    def copy(tree):  # the steps donate their state: every pass starts from its own copy
        return jax.tree_util.tree_map(lambda x: x.copy(), tree)

    init = copy((trainer.trainable, trainer.rng_state))
    paths = {"padded": padded_batches, "padded, random order": random_batches, "packed": packed_batches}
    warm = {b["input_ids"].shape: b for bs in paths.values() for b in bs}  # each executable runs once untimed
    jax.block_until_ready([trainer.step(jax.device_put(b)) for b in warm.values()])

    def interleaved_pass() -> dict:
        """One pass of every path from the same start, in alternating blocks of ``--block``
        steps (each block timed, synced at its end), so that a machine busy with other work
        slows every path alike."""
        state, secs, got, pos = {}, {}, {}, {}
        on_device = {}
        for name, bs in paths.items():
            tr, rng = copy(init)
            state[name] = (tr, rng, optimizer(len(bs)).init(tr))
            secs[name], got[name], pos[name] = 0.0, [], 0
            on_device[name] = [jax.device_put(b) for b in bs]
        jax.block_until_ready(on_device)
        while any(pos[n] < len(paths[n]) for n in paths):
            for name in paths:
                block = on_device[name][pos[name]:pos[name] + args.block]
                if not block:
                    continue
                trainer.trainable, trainer.rng_state, trainer.opt_state = state[name]
                t = time.perf_counter()
                ms = [trainer.step(b) for b in block]
                jax.block_until_ready(ms)
                secs[name] += time.perf_counter() - t
                state[name] = (trainer.trainable, trainer.rng_state, trainer.opt_state)
                got[name] += ms
                pos[name] += len(block)
        out = {}
        for name, bs in paths.items():
            trainer.trainable, trainer.rng_state, trainer.opt_state = state[name]
            sums = [jax.device_get(trainer.evaluate_batch(b)) for b in eval_batches]
            ms = jax.device_get(got[name])
            tail = ms[-max(1, len(ms) // 4):]
            out[name] = {"sec": secs[name], "supervised": sum(float(m["count"]) for m in ms),
                         "tokens": sum(int((b["attention_mask"] > 0).sum()) for b in bs),
                         "slots": sum(int(b["attention_mask"].size) for b in bs), "steps": len(ms),
                         "val_loss": sum(float(x["loss_sum"]) for x in sums) / sum(float(x["count"]) for x in sums),
                         "label_acc": sum(float(x["correct"]) for x in sums) / sum(float(x["total"]) for x in sums),
                         "train_loss_tail": float(np.mean([m["loss"] for m in tail]))}
            r = out[name]
            print(f"# {name}: {r['steps']} steps in {r['sec']:.2f} s, {r['supervised'] / r['sec']:,.0f} supervised "
                  f"tok/s, val loss {r['val_loss']:.4f}", file=sys.stderr, flush=True)
        return out

    passes = [interleaved_pass() for _ in range(args.rounds)]
    runs = {name: [p[name] for p in passes] for name in paths}

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "?"
    kind = jax.devices()[0].device_kind
    cores = os.cpu_count()
    print(f"\n# packed vs padded causal-LM training, {time.strftime('%Y-%m-%d %H:%M')} | {kind} ({cores} CPU cores) "
          f"| jax {jax.__version__} | commit {commit}")
    print(f"# model {args.model} ({args.dtype}, NF4, LoRA r16 all 7), Rotten Tomatoes prompt/response, "
          f"{len(enc.ids)} training examples ({sum(map(len, enc.ids)):,} tokens, {per_row:.2f} per packed row), "
          f"max {args.max_seq_len} tokens; padded {args.batch_size} examples/step, packed {rows} rows/step; "
          f"median of {args.rounds}; data prep {prep_s:.1f} s, compile {compile_s:.1f} s")
    print("| path | steps | real tokens / slots | supervised tokens | seconds | supervised tok/s | ratio | "
          "val loss | val loss vs padded | train loss (last 1/4) | label acc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base = None
    for name in paths:
        rs = runs[name]
        sec = statistics.median(r["sec"] for r in rs)
        r = rs[-1]
        rate = r["supervised"] / sec
        base = base or (rate, r["val_loss"])
        print(f"| {name} | {r['steps']} | {r['tokens'] / r['slots']:.1%} | {r['supervised']:,.0f} | {sec:.2f} | "
              f"{rate:,.0f} | **{rate / base[0]:.2f}x** | {r['val_loss']:.4f} | "
              f"{(r['val_loss'] / base[1] - 1):+.2%} | {r['train_loss_tail']:.4f} | {r['label_acc']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
