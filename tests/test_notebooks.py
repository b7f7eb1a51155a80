"""The notebooks: committed without outputs, and each runs top to bottom on smoke settings (``SSPO_QUICK=1``).

Execution is slow-marked (about a minute for all three on 2 cores); ``pytest --nbmake notebooks/`` with
``SSPO_QUICK=1`` is the equivalent check. 03 ignores ``SSPO_QUICK``: it reads the committed stability study
(``docs/results/stability/*.csv``) and trains nothing; without those files its cells print a note instead.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_gates.ipynb", "02_bias_variance.ipynb",
                                           "03_entropy_and_stability.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_on_smoke_settings(path, monkeypatch):
    from nbrun import run

    monkeypatch.setenv("SSPO_QUICK", "1")  # the kernel inherits the environment
    nb = run(path, timeout=300)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
