"""Export: fold LoRA into the base weights and write an HF folder transformers loads.

`merge_lora` gives a plain `CausalLM` whose projections are
``dequantize(base) + scaling * lora_B @ lora_A`` (computed in float32, stored in ``dtype``);
`save_pretrained` writes ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxqlora.io.atomic import atomic_save_safetensors, atomic_write_json
from jaxqlora.io.weights import build_model
from jaxqlora.lora import LoRALinear
from jaxqlora.model import CausalLM, Linear


def _dense_weight(layer) -> jax.Array:
    """float32 ``[out, in]`` weight of a Linear, NF4Linear or LoRALinear (LoRA folded in)."""
    from jaxqlora.quantize import NF4Linear

    if isinstance(layer, LoRALinear):
        return _dense_weight(layer.base_layer) + layer.delta_weight()
    if isinstance(layer, NF4Linear):
        return layer.dequantize(jnp.float32)
    return layer.weight[...].astype(jnp.float32)


def merged_tensors(model: CausalLM) -> Iterator[tuple[str, jax.Array]]:
    """``(hf_name, float32 array)`` for every parameter, with LoRA folded and NF4 dequantized."""
    from jaxqlora.quantize import NF4Linear

    linears = {}
    for path, node in nnx.iter_graph(model):
        name = ".".join(str(p) for p in path)
        if isinstance(node, (LoRALinear, NF4Linear, Linear)) and ".base_layer" not in f".{name}":
            linears[name] = node
    for name, node in linears.items():
        yield f"{name}.weight", _dense_weight(node)
        base = node.base_layer if isinstance(node, LoRALinear) else node
        if base.bias is not None:
            yield f"{name}.bias", base.bias[...].astype(jnp.float32)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(p) for p in path)
        if isinstance(var, nnx.LoRAParam) or any(name.startswith(f"{lin}.") for lin in linears):
            continue
        yield name, var[...].astype(jnp.float32)


def merge_lora(model: CausalLM, dtype: Any = jnp.bfloat16) -> CausalLM:
    """A new `CausalLM` of plain ``dtype`` linears with every LoRA adapter folded in.

    The input model (bf16, float32 or NF4 base, with or without LoRA) is not changed.
    """
    return build_model(model.config, merged_tensors(model), dtype=dtype, source="<merge_lora>")


def save_pretrained(model: CausalLM, folder: str | Path, *, tokenizer=None, dtype: Any = jnp.bfloat16) -> Path:
    """Write an HF folder (``config.json``, ``model.safetensors``, ``tokenizer.json``) that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    LoRA is folded in and NF4 weights are dequantized; tensors are stored in ``dtype``.
    Files are written atomically. Tied embeddings are saved once (``tie_word_embeddings``).
    """
    folder = Path(folder)
    tensors = {}
    for name, a in merged_tensors(model):
        tensors[name] = np.asarray(jax.device_get(a.astype(dtype)))
    atomic_save_safetensors(folder / "model.safetensors", tensors, metadata={"format": "pt"})
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = cfg["dtype"] = jnp.dtype(dtype).name
    atomic_write_json(folder / "config.json", cfg)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
