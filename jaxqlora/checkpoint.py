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

Kills: a process killed at any moment (SIGKILL included) leaves every finalized step
readable: orbax finalizes a step by renaming its temporary folder, leftovers of an
unfinished save are removed when the next `TrainCheckpointer` opens the folder, and
`TrainCheckpointer.restore_latest` falls back to an earlier step when the latest one
cannot be read. `kill_point` lets a test kill the process at a named point of a save.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxqlora.compile import abstract
from jaxqlora.errors import CheckpointError

KILL_ENV = "JAXQLORA_KILL_AT"
"""Environment variable naming a `kill_point` (``name`` or ``name:step``) at which the
process signals itself: a hook for crash tests, unset in normal use."""

KILL_SIGNAL_ENV = "JAXQLORA_KILL_SIGNAL"
"""The signal `kill_point` sends (a name such as ``SIGINT``; default ``SIGKILL``)."""


def kill_point(name: str, step: int | None = None) -> None:
    """Send this process ``$JAXQLORA_KILL_SIGNAL`` (default SIGKILL) here if
    ``$JAXQLORA_KILL_AT`` is ``name`` or ``name:step``.

    A crash-test hook (`KILL_ENV`): `finetune` and `TrainCheckpointer.save` call it at
    ``after_step:N`` (step N done and logged, not saved), ``checkpoint_writing:N`` (orbax
    writing step N's temporary folder), ``checkpoint_written:N`` (step N finalized),
    ``adapter_writing`` (the adapter's temporary folder complete, not yet renamed) and
    ``adapter_written`` (adapter in place, ``results.json`` not yet written). Unset, it does
    nothing.
    """
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    here = name if step is None else f"{name}:{step}"
    if want == here:
        sig = getattr(signal, os.environ.get(KILL_SIGNAL_ENV) or "SIGKILL")
        os.kill(os.getpid(), sig)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(tree) -> dict[str, jax.Array]:
    leaves = jax.tree_util.tree_leaves(tree)
    return {f"{i:05d}": jax.random.key_data(x) if _is_key(x) else jnp.asarray(x) for i, x in enumerate(leaves)}


def _from_saved(template, saved: dict, where) -> object:
    leaves, treedef = jax.tree_util.tree_flatten(template)
    new = []
    if len(saved) != len(leaves):
        raise CheckpointError(where, f"holds {len(saved)} arrays, the run expects {len(leaves)}: different LoRA "
                              "settings, task or model?")
    for i, old in enumerate(leaves):
        a = saved[f"{i:05d}"]
        if _is_key(old):
            new.append(jax.random.wrap_key_data(a, impl=jax.random.key_impl(old)))
        else:
            if tuple(a.shape) != tuple(old.shape):
                raise CheckpointError(where, f"leaf {i} has shape {tuple(a.shape)}, the run expects "
                                      f"{tuple(old.shape)}: different LoRA settings or model?", f"{i:05d}")
            new.append(a if a.dtype == old.dtype else a.astype(old.dtype))
    return jax.tree_util.tree_unflatten(treedef, new)


class TrainCheckpointer:
    """Save and restore a `jaxqlora.train.Trainer`'s state under ``folder/<step>/``.

    Each step is written to a temporary folder and renamed when complete (orbax), so a
    kill during a save leaves the earlier steps as they were; temporary folders left by a
    killed process are removed when the folder is opened.

    Args:
      folder: checkpoint folder (created).
      max_to_keep: older steps are deleted (after the newer one is finalized).
    """

    def __init__(self, folder: str | Path, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.folder = Path(folder).absolute()
        self.manager = ocp.CheckpointManager(self.folder, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, cleanup_tmp_directories=True))

    def save(self, trainer, step: int, epoch: int, batch: int) -> None:
        """Save the trainer's state at ``step`` (blocks until written and renamed into place;
        no-op if that step is already saved)."""
        ocp = self._ocp
        if self.manager.latest_step() == step:
            return
        state = _to_saveable((trainer.trainable, trainer.opt_state, trainer.rng_state))
        meta = {"step": int(step), "epoch": int(epoch), "batch": int(batch)}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)))
        kill_point("checkpoint_writing", step)
        self.manager.wait_until_finished()
        kill_point("checkpoint_written", step)

    def latest_step(self) -> int | None:
        """The newest finalized step, or None."""
        return self.manager.latest_step()

    def restore_latest(self, trainer, log=None) -> tuple[int, int, int] | None:
        """Load the latest readable checkpoint into ``trainer``; returns ``(step, epoch, batch)``
        or None when there is none.

        A step that cannot be read (damaged on disk) is reported through ``log`` and the
        next older one is tried.

        Raises:
          CheckpointError: no step could be read (the newest step's error), or a step's
            arrays do not fit the trainer (other LoRA settings, task or model).
        """
        ocp = self._ocp
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        template = (trainer.trainable, trainer.opt_state, trainer.rng_state)
        first_error = None
        for step in steps:
            where = self.folder / str(step)
            try:
                got = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract(_to_saveable(template))), meta=ocp.args.JsonRestore()))
                meta = got["meta"]
                restored = _from_saved(template, got["state"], where)
                values = int(meta["step"]), int(meta["epoch"]), int(meta["batch"])
            except CheckpointError:
                raise
            except Exception as e:  # orbax/tensorstore/JSON errors of a damaged step
                first_error = first_error or CheckpointError(where, f"unreadable checkpoint ({type(e).__name__}: {e})")
                aside = self._move_aside(step)
                if log is not None:
                    log(f"checkpoint step {step} is unreadable ({type(e).__name__}); moved to {aside}; "
                        "trying an older one")
                continue
            if values[0] != step:
                raise CheckpointError(where, f"its metadata says step {values[0]}", "meta.step")
            trainer.trainable, trainer.opt_state, trainer.rng_state = restored
            trainer.steps = values[0]
            return values
        raise first_error

    def _move_aside(self, step: int) -> Path:
        """Move an unreadable step out of orbax's sight (``<folder>/unreadable/<step>-<n>``),
        so that the resumed run can write that step again."""
        aside = self.folder / "unreadable"
        aside.mkdir(exist_ok=True)
        n = 0
        while (aside / f"{step}-{n}").exists():
            n += 1
        os.rename(self.folder / str(step), aside / f"{step}-{n}")
        self.manager.reload()
        return aside / f"{step}-{n}"

    def close(self) -> None:
        """Wait for pending writes and release the checkpoint manager."""
        self.manager.wait_until_finished()
        self.manager.close()
