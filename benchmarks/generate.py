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

Speculative decoding (issue 15; `jaxqlora.speculative`), ``--speculative ngram`` or ``draft``:

- verification cost: one verification step (target forward of the last token + k drafts,
  acceptance, cache rollback) against one plain decode step, batch 1 at a 512-token prompt,
  k = 1..8, random NF4 weights (8B- and SmolLM2-shaped); the expected speed-up of a free
  draft at the acceptance rate of the copy task, ``(1 - a^(k+1)) / (1 - a)`` tokens per step
  over the cost ratio;
- copy task, the embedded SmolLM2-135M-Instruct (bf16, greedy): "repeat this passage" over
  a ~1,000-token passage of the embedded Rotten Tomatoes reviews, 256 new tokens, plain vs
  speculative (k = 4 and 8): decode tokens/s, speed-up, acceptance rate, identical output.
  ``draft`` uses the embedded model quantized to NF4 as the draft of the bf16 model.

    python benchmarks/generate.py --speculative ngram            # on one GPU
    python benchmarks/generate.py --speculative ngram --smoke    # CPU: tiny random model

GGUF weights kept in their block formats (issue 14), ``--keep-quantized``:

- an 8B-shaped Q4_K_M-shaped model built in memory from random k-quant blocks (q/k/o/gate/up
  Q4_K; attn_v and ffn_down Q6_K in llama.cpp's ``use_more_bits`` layers, Q4_K elsewhere;
  token embedding Q4_K, output head Q6_K), bf16 activations: device memory in use after
  loading (bytes of the weights and JAX's count), time to first token and decode tokens/s
  at batch 1 with a 512-token prompt (targets: <= 5.5 GB, >= 500 tokens/s);
- the embedded SmolLM2-135M-Instruct Q4_1 file served quantized
  (``load_pretrained(keep_quantized=True)``, bf16): the same figures (target >= 3,000 tokens/s).

    python benchmarks/generate.py --keep-quantized            # on one GPU
    python benchmarks/generate.py --keep-quantized --smoke    # CPU: tiny k-quant model and the embedded file
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

    from jaxqlora.quantize import QuantizedLinear

    total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(nnx.state(lm)))
    # `use_kernel_codes` adds a second copy of the codes; a step reads one of the two
    codes = [getattr(node.weight.get_value(), "kernel_codes", None) for _, node in nnx.iter_graph(lm)
             if isinstance(node, QuantizedLinear)]
    total -= sum(int(c.size) * 4 for c in codes if c is not None)
    emb = lm.model.embed_tokens.weight[...]
    if not cfg.tie_word_embeddings:
        total -= emb.size * emb.dtype.itemsize
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # bf16 K and V per slot
    return total + batch * (context * kv + cfg.hidden_size * emb.dtype.itemsize)


