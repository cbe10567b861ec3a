"""Write files and folders so that a crash never leaves a half-written one under the final name.

A file is written as ``<name>.tmp-<pid>`` in the same folder, fsynced, then renamed over
the final name (``os.replace``). A folder (`atomic_write_dir`, e.g. a PEFT adapter) is
written as ``<name>.tmp-<pid>/`` and then swapped with the final folder in one step
(Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, the old folder kept as
``<name>.old-<pid>`` in between, which `recover_dir` puts back). `remove_leftovers`
deletes what a killed writer left behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (same-folder temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Save NumPy arrays (bf16 via ml_dtypes allowed) as safetensors, atomically."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return atomic_write_bytes(path, save(arrays, metadata=dict(metadata) if metadata else None))


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the call is unavailable (another OS, an old kernel or C library, a file system without it)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_dir(path: str | Path, write: Callable[[Path], Any], before_swap: Callable[[], Any] | None = None
                     ) -> Path:
    """Write a folder atomically: ``write(tmp)`` fills ``<path>.tmp-<pid>/``, which then
    replaces ``path`` in one rename (an existing ``path`` is swapped out and deleted).

    A kill at any moment leaves either the old folder or the new one under ``path``, never a
    mix; the temporary folder it may leave is removed by `remove_leftovers`. Where the
    atomic swap is unavailable the old folder is renamed to ``<path>.old-<pid>`` first (a
    kill between the two renames leaves no ``path``: `recover_dir` renames it back).

    Args:
      path: the final folder.
      write: called with the temporary folder (created, empty).
      before_swap: called after ``write`` and before the rename (a crash-test hook).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_dir(tmp)
        if before_swap is not None:
            before_swap()
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)  # now the old folder
        else:
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def recover_dir(path: str | Path) -> bool:
    """Put back ``<path>.old-<pid>/`` when a kill between `atomic_write_dir`'s two renames left
    no ``path``; returns True if it did."""
    path = Path(path)
    if path.exists():
        return False
    pattern = re.compile(re.escape(path.name) + r"\.old-\d+$")
    olds = [p for p in path.parent.iterdir() if pattern.match(p.name)] if path.parent.is_dir() else []
    if not olds:
        return False
    os.rename(max(olds, key=lambda p: p.stat().st_mtime), path)
    return True


def remove_leftovers(folder: str | Path, names) -> list[Path]:
    """Delete ``<name>.tmp-<pid>`` and ``<name>.old-<pid>`` files and folders in ``folder``
    that a killed writer of these ``names`` left behind (after `recover_dir`); returns them.

    Only call it when no other process writes these names in ``folder``.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for name in names:
        recover_dir(folder / name)
        pattern = re.compile(re.escape(name) + r"\.(tmp|old)-\d+$")
        for entry in folder.iterdir():
            if pattern.match(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed
