"""The model with its Pallas kernels (GPU) against the same model on the all-reference path.

A tiny random bfloat16 Qwen3-style decoder (GQA 6/2, q/k norm, hidden 96 and MLP 200:
not powers of two) runs a left-padded prefill and a few one-token decode steps over a
KV cache, and a full-sequence loss gradient, once with ``JAXQLORA_KERNELS=pallas``
(rms_norm, add_rms_norm, swiglu, decode_attention, each with its custom VJP) and once
with ``JAXQLORA_KERNELS=xla`` (plain jnp and jax.nn.dot_product_attention). Both paths
see the same bf16 weights; they differ by bf16 roundings only, so the logits must agree
to bf16 tolerance. Skipped without a GPU (the kernels themselves are tested in interpret
mode on CPU by test_rms_norm.py, test_swiglu.py and test_decode_attention.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxqlora.config import ModelConfig
from jaxqlora.model import CausalLM, KVCache

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="Pallas Triton kernels need a GPU")

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
