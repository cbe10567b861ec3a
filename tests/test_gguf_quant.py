"""GGUF weights kept in their block formats (issue 14), against independent references.

* Dequantization of every kept type equals ``gguf.quants.dequantize`` bit for bit: on the
  embedded SmolLM2 file's tensors (Q4_1, Q8_0), on tensors quantized by
  ``gguf.quants.quantize`` (Q4_0, Q4_1, Q8_0), and on random block bytes with finite f16
  ``d``/``dmin`` for the k-quants (``gguf`` has no k-quant quantizer); the random tensors go
  through a file written by ``gguf.GGUFWriter``.
* The kernel (``interpret=True`` on CPU) against float64 NumPy products of the ``gguf``
  dequantization, at ragged shapes (N not a multiple of the row tile, K not a multiple of
  the block tile, M = 1, 5, 20), and a stacked Q4_K/Q6_K projection read by ``layer``.
* The embedded Q4_1 model served quantized against the dequantize-on-load path: logits
  (float32, max abs diff <= 1e-3) and 32 greedy tokens.
* A tiny llama GGUF in Q4_K / Q6_K (mixed stacks, quantized head): logits and LoRA
  gradients against the dequantize-on-load model; ``save_adapter`` writes PEFT's keys.
* Bad input: data size disagreeing with type and shape, an unknown type id, a truncated
  block: a `CheckpointError` naming the file and tensor.
"""

from __future__ import annotations

import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernel_checks import INTERPRET, random_blocks
from jaxqlora.errors import CheckpointError
from jaxqlora.ggml import GGUF_FORMATS, from_blocks, stack_weights, to_blocks
from jaxqlora.io import load_pretrained
from jaxqlora.io.gguf import GGUFCheckpoint
from pallas_kernels.gguf_matmul import gguf_matmul

T = gguf.GGMLQuantizationType
KQUANTS = ("Q4_K", "Q5_K", "Q6_K")
LEGACY = ("Q4_0", "Q4_1", "Q8_0")



def quantized_bytes(rng, qtype, n, k, scale=1.0):
    """Bytes of a random ``[n, k]`` tensor: ``gguf.quants.quantize`` where it exists, random
    blocks for the k-quants."""
    if qtype in LEGACY:
        return gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * scale, T[qtype])
    return random_blocks(rng, qtype, n, k, scale)


