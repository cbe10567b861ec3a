"""The decoder: Llama / Qwen2 / Qwen3 in one Flax NNX module tree.

Read top to bottom: RoPE helpers, `Linear`, `RMSNorm`, `project_together` (q/k/v and
gate/up of an NF4 base in one kernel launch), `Attention` (with its KV cache update),
`MLP`, `DecoderLayer`, the stacked-layer key mapping, `Decoder`, `CausalLM`.
Module attribute names follow Hugging Face transformers.

Stacked layers: `Decoder.layers` is ONE `DecoderLayer` whose every parameter carries a
leading layer axis (``self_attn.q_proj.weight`` is ``[num_hidden_layers, out, in]``; NF4
codes, absmax and LoRA factors likewise), and the layers run under ``jax.lax.scan``, so a
compiled program holds one layer whatever the depth (MaxText's scanned decoder). Only
RNG streams (dropout) are shared by all layers rather than stacked. On disk nothing
changes: checkpoint keys stay per layer (``model.layers.3.self_attn.q_proj.weight``), and
`jaxqlora.stacked` is the one place that maps between those keys and the stacked arrays.

Dtype policy: parameters and matmul activations in ``dtype`` (bf16 by default); the
residual stream, RMSNorm, RoPE tables, softmax and logits in float32. (The residual stream
of small Llamas reaches |h| ~ 2e4, where a bf16 ulp is 128: a bf16 residual rounds whole
attention/MLP updates away and changes greedy answers.)

Source: transformers ``models/llama/modeling_llama.py``, ``qwen2``, ``qwen3``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxqlora.config import ModelConfig
from jaxqlora.lora import LoRALinear, PackedFactor, layer_keep_masks, pack_factors
from jaxqlora.sharding import rowwise
from jaxqlora.stacked import layer_slice, stack_trees
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.rms_norm import add_rms_norm, rms_norm
from pallas_kernels.swiglu import swiglu

# ---------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies, float32 ``[head_dim // 2]``, as transformers computes them.

    Applies Llama-3 scaling (``cfg.rope_scaling``) or llama.cpp's per-frequency factors
    (``cfg.rope_freq_factors``) when present.
    """
    dim = cfg.head_dim
    inv = (1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)
    s = cfg.rope_scaling
    if s is not None:
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    if cfg.rope_freq_factors is not None:
        inv = (inv / np.asarray(cfg.rope_freq_factors, np.float32)).astype(np.float32)
    return inv


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables, float32 ``[batch, seq, head_dim]``, for int ``positions [batch, seq]``."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [batch, seq, heads, head_dim]`` by RoPE (HF ``rotate_half`` layout), in float32."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


# ------------------------------------------------------------------------ layers


def pick(var: nnx.Variable, layer) -> jax.Array:
    """The value of ``var``, or its slice ``layer`` (int or int32 scalar) on the leading
    (stacked-layer) axis when ``layer`` is not None."""
    return var[...] if layer is None else var[layer]


