"""Device memory a run needs, known before its weights are placed.

The estimate comes from XLA's own memory analysis of the compiled steps
(``Compiled.memory_analysis()``: argument, output, aliased and temporary bytes), compiled
from shapes alone (`jaxqlora.compile`), plus the state the run keeps on the device. It is
used by `jaxqlora.finetune` (``dry_run``, and a check before the weights are loaded) and by
``jaxqlora generate`` (`generation_estimate`).

Units: bytes (``int``) everywhere; `format_memory` prints MB / GB (10^6 / 10^9 bytes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxqlora.errors import JaxQLoRAError


class MemoryEstimateError(JaxQLoRAError, MemoryError):
    """The run's estimated device memory exceeds the device's; the message gives both and the
    settings found to fit (``suggestion``; None when none was found or none is searched)."""

    def __init__(self, estimate: dict, capacity: int, suggestion: dict | None, what: str = "run"):
        self.estimate, self.capacity, self.suggestion = estimate, capacity, suggestion
        if suggestion:
            fix = ("; fits with " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in suggestion["settings"].items())
                   + f" (estimate {suggestion['peak_bytes'] / 1e9:.2f} GB)")
        elif what == "run":
            fix = "; no smaller batch, remat policy or shorter bucket tried fits"
        else:
            fix = ""
        super().__init__(f"the {what} needs about {estimate['peak_bytes'] / 1e9:.2f} GB of device memory "
                         f"({estimate['worst']}), the device has {capacity / 1e9:.2f} GB{fix}")


def state_bytes(tree) -> int:
    """Bytes of the arrays (or ``ShapeDtypeStruct``s) of ``tree``; a PRNG key counts as its key data."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        if not hasattr(x, "dtype"):
            continue
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.eval_shape(jax.random.key_data, x)
        total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def trainer_bytes(trainer) -> int:
    """Bytes a `jaxqlora.train.Trainer` keeps on the device between steps: trainable
    parameters, RNG state, optimizer state and the frozen weights (abstract or real). With a
    mesh, the most any one device holds (its FSDP shards plus the replicated state;
    `jaxqlora.sharding.bytes_per_device`), which is what its steps' memory analysis counts."""
    tree = (trainer.trainable, trainer.rng_state, trainer.opt_state, trainer.frozen)
    if getattr(trainer, "mesh", None) is not None:
        from jaxqlora import sharding

        return max(sharding.bytes_per_device(tree).values(), default=0)
    return state_bytes(tree)


def memory_estimate(executables, resident_bytes: int = 0, replace_bytes: tuple[int, int] | None = None) -> dict:
    """Device memory of a run from XLA's memory analysis of its compiled steps.

    For each executable: arguments (frozen weights, trainable parameters, optimizer state,
    RNG, the batch, a KV cache) + outputs - the outputs aliasing donated arguments +
    temporaries (activations, gradients), plus ``resident_bytes`` (the state the run keeps
    on the device, `state_bytes`) beyond the arguments: XLA drops arguments a step does not
    read (the LM head of a classifier), but they are loaded all the same. The run's peak is
    the largest (the steps run one at a time over the same weights).

    Args:
      executables: ``{key: jax.stages.Compiled}`` (`jaxqlora.compile.Executables`).
      resident_bytes: see above.
      replace_bytes: ``(compiled, actual)``: the steps were compiled over weights of
        ``compiled`` bytes that will be ``actual`` bytes on the device (a model kept in a
        quantized format, estimated from its dense twin); the argument bytes are adjusted
        by the difference.

    Returns:
      ``{"peak_bytes", "worst": its key as text, "per_step": {key: {argument, output,
      alias, temp, unread, total}}}`` (bytes).
    """
    per = {}
    for key, compiled in executables.items():
        m = compiled.memory_analysis()
        if m is None:
            continue
        parts = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
        if replace_bytes is not None:
            parts["argument"] = max(0, parts["argument"] - int(replace_bytes[0])) + int(replace_bytes[1])
        parts["unread"] = max(0, int(resident_bytes) - parts["argument"])
        parts["total"] = parts["argument"] + parts["unread"] + parts["output"] - parts["alias"] + parts["temp"]
        per[str(key)] = parts
    worst = max(per, key=lambda k: per[k]["total"]) if per else "none"
    return {"peak_bytes": per[worst]["total"] if per else 0, "worst": worst, "per_step": per}


