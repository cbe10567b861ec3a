"""Model-level NF4 quantization (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

`quantize_model` replaces every linear projection of the decoder (``q_proj`` ...
``down_proj``) by an `NF4Linear`; embeddings, norms and the LM head stay in their dtype.
`NF4Linear` keeps the bitsandbytes-format `jaxqlora.nf4.NF4Weight` in a frozen variable
(`NF4Param`, never trained) and multiplies through `pallas_kernels.nf4_matmul`: a Pallas
kernel on GPU that dequantizes tiles on the fly (its ``custom_vjp`` backward gives the
input gradient through the transposed kernel), the XLA reference path elsewhere.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxqlora.lora import ALL_TARGETS, LoRALinear, projection_owner
from jaxqlora.model import Linear
from jaxqlora.stacked import layer_slice, stack_trees
from jaxqlora.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from jaxqlora.sharding import per_device, sharding_active


class NF4Param(nnx.Variable):
    """A frozen NF4-quantized weight (`NF4Weight` pytree); excluded from training."""


def nf4_linear(x: jax.Array, q: NF4Weight, layer=None) -> jax.Array:
    """``x @ W.T`` for an NF4 weight ``W [out, in]``; ``x [..., in]`` -> ``[..., out]`` in x.dtype.

    Weights whose ``in_features`` is a multiple of the blocksize (every real model) go
    through `pallas_kernels.nf4_matmul` (blocks never straddle rows); other shapes, where
    bitsandbytes' flat blocks cross row boundaries, dequantize with XLA and multiply.
    Under a device mesh the weight is gathered whole and the product runs on each
    device's rows (`jaxqlora.sharding.per_device`).

    ``layer`` (int or int32 scalar): ``q``'s arrays are stacked over layers (leading axis)
    and layer ``layer`` is multiplied; the NF4 GEMV reads it in place (one device).
    """
    if layer is not None and sharding_active():
        q, layer = layer_slice(q, layer), None
    if layer is not None:
        return _nf4_linear_local(x, q, layer)
    return per_device(_nf4_linear_local, x, q)


def _nf4_linear_local(x: jax.Array, q: NF4Weight, layer=None) -> jax.Array:
    from pallas_kernels.nf4_matmul import nf4_matmul

    n, k = q.shape
    lead = () if layer is None else q.packed.shape[:1]
    if k % q.blocksize == 0:
        return nf4_matmul(x, q.packed.reshape(*lead, n, k // 2), q.absmax.reshape(*lead, n, k // q.blocksize),
                          q.nested_absmax, q.nested_code, q.offset, code=q.code, blocksize=q.blocksize,
                          nested_blocksize=q.nested_blocksize or 256, layer=layer)
    if layer is not None:
        q = layer_slice(q, layer)
    w = jax.lax.stop_gradient(dequantize_nf4(q, x.dtype))
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32).astype(x.dtype)


class NF4Linear(nnx.Module):
    """A linear layer with an NF4 weight: same interface as `jaxqlora.model.Linear`.

    Args:
      weight: the quantized ``[out_features, in_features]`` weight; in the stacked decoder
        layers every array field carries a leading layer axis (``weight.shape`` stays the
        per-layer shape), and each layer's call sees its slice.
      bias: optional ``[out_features]`` bias (``[layers, out_features]`` when stacked;
        kept in its dtype, frozen).
    """

    def __init__(self, weight: NF4Weight, bias: jax.Array | None = None):
        self.out_features, self.in_features = weight.shape
        self.weight = NF4Param(weight)
        self.bias = nnx.Param(bias) if bias is not None else None

    @property
    def stacked(self) -> bool:
        """True when the weight carries a leading layer axis (see the class docstring)."""
        return self.weight.get_value().packed.ndim == 2

    @classmethod
    def from_linear(cls, linear: Linear, *, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        """Quantize a `Linear`'s weight (bitsandbytes-exact, see `jaxqlora.nf4.quantize_nf4`),
        layer by layer when it is stacked (``weight [layers, out, in]``)."""
        w = linear.weight[...]
        if w.ndim == 3:
            q = stack_trees([quantize_nf4(w[i], blocksize=blocksize, double_quant=double_quant)
                             for i in range(w.shape[0])])
        else:
            q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        return cls(q, None if linear.bias is None else linear.bias[...])

    def __call__(self, x: jax.Array, layer=None) -> jax.Array:
        """``x [..., in]`` -> ``[..., out]`` in x's dtype; ``layer`` as in `jaxqlora.model.Linear`."""
        y = nf4_linear(x, self.weight.get_value(), layer)
        if self.bias is not None:
            bias = self.bias[...] if layer is None else self.bias[layer]
            y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
        return y

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The dequantized weight ``[out, in]`` (``[layers, out, in]`` when stacked; original
        dtype by default)."""
        q = self.weight.get_value()
        if self.stacked:
            return jnp.stack([dequantize_nf4(layer_slice(q, i), dtype) for i in range(q.packed.shape[0])])
        return dequantize_nf4(q, dtype)


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def quantize_model(model: nnx.Module, *, blocksize: int = 64, double_quant: bool = True,
                   targets: Iterable[str] = ALL_TARGETS) -> dict[str, float]:
    """Replace the ``targets`` projections of every decoder layer by `NF4Linear`, in place.

    Works before or after `jaxqlora.lora.apply_lora` (a LoRA layer's ``base_layer`` is
    quantized). Embeddings, norms and ``lm_head`` are untouched.

    Args:
      model: a `jaxqlora.model.CausalLM`.
      blocksize: NF4 block size (bitsandbytes default 64).
      double_quant: quantize the absmax too (bitsandbytes ``compress_statistics``; ~4.127
        instead of 4.5 bits per parameter).
      targets: projection names (default all seven).

    Returns:
      A report: ``linear_mb_before``, ``linear_mb_after``, ``model_mb_before``,
      ``model_mb_after`` (MB = 1e6 bytes) and ``bits_per_param`` of the quantized layers.
    """
    before_model = _nbytes(nnx.state(model))
    lin_before = lin_after = params = 0
    for name in targets:
        owner = projection_owner(model.model.layers, name)
        mod = getattr(owner, name)
        holder, attr = (mod, "base_layer") if isinstance(mod, LoRALinear) else (owner, name)
        base = getattr(holder, attr)
        if isinstance(base, NF4Linear):
            continue
        if not isinstance(base, Linear):
            raise TypeError(f"cannot quantize {type(base).__name__} at {name}")
        q = NF4Linear.from_linear(base, blocksize=blocksize, double_quant=double_quant)
        lin_before += _nbytes(nnx.state(base))
        lin_after += _nbytes(nnx.state(q))
        params += base.in_features * base.out_features * model.num_layers
        setattr(holder, attr, q)
    after_model = _nbytes(nnx.state(model))
    return {"linear_mb_before": lin_before / 1e6, "linear_mb_after": lin_after / 1e6,
            "model_mb_before": before_model / 1e6, "model_mb_after": after_model / 1e6,
            "bits_per_param": 8 * lin_after / max(params, 1)}
