"""Logits parity with HF transformers (float32, CPU) on random tiny Llama / Qwen2 / Qwen3.

Each configuration is random-initialised in transformers, saved with `save_pretrained`
(safetensors), loaded by `jaxqlora.load_pretrained`, and both models run the same random
token ids. Also: padding (left and right) and KV-cache decoding against transformers'
own padded forward and a full forward.
"""

import numpy as np
import pytest
import torch

import jax.numpy as jnp
from jaxqlora.io import load_pretrained
from jaxqlora.model import KVCache

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=256)

CONFIGS = {
    # GQA 4 query heads / 2 KV heads, untied head, llama3 rope scaling
    "llama_gqa_untied_llama3rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_theta=50000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # tied embeddings, multi-head (no GQA), odd head count
    "llama_tied_mha": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=60, num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=True)),
    # Qwen2: q/k/v bias, GQA 6/2 with head_dim 16 = 96/6
    "qwen2_bias_gqa": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=96, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)),
    # Qwen3: q/k norm, head_dim 32 != 64 / 4
    "qwen3_qknorm_headdim": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
}


def _randomize(model, seed):
    """transformers' init leaves norms at 1 and biases at 0; make every tensor random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    cfg_name, model_name, kw = CONFIGS[request.param]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **kw})
    torch.manual_seed(0)
    hf = getattr(transformers, model_name)(cfg).float().eval()
    _randomize(hf, seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    ours, _ = load_pretrained(folder, dtype=jnp.float32)
    return hf, ours


def _hf_logits(hf, ids, mask=None, position_ids=None):
    with torch.no_grad():
        out = hf(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                 position_ids=None if position_ids is None else torch.tensor(position_ids))
    return out.logits.numpy()


def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = np.random.default_rng(1).integers(0, 97, (3, 19))
    ref = _hf_logits(hf, ids)
    got = np.asarray(ours(jnp.asarray(ids, jnp.int32)))
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(pair, side):
    hf, ours = pair
    rng = np.random.default_rng(2)
    lengths = [11, 6, 1]
    t = max(lengths)
    ids = rng.integers(0, 97, (3, t))
    mask = np.zeros((3, t), np.int64)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, t - n:] = 1
        else:
            mask[i, :n] = 1
    position_ids = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ref = _hf_logits(hf, ids, mask, position_ids)
    got = np.asarray(ours(jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(got[real] - ref[real]).max() < 1e-4
    # each real row also equals the unpadded single-row forward of transformers
    for i, n in enumerate(lengths):
        row = ids[i][real[i]][None]
        np.testing.assert_allclose(got[i][real[i]], _hf_logits(hf, row)[0], atol=1e-4, rtol=0)


def test_kv_cache_decoding_matches_full_forward(pair):
    """Prefill 7 tokens (left-padded batch) then feed 5 tokens one at a time."""
    hf, ours = pair
    rng = np.random.default_rng(3)
    lengths = [7, 4]
    ids = rng.integers(0, 97, (2, 12))
    prompt_mask = np.zeros((2, 7), np.int32)
    prompt_mask[0, :] = 1
    prompt_mask[1, 3:] = 1
    cache = KVCache.init(ours.config, 2, 16, jnp.float32)
    logits, cache = ours(jnp.asarray(ids[:, :7], jnp.int32), attention_mask=jnp.asarray(prompt_mask), cache=cache)
    steps = [np.asarray(logits)[:, -1]]
    for t in range(7, 12):
        logits, cache = ours(jnp.asarray(ids[:, t:t + 1], jnp.int32), cache=cache)
        steps.append(np.asarray(logits)[:, -1])
    got = np.stack(steps[:-1], 1)  # predictions for positions 6..10
    for i, n in enumerate(lengths):
        row = np.concatenate([ids[i, 7 - n:7], ids[i, 7:11]])[None]
        ref = _hf_logits(hf, row)[0, n - 1:]
        np.testing.assert_allclose(got[i], ref, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.index), 12)  # every row