class Linear(nnx.Module):
    """``y = x @ weight.T + bias`` with ``weight [out_features, in_features]`` as in torch.

    The interface every projection shares (bf16 here; NF4 and LoRA-wrapped linears
    elsewhere): ``in_features``, ``out_features`` and ``__call__(x [..., in], layer=None)
    -> [..., out]`` in x's dtype, accumulated in float32. ``layer`` (an int or int32
    scalar) selects one layer of stacked parameters (``weight [layers, out, in]``, see
    `CausalLM`); None means the parameters are one layer's.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 dtype: Any = jnp.bfloat16, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        w = jax.random.normal(rngs.params(), (out_features, in_features), jnp.float32) * 0.02
        self.weight = nnx.Param(w.astype(dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array, layer=None) -> jax.Array:
        w = pick(self.weight, layer)
        y = jax.lax.dot_general(x.astype(w.dtype), w, (((x.ndim - 1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + pick(self.bias, layer).astype(jnp.float32)
        return y.astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding table ``weight [vocab, hidden]`` (HF ``embed_tokens``)."""

    def __init__(self, num_embeddings: int, features: int, *, dtype: Any, rngs: nnx.Rngs):
        w = jax.random.normal(rngs.params(), (num_embeddings, features), jnp.float32) * 0.02
        self.weight = nnx.Param(w.astype(dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)


class RMSNorm(nnx.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last axis, computed in float32.

    As transformers' ``LlamaRMSNorm``, the normalised value is cast to the parameter dtype
    before the multiplication by ``weight`` (the output is in the parameter dtype; for a
    float32 residual stream this feeds the bf16 matmuls). Runs `pallas_kernels.rms_norm`
    (a Pallas kernel on GPU, the same math in jnp elsewhere).
    """

    def __init__(self, dim: int, eps: float, *, dtype: Any):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array, layer=None) -> jax.Array:
        return rowwise(lambda x, w: rms_norm(x, w, self.eps), (x,), (pick(self.weight, layer),))

    def add_and_norm(self, x: jax.Array, residual: jax.Array, layer=None) -> tuple[jax.Array, jax.Array]:
        """``residual + x`` (in the residual's dtype) and its norm, fused on GPU.

        Returns ``(norm(new_residual), new_residual)`` (`pallas_kernels.rms_norm.add_rms_norm`).
        ``layer`` as in `Linear`.
        """
        return rowwise(lambda x, r, w: add_rms_norm(x, r, w, self.eps), (x, residual), (pick(self.weight, layer),))


# --------------------------------------------------------------------- KV cache


@flax.struct.dataclass
class KVCache:
    """Preallocated key/value cache for incremental decoding.

    Attributes:
      k, v: stacked over layers, ``[num_hidden_layers, batch, max_len, num_key_value_heads,
        head_dim]``; each layer writes its new keys/values in place at ``index``.
      valid: bool ``[batch, max_len]``: slot holds a real (non-padding) token.
      index: int32 ``[batch]``, each row's next slot to write: rows advance on their own,
        so a decode slot of the serving engine (`jaxqlora.serving.engine`) can hold a new
        request while the others go on. Padding (left or right) is excluded by ``valid``,
        and per-row RoPE positions come from the count of valid slots, so rows of different
        lengths share one cache. Writes past ``max_len`` are dropped.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16) -> "KVCache":
        """An empty cache of ``max_len`` slots (zeros; nothing is valid yet)."""
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        """Cache slots per sequence (S of ``valid [B, S]``)."""
        return self.valid.shape[1]


def write_cache(cache: jax.Array, new: jax.Array, layer, index: jax.Array) -> jax.Array:
    """``cache [L, B, S, ...]`` with ``new [B, T, ...]`` written at layer ``layer`` (int or
    int32 scalar), slots ``index[b] .. index[b] + T - 1`` of each row b (``index`` int32
    ``[B]``); slots past S are dropped. One scatter, in place when ``cache`` is donated."""
    b, t = new.shape[:2]
    slots = index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
    return cache.at[layer, rows, slots].set(new.astype(cache.dtype), mode="drop")


# ------------------------------------------------------- projections of one input


def _fusable_base(module: nnx.Module):
    """The module that computes ``module``'s base product (``module`` itself, or a
    `LoRALinear`'s ``base_layer``) when it can be fused with others of the same input (it
    has a true ``fusable`` and a ``project_many``: an NF4 `jaxqlora.quantize.QuantizedLinear`),
    else None. Duck-typed, so that the model does not import the quantization that builds on it."""
    base = module.base_layer if isinstance(module, LoRALinear) else module
    return base if getattr(base, "fusable", False) else None


def project(module: nnx.Module, x: jax.Array, layer=None, adapter=None, keep=None) -> jax.Array:
    """``module(x, layer)``, passing ``adapter`` (int32 ``[B]``: each row's adapter, see
    `jaxqlora.lora.LoRALinear`) and ``keep`` (its dropout mask drawn by the layer,
    `jaxqlora.lora.layer_keep_masks`, or None) when ``module`` is LoRA-wrapped."""
    return module(x, layer, adapter, keep) if isinstance(module, LoRALinear) else module(x, layer)


def project_together(modules: Sequence[nnx.Module], x: jax.Array, layer=None,
                     adapter=None, keep: Sequence | None = None) -> tuple[list[jax.Array], bool]:
    """``[m(x, layer) for m in modules]`` for projections of one input (q/k/v, gate/up),
    with the NF4 base products in one kernel launch where possible.

    When every module is an NF4 `jaxqlora.quantize.QuantizedLinear`, or a `LoRALinear`
    whose ``base_layer`` is one (``fusable``), the base products go through its
    ``project_many``, `jaxqlora.quantize.nf4_linear_multi` (ONE Mosaic GPU kernel for all of them when
    decoding on a Hopper GPU, one NF4 matmul each elsewhere), then each module's bias and
    LoRA term are added exactly as its own call would (dropout included). Any other mix
    calls the modules one by one.

    Args:
      modules: projections with the `Linear` interface and one ``in_features``.
      x: ``[..., in]`` activations; ``layer`` as in `Linear`; ``adapter`` as in `project`.
      keep: one dropout mask (or None) per module, as ``keep`` of `project`; None: none.

    Returns:
      ``(outputs, fused)``: one ``[..., out_i]`` array per module in x's dtype, and
      whether the one fused kernel computed the base products.
    """
    keep = [None] * len(modules) if keep is None else list(keep)
    bases = [_fusable_base(m) for m in modules]
    if any(b is None for b in bases):
        return [project(m, x, layer, adapter, k) for m, k in zip(modules, keep)], False
    ys, fused = type(bases[0]).project_many(x, bases, layer)
    out = []
    for m, b, y, k in zip(modules, bases, ys, keep):
        y = b.add_bias(y, x, layer)
        out.append(m.add_update(x, y, layer, adapter, k) if isinstance(m, LoRALinear) else y)
    return out, fused


# ------------------------------------------------------------------- the blocks


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE (and Qwen3's q/k RMSNorm).

    Attention goes through ``jax.nn.dot_product_attention`` with an explicit boolean mask:
    without a cache (training, plain forward) and with the Pallas kernels on (GPU, bf16/f16,
    head_dim <= 128) as cuDNN's fused flash attention, else as XLA's (softmax in float32,
    scores materialised). One-token decoding over a cache with the Pallas kernels on runs
    the split-KV `pallas_kernels.decode_attention` on the cache in place.
    """

    def __init__(self, cfg: ModelConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = Linear(h, q, use_bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(h, kv, use_bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(h, kv, use_bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(q, h, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, cos, sin, mask, kv=None, index=None, cache_layer=0, layer=None, adapter=None,
                 keep=None):
        """x ``[B, T, hidden]``; cos/sin ``[B, T, head_dim]``; mask bool ``[B, 1, T, S]``;
        ``keep`` the layer's LoRA dropout masks by projection name (`jaxqlora.lora.layer_keep_masks`).

        With ``kv = (k_cache, v_cache)``, the stacked ``[layers, B, S, Hkv, D]`` cache, the
        new keys/values are written in place at layer ``cache_layer`` (int or int32
        scalar), slots ``index[b] ...`` of each row b (`write_cache`), and attention runs over that layer's S slots; returns
        ``(out, (k_cache, v_cache))``. ``layer`` as in `Linear`.
        """
        b, t, _ = x.shape
        keep = keep or {}
        (q, k, v), _ = project_together((self.q_proj, self.k_proj, self.v_proj), x, layer, adapter,
                                        [keep.get(n) for n in ("q_proj", "k_proj", "v_proj")])
        q = checkpoint_name(q, "q_proj").reshape(b, t, self.num_heads, self.head_dim)
        k = checkpoint_name(k, "k_proj").reshape(b, t, self.num_kv_heads, self.head_dim)
        v = checkpoint_name(v, "v_proj").reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q, layer), self.k_norm(k, layer)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            kv = tuple(write_cache(c, new, cache_layer, index) for c, new in zip(kv, (k, v)))
            if t == 1 and resolve_impl() == "pallas":  # reads the stacked cache in place
                keys = mask[:, 0, 0, :]  # [B, S]: valid and causal
                out = decode_attention(q[:, 0], kv[0], kv[1], jnp.minimum(index + 1, keys.shape[-1]),
                                       jnp.argmax(keys, axis=-1), mask=keys,
                                       scale=1.0 / math.sqrt(self.head_dim), layer=cache_layer)
                return project(self.o_proj, out.reshape(b, t, self.num_heads * self.head_dim), layer, adapter,
                               keep.get("o_proj")), kv
            kc, vc = (jax.lax.dynamic_index_in_dim(c, cache_layer, 0, keepdims=False)[:b] for c in kv)
            k, v = kc.astype(q.dtype), vc.astype(q.dtype)
        impl = self._prefill_impl(q, kv)
        if impl == "cudnn":  # a fully masked query row (left padding) would give NaN there and,
            # through its K/V in the next layer, everywhere: let each query see itself
            mask = mask | jnp.eye(t, k.shape[1], dtype=bool)[None, None]
        scale = 1.0 / math.sqrt(self.head_dim)
        dtype = q.dtype
        if impl is None and dtype == jnp.float16 and jax.default_backend() == "cpu":
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))  # XLA:CPU has no f16 x f16 -> f32 dot
        out = rowwise(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale,
                                                                      implementation=impl), (q, k, v, mask))
        out = out.astype(dtype)
        out = checkpoint_name(out.reshape(b, t, self.num_heads * self.head_dim), "attention")
        return checkpoint_name(project(self.o_proj, out, layer, adapter, keep.get("o_proj")), "o_proj"), kv

    def _prefill_impl(self, q, kv) -> str | None:
        """'cudnn' (fused flash attention, no [B, H, T, S] scores in memory) for cache-free
        bf16/f16 attention when the Pallas kernels are on (GPU); None (XLA) otherwise.
        cuDNN takes the mask as a bias, which needs an even sequence length."""
        if (kv is None and resolve_impl() == "pallas" and jax.default_backend() == "gpu"
                and q.dtype in (jnp.bfloat16, jnp.float16) and self.head_dim % 8 == 0
                and self.head_dim <= 128 and q.shape[1] % 2 == 0):
            return "cudnn"
        return None


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` (`pallas_kernels.swiglu`)."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, rngs: nnx.Rngs):
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, f, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(h, f, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, h, dtype=dtype, rngs=rngs)

    def __call__(self, x, layer=None, adapter=None, keep=None):
        """``x [B, T, hidden]``; ``keep`` as in `Attention`."""
        keep = keep or {}
        (gate, up), fused = project_together((self.gate_proj, self.up_proj), x, layer, adapter,
                                             [keep.get("gate_proj"), keep.get("up_proj")])
        gate, up = checkpoint_name(gate, "gate_proj"), checkpoint_name(up, "up_proj")
        # After the one fused NF4 kernel (decoding on Hopper) the SwiGLU is jnp, for XLA to
        # fuse with the kernel's output reduction; otherwise the SwiGLU kernel.
        h = _swiglu_f32(gate, up) if fused else rowwise(swiglu, (gate, up))
        return checkpoint_name(project(self.down_proj, h, layer, adapter, keep.get("down_proj")), "down_proj")


def _swiglu_f32(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` computed in float32 and rounded once to gate's dtype (the
    numerics of `pallas_kernels.swiglu`'s kernel), in jnp."""
    g, u = gate.astype(jnp.float32), up.astype(jnp.float32)
    return (jax.nn.silu(g) * u).astype(gate.dtype)


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv=None, index=None, cache_layer=0, layer=None, adapter=None):
        """x: the float32 residual stream ``[B, T, hidden]``; returns it updated (and the
        stacked kv, see `Attention`). ``layer`` as in `Linear`, ``adapter`` as in `project`.
        With LoRA dropout in training, one mask is drawn for all the layer's projections
        (`jaxqlora.lora.layer_keep_masks`: one RNG draw and one saved residual, not seven)."""
        keep = layer_keep_masks(self, x.shape[:-1])
        a, kv = self.self_attn(self.input_layernorm(x, layer), cos, sin, mask, kv, index, cache_layer, layer, adapter,
                               keep)
        h, x = self.post_attention_layernorm.add_and_norm(a, x, layer)  # x += a; h = norm(x)
        return x + self.mlp(h, layer, adapter, keep).astype(x.dtype), kv


# ----------------------------------------------------------------- stacked layers

def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module whose variables stack those of ``modules`` (same structure) on a leading
    axis; RNG streams (not stacked) are taken from the first module."""
    graphdef, rng, _ = nnx.split(modules[0], nnx.RngState, ...)
    params = stack_trees([nnx.split(m, nnx.RngState, ...)[2] for m in modules])
    return nnx.merge(graphdef, rng, params)


class Decoder(nnx.Module):
    """Embedding, the decoder layers (stacked, see the module docstring) and the final
    norm (HF ``LlamaModel``)."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = stack_modules([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


def default_scan(tokens: int, cached: bool) -> bool:
    """Whether `CausalLM.hidden_states` scans its layers (True) or unrolls them, when
    ``CausalLM.scan_layers`` is None, for a call over ``tokens`` new tokens with or without a
    cache: ``jax.lax.scan`` for training, evaluation and prefill (compile time independent
    of depth); on a GPU, unrolled for one-token cached decoding, which measured faster on an
    H200 (SmolLM2-135M NF4, batch 1: 743 vs 632 tokens/s; batch 8: 4,323 vs 3,860). On other
    backends decoding scans too: there the unrolled loop's compile time (once per generation
    program) outweighs what it saves."""
    return not (cached and tokens == 1 and jax.default_backend() == "gpu")


def segment_positions(segments: jax.Array) -> jax.Array:
    """RoPE positions of packed rows: int32 ``[B, T]``, each real token's index among the
    real tokens of its segment (a segment restarts at 0), padding (id 0) as the token before it.

    ``segments``: int ``[B, T]``, 0 = padding, else the segment id; a segment is a
    contiguous run of real tokens (padding inside a run does not end it). For a 0/1 mask
    this is the count of earlier real tokens (left or right padding), the positions
    unpacked rows always had. Packed examples thus get the positions they have alone, as
    with transformers' ``position_ids`` for packed sequences (TRL ``SFTTrainer`` packing).
    """
    segments = segments.astype(jnp.int32)
    valid = segments != 0
    t = jnp.arange(segments.shape[-1], dtype=jnp.int32)
    count = jnp.cumsum(valid, axis=-1, dtype=jnp.int32)  # real tokens up to and including t
    # segment id of the last real token before t (0 when none)
    last = jax.lax.cummax(jnp.where(valid, t, -1), axis=segments.ndim - 1)
    prev = jnp.concatenate([jnp.full(last.shape[:-1] + (1,), -1, jnp.int32), last[..., :-1]], axis=-1)
    prev_seg = jnp.where(prev >= 0, jnp.take_along_axis(segments, jnp.maximum(prev, 0), axis=-1), 0)
    start = valid & (segments != prev_seg)
    base = jax.lax.cummax(jnp.where(start, count - 1, 0), axis=segments.ndim - 1)  # real tokens before the start
    return jnp.maximum(count - 1 - base, 0)


def segment_mask(segments: jax.Array) -> jax.Array:
    """bool ``[B, T, T]``: query t may see key s (before the causal mask): s is real and in
    t's segment; a padding query (id 0) sees every real key, as it did with a 0/1 mask
    (its output is unused; no query row is fully masked)."""
    seg = segments.astype(jnp.int32)
    q, k = seg[:, :, None], seg[:, None, :]
    return (k != 0) & ((q == k) | (q == 0))


MATMUL_NAMES = ("q_proj", "k_proj", "v_proj", "attention", "o_proj", "gate_proj", "up_proj", "down_proj", "lora_a")
"""``checkpoint_name``s of a decoder layer's matmul outputs (the seven projections, the
attention output, and LoRA's rank-r intermediate ``x @ lora_A.T``), for `remat_policy`."""


PIECE_VALUES = 1 << 20
"""Most weight values `by_row_pieces` makes float32 at once (4 MiB): on a CPU the piece is
still in the cache when its dot reads it."""


def by_row_pieces(product, n: int, k: int) -> jax.Array:
    """A product with an ``[n, k]`` weight computed over its rows in pieces: ``product(start,
    rows) -> [..., rows]`` (the outputs of weight rows ``start .. start + rows - 1``; ``start``
    an int or int32 scalar) for pieces of at most `PIECE_VALUES` values, in a ``lax.map``,
    concatenated to ``[..., n]``.

    For XLA:CPU, which turns a weight of another dtype (bf16, f16, GGUF blocks) into a float32
    copy before a dot: piece by piece the copy stays in the cache, and a weight that does not
    change inside a decode loop is not converted whole outside it.
    """
    rows = max(1, min(n, PIECE_VALUES // max(k, 1)))
    full, tail = divmod(n, rows)
    if full == 1 and not tail:
        return product(0, n)
    outs = []
    if full:
        ys = jax.lax.map(lambda i: product(i * rows, rows), jnp.arange(full, dtype=jnp.int32))  # [full, ..., rows]
        outs.append(jnp.moveaxis(ys, 0, -2).reshape(*ys.shape[1:-1], full * rows))
    if tail:
        outs.append(product(full * rows, tail))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


def lm_logits(hidden: jax.Array, weight: jax.Array) -> jax.Array:
    """float32 logits ``[..., vocab]`` = ``hidden [..., hidden] @ weight.T`` (``weight``
    ``[vocab, hidden]``; hidden cast to the weight dtype, float32 accumulation)."""
    return jax.lax.dot_general(hidden.astype(weight.dtype), weight, (((hidden.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def remat_policy(remat) -> Any:
    """The ``jax.checkpoint`` policy of a `CausalLM.remat` setting, or None for no remat.

    Args:
      remat: ``False`` / ``"none"``: keep every activation (no rematerialisation).
        ``True`` / ``"full"``: keep only each layer's input and recompute the layer in the
        backward pass (``nothing_saveable``; least memory, one more forward).
        ``"dots"``: keep the outputs of every matmul (`MATMUL_NAMES`) and recompute only
        the elementwise work between them (norms, RoPE, SiLU, residual adds) and the
        attention scores (which a flash-attention backward recomputes anyway); no
        projection runs twice. ``"offload"``: as ``"dots"``, but the matmul outputs are
        copied to pinned host memory in the forward pass and back in the backward pass
        (``save_and_offload_only_these_names``): device memory near ``"full"``, no
        recomputed projection, at the cost of the host transfers (which XLA overlaps with
        compute where it can). A tuple of names from `MATMUL_NAMES`: keep only those
        (e.g. the attention side, recomputing the MLP).

    Raises:
      ValueError: an unknown setting or name.

    Source: ``jax.checkpoint_policies`` (``save_only_these_names``), JAX's gradient
    checkpointing guide.
    """
    if remat is False or remat is None or remat == "none":
        return None
    if remat is True or remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    if remat == "offload":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(MATMUL_NAMES),
            offload_src="device", offload_dst="pinned_host")
    names = MATMUL_NAMES if remat == "dots" else remat
    if isinstance(names, (tuple, list)) and names and set(names) <= set(MATMUL_NAMES):
        return jax.checkpoint_policies.save_only_these_names(*names)
    raise ValueError(f"remat must be False/'none', True/'full', 'dots', 'offload' or a tuple of names from "
                     f"{MATMUL_NAMES}; got {remat!r}")


def default_params_in_place() -> bool:
    """`CausalLM.params_in_place` when it is None: True on a GPU backend, False elsewhere.

    Measured (benchmarks/RESULTS.md, QLoRA train step of a SmolLM2-135M-shaped NF4 model, LoRA
    r=16 on all seven projections): on an H100, 16 x 64 tokens 50.2-52.9k tok/s in place
    against 41.7k sliced, 16 x 512 115.7k against 107.3k, the same peak memory. On the 2-core
    AVX2 CPU (bfloat16, 16 x 64, two processes each) in place gave 5.17 / 5.23 s per step
    against 6.08 / 5.22 s sliced: no gain to show, so the CPU keeps the sliced scan, whose
    float32 fine-tune is the one measured there (benchmarks/cpu_train.py).
    """
    return jax.default_backend() == "gpu"


class CausalLM(nnx.Module):
    """A Llama / Qwen2 / Qwen3 causal language model (HF ``*ForCausalLM``).

    Build one with `jaxqlora.load_pretrained`, or ``CausalLM(cfg, dtype=..., rngs=nnx.Rngs(0))``
    for random weights.

    Attributes:
      config: the `ModelConfig`.
      model: the `Decoder` (``embed_tokens``, ``layers``, ``norm``).
      lm_head: `Linear` ``[vocab, hidden]``, or None when embeddings are tied.
      remat: rematerialisation of each decoder layer in the backward pass (``nnx.remat``,
        i.e. ``jax.checkpoint``): ``False`` (none), ``True`` / ``"full"`` (keep only layer
        inputs), ``"dots"`` (keep matmul outputs, recompute elementwise work), ``"offload"``
        (matmul outputs kept in pinned host memory) or a tuple of `MATMUL_NAMES`; see
        `remat_policy`.
      scan_layers: the layer loop: ``True`` runs the stacked layers under ``jax.lax.scan``
        (the compiled program holds one layer), ``False`` unrolls them in Python (one copy
        per layer), ``None`` (default) picks per call with `default_scan`.
      params_in_place: without a cache (training, evaluation), how a layer reads its
        parameters; ``None`` (default) picks with `default_params_in_place` (True on a GPU).
        ``False``: the scan hands each step one layer's slices of
        every parameter (XLA materialises each slice that a custom call reads: on a GPU a
        copy kernel per frozen array per layer, forward and backward, and the sliced NF4
        codes are saved for the backward as stacked residuals; the SmolLM2 16x64 train step's
        profile on an H100 spent 41% of its GPU time in copy kernels, benchmarks/RESULTS.md);
        ``True``, the frozen parameters are read in place by the layer index (the Pallas
        kernels read the NF4 codes where they lie, as decoding does; loop-invariant, so
        never stacked as residuals) while the scan still hands each step its layer's LoRA
        factors (their gradients leave as stacked outputs, instead of a stacked accumulator
        updated by every layer). Same numbers either way (tests/test_train.py against
        PEFT). With a cache every parameter is read in place.
    """

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.bfloat16, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.model = Decoder(cfg, dtype=dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, rngs=rngs)
        self.remat = False  # see remat_policy: False, True / "full", "dots", "offload" or a tuple of MATMUL_NAMES
        self.scan_layers = None  # None: default_scan per call; True: always scan; False: always unroll
        self.params_in_place = None  # None: default_params_in_place(); True / False (see the class docstring)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers (the stacked axis)."""
        return self.config.num_hidden_layers

    def layer(self, i: int) -> DecoderLayer:
        """Layer ``i`` as its own `DecoderLayer` (a copy of the slices of the stacked
        arrays, sharing the RNG streams): the per-layer view, for inspection and export."""
        graphdef, rng, params = nnx.split(self.model.layers, nnx.RngState, ...)
        return nnx.merge(graphdef, rng, layer_slice(params, i))

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      positions: jax.Array | None = None, cache: KVCache | None = None,
                      adapter: jax.Array | None = None):
        """Final-norm hidden states ``[B, T, hidden]`` in the parameter dtype (and the new cache).

        Args:
          input_ids: int32 ``[B, T]``.
          attention_mask: int ``[B, T]``, 0 for padding (left or right), else the token's
            segment id: without a cache a token attends only to earlier tokens of its own
            segment, so several examples packed into one row (ids 1, 2, 3, ... in order,
            each one contiguous run) never see each other. A 0/1 mask is one segment per
            row. Default: all ones.
          positions: int32 ``[B, T]`` RoPE positions. Default: `segment_positions` (the count
            of earlier real tokens of the same segment, so padding does not shift positions
            and each packed example starts at 0), continuing the cache.
          cache: a `KVCache`; each row's T tokens are written at its ``cache.index``.
          adapter: int32 ``[B]``, each row's LoRA adapter when the model holds several
            (`jaxqlora.io.peft.load_adapters`); None: adapter 0.

        Returns:
          ``hidden`` if ``cache`` is None, else ``(hidden, new_cache)``.
        """
        b, t = input_ids.shape
        segments = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        mask_bt = segments != 0
        if positions is None:
            prior = 0 if cache is None else jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)[:, None]
            positions = prior + segment_positions(segments)
        cos, sin = rope_tables(self.config, positions)
        if cache is None:
            causal = jnp.tril(jnp.ones((t, t), bool))
            mask = causal[None, None] & segment_mask(segments)[:, None]
            index = None
        else:
            index = cache.index
            rows = jnp.arange(b, dtype=jnp.int32)[:, None]
            valid = cache.valid.at[rows, index[:, None] + jnp.arange(t)].set(mask_bt, mode="drop")
            slots = jnp.arange(cache.max_len)
            causal = slots[None, None, :] <= (index[:, None] + jnp.arange(t))[:, :, None]  # [B, T, S]
            mask = causal[:, None] & valid[:, None, None, :]
        x = self.model.embed_tokens(input_ids).astype(jnp.float32)  # float32 residual stream
        kv = None if cache is None else (cache.k, cache.v)
        scan = default_scan(t, cache is not None) if self.scan_layers is None else self.scan_layers
        x, kv = self._run_layers(x, cos, sin, mask, kv, index, scan, adapter)
        x = self.model.norm(x)
        if cache is None:
            return x
        return x, KVCache(k=kv[0], v=kv[1], valid=valid, index=index + t)

    def _run_layers(self, x, cos, sin, mask, kv, index, scan: bool, adapter=None):
        """The stacked layers over the residual stream ``x``: ``jax.lax.scan`` over the
        layer axis, or a Python loop. Only the residual stream, the shared RNG streams and
        the cache are carried out of the body, never the parameters (XLA would copy the
        frozen weights). Without a cache (training, evaluation) the parameters go in as
        scanned inputs, one layer's slice per step (gradients leave as stacked outputs),
        the LoRA factors packed into one row per layer (`jaxqlora.lora.pack_factors`);
        with ``params_in_place`` only the LoRA factors are sliced and the frozen parameters
        are indexed by layer; with a cache (generation) every module indexes the stacked
        parameters by layer itself, so that the NF4 GEMV and decode-attention kernels read
        the layer in place instead of XLA copying each slice. The remat policy wraps the
        body."""
        graphdef, rng, lora, frozen = nnx.split(self.model.layers, nnx.RngState, nnx.LoRAParam, ...)
        # what each step is handed sliced: everything (sliced), only the LoRA factors (frozen
        # read in place; the factors' gradients leave as stacked outputs, not as a stacked
        # accumulator updated every layer), or nothing (a cache: all read in place)
        in_place = default_params_in_place() if self.params_in_place is None else bool(self.params_in_place)
        mode = "in_place" if kv is not None else ("lora" if in_place else "sliced")
        # Scanned, the LoRA factors travel as one packed [layers, P] array: each step slices
        # one row (not one array per factor) and the backward writes one row of gradients
        # (jaxqlora.lora.PackedFactor); the products slice the factors from the row itself.
        factors, factors_def = jax.tree_util.tree_flatten(lora)
        packed = (scan and mode != "in_place" and bool(factors)
                  and len({(f.shape[0], f.dtype) for f in factors}) == 1)
        places = None
        if packed:
            lora_in, places = pack_factors(factors)
        else:
            lora_in = lora
        sliced = {"sliced": (lora_in, frozen), "lora": (lora_in, None), "in_place": (None, None)}[mode]

        def body(carry, xs):
            x, rng, kv = carry
            (lo, fr), i = xs
            if places is not None:  # this layer's row -> a view per factor
                lo = jax.tree_util.tree_unflatten(factors_def, [PackedFactor(lo, o, sh) for o, sh in places])
            layer = nnx.merge(graphdef, rng, lora if lo is None else lo, frozen if fr is None else fr)
            x, kv = layer(x, cos, sin, mask, kv, index, i, None if mode == "sliced" else i, adapter)
            return (x, nnx.state(layer, nnx.RngState), kv), None

        policy = remat_policy(self.remat)
        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=not scan)
        carry = (x, rng, kv)
        if scan:
            carry, _ = jax.lax.scan(body, carry, (sliced, jnp.arange(self.num_layers, dtype=jnp.int32)))
        else:
            for i in range(self.num_layers):
                carry, _ = body(carry, (tuple(None if s is None else layer_slice(s, i) for s in sliced), i))
        x, rng, kv = carry
        nnx.update(self.model.layers, rng)
        return x, kv

    @property
    def head_weight(self) -> jax.Array:
        """The LM head ``[vocab, hidden]``: ``lm_head.weight``, or the embeddings when tied
        (dequantized to the parameter dtype when the head is kept quantized)."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        if hasattr(head, "project"):  # a quantized head (jaxqlora.quantize)
            return head.dequantize(self.dtype)
        return head.weight[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits ``[..., vocab]`` from hidden states ``[..., hidden]`` (`lm_logits`;
        a quantized head multiplies through its own kernel, ``project``)."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        if hasattr(head, "project"):
            return head.project(hidden)
        weight = self.head_weight
        if jax.default_backend() == "cpu" and weight.dtype != jnp.float32:  # see by_row_pieces
            return by_row_pieces(lambda start, rows: lm_logits(
                hidden, jax.lax.dynamic_slice_in_dim(weight, start, rows)), *weight.shape)
        return lm_logits(hidden, weight)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None):
        """float32 logits ``[B, T, vocab]`` (and the new cache when ``cache`` is given).

        Arguments as in `hidden_states`.
        """
        out = self.hidden_states(input_ids, attention_mask, positions, cache)
        if cache is None:
            return self.logits(out)
        return self.logits(out[0]), out[1]
