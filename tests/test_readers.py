"""Reading a run's files (``sspo_analysis.training.readers``): a cut-off last line of ``metrics.jsonl`` skipped,
a bad one named, an empty one one line from ``sspo plot``."""

from __future__ import annotations

import pytest

from sspo_analysis.cli import main
from sspo_analysis.training import read_metrics


def test_read_metrics_skips_a_cut_off_last_line_and_names_a_bad_one(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    metrics.write_text('{"step": 1, "reward_mean": 0.5, "entropy": 1.0}\n{"step": 2, "rewa')
    with pytest.warns(UserWarning, match="line 2 is cut off"):
        assert list(read_metrics(run).step) == [1]
    metrics.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2"):
        read_metrics(run)
    metrics.write_text("")
    assert main(["plot", str(run), "--out", str(tmp_path / "fig")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no complete step" in err
