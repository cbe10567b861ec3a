"""Model-level NF4 against transformers + bitsandbytes on CPU (tiny random Llama, float32):
quantize_model is bnb's quantization, 4-bit checkpoints load both ways with the same logits.

The logits reference is a float32 transformers model whose projections hold bitsandbytes'
``dequantize_4bit`` of the 4-bit weights (bnb's training path: dequantize, then matmul).
bnb's own CPU ``Linear4bit`` forward is not used: on first use it repacks the weight into a
CPU GEMM layout and its output differs from dequantize-then-matmul by ~0.5% per layer.
"""

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from jaxqlora.io import load_pretrained
from jaxqlora.io.export import save_pretrained
from jaxqlora.lora import apply_lora, lora_layers
from jaxqlora import quantize_model
from jaxqlora.quantize import NF4Linear

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
from tiny_models import save_random_model  # noqa: E402

VOCAB = 90
BNB = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    dense = save_random_model(tmp_path_factory, "dense", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2)
    q = transformers.AutoModelForCausalLM.from_pretrained(
        dense, quantization_config=transformers.BitsAndBytesConfig(**BNB), device_map="cpu").eval()
    four = tmp_path_factory.mktemp("bnb4")
    q.save_pretrained(four)
    return dense, four


def _bnb_reference(dense, four):
    """(float32 transformers model with bnb-dequantized projections, {name: Linear4bit})."""
    import bitsandbytes.functional as F

    q = transformers.AutoModelForCausalLM.from_pretrained(four, device_map="cpu").eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    layers = {n: m for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14
    with torch.no_grad():
        for name, mod in layers.items():  # before any forward, which would repack the weight
            ref.get_submodule(name).weight.copy_(F.dequantize_4bit(mod.weight.data, mod.weight.quant_state))
    return ref, layers


def _ids():
    return np.random.default_rng(1).integers(0, VOCAB, (2, 11))


def _logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor(ids)).logits.float().numpy()


def test_bnb_4bit_checkpoint_loads_without_requantizing(folders):
    dense, four = folders
    ours, _ = load_pretrained(four, dtype=jnp.float32)
    assert isinstance(ours.layer(0).self_attn.q_proj, NF4Linear)
    ref, _ = _bnb_reference(dense, four)
    got = np.asarray(ours(jnp.asarray(_ids())))
    assert np.abs(got - _logits(ref, _ids())).max() < 1e-4


def test_quantize_model_equals_bitsandbytes_and_saves_4bit(folders, tmp_path):
    dense, four = folders
    ours, _ = load_pretrained(dense, dtype=jnp.float32)
    report = quantize_model(ours)
    ref, bnb_layers = _bnb_reference(dense, four)
    # transformers + bnb quantized the same checkpoint: identical codes and statistics
    for name, mod in bnb_layers.items():
        i, group, proj = name.split(".")[2:5]
        mine = getattr(getattr(ours.layer(int(i)), group), proj).weight.get_value()
        np.testing.assert_array_equal(np.asarray(mine.packed), mod.weight.data.numpy().reshape(-1))
        np.testing.assert_array_equal(np.asarray(mine.absmax), mod.weight.quant_state.absmax.numpy())
    got = np.asarray(ours(jnp.asarray(_ids())))
    assert np.abs(got - _logits(ref, _ids())).max() < 1e-4
    # 7 projections x 2 layers: 4-bit codes + uint8 absmax + nested state, vs float32
    params = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
    assert report["linear_mb_before"] == pytest.approx(params * 4 / 1e6)
    # bitsandbytes layout per matrix: 4-bit codes, 1-byte absmax codes per 64 values, float32
    # nested absmax per 256 blocks, the 256-entry nested map, offset and the 16-entry NF4 map
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
    nbytes = sum(n * k // 2 + n * k // 64 + 4 * -(-(n * k // 64) // 256) + 4 * 256 + 4 + 4 * 16 for n, k in shapes)
    assert report["linear_mb_after"] == pytest.approx(nbytes / 1e6)
    assert report["bits_per_param"] == pytest.approx(8 * nbytes / params)

    save_pretrained(ours, tmp_path, dtype=jnp.float32, keep_nf4=True)
    theirs, layers = _bnb_reference(dense, tmp_path)  # transformers loads our 4-bit folder
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in layers.values())
    assert np.abs(_logits(theirs, _ids()) - got).max() < 1e-4


