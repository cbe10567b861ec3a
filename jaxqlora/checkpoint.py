"""Full training-state checkpoints with orbax-checkpoint.

What is saved: the trainable parameters (LoRA factors, head), the optimizer state, the
dropout RNG state, and ``step`` / ``epoch`` / ``batch`` (the data position), so that a
resumed run continues the same loss curve. The frozen base weights are not saved (they
are reloaded from the model checkpoint). Orbax writes each step to a temporary folder
and renames it when complete, so an interrupted save never replaces a good checkpoint.

Sharded state (a `Trainer` with a mesh) is saved as it lies on the devices; with several
processes every process calls `TrainCheckpointer.save` and orbax writes each array once
(the metadata from process 0). Restoring places every array as the restoring trainer's
own state lies, so a checkpoint saved on one mesh restores onto another mesh, another
device count or a single device.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from jaxqlora.compile import abstract


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(tree) -> dict[str, jax.Array]:
    leaves = jax.tree_util.tree_leaves(tree)
    return {f"{i:05d}": jax.random.key_data(x) if _is_key(x) else jnp.asarray(x) for i, x in enumerate(leaves)}


def _from_saved(template, saved: dict) -> object:
    leaves, treedef = jax.tree_util.tree_flatten(template)
    new = []
    for i, old in enumerate(leaves):
        a = saved[f"{i:05d}"]
        if _is_key(old):
            new.append(jax.random.wrap_key_data(a, impl=jax.random.key_impl(old)))
        else:
            if tuple(a.shape) != tuple(old.shape):
                raise ValueError(f"checkpoint leaf {i} has shape {a.shape}, the run expects {old.shape}: "
                                 "different LoRA settings or model?")
            new.append(a if a.dtype == old.dtype else a.astype(old.dtype))
    return jax.tree_util.tree_unflatten(treedef, new)


class TrainCheckpointer:
    """Save and restore a `jaxqlora.train.Trainer`'s state under ``folder/<step>/``.

    Args:
      folder: checkpoint folder (created).
      max_to_keep: older steps are deleted.
    """

    def __init__(self, folder: str | Path, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(Path(folder).absolute(),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))

    def save(self, trainer, step: int, epoch: int, batch: int) -> None:
        """Save the trainer's state at ``step`` (blocks until written; no-op if already saved)."""
        ocp = self._ocp
        if self.manager.latest_step() == step:
            return
        state = _to_saveable((trainer.trainable, trainer.opt_state, trainer.rng_state))
        meta = {"step": int(step), "epoch": int(epoch), "batch": int(batch)}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore_latest(self, trainer) -> tuple[int, int, int] | None:
        """Load the latest checkpoint into ``trainer``; returns ``(step, epoch, batch)`` or None."""
        ocp = self._ocp
        step = self.manager.latest_step()
        if step is None:
            return None
        template = (trainer.trainable, trainer.opt_state, trainer.rng_state)
        got = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
                                       abstract(_to_saveable(template))),
                                                                  meta=ocp.args.JsonRestore()))
        trainer.trainable, trainer.opt_state, trainer.rng_state = _from_saved(template, got["state"])
        meta = got["meta"]
        trainer.steps = meta["step"]
        return meta["step"], meta["epoch"], meta["batch"]

    def close(self) -> None:
        """Wait for pending writes and release the checkpoint manager."""
        self.manager.wait_until_finished()
        self.manager.close()
