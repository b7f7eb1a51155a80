"""The RL loop: rollout, update, measure. Read :func:`train` and :func:`rl_step` first.

Each step (:func:`rl_step`):

1. :func:`~sspo_analysis.training.rollout.rollout`: draw P prompts, sample G completions
   each from the behaviour policy (the policy ``algo.staleness`` optimiser updates old),
   grade them, form group-normalised advantages (Dr.GRPO: no std);
2. :func:`~sspo_analysis.training.measure.measure_before`: the policy's entropy on the
   batch before the updates (and ``grad H`` for the Taylor prediction);
3. :func:`~sspo_analysis.training.update.update`: ``algo.updates_per_batch`` minibatch AdamW
   updates with the configured objective, gradient clipping and the LR schedule; a
   non-finite loss or gradient norm skips the update (counted, logged);
4. :mod:`~sspo_analysis.training.measure`: the objective's metrics per minibatch, the
   entropy after the updates and its predictions, KLs; one line to ``RUN/metrics.jsonl``,
   every N steps the token log-ratios, and an atomic checkpoint.
"""

from __future__ import annotations

import collections
import copy
import json
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sspo_analysis.failure import Monitor, NonFiniteError, Verdict, nonfinite_parameters
from sspo_analysis.io import atomic_path, json_safe, write_json, write_text
from sspo_analysis.training.config import TrainConfig, resolve_config
from sspo_analysis.training.health import SignalWatch
from sspo_analysis.training.heldout import evaluate_heldout, heldout_set, keep_heldout
from sspo_analysis.training.inputs import check_before_loading, check_chat, check_prompt_lengths
from sspo_analysis.training.measure import (
    dump_log_ratios,
    entropy_change_metrics,
    kl_metrics,
    measure_before,
    reduce_updates,
    rollout_metrics,
    update_metrics,
)
from sspo_analysis.training.models import checkpoint_dtype, load_model
from sspo_analysis.training.outputs import Reporters, TrackerStartError, progress_bar, sample_rows, save_final
from sspo_analysis.training.rollout import eos_ids, format_prompts, rollout
from sspo_analysis.training.runs import (
    RunInterrupted,
    check_output_dir,
    checkpointed_rows,
    claim_run,
    clear_run,
    count_lines,
    damaged_checkpoint,
    is_file_error,
    is_honoured,
    keep_lines,
    read_checkpoint,
    recorded_config,
    run_lock,
    temp_path,
)
from sspo_analysis.training.state import RunState, params_of, run_device
from sspo_analysis.training.tasks import make_task_from
from sspo_analysis.training.update import lr_lambda, update
from sspo_analysis.training.warm_start import ensure_warm_start

__all__ = ["TIMING_KEYS", "train", "rl_step", "build_policy"]

TIMING_KEYS = ("wall_time", "step_time", "tokens_per_s", "sequences_per_s")
"""Metric keys that measure time: they differ between a straight and a resumed run."""


def rl_step(state: RunState, step: int, run: Path) -> dict[str, Any]:
    """One RL step: rollout, measure the policy, update it, measure again. Returns the metrics line."""
    log, t0 = state.cfg.log, time.time()
    roll = rollout(state)
    before = measure_before(state, roll)
    updates = update(state, roll)
    line: dict[str, Any] = {"step": step, **rollout_metrics(roll), "entropy": before.entropy}
    line.update(reduce_updates([update_metrics(state, roll, u) for u in updates]))
    line.update(kl_metrics(roll, before))
    line.update(entropy_change_metrics(state, roll, before))
    dt = time.time() - t0
    line.update(step_time=dt, generation_time=roll.generation_time, tokens_per_s=float(roll.mask.sum()) / dt,
                sequences_per_s=roll.size / dt)
    if log.log_ratios_every and step % log.log_ratios_every == 0:
        dump_log_ratios(run / "log_ratios" / f"step_{step:06d}.npz", roll, updates)
    if log.samples_every and step % log.samples_every == 0:
        line["samples"] = sample_rows(roll, log.samples_per_step)  # to RUN/samples.jsonl, not metrics.jsonl
    return line


