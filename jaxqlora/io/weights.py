"""Fill a `CausalLM` from named checkpoint tensors, one tensor at a time.

The model's parameter paths are its HF checkpoint keys (see `jaxqlora.model`), so one
function serves every loader: safetensors folders and GGUF files both yield
``(hf_name, array)`` pairs. The model is built abstractly (`nnx.eval_shape`, no memory),
each tensor is checked against the expected shape, cast to the target dtype and put on
the device as it arrives, and the model is returned only when every parameter is filled:
a bad checkpoint raises before anything is returned. Per-layer tensors
(``model.layers.3.mlp.up_proj.weight``) fill layer 3 of the stacked parameter
(`jaxqlora.model.split_layer_key`); a stacked parameter is assembled on the device once
all its layers have arrived.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxqlora.config import ModelConfig
from jaxqlora.errors import MissingTensorError, TensorShapeError, UnexpectedTensorError
from jaxqlora.model import CausalLM
from jaxqlora.stacked import is_stacked_key, layer_key, split_layer_key, stack_trees

# Buffers some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_model(cfg: ModelConfig, tensors: Iterable[tuple[str, Any]], *, dtype: Any = jnp.bfloat16,
                source: str = "<checkpoint>", nf4_layers: dict | None = None,
                quantized: dict | None = None) -> CausalLM:
    """Build a `CausalLM` of ``cfg`` whose parameters come from ``tensors``.

    Args:
      cfg: the model config.
      tensors: iterable of ``(hf_name, array)``; arrays are NumPy or JAX, any float dtype,
        in torch ``[out, in]`` layout. Consumed lazily, one at a time.
      dtype: parameter dtype (bf16 default; float32 for reference checks).
      source: the file or folder, named in errors.
      nf4_layers: ``{"model.layers.0.self_attn.q_proj": NF4Weight, ...}``: projections that
        arrive already quantized (a bitsandbytes 4-bit checkpoint) become `NF4Linear`s and
        take no tensor from ``tensors`` except their bias.
      quantized: ``{"model.layers.0.self_attn.q_proj": GGUFWeight, "lm_head": ...,
        "model.embed_tokens": ...}``: weights kept in a GGUF format (`jaxqlora.ggml`);
        they become `jaxqlora.quantize.QuantizedLinear` / ``QuantizedEmbedding`` layers
        (`jaxqlora.quantize.place_quantized`) and take no tensor except their bias.

    Raises:
      TensorShapeError: a tensor's shape disagrees with the config.
      UnexpectedTensorError: a tensor has no place in the model.
      MissingTensorError: some parameters were not in ``tensors``.
    """
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    if nf4_layers:
        _place_nf4(abstract, nf4_layers, source)
    if quantized:
        from jaxqlora.quantize import place_quantized

        place_quantized(abstract, quantized, source, dtype)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    slots = {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(params)}
    pending: dict[str, list] = {}  # stacked slot -> per-layer arrays received so far
    filled: set[str] = set()
    layers = cfg.num_hidden_layers
    for name, array in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        slot, layer = split_layer_key(name)
        var = slots.get(slot)
        if var is None or (layer is None) != (slot == name) or (layer is not None and layer >= layers):
            raise UnexpectedTensorError(source, "tensor has no place in the model "
                                        f"(architecture {cfg.arch}, {layers} layers)", name)
        want = tuple(var.get_value().shape)[0 if layer is None else 1:]
        if tuple(array.shape) != want:
            raise TensorShapeError(source, f"shape {tuple(array.shape)} disagrees with the config, which implies {want}", name)
        value = jax.device_put(jnp.asarray(array, dtype=dtype))
        if layer is None:
            var.set_value(value)
        else:
            parts = pending.setdefault(slot, [None] * layers)
            parts[layer] = value
            if all(p is not None for p in parts):
                var.set_value(stack_trees(parts))
                del pending[slot]
        filled.add(name)
    expected = {layer_key(k, i) for k in slots if is_stacked_key(k) for i in range(layers)} | {
        k for k in slots if not is_stacked_key(k)}
    missing = sorted(expected - filled)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MissingTensorError(source, f"{len(missing)} parameter(s) missing from the checkpoint: "
                                 f"{', '.join(missing[:5])}{more}", missing[0])
    return nnx.merge(graphdef, params, rest)


def _place_nf4(model: CausalLM, nf4_layers: dict, source: str) -> None:
    """Replace the abstract model's projections named in ``nf4_layers`` (per-layer
    prefixes) by `NF4Linear`s over the stacked `NF4Weight`s; every layer of a stacked
    projection must arrive quantized."""
    from jaxqlora.quantize import NF4Linear

    layers = model.config.num_hidden_layers
    groups: dict[str, list] = {}
    for prefix, q in nf4_layers.items():
        stacked, layer = split_layer_key(prefix)
        if layer is None or layer >= layers:
            raise UnexpectedTensorError(source, "4-bit weight has no place in the model", f"{prefix}.weight")
        groups.setdefault(stacked, [None] * layers)[layer] = q
    for stacked, parts in groups.items():
        *owner_path, attr = stacked.split(".")
        owner = model
        try:
            for p in owner_path:
                owner = getattr(owner, p)
            old = getattr(owner, attr)
            want = (old.out_features, old.in_features)
        except AttributeError:
            raise UnexpectedTensorError(source, "4-bit weight has no place in the model",
                                        f"{layer_key(stacked, 0)}.weight") from None
        for i, q in enumerate(parts):
            name = f"{layer_key(stacked, i)}.weight"
            if q is None:
                raise MissingTensorError(source, "4-bit weight missing for this layer (the other layers of this "
                                         "projection are 4-bit)", name)
            if tuple(q.shape) != want:
                raise TensorShapeError(source, f"4-bit weight of shape {tuple(q.shape)}, the config implies {want}",
                                       name)
            if (q.blocksize, q.double_quant, q.dtype) != (parts[0].blocksize, parts[0].double_quant, parts[0].dtype):
                raise TensorShapeError(source, "4-bit settings (blocksize, double quantization, dtype) differ "
                                       "between layers of this projection", name)
        new = NF4Linear(stack_trees(parts))
        if old.bias is not None:  # the bias still comes from the tensors
            new.bias = old.bias
        setattr(owner, attr, new)
