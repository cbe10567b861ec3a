"""Checkpoint I/O: HF safetensors folders, GGUF files, the embedded model."""

from jaxqlora.io.pretrained import load_config, load_pretrained, load_tokenizer

__all__ = ["load_pretrained", "load_config", "load_tokenizer"]