def train(config: TrainConfig | str | Path | None = None, out_dir: str | Path | None = None, *,
          overrides=(), resume: bool = False, progress: bool | None = None) -> Path:
    """Run RL on the configured task; returns the run directory.

    The run directory is owned by this process while it trains (``RUN/.lock``; a second
    writer gets :class:`~sspo_analysis.training.runs.RunBusyError`). A run ends with
    ``DONE``, or with ``DIVERGED`` (JSON: step, kind, reason; see
    :mod:`sspo_analysis.failure`) when it diverges, which stops it.

    Args:
        config: a :class:`TrainConfig`, a TOML path, or None for the defaults.
        out_dir: the run directory (default ``runs/<objective>_seed<seed>_<time>``).
        overrides: ``"section.field=value"`` strings.
        resume: continue ``out_dir`` from its checkpoint with its recorded config. Overrides
            are honoured (more ``steps`` extend even a finished run) or refused with a
            ValueError naming each field that would change the run's meaning
            (:func:`~sspo_analysis.training.runs.refused_changes`). A finished run without
            overrides is returned as is.
        progress: show the progress bar (default ``log.progress``).
    """
    recorded, cfg, run = _open_run(config, out_dir, overrides, resume)
    try:
        with run_lock(run):
            if not claim_run(recorded, cfg, run):
                return run
            _train_locked(cfg, run, resume, progress, write_config=recorded is None or recorded != cfg)
    except OSError as err:
        if is_file_error(err):
            raise ValueError(f"run {str(run)!r}: {err.strerror}: {err.filename or run}") from err
        raise
    except KeyboardInterrupt as err:  # Ctrl-C: the checkpoint and the metrics are consistent; say how to go on
        raise RunInterrupted(run, count_lines(run / "metrics.jsonl"), (run / "config.toml").is_file()) from err
    return run


def _open_run(config, out_dir, overrides, resume: bool) -> tuple[TrainConfig | None, TrainConfig, Path]:
    """``(recorded, cfg, run)``: the run's recorded config (None for a new run), the one to run, its directory.

    Everything here is checked before any model is loaded: the config, and the output path.
    """
    if resume:
        if out_dir is None or not (Path(out_dir) / "config.toml").is_file():
            raise ValueError(f"--resume: {str(out_dir)!r} is not a run directory (no config.toml)")
        run = Path(out_dir)
        # the honoured overrides apply to the record too: a run made with threads = 16 resumes here with threads = 2
        honoured = [o for o in overrides or () if is_honoured(o.split("=", 1)[0].strip())]
        recorded, cfg = recorded_config(run, honoured), recorded_config(run, list(overrides or ()))
        run_device(cfg)  # a device this machine lacks is refused here, before any file changes
        return recorded, cfg, run
    cfg = resolve_config(config, overrides)
    run_device(cfg)  # ... and before any folder is made
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = Path(out_dir) if out_dir else Path("runs") / f"{cfg.objective.name}_seed{cfg.seed}_{stamp}"
    check_output_dir(run, "out")
    return None, cfg, run


def _train_locked(cfg: TrainConfig, run: Path, resume: bool, progress: bool | None, write_config: bool) -> None:
    """Train ``run`` (owned by this process) to ``DONE`` or ``DIVERGED``."""
    show = cfg.log.progress if progress is None else progress
    state = _setup(cfg, run, show)
    metrics_path = run / "metrics.jsonl"
    counters = {"step": 0, "elapsed": 0.0, "metrics_lines": 0, "skipped_total": 0}
    kept: list[dict[str, Any]] = []
    if resume and (run / "checkpoint" / "state.pt").exists():
        counters, kept = _resume_point(state, run)
    # the resume is known to succeed: only now do the run's files change
    if write_config:
        write_text(run / "config.toml", cfg.to_toml(), temp_path(run / "config.toml"))
    (run / "DONE").unlink(missing_ok=True)  # more steps: continue a finished run from its final checkpoint
    keep_lines(metrics_path, counters["metrics_lines"])  # drop lines written after the checkpoint
    monitor, watch = Monitor(cfg.algo.updates_per_batch), SignalWatch()
    for row in kept:
        monitor.update(row)
        _warn_no_signal(watch, row)
    if cfg.algo.staleness and not state.snapshots:
        state.snapshot()
    if state.heldout is not None:
        keep_heldout(run / "heldout.jsonl", counters["step"])
        if counters["step"] == 0:  # the starting policy's score: every run's gain is measured from it
            _log_heldout(state, run, 0)
    try:
        verdict = _loop(state, run, counters, monitor, show, watch)
    except TrackerStartError:
        if not resume:  # a new run refused before its first step leaves no trace
            clear_run(run)
        raise
    if verdict.diverged:
        if state.heldout is not None:  # the policy as it broke, so a stopped run's final score is not its best
            _log_heldout(state, run, verdict.step)
        write_json(run / "DIVERGED", verdict.to_dict(), temp_path(run / "DIVERGED"))
    else:
        # RUN/final: a transformers checkpoint of the trained policy, in the dtype of the one it started from
        save_final(run, state.policy, state.tok, checkpoint_dtype(cfg.model.path))
        write_text(run / "DONE", f"finished {cfg.steps} steps\n" + (f"{watch.message}\n" if watch.message else ""),
                   temp_path(run / "DONE"))


