"""Read a Hugging Face model folder: ``config.json`` and (sharded) safetensors weights.

Layout (transformers ``save_pretrained``): ``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` listed in ``model.safetensors.index.json``
(``{"weight_map": {tensor_name: shard_file}}``).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Iterator

from safetensors import safe_open

from jaxqlora.errors import CheckpointError


def safetensors_files(folder: str | Path) -> list[Path]:
    """The weight files of an HF folder, in shard order.

    Raises:
      CheckpointError: neither ``model.safetensors`` nor a readable index is present, or
        the index names a shard that is missing.
    """
    folder = Path(folder)
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(index, f"unreadable shard index ({e})", "weight_map") from e
        files = [folder / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f, "shard named in model.safetensors.index.json is missing")
        return files
    raise CheckpointError(folder, "no model.safetensors or model.safetensors.index.json in the folder")


#: bytes per element of the safetensors dtypes (sub-byte and unknown dtypes are left to ``safe_open``).
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "I16": 2,
               "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
#: the safetensors library refuses headers above 100 MB (``MAX_HEADER_SIZE``).
MAX_HEADER_BYTES = 100_000_000


def check_safetensors_header(path: str | Path) -> dict:
    """Validate a safetensors file's header against the file's size before anything is allocated.

    Layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (``{name: {"dtype",
    "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the data. The length is
    checked against the file size (and safetensors' 100 MB limit) before the header is read, then every
    tensor's dtype, shape and offsets against each other and the data's size.

    Returns:
      The parsed header (a dict).

    Raises:
      CheckpointError: a file shorter than 8 bytes, a header length beyond the file, a header that
        is not a JSON object, or a tensor whose shape, dtype or offsets disagree or point beyond the
        end of the file (truncation); names the file and the tensor (or ``"header"``).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = path.stat().st_size
            if size < 8:
                raise CheckpointError(path, f"the file has {size} bytes, fewer than the 8-byte header length "
                                      "(truncated or not safetensors)", "header")
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise CheckpointError(path, f"header length {n} exceeds the {size - 8} bytes after it"
                                      + (f" (and safetensors' limit of {MAX_HEADER_BYTES})" if n > MAX_HEADER_BYTES
                                         else "") + " (truncated or not safetensors)", "header")
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(path, f"cannot read the file ({e.strerror or e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(path, f"header is not UTF-8 JSON ({e})", "header") from e
    if not isinstance(header, dict):
        raise CheckpointError(path, f"header is a JSON {type(header).__name__}, not an object", "header")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise CheckpointError(path, "header entry is not an object", name)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise CheckpointError(path, f"dtype {dtype!r} is not a string", name)
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise CheckpointError(path, f"shape {shape!r} is not a list of non-negative integers", name)
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(path, f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end", name)
        if offsets[1] > data_size:
            raise CheckpointError(path, f"data ends at byte {offsets[1]} of the data section but it has {data_size} "
                                  "bytes (truncated)", name)
        if dtype in DTYPE_SIZES and (offsets[1] - offsets[0]) != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise CheckpointError(path, f"{dtype} {tuple(shape)} needs {math.prod(shape) * DTYPE_SIZES[dtype]} bytes "
                                  f"but data_offsets {offsets} span {offsets[1] - offsets[0]}", name)
    return header


def _open(f: Path, framework: str):
    check_safetensors_header(f)
    try:
        return safe_open(str(f), framework=framework)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f, f"not a readable safetensors file ({e})") from e


def iter_safetensors(files: list[Path], skip: set[str] = frozenset()) -> Iterator[tuple[str, object]]:
    """Yield ``(name, array)`` for every tensor of ``files`` not in ``skip``, one at a time (JAX arrays).

    Raises:
      CheckpointError: a file is truncated or not safetensors (its header is checked first by
        `check_safetensors_header`: nothing is allocated from an unchecked length).
    """
    for f in files:
        with _open(f, "flax") as handle:
            for name in handle.keys():
                if name in skip:
                    continue
                try:
                    yield name, handle.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f, f"cannot read tensor ({e})", name) from e


NF4_SUFFIXES = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map",
                ".weight.quant_state.bitsandbytes__nf4")


def read_nf4_layers(files: list[Path]) -> tuple[dict, set[str]]:
    """The bitsandbytes 4-bit (NF4) layers of a transformers checkpoint.

    Returns ``({prefix: NF4Weight}, {keys consumed})``; empty for an unquantized checkpoint.

    Raises:
      CheckpointError: fp4 or malformed quantization state (from `jaxqlora.nf4.nf4_from_state_dict`).
    """
    from jaxqlora.nf4 import nf4_from_state_dict

    layers, used = {}, set()
    for f in files:
        with _open(f, "numpy") as handle:
            keys = list(handle.keys())
            prefixes = [k[: -len(".weight.absmax")] for k in keys if k.endswith(".weight.absmax")]
            for prefix in prefixes:
                mine = [k for k in keys if k == f"{prefix}.weight" or any(k == prefix + s for s in NF4_SUFFIXES)]
                layers[prefix] = nf4_from_state_dict(prefix, {k: handle.get_tensor(k) for k in mine}, source=str(f))
                used.update(mine)
    return layers, used
