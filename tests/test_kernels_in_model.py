"""The model with its Pallas kernels (GPU) against the same model on the all-reference path.

A tiny random bfloat16 Qwen3-style decoder (GQA 6/2, q/k norm, hidden 96 and MLP 200:
not powers of two) runs a left-padded prefill and a few one-token decode steps over a
KV cache, and a full-sequence loss gradient, once with ``JAXQLORA_KERNELS=pallas``
(rms_norm, add_rms_norm, swiglu, decode_attention, each with its custom VJP) and once
with ``JAXQLORA_KERNELS=xla`` (plain jnp and jax.nn.dot_product_attention). Both paths
see the same bf16 weights; they differ by bf16 roundings only, so the logits must agree
to bf16 tolerance. Skipped without a GPU (the kernels themselves are tested in interpret
mode on CPU by test_rms_norm.py, test_swiglu.py and test_decode_attention.py).

On the CPU: the fused projections (`jaxqlora.model.project_together`: q/k/v and gate/up
of an NF4 base through `nf4_matmul_multi`, LoRA and biases added after) give the logits,
cache and LoRA gradients of calling the modules one by one; and on a faked Hopper a
decode step traces to one multi-weight Mosaic kernel per q/k/v and per gate/up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxqlora.config import ModelConfig
from jaxqlora.model import CausalLM, KVCache

gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="Pallas Triton kernels need a GPU")

CFG = ModelConfig(arch="qwen3", vocab_size=101, hidden_size=96, intermediate_size=200,
                  num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                  rms_norm_eps=1e-6, max_position_embeddings=64, qk_norm=True)
#: Logit agreement, relative to the largest |logit|: a few bf16 roundings (2**-8 each)
#: propagated through two layers.
TOL = 3e-2
#: Gradient agreement (norm of the difference over the norm, per leaf). The kernel path's
#: loss gradient runs cuDNN's flash-attention backward, which keeps the probabilities in
#: bf16; the reference keeps its softmax in float32. Measured on an H200: the worst leaf
#: (small norm, 0.024) differs by 3.0%, the rest by less.
GRAD_TOL = 5e-2


def _random_model() -> CausalLM:
    model = CausalLM(CFG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    new = [((1.0 + 0.2 * jax.random.normal(k, a.shape)) if a.ndim == 1
            else 0.08 * jax.random.normal(k, a.shape)).astype(a.dtype)
           for k, a in zip(keys, leaves)]  # norms around 1, every tensor random
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, new))


def _run(model, mode, monkeypatch):
    """Prefill logits, decode-step logits and the loss gradient with kernels = mode."""
    monkeypatch.setenv("JAXQLORA_KERNELS", mode)
    rng = np.random.default_rng(0)
    # 12 tokens: even, so the cache-free forward of the loss runs cuDNN attention (with
    # a mask cuDNN needs even lengths); row 0 left-padded (fully masked query rows).
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    mask = jnp.asarray(np.r_[[[0] * 3 + [1] * 9], [[1] * 12]], jnp.int32)
    cache = KVCache.init(CFG, 2, 24, jnp.bfloat16)
    logits, cache = model(ids, mask, cache=cache)
    out = [np.asarray(logits)[:, -1]]
    for tok in rng.integers(0, CFG.vocab_size, (4, 2, 1)):  # teacher-forced decode steps
        logits, cache = model(jnp.asarray(tok, jnp.int32), cache=cache)
        out.append(np.asarray(logits)[:, -1])
    graphdef, state = nnx.split(model)

    def loss(s):
        return jnp.mean(nnx.merge(graphdef, s)(ids, mask)[:, 3:] ** 2)

    grads = jax.tree.leaves(jax.grad(loss)(state))
    return out, [np.asarray(g, np.float32) for g in grads]


@gpu
def test_pallas_kernels_match_reference_path_in_the_model(monkeypatch):
    model = _random_model()
    ref_logits, ref_grads = _run(model, "xla", monkeypatch)
    pallas_logits, pallas_grads = _run(model, "pallas", monkeypatch)
    for step, (a, b) in enumerate(zip(pallas_logits, ref_logits)):
        assert np.isfinite(a).all(), step
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL * np.abs(b).max(),
                                   err_msg=f"logits, step {step}")
    for i, (a, b) in enumerate(zip(pallas_grads, ref_grads)):
        assert np.isfinite(a).all(), i
        assert np.linalg.norm(a - b) <= GRAD_TOL * np.linalg.norm(b), f"gradient leaf {i}"


@gpu
def test_decode_step_runs_the_decode_kernel(monkeypatch):
    """With the kernels on, a one-token cached step lowers to the decode_attention kernel."""
    model = _random_model()
    graphdef, state = nnx.split(model)
    cache = KVCache.init(CFG, 1, 8, jnp.bfloat16)
    tok = jnp.ones((1, 1), jnp.int32)

    def jaxpr_text(mode):
        monkeypatch.setenv("JAXQLORA_KERNELS", mode)

        def step(s, t, c):  # a new function per mode: make_jaxpr caches traces by function
            return nnx.merge(graphdef, s)(t, cache=c)[0]

        return str(jax.make_jaxpr(step)(state, tok, cache))

    assert "decode_attention" in jaxpr_text("pallas")
    assert "decode_attention" not in jaxpr_text("xla")


# ---------------------------------------------------------------------------
# Fused projections (q/k/v, gate/up) of an NF4 base
# ---------------------------------------------------------------------------

SMALL = dict(vocab_size=61, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
             rms_norm_eps=1e-5)


def _nf4_lora_model(cfg, dropout: float) -> CausalLM:
    from jaxqlora.lora import apply_lora, lora_layers
    from jaxqlora.quantize import quantize_model

    model = CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    state = jax.tree.unflatten(treedef, [  # random biases and norms (stacked: 2-D) too
        a + 0.1 * jax.random.normal(k, a.shape, a.dtype) if a.ndim <= 2 else a
        for k, a in zip(keys, leaves)])
    model = nnx.merge(graphdef, state)
    quantize_model(model)
    apply_lora(model, r=4, alpha=8.0, dropout=dropout, seed=0)
    rng = np.random.default_rng(1)
    for layer in lora_layers(model).values():  # non-zero B so the adapters matter
        layer.lora_B[...] = jnp.asarray(0.05 * rng.standard_normal(layer.lora_B[...].shape), jnp.float32)
    return model


def _one_by_one(modules, x, layer=None, adapter=None, keep=None):
    from jaxqlora.model import project

    return [project(m, x, layer, adapter, k) for m, k in zip(modules, keep or [None] * len(modules))], False


def _model_outputs(model, ids, mask):
    """Training-mode logits and LoRA gradients (dropout on), then a cached prefill and two
    decode steps (weights read in place by layer), from one copy of the model state."""
    from jaxqlora.train import TRAINABLE

    graphdef, trainable, rest = nnx.split(model, TRAINABLE, ...)

    def loss(tr):
        logits = nnx.merge(graphdef, tr, rest, copy=True)(ids, mask)
        return jnp.sum(jnp.sin(logits) * mask[..., None]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    infer = nnx.merge(graphdef, trainable, rest, copy=True)
    infer.eval()
    cache = KVCache.init(infer.config, ids.shape[0], 16, jnp.float32)
    out, cache = infer(ids, mask, cache=cache)
    steps = [out]
    for tok in ([[5], [7]], [[11], [13]]):
        out, cache = infer(jnp.asarray(tok, jnp.int32), cache=cache)
        steps.append(out)
    return logits, jax.tree.leaves(grads), steps, cache


@pytest.mark.parametrize("arch,layer_masks", [("llama", None), ("qwen2", True)])
def test_fused_projections_match_module_calls(monkeypatch, arch, layer_masks):
    """NF4 + LoRA (dropout 0.1; Qwen2 with q/k/v biases): the fused projection path gives
    the logits, cached decoding (logits and cache) and LoRA gradients of calling each
    module (to float32 rounding: 1e-6, gradients 1e-5, of the largest entry). Qwen2 with
    one dropout mask per layer (`jaxqlora.lora.LAYER_MASKS`, the GPU default): each
    projection gets its columns of it on both paths."""
    import jaxqlora.lora as lora_mod
    import jaxqlora.model as model_mod
    import jaxqlora.quantize as quantize_mod

    monkeypatch.setattr(lora_mod, "LAYER_MASKS", layer_masks)

    cfg = ModelConfig(arch=arch, attention_bias=arch == "qwen2", **SMALL)
    model = _nf4_lora_model(cfg, dropout=0.1)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 6)), jnp.int32)
    mask = jnp.asarray([[0, 1, 1, 1, 1, 1], [1] * 6], jnp.int32)
    groups = []
    real = quantize_mod.nf4_linear_multi
    monkeypatch.setattr(quantize_mod, "nf4_linear_multi",
                        lambda x, qs, layer=None: groups.append(len(qs)) or real(x, qs, layer))
    got = _model_outputs(model, ids, mask)
    assert groups and set(groups) == {2, 3}  # q/k/v and gate/up went through the multi op
    monkeypatch.setattr(model_mod, "project_together", _one_by_one)
    want = _model_outputs(model, ids, mask)
    assert len(got[1]) == 2 * 7
    # The same operations: equal on the CPU (XLA may fuse the two graphs differently on a
    # GPU, hence float32-rounding tolerances); the cotangents of x add up in another order.
    pairs = [(got[0], want[0], 1e-6), *((g, w, 1e-5) for g, w in zip(got[1], want[1])),
             *((g, w, 1e-6) for g, w in zip(got[2], want[2])),
             *((g, w, 1e-6) for g, w in zip(jax.tree.leaves(got[3]), jax.tree.leaves(want[3])))]
    for g, w, tol in pairs:
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, rtol=0, atol=tol * float(np.abs(w).max()))


def test_mixed_bases_call_modules_one_by_one(monkeypatch):
    """Only some projections NF4 (here q/k/v bf16, gate/up NF4): q/k/v are called one by
    one, gate/up fused."""
    import jaxqlora.quantize as quantize_mod
    from jaxqlora.quantize import quantize_model

    cfg = ModelConfig(arch="llama", **SMALL)
    model = CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    quantize_model(model, targets=("gate_proj", "up_proj", "down_proj"))
    groups = []
    real = quantize_mod.nf4_linear_multi
    monkeypatch.setattr(quantize_mod, "nf4_linear_multi",
                        lambda x, qs, layer=None: groups.append(len(qs)) or real(x, qs, layer))
    model(jnp.ones((1, 3), jnp.int32))
    assert groups and set(groups) == {2}


@pytest.mark.parametrize("codes", [False, True])
def test_decode_step_fuses_on_hopper(monkeypatch, codes):
    """On a (faked) Hopper a one-token decode step over the cache traces to ONE multi-weight
    Mosaic kernel for q/k/v and one for gate/up per layer, the SwiGLU in XLA after it (no
    SwiGLU kernel); a prefill of more than MGPU_MAX_M tokens does not. With the kernel
    layout of the codes (`use_kernel_codes`) the kernels read the uint32 words, without it
    the bnb bytes."""
    from jaxqlora.nf4 import with_kernel_layout
    from jaxqlora.quantize import QuantizedLinear, quantize_model
    from pallas_kernels import dispatch, nf4_matmul as op
    from pallas_kernels.nf4_mgpu import nf4_mgpu_supported

    cfg = ModelConfig(arch="qwen2", attention_bias=True, **SMALL)
    model = CausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    quantize_model(model)
    for _, node in nnx.iter_graph(model):  # the kernel scales a Hopper would derive
        if isinstance(node, QuantizedLinear):
            node.weight.set_value(with_kernel_layout(node.weight.get_value(), codes=codes, force=True))

    def on_hopper(*args):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(jax, "devices", lambda *a: [type("D", (), {"platform": "gpu",
                                                                  "compute_capability": "9.0"})()])
            return nf4_mgpu_supported(*args)

    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(op, "nf4_mgpu_supported", on_hopper)
    monkeypatch.setattr(op, "MGPU_MIN_WEIGHT", 0)  # the tiny weights count as large
    graphdef, state = nnx.split(model)

    def step(s, t, c):
        return nnx.merge(graphdef, s)(t, cache=c)[0]

    cache = KVCache.init(cfg, 1, 8, jnp.bfloat16)
    text = str(jax.make_jaxpr(step)(state, jnp.ones((1, 1), jnp.int32), cache))
    assert text.count("name=nf4_mgpu_matmul_multi") == 2 * cfg.num_hidden_layers
    assert text.count("name=nf4_mgpu_matmul\n") + text.count("name=nf4_mgpu_matmul ") \
        == 2 * cfg.num_hidden_layers  # o_proj and down_proj, one weight each
    assert "swiglu" not in text
    # the layer's stacked q_proj codes: uint32 [L, N, K // 8] words, or uint8 [L, N, K // 2]
    words = f"u32[{cfg.num_hidden_layers},{cfg.num_attention_heads * cfg.head_dim},{cfg.hidden_size // 8}]"
    assert (words in text) == codes
    prefill = str(jax.make_jaxpr(step)(state, jnp.ones((2, 40), jnp.int32),
                                       KVCache.init(cfg, 2, 48, jnp.bfloat16)))
    assert "nf4_mgpu_matmul" not in prefill  # 80 rows > MGPU_MAX_M: the Triton kernels


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Mosaic GPU kernels need a Hopper GPU")
def test_kernel_codes_in_the_model_on_hopper(monkeypatch):
    """On a Hopper, `use_kernel_codes` changes which bytes the decode GEMVs read, not what
    they compute: prefill and decode logits are bit-identical with and without it, and
    agree with the XLA reference path (bnb dequantize) to bf16 tolerance."""
    from jaxqlora.quantize import quantize_model, use_kernel_codes
    from pallas_kernels import nf4_matmul as op
    from pallas_kernels.nf4_mgpu import nf4_mgpu_supported

    if not nf4_mgpu_supported(1, 64, 64, 64, jnp.bfloat16):
        pytest.skip("not a Hopper GPU")
    monkeypatch.setattr(op, "MGPU_MIN_WEIGHT", 0)  # the small weights take the Mosaic kernels
    cfg = ModelConfig(arch="llama", **SMALL)
    model = CausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, [
        ((1.0 + 0.2 * jax.random.normal(k, a.shape)) if a.ndim == 1 else 0.08 * jax.random.normal(k, a.shape)
         ).astype(a.dtype) for k, a in zip(keys, leaves)]))
    quantize_model(model)

    def run(mode):
        monkeypatch.setenv("JAXQLORA_KERNELS", mode)
        rng = np.random.default_rng(0)
        ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 5)), jnp.int32)
        cache = KVCache.init(cfg, 2, 16, jnp.bfloat16)
        logits, cache = model(ids, cache=cache)
        out = [np.asarray(logits[:, -1], np.float32)]
        for tok in rng.integers(0, cfg.vocab_size, (3, 2, 1)):
            logits, cache = model(jnp.asarray(tok, jnp.int32), cache=cache)
            out.append(np.asarray(logits[:, -1], np.float32))
        return out

    ref, plain = run("xla"), run("pallas")
    added = use_kernel_codes(model)
    n_weights = cfg.num_hidden_layers * (cfg.hidden_size * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
                                         * cfg.head_dim + cfg.num_attention_heads * cfg.head_dim * cfg.hidden_size
                                         + 3 * cfg.hidden_size * cfg.intermediate_size)
    assert added == n_weights // 2  # one more byte per two weights
    with_codes = run("pallas")
    for step, (a, b, r) in enumerate(zip(with_codes, plain, ref)):
        np.testing.assert_array_equal(a, b, err_msg=f"step {step}")
        np.testing.assert_allclose(a, r, rtol=TOL, atol=TOL * np.abs(r).max(), err_msg=f"step {step}")
