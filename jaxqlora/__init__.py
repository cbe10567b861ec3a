"""jaxqlora: QLoRA fine-tuning and 4-bit inference of Llama/Qwen decoders in JAX.

The data path: checkpoint (`jaxqlora.io`) -> `jaxqlora.model.CausalLM` -> NF4
(`jaxqlora.quantize`) -> LoRA (`jaxqlora.lora`) -> train step (`jaxqlora.train`) ->
adapter files (`jaxqlora.io.peft`); and model -> text (`jaxqlora.generate`). Shape
buckets, ahead-of-time compilation and the on-disk compile cache: `jaxqlora.compile`.

Importing jaxqlora turns on JAX's persistent compilation cache in a per-user folder
(`jaxqlora.compile.enable_compile_cache`; ``JAXQLORA_COMPILE_CACHE=0`` turns it off, a
path moves it).
"""

from jaxqlora.compile import BucketError, enable_compile_cache
from jaxqlora.config import ModelConfig
from jaxqlora.errors import (CheckpointError, ContextLengthError, EmbeddedModelMissingError, JaxQLoRAError,
                             MissingTensorError, TensorShapeError, UnexpectedTensorError,
                             UnsupportedArchitectureError, UnsupportedTensorTypeError)
from jaxqlora.generate import SamplingConfig, generate, stream
from jaxqlora.io import load_config, load_pretrained
from jaxqlora.io.export import merge_lora, save_pretrained
from jaxqlora.io.peft import load_adapter, save_adapter
from jaxqlora.lora import apply_lora
from jaxqlora.model import CausalLM, KVCache
from jaxqlora.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from jaxqlora.quantize import quantize_model

__version__ = "0.1.0"

enable_compile_cache()  # before anything is compiled (importing compiles nothing)

__all__ = [
    "BucketError", "CausalLM", "CheckpointError", "ContextLengthError", "EmbeddedModelMissingError", "JaxQLoRAError",
    "KVCache", "MissingTensorError", "ModelConfig", "NF4Weight", "SamplingConfig", "TensorShapeError",
    "UnexpectedTensorError", "UnsupportedArchitectureError", "UnsupportedTensorTypeError", "apply_lora",
    "dequantize_nf4", "enable_compile_cache", "generate", "load_adapter", "load_config", "load_pretrained", "merge_lora", "quantize_model", "quantize_nf4",
    "save_adapter", "save_pretrained", "stream",
]
