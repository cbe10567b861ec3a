"""Strip outputs from notebooks before committing: ``python notebooks/strip_outputs.py [FILE ...]``.

Clears every code cell's outputs and execution count, the per-cell execution timing and
the interpreter version that nbclient / Jupyter record; with no arguments, strips every ``notebooks/*.ipynb``.
``tests/test_notebooks.py`` fails on a committed notebook that still has outputs.
"""

import sys
from pathlib import Path

import nbformat


def strip(path: Path) -> bool:
    """Strip one notebook in place; True if it changed."""
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    nb.metadata["language_info"] = {"name": "python"}   # drop the interpreter version Jupyter records
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after + ("" if after.endswith("\n") else "\n"), encoding="utf-8")
    return after != before


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(Path(__file__).parent.glob("*.ipynb"))
    for p in paths:
        print(f"{p}: {'stripped' if strip(p) else 'clean'}")
