"""The training runs behind figures 5-8 and the results table, made with the package's trainer.

One warm start (``sspo_analysis.training``'s cached supervised phase, in the
trainer's one cache) serves every run. The plan (:func:`plan`):

- main grid: every objective of :data:`paper_figures.TRAINED_OBJECTIVES` x the
  seeds, staleness 0, ``updates_per_batch = 4`` (off-policy from the second
  minibatch on);
- staleness grid: a few objectives at staleness k in {2, 8} (k = 0 is the main grid).

Runs live in ``<runs_dir>/<mode>/k<k>/<objective>_seed<seed>`` and are made by
:func:`sspo_analysis.training.sweep` one run per job, two jobs at a time (one
torch thread each, the two cores of the target machine). A finished run
(``DONE``) is reused as it is, a killed one resumes from its checkpoint, and a
crashed one is recorded (``FAILED``) and counted as diverged; so a second call
only replots. A finished run keeps what the figures read (``config.toml``,
``metrics.jsonl``, and for the main grid the log-ratio dumps of figure 8); its
checkpoint and ``final/`` model are deleted (:func:`drop_checkpoints`) unless
``Context.keep_checkpoints``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paper_figures import TRAINED_OBJECTIVES, Context, Settings
from sspo_analysis.study.execute import run_state, train_job, warm_start
from sspo_analysis.study.pools import open_pool

WORKERS = 2
"""Runs trained at once (each with one torch thread)."""


@dataclass(frozen=True)
class FigureRun:
    objective: str
    seed: int
    staleness: int
    group: Path  # the sweep directory the run lives in

    @property
    def name(self) -> str:
        return f"{self.objective}_k{self.staleness}_seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.group / f"{self.objective}_seed{self.seed}"


def runs_root(ctx: Context) -> Path:
    """``<runs_dir>/<quick|full>``: quick and full runs never mix."""
    base = ctx.runs_dir if ctx.runs_dir is not None else Path("figures") / "runs"
    return Path(base) / ctx.settings.name


def overrides(settings: Settings, staleness: int) -> list[str]:
    """The trainer settings (``section.field=value``) every run of a mode shares, at staleness ``k``; the warm start
    comes from the trainer's one cache (``$SSPO_CACHE`` or ``~/.cache/sspo_analysis``), which ``sspo train``, the
    notebooks and the study share, so the same warm start is trained once."""
    return [
        "threads=1",
        "log.progress=false",
        f'model.preset="{settings.preset}"',
        f"steps={settings.train_steps}",
        f"task.digits={settings.task_digits}",
        "algo.updates_per_batch=4",
        f"algo.staleness={staleness}",
        # log-ratio dumps only where a figure reads them: figure 8 reads the main grid's (k = 0)
        f"log.log_ratios_every={settings.log_ratios_every if staleness == 0 else 0}",
    ]


def plan(ctx: Context) -> list[FigureRun]:
    """Every run the figures need, main grid first."""
    st, root = ctx.settings, runs_root(ctx)
    specs = [FigureRun(o, s, 0, root / "k0") for o in TRAINED_OBJECTIVES for s in st.seeds]
    for k in st.staleness:
        if k == 0:
            continue
        specs += [FigureRun(o, s, k, root / f"k{k}") for o in st.staleness_objectives for s in st.staleness_seeds]
    return specs


def describe_settings(ctx: Context) -> str:
    """One line on how the runs were made, for ``results.md``."""
    st = ctx.settings
    return (f"Mode `{st.name}`: `{st.preset}` Qwen2 preset on {st.task_digits}-digit addition, "
            "one supervised warm start; "
            f"{st.train_steps} RL steps of 16 prompts x 8 samples, 4 updates per rollout batch; seeds "
            f"{', '.join(map(str, st.seeds))} per objective (staleness 0); staleness k in "
            f"{{{', '.join(map(str, st.staleness))}}} for {', '.join(st.staleness_objectives)} "
            f"(seeds {', '.join(map(str, st.staleness_seeds))}). Mean ± std over seeds.")


def ensure_runs(ctx: Context) -> list[dict[str, Any]]:
    """Train whatever the plan lacks; returns one dict per run (``name, objective, seed, staleness, run_dir, done``)."""
    from sspo_analysis.training import load_config
    from sspo_analysis.training.warm_start import ready_warm_start, warm_start_dir

    specs = plan(ctx)
    root = runs_root(ctx)
    todo = [s for s in specs if not (s.run_dir / "DONE").exists()]
    for s in specs:
        if s in todo:
            continue
        _check_reusable(s, ctx.settings)
    if todo:
        over = overrides(ctx.settings, 0)
        cfg = load_config(None, over)  # validates every setting before any work
        ready = ready_warm_start(cfg)
        ctx.report(f"{len(specs) - len(todo)} of {len(specs)} runs reused; training {len(todo)} under {root}")
        ctx.advance(0, len(todo), "training runs: warm start (shipped, cached, or made once)")
        ctx.report(f"warm start: {ready} (ready)" if ready else f"warm start: {warm_start_dir(cfg)} (training it)")
        with open_pool("local", WORKERS) as pool:
            t0 = time.perf_counter()
            warm = pool.submit(warm_start, over).result()
            ctx.report(f"warm start {Path(warm).name} ready ({time.perf_counter() - t0:.0f} s)")
            futures = {pool.submit(train_job, s.objective, s.seed, str(s.group),
                                   overrides(ctx.settings, s.staleness), "", False): s for s in todo}
            _follow(ctx, futures)
    else:
        ctx.report(f"all {len(specs)} runs reused from {root}")
    if not ctx.keep_checkpoints:  # runs left by an earlier call, or by one with --keep-checkpoints
        freed = sum(drop_checkpoints(s.run_dir) for s in specs)
        if freed:
            ctx.report(f"deleted the checkpoints of finished runs made earlier ({freed / 2**20:.0f} MiB; "
                       "--keep-checkpoints keeps them)")
    return [{"name": s.name, "objective": s.objective, "seed": s.seed, "staleness": s.staleness,
             "run_dir": s.run_dir, "done": (s.run_dir / "DONE").exists()} for s in specs]


FINISHED = ("DONE", "DIVERGED")
"""A run with one of these files is finished: it is reused as it is and never resumed."""
CHECKPOINT_FILES = ("checkpoint/state.pt",)
"""What the trainer writes to resume a run: dropped once the run is finished (exact paths)."""
FINAL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json",
               "vocab.json", "merges.txt")
"""The files ``save_pretrained`` writes into ``RUN/final`` for the presets (exact names; anything else stays)."""


def drop_checkpoints(run_dir: Path) -> int:
    """Delete a finished run's checkpoint and ``final/`` model by their exact paths; returns the bytes freed.

    An unfinished run is left alone (it resumes from its checkpoint). ``checkpoint/``
    and ``final/`` are removed only when nothing else is left in them, so a file this
    code did not expect is never deleted.
    """
    run = Path(run_dir)
    if not any((run / name).is_file() for name in FINISHED):
        return 0
    files = [run / rel for rel in CHECKPOINT_FILES] + [run / "final" / name for name in FINAL_FILES]
    freed = 0
    for path in files:
        if path.is_file() and not path.is_symlink():
            freed += path.stat().st_size
            path.unlink()
    for folder in (run / "checkpoint", run / "final"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return freed


POLL_SECONDS = 2.0
"""How often the progress line of the training phase is refreshed (the runs in progress and their time)."""


def training_status(done: int, total: int, running: dict[str, float], now: float) -> str:
    """The progress line of the training phase: runs done, and each run in progress with its elapsed time.

    ``running`` maps a run's name to the time it was first seen running; the
    :data:`WORKERS` oldest are shown (the pool hands out one run ahead of time).
    """
    oldest = sorted(running.items(), key=lambda item: item[1])[:WORKERS]
    busy = ", ".join(f"{name} ({now - t0:.0f} s)" for name, t0 in oldest) or "starting"
    return f"training runs: {done}/{total} done ({WORKERS} at a time); running {busy}"


def _follow(ctx: Context, futures: dict) -> None:
    """Report each run as it ends and keep the progress line current (which runs train, for how long)."""
    from concurrent.futures import FIRST_COMPLETED, wait

    pending, done, started = set(futures), 0, {}
    while pending:
        finished, pending = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
        now = time.perf_counter()
        for fut in finished:
            spec = futures[fut]
            _, seconds = fut.result()
            done += 1
            started.pop(spec.name, None)
            ok = run_state(spec.run_dir) in ("done", "diverged")  # what the sweep returns as finished
            status = "done" if ok else f"FAILED (see {spec.run_dir / 'FAILED'})"
            ctx.report(f"run {spec.name}: {status} in {seconds:.0f} s")
            if not ctx.keep_checkpoints:  # at once, so that the disk never holds every run's checkpoint
                drop_checkpoints(spec.run_dir)
        for fut in pending:
            if fut.running():
                started.setdefault(futures[fut].name, now)
        ctx.advance(done, len(futures), training_status(done, len(futures), started, now))


def _check_reusable(spec: FigureRun, settings: Settings) -> None:
    """A finished run is reused only if it was made with this mode's settings."""
    from sspo_analysis.training.config import tomllib

    cfg = tomllib.loads((spec.run_dir / "config.toml").read_text())
    want = {"steps": settings.train_steps, "staleness": spec.staleness, "digits": settings.task_digits,
            "objective": spec.objective, "seed": spec.seed, "preset": settings.preset}
    got = {"steps": cfg.get("steps"), "staleness": cfg.get("algo", {}).get("staleness"),
           "preset": cfg.get("model", {}).get("preset"),
           "digits": cfg.get("task", {}).get("digits"), "objective": cfg.get("objective", {}).get("name"),
           "seed": cfg.get("seed")}
    if got != want:
        diff = ", ".join(f"{k}: {got[k]!r} (want {want[k]!r})" for k in want if got[k] != want[k])
        raise ValueError(f"--runs-dir: {spec.run_dir} was made with other settings ({diff}); "
                         "remove it or choose another --runs-dir")


