"""The stability study: where, and how, the objectives stop being stable (``sspo study stability``).

:mod:`~sspo_analysis.study.design` says what is trained (arms, regimes, plans),
:mod:`~sspo_analysis.study.execute` trains it (parallel, resumable),
:mod:`~sspo_analysis.study.collect` turns the runs into tables,
:mod:`~sspo_analysis.study.stats` holds the paired statistics and
:mod:`~sspo_analysis.study.report` draws the figures and writes ``results.md``.
:func:`load_results` reads a finished study's CSVs back (what notebook 03 does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sspo_analysis.study.design import ARMS, PLANS, Arm, Plan, Regime, StudyRun

__all__ = ["ARMS", "PLANS", "Arm", "Plan", "Regime", "StudyRun", "load_results"]

RESULT_FILES = ("stability", "summary", "comparisons", "theory", "theory_correlations")
"""The CSV tables a study writes, by stem."""


def load_results(out: str | Path) -> dict[str, Any]:
    """A finished study's tables ``{stem: DataFrame}`` from ``out`` (a ValueError naming a missing file)."""
    import pandas as pd

    tables = {}
    for stem in RESULT_FILES:
        path = Path(out) / f"{stem}.csv"
        if not path.is_file():
            raise ValueError(f"{path}: missing; run `sspo study stability --out {out}` first")
        tables[stem] = pd.read_csv(path)
    return tables
