"""Several LoRA adapters in one batch (`jaxqlora.io.peft.load_adapters`) against PEFT's own
mixed-batch inference (``PeftModel(..., adapter_names=[...])``, peft >= 0.10), on a tiny
random Llama in float32 on the CPU: adapters of different rank, target set and scaling (rsLoRA),
and rows of the base model, in one forward."""

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from jaxqlora import load_adapter, load_pretrained
from jaxqlora.errors import MissingTensorError
from jaxqlora.io.peft import load_adapters

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from tiny_models import save_random_model  # noqa: E402

VOCAB = 80
ADAPTERS = {  # name: (r, alpha, targets, rsLoRA)
    "small": (2, 4, ["q_proj", "v_proj"], False),
    "wide": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    "mlp": (4, 4, ["down_proj", "up_proj"], False),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = save_random_model(tmp_path_factory, "base", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                             num_attention_heads=4, num_key_value_heads=2)
    out = {}
    for seed, (name, (r, alpha, targets, rs)) in enumerate(ADAPTERS.items()):
        hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rs,
                                                     lora_dropout=0.0, task_type="CAUSAL_LM"))
        torch.manual_seed(10 + seed)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    p.copy_(0.3 * torch.randn(p.shape))
        out[name] = tmp_path_factory.mktemp(name)
        pm.save_pretrained(out[name])
    return base, out


def _peft_mixed(base, adapters, ids, names):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    first, *rest = adapters
    pm = peft.PeftModel.from_pretrained(hf, adapters[first], adapter_name=first)
    for name in rest:
        pm.load_adapter(adapters[name], adapter_name=name)
    pm.eval()
    with torch.no_grad():
        return pm(torch.tensor(ids), adapter_names=names).logits.numpy()


def test_mixed_batch_matches_peft(folders):
    base, adapters = folders
    ours, _ = load_pretrained(base, dtype=jnp.float32)
    names = load_adapters(ours, adapters)
    assert names == ["", "small", "wide", "mlp"]
    rows = ["wide", "__base__", "small", "mlp", "small", "wide"]
    ids = np.random.default_rng(0).integers(0, VOCAB, (len(rows), 11))
    ref = _peft_mixed(base, adapters, ids, rows)
    index = jnp.asarray([0 if r == "__base__" else names.index(r) for r in rows], jnp.int32)
    got = np.asarray(ours.logits(ours.hidden_states(jnp.asarray(ids), adapter=index)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # the adapters matter: each row differs from the base model's logits
    base_logits = np.asarray(ours.logits(ours.hidden_states(jnp.asarray(ids))))  # adapter None = 0 = base
    changed = np.abs(got - base_logits).max(axis=(1, 2))
    assert all((c > 1e-2) == (r != "__base__") for c, r in zip(changed, rows))


def test_one_adapter_rows_match_load_adapter(folders):
    """A row of adapter i equals the model with that adapter alone (`load_adapter`), to float32 rounding."""
    base, adapters = folders
    multi, _ = load_pretrained(base, dtype=jnp.float32)
    names = load_adapters(multi, adapters)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (3, 9)))
    for name in adapters:
        single, _ = load_pretrained(base, dtype=jnp.float32)
        load_adapter(single, adapters[name])
        want = np.asarray(single(ids))
        got = np.asarray(multi.logits(multi.hidden_states(ids, adapter=jnp.full((3,), names.index(name)))))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_damaged_adapter_names_its_file(folders, tmp_path):
    base, adapters = folders
    import shutil

    from safetensors.numpy import load_file, save_file
    bad = tmp_path / "bad"
    shutil.copytree(adapters["small"], bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors.pop(next(k for k in tensors if "lora_B" in k))
    save_file(tensors, bad / "adapter_model.safetensors")
    ours, _ = load_pretrained(base, dtype=jnp.float32)
    with pytest.raises(MissingTensorError, match="adapter_model.safetensors"):
        load_adapters(ours, {"ok": adapters["wide"], "bad": bad})
