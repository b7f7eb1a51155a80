"""The ``sspo`` command line: the library never imports ``paper_figures``; ``sspo figures`` arrives as an extension.

The extension is declared in ``pyproject.toml``. These tests read that declaration and install it as
distribution metadata on ``sys.path`` (a ``*.dist-info`` folder in a temporary directory), so discovery is
tested through ``importlib.metadata`` whatever the current install recorded; ``tests/test_packaging.py``
checks the same from a built wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sspo_analysis import cli

ROOT = Path(__file__).resolve().parents[1]


def declared_extensions() -> dict[str, str]:
    """``[project.entry-points."sspo_analysis.commands"]`` of pyproject.toml."""
    from sspo_analysis.training.config import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return dict(project["entry-points"][cli.EXTENSION_GROUP])


@pytest.fixture
def metadata_dir(tmp_path) -> Path:
    """A directory holding a distribution whose only content is the declared extensions."""
    info = tmp_path / "sspo_cli_test-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sspo-cli-test\nVersion: 0\n")
    lines = [f"[{cli.EXTENSION_GROUP}]"] + [f"{k} = {v}" for k, v in declared_extensions().items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def python(code: str, metadata: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that sees the checkout and the extension metadata."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(metadata), str(ROOT)]), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_the_figures_command_is_declared_as_an_extension():
    assert declared_extensions() == {"figures": "paper_figures.cli:register"}


def test_building_the_parser_lists_the_extension_without_importing_it(metadata_dir):
    proc = python(
        "import sys, sspo_analysis, sspo_analysis.cli as c\n"
        "sub = c.build_parser()._subparsers._group_actions[0]\n"
        "assert 'figures' in sub.choices, sorted(sub.choices)\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert not any(m.startswith('paper_figures') for m in sys.modules)\n", metadata_dir)
    assert proc.returncode == 0, proc.stderr
    assert "figures" in proc.stdout and "gates" in proc.stdout


def test_an_area_command_leaves_the_extension_unimported(metadata_dir, tmp_path):
    proc = python(
        "import sys, sspo_analysis.cli as c\n"
        f"assert c.main(['gates', '--out', {str(tmp_path / 'g')!r}]) == 0\n"
        "assert not any(m.startswith('paper_figures') for m in sys.modules)\n", metadata_dir)
    assert proc.returncode == 0, proc.stderr


def test_the_extension_answers_its_own_help_and_errors(metadata_dir):
    proc = python("import sspo_analysis.cli as c; c.main(['figures', '--help'])", metadata_dir)
    assert proc.returncode == 0 and "usage: sspo figures" in proc.stdout and "--quick" in proc.stdout
    proc = python("import sys, sspo_analysis.cli as c; sys.exit(c.main(['figures', '--only', '12']))", metadata_dir)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "sspo figures: error: --only: no figure 12; allowed values: 1, 2, 3, 4, 5, 6, 7, 8, 9, table")


def test_unknown_arguments_to_an_area_are_still_refused(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["gates", "--no-such-flag"])
    assert err.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_an_area_command_wins_over_an_extension_of_the_same_name(monkeypatch):
    from importlib.metadata import EntryPoint

    clash = EntryPoint(name="gates", value="no_such_module:register", group=cli.EXTENSION_GROUP)
    monkeypatch.setattr(cli, "extension_commands", lambda: {"gates": clash})
    args = cli.build_parser().parse_args(["gates"])
    assert not hasattr(args, "extension") and args.func.__module__ == "sspo_analysis.plotting.gates_cli"


def test_python_m_paper_figures_cli_runs_without_the_metadata():
    proc = subprocess.run([sys.executable, "-m", "paper_figures.cli", "--only", "x"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 2 and "cannot read 'x'" in proc.stderr


def test_no_area_cli_imports_another():
    """The areas share helpers through cli_common, never through each other (no cycles)."""
    import ast

    for module in cli.AREAS:
        tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        others = {m for m in imported if m in cli.AREAS and m != module}
        assert not others, f"{module} imports {others}; shared helpers belong in sspo_analysis.cli_common"
        assert not any(m.startswith("paper_figures") for m in imported), module
