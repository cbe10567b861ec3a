"""Device memory known before the weights are placed (`jaxqlora.memory`, ``generate --dry-run``).

The estimates are checked against counts made here from independent sources: the
parameters of the transformers model a checkpoint was saved from, the KV cache's size from
the config (2 x layers x batch x slots x kv heads x head dim), and the arrays a real load
allocates. (The fine-tuning estimate is tested in tests/test_train.py.)
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jaxqlora.io  # noqa: E402
from jaxqlora import memory  # noqa: E402
from jaxqlora.cli import main  # noqa: E402
from jaxqlora.generate import generation_memory  # noqa: E402
from jaxqlora.io import load_config, load_pretrained, load_tokenizer  # noqa: E402
from jaxqlora.model import CausalLM  # noqa: E402
from tiny_models import random_model, save_word_tokenizer  # noqa: E402

VOCAB = 80
SHAPE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama saved by transformers (float32), its tokenizer, and its parameter count."""
    path = tmp_path_factory.mktemp("tiny")
    hf = random_model(**SHAPE)
    hf.save_pretrained(path)
    save_word_tokenizer(path, VOCAB)
    return path, sum(p.numel() for p in hf.parameters()), hf.config


def _dense(path, dtype):
    cfg = load_config(path)
    return nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_checkpoint_bytes_are_what_the_load_allocates(folder, dtype):
    path, params, _ = folder
    got = memory.checkpoint_device_bytes(path, dtype)
    assert got == params * jnp.dtype(dtype).itemsize  # transformers' parameter count
    model, _ = load_pretrained(path, dtype=dtype)
    leaves = jax.tree_util.tree_leaves(nnx.state(model))
    assert got == sum(x.size * x.dtype.itemsize for x in leaves)


def test_generation_estimate_is_weights_cache_and_temporaries(folder):
    """The decode chunk's arguments are the weights, the KV cache (keys, values, valid slots,
    per-row index) and the rows' state; the
    estimate adds outputs (less the donated cache) and XLA's temporaries."""
    path, params, hf_cfg = folder
    tok = load_tokenizer(path)
    prompts = ["w1 w2 w3", "w4 w5"]
    est, ex = generation_memory(_dense(path, jnp.float32), tok, prompts, max_new_tokens=8)
    decode = next(v for k, v in est["per_step"].items() if k.startswith("decode"))
    slots = 16 + 8  # the smallest prompt bucket (16) + max_new_tokens
    head_dim = hf_cfg.hidden_size // hf_cfg.num_attention_heads
    kv = 2 * hf_cfg.num_hidden_layers * len(prompts) * slots * hf_cfg.num_key_value_heads * head_dim * 4
    b = len(prompts)
    cache = kv + b * slots + 4 * b  # + bool valid [B, S] and the int32 index [B]
    weights = params * 4
    # the rows' state (jaxqlora.decode.SlotState): int32 tokens, a threefry key (8 bytes),
    # float32 temperature, int32 top_k, float32 top_p, int32 adapter; and the bool active
    # argument (SlotState.active, which it replaces, is unused: jit drops it)
    small = b * (4 + 8 + 4 + 4 + 4 + 4) + b
    assert decode["argument"] == weights + cache + small
    assert decode["total"] == decode["argument"] + decode["output"] - decode["alias"] + decode["temp"]
    assert est["peak_bytes"] == max(p["total"] for p in est["per_step"].values()) >= weights + cache
    assert {k.kind for k in ex} == {"prefill", "decode"}

    # a model kept quantized: the same compile, with the weights' real bytes in their place
    q, _ = generation_memory(_dense(path, jnp.float32), tok, prompts, max_new_tokens=8, weight_bytes=1000)
    qd = next(v for k, v in q["per_step"].items() if k.startswith("decode"))
    assert qd["argument"] == 1000 + cache + small


def test_generate_dry_run_and_refusal_before_loading(folder, monkeypatch, capsys):
    path, params, _ = folder
    monkeypatch.setattr(jaxqlora.io, "load_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    args = ["generate", "--model", str(path), "--no-chat", "--prompt", "w1 w2", "--max-new-tokens", "4",
            "--dtype", "float32"]
    assert main(args + ["--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "fits"
    line = next(x for x in captured.err.splitlines() if x.startswith("memory estimate:"))
    argument_mb = float(line.split("argument ")[1].split(" MB")[0])
    assert argument_mb == pytest.approx(params * 4 / 1e6, abs=0.06)  # the float32 weights, and a small cache
    assert "device memory" in line

    monkeypatch.setattr(memory, "device_memory", lambda *a: 1000)
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    error = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(error) == 1 and "the generation needs about" in error[0] and "the device has 0.00 GB" in error[0]
