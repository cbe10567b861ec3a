"""Ahead-of-time compilation (jaxqlora.compile) on a tiny random Llama, float32, CPU.

- After `Trainer.precompile` (over the abstract model, before the weights exist) and
  `precompile_generate`, a training run over batches of several buckets, evaluation and
  generation compile nothing (counted with jax.monitoring; the counter is first shown to
  fire). The precompiled generation's greedy ids equal transformers' `generate`.
- A shape that was not precompiled is a `BucketError`, or a new bucket when allowed.
- A second process with the persistent cache warm compiles at least 5x faster, though it
  runs with other optimizer settings and seed (none of them is in a compiled program).
- Parallel precompilation gives the serial executables.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

from jaxqlora.compile import BucketError, CompileCounter
from jaxqlora.generate import generate, precompile_generate
from jaxqlora.io import load_config, load_pretrained
from jaxqlora.lora import apply_lora
from jaxqlora.model import CausalLM
from jaxqlora.quantize import quantize_model
from jaxqlora.train import SequenceClassifier, Trainer, classification_loss, make_optimizer

transformers = pytest.importorskip("transformers")
from tiny_models import random_model, save_word_tokenizer  # noqa: E402

VOCAB = 96
ROOT = Path(__file__).resolve().parents[1]


class _Tok:
    """The ids generation needs (prompts are given as token ids)."""

    eos_token_id, pad_token_id, eos_token_ids = 2, 0, {2}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    hf = random_model(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, eos_token_id=2, max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(folder)
    return hf, folder


def _build(lm):
    quantize_model(lm)  # NF4 with double quantization, as QLoRA
    apply_lora(lm, r=4, alpha=8.0, dropout=0.1, seed=1)
    return SequenceClassifier(lm, 3, seed=2)


def _batch(lengths, bucket, rng, lead=()):
    n = len(lengths)
    ids = np.zeros((n, bucket), np.int32)
    mask = np.zeros_like(ids)
    for i, k in enumerate(lengths):
        ids[i, :k] = rng.integers(3, VOCAB, k)
        mask[i, :k] = 1
    b = {"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, 3, n).astype(np.int32),
         "weight": np.ones(n, np.float32)}
    return jax.device_put({k: v.reshape(lead + v.shape[1:]) if lead else v for k, v in b.items()})


@pytest.fixture(scope="module")
def precompiled(base):
    """A Trainer precompiled over the abstract model (no weights), then attached to the
    loaded one; generation precompiled over the abstract model too."""
    _, folder = base
    cfg = load_config(folder)
    opt, _ = make_optimizer(1e-3, total_steps=20)
    abstract_model = nnx.eval_shape(lambda: _build(CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))))
    trainer = Trainer(abstract_model, classification_loss, opt)  # no weights yet
    trainer.precompile(2, (16, 32), grad_accum=2, eval_batch_size=4, log=lambda *_: None)
    assert {str(k) for k in trainer.executables} == {"train (2, 2, 16)", "train (2, 2, 32)", "eval (4, 16)",
                                                      "eval (4, 32)"}
    with pytest.raises(ValueError, match="abstract"):
        trainer.evaluate_batch(_batch([5] * 4, 16, np.random.default_rng(0)))
    lm, _ = load_pretrained(folder, dtype=jnp.float32)
    trainer.attach(_build(lm))

    gen_abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    gen_exec = precompile_generate(gen_abstract, _Tok(), prompt_lens=(16, 32), max_new_tokens=6, ignore_eos=True,
                                   log=lambda *_: None)
    gen_lm, _ = load_pretrained(folder, dtype=jnp.float32)
    return trainer, gen_lm, gen_exec


def test_precompiled_training_evaluation_and_generation_compile_nothing(base, precompiled):
    hf, _ = base
    trainer, gen_lm, gen_exec = precompiled
    rng = np.random.default_rng(3)
    train = [_batch(rng.integers(3, 16, 4), 16, rng, (2, 2)), _batch(rng.integers(17, 32, 4), 32, rng, (2, 2)),
             _batch(rng.integers(3, 16, 4), 16, rng, (2, 2))]
    evals = [_batch(rng.integers(3, 16, 4), 16, rng), _batch(rng.integers(20, 32, 4), 32, rng)]
    prompts = [rng.integers(3, VOCAB, 11).tolist(), rng.integers(3, VOCAB, 23).tolist()]

    with CompileCounter() as control:  # the counter fires: predict is a plain jit, compiled on first use
        trainer.predict(evals[0]["input_ids"], evals[0]["attention_mask"])
    assert control.count >= 1

    with CompileCounter() as counter:
        losses = [float(trainer.step(b)["loss"]) for b in train]
        sums = [{k: float(v) for k, v in trainer.evaluate_batch(b).items()} for b in evals]
        got = [generate(gen_lm, _Tok(), p, max_new_tokens=6, return_ids=True, ignore_eos=True, executables=gen_exec)
               for p in prompts]
    assert counter.count == 0, counter.names
    assert all(np.isfinite(losses)) and sum(s["total"] for s in sums) == 8.0

    for p, ids in zip(prompts, got):  # the precompiled, bucket-padded generation is transformers' greedy
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()
        assert ids == ref


def test_missing_bucket_is_an_error_or_a_new_bucket_by_choice(precompiled):
    trainer, gen_lm, gen_exec = precompiled
    rng = np.random.default_rng(0)
    batch = _batch([20, 30, 40, 50], 64, rng, (2, 2))
    with pytest.raises(BucketError, match=r"train \(2, 2, 64\).*precompiled train buckets: "
                                          r"\['train \(2, 2, 16\)', 'train \(2, 2, 32\)'\]"):
        trainer.step(batch)
    trainer.executables.allow_new_buckets = True
    try:
        with CompileCounter() as counter:
            trainer.step(batch)
        assert counter.count >= 1 and "train (2, 2, 64)" in {str(k) for k in trainer.executables}
    finally:
        trainer.executables.allow_new_buckets = False

    with pytest.raises(BucketError, match=r"40 tokens exceeds the largest bucket; buckets are \(16, 32\)"):
        generate(gen_lm, _Tok(), list(range(3, 43)), max_new_tokens=6, ignore_eos=True, executables=gen_exec)
    with pytest.raises(BucketError, match="no prefill was precompiled"):  # other settings than compiled
        generate(gen_lm, _Tok(), [5, 6, 7], max_new_tokens=5, ignore_eos=True, executables=gen_exec)


_WARM_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import jax
    import jax.numpy as jnp
    from flax import nnx
    import jaxqlora
    from jaxqlora.config import ModelConfig
    from jaxqlora.lora import apply_lora
    from jaxqlora.model import CausalLM
    from jaxqlora.quantize import quantize_model
    from jaxqlora.train import Trainer, causal_lm_loss, make_optimizer

    settings = json.loads(sys.argv[1])  # optimizer settings and seed: none may be in a compiled program
    seed = settings.pop("seed")
    events = {"hits": 0, "requests": 0}

    def count(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            events["hits"] += 1
        elif event == "/jax/compilation_cache/compile_requests_use_cache":
            events["requests"] += 1

    jax.monitoring.register_event_listener(count)
    cfg = ModelConfig(arch="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)

    def build():
        lm = CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
        quantize_model(lm)
        return apply_lora(lm, r=4, alpha=8.0, dropout=0.1, seed=seed)

    opt, _ = make_optimizer(**settings)
    trainer = Trainer(nnx.eval_shape(build), causal_lm_loss, opt)
    t0 = time.perf_counter()
    ex = trainer.precompile(2, (16, 32), eval_batch_size=4, log=lambda *_: None)
    print(json.dumps({"seconds": time.perf_counter() - t0, "compile": ex.total("compile"), "lower": ex.total("lower"),
                      "executables": len(ex), "cache": str(jaxqlora.compile.enable_compile_cache()), **events}))
""")