def same_bits(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ------------------------------------------------------------------ dequantization


def test_dequantize_embedded_tensors_bit_exact(embedded_path):
    """The embedded SmolLM2 file's Q4_1 projections and Q8_0 embedding, read as stored."""
    reader = gguf.GGUFReader(str(embedded_path))
    tensors = {t.name: t for t in reader.tensors}
    names = [f"blk.0.{p}.weight" for p in ("attn_q", "attn_v", "ffn_gate")] + ["blk.29.ffn_down.weight"]
    seen = set()
    for name in names:
        t = tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        w = from_blocks(np.asarray(t.data), t.tensor_type.name, shape)
        seen.add(t.tensor_type.name)
        ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        assert same_bits(w.dequantize(), ref), name
        assert np.array_equal(to_blocks(w), np.asarray(t.data).reshape(shape[0], -1)), name
    t = tensors["token_embd.weight"]  # Q8_0 [49152, 576]: its first 4096 rows
    raw = np.asarray(t.data)[:4096]
    assert t.tensor_type.name == "Q8_0" and same_bits(from_blocks(raw, "Q8_0", (4096, 576)).dequantize(),
                                                      gguf.quants.dequantize(raw, T.Q8_0))
    assert seen == {"Q4_1"}
    embd = np.asarray(tensors["token_embd.weight"].data)
    ids = jnp.asarray([[0, 5, 49151], [7, 7, 1]])  # an embedding lookup dequantizes only these rows
    rows = from_blocks(embd, "Q8_0", (49152, 576)).rows(ids, jnp.float32)
    ref = gguf.quants.dequantize(embd[np.asarray(ids).ravel()], T.Q8_0).reshape(2, 3, 576)
    assert same_bits(rows, ref)


def test_dequantize_random_tensors_bit_exact(tmp_path):
    """Every kept type through a file written by GGUFWriter and read by GGUFReader."""
    rng = np.random.default_rng(0)
    shapes = {q: (7, 3 * GGUF_FORMATS[q].BLOCK) for q in GGUF_FORMATS}
    path = tmp_path / "random.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    data = {}
    for q, (n, k) in shapes.items():
        data[q] = quantized_bytes(rng, q, n, k, scale=3.0)
        writer.add_tensor(f"t.{q}", data[q], raw_dtype=T[q])
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    for t in gguf.GGUFReader(str(path)).tensors:
        q = t.name.split(".")[1]
        raw = np.asarray(t.data)
        assert np.array_equal(raw.reshape(-1), data[q].reshape(-1)), q
        ref = gguf.quants.dequantize(raw, t.tensor_type).reshape(shapes[q])
        w = from_blocks(raw, q, shapes[q])
        got = jax.jit(lambda w: w.dequantize())(w)
        assert same_bits(got, ref), q
        assert np.isfinite(ref).all() and np.abs(ref).max() > 0, q


# ------------------------------------------------------------------------- kernels


def _oracle(x, *weights):
    """float64 ``x @ W.T`` with W from gguf.quants.dequantize."""
    w = np.concatenate([gguf.quants.dequantize(raw, T[q]).reshape(n, k).astype(np.float64)
                        for raw, q, (n, k) in weights])
    return np.asarray(x, np.float64) @ w.T


def _check(got, want, what):
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape and np.isfinite(got).all(), what
    # float32 products and sums: errors of a few ulps of the largest partial sums
    tol = 2e-6 * np.abs(want).max() * np.sqrt(want.shape[-1] if want.ndim else 1) + 1e-6
    np.testing.assert_allclose(got, want, rtol=0, atol=max(tol, 5e-6 * np.abs(want).max()), err_msg=what)


@pytest.mark.parametrize("qtype", list(GGUF_FORMATS))
def test_kernel_ragged_shapes(qtype):
    """N = 37 (a partial row tile), K = 3 blocks (legacy: a partial 8-block tile) or 2
    super-blocks split over 2 programs (k-quants); M = 1 (CUDA-core GEMV) and 5 (MMA, 16
    padded rows); float32 activations."""
    rng = np.random.default_rng(1)
    fmt = GGUF_FORMATS[qtype]
    n, k = 37, (3 if fmt.BLOCK == 32 else 2) * fmt.BLOCK
    raw = quantized_bytes(rng, qtype, n, k)
    w = from_blocks(raw, qtype, (n, k))
    for m in (1, 5):
        x = rng.standard_normal((m, k)).astype(np.float32)
        got = gguf_matmul(jnp.asarray(x), w.planes, 0, fmts=w.modules, impl="pallas", interpret=INTERPRET)
        _check(got, _oracle(x, (raw, qtype, (n, k))), f"{qtype} M={m}")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
def test_kernel_large_m_bf16(qtype):
    """M = 20 (> 16: 64-row tiles, the weight dequantized tile by tile into the MMA) with
    bfloat16 x: within bf16 rounding of x and W tiles (2**-8 relative, summed)."""
    rng = np.random.default_rng(2)
    fmt = GGUF_FORMATS[qtype]
    n, k = 19, 2 * fmt.BLOCK
    raw = quantized_bytes(rng, qtype, n, k)
    w = from_blocks(raw, qtype, (n, k))
    x = jnp.asarray(rng.standard_normal((20, k)), jnp.bfloat16)
    got = gguf_matmul(x, w.planes, 0, fmts=w.modules, impl="pallas", interpret=INTERPRET)
    assert got.dtype == jnp.bfloat16
    want = _oracle(np.asarray(x.astype(jnp.float32)), (raw, qtype, (n, k)))
    scale = np.abs(np.asarray(x, np.float64)) @ np.abs(_oracle(np.eye(k), (raw, qtype, (n, k))))
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= 2 ** -7 * scale + 1e-3)


