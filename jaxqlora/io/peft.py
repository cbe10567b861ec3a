"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys (peft 0.21, ``get_peft_model_state_dict``):
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]``; a sequence-classification head is saved as
``base_model.model.score.weight`` ``[num_labels, hidden]`` (``modules_to_save``).
Our parameter paths are the same names without the ``base_model.model.`` prefix and the
``.weight`` suffix, and the same layout, so no transpose happens anywhere; the layer index
comes from the stacked factors' leading axis (`jaxqlora.model.per_layer_items`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxqlora.errors import CheckpointError, MissingTensorError, TensorShapeError, UnexpectedTensorError
from jaxqlora.io.atomic import atomic_save_safetensors, atomic_write_json
from jaxqlora.io.safetensors_hf import iter_safetensors
from jaxqlora.lora import apply_lora, lora_config, lora_layers
from jaxqlora.stacked import layer_key, per_layer_items

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TASK_NAME = "jaxqlora_task.json"
"""Our own record of the training task, beside PEFT's files (PEFT ignores it)."""
TASKS = ("classification", "causal-lm", "chat")


def adapter_state_dict(model, head: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """PEFT-named float32 arrays of every LoRA factor (and of ``head``, e.g. ``{"score": W}``)."""
    out = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            stacked = np.asarray(jax.device_get(getattr(layer, part)[...]), np.float32)
            for key, a in per_layer_items(f"{name}.{part}", stacked):
                out[f"{PREFIX}{key}.weight"] = a
    for name, w in (head or {}).items():
        out[f"{PREFIX}{name}.weight"] = np.asarray(jax.device_get(w), np.float32)
    return out


def save_adapter(model, path: str | Path, *, base_model_name_or_path: str | None = None,
                 task_type: str = "CAUSAL_LM", head: Mapping[str, Any] | None = None, task: str | None = None,
                 chat_template: str | None = None) -> Path:
    """Write a PEFT LoRA adapter folder that ``peft.PeftModel.from_pretrained`` loads.

    Args:
      model: a `CausalLM` with LoRA layers (`jaxqlora.lora.apply_lora`).
      path: output folder (created). Each file is written atomically.
      base_model_name_or_path: recorded in the config for PEFT.
      task_type: ``"CAUSAL_LM"`` or ``"SEQ_CLS"``.
      head: extra trainable modules saved in full (``{"score": W [num_labels, hidden]}``);
        their names go to ``modules_to_save``.
      task: the jaxqlora task the adapter was trained for (``"classification"``,
        ``"causal-lm"``, ``"chat"``), recorded in ``jaxqlora_task.json`` with
        ``chat_template`` (the template chat training rendered with), so that generation
        prompts as training did (`read_task`). None writes no record.

    Returns:
      The folder.

    Raises:
      ValueError: the model has no LoRA layers, or task_type or task is unknown.
    """
    if task_type not in ("CAUSAL_LM", "SEQ_CLS"):
        raise ValueError(f"task_type must be CAUSAL_LM or SEQ_CLS, got {task_type!r}")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    cfg = lora_config(model)
    path = Path(path)
    config = {
        "peft_type": "LORA", "task_type": task_type, "r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
        "lora_dropout": cfg["lora_dropout"], "target_modules": cfg["target_modules"], "bias": "none",
        "use_rslora": cfg["use_rslora"], "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": sorted(head) if head else None,
        "base_model_name_or_path": base_model_name_or_path, "use_dora": False, "lora_bias": False,
    }
    atomic_save_safetensors(path / WEIGHTS_NAME, adapter_state_dict(model, head), metadata={"format": "pt"})
    atomic_write_json(path / CONFIG_NAME, config)
    if task is not None:
        atomic_write_json(path / TASK_NAME, {"task": task, "chat_template": chat_template})
    return path


def read_task(path: str | Path) -> dict | None:
    """The ``{"task", "chat_template"}`` record `save_adapter` wrote in an adapter folder, or
    None when there is none (an adapter from PEFT or an older jaxqlora).

    Raises:
      CheckpointError: the record is unreadable or names an unknown task.
    """
    file = Path(path) / TASK_NAME
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(file, f"unreadable JSON ({e})") from e
    if not isinstance(record, dict) or record.get("task") not in TASKS:
        raise CheckpointError(file, f"expected an object with task one of {', '.join(TASKS)}", "task")
    template = record.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(file, "expected a string or null", "chat_template")
    return {"task": record["task"], "chat_template": template}


def read_adapter(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(adapter_config, {key: float32 array})`` of a PEFT adapter folder.

    Raises:
      CheckpointError: a file is missing or unreadable, or the adapter is not LoRA.
    """
    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file():
        raise CheckpointError(cfg_file, "adapter_config.json not found")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(cfg_file, f"unreadable JSON ({e})") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(cfg_file, f"peft_type {config.get('peft_type')!r} is not LORA", "peft_type")
    if config.get("use_dora"):
        raise CheckpointError(cfg_file, "DoRA adapters are not supported", "use_dora")
    if not weights.is_file():
        raise CheckpointError(weights, "adapter_model.safetensors not found")
    return config, {k: np.asarray(v, np.float32) for k, v in iter_safetensors([weights])}


def _target_names(config: dict, source) -> tuple[str, ...]:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets == "all-linear":
            from jaxqlora.lora import ALL_TARGETS
            return ALL_TARGETS
        raise CheckpointError(source, f"regex target_modules {targets!r} are not supported", "target_modules")
    from jaxqlora.lora import ALL_TARGETS

    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(source, f"expected a list of module names, got {targets!r}", "target_modules")
    names = tuple(dict.fromkeys(t.rsplit(".", 1)[-1] for t in targets))  # dedupe, keep order
    unknown = [t for t in names if t not in ALL_TARGETS]
    if unknown:
        raise CheckpointError(source, f"names module(s) {unknown} that the model lacks; LoRA targets are "
                                      f"{', '.join(ALL_TARGETS)}", "target_modules")
    return names


def load_adapter(model, path: str | Path, *, return_extra: bool = False):
    """Attach the PEFT LoRA adapter in ``path`` to ``model`` (in place) and return it.

    Args:
      model: a `CausalLM` without LoRA layers (bf16, float32 or NF4 base).
      path: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
      return_extra: also return ``{name: array}`` of saved non-LoRA modules (e.g. the
        ``score`` head of a SEQ_CLS adapter), keyed without prefix and ``.weight``.

    Returns:
      ``model``, or ``(model, extra)`` with ``return_extra``.

    Raises:
      CheckpointError: missing files, or ``target_modules`` naming a module the model lacks
        (naming adapter_config.json and the field); ``MissingTensorError`` / ``UnexpectedTensorError`` /
        ``TensorShapeError`` when the adapter does not fit the model (names the key).
    """
    path = Path(path)
    config, tensors = read_adapter(path)
    weights = path / WEIGHTS_NAME
    apply_lora(model, r=int(config["r"]), alpha=float(config.get("lora_alpha", config["r"])),
               dropout=float(config.get("lora_dropout", 0.0)), targets=_target_names(config, path / CONFIG_NAME),
               use_rslora=bool(config.get("use_rslora", False)))
    layers = lora_layers(model)
    used = set()
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            var = getattr(layer, part)
            want = var[...].shape[1:]  # [layers, ...]: one tensor per layer in the file
            parts = []
            for i in range(var[...].shape[0]):
                key = f"{PREFIX}{layer_key(f'{name}.{part}', i)}.weight"
                if key not in tensors:
                    raise MissingTensorError(weights, "adapter tensor missing (prefix or target mismatch?)", key)
                if tensors[key].shape != want:
                    raise TensorShapeError(weights, f"shape {tensors[key].shape}, the model needs {want}", key)
                parts.append(tensors[key])
                used.add(key)
            var[...] = jnp.asarray(np.stack(parts))
    extra = {}
    for key in sorted(set(tensors) - used):
        module = key[len(PREFIX):].removesuffix(".weight") if key.startswith(PREFIX) else None
        if module is not None and module in (config.get("modules_to_save") or []):
            extra[module] = tensors[key]
        else:
            raise UnexpectedTensorError(weights, "adapter tensor has no place in the model", key)
    return (model, extra) if return_extra else model


def load_adapters(model, paths: Mapping[str, str | Path]) -> list[str]:
    """Attach several PEFT LoRA adapters to ``model`` (in place), picked per batch row at run time.

    Every adapted projection becomes one `jaxqlora.lora.LoRALinear` with ``adapters = 1 +
    len(paths)``: adapter 0 is the base model (zero factors), adapter ``i`` the i-th of
    ``paths``. Factors of smaller rank are zero-padded to the largest rank, and an adapter
    that does not target a projection has zero factors there, so each row computes exactly
    what its adapter alone adds (float32). Each adapter is checked as `load_adapter` checks
    one (it is loaded into a weightless twin of ``model`` first). Dropout is off (serving).
    Pass ``adapter`` (int32 ``[B]``, 0 = base) to `jaxqlora.model.CausalLM.hidden_states`.

    Args:
      model: a `CausalLM` without LoRA layers.
      paths: ``{name: adapter folder}`` (names in order become adapters 1, 2, ...).

    Returns:
      ``["", name1, name2, ...]``: the names by adapter index ("" = the base model).

    Raises:
      CheckpointError (and its subclasses): as `load_adapter`, naming the adapter's file.
      ValueError: ``model`` already has LoRA layers.

    Source: Punica (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving"; BGMV) and
    S-LoRA (Sheng et al. 2023): one batch, a gathered adapter per row.
    """
    from flax import nnx

    from jaxqlora.compile import abstract
    from jaxqlora.lora import LoRALinear, projection_owner

    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; load several adapters into a model without them")
    graphdef, state = nnx.split(model)
    loaded = []  # per adapter: {target: (A [L, r, in], B [L, out, r], scaling)}
    for name, path in paths.items():
        twin = nnx.merge(graphdef, abstract(state))
        load_adapter(twin, path)
        loaded.append({key.rsplit(".", 1)[-1]: (np.asarray(l.lora_A[...]), np.asarray(l.lora_B[...]), l.scaling)
                       for key, l in lora_layers(twin).items()})
    targets = sorted({t for factors in loaded for t in factors})
    n = len(loaded) + 1
    layers = model.model.layers
    for target in targets:
        rank = max(f[target][0].shape[1] for f in loaded if target in f)
        owner = projection_owner(layers, target)
        base = getattr(owner, target)
        multi = LoRALinear(base, r=rank, alpha=float(rank), rngs=nnx.Rngs(0), stack=(model.num_layers,), adapters=n)
        a, b = np.zeros(multi.lora_A[...].shape, np.float32), np.zeros(multi.lora_B[...].shape, np.float32)
        scaling = np.zeros(multi.adapter_scaling[...].shape, np.float32)  # [layers, adapters]
        for i, factors in enumerate(loaded, start=1):
            if target in factors:
                fa, fb, s = factors[target]
                a[:, i, :fa.shape[1]], b[:, i, :, :fb.shape[2]], scaling[:, i] = fa, fb, s
        multi.lora_A[...], multi.lora_B[...] = jnp.asarray(a), jnp.asarray(b)
        multi.adapter_scaling[...] = jnp.asarray(scaling)
        setattr(owner, target, multi)
    return [""] + list(paths)
