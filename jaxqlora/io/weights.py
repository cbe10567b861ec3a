"""Fill a `CausalLM` from named checkpoint tensors, one tensor at a time.

The model's parameter paths are its HF checkpoint keys (see `jaxqlora.model`), so one
function serves every loader: safetensors folders and GGUF files both yield
``(hf_name, array)`` pairs. The model is built abstractly (`nnx.eval_shape`, no memory),
each tensor is checked against the expected shape, cast to the target dtype and put on
the device as it arrives, and the model is returned only when every parameter is filled:
a bad checkpoint raises before anything is returned.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxqlora.config import ModelConfig
from jaxqlora.errors import MissingTensorError, TensorShapeError, UnexpectedTensorError
from jaxqlora.model import CausalLM

# Buffers some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_model(cfg: ModelConfig, tensors: Iterable[tuple[str, Any]], *, dtype: Any = jnp.bfloat16,
                source: str = "<checkpoint>", nf4_layers: dict | None = None) -> CausalLM:
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

    Raises:
      TensorShapeError: a tensor's shape disagrees with the config.
      UnexpectedTensorError: a tensor has no place in the model.
      MissingTensorError: some parameters were not in ``tensors``.
    """
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    if nf4_layers:
        _place_nf4(abstract, nf4_layers, source)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    slots = {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(params)}
    filled: set[str] = set()
    for name, array in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        var = slots.get(name)
        if var is None:
            raise UnexpectedTensorError(source, "tensor has no place in the model "
                                        f"(architecture {cfg.arch}, {cfg.num_hidden_layers} layers)", name)
        want = tuple(var.get_value().shape)
        if tuple(array.shape) != want:
            raise TensorShapeError(source, f"shape {tuple(array.shape)} disagrees with the config, which implies {want}", name)
        var.set_value(jax.device_put(jnp.asarray(array, dtype=dtype)))
        filled.add(name)
    missing = sorted(set(slots) - filled)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MissingTensorError(source, f"{len(missing)} parameter(s) missing from the checkpoint: "
                                 f"{', '.join(missing[:5])}{more}", missing[0])
    return nnx.merge(graphdef, params, rest)


def _place_nf4(model: CausalLM, nf4_layers: dict, source: str) -> None:
    from jaxqlora.quantize import NF4Linear

    for prefix, q in nf4_layers.items():
        *owner_path, attr = prefix.split(".")
        owner = model
        try:
            for p in owner_path:
                owner = owner[int(p)] if p.isdigit() else getattr(owner, p)
            old = getattr(owner, attr)
        except (AttributeError, IndexError, TypeError):
            raise UnexpectedTensorError(source, "4-bit weight has no place in the model", f"{prefix}.weight") from None
        want = (old.out_features, old.in_features)
        if tuple(q.shape) != want:
            raise TensorShapeError(source, f"4-bit weight of shape {tuple(q.shape)}, the config implies {want}",
                                   f"{prefix}.weight")
        new = NF4Linear(q)
        if old.bias is not None:  # the bias still comes from the tensors
            new.bias = old.bias
        setattr(owner, attr, new)