def test_kernel_mixed_stack_by_layer():
    """A stacked projection whose layers are Q4_K, Q6_K, Q4_K (a Q4_K_M file's ffn_down):
    the kernel reads layer ``layer`` in place (traced index), M = 1 and 3; the XLA path
    (slicing) agrees."""
    rng = np.random.default_rng(3)
    n, k = 21, 512
    types = ("Q4_K", "Q6_K", "Q4_K")
    raws = [random_blocks(rng, q, n, k) for q in types]
    w = stack_weights([from_blocks(r, q, (n, k)) for r, q in zip(raws, types)])
    assert w.formats == ("Q4_K", "Q6_K") and w.planes["qh"].shape == (3, n, 2, 64)
    for m, layers in ((1, (1, 2)), (3, (1,))):
        x = rng.standard_normal((m, k)).astype(np.float32)
        for layer in layers:
            want = _oracle(x, (raws[layer], types[layer], (n, k)))
            got = gguf_matmul(jnp.asarray(x), w.planes, w.kind, fmts=w.modules, layer=jnp.int32(layer),
                              impl="pallas", interpret=INTERPRET)
            _check(got, want, f"layer {layer} M={m}")
            ref = jax.jit(lambda x, w, i: gguf_matmul(x, w.planes, w.kind, fmts=w.modules, layer=i, impl="xla"))(
                jnp.asarray(x), w, jnp.int32(layer))
            _check(ref, want, f"xla layer {layer} M={m}")


def test_xla_matmul_every_format_in_row_pieces(monkeypatch):
    """`jaxqlora.ggml.xla_matmul` (the CPU path: sub-blocks decoded piece by piece into the
    dots) against float64 NumPy over gguf.quants.dequantize: every format with N = 37 rows in
    pieces of 8 (a lax.map of 4 pieces and a tail of 5), M = 1 and 3; a mixed Q4_K / Q6_K stack
    by traced layer; bfloat16 x (within bf16 rounding of x)."""
    import jaxqlora.model
    from jaxqlora.ggml import xla_matmul

    rng = np.random.default_rng(5)
    n = 37
    for qtype, fmt in GGUF_FORMATS.items():
        k = 2 * fmt.BLOCK
        monkeypatch.setattr(jaxqlora.model, "PIECE_VALUES", 8 * k)
        raw = quantized_bytes(rng, qtype, n, k)
        w = from_blocks(raw, qtype, (n, k))
        for m in (1, 3):
            x = rng.standard_normal((m, k)).astype(np.float32)
            got = jax.jit(xla_matmul)(jnp.asarray(x), w)
            _check(got, _oracle(x, (raw, qtype, (n, k))), f"{qtype} M={m}")
    types = ("Q4_K", "Q6_K", "Q4_K")
    k = 256
    raws = [random_blocks(rng, q, n, k) for q in types]
    w = stack_weights([from_blocks(r, q, (n, k)) for r, q in zip(raws, types)])
    x = rng.standard_normal((2, k)).astype(np.float32)
    for layer in (0, 1):
        got = jax.jit(xla_matmul)(jnp.asarray(x), w, jnp.int32(layer))
        _check(got, _oracle(x, (raws[layer], types[layer], (n, k))), f"mixed stack layer {layer}")
    xb = jnp.asarray(x, jnp.bfloat16)
    got = jax.jit(xla_matmul)(xb, w, jnp.int32(1))
    assert got.dtype == jnp.bfloat16
    want = _oracle(np.asarray(xb.astype(jnp.float32)), (raws[1], types[1], (n, k)))
    scale = np.abs(np.asarray(xb, np.float64)) @ np.abs(_oracle(np.eye(k), (raws[1], types[1], (n, k))))
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= 2 ** -7 * scale + 1e-3)


@pytest.mark.parametrize("types,m", [(("Q4_K", "Q6_K"), 1), (("Q4_K", "Q6_K"), 5), (("Q4_0",), 1),
                                     (("Q4_1",), 20), (("Q8_0",), 1), (("Q5_K",), 3)])
def test_kernel_lowers_for_triton(types, m):
    """The Pallas kernel is lowered to Triton for CUDA without a GPU (every op has a Triton
    lowering; tile shapes are powers of two): M = 1, MMA, the large-M tiles, a mixed stack."""
    rng = np.random.default_rng(4)
    w = stack_weights([from_blocks(random_blocks(rng, q, 40, 512), q, (40, 512)) for q in types])
    x = jax.ShapeDtypeStruct((m, 512), jnp.bfloat16)
    from pallas_kernels.gguf_matmul import gguf_matmul_pallas

    text = jax.jit(lambda x, p, k, i: gguf_matmul_pallas(x, p, k, i, fmts=w.modules)).trace(
        x, w.planes, w.kind, jnp.int32(0)).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower() and "gguf_matmul_" in text


