"""Read GGUF checkpoints (llama.cpp) into our config and HF-named tensors.

Tensors are dequantized one at a time with the ``gguf`` package
(``gguf.quants.dequantize``), renamed to transformers' keys, and the row permutation
that llama.cpp's converter applies to ``attn_q`` / ``attn_k`` of the ``llama``
architecture is undone (``convert_hf_to_gguf.py``, ``LlamaModel.permute``).

Source: the GGUF spec (ggml ``docs/gguf.md``) and llama.cpp ``gguf-py``.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import re
import struct
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jaxqlora.config import ARCHITECTURES, ModelConfig
from jaxqlora.stacked import split_layer_key
from jaxqlora.errors import (CheckpointError, ConfigError, TensorShapeError, UnsupportedArchitectureError,
                             UnsupportedTensorTypeError)

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
"""Tensor types read (dequantized with ``gguf.quants``); `jaxqlora.ggml.GGUF_FORMATS` lists
those that ``keep_quantized`` keeps in their block format (the others are dequantized)."""

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


# --- header validation ---------------------------------------------------------------------------------------
# The GGUF layout (ggml docs/gguf.md): magic "GGUF", version u32, tensor_count u64, kv_count u64, then kv_count
# metadata pairs (key: string; value type: u32; value), then tensor_count tensor infos (name: string; n_dims: u32;
# dims: n_dims x u64; ggml type: u32; offset: u64), padding to general.alignment, then the tensor data. A string is
# a u64 length and that many bytes; an array is an element type (u32), a u64 length and the elements.
# gguf.GGUFReader trusts every count and length it reads: an array length of 10^12 makes it loop (and allocate) for
# each element, so `check_gguf_header` walks the same layout first with every count bounded by the bytes left.

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4  # ggml.h
_MAX_ARRAY_DEPTH = 8
#: GGUF metadata value types (GGUFValueType) -> size in bytes of a scalar (None: string 8, array 9).
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 8: None, 9: None, 10: 8, 11: 8, 12: 8}
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset


class _HeaderScanner:
    """Bounds-checked reads of a GGUF header from a read-only buffer (every read names its field)."""

    def __init__(self, path: Path, buf, order: str):
        self.path, self.buf, self.order, self.size = path, buf, order, len(buf)

    def fail(self, field: str, message: str):
        raise CheckpointError(self.path, message, field)

    def need(self, offs: int, n: int, field: str, what: str) -> None:
        if n < 0 or offs + n > self.size:
            self.fail(field, f"{what} at byte {offs} needs {n} bytes but the file ends at byte {self.size} "
                             "(truncated or damaged)")

    def uint(self, offs: int, fmt: str, field: str, what: str) -> tuple[int, int]:
        n = struct.calcsize(fmt)
        self.need(offs, n, field, what)
        return struct.unpack_from(self.order + fmt, self.buf, offs)[0], offs + n

    def string(self, offs: int, field: str, what: str, decode: bool = False) -> tuple[str | None, int]:
        length, offs = self.uint(offs, "Q", field, f"length of {what}")
        if length > self.size - offs:
            self.fail(field, f"{what} claims {length} bytes but only {self.size - offs} are left in the file")
        text = None
        if decode:
            try:
                text = bytes(self.buf[offs:offs + length]).decode("utf-8")
            except UnicodeDecodeError as e:
                self.fail(field, f"{what} is not UTF-8 ({e})")
        return text, offs + length

    def value(self, offs: int, vtype: int, field: str, depth: int = 0) -> tuple[Any, int]:
        """Skip one value of type ``vtype``; returns (its value when it is a scalar int or a string, new offs)."""
        if vtype not in _VALUE_SIZES:
            self.fail(field, f"unknown metadata value type {vtype} (known: 0-12)")
        size = _VALUE_SIZES[vtype]
        if size is not None:
            self.need(offs, size, field, "value")
            fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}[vtype]
            return struct.unpack_from(self.order + fmt, self.buf, offs)[0], offs + size
        if vtype == 8:
            return self.string(offs, field, "string value", decode=False)
        if depth >= _MAX_ARRAY_DEPTH:
            self.fail(field, f"arrays nested deeper than {_MAX_ARRAY_DEPTH}")
        etype, offs = self.uint(offs, "I", field, "array element type")
        if etype not in _VALUE_SIZES:
            self.fail(field, f"unknown array element type {etype} (known: 0-12)")
        count, offs = self.uint(offs, "Q", field, "array length")
        esize = _VALUE_SIZES[etype]
        least = esize if esize is not None else (8 if etype == 8 else 12)
        if count > (self.size - offs) // least:
            self.fail(field, f"array length {count} needs at least {count * least} bytes but only "
                             f"{self.size - offs} are left in the file")
        if esize is not None:
            return None, offs + count * esize
        for _ in range(count):
            _, offs = self.value(offs, etype, field, depth + 1)
        return None, offs


def check_gguf_header(path: str | Path, tensor_types: dict | None = None) -> str:
    """Validate a GGUF file's header, metadata and tensor table without trusting any count in it.

    Every count and length (tensor count, metadata count, string and array lengths, tensor
    dimensions, data offsets) is checked against the bytes actually in the file before anything
    is read or allocated, so a damaged or hostile file is refused in time proportional to its
    size. `GGUFCheckpoint` and `jaxqlora.tokenizer.Tokenizer.from_gguf` call it before
    ``gguf.GGUFReader``.

    Args:
      path: the file.
      tensor_types: optional dict, filled with ``{tensor name: GGML type name}`` (e.g.
        ``"Q4_1"``) from the tensor table (`gguf_tensor_types`).

    Returns:
      A digest (BLAKE2b, hex) of the header bytes: magic, metadata and tensor table, up to the
      aligned start of the tensor data (what ``gguf.GGUFReader`` parses; `open_gguf` keys its
      readers by it).

    Raises:
      CheckpointError: no such file, not GGUF (magic), an unsupported version, a truncated
        file, a count or length larger than the file, an unknown value or tensor type, a key
        or tensor name that is not UTF-8 or appears twice, a bad ``general.alignment``, or a
        tensor whose data lies outside the file. ``path`` is the file and ``name`` the field
        (``GGUF.magic``, ``GGUF.version``, ``GGUF.tensor_count``, ``GGUF.kv_count``, the
        metadata key, or the tensor name).
    """
    import gguf

    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise CheckpointError(path, f"cannot open the file ({e.strerror or e})") from e
    with fh:
        size = path.stat().st_size
        if size < 4 or fh.read(4) != GGUF_MAGIC:
            raise CheckpointError(path, "not a GGUF file (the first 4 bytes are not 'GGUF')", "GGUF.magic")
        if size < 24:
            raise CheckpointError(path, f"the file has {size} bytes, fewer than the 24-byte GGUF header (truncated)",
                                  "GGUF.version")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            version = struct.unpack_from("<I", buf, 4)[0]
            order = "<"
            if version & 0xFFFF == 0:  # written on a host of the other byte order (as GGUFReader guesses)
                order, version = ">", struct.unpack_from(">I", buf, 4)[0]
            if version not in GGUF_VERSIONS:
                raise CheckpointError(path, f"GGUF version {version} is not supported ({GGUF_VERSIONS})",
                                      "GGUF.version")
            scan = _HeaderScanner(path, buf, order)
            n_tensors, offs = scan.uint(8, "Q", "GGUF.tensor_count", "tensor count")
            n_kv, offs = scan.uint(offs, "Q", "GGUF.kv_count", "metadata count")
            if n_kv > (size - offs) // _MIN_KV_BYTES:
                scan.fail("GGUF.kv_count", f"{n_kv} metadata fields cannot fit in the {size - offs} bytes left "
                                           f"(each takes at least {_MIN_KV_BYTES})")
            if n_tensors > (size - offs) // _MIN_TENSOR_INFO_BYTES:
                scan.fail("GGUF.tensor_count", f"{n_tensors} tensors cannot fit in the {size - offs} bytes left "
                                               f"(each tensor info takes at least {_MIN_TENSOR_INFO_BYTES})")
            keys: set[str] = set()
            alignment = 32  # GGUF_DEFAULT_ALIGNMENT
            for i in range(n_kv):
                key, offs = scan.string(offs, f"GGUF.kv[{i}]", "metadata key", decode=True)
                if key in keys:
                    scan.fail(key, "metadata key appears twice")
                keys.add(key)
                vtype, offs = scan.uint(offs, "I", key, "value type")
                value, offs = scan.value(offs, vtype, key)
                if key == "general.alignment":
                    if vtype != 4 or not value or value & (value - 1):
                        scan.fail(key, f"alignment must be a power of two stored as uint32, got {value!r} "
                                       f"(type {vtype})")
                    alignment = value
            infos = []
            names: set[str] = set()
            for i in range(n_tensors):
                name, offs = scan.string(offs, f"tensor[{i}]", "tensor name", decode=True)
                if name in names:
                    scan.fail(name, "tensor name appears twice")
                names.add(name)
                n_dims, offs = scan.uint(offs, "I", name, "dimension count")
                if n_dims > GGML_MAX_DIMS:
                    scan.fail(name, f"{n_dims} dimensions (at most {GGML_MAX_DIMS})")
                scan.need(offs, 8 * n_dims, name, "dimensions")
                dims = struct.unpack_from(f"{order}{n_dims}Q", buf, offs)
                offs += 8 * n_dims
                raw_type, offs = scan.uint(offs, "I", name, "tensor type")
                data_offs, offs = scan.uint(offs, "Q", name, "data offset")
                try:
                    ggml_type = gguf.GGMLQuantizationType(raw_type)
                    block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
                except (ValueError, KeyError):
                    scan.fail(name, f"unknown tensor type {raw_type}")
                n_elems = int(np.prod(dims, dtype=object)) if dims else 1
                if dims and dims[0] % block:
                    scan.fail(name, f"first dimension {dims[0]} is not a multiple of the {ggml_type.name} block "
                                    f"size {block}")
                infos.append((name, data_offs, n_elems * type_size // block))
                if tensor_types is not None:
                    tensor_types[name] = ggml_type.name
            data_start = offs + (-offs) % alignment
            for name, data_offs, n_bytes in infos:
                end = data_start + data_offs + n_bytes
                if end > size:
                    scan.fail(name, f"tensor data ends at byte {end} but the file has {size} bytes "
                                    "(truncated, or a damaged offset or shape)")
            # A tensor's type and shape fix its byte size; its data must end before the next tensor's begins.
            ordered = sorted(infos, key=lambda i: i[1])
            for (name, data_offs, n_bytes), (other, next_offs, _) in zip(ordered, ordered[1:]):
                if data_offs + n_bytes > next_offs:
                    scan.fail(name, f"type and shape need {n_bytes} bytes of data but only {next_offs - data_offs} "
                                    f"lie before the next tensor ({other!r}): the stored size disagrees with the "
                                    "type and shape")
            return hashlib.blake2b(buf[:data_start], digest_size=16).hexdigest()


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """``{tensor name: GGML type name}`` of a GGUF file, from its validated tensor table
    (`check_gguf_header`: about 0.1 s, no metadata arrays parsed into Python objects).

    Raises:
      CheckpointError: as `check_gguf_header`.
    """
    types: dict[str, str] = {}
    check_gguf_header(path, types)
    return types


def open_gguf(path: str | Path):
    """``gguf.GGUFReader`` of a file that passed `check_gguf_header`; any failure of the reader
    becomes a `CheckpointError` naming the file.

    Readers are kept per process (`READER_CACHE_SIZE` of them, least recently used first out),
    keyed by the resolved path, size, inode and a digest of the header (`check_gguf_header`):
    ``gguf.GGUFReader`` parses every element of every metadata array into Python objects
    (about 3 s for the embedded SmolLM2 file's 49,152-token vocabulary and merges on a 2-core
    CPU), and one load opens a file for its tokenizer and again for its weights. The reader
    maps the file read-only, so a shared one cannot be written through; a file replaced (new
    inode), resized or with another header gets a new reader, and tensor bytes rewritten in
    place are read through the shared mapping. The header is checked (and hashed) on every call.

    Raises:
      CheckpointError: see `check_gguf_header`; also a missing file (``"file not found"``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    digest = check_gguf_header(path)
    st = path.stat()
    try:
        return _cached_reader(str(path.resolve()), st.st_size, st.st_ino, digest)
    except Exception as e:  # gguf raises ValueError/IndexError/KeyError/... on damaged files
        raise CheckpointError(path, f"not a readable GGUF file, or truncated ({type(e).__name__}: {e})") from e


#: How many ``gguf.GGUFReader`` objects `open_gguf` keeps (each maps its file; no tensor data
#: is read until used).
READER_CACHE_SIZE = 4


@functools.lru_cache(maxsize=READER_CACHE_SIZE)
def _cached_reader(path: str, size: int, inode: int, header_digest: str):
    """``gguf.GGUFReader(path)``, once per (path, size, inode, header digest); see `open_gguf`."""
    import gguf

    return gguf.GGUFReader(path)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row permutation of a q or k weight ``[n_head*head_dim, in]``."""
    out, *rest = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """An open GGUF file: metadata, config and lazily dequantized tensors.

    Args:
      path: the ``.gguf`` file.

    Raises:
      CheckpointError: the file is missing, truncated or not GGUF, its header is damaged (see
        `check_gguf_header`), or a field is missing or unreadable; names the file and the field.
      ConfigError (a CheckpointError): a size field that is not a positive integer, or
        inconsistent head counts; ``name`` is the GGUF key.
      UnsupportedArchitectureError: ``general.architecture`` is not llama, qwen2 or qwen3.
      UnsupportedTensorTypeError: a tensor type outside `SUPPORTED_TYPES` (checked for all
        tensors before any is read).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        self.arch = self.field("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise UnsupportedArchitectureError(self.path, f"architecture {self.arch!r} is not one of {ARCHITECTURES}",
                                               "general.architecture")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.check_types()
        self.config = self._config()

    def field(self, key: str, default: Any = ...) -> Any:
        """A metadata value (str, number or list); raises CheckpointError if absent and no default,
        or if the stored value cannot be decoded (e.g. a string that is not UTF-8)."""
        f = self.reader.fields.get(key)
        if f is None:
            if default is ...:
                raise CheckpointError(self.path, "metadata field is missing", key)
            return default
        try:
            return f.contents()
        except Exception as e:  # UnicodeDecodeError, IndexError on a damaged field
            raise CheckpointError(self.path, f"unreadable metadata field ({type(e).__name__}: {e})", key) from e

    def int_field(self, key: str, default: Any = ...) -> int:
        """An integer metadata value (a positive size or count); raises ConfigError naming the key
        if it is not a positive integer."""
        value = self.field(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.path, f"expected an integer, got {value!r} ({type(value).__name__})", key)
        if value < 1:
            raise ConfigError(self.path, f"must be a positive integer, got {value}", key)
        return value

    def float_field(self, key: str, default: Any = ...) -> float:
        """A real-valued metadata value; raises ConfigError naming the key if it is not a number."""
        value = self.field(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(self.path, f"expected a number, got {value!r} ({type(value).__name__})", key)
        return float(value)

    def _config(self) -> ModelConfig:
        a = self.arch
        heads = self.int_field(f"{a}.attention.head_count")
        hidden = self.int_field(f"{a}.embedding_length")
        embd = self.tensors.get("token_embd.weight")
        if embd is None:
            raise CheckpointError(self.path, "tensor is missing", "token_embd.weight")
        if len(embd.shape) != 2:
            raise CheckpointError(self.path, f"expected 2 dimensions, got shape {tuple(int(d) for d in embd.shape)}",
                                  "token_embd.weight")
        vocab = self.int_field(f"{a}.vocab_size", None) if f"{a}.vocab_size" in self.reader.fields \
            else int(embd.shape[-1])
        if f"{a}.attention.key_length" in self.reader.fields:
            head_dim = self.int_field(f"{a}.attention.key_length")
        elif hidden % heads:
            raise ConfigError(self.path, f"embedding_length={hidden} is not a multiple of head_count={heads} and "
                              "attention.key_length is not given", f"{a}.embedding_length")
        else:
            head_dim = hidden // heads
        factors = None
        if "rope_freqs.weight" in self.tensors:
            try:
                factors = tuple(float(x) for x in np.asarray(self.tensors["rope_freqs.weight"].data, np.float32).ravel())
            except (TypeError, ValueError) as e:
                raise CheckpointError(self.path, f"unreadable RoPE frequency factors ({e})", "rope_freqs.weight") from e
        fields = {"vocab_size": f"{a}.vocab_size", "hidden_size": f"{a}.embedding_length",
                  "intermediate_size": f"{a}.feed_forward_length", "num_hidden_layers": f"{a}.block_count",
                  "num_attention_heads": f"{a}.attention.head_count",
                  "num_key_value_heads": f"{a}.attention.head_count_kv", "head_dim": f"{a}.attention.key_length",
                  "rms_norm_eps": f"{a}.attention.layer_norm_rms_epsilon", "rope_theta": f"{a}.rope.freq_base",
                  "max_position_embeddings": f"{a}.context_length", "rope_freq_factors": "rope_freqs.weight"}
        try:
            return ModelConfig(
                arch=a,
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=self.int_field(f"{a}.feed_forward_length"),
                num_hidden_layers=self.int_field(f"{a}.block_count"),
                num_attention_heads=heads,
                num_key_value_heads=self.int_field(f"{a}.attention.head_count_kv", heads),
                head_dim=head_dim,
                rms_norm_eps=self.float_field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
                rope_theta=self.float_field(f"{a}.rope.freq_base", 10000.0),
                rope_freq_factors=factors,
                max_position_embeddings=self.int_field(f"{a}.context_length", 2048),
                tie_word_embeddings="output.weight" not in self.tensors,
                attention_bias="blk.0.attn_q.bias" in self.tensors,
                qk_norm=a == "qwen3",
            )
        except ConfigError as e:  # from ModelConfig.validate: name the file and the GGUF key
            raise ConfigError(self.path, e.message, fields.get(e.name, e.name)) from None

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
            if len(shape) != 2 or shape[0] != n * self.config.head_dim:
                raise TensorShapeError(self.path, f"shape {shape} does not have {n} heads x head_dim "
                                       f"{self.config.head_dim} = {n * self.config.head_dim} rows", name)
            w = unpermute_qk(w, n)
        return w

    def read_blocks(self, name: str):
        """One tensor kept in its GGUF block format: a one-layer `jaxqlora.ggml.GGUFWeight`
        (host planes, the stored bytes split by field) in HF layout ``[out, in]``
        (llama.cpp's q/k row permutation undone on whole rows of blocks: exact).

        Raises:
          CheckpointError: the type is not kept quantized (`jaxqlora.ggml.GGUF_FORMATS`),
            the tensor is not 2-D, or its data is not exactly the bytes its type and shape
            need (``out * in / block * type_size``); names the file and tensor.
        """
        from jaxqlora.ggml import GGUF_FORMATS, from_blocks

        t = self.tensors[name]
        qtype = t.tensor_type.name
        if qtype not in GGUF_FORMATS:
            raise CheckpointError(self.path, f"tensor type {qtype} is not kept quantized "
                                  f"({', '.join(GGUF_FORMATS)})", name)
        shape = tuple(int(d) for d in reversed(t.shape))
        if len(shape) != 2:
            raise TensorShapeError(self.path, f"a quantized weight must be 2-D, got shape {shape}", name)
        try:
            raw = np.asarray(t.data)
            w = from_blocks(raw, qtype, shape)
        except ValueError as e:
            raise CheckpointError(self.path, f"tensor data disagrees with its type and shape ({e})", name) from e
        if self.arch == "llama" and name.startswith("blk.") and name.endswith(("attn_q.weight", "attn_k.weight")):
            n = self.config.num_attention_heads if "attn_q" in name else self.config.num_key_value_heads
            if shape[0] != n * self.config.head_dim:
                raise TensorShapeError(self.path, f"shape {shape} does not have {n} heads x head_dim "
                                       f"{self.config.head_dim} = {n * self.config.head_dim} rows", name)
            w = w.replace(planes={k: unpermute_qk(v, n) for k, v in w.planes.items()})
        return w

    def quantized_weights(self, embeddings: bool = True) -> tuple[dict, list[str]]:
        """The weights to keep in their GGUF formats, and those that fall back.

        The seven projections of every layer, ``output.weight`` and (with ``embeddings``)
        ``token_embd.weight`` are kept when stored in a type of `jaxqlora.ggml.GGUF_FORMATS`;
        a projection is kept only if all its layers are, in formats of one block size
        (Q4_K with Q6_K, not Q8_0 with Q4_K), so that its layers stack.

        Returns:
          ``({hf prefix: GGUFWeight}, [GGUF names of weights that will be dequantized on
          load instead])``; the fallback list has only quantizable weights in other
          types (F16, BF16, F32 projections, mixed block sizes).

        Raises:
          CheckpointError: see `read_blocks`.
        """
        from jaxqlora.ggml import GGUF_FORMATS, family_ok

        candidates: dict[str, list[str]] = {}
        for name in self.tensors:
            target = hf_name(name)
            if target is None or not target.endswith(".weight"):
                continue
            prefix = target.removesuffix(".weight")
            if name in ("output.weight",) or (embeddings and name == "token_embd.weight"):
                candidates[prefix] = [name]
            elif name.startswith("blk.") and name.split(".")[2] in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                   "ffn_gate", "ffn_up", "ffn_down"):
                stacked, _ = split_layer_key(prefix)
                candidates.setdefault(stacked, []).append(name)
        kept, fallback = {}, []
        for prefix, names in candidates.items():
            types = [self.tensors[n].tensor_type.name for n in names]
            if all(q in GGUF_FORMATS for q in types) and family_ok(types):
                for n in names:
                    kept[hf_name(n).removesuffix(".weight")] = self.read_blocks(n)
            else:
                fallback.extend(names)
        return kept, sorted(fallback)

    def iter_hf_tensors(self, skip: set[str] | frozenset = frozenset()) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(hf_name, float32 array)`` for every model tensor, one at a time,
        except those whose HF name is in ``skip`` (weights kept quantized).

        Raises:
          CheckpointError: a tensor name that maps to no model parameter.
        """
        for name in self.tensors:
            if name == "rope_freqs.weight" or hf_name(name) in skip:
                continue
            target = hf_name(name)
            if target is None:
                raise CheckpointError(self.path, "tensor name is not a known llama/qwen tensor", name)
            yield target, self.read(name)
