"""Stacked decoder layers: the one mapping between per-layer checkpoint keys and stacked arrays.

`jaxqlora.model.Decoder` keeps its layers as one module whose parameters carry a leading
layer axis (``model.layers.self_attn.q_proj.weight`` ``[num_hidden_layers, out, in]``);
checkpoints, GGUF files, bitsandbytes folders and PEFT adapters name every layer
(``model.layers.3.self_attn.q_proj.weight``). Loaders, LoRA adapter I/O, export and
sharding go through these functions, and through nothing else, to move between the two.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp

_PER_LAYER = re.compile(r"(?:^|(?<=\.))layers\.(\d+)\.")
_STACKED = re.compile(r"(?:^|(?<=\.))layers\.(?!\d+\.)")


def split_layer_key(name: str) -> tuple[str, int | None]:
    """A per-layer checkpoint key to ``(stacked key, layer)``.

    ``"model.layers.3.self_attn.q_proj.weight"`` -> ``("model.layers.self_attn.q_proj.weight", 3)``;
    a key outside the layers (``"model.norm.weight"``) -> ``(name, None)``. Prefixes
    before ``model.`` (PEFT's ``base_model.model.``) are kept.
    """
    m = _PER_LAYER.search(name)
    if m is None:
        return name, None
    return name[:m.start()] + "layers." + name[m.end():], int(m.group(1))


def layer_key(stacked: str, layer: int) -> str:
    """The inverse of `split_layer_key`: ``("model.layers.mlp.up_proj", 2)`` -> ``"model.layers.2.mlp.up_proj"``."""
    m = _STACKED.search(stacked)
    if m is None:
        raise ValueError(f"{stacked!r} is not a stacked-layer key")
    return f"{stacked[:m.end()]}{layer}.{stacked[m.end():]}"


def is_stacked_key(name: str) -> bool:
    """True for a key or module path inside the stacked layers (``model.layers.mlp...``)."""
    return _STACKED.search(name) is not None and _PER_LAYER.search(name) is None


def layer_slice(tree: Any, layer: int) -> Any:
    """Layer ``layer`` of a stacked pytree (every leaf indexed on its leading axis)."""
    return jax.tree_util.tree_map(lambda a: a[layer], tree)


def stack_trees(trees: Sequence[Any]) -> Any:
    """The per-layer pytrees ``trees`` (same structure) stacked on a new leading axis."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def per_layer_items(name: str, value: Any) -> Iterator[tuple[str, Any]]:
    """``(per-layer key, value of that layer)`` for a stacked ``name`` (one per layer, in
    order; ``value`` an array or pytree with the layer axis leading), else ``(name, value)``."""
    if not is_stacked_key(name):
        yield name, value
        return
    n = jax.tree_util.tree_leaves(value)[0].shape[0]
    for i in range(n):
        yield layer_key(name, i), layer_slice(value, i)
