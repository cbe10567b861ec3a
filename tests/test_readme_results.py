"""README's "## Results" section is what benchmarks/readme_results.py makes of benchmarks/RESULTS.md
(pure text, no JAX: milliseconds). When this fails after a new RESULTS.md section, run
``python benchmarks/readme_results.py --write`` and commit README.md."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_results", ROOT / "benchmarks" / "readme_results.py")
rr = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("readme_results", rr)  # dataclasses look their module up
_spec.loader.exec_module(rr)


def test_readme_results_in_step_with_results_md(capsys):
    rc = rr.main(["--check"])
    assert rc == 0, capsys.readouterr().err


_TWO = """# Benchmark results

## Decode (issue 99) — NVIDIA H100, 2026-12-07

### `generate.py`

| batch | tok/s | peer tok/s |
|---|---|---|
| 1 | **300.5** | |

## Decode (issue 98) — NVIDIA H200, 2026-11-30 (second session)

| batch | tok/s | peer tok/s |
|---|---|---|
| 1 | 250.0 | 50.0 |

Prose: the GEMV took 17.7 us.
"""

_ROW = rr.Row("decode, batch 1", (rr.Src((r"Decode",), {"t": rr.T(r"^1 \|", r"^tok/s$")}),), "{t} tok/s",
              (rr.Cmp((rr.Src((r"Decode",), {"p": rr.T(r"^1 \|", r"^peer")}),), "peer {p} ({r})",
                      {"r": ("t", "p")}),))


def test_newest_section_wins_and_a_comparison_across_sections_is_not_same_run():
    out = rr.render(_TWO, [("Decode", [_ROW])])
    row = next(line for line in out.splitlines() if line.startswith("| decode"))
    assert row == ("| decode, batch 1 | 300.5 tok/s | peer 50.0 (6.01x), *not same run*: NVIDIA H200, 2026-11-30 "
                   "| NVIDIA H100, 2026-12-07 |")
    # Without the newer section, both sides come from one block: same run.
    older = _TWO[_TWO.index("## Decode (issue 98)"):]
    assert "*same run* | NVIDIA H200, 2026-11-30 |" in rr.render(older, [("Decode", [_ROW])])


def test_a_sentence_figure():
    row = rr.Row("gemv", (rr.Src((r"H200",), {"us": rr.R(r"GEMV took (" + rr.NUM + ") us")}),), "{us} us")
    assert "| gemv | 17.7 us | — | NVIDIA H200, 2026-11-30 |" in rr.render(_TWO, [("K", [row])])


def test_a_missing_figure_names_the_heading_and_the_row():
    row = rr.Row("decode, batch 8", (rr.Src((r"Decode",), {"t": rr.T(r"^8 \|", r"^tok/s$")}),), "{t}")
    with pytest.raises(rr.FigureNotFound, match=r"(?s)decode, batch 8.*Decode \(issue 99\).*\^8"):
        rr.render(_TWO, [("Decode", [row])])
    row = rr.Row("serving", (rr.Src((r"Serving \(issue 24\)",), {"t": rr.T(r"^1 \|", r"^tok/s$")}),), "{t}")
    with pytest.raises(rr.FigureNotFound, match=r"no RESULTS.md heading matches"):
        rr.render(_TWO, [("S", [row])])


def test_write_replaces_only_the_results_section(tmp_path):
    readme = tmp_path / "README.md"
    results = tmp_path / "RESULTS.md"
    results.write_text(_TWO)
    readme.write_text("# x\n\n```bash\n## not a heading\n```\n\n## Results\n\nold\n\n## Layout\n\nkept\n")
    tables = rr.TABLES
    rr.TABLES = [("Decode", [_ROW])]
    try:
        assert rr.main(["--check", "--readme", str(readme), "--results", str(results)]) == 1
        assert rr.main(["--write", "--readme", str(readme), "--results", str(results)]) == 0
        assert rr.main(["--check", "--readme", str(readme), "--results", str(results)]) == 0
    finally:
        rr.TABLES = tables
    text = readme.read_text()
    assert text.startswith("# x\n\n```bash\n## not a heading\n```\n\n## Results\n\nGenerated from")
    assert text.endswith("gpu_profile.py`).\n\n## Layout\n\nkept\n")
    assert "300.5 tok/s" in text and "\nold\n" not in text


def test_explain_names_the_block_of_every_figure():
    out = rr.explain(rr.RESULTS.read_text())
    rows = sum(len(r) for _, r in rr.TABLES)
    assert out.count("\n- ") == rows and "block: ## " in out