# --------------------------------------------------------------- embedded model


@pytest.fixture(scope="module")
def smollm_quantized(embedded_path):
    return load_pretrained(embedded_path, dtype=jnp.float32, keep_quantized=True)


def test_embedded_q4_1_served_quantized(smollm_quantized, ours_f32):
    """Logits of the embedded Q4_1 model kept quantized equal the dequantize-on-load model
    (float32, max abs diff <= 1e-3), and its 32 greedy tokens are the dense model's greedy
    tokens (checked by the dense model's argmax after every prefix, one forward pass)."""
    from jaxqlora.generate import generate
    from jaxqlora.quantize import QuantizedEmbedding, QuantizedLinear

    model, tokenizer = smollm_quantized
    dense, _ = ours_f32
    layers = model.model.layers
    assert isinstance(layers.self_attn.q_proj, QuantizedLinear) and layers.mlp.down_proj.weight.get_value().formats == ("Q4_1",)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    q_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(nnx.state(model)))
    d_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(nnx.state(dense)))
    assert q_bytes < 0.25 * d_bytes  # 4.5-5 bits per weight against 32
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 49152, (2, 12)), jnp.int32)
    diff = np.abs(np.asarray(model(ids)) - np.asarray(dense(ids))).max()
    assert diff <= 1e-3, diff
    # 32 greedy tokens (KV-cached decoding of the quantized model) are the dense model's greedy
    # choice at every step: its argmax after each prefix of prompt + generated tokens
    prompt = tokenizer.encode("The capital of France is Paris. The capital of Germany is")
    a = list(generate(model, tokenizer, prompt, max_new_tokens=32, return_ids=True, ignore_eos=True))
    assert len(a) == 32
    logits = np.asarray(nnx.jit(lambda m, ids: m(ids))(dense, jnp.asarray([prompt + a], jnp.int32)))
    assert list(logits[0, len(prompt) - 1:-1].argmax(-1)) == a


# ------------------------------------------------ tiny Q4_K_M-like model, LoRA