def load_metrics(runs: list[dict[str, Any]]):
    """Every run's ``metrics.jsonl`` (``sspo_analysis.training.read_metrics``) in one tidy table.

    Columns: the trainer's metric keys plus ``run`` (the run's name), ``objective``,
    ``seed``, ``staleness``. Runs without metrics contribute no rows.
    """
    import pandas as pd

    from sspo_analysis.training import read_metrics

    frames = []
    for run in runs:
        if not (Path(run["run_dir"]) / "metrics.jsonl").exists():
            continue
        df = read_metrics(run["run_dir"])
        if df.empty:
            continue
        frames.append(df.assign(run=run["name"], objective=run["objective"], seed=run["seed"],
                                staleness=run["staleness"]))
    if not frames:
        raise ValueError("training runs: no run produced metrics; see the FAILED files under the runs directory")
    out = pd.concat(frames, ignore_index=True)
    numeric = [c for c in out.columns if c not in ("run", "objective")]
    out[numeric] = out[numeric].apply(pd.to_numeric, errors="coerce")  # null (non-finite) -> NaN
    return out


def training_data(ctx: Context):
    """``(metrics, runs)`` for this context: the runs are made (or reused) once per call."""

    def compute():
        runs = ensure_runs(ctx)
        return load_metrics(runs), runs

    return ctx.cached("training", compute)