def test_lora_on_nf4_trains_only_lora(folders):
    """Gradients reach lora_A/lora_B through the NF4 custom_vjp; the NF4 state is frozen."""
    import jax
    from flax import nnx

    from jaxqlora.train import TRAINABLE

    dense, _ = folders
    ours, _ = load_pretrained(dense, dtype=jnp.float32)
    quantize_model(ours)
    apply_lora(ours, r=4, alpha=8.0)
    for layer in lora_layers(ours).values():
        layer.lora_B[...] = jnp.full(layer.lora_B[...].shape, 0.01, jnp.float32)
    graphdef, trainable, rest = nnx.split(ours, TRAINABLE, ...)
    ids = jnp.asarray(_ids())

    def loss(tr):
        return nnx.merge(graphdef, tr, rest, copy=True)(ids).sum()

    grads = jax.grad(loss)(trainable)
    leaves = jax.tree_util.tree_leaves(grads)
    # 7 projections x (lora_A, lora_B), each stacked over the 2 layers: every layer gets a gradient
    assert len(leaves) == 7 * 2 and all(g.shape[0] == 2 for g in leaves)
    assert all(float(jnp.abs(g[i]).sum()) > 0 for g in leaves for i in range(2))
    # finite differences on one lora_B entry (float64-free check: central difference in float32)
    path = ("model", "layers", "mlp", "down_proj", "lora_B")  # layer 0 of the stacked factor
    eps = 1e-2
    def with_delta(d):
        flat = dict(nnx.to_flat_state(trainable))
        var = flat[path]
        new = var.replace(var.get_value().at[0, 0, 0].add(d))
        flat[path] = new
        return float(loss(nnx.from_flat_state(flat)))
    fd = (with_delta(eps) - with_delta(-eps)) / (2 * eps)
    g = float(dict(nnx.to_flat_state(grads))[path].get_value()[0, 0, 0])
    assert abs(fd - g) <= 2e-2 * max(1.0, abs(g))


def test_device_bytes_from_the_headers_of_a_bnb_folder(folders):
    """`checkpoint_device_bytes` reads a bitsandbytes folder's headers only; the arrays a load
    allocates (NF4 codes, absmax, nested state; dense norms and embeddings) add up to it."""
    import jax
    from flax import nnx

    from jaxqlora.memory import checkpoint_device_bytes

    _, four = folders
    ours, _ = load_pretrained(four, dtype=jnp.float32)
    leaves = jax.tree_util.tree_leaves(nnx.state(ours))
    assert checkpoint_device_bytes(four, jnp.float32) == sum(x.size * x.dtype.itemsize for x in leaves)


def test_device_bytes_with_kernel_layouts_on_a_faked_hopper(folders, monkeypatch):
    """On a (faked) Hopper a load adds the kernel scales and `use_kernel_codes` the second
    copy of the codes; `checkpoint_device_bytes(..., kernel_codes=True)` counts both from
    the headers, and `use_kernel_codes` reports the bytes it added."""
    import jax
    from flax import nnx

    import pallas_kernels.nf4_mgpu as mgpu
    from jaxqlora import memory
    from jaxqlora.quantize import use_kernel_codes

    real = mgpu.nf4_mgpu_supported

    def on_hopper(*args):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(jax, "devices", lambda *a: [type("D", (), {"platform": "gpu", "compute_capability": "9.0"})()])
            return real(*args)

    monkeypatch.setattr(mgpu, "nf4_mgpu_supported", on_hopper)
    monkeypatch.setattr(memory, "_hopper", lambda: True)
    _, four = folders
    ours, _ = load_pretrained(four, dtype=jnp.float32)
    size = lambda: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(nnx.state(ours)))
    plain = size()
    assert memory.checkpoint_device_bytes(four, jnp.float32) == plain
    added = use_kernel_codes(ours)
    assert added > 0 and size() == plain + added
    assert memory.checkpoint_device_bytes(four, jnp.float32, kernel_codes=True) == plain + added
    assert use_kernel_codes(ours) == 0  # already there