def _write_tiny(path, rng, layers=2, hidden=256, ffn=512, heads=4, kv=2, vocab=64, head_type="Q6_K",
                mutate=None):
    """A tiny llama GGUF: q/k/o/gate/up Q4_K, v and down Q6_K in layer 0 and Q4_K after
    (mixed stacks, as in Q4_K_M files), output ``head_type``, F32 embedding and norms."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(layers); w.add_context_length(128); w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn); w.add_head_count(heads); w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0); w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, hidden)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", random_blocks(rng, head_type, vocab, hidden, 1e-3), raw_dtype=T[head_type])
    hd = hidden // heads
    shapes = {"attn_q": (heads * hd, hidden), "attn_k": (kv * hd, hidden), "attn_v": (kv * hd, hidden),
              "attn_output": (hidden, heads * hd), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn)}
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, (n, k) in shapes.items():
            q = "Q6_K" if name in ("attn_v", "ffn_down") and i == 0 else "Q4_K"
            raw = random_blocks(rng, q, n, k, 2e-4)
            if mutate is not None:
                raw, q = mutate(f"blk.{i}.{name}.weight", raw, q)
            w.add_tensor(f"blk.{i}.{name}.weight", raw, raw_dtype=T[q])
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-q4km.gguf"
    _write_tiny(path, np.random.default_rng(5))
    return path


def test_tiny_k_quant_model_and_lora(tiny_path, tmp_path):

    """Kept-quantized model (mixed Q4_K/Q6_K stacks, Q6_K head) against the model
    dequantized on load: the dequantized stack bit for bit; with LoRA on top: same logits, and through the mixed
    down_proj stack the same gradients of the LoRA factors and the input as LoRA on the dense
    weights; merge folds LoRA into the same dense weights; save_adapter writes PEFT's adapter."""
    from jaxqlora.io.peft import save_adapter
    from jaxqlora.lora import apply_lora
    from jaxqlora.quantize import QuantizedLinear
    from safetensors.numpy import load_file

    mq, _ = load_pretrained(tiny_path, dtype=jnp.float32, keep_quantized=True)
    md, _ = load_pretrained(tiny_path, dtype=jnp.float32)
    down = mq.model.layers.mlp.down_proj
    assert isinstance(down, QuantizedLinear) and down.weight.get_value().formats == ("Q4_K", "Q6_K")
    assert isinstance(mq.lm_head, QuantizedLinear)
    np.testing.assert_array_equal(np.asarray(down.weight.get_value().kind), [1, 0])
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda d: d.dequantize())(down)),
                                  np.asarray(md.model.layers.mlp.down_proj.weight[...]))
    ids = jnp.asarray(np.random.default_rng(6).integers(0, 64, (2, 9)), jnp.int32)
    forward = nnx.jit(lambda m, ids: m(ids))

    from jaxqlora.lora import LoRALinear

    # the whole model with LoRA (a non-zero adapter on every projection): same logits
    for model in (mq, md):
        apply_lora(model, r=4, alpha=8, seed=0)
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
            if path[-1] == "lora_B":
                var.set_value(jnp.full(var.get_value().shape, 0.01, jnp.float32))
    np.testing.assert_allclose(np.asarray(forward(mq, ids)), np.asarray(forward(md, ids)), rtol=0, atol=1e-4)

    # gradients through the mixed Q4_K/Q6_K down_proj stack, each layer: LoRA factors and input
    x = jnp.asarray(np.random.default_rng(7).standard_normal((3, 512)), jnp.float32)
    lq, ld = mq.model.layers.mlp.down_proj, md.model.layers.mlp.down_proj
    assert isinstance(lq, LoRALinear) and isinstance(lq.base_layer, QuantizedLinear)
    for layer in (0, 1):
        grads = []
        for lin in (lq, ld):
            g, lora, rest = nnx.split(lin, nnx.LoRAParam, ...)

            def loss(lora, x, g=g, rest=rest, layer=layer):
                return jnp.sum(jnp.sin(nnx.merge(g, lora, rest)(x, layer)))

            grads.append(jax.jit(jax.grad(loss, argnums=(0, 1)))(lora, x))
        for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
            assert np.abs(np.asarray(b)).max() > 0
    from jaxqlora.io.export import _dense_weight

    merged = nnx.jit(_dense_weight)(lq)  # what merge_lora folds: dequantized base + scaling * B @ A
    np.testing.assert_allclose(np.asarray(merged), np.asarray(nnx.jit(_dense_weight)(ld)), rtol=0, atol=1e-6)
    out = save_adapter(mq, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert cfg["r"] == 4 and "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (256, 4)
    assert out is not None


def test_fallback_notice_names_tensors(tmp_path, capsys):
    """A projection whose layers mix block sizes (Q8_0 with Q4_K) or are stored in a type that
    is read but not kept (Q5_0) is dequantized on load (bit for bit as gguf.quants), with one
    notice line naming its tensors."""
    def mutate(name, raw, q):
        if name == "blk.0.attn_q.weight":  # Q5_0: read, not kept
            rng = np.random.default_rng(1)
            return gguf.quants.quantize(rng.standard_normal((256, 256)).astype(np.float32) * 1e-2, T.Q5_0), "Q5_0"
        if name == "blk.1.ffn_up.weight":
            rng = np.random.default_rng(0)
            return gguf.quants.quantize(rng.standard_normal((512, 256)).astype(np.float32) * 1e-2, T.Q8_0), "Q8_0"
        return raw, q

    path = tmp_path / "mixed.gguf"
    _write_tiny(path, np.random.default_rng(7), mutate=mutate)
    model, _ = load_pretrained(path, dtype=jnp.float32, keep_quantized=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blk.0.ffn_up.weight" in err[0] and "blk.1.ffn_up.weight" in err[0], err
    assert "blk.0.attn_q.weight" in err[0] and "blk.1.attn_q.weight" in err[0] and "mixed.gguf" in err[0]
    from jaxqlora.model import Linear
    from jaxqlora.quantize import QuantizedLinear

    assert type(model.model.layers.mlp.up_proj) is Linear and type(model.model.layers.self_attn.q_proj) is Linear
    assert isinstance(model.model.layers.mlp.gate_proj, QuantizedLinear)
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    from jaxqlora.io.gguf import unpermute_qk

    want = unpermute_qk(gguf.quants.dequantize(np.asarray(t.data), T.Q5_0).reshape(256, 256), 4)
    assert same_bits(model.model.layers.self_attn.q_proj.weight[...][0], want)


# -------------------------------------------------------------------- bad input


def _tiny_bytes(tmp_path, **kw):
    path = tmp_path / "t.gguf"
    _write_tiny(path, np.random.default_rng(8), layers=1, **kw)
    return path


def test_bad_input_size_disagrees_with_type_and_shape(tmp_path):
    """A tensor whose stored bytes are fewer than its type and shape need (the header
    declares 512 rows of Q4_K, 256 rows of bytes were written)."""
    path = tmp_path / "size.gguf"
    rng = np.random.default_rng(9)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tensor("blk.0.ffn_up.weight", random_blocks(rng, "Q4_K", 256, 256), raw_shape=(512, 144),
                 raw_dtype=T.Q4_K)
    w.add_tensor("blk.0.ffn_gate.weight", random_blocks(rng, "Q4_K", 512, 256), raw_dtype=T.Q4_K)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path, keep_quantized=True)
    assert e.value.name == "blk.0.ffn_up.weight" and "size.gguf" in str(e.value)
    assert "disagrees with the type and shape" in str(e.value)
    with pytest.raises(ValueError, match="needs 36864 bytes"):  # the block-level check
        from_blocks(random_blocks(rng, "Q4_K", 128, 256), "Q4_K", (256, 256))


def test_bad_input_unknown_type_id(tmp_path):
    path = _tiny_bytes(tmp_path)
    data = bytearray(path.read_bytes())
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    fields = reader.fields  # noqa: F841 (kept alive with the reader's memmap)
    name = b"blk.0.attn_q.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == int(t.tensor_type)
    data[type_at:type_at + 4] = (99).to_bytes(4, "little")
    bad = tmp_path / "type99.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(bad, keep_quantized=True)
    assert e.value.name == "blk.0.attn_q.weight" and "unknown tensor type 99" in str(e.value)
    assert "type99.gguf" in str(e.value)


def test_bad_input_truncated_block(tmp_path):
    """A Q4_K row of 200 values (not whole 256-value super-blocks), and a file cut inside
    the last tensor's blocks."""
    path = tmp_path / "ragged.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tensor_info("blk.0.ffn_up.weight", (4, 200), np.dtype(np.float32), 4 * 144, raw_dtype=T.Q4_K)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file(); w.close()
    data = path.read_bytes() + bytes(4 * 144)
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        GGUFCheckpoint(path)
    assert e.value.name == "blk.0.ffn_up.weight" and "not a multiple of the Q4_K block size 256" in str(e.value)
    full = _tiny_bytes(tmp_path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:-100])  # inside the last tensor's last block
    with pytest.raises(CheckpointError) as e:
        load_pretrained(cut, keep_quantized=True)
    last = gguf.GGUFReader(str(full)).tensors[-1].name
    assert e.value.name == last and "cut.gguf" in str(e.value)


