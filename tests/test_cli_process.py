"""What the ``sspo`` process does before any work: start-up cost, warnings, missing optional dependencies.

- ``sspo --version`` and ``sspo --help`` import neither torch nor transformers (checked from ``-X importtime``
  in a fresh interpreter), so they answer at once;
- the package's own warnings print as one line while a command runs, other libraries' as theirs, and the
  caller's ``warnings.showwarning`` is back afterwards;
- a missing optional dependency is one line naming the extras that install it (read from the distribution's
  metadata, built here from ``pyproject.toml``);
- the library never sets matplotlib's backend nor the global warning format (only the CLI's process setup).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import pytest

from sspo_analysis import cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")


def imported_modules(argv: list[str]) -> tuple[set[str], subprocess.CompletedProcess]:
    """The modules ``python -X importtime -m sspo_analysis.cli ARGV`` imports, and the finished process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sspo_analysis.cli", *argv], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    names = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return names, proc


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_import_neither_torch_nor_transformers(flag):
    names, proc = imported_modules([flag])
    assert proc.returncode == 0, proc.stderr[-2000:]
    # importtime lists `import` statements (not importlib.import_module): cli_common is what the areas import
    assert {"sspo_analysis", "sspo_analysis.cli_common", "sspo_analysis.training.config"} <= names
    heavy = sorted(n for n in names if n.split(".")[0] in HEAVY)
    assert not heavy, f"sspo {flag} imports {heavy[:5]}"
    assert ("sspo 0.1.0" in proc.stdout) if flag == "--version" else ("train" in proc.stdout)


def test_building_the_parser_imports_neither_torch_nor_transformers_but_a_command_does():
    code = ("import sys\nimport sspo_analysis.cli as c\nc.build_parser()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))\n"
            "from sspo_analysis.training import train\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    parser_only, after_train = proc.stdout.split("\n")[:2]
    assert parser_only == "[]" and "'torch'" in after_train  # the check sees an import when there is one


def test_lazy_names_resolve_and_unknown_names_are_attribute_errors():
    import sspo_analysis
    import sspo_analysis.theory as theory
    from sspo_analysis.gates import get_gate

    assert sspo_analysis.get_gate is get_gate and "get_gate" in dir(sspo_analysis)
    assert set(theory.__all__) <= set(dir(theory))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = sspo_analysis.nope


def _warn_from(filename: str, message: str, category: type[Warning]) -> None:
    warnings.warn_explicit(message, category, filename, 1)


def test_own_warnings_are_one_line_and_other_libraries_keep_theirs(capsys):
    own = str(ROOT / "sspo_analysis" / "io.py")
    other = str(Path(os.__file__).parent / "site-packages" / "transformers" / "modeling_utils.py")

    def command(args: Namespace) -> int:
        _warn_from(own, "ours", UserWarning)
        _warn_from(other, "theirs", FutureWarning)
        return 0

    handed_on = []

    def callers_showwarning(message, category, *args) -> None:
        handed_on.append((str(message), category))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = callers_showwarning
        assert cli.run_args(Namespace(func=command, command="x")) == 0
        assert warnings.showwarning is callers_showwarning  # the caller's is back
    assert capsys.readouterr().err == "sspo: warning: ours\n"
    assert handed_on == [("theirs", FutureWarning)]  # transformers' warning stays transformers'


@pytest.fixture
def metadata_with_extras(tmp_path, monkeypatch) -> dict[str, list[str]]:
    """A distribution on ``sys.path`` whose metadata declares pyproject.toml's extras; ``cli`` reads it."""
    from sspo_analysis.training.config import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    info = tmp_path / "sspo_extras_test-0.dist-info"
    info.mkdir()
    lines = ["Metadata-Version: 2.1", "Name: sspo-extras-test", "Version: 0"]
    lines += [f'Requires-Dist: {req}; extra == "{extra}"' for extra, reqs in extras.items() for req in reqs]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "DISTRIBUTION", "sspo-extras-test")
    return extras


