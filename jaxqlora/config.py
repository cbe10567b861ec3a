"""One model configuration for the Llama / Qwen2 / Qwen3 decoder family.

`ModelConfig` is filled from a Hugging Face ``config.json`` (`ModelConfig.from_hf`)
or from GGUF metadata (built by `jaxqlora.io.gguf.GGUFCheckpoint`).
Field names follow transformers' `LlamaConfig` / `Qwen2Config` / `Qwen3Config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any, Mapping

from jaxqlora.errors import CheckpointError, ConfigError, UnsupportedArchitectureError

ARCHITECTURES = ("llama", "qwen2", "qwen3")
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 RoPE frequency scaling (transformers' ``rope_type: "llama3"``).

    Source: transformers ``modeling_rope_utils._compute_llama3_parameters``.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-style decoder (hashable, usable as a jit static arg).

    Attributes:
      arch: ``"llama"`` (also SmolLM2, Mistral-style without sliding window), ``"qwen2"``
        (bias on q/k/v) or ``"qwen3"`` (per-head RMSNorm of q and k before RoPE).
      vocab_size, hidden_size, intermediate_size, num_hidden_layers: sizes.
      num_attention_heads, num_key_value_heads: query heads and KV heads (GQA when fewer).
      head_dim: per-head size; may differ from hidden_size / num_attention_heads (Qwen3).
      rms_norm_eps: epsilon inside every RMSNorm.
      rope_theta: RoPE base frequency.
      rope_scaling: Llama-3 scaling or None.
      rope_freq_factors: per-frequency divisors of the RoPE inverse frequencies (GGUF
        ``rope_freqs`` tensor, llama.cpp's form of Llama-3 scaling) or None.
      max_position_embeddings: context length in tokens.
      tie_word_embeddings: the LM head reuses ``embed_tokens.weight``.
      attention_bias: q/k/v projections have a bias (Qwen2).
      qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3).
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self, source: str = "<config>") -> None:
        """Check every field's type and range and the head counts' consistency.

        Runs on construction (with ``source="<config>"``); `from_hf` and the GGUF reader name
        the file instead.

        Raises:
          UnsupportedArchitectureError: ``arch`` is not llama, qwen2 or qwen3.
          ConfigError: a size that is not a positive integer, an epsilon or RoPE base that
            is not a positive finite number, or ``num_attention_heads`` not a multiple of
            ``num_key_value_heads``; ``name`` is the field.
        """
        if self.arch not in ARCHITECTURES:
            raise UnsupportedArchitectureError(source, f"architecture {self.arch!r} is not one of {ARCHITECTURES}", "arch")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(source, f"expected a positive integer, got {value!r} ({type(value).__name__})", name)
            if value < 1:
                raise ConfigError(source, f"must be a positive integer, got {value}", name)
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                    or value <= 0):
                raise ConfigError(source, f"must be a positive finite number, got {value!r}", name)
        if self.head_dim % 2:
            raise ConfigError(source, f"head_dim={self.head_dim} is odd; RoPE rotates pairs of dimensions", "head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                source, f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}", "num_key_value_heads")
        if self.rope_freq_factors is not None:
            factors = self.rope_freq_factors
            if len(factors) != self.head_dim // 2:
                raise ConfigError(source, f"{len(factors)} RoPE frequency factors for head_dim {self.head_dim} "
                                  f"(needs head_dim / 2 = {self.head_dim // 2})", "rope_freq_factors")
            if not all(math.isfinite(f) and f > 0 for f in factors):
                raise ConfigError(source, "RoPE frequency factors must be positive finite numbers", "rope_freq_factors")
        if self.rope_scaling is not None:
            for name, value in dataclasses.asdict(self.rope_scaling).items():
                if not (math.isfinite(value) and value > 0):
                    raise ConfigError(source, f"must be a positive finite number, got {value!r}",
                                      f"rope_scaling.{name}")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | Path, source: str | None = None) -> "ModelConfig":
        """Build from a transformers ``config.json`` (a dict, or the file / its folder).

        Reads both the transformers 4.x ``rope_theta``/``rope_scaling`` fields and the 5.x
        ``rope_parameters`` dict.

        Raises:
          CheckpointError: the file is missing or not JSON, or a required field is absent.
          ConfigError (a CheckpointError): a field of the wrong type or out of range (sizes must be
            positive integers), ``num_attention_heads`` not a multiple of ``num_key_value_heads``,
            or ``hidden_size`` not a multiple of ``num_attention_heads`` when ``head_dim`` is not given;
            names the file and the field.
          UnsupportedArchitectureError: ``model_type`` is not llama, qwen2, qwen3 (or mistral
            without sliding window, which is read as llama).
        """
        if not isinstance(config, Mapping):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            source = str(path)
            if not path.is_file():
                raise CheckpointError(path, "config.json not found")
            try:
                config = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(path, f"not a readable JSON file ({e})") from e
        source = source or "<config>"
        if not isinstance(config, Mapping):
            raise ConfigError(source, f"expected a JSON object, got {type(config).__name__}")
        c = dict(config)
        model_type = c.get("model_type")
        if model_type == "mistral" and not c.get("sliding_window"):
            model_type = "llama"
        if model_type not in ARCHITECTURES:
            raise UnsupportedArchitectureError(source, f"model_type {model_type!r} is not one of {ARCHITECTURES}", "model_type")

        def need(key):
            if key not in c or c[key] is None:
                raise CheckpointError(source, "required field is missing", key)
            return c[key]

        def integer(key, value):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(source, f"expected an integer, got {value!r} ({type(value).__name__})", key)
            if value < 1:
                raise ConfigError(source, f"must be a positive integer, got {value}", key)
            return value

        def number(key, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(source, f"expected a finite number, got {value!r} ({type(value).__name__})", key)
            return float(value)

        def boolean(key, value):
            if value in (0, 1) and not isinstance(value, float):
                return bool(value)
            raise ConfigError(source, f"expected true or false, got {value!r}", key)

        def optional(key, default):
            return default if c.get(key) is None else c[key]

        rope_key = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
        rope = c.get(rope_key) or {}
        if not isinstance(rope, Mapping):
            raise ConfigError(source, f"expected a JSON object, got {rope!r}", rope_key)
        rope = dict(rope)
        theta = number("rope_theta", rope.get("rope_theta", optional("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            def rope_field(key):
                if rope.get(key) is None:
                    raise CheckpointError(source, "required field of llama3 RoPE scaling is missing", f"{rope_key}.{key}")
                return rope[key]

            scaling = RopeScaling(
                factor=number(f"{rope_key}.factor", rope_field("factor")),
                low_freq_factor=number(f"{rope_key}.low_freq_factor", rope_field("low_freq_factor")),
                high_freq_factor=number(f"{rope_key}.high_freq_factor", rope_field("high_freq_factor")),
                original_max_position_embeddings=integer(f"{rope_key}.original_max_position_embeddings",
                                                         rope_field("original_max_position_embeddings")))
        elif rope_type not in ("default", None):
            raise CheckpointError(source, f"rope type {rope_type!r} is not supported (default, llama3)", rope_key)
        heads = integer("num_attention_heads", need("num_attention_heads"))
        hidden = integer("hidden_size", need("hidden_size"))
        if c.get("head_dim") is not None:
            head_dim = integer("head_dim", c["head_dim"])
        elif hidden % heads:
            raise ConfigError(source, f"hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                              "and head_dim is not given", "hidden_size")
        else:
            head_dim = hidden // heads
        try:
            return cls(
                arch=model_type,
                vocab_size=integer("vocab_size", need("vocab_size")),
                hidden_size=hidden,
                intermediate_size=integer("intermediate_size", need("intermediate_size")),
                num_hidden_layers=integer("num_hidden_layers", need("num_hidden_layers")),
                num_attention_heads=heads,
                num_key_value_heads=integer("num_key_value_heads", optional("num_key_value_heads", heads)),
                head_dim=head_dim,
                rms_norm_eps=number("rms_norm_eps", optional("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=integer("max_position_embeddings", optional("max_position_embeddings", 2048)),
                tie_word_embeddings=boolean("tie_word_embeddings", optional("tie_word_embeddings", False)),
                attention_bias=boolean("attention_bias", optional("attention_bias", model_type == "qwen2")),
                qk_norm=model_type == "qwen3",
            )
        except ConfigError as e:  # raised by validate(): name the file
            raise ConfigError(source, e.message, e.name) from None

    def to_hf(self) -> dict[str, Any]:
        """The transformers ``config.json`` dict for this config (used by ``save_pretrained``)."""
        names = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
                 "qwen3": ("Qwen3ForCausalLM", "qwen3")}
        arch_name, model_type = names[self.arch]
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(dataclasses.asdict(self.rope_scaling), rope_type="llama3")
        if self.rope_freq_factors is not None:
            raise NotImplementedError("rope_freq_factors from GGUF have no transformers config field")
        out = {
            "architectures": [arch_name], "model_type": model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
        }
        if self.arch != "qwen3":
            out["attention_bias"] = self.attention_bias
        return out

    @property
    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        layer = attn + 3 * h * f + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h
