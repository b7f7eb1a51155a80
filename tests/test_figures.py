"""End to end: ``sspo figures --quick`` on the real theory and trainer writes every file, and a second call
reuses the finished training runs instead of retraining.

Slow (a few minutes on 2 cores): ``pytest -m "not slow"`` skips it; CI runs it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import paper_figures

pytestmark = pytest.mark.slow


def _figures(*args: str) -> subprocess.CompletedProcess:
    # ``sspo figures`` through its module, so that the test does not depend on the installed entry points
    # (tests/test_cli.py and tests/test_packaging.py check those)
    return subprocess.run([sys.executable, "-m", "paper_figures.cli", *args], capture_output=True,
                          text=True, timeout=1200, env={**__import__("os").environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick") / "figures"
    proc = _figures("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_quick_mode_writes_every_figure_and_the_table(quick_out):
    expected = [paper_figures.stem(quick_out, n).with_suffix(ext) for n in paper_figures.FIGURES
                for ext in (".png", ".pdf", ".csv")]
    expected += [quick_out / "results.md", quick_out / "results.csv"]
    missing = [p.name for p in expected if not p.exists()]
    assert not missing, f"missing outputs: {missing}"
    for p in expected:
        assert p.stat().st_size > 200, p
    import matplotlib.image as mpimg

    for n in paper_figures.FIGURES:
        img = mpimg.imread(paper_figures.stem(quick_out, n).with_suffix(".png"))
        assert img.shape[0] > 300 and img.shape[1] > 600  # drawn at paper width and 200 dpi
    for n in paper_figures.FIGURES:
        assert len(pd.read_csv(paper_figures.stem(quick_out, n).with_suffix(".csv"))) > 0


def test_results_table_covers_every_trained_objective_over_all_seeds(quick_out):
    table = pd.read_csv(quick_out / "results.csv")
    assert list(table.objective) == list(paper_figures.TRAINED_OBJECTIVES)
    assert (table.runs == len(paper_figures.QUICK.seeds)).all()
    assert table[["final_reward_mean", "end_entropy_mean", "auc_reward_mean"]].notna().all().all()
    md = (quick_out / "results.md").read_text()
    assert all(f"| {o} | " in md for o in paper_figures.TRAINED_OBJECTIVES)
    # every planned run finished and logged every step
    runs = pd.read_csv(quick_out / "fig6_stability_runs.csv")
    assert len(runs) == len(paper_figures.QUICK.seeds) * len(paper_figures.TRAINED_OBJECTIVES) + 4
    assert (runs.steps == paper_figures.QUICK.train_steps).all()


def test_finished_runs_keep_what_the_figures_read_and_no_checkpoint(quick_out):
    runs = quick_out / "runs" / "quick"
    done = sorted(runs.glob("k*/*/DONE"))
    assert len(done) == len(paper_figures.QUICK.seeds) * len(paper_figures.TRAINED_OBJECTIVES) + 4
    assert not list(runs.glob("k*/*/checkpoint")) and not list(runs.glob("k*/*/final"))
    assert all((d.parent / "metrics.jsonl").is_file() for d in done)
    assert list(runs.glob("k0/*/log_ratios/*.npz")) and not list(runs.glob("k[1-9]*/*/log_ratios"))


def test_a_second_call_only_replots(quick_out):
    metrics = sorted((quick_out / "runs").rglob("metrics.jsonl"))
    before = {p: p.stat().st_mtime_ns for p in metrics}
    proc = _figures("--quick", "--only", "5,table", "--out", str(quick_out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runs reused" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in metrics} == before