def _setup(cfg: TrainConfig, run: Path, show: bool) -> RunState:
    """Build the policy (making the warm start if needed), seed everything, and return the run's state."""
    objective = cfg.build_objective()
    device = run_device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = make_task_from(cfg)
    check_before_loading(cfg, task)
    policy, tok = build_policy(cfg, device, progress=show)
    check_chat(task, tok, cfg.task.chat_template)
    context = getattr(policy.config, "max_position_embeddings", None)
    if cfg.model.path and context:
        check_prompt_lengths(task, tok, int(context), cfg.rollout.max_new_tokens,
                             lambda p: format_prompts(tok, p, cfg.task.chat_template))
    run.mkdir(parents=True, exist_ok=True)
    _seed_all(cfg.seed)
    a, o = cfg.algo, cfg.optim
    # exact: foreach, a few multi-tensor kernels instead of a loop over the parameters (which costs more than the
    # arithmetic for small models), bitwise the loop's update. fast: one fused kernel, rounding differently.
    fused = {"fused": True} if cfg.model.kernels == "fast" else {"foreach": True}
    opt = torch.optim.AdamW(params_of(policy), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay, **fused)
    reference = None
    if a.kl_coef > 0 or a.track_kl_ref:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    # staleness: the behaviour policy is the one `staleness` optimiser updates old
    sampler = copy.deepcopy(policy).eval().requires_grad_(False) if a.staleness else policy
    return RunState(cfg=cfg, objective=objective, policy=policy, sampler=sampler, reference=reference,
                    snapshots=collections.deque(maxlen=a.staleness + 1), opt=opt,
                    sched=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)), tok=tok, task=task,
                    gen=torch.Generator(device=device).manual_seed(cfg.seed),  # sampling and minibatch order
                    np_rng=np.random.default_rng(cfg.seed), device=device, eos_ids=eos_ids(policy, tok),
                    heldout=heldout_set(task, cfg.log.eval_prompts) if cfg.log.eval_every else None)