def _time_rows(lm, tok, cfg, args, out: dict, decode_bytes, *, label: str) -> None:
    """For each ``args.shapes`` (batch, prompt length): time to first token and decode tokens/s
    of ``lm`` through precompiled executables, and the bandwidth bound from
    ``decode_bytes(batch, context)``, into ``out["rows"]`` (``out["copy_gbs"]`` set, compile
    seconds added to ``out["compile_s"]``)."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxqlora.compile import PROMPT_BUCKETS, bucket_for
    from jaxqlora.generate import _left_pad, generate, precompile_generate

    state = nnx.split(lm)[1]
    bw = out["copy_gbs"] * 1e9
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
        bound = batch * bw / decode_bytes(batch, length + args.new // 2)
        out["rows"][f"{batch}x{length}"] = {"ttft_s": ttft, "tok_s": _rate(batch, args.new, total, ttft),
                                            "bound_tok_s": bound}
        print(f"# {label} {batch}x{length}: {out['rows'][f'{batch}x{length}']}", file=sys.stderr, flush=True)


def worker_ours(args) -> dict:
    import jax

    cfg = common.MODELS[args.model]
    lm = common.random_nf4_model(cfg, seed=args.seed)
    lm.scan_layers = {"auto": None, "scan": True, "unroll": False}[args.scan_layers]
    if args.kernel_codes:
        from jaxqlora.quantize import use_kernel_codes

        print(f"# use_kernel_codes: {use_kernel_codes(lm) / 1e9:.2f} GB added", file=sys.stderr)
    tok = common.TokenIds()
    bw = common.copy_bandwidth(1 << 26 if args.model == "smoke" else 1 << 30)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "copy_gbs": bw / 1e9, "rows": {},
           "compile_s": 0.0}
    _time_rows(lm, tok, cfg, args, out, lambda batch, context: _decode_bytes(lm, cfg, batch, context),
               label=args.model)
    return out


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp ``use_more_bits``: the layers whose attn_v / ffn_down a Q4_K_M file stores as Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def random_gguf_model(cfg, *, seed: int = 0):
    """A `CausalLM` of ``cfg`` whose projections, output head and embedding are kept in GGUF
    k-quant formats with Q4_K_M's type choice, from random block bytes (f16 scales small and
    finite), built layer by layer; norms are ones. Needs hidden and FFN sizes that are
    multiples of 256."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxqlora.ggml import GGUF_FORMATS, GGUFWeight
    from jaxqlora.model import CausalLM
    from jaxqlora.quantize import place_quantized
    from pallas_kernels.gguf_matmul import F16

    rng = np.random.default_rng(seed)

    def blocks(qtype, n, k):
        fmt = GGUF_FORMATS[qtype]
        nb = k // fmt.BLOCK
        planes = {}
        for name, kind in fmt.LAYOUT:
            if kind == F16:
                planes[name] = rng.uniform(-1e-4, 1e-4, (n, nb)).astype(np.float16)
            else:
                planes[name] = np.frombuffer(rng.bytes(n * nb * kind), np.uint8).reshape(n, nb, kind)
        return GGUFWeight(planes, np.zeros((), np.int32), (qtype,), (n, k))

    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    n = cfg.num_hidden_layers
    for name, (rows, cols) in shapes.items():  # one projection at a time: host memory stays near one stack
        more = name in ("self_attn.v_proj", "mlp.down_proj")
        place_quantized(abstract, {f"model.layers.{i}.{name}": blocks("Q6_K" if more and _use_more_bits(i, n)
                                                                       else "Q4_K", rows, cols)
                                   for i in range(n)}, "<random>", jnp.bfloat16)
    heads = {"model.embed_tokens": blocks("Q4_K", cfg.vocab_size, h)}
    if not cfg.tie_word_embeddings:
        heads["lm_head"] = blocks("Q6_K", cfg.vocab_size, h)
    place_quantized(abstract, heads, "<random>", jnp.bfloat16)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), params)
    return nnx.merge(graphdef, params, rest)


