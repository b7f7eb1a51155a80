"""Sweeps: every ``objective x seed`` of one config trained from one warm start, one directory per run.

:func:`sweep` runs them (reusing, extending or resuming what is already there); :func:`check_sweep` makes the
same checks without running.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from sspo_analysis.io import write_text
from sspo_analysis.training.config import TrainConfig, flatten_overrides, load_config
from sspo_analysis.training.runs import (
    RunBusyError,
    clear_run,
    config_changes,
    count_lines,
    recorded_config,
    refused_changes,
    run_lock,
)
from sspo_analysis.training.trainer import train

__all__ = ["check_sweep", "sweep"]


def sweep(objectives, seeds, base_config: TrainConfig | str | Path | None = None, out_dir: str | Path = "runs/sweep",
          overrides=(), *, tag: str = "", progress: bool | None = None, rerun: bool = False) -> list[Path]:
    """Run every ``objective x seed`` from one warm start, one directory per run.

    Runs go to ``out_dir/<objective>_seed<seed>[_<tag>]``. A finished run (``DONE`` or
    ``DIVERGED``) is reused and a killed one resumes, but only when its recorded config
    gives the requested run (:func:`~sspo_analysis.training.runs.refused_changes`; more
    ``steps`` extend it); otherwise the sweep refuses before any run starts, naming the
    differing fields, unless ``rerun`` (then those runs start again from scratch). A
    crashed run writes ``FAILED`` (the traceback) and the sweep goes on; so does one
    whose directory cannot be made. Returns the finished run directories, diverged ones
    included (their ``DIVERGED`` says why). All configs are validated before the first run.
    """
    configs, runs, stale = _plan_sweep(objectives, seeds, base_config, out_dir, overrides, tag, rerun)
    finished = []
    for key, cfg in configs.items():
        run = runs[key]
        try:
            _finish_run(cfg, run, progress, run in stale)
            finished.append(run)
        except RunBusyError as err:  # another process owns it: not ours to mark
            print(f"sweep: run {run} skipped: {err}")
        except Exception:  # a crashed run must not stop the others
            _record_failure(run, traceback.format_exc())
    return finished


def check_sweep(objectives, seeds, base_config: TrainConfig | str | Path | None = None,
                out_dir: str | Path = "runs/sweep", overrides=(), *, tag: str = "") -> None:
    """What :func:`sweep` checks before its first run, without running: every config is valid, and every
    existing run directory was made with the requested settings (a ValueError naming the fields otherwise)."""
    _plan_sweep(objectives, seeds, base_config, out_dir, overrides, tag, rerun=False)


def _plan_sweep(objectives, seeds, base_config, out_dir, overrides, tag: str,
                rerun: bool) -> tuple[dict[tuple[str, int], TrainConfig], dict[tuple[str, int], Path], set[Path]]:
    """``(configs, run directories, stale runs)`` of a sweep, validated (see :func:`sweep`)."""
    configs = _sweep_configs(objectives, seeds, base_config, overrides)
    runs = {key: Path(out_dir) / f"{key[0]}_seed{key[1]}{'_' + tag if tag else ''}" for key in configs}
    return configs, runs, _stale_runs(configs, runs, rerun)


def _record_failure(run: Path, text: str) -> None:
    """Write ``RUN/FAILED``, or say why it cannot be written (the run's path is a file, ...)."""
    try:
        run.mkdir(parents=True, exist_ok=True)
        write_text(run / "FAILED", text)
        print(f"sweep: run {run} failed; see {run / 'FAILED'}")
    except OSError as err:
        print(f"sweep: run {run} failed and could not be recorded ({err.strerror}): {text.splitlines()[-1]}")


def _stale_runs(configs: dict[tuple[str, int], TrainConfig], runs: dict[tuple[str, int], Path],
                rerun: bool) -> set[Path]:
    """The runs made with settings that differ from the requested ones; ValueError naming them unless ``rerun``."""
    stale, messages = set(), []
    for key, cfg in configs.items():
        run = runs[key]
        if not _has_progress(run):
            continue
        try:
            refused = refused_changes(recorded_config(run), cfg, count_lines(run / "metrics.jsonl"))
        except ValueError as err:  # an unreadable or outdated config.toml
            refused = [f"config.toml ({err})"]
        if refused:
            stale.add(run)
            messages.append(f"{run}: {', '.join(refused)}")
    if messages and not rerun:
        raise ValueError(f"sweep: {len(messages)} existing run(s) were made with other settings ({'; '.join(messages)}"
                         "); use --rerun (rerun=True) to run them again, or another --out or --tag")
    return stale


def _has_progress(run: Path) -> bool:
    """Whether ``run`` holds a result or a checkpoint worth reusing."""
    markers = ("DONE", "DIVERGED", "checkpoint/state.pt")
    return run.is_dir() and (run / "config.toml").is_file() and any((run / m).exists() for m in markers)


def _sweep_configs(objectives, seeds, base_config, overrides) -> dict[tuple[str, int], TrainConfig]:
    """The validated config of every ``(objective, seed)`` (comma-separated strings or lists)."""
    if isinstance(objectives, str):
        objectives = [x for x in objectives.split(",") if x]
    if isinstance(seeds, (str, int)):
        try:
            seeds = [int(x) for x in str(seeds).split(",") if x.strip() != ""]
        except ValueError:
            raise ValueError(f"--seeds: expected comma-separated integers, got {seeds!r}") from None
    base_over = list(overrides or ())
    if isinstance(base_config, TrainConfig):
        base_over = flatten_overrides(base_config) + base_over
        base_config = None
    configs = {}
    for name in objectives:
        for seed in seeds:
            cfg = load_config(base_config, base_over + [f'objective.name="{name}"', f"seed={int(seed)}"])
            if cfg.objective.name != name:  # objective params of another objective would not apply
                raise ValueError(f"objective.name: {name!r} did not apply")
            configs[(name, seed)] = cfg
    return configs


def _finish_run(cfg: TrainConfig, run: Path, progress: bool | None, restart: bool) -> None:
    """Leave a finished run in ``run``: reuse it, extend or resume it, or start it afresh (``restart``)."""
    if _has_progress(run) and not restart:
        if (run / "DIVERGED").exists():
            return
        changed = set(config_changes(recorded_config(run), cfg))
        extra = [s for s in flatten_overrides(cfg) if s.split("=", 1)[0] in changed]
        train(None, run, overrides=extra, resume=True, progress=progress)
    else:
        if run.is_dir():
            with run_lock(run):  # never delete a run another process is writing
                clear_run(run)  # the trainer's own files, by name: a user's files in the folder stay
        train(cfg, run, progress=progress)
    (run / "FAILED").unlink(missing_ok=True)
