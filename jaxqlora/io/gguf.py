"""Read GGUF checkpoints (llama.cpp) into our config and HF-named tensors.

Tensors are dequantized one at a time with the ``gguf`` package
(``gguf.quants.dequantize``), renamed to transformers' keys, and the row permutation
that llama.cpp's converter applies to ``attn_q`` / ``attn_k`` of the ``llama``
architecture is undone (``convert_hf_to_gguf.py``, ``LlamaModel.permute``).

Source: the GGUF spec (ggml ``docs/gguf.md``) and llama.cpp ``gguf-py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jaxqlora.config import ARCHITECTURES, ModelConfig
from jaxqlora.errors import CheckpointError, UnsupportedArchitectureError, UnsupportedTensorTypeError

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str | None:
    """transformers key for a GGUF tensor name (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``); None if unknown."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row permutation of a q or k weight ``[n_head*head_dim, in]``."""
    out, *rest = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """An open GGUF file: metadata, config and lazily dequantized tensors.

    Args:
      path: the ``.gguf`` file.

    Raises:
      CheckpointError: the file is missing, truncated or not GGUF, or a field is missing.
      UnsupportedArchitectureError: ``general.architecture`` is not llama, qwen2 or qwen3.
      UnsupportedTensorTypeError: a tensor type outside `SUPPORTED_TYPES` (checked for all
        tensors before any is read).
    """

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(self.path, "file not found")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # gguf raises ValueError/IndexError/... on damaged files
            raise CheckpointError(self.path, f"not a readable GGUF file, or truncated ({type(e).__name__}: {e})") from e
        self.arch = self.field("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise UnsupportedArchitectureError(self.path, f"architecture {self.arch!r} is not one of {ARCHITECTURES}",
                                               "general.architecture")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.check_types()
        self.config = self._config()

    def field(self, key: str, default: Any = ...) -> Any:
        """A metadata value (str, number or list); raises CheckpointError if absent and no default."""
        f = self.reader.fields.get(key)
        if f is None:
            if default is ...:
                raise CheckpointError(self.path, "metadata field is missing", key)
            return default
        return f.contents()

    def _config(self) -> ModelConfig:
        a = self.arch
        heads = int(self.field(f"{a}.attention.head_count"))
        hidden = int(self.field(f"{a}.embedding_length"))
        embd = self.tensors.get("token_embd.weight")
        if embd is None:
            raise CheckpointError(self.path, "tensor is missing", "token_embd.weight")
        vocab = self.field(f"{a}.vocab_size", None) or int(embd.shape[-1])
        factors = None
        if "rope_freqs.weight" in self.tensors:
            factors = tuple(float(x) for x in np.asarray(self.tensors["rope_freqs.weight"].data, np.float32).ravel())
        return ModelConfig(
            arch=a,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self.field(f"{a}.feed_forward_length")),
            num_hidden_layers=int(self.field(f"{a}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(self.field(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(self.field(f"{a}.attention.key_length", hidden // heads)),
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            rope_freq_factors=factors,
            max_position_embeddings=int(self.field(f"{a}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in self.tensors,
            attention_bias="blk.0.attn_q.bias" in self.tensors,
            qk_norm=a == "qwen3",
        )

    def check_types(self) -> None:
        """Raise UnsupportedTensorTypeError (naming file, tensor and type) before any loading."""
        for name, t in self.tensors.items():
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise UnsupportedTensorTypeError(
                    self.path, f"tensor type {t.tensor_type.name} is not supported ({', '.join(SUPPORTED_TYPES)})", name)

    def read(self, name: str) -> np.ndarray:
        """One tensor, dequantized to float32 in HF layout ``[out, in]`` (q/k un-permuted)."""
        import gguf

        t = self.tensors[name]
        try:
            if t.tensor_type.name in ("F32", "F16"):
                w = np.asarray(t.data, np.float32)
            else:
                w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except Exception as e:
            raise CheckpointError(self.path, f"cannot read tensor data ({type(e).__name__}: {e})", name) from e
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml ne is innermost-first
        if w.size != int(np.prod(shape)):
            raise CheckpointError(self.path, f"tensor data has {w.size} values, shape {shape} needs {np.prod(shape)}", name)
        w = w.reshape(shape)
        if self.arch == "llama" and name.startswith("blk.") and name.endswith(("attn_q.weight", "attn_k.weight")):
            n = self.config.num_attention_heads if "attn_q" in name else self.config.num_key_value_heads
            w = unpermute_qk(w, n)
        return w

    def iter_hf_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(hf_name, float32 array)`` for every model tensor, one at a time.

        Raises:
          CheckpointError: a tensor name that maps to no model parameter.
        """
        for name in self.tensors:
            if name == "rope_freqs.weight":
                continue
            target = hf_name(name)
            if target is None:
                raise CheckpointError(self.path, "tensor name is not a known llama/qwen tensor", name)
            yield target, self.read(name)