def test_cli_keep_quantized_reaches_the_loader(monkeypatch, tiny_path, tmp_path, capsys):
    """``generate --keep-quantized`` and ``eval --keep-quantized`` load the GGUF file kept
    quantized (and only with the flag)."""
    import jaxqlora.finetune
    import jaxqlora.io
    from jaxqlora.cli import main

    seen = []

    def fake_load(path=None, dtype=None, keep_quantized=False):
        seen.append(keep_quantized)
        raise CheckpointError(path, "stop here")

    monkeypatch.setattr(jaxqlora.io, "load_pretrained", fake_load)
    # generate checks the tokenizer and the memory estimate before loading (the tiny file has
    # no vocabulary): stand-ins that record what the estimate was asked for
    import jaxqlora.cli

    estimated = []
    monkeypatch.setattr(jaxqlora.io, "load_tokenizer", lambda *a, **k: object())
    monkeypatch.setattr(jaxqlora.cli, "_generation_check",
                        lambda args, tok, prompt: estimated.append(args.keep_quantized) or jaxqlora.cli._Estimated(
                            None, None))
    assert main(["generate", "--model", str(tiny_path), "--prompt", "hi", "--keep-quantized"]) == 2
    assert main(["generate", "--model", str(tiny_path), "--prompt", "hi"]) == 2
    assert seen == [True, False] and estimated == [True, False]
    calls = []
    monkeypatch.setattr(jaxqlora.finetune, "evaluate_adapter",
                        lambda cfg, adapter, log=None, keep_quantized=False: calls.append(keep_quantized) or {})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert main(["eval", "--adapter", str(adapter), "--model", str(tiny_path), "--keep-quantized"]) == 0
    assert calls == [True]
    assert "stop here" in capsys.readouterr().err