def test_a_missing_optional_dependency_is_one_line_naming_its_extras(metadata_with_extras, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # `import hypothesis` now fails as if not installed
    assert cli.main(["check", "gate", "arctan", "--examples", "1"]) == 2
    err = capsys.readouterr().err
    want = sorted(e for e, reqs in metadata_with_extras.items() if any(r.startswith("hypothesis") for r in reqs))
    assert want and "notebooks" in want  # the notebooks need it (notebook 01 checks a gate)
    assert err.count("\n") == 1 and err.startswith("sspo check: error: needs hypothesis")
    assert all(f"[{e}]" in err for e in want) and "pip install" in err


def test_a_missing_module_no_extra_provides_is_not_hidden(metadata_with_extras):
    def command(args: Namespace) -> int:
        import no_such_module_anywhere  # noqa: F401

        return 0

    with pytest.raises(ModuleNotFoundError):
        cli.run_args(Namespace(func=command, command="x"))


def test_the_library_leaves_the_backend_and_warning_format_alone(tmp_path):
    """The gate figure draws with the caller's backend still set; only the CLI's process setup picks one."""
    code = ("import matplotlib, warnings\nmatplotlib.use('svg')\nfmt = warnings.formatwarning\n"
            "from sspo_analysis.plotting.gates import plot_gates\n"
            f"paths = plot_gates({str(tmp_path)!r})\n"
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
            "assert warnings.formatwarning is fmt and all(p.stat().st_size > 0 for p in paths)\n")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    sources = {p: p.read_text() for p in (ROOT / "sspo_analysis").rglob("*.py") if p != ROOT / "sspo_analysis/cli.py"}
    offenders = [str(p) for p, text in sources.items() if "matplotlib.use(" in text or "formatwarning" in text]
    assert not offenders


def test_every_entry_point_finds_the_warm_start_in_one_cache(tmp_path, monkeypatch):
    """``sspo figures`` (full mode), ``sspo train`` and notebook 01's run share one key and one directory."""
    from paper_figures import Context
    from paper_figures.experiments import overrides
    from sspo_analysis.study import PLANS
    from sspo_analysis.training import load_config
    from sspo_analysis.training.warm_start import warm_start_dir

    monkeypatch.setenv("SSPO_CACHE", str(tmp_path))
    figures = warm_start_dir(load_config(None, overrides(Context(quick=False).settings, 0)))
    train = warm_start_dir(load_config(None, []))
    notebook = warm_start_dir(load_config(None, ['objective.name="sspo"', 'objective.gate="arctan"', "steps=20"]))
    assert figures == train == notebook and figures.parent == tmp_path / "warm_start"
    plan = PLANS["quick"]
    study = warm_start_dir(load_config(None, plan.runs()[0].overrides(plan)))
    assert study.parent == tmp_path / "warm_start"  # its own settings (another key), the same cache
    moved = warm_start_dir(load_config(None, [f'warm_start.dir="{tmp_path / "elsewhere"}"']))
    assert moved == tmp_path / "elsewhere" / "warm_start" / train.name  # warm_start.dir still wins


def test_warm_start_progress_is_plain_lines_in_a_log(capsys, monkeypatch):
    from sspo_analysis.training.warm_start import WarmStartProgress

    monkeypatch.setattr(WarmStartProgress, "LOG_SECONDS", 0.0)
    with WarmStartProgress(True, 50) as bar:  # pytest's captured output is not a terminal: a log
        for step in range(1, 51):
            bar.update(step, f"success {step / 100:.2f}" if step % 25 == 0 else None)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["warm start: step 25/50", "warm start: step 50/50"]
    with WarmStartProgress(False, 50) as bar:
        bar.update(25, "success 0.25")
    assert capsys.readouterr() == ("", "")


def test_the_last_evaluation_is_logged_even_inside_the_interval(capsys):
    from sspo_analysis.training.warm_start import WarmStartProgress

    with WarmStartProgress(True, 100) as bar:
        bar.update(25, "success 0.10")
        bar.update(50, "success 0.40")  # within LOG_SECONDS of the first line; the run stops here (target met)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["warm start: step 25/100", "warm start: step 50/100"]
