"""CLI conventions: ``sspo --version``, ``sspo train --help`` lists the config, ``sspo config show``, progress flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from sspo_analysis.cli import main
from sspo_analysis.training.config import load_config, tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_declared_one(capsys):
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"sspo {declared}"


def test_train_help_describes_the_command_and_lists_every_section(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "RL-train a causal LM" in out and "config sections" in out
    shipped = tomllib.loads((ROOT / "sspo_analysis" / "configs" / "default.toml").read_text())
    for section, table in shipped.items():
        if isinstance(table, dict):
            assert f"[{section}]" in out, section
            for key in table:
                assert key in out, f"{section}.{key}"


def test_config_show_prints_the_resolved_config_with_allowed_values(capsys, tmp_path):
    assert main(["config", "show", "--set", "rollout.top_p=0.5", "--set", "objective.name=\"gmpo\""]) == 0
    out = capsys.readouterr().out
    data = tomllib.loads(out)  # valid TOML, the comments included
    assert data["rollout"]["top_p"] == 0.5
    assert data["objective"]["eps_lo"] == 0.4  # the objective's defaults are listed too (GMPO's 0.4)
    lines = {line.split(" = ")[0]: line for line in out.splitlines() if " = " in line}
    assert "allowed values: cpu, cuda, auto" in lines["device"]
    assert "must be a number > 0.0 and <= 1.0" in lines["top_p"]
    assert "allowed values: constant, linear, cosine" in lines["schedule"]
    path = tmp_path / "shown.toml"
    path.write_text(out)
    assert load_config(path) == load_config(None, ["rollout.top_p=0.5", "objective.name=\"gmpo\"",
                                                   "objective.eps_lo=0.4", "objective.eps_hi=0.4"])


def test_config_show_bad_override_is_one_line(capsys):
    assert main(["config", "show", "--set", "rollout.top_p=2"]) == 2
    assert capsys.readouterr().err.strip() == "sspo config: error: rollout.top_p: must be a number > 0.0 and <= 1.0, " \
                                               "got 2.0"


def test_progress_over_counts_every_item():
    import io

    from rich.console import Console

    from sspo_analysis import cli_common

    seen = list(cli_common.progress_over([("a", 1), ("b", 2)], "x", enabled=False))
    assert seen == [("a", 1), ("b", 2)]
    buffer = io.StringIO()
    original = Console
    try:
        import rich.console

        rich.console.Console = lambda **kw: original(file=buffer, force_terminal=True, width=100)
        assert list(cli_common.progress_over(["p", "q"], "sequence")) == ["p", "q"]
    finally:
        rich.console.Console = original
    assert "2/2" in buffer.getvalue() and "sequence" in buffer.getvalue()
