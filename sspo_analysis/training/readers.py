"""Reading a run's files: its metrics (``RUN/metrics.jsonl``) as a DataFrame and its logged token log-ratios."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["read_log_ratios", "read_metrics"]


def read_metrics(run_dir: str | Path):
    """``RUN/metrics.jsonl`` as a pandas DataFrame (one row per step), with ``objective`` and ``seed`` columns.

    A cut-off last line (a killed run's normal state) is skipped with a warning; any
    other malformed line is a ValueError naming the file and the line.
    """
    import pandas as pd

    run = Path(run_dir)
    df = pd.DataFrame(_metrics_rows(run / "metrics.jsonl"))
    cfg_path = run / "config.toml"
    if cfg_path.exists():
        from sspo_analysis.training.config import tomllib

        try:
            cfg = tomllib.loads(cfg_path.read_text())
            df["objective"] = cfg["objective"]["name"]
            df["seed"] = cfg["seed"]
            df["staleness"] = cfg["algo"]["staleness"]
        except (tomllib.TOMLDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"{cfg_path}: not a run config ({err})") from err
    df["run"] = str(run)
    return df


def _metrics_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per line (see :func:`read_metrics`)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot be read ({err})") from err
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines):
                warnings.warn(f"{path}: line {i} is cut off (a killed run); skipped", stacklevel=3)
                break
            raise ValueError(f"{path}: line {i}: not JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_log_ratios(run_dir: str | Path, steps=None) -> dict[int, dict[str, np.ndarray]]:
    """``{step: {"log_ratios", "lengths", "advantages", "update"}}`` from ``RUN/log_ratios/step_*.npz``."""
    out = {}
    for path in sorted((Path(run_dir) / "log_ratios").glob("step_*.npz")):
        step = int(path.stem.split("_")[1])
        if steps is None or step in steps:
            try:
                with np.load(path) as data:
                    out[step] = {k: data[k] for k in data.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
                raise ValueError(f"{path}: not a readable log-ratio file ({type(err).__name__}: {err})") from err
    return out