def worker_gguf(args) -> dict:
    """Device memory, time to first token and decode tokens/s of a model kept in GGUF formats."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    t0 = time.perf_counter()
    if args.model == "embedded":
        from jaxqlora.io import load_pretrained

        lm, _ = load_pretrained(dtype=jnp.bfloat16, keep_quantized=True)
        cfg = lm.config
    else:
        cfg = common.MODELS[args.model] if args.model != "smoke" else dataclasses.replace(
            common.MODELS["smoke"], hidden_size=256, intermediate_size=512, head_dim=64)
        lm = random_gguf_model(cfg, seed=args.seed)
    lm.scan_layers = {"auto": None, "scan": True, "unroll": False}[args.scan_layers]
    load_s = time.perf_counter() - t0
    tok = common.TokenIds()
    state = nnx.split(lm)[1]
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))  # a step reads these
    if args.kernel_codes:  # Hopper: the Mosaic GPU GEMV's layout beside the planes (read instead of them)
        from jaxqlora.quantize import use_kernel_codes

        print(f"# use_kernel_codes: {use_kernel_codes(lm) / 1e9:.2f} GB added", file=sys.stderr)
    stats = jax.local_devices()[0].memory_stats() or {}
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": {}, "load_s": load_s,
           "weight_bytes": weights, "bytes_in_use": stats.get("bytes_in_use"), "compile_s": 0.0}
    out["copy_gbs"] = common.copy_bandwidth(1 << 26 if args.smoke else 1 << 30) / 1e9
    _time_rows(lm, tok, cfg, args, out,
               lambda batch, context: _decode_bytes_gguf(lm, cfg, weights, batch, context),
               label=f"gguf {args.model}")
    stats = jax.local_devices()[0].memory_stats() or {}
    out["peak_bytes"] = stats.get("peak_bytes_in_use")
    return out


def _decode_bytes_gguf(lm, cfg, weights: int, batch: int, context: int) -> int:
    """Bytes one decode step reads with GGUF weights: all weights but the embedding table
    (one row per sequence; a tied table is read whole as the head), plus the KV cache."""
    import jax

    emb = lm.model.embed_tokens
    table = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(emb.weight.get_value()))
    total = weights - (0 if cfg.tie_word_embeddings else table)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    return total + batch * context * kv


def gguf_main(args) -> int:
    """``--keep-quantized``: device memory and decode speed of GGUF-kept models."""
    t_start = time.perf_counter()
    env = {"JAX_PLATFORMS": "cpu"} if args.smoke else {}
    runs = [("smoke", None, None), ("embedded", 3000, None)] if args.smoke else [
        ("llama3-8b", 500, 5.5e9), ("embedded", 3000, None)]
    runs = [r for r in runs if args.only in r[0]]
    shape = "1x32" if args.smoke else "1x512"
    new = 8 if args.smoke else NEW
    rounds = 2 if args.smoke else args.rounds
    results = {}
    for model, _, _ in runs:
        wargs = ["--worker", "gguf", "--model", model, "--shapes", shape, "--new", str(new), "--rounds",
                 str(rounds), "--scan-layers", args.scan_layers] + (["--smoke"] if args.smoke else []) + (
                 ["--kernel-codes"] if args.kernel_codes else [])
        results[model] = common.run_worker(__file__, wargs, args.budget - (time.perf_counter() - t_start), env)
    first = next((r for r in results.values() if "device" in r), {})
    print(f"\n# GGUF kept quantized, {time.strftime('%Y-%m-%d')} | {first.get('device', '?')} | jax "
          f"{first.get('jax', '?')} | copy {first.get('copy_gbs', 0):.0f} GB/s | bf16 activations, greedy, "
          f"{new} new tokens, median of {rounds}")
    print("| model | weights GB | device GB in use (peak) | batch x prompt | first token ms | decode tokens/s | "
          "bound tokens/s | of bound | targets |")
    print("|---|---|---|---|---|---|---|---|---|")
    names = {"llama3-8b": "8B-shaped Q4_K_M (random)", "embedded": "SmolLM2-135M Q4_1 (embedded file)",
             "smoke": "tiny Q4_K_M-shaped (random)"}
    for model, tok_target, mem_target in runs:
        r = results[model]
        if "rows" not in r:
            print(f"| {names[model]} | {r.get('error', '?')} | | | | | | | |")
            continue
        gbs = lambda b: "n/a" if b is None else f"{b / 1e9:.2f}"
        for key, row in r["rows"].items():
            tgts = []
            if mem_target:
                used = r["bytes_in_use"] if r["bytes_in_use"] is not None else r["weight_bytes"]
                tgts.append(f"memory <= {mem_target / 1e9:.1f} GB " + ("met" if used <= mem_target else "not met"))
            if tok_target and not args.smoke:
                tgts.append(f">= {tok_target} tok/s " + ("met" if row["tok_s"] >= tok_target else "not met"))
            print(f"| {names[model]} | {r['weight_bytes'] / 1e9:.2f} | {gbs(r['bytes_in_use'])} "
                  f"({gbs(r.get('peak_bytes'))}) | {key} | {row['ttft_s'] * 1e3:.1f} | {row['tok_s']:,.1f} | "
                  f"{row['bound_tok_s']:,.0f} | {row['tok_s'] / row['bound_tok_s']:.0%} | {'; '.join(tgts)} |")
    return 0


def worker_verify(args) -> dict:
    """Seconds of one plain decode step and of one verification step per k (batch 1)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxqlora.decode import SamplingConfig, inference_model, prefill, sample_token
    from jaxqlora.speculative import accept, rollback

    cfg = common.MODELS[args.model]
    lm = common.random_nf4_model(cfg, seed=args.seed)
    lm.scan_layers = {"auto": None, "scan": True, "unroll": False}[args.scan_layers]
    graphdef, state = nnx.split(lm)
    (batch, length), = args.shapes
    greedy = SamplingConfig()

    @functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
    def verify(graphdef, state, tokens, cache):  # as one step of jaxqlora.speculative.speculative_chunk
        model = inference_model(graphdef, state)
        if model.scan_layers is None:
            model.scan_layers = False
        start = cache.index
        hidden, cache = model.hidden_states(tokens, cache=cache)
        n, nxt = accept(model.logits(hidden), tokens[:, 1:], None, jax.random.key(0), greedy)
        keep = jnp.arange(tokens.shape[1])[None, :] < (n + 1)[:, None]
        return nxt, rollback(cache, start, keep)

    @functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
    def decode(graphdef, state, token, cache):  # one step of jaxqlora.decode.decode_chunk
        model = inference_model(graphdef, state)
        hidden, cache = model.hidden_states(token[:, None], cache=cache)
        return sample_token(model.logits(hidden[:, -1]), jax.random.key(0), greedy), cache

    ids = _prompts(cfg, batch, length, args.seed)
    mask = np.ones_like(ids)
    steps = 3 * args.rounds + 8
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": {}}

    def fresh(extra):
        return prefill(graphdef, state, ids, mask, np.int32(0), max_len=length + extra, sampling=greedy)

    tok, cache, _ = fresh(steps * 10)
    box = {"tok": tok, "cache": cache}

    def step():
        box["tok"], box["cache"] = decode(graphdef, state, box["tok"], box["cache"])
        return box["tok"]

    plain = common.bench(step, calls=1, rounds=args.rounds, warmup=2)
    out["rows"]["plain"] = plain
    for k in range(1, 9):
        tok, cache, _ = fresh(steps * (k + 1) + 16)
        drafts = jnp.asarray(np.random.default_rng(k).integers(1, cfg.vocab_size, (batch, k)), jnp.int32)
        box = {"tok": tok, "cache": cache}

        def vstep():
            box["tok"], box["cache"] = verify(graphdef, state, jnp.concatenate([box["tok"][:, None], drafts], 1),
                                              box["cache"])
            return box["tok"]

        out["rows"][f"k{k}"] = common.bench(vstep, calls=1, rounds=args.rounds, warmup=2)
        print(f"# {args.model} verify k={k}: {out['rows'][f'k{k}'] * 1e3:.2f} ms (plain step {plain * 1e3:.2f} ms)",
              file=sys.stderr, flush=True)
    return out