def device_memory(device=None) -> int | None:
    """Bytes the device can hold: ``memory_stats()["bytes_limit"]`` (GPU/TPU), or on CPU the
    host memory available now (``SC_AVPHYS_PAGES``); None if unknown."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def format_memory(estimate: dict, capacity: int | None) -> str:
    """One line: the estimate, its largest step and its parts, and the device's memory."""
    parts = estimate["per_step"].get(estimate["worst"], {})
    detail = ", ".join(f"{k} {parts[k] / 1e6:,.1f} MB" for k in ("argument", "unread", "temp", "output", "alias")
                       if k in parts)
    cap = "unknown" if capacity is None else f"{capacity / 1e9:.2f} GB"
    return (f"memory estimate: {estimate['peak_bytes'] / 1e9:.3f} GB at {estimate['worst']} ({detail}); "
            f"device memory {cap}")


def checkpoint_device_bytes(path: str | Path | None, dtype: Any, keep_quantized: bool = False,
                            kernel_codes: bool = False) -> int:
    """Bytes the weights of a checkpoint take on the device once `jaxqlora.load_pretrained`
    has loaded them with ``dtype`` / ``keep_quantized``, read from the file headers only
    (no tensor data is read).

    Dense tensors count ``elements x dtype size``; a bitsandbytes 4-bit folder's NF4 parts
    (packed codes, ``absmax``, nested state) and, with ``keep_quantized``, a GGUF file's
    tensors in a kept block format (`jaxqlora.ggml.GGUF_FORMATS`) count their stored bytes.
    On a Hopper GPU an NF4 weight also keeps the Mosaic kernel's scale layout (one bfloat16
    per 64 weights, `jaxqlora.nf4.with_kernel_layout`), and with ``kernel_codes`` the forward
    kernel's second copy of the codes (as many bytes as the packed codes,
    `jaxqlora.quantize.use_kernel_codes`).

    Raises:
      CheckpointError: a missing or unreadable checkpoint (header checks of
        `jaxqlora.io`).
    """
    from jaxqlora.io.embedded import embedded_model_path
    from jaxqlora.errors import CheckpointError

    path = embedded_model_path() if path is None else Path(path)
    size = jnp.dtype(dtype).itemsize
    if path.is_file() and path.suffix == ".gguf":
        from jaxqlora.ggml import GGUF_FORMATS
        from jaxqlora.io.gguf import GGUFCheckpoint

        total = 0
        for name, t in GGUFCheckpoint(path).tensors.items():
            if name == "rope_freqs.weight":
                continue
            kept = keep_quantized and t.tensor_type.name in GGUF_FORMATS and len(t.shape) >= 2
            total += int(t.n_bytes) if kept else int(t.n_elements) * size
        return total
    if path.is_dir():
        from jaxqlora.io.safetensors_hf import NF4_SUFFIXES, check_safetensors_header, safetensors_files

        kernel_scale = _hopper()
        total = 0
        for f in safetensors_files(path):
            header = check_safetensors_header(f)
            names = [k for k in header if k != "__metadata__"]
            nf4 = {k[: -len(".absmax")] for k in names if k.endswith(".weight.absmax")}
            for name in names:
                info = header[name]
                stored = int(info["data_offsets"][1]) - int(info["data_offsets"][0])
                if name in nf4:  # packed codes: 2 weights a byte
                    total += stored + ((stored // 16 + (stored if kernel_codes else 0)) if kernel_scale else 0)
                elif name.endswith(".weight.quant_state.bitsandbytes__nf4"):
                    total += 4  # a JSON record: only its ``offset`` (float32) is kept as an array
                elif any(name.endswith(s) for s in NF4_SUFFIXES):
                    total += stored
                else:
                    total += int(np.prod(info["shape"], dtype=np.int64)) * size
        return total
    raise CheckpointError(path, "no such file or folder" if not path.exists() else
                          "expected an HF model folder or a .gguf file")


def _hopper() -> bool:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


__all__ = ["MemoryEstimateError", "checkpoint_device_bytes", "device_memory", "format_memory",
           "memory_estimate", "state_bytes", "trainer_bytes"]
