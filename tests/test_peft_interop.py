"""PEFT interoperability on a tiny random Llama (float32, CPU): adapters we save load in
`peft.PeftModel` with the same logits, and adapters PEFT saves load in jaxqlora."""

import json

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from jaxqlora.errors import CheckpointError, MissingTensorError, TensorShapeError
from jaxqlora import apply_lora, load_adapter, load_pretrained, save_adapter  # the top-level API
from jaxqlora.lora import lora_layers

transformers = pytest.importorskip("transformers")
from tiny_models import save_random_model  # noqa: E402
peft = pytest.importorskip("peft")

VOCAB = 80


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return save_random_model(tmp_path_factory, "base", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                             num_attention_heads=4, num_key_value_heads=2)


def _hf_base(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _ids(seed):
    return np.random.default_rng(seed).integers(0, VOCAB, (2, 13))


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("targets,use_rslora", [(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"), False), (("q_proj", "v_proj"), True)])
def test_our_adapter_loads_in_peft(base_folder, tmp_path, targets, use_rslora):
    ours, _ = load_pretrained(base_folder, dtype=jnp.float32)
    apply_lora(ours, r=4, alpha=8.0, targets=targets, use_rslora=use_rslora, seed=1)
    rng = np.random.default_rng(2)
    for layer in lora_layers(ours).values():  # non-zero B so the adapter matters
        layer.lora_B[...] = jnp.asarray(rng.normal(0, 0.2, layer.lora_B[...].shape), jnp.float32)
    save_adapter(ours, tmp_path, base_model_name_or_path=str(base_folder))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and sorted(cfg["target_modules"]) == sorted(targets)

    peft_model = peft.PeftModel.from_pretrained(_hf_base(base_folder), tmp_path).eval()
    ids = _ids(3)
    ref = _torch_logits(peft_model, ids)
    base_ref = _torch_logits(_hf_base(base_folder), ids)
    assert np.abs(ref - base_ref).max() > 1e-2  # the adapter changes the output
    got = np.asarray(ours(jnp.asarray(ids)))
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_peft_adapter_loads_in_jaxqlora(base_folder, tmp_path, targets):
    hf = _hf_base(base_folder)
    lcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, lcfg)
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape))
    pm.save_pretrained(tmp_path)
    pm.eval()
    ids = _ids(5)
    ref = _torch_logits(pm, ids)

    ours, _ = load_pretrained(base_folder, dtype=jnp.float32)
    load_adapter(ours, tmp_path)
    n_expected = 2 if targets != "all-linear" else 7  # projections, each stacked over the 2 layers
    assert len(lora_layers(ours)) == n_expected
    assert all(layer.lora_A[...].shape[0] == 2 for layer in lora_layers(ours).values())
    got = np.asarray(ours(jnp.asarray(ids)))
    assert np.abs(got - ref).max() < 1e-4


def test_adapter_errors_name_the_key(base_folder, tmp_path):
    ours, _ = load_pretrained(base_folder, dtype=jnp.float32)
    apply_lora(ours, r=4, alpha=8.0, targets=("q_proj",))
    save_adapter(ours, tmp_path)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    bad = dict(tensors)
    bad[key] = np.zeros((4, 64), np.float32)  # transposed by mistake
    save_file(bad, tmp_path / "adapter_model.safetensors")
    fresh, _ = load_pretrained(base_folder, dtype=jnp.float32)
    with pytest.raises(TensorShapeError) as e:
        load_adapter(fresh, tmp_path)
    assert e.value.name == key
    del bad[key]
    save_file(bad, tmp_path / "adapter_model.safetensors")
    fresh, _ = load_pretrained(base_folder, dtype=jnp.float32)
    with pytest.raises(MissingTensorError, match="lora_B"):
        load_adapter(fresh, tmp_path)


def test_unreadable_adapter_weights_name_the_file(tmp_path):
    from jaxqlora.io.peft import read_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        read_adapter(tmp_path)


def test_merged_export_loads_in_transformers(base_folder, tmp_path):
    """save_pretrained(merge) -> transformers gives our adapted model's logits."""
    from jaxqlora import merge_lora, save_pretrained

    ours, _ = load_pretrained(base_folder, dtype=jnp.float32)
    apply_lora(ours, r=4, alpha=8.0, seed=3)
    rng = np.random.default_rng(6)
    for layer in lora_layers(ours).values():
        layer.lora_B[...] = jnp.asarray(rng.normal(0, 0.2, layer.lora_B[...].shape), jnp.float32)
    ids = _ids(7)
    adapted = np.asarray(ours(jnp.asarray(ids)))
    merged = merge_lora(ours, dtype=jnp.float32)
    assert not lora_layers(merged)
    save_pretrained(merged, tmp_path, dtype=jnp.float32)
    ref = _torch_logits(_hf_base(tmp_path), ids)
    assert np.abs(adapted - ref).max() < 1e-4


def test_adapter_naming_a_module_the_model_lacks_is_a_typed_error(base_folder, tmp_path):
    """A target the model does not have (e.g. a vision tower's ``fc1``) is refused with the
    typed adapter error naming adapter_config.json and its field, not a plain ValueError."""
    ours, _ = load_pretrained(base_folder, dtype=jnp.float32)
    apply_lora(ours, r=2, alpha=4.0, targets=("q_proj",), seed=0)
    save_adapter(ours, tmp_path)
    cfg_file = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["target_modules"] = ["q_proj", "fc1"]
    cfg_file.write_text(json.dumps(cfg))
    fresh, _ = load_pretrained(base_folder, dtype=jnp.float32)
    with pytest.raises(CheckpointError, match=r"adapter_config.json, 'target_modules'.*fc1"):
        load_adapter(fresh, tmp_path)