COPY_INSTRUCTION = "Repeat the following text exactly, word for word:\n\n"


def _copy_passage(tokenizer, target_tokens: int) -> str:
    """About ``target_tokens`` tokens of embedded Rotten Tomatoes reviews, joined."""
    from jaxqlora import data

    texts = data.load_classification().texts
    out, n = [], 0
    for t in texts:
        out.append(t.strip())
        n += len(tokenizer.encode(t))
        if n >= target_tokens:
            break
    return " ".join(out)


def worker_copy(args) -> dict:
    """Plain vs speculative greedy decoding of the copy task: seconds, tokens, acceptance."""
    import jax
    import jax.numpy as jnp

    from jaxqlora.compile import PROMPT_BUCKETS, bucket_for
    from jaxqlora.generate import encode_prompts, generate, precompile_generate
    from jaxqlora.speculative import SpeculativeConfig

    if args.model == "smoke":
        cfg = common.MODELS["smoke"]
        lm = common.random_nf4_model(cfg, seed=args.seed)
        tok = common.TokenIds()
        prompt = (_prompts(cfg, 1, 24, args.seed)[0].tolist() * 8)[:180]
        draft = common.random_nf4_model(cfg, seed=args.seed + 1) if args.speculative == "draft" else None
    else:
        from jaxqlora.io import load_pretrained
        from jaxqlora.quantize import quantize_model

        lm, tok = load_pretrained(dtype=jnp.bfloat16)
        prompt = [{"role": "user", "content": COPY_INSTRUCTION + _copy_passage(tok, args.passage)}]
        draft = None
        if args.speculative == "draft":
            draft, _ = load_pretrained(dtype=jnp.bfloat16)
            quantize_model(draft)
    rows = encode_prompts(tok, [prompt])
    bucket = bucket_for(len(rows[0]), PROMPT_BUCKETS)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "prompt_tokens": len(rows[0]), "runs": {}}
    ref = None
    for k in (0, 4, 8):
        spec = None if k == 0 else SpeculativeConfig(args.speculative, num_draft=k)
        kw = dict(max_new_tokens=args.new, return_ids=True)
        ex = precompile_generate(lm, tok, batch_size=1, prompt_lens=(bucket,), max_new_tokens=args.new,
                                 speculative=spec, draft_model=draft, log=lambda m: print(m, file=sys.stderr))
        times, stats = [], None
        for _ in range(args.rounds + 1):  # the first is a warm-up
            ids, stats = generate(lm, tok, rows, executables=ex, speculative=spec, draft_model=draft,
                                  return_stats=True, **kw)
            times.append(stats["decode_s"])
        decode_s = sorted(times[1:])[len(times[1:]) // 2]
        if k == 0:
            ref = ids
        out["runs"][str(k)] = {"decode_s": decode_s, "new_tokens": stats["new_tokens"],
                               "tok_s": (stats["new_tokens"] - 1) / decode_s,
                               "acceptance": stats.get("acceptance_rate"), "identical": ids == ref,
                               "tokens_per_step": stats.get("tokens_per_step")}
        print(f"# copy k={k}: {out['runs'][str(k)]}", file=sys.stderr, flush=True)
    return out


def speculative_main(args) -> int:
    """``--speculative``: the verification-cost and copy-task tables."""
    t_start = time.perf_counter()
    env = {"JAX_PLATFORMS": "cpu"} if args.smoke else {}
    models = ["smoke"] if args.smoke else [m for m, _, _ in MODELS if args.only in m]
    shape = "1x32" if args.smoke else "1x512"
    rounds = 2 if args.smoke else args.rounds
    common_args = ["--rounds", str(rounds), "--scan-layers", args.scan_layers, "--speculative", args.speculative]
    copy = common.run_worker(__file__, ["--worker", "copy", "--model", "smoke" if args.smoke else "embedded",
                                        "--new", str(16 if args.smoke else 256), "--passage", str(args.passage)]
                             + common_args, args.budget / 2, env)
    verify = {m: common.run_worker(__file__, ["--worker", "verify", "--model", m, "--shapes", shape] + common_args,
                                   args.budget - (time.perf_counter() - t_start), env) for m in models}
    runs = copy.get("runs", {})
    print(f"\n# speculative decoding ({args.speculative}), {time.strftime('%Y-%m-%d')} | "
          f"{copy.get('device', '?')} | jax {copy.get('jax', '?')}")
    if "error" in copy:
        print(f"copy task: {copy['error']}")
    else:
        print(f"\ncopy task: {'tiny random model' if args.smoke else 'embedded SmolLM2-135M-Instruct bf16'}, "
              f"{copy['prompt_tokens']}-token prompt, greedy, median of {rounds}")
        print("| k | decode tokens/s | speed-up | acceptance | tokens per target step | identical output | target |")
        print("|---|---|---|---|---|---|---|")
        base = runs["0"]["tok_s"]
        for k, r in runs.items():
            up = r["tok_s"] / base
            tgt = "" if k == "0" or args.speculative != "ngram" else (">= 2.0x " + ("met" if up >= 2.0 else "not met"))
            acc = "" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
            tps = "" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}"
            print(f"| {'plain' if k == '0' else k} | {r['tok_s']:,.1f} | {up:.2f}x | {acc} | {tps} | {r['identical']} | {tgt} |")
    alpha = next((r["acceptance"] for k, r in runs.items() if k == "4" and r["acceptance"] is not None), None)
    print(f"\nverification cost, batch 1 x {shape.split('x')[1]}, random NF4 weights; expected speed-up of a free "
          f"draft at acceptance {'?' if alpha is None else f'{alpha:.2f}'} (copy task, k = 4)")
    print("| model | k | verify ms | plain step ms | ratio | target | expected speed-up |")
    print("|---|---|---|---|---|---|---|")
    for m, r in verify.items():
        if "rows" not in r:
            print(f"| {m} | | {r.get('error', '?')} | | | | |")
            continue
        plain = r["rows"]["plain"]
        for k in range(1, 9):
            t = r["rows"][f"k{k}"]
            tgt = "" if k != 4 or m != "llama3-8b" else ("<= 1.3x " + ("met" if t / plain <= 1.3 else "not met"))
            exp = "" if alpha is None else f"{(1 - alpha ** (k + 1)) / (1 - alpha) / (t / plain) if alpha < 1 else (k + 1) / (t / plain):.2f}x"
            print(f"| {m} | {k} | {t * 1e3:.2f} | {plain * 1e3:.2f} | {t / plain:.2f}x | {tgt} | {exp} |")
    return 0


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
    ap.add_argument("--worker", choices=["ours", "peer", "verify", "copy", "gguf"])
    ap.add_argument("--keep-quantized", action="store_true",
                    help="GGUF weights kept in their block formats: 8B-shaped Q4_K_M-shaped model and the embedded "
                         "SmolLM2 Q4_1 file (device memory, decode tokens/s)")
    ap.add_argument("--speculative", choices=["ngram", "draft"], default=None,
                    help="speculative decoding tables instead: verification cost for k = 1..8 and the copy task")
    ap.add_argument("--passage", type=int, default=1000, help="--speculative: tokens of the passage to copy")
    ap.add_argument("--model")
    ap.add_argument("--shapes", default="", help="worker: batch x prompt pairs, e.g. 1x512,8x512")
    ap.add_argument("--new", type=int, default=NEW)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scan-layers", choices=["auto", "scan", "unroll"], default="auto",
                    help="CausalLM.scan_layers: auto (default_scan per call), always scan, always unroll")
    ap.add_argument("--kernel-codes", action="store_true",
                    help="jaxqlora.quantize.use_kernel_codes before timing (Hopper: the GEMV's layout of the codes)")
    args = ap.parse_args(argv)

    if args.worker:
        args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else []
        workers = {"ours": worker_ours, "peer": worker_peer, "verify": worker_verify, "copy": worker_copy,
                   "gguf": worker_gguf}
        common.emit(workers[args.worker](args))
        return 0
    if args.speculative:
        return speculative_main(args)
    if args.keep_quantized:
        return gguf_main(args)

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
                 "--scan-layers", args.scan_layers] + (["--kernel-codes"] if args.kernel_codes else [])
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
