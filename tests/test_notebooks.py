"""The research notebooks run top to bottom (smoke mode) and are committed without outputs.

Each notebook is executed by nbclient in a fresh ``python3`` kernel with ``JAXQLORA_SMOKE=1``
(few steps, few rows), the repository root on ``PYTHONPATH`` and a temporary working
directory (notebooks write only under ``runs/`` there). Any error in any cell, including a
failed ``assert`` of a notebook's own checks, fails the test.
"""

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_qlora_classification", "02_numerics", "03_generation", "04_peft_interop"]
CELL_TIMEOUT_S = 600


def test_all_notebooks_present():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; run python notebooks/strip_outputs.py"
    assert any("JAXQLORA_SMOKE" in c.source for c in nb.cells if c.cell_type == "code"), \
        f"{path.name} must read JAXQLORA_SMOKE"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXQLORA_SMOKE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    # The python3 kernelspec runs `python`: make that this interpreter.
    monkeypatch.setenv("PATH", os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", ""))))
    nb = nbformat.read(path, as_version=4)
    before = sorted((ROOT / "notebooks").rglob("*"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    assert sorted((ROOT / "notebooks").rglob("*")) == before, "the notebook wrote into the repository"