def theory_on_logged_ratios(ctx: Context):
    """Figure 8's numbers: theory on each logged step's log-ratios against the same step's measurements.

    For every finished run of the main grid and every step with logged log-ratios
    (``RUN/log_ratios/step_*.npz``), one row with the step's measured
    ``coef_norm_var``, ``dead_frac`` and ``log_ratio_std`` and the predictions of
    :func:`sspo_analysis.analysis.predict_from_log_ratios` (``empirical_*`` from the
    logged sequences themselves, ``lognormal_*`` from their two moments).
    """
    import pandas as pd

    from sspo_analysis.analysis import predict_from_log_ratios
    from sspo_analysis.training import read_log_ratios
    from sspo_analysis.training.config import tomllib

    metrics, runs = training_data(ctx)
    rows = []
    main = [r for r in runs if r["staleness"] == 0 and r["done"]]
    for i, run in enumerate(main):
        ctx.advance(i, len(main), f"theory on logged log-ratios: {run['name']}")
        cfg = tomllib.loads((Path(run["run_dir"]) / "config.toml").read_text())["objective"]
        params = {k: v for k, v in cfg.items() if k not in ("name", "agg", "horizon")}
        m = metrics[metrics.run == run["name"]].set_index("step")
        for step, data in read_log_ratios(run["run_dir"]).items():
            if step not in m.index:
                continue
            rows.append({"objective": run["objective"], "seed": run["seed"], "step": int(step),
                         "coef_norm_var": float(m.loc[step, "coef_norm_var"]),
                         "dead_frac": float(m.loc[step, "dead_frac"]),
                         "log_ratio_std": float(m.loc[step, "log_ratio_std"]),
                         **predict_from_log_ratios(run["objective"], params, data)})
    ctx.advance(len(main), len(main), "theory on logged log-ratios")
    return pd.DataFrame(rows)
