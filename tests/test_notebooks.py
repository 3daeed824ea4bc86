"""Every module notebook's cells run as tests (what `nbdev_test` does), one pytest test per notebook.

Experiment notebooks (nbs/experiments) train models end to end and are exercised by test_pipeline.py instead.
Cells flagged `#| cuda` are skipped here; cells flagged `#| slow` run with `make test` and are skipped by
`make test-fast` (`pytest -m "not slow"`).
"""
from pathlib import Path

import pytest
from nbdev.test import test_nb as run_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith(("_", ".")))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb, monkeypatch, request):
    monkeypatch.chdir(ROOT / "nbs")
    fast = "not slow" in (request.config.getoption("markexpr") or "")
    ok, seconds = run_notebook(nb, skip_flags=["cuda", "slow"] if fast else ["cuda"], do_print=False, basepath=ROOT)
    assert ok, f"{nb.name}: a cell failed (run `nbdev_test --path {nb.relative_to(ROOT)}` to see it)"
