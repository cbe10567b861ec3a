"""jaxqlora: QLoRA fine-tuning and 4-bit inference of Llama/Qwen decoders in JAX.

The data path: checkpoint (`jaxqlora.io`) -> `jaxqlora.model.CausalLM` -> text
(`jaxqlora.generate`).
"""

from jaxqlora.config import ModelConfig
from jaxqlora.errors import (CheckpointError, ContextLengthError, EmbeddedModelMissingError, JaxQLoRAError,
                             MissingTensorError, TensorShapeError, UnexpectedTensorError,
                             UnsupportedArchitectureError, UnsupportedTensorTypeError)
from jaxqlora.generate import SamplingConfig, generate, stream
from jaxqlora.io import load_config, load_pretrained
from jaxqlora.model import CausalLM, KVCache

__version__ = "0.1.0"

__all__ = [
    "CausalLM", "CheckpointError", "ContextLengthError", "EmbeddedModelMissingError", "JaxQLoRAError", "KVCache",
    "MissingTensorError", "ModelConfig", "SamplingConfig", "TensorShapeError", "UnexpectedTensorError",
    "UnsupportedArchitectureError", "UnsupportedTensorTypeError", "generate", "load_config", "load_pretrained",
    "stream",
]
