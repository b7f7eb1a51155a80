"""The built wheel works on its own: installed into a fresh environment outside the repository, ``sspo train``,
``sspo gates`` and ``sspo figures`` run from a directory that is not the checkout, with the packaged configs.

The environment is a new venv whose dependencies come from the running interpreter's site-packages (a ``.pth``
file), so nothing is downloaded; the wheel itself is installed with ``--no-deps --no-index``.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

# Not marked slow: 26 s on an idle 2-core machine (about 100 s when five other jobs share it).

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sspo_analysis", "paper_figures")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel, make a venv outside the repository, install the wheel there; the venv's paths."""
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools installed")
    tmp = tmp_path_factory.mktemp("wheel")
    assert not tmp.resolve().is_relative_to(ROOT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(SSPO_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1", COLUMNS="200", MPLBACKEND="Agg")
    # Build from a copy of what the build reads: setuptools writes build/ and *.egg-info beside the sources, and a
    # stale build/ in the checkout could smuggle deleted files into the wheel.
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          str(tmp / "dist"), str(src)], tmp, env)
    (wheel,) = (tmp / "dist").glob("sspo_analysis-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    python = venv / "bin" / "python"
    # Install into the empty venv first, so that pip sees no other copy of the package ...
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], tmp, env)
    # ... then take the dependencies from the running environment; the venv's own site-packages stays first.
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).strip())
    (purelib / "running_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = tmp / "work"
    work.mkdir()
    return {"wheel": wheel, "python": python, "sspo": venv / "bin" / "sspo", "env": env, "work": work,
            "purelib": purelib}


def test_the_wheel_ships_the_configs_and_nothing_from_outside_the_packages(installed):
    import zipfile

    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "sspo_analysis/configs/default.toml" in names
    assert "sspo_analysis/configs/qwen2.5-0.5b-gsm8k.toml" in names
    tops = {n.split("/")[0] for n in names if not n.startswith("sspo_analysis-")}
    assert tops == set(PACKAGES)


def test_the_installed_package_is_imported_from_the_venv_and_reads_its_configs(installed):
    code = ("import sspo_analysis, paper_figures\n"
            "from sspo_analysis.training.config import DEFAULT_CONFIG, TrainConfig, load_config, packaged_config\n"
            "from sspo_analysis.training.config import tomllib\n"
            "print(sspo_analysis.__file__); print(paper_figures.__file__); print(DEFAULT_CONFIG)\n"
            "assert load_config(DEFAULT_CONFIG).to_dict() == TrainConfig().validate().to_dict()\n"
            "assert load_config('default').to_dict() == TrainConfig().validate().to_dict()\n"
            "qwen = tomllib.loads(packaged_config('qwen2.5-0.5b-gsm8k').read_text())\n"
            "assert qwen['model']['precision'] == 'bf16' and qwen['device'] == 'cuda'\n")
    out = _run([str(installed["python"]), "-c", code], installed["work"], installed["env"]).split()
    assert all(Path(p).resolve().is_relative_to(installed["purelib"].resolve()) for p in out), out


def test_sspo_gates_from_the_wheel(installed):
    out = installed["work"] / "gates"
    _run([str(installed["sspo"]), "gates", "--out", str(out)], installed["work"], installed["env"])
    assert {"gates.png", "gates.pdf", "gates.csv"} <= {p.name for p in out.iterdir()}


def test_sspo_train_two_steps_from_the_wheel(installed):
    run = installed["work"] / "run"
    fast = ['model.preset="micro"', "model.warm_start=false", "rollout.prompts=4", "rollout.group_size=4",
            "log.progress=false", "threads=1"]
    cmd = [str(installed["sspo"]), "train", "--set", "steps=2", "--out", str(run)]
    for item in fast:
        cmd += ["--set", item]
    _run(cmd, installed["work"], installed["env"])
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_sspo_figures_is_found_through_the_wheels_entry_point(installed):
    out = _run([str(installed["sspo"]), "figures", "--help"], installed["work"], installed["env"])
    assert "usage: sspo figures" in out and "--quick" in out
    listing = _run([str(installed["sspo"]), "--help"], installed["work"], installed["env"])
    assert "figures" in listing


def test_an_unknown_config_names_the_packaged_ones():
    from sspo_analysis.training.config import load_config

    shipped = "default, qwen2.5-0.5b-gsm8k"
    with pytest.raises(ValueError, match=rf"^config: 'nope' is not a file; packaged configs: {shipped}$"):
        load_config("nope")