def test_decode_step_on_hopper_uses_mosaic_gemv(monkeypatch, tiny_path):
    """On a (faked) Hopper, with the GGUF kernel layout (`gguf_with_kernel_layout`, what
    `use_kernel_codes` adds there), a one-token decode step of the kept-quantized Q4_K_M-style
    model traces to one Mosaic GPU GGUF GEMV per projection (the mixed Q4_K/Q6_K stacks and the
    Q6_K head included) and no Triton GGUF kernel; a prefill of more than 16 tokens keeps the
    Triton kernel. The layout decodes back to the planes' weights (which match
    ``gguf.quants.dequantize`` bit for bit: test_dequantize_random_tensors_bit_exact). The
    head, which multiplies float32 activations, keeps the Triton kernel."""
    from jaxqlora.ggml import GGUFWeight
    from jaxqlora.model import KVCache
    from jaxqlora.quantize import QuantizedLinear, gguf_with_kernel_layout
    from pallas_kernels import dispatch, gguf_mgpu

    mq, _ = load_pretrained(tiny_path, dtype=jnp.bfloat16, keep_quantized=True)
    laid = 0
    for _, node in list(nnx.iter_graph(mq)):
        if isinstance(node, QuantizedLinear) and isinstance(node.weight.get_value(), GGUFWeight):
            w = node.weight.get_value()
            new = gguf_with_kernel_layout(w, force=True)
            assert new.kernel_layout is not None and new.nbytes > w.nbytes
            layers = [None] if not w.stacked else range(w.kind.shape[0])
            for i in layers:
                got = gguf_mgpu.gguf_mgpu_dequantize(new.kernel_layout, w.shape[1], w.kind, None if i is None
                                                     else jnp.int32(i), fmts=w.formats)
                want = w.dequantize(jnp.float32) if i is None else w.dequantize(jnp.float32)[i]
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-7, atol=0)
            node.weight.set_value(new)
            laid += 1
    assert laid == 8  # q, k, v, o, gate, up, down stacks and the head

    real_supported = gguf_mgpu.gguf_mgpu_supported

    def on_hopper(*args):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(jax, "devices", lambda *a: [type("D", (), {"platform": "gpu", "compute_capability": "9.0"})()])
            return real_supported(*args)

    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(gguf_mgpu, "gguf_mgpu_supported", on_hopper)
    graphdef, state = nnx.split(mq)

    def step(s, t, c):
        return nnx.merge(graphdef, s)(t, cache=c)[0]

    cache = KVCache.init(mq.config, 1, 40, jnp.bfloat16)
    text = str(jax.make_jaxpr(step)(state, jnp.ones((1, 1), jnp.int32), cache))
    n_proj = 7 * mq.config.num_hidden_layers
    assert text.count("name=_mgpu_vjp") == n_proj
    assert text.count("name=_gguf_matmul_vjp") == 1  # the head: float32 activations, the Triton kernel
    prefill = str(jax.make_jaxpr(step)(state, jnp.ones((1, 24), jnp.int32), cache))
    # the prefill's layers may be scanned (one traced body): every projection there is Triton's
    assert prefill.count("name=_mgpu_vjp") == 0 and prefill.count("name=_gguf_matmul_vjp") >= 8
