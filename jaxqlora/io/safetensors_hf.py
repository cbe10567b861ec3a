"""Read a Hugging Face model folder: ``config.json`` and (sharded) safetensors weights.

Layout (transformers ``save_pretrained``): ``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` listed in ``model.safetensors.index.json``
(``{"weight_map": {tensor_name: shard_file}}``).
"""

from __future__ import annotations

import json
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


def _open(f: Path, framework: str):
    try:
        return safe_open(str(f), framework=framework)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f, f"not a readable safetensors file ({e})") from e


def iter_safetensors(files: list[Path], skip: set[str] = frozenset()) -> Iterator[tuple[str, object]]:
    """Yield ``(name, array)`` for every tensor of ``files`` not in ``skip``, one at a time (JAX arrays).

    Raises:
      CheckpointError: a file is truncated or not safetensors.
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