def build_policy(cfg: TrainConfig, device: torch.device, progress: bool | None = None):
    """``(model, tokenizer)``: from ``model.path``, the warm start, or a random preset."""
    if cfg.model.path:
        model, tok = load_model(path=cfg.model.path, tokenizer=cfg.model.tokenizer)
    elif cfg.model.warm_start:
        model, tok = load_model(path=str(ensure_warm_start(cfg, progress)))
    else:
        model, tok = load_model(cfg.model.preset, seed=cfg.seed)
    model.to(device)
    if cfg.model.gradient_checkpointing:
        # transformers renamed it (the old name warns from 5.2x on); the floor, 5.0, has only the old one
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tok


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _loop(state: RunState, run: Path, counters: dict[str, Any], monitor: Monitor, show: bool,
          watch: SignalWatch) -> Verdict:
    """Steps ``counters["step"] + 1 .. cfg.steps``, one metrics line and the checkpoints; stops on divergence."""
    cfg = state.cfg
    ckpt_path = run / "checkpoint" / "state.pt"
    t_run = time.time() - counters["elapsed"]
    state.policy.train()
    with Reporters(run, cfg, counters["step"]) as report, progress_bar(show) as bar, \
            (run / "metrics.jsonl").open("a") as metrics_file:
        task_id = bar.add_task("train", total=cfg.steps, completed=counters["step"], info="")
        for step in range(counters["step"] + 1, cfg.steps + 1):
            try:
                line = rl_step(state, step, run)
            except NonFiniteError as err:  # sampling met NaN or inf logits: the policy is broken
                return Verdict(True, step, "nonfinite", f"{err} at step {step}")
            samples = line.pop("samples", [])
            counters["skipped_total"] += line["skipped_updates"]
            line.update(skipped_updates_total=counters["skipped_total"], wall_time=time.time() - t_run)
            line = json_safe(line)  # a non-finite metric is written as null
            metrics_file.write(json.dumps(line) + "\n")
            metrics_file.flush()
            report.log(line, step, samples)
            counters.update(step=step, metrics_lines=counters["metrics_lines"] + 1)
            bar.update(task_id, completed=step, info=f"reward {line['reward_mean']:.3f} "
                       f"entropy {line['entropy'] or float('nan'):.3f} lr {line['lr'] or float('nan'):.1e}")
            _warn_no_signal(watch, line)
            verdict = monitor.update(line)
            if verdict.diverged:
                return verdict
            if state.heldout is not None and (step % cfg.log.eval_every == 0 or step == cfg.steps):
                _log_heldout(state, run, step)
            if step % cfg.log.checkpoint_every == 0 or step == cfg.steps:
                bad = nonfinite_parameters(state.policy)
                if bad:
                    return Verdict(True, step, "nonfinite", f"non-finite parameters ({bad[0]}, ...) at step {step}")
                _save_checkpoint(state, ckpt_path, dict(counters, elapsed=time.time() - t_run))
    return monitor.verdict


def _warn_no_signal(watch: SignalWatch, row: dict[str, Any]) -> None:
    """Warn once when the run's first steps give no learning signal (:func:`~.health.no_signal`)."""
    message = watch.update(row)
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _log_heldout(state: RunState, run: Path, step: int) -> None:
    """Append the policy's held-out scores at ``step`` to ``RUN/heldout.jsonl`` (zeros when it cannot sample)."""
    try:
        row = evaluate_heldout(state.policy, state.tok, state.task, state.cfg, state.heldout, step)
    except NonFiniteError:  # non-finite logits: a broken policy answers nothing right
        k = state.cfg.log.eval_samples
        row = {"step": step, "sampled": 0.0, "greedy": 0.0, f"pass@{k}": 0.0, "prompts": len(state.heldout.prompts)}
    with (run / "heldout.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def _save_checkpoint(state: RunState, path: Path, counters: dict[str, Any]) -> None:
    """Everything :func:`_load_checkpoint` needs to continue exactly, written atomically (the temporary file is
    removed when the write fails; a full or read-only disk becomes one ValueError line)."""
    try:
        with atomic_path(path, temp_path(path)) as tmp:
            torch.save({"model": state.policy.state_dict(), "optimizer": state.opt.state_dict(),
                        "scheduler": state.sched.state_dict(), "snapshots": list(state.snapshots),
                        "rng": state.rng_state(), **counters}, tmp)
    except RuntimeError as err:  # torch reports a failed write (disk full) as a RuntimeError
        raise ValueError(f"checkpoint {str(path)!r}: could not be written ({str(err).splitlines()[0]}); "
                         "is the disk full or read-only?") from err


def _load_checkpoint(state: RunState, path: Path) -> dict[str, Any]:
    """Restore ``state`` from ``path``; returns the loop's counters (step, elapsed, metrics_lines, skipped_total).
    A damaged file (cut off, overwritten, empty, from another model) is one ValueError naming it."""
    ckpt = read_checkpoint(path)
    try:
        state.policy.load_state_dict(ckpt["model"])
        state.opt.load_state_dict(ckpt["optimizer"])
        state.sched.load_state_dict(ckpt["scheduler"])
        state.snapshots.extend(ckpt["snapshots"])
        state.set_rng_state(ckpt["rng"])
        return {k: ckpt[k] for k in ("step", "elapsed", "metrics_lines", "skipped_total")}
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as err:  # another model's, or cut short
        raise damaged_checkpoint(path, err) from err


def _resume_point(state: RunState, run: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The checkpoint's counters (``state`` restored) and the metrics rows it follows; changes no file."""
    counters = _load_checkpoint(state, run / "checkpoint" / "state.pt")
    return counters, checkpointed_rows(run / "metrics.jsonl", counters["metrics_lines"])
