"""Export: fold LoRA into the base weights and write an HF folder transformers loads.

`merge_lora` gives a plain `CausalLM` whose projections are
``dequantize(base) + scaling * lora_B @ lora_A`` (computed in float32, stored in ``dtype``);
`save_pretrained` writes ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Container, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxqlora.io.atomic import atomic_save_safetensors, atomic_write_json
from jaxqlora.io.weights import build_model
from jaxqlora.lora import LoRALinear
from jaxqlora.model import CausalLM, Linear
from jaxqlora.stacked import layer_key, per_layer_items


def _dense_weight(layer) -> jax.Array:
    """float32 ``[out, in]`` weight of a Linear, QuantizedLinear (NF4, GGUF) or LoRALinear
    (LoRA folded in); ``[layers, out, in]`` for the stacked decoder layers."""
    from jaxqlora.quantize import QuantizedLinear

    if isinstance(layer, LoRALinear):
        return _dense_weight(layer.base_layer) + layer.delta_weight()
    if isinstance(layer, QuantizedLinear):
        return layer.dequantize(jnp.float32)
    return layer.weight[...].astype(jnp.float32)


def merged_tensors(model: CausalLM, skip_weights: Container[str] = ()) -> Iterator[tuple[str, jax.Array]]:
    """``(hf_name, float32 array)`` for every parameter, with LoRA folded and NF4 dequantized.

    The weights of the linears named in ``skip_weights`` (e.g. ``"model.layers.0.mlp.up_proj"``) are left out
    (and not computed); their biases are still yielded.
    """
    from jaxqlora.quantize import QuantizedLinear

    linears = {}
    for path, node in nnx.iter_graph(model):
        name = ".".join(str(p) for p in path)
        if isinstance(node, (LoRALinear, QuantizedLinear, Linear)) and ".base_layer" not in f".{name}":
            linears[name] = node
    for name, node in linears.items():
        keys = [layer_key(name, i) for i in range(_layers(node))] or [name]
        if any(k not in skip_weights for k in keys):
            weight = _dense_weight(node)
            for key, w in per_layer_items(f"{name}.weight", weight):
                if key.removesuffix(".weight") not in skip_weights:
                    yield key, w
        base = node.base_layer if isinstance(node, LoRALinear) else node
        if base.bias is not None:
            yield from per_layer_items(f"{name}.bias", base.bias[...].astype(jnp.float32))
    from jaxqlora.quantize import QuantizedEmbedding

    for path, node in nnx.iter_graph(model):  # a token embedding kept in a GGUF format
        if isinstance(node, QuantizedEmbedding):
            yield ".".join(str(p) for p in path) + ".weight", node.dequantize(jnp.float32)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(p) for p in path)
        if isinstance(var, nnx.LoRAParam) or any(name.startswith(f"{lin}.") for lin in linears):
            continue
        yield from per_layer_items(name, var[...].astype(jnp.float32))


def _layers(node) -> int:
    """The layer count of a stacked linear (0 for a single one)."""
    from jaxqlora.quantize import QuantizedLinear

    base = node.base_layer if isinstance(node, LoRALinear) else node
    if isinstance(base, QuantizedLinear):
        return base.num_layers
    w = base.weight[...]
    return w.shape[0] if w.ndim == 3 else 0


def merge_lora(model: CausalLM, dtype: Any = jnp.bfloat16) -> CausalLM:
    """A new `CausalLM` of plain ``dtype`` linears with every LoRA adapter folded in.

    The input model (bf16, float32 or NF4 base, with or without LoRA) is not changed.
    """
    return build_model(model.config, merged_tensors(model), dtype=dtype, source="<merge_lora>")


def save_pretrained(model: CausalLM, folder: str | Path, *, tokenizer=None, dtype: Any = jnp.bfloat16,
                    keep_nf4: bool = False) -> Path:
    """Write an HF folder (``config.json``, ``model.safetensors``, ``tokenizer.json``) that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    By default LoRA is folded in and NF4 weights are dequantized; tensors are stored in
    ``dtype``. With ``keep_nf4`` the `NF4Linear` projections are written in bitsandbytes'
    4-bit format (``weight``, ``weight.absmax``, ``weight.quant_map``, nested state and
    ``weight.quant_state.bitsandbytes__nf4``) with a ``quantization_config``, as
    transformers saves a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``.
    Files are written atomically. Tied embeddings are saved once.

    Raises:
      ValueError: ``keep_nf4`` on a model with LoRA layers (merge needs a dense base) or
        with mixed NF4 settings.
    """
    from jaxqlora.nf4 import nf4_to_state_dict
    from jaxqlora.quantize import NF4Linear

    folder = Path(folder)
    tensors = {}
    nf4 = {}
    if keep_nf4:
        from jaxqlora.lora import lora_layers

        if lora_layers(model):
            raise ValueError("keep_nf4 cannot fold LoRA into 4-bit weights; save the adapter, or merge "
                             "into a dense model (keep_nf4=False)")
        for path, node in nnx.iter_graph(model):
            if isinstance(node, NF4Linear):
                nf4.update(per_layer_items(".".join(str(p) for p in path), node.weight.get_value()))
        settings = {(q.blocksize, q.double_quant) for q in nf4.values()}
        if len(settings) > 1:
            raise ValueError(f"mixed NF4 settings {settings} cannot be described by one quantization_config")
    for prefix, q in nf4.items():  # written as stored, never dequantized
        tensors.update(nf4_to_state_dict(prefix, q))
    for name, a in merged_tensors(model, skip_weights=nf4):
        tensors[name] = np.asarray(jax.device_get(a.astype(dtype)))
    atomic_save_safetensors(folder / "model.safetensors", tensors, metadata={"format": "pt"})
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = cfg["dtype"] = jnp.dtype(dtype).name
    if nf4:
        cfg["quantization_config"] = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": settings.pop()[1],
            "bnb_4bit_compute_dtype": jnp.dtype(dtype).name, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False}
    atomic_write_json(folder / "config.json", cfg)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