def test_warm_cache_compiles_at_least_5x_faster_for_other_settings(tmp_path):
    """Two processes share a fresh cache folder (JAXQLORA_COMPILE_CACHE); the second one
    trains with another learning rate, step count, warmup, schedule, clipping, weight
    decay, betas and seed. Each of its compiles is a cache hit (nothing new is written),
    its compile stage is at least 5x faster, and its whole precompile (with tracing and
    lowering, which no cache skips) at least 2x."""
    env = dict(os.environ, JAXQLORA_COMPILE_CACHE=str(tmp_path / "xla"), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def run(**settings):
        out = subprocess.run([sys.executable, "-c", _WARM_SCRIPT, json.dumps(settings)], env=env,
                             capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold = run(lr=1e-3, total_steps=10, warmup_ratio=0.03, schedule="constant", max_grad_norm=0.3,
               weight_decay=0.0, b1=0.9, b2=0.999, seed=0)
    assert cold["cache"] == str(tmp_path / "xla") and cold["executables"] == 4
    assert cold["requests"] == 4 and cold["hits"] == 0, cold
    entries = sorted(p.name for p in (tmp_path / "xla").iterdir())
    assert entries
    warm = run(lr=3e-4, total_steps=1154, warmup_ratio=0.1, schedule="cosine", max_grad_norm=1.0,
               weight_decay=0.01, b1=0.8, b2=0.99, seed=5)
    assert warm["requests"] == warm["hits"] == 4, warm  # every program found in the cache
    assert sorted(p.name for p in (tmp_path / "xla").iterdir()) == entries
    assert warm["compile"] * 5 <= cold["compile"], (cold, warm)
    assert warm["seconds"] * 2 <= cold["seconds"], (cold, warm)


def _program(compiled) -> str:
    """The optimized HLO computations of an executable, without the source-location tables
    and ``metadata={...}`` annotations (which op's location XLA keeps for a fused op varies)."""
    text = compiled.as_text()
    body = text[text.index("\n%") if "\n%" in text else text.index("\nENTRY"):]
    return re.sub(r",? ?metadata=\{[^}]*\}", "", body)


def test_parallel_precompile_gives_the_serial_executables(base):
    """`precompile` with 4 worker threads returns the executables one worker compiles:
    the same keys in the same order and the same optimized programs (XLA compiles both:
    the persistent cache is off here), with one timing per executable."""
    _, folder = base
    cfg = load_config(folder)
    opt, _ = make_optimizer(1e-3, total_steps=20)
    abstract_model = nnx.eval_shape(lambda: _build(CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))))
    got, logs = {}, {}
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        for workers in (1, 4):
            logs[workers] = []
            trainer = Trainer(abstract_model, classification_loss, opt)
            got[workers] = trainer.precompile(2, (16, 32), grad_accum=2, eval_batch_size=4,
                                              log=logs[workers].append, max_workers=workers)
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    serial, parallel = got[1], got[4]
    assert list(parallel) == list(serial) == [k for L in (16, 32) for k in serial if k.shape[-1] == L]
    for key in serial:  # metadata (source lines XLA keeps for a fused op) may name either op
        assert _program(parallel[key]) == _program(serial[key]), key
        assert set(parallel.seconds) == set(serial.seconds) and parallel.seconds[key].compile > 0
    for workers, lines in logs.items():
        assert sorted(line.split(" in ")[0] for line in lines[:-1]) == sorted(f"compiled {k}" for k in serial)
        assert lines[-1].startswith(f"precompiled 4 executables in ") and f"with {workers} worker(s)" in lines[-1]
    with pytest.raises(ValueError, match="max_workers"):
        Trainer(abstract_model, classification_loss, opt).precompile(2, (16,), max_workers=0)


def test_cli_precompile_only_compiles_without_loading_weights(base, tmp_path, monkeypatch, capsys):
    """``jaxqlora finetune --precompile-only`` compiles every train/eval bucket into the
    cache folder and exits before any weight is read."""
    import jaxqlora.io
    from jaxqlora.cli import main
    from jaxqlora.compile import enable_compile_cache

    _, folder = base
    words = save_word_tokenizer(folder, VOCAB)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "\n".join(f"{' '.join(rng.choice(words, 6))},{'ab'[i % 2]}" for i in range(40)))

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(jaxqlora.io, "load_pretrained", no_weights)
    cache = enable_compile_cache(tmp_path / "xla")
    try:
        code = main(["finetune", "--model", str(folder), "--data", str(data), "--max-seq-len", "16",
                     "--batch-size", "4", "--dtype", "float32", "--output", str(tmp_path / "run"), "--precompile-only"])
    finally:
        enable_compile_cache()  # back to the session's folder
    assert code == 0
    assert "precompiled 2 executables" in capsys.readouterr().out  # train (1, 4, 16) and eval (64, 16)
    assert len(list(cache.iterdir())) >= 2
