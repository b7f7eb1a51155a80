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
import hashlib
import json
import os
import random
import shutil
import sys
import time
import traceback
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sspo_analysis.io import atomic_path, json_safe, write_json, write_text
from sspo_analysis.training.config import TrainConfig, load_config
from sspo_analysis.training.health import Monitor, NonFiniteError, SignalWatch, Verdict, nonfinite_parameters
from sspo_analysis.training.heldout import HeldOut, evaluate_heldout, heldout_set, score
from sspo_analysis.training.inputs import check_alphabet, check_chat, check_prompt_lengths
from sspo_analysis.training.measure import (
    dump_log_ratios,
    entropy_change_metrics,
    kl_metrics,
    measure_before,
    reduce_updates,
    rollout_metrics,
    update_metrics,
)
from sspo_analysis.training.models import checkpoint_dtype, load_model, quiet_transformers_bars
from sspo_analysis.training.outputs import Reporters, TrackerStartError, sample_rows, save_final
from sspo_analysis.training.rollout import eos_ids, format_prompts, rollout
from sspo_analysis.training.runs import (
    RunBusyError,
    RunInterrupted,
    check_output_dir,
    checkpointed_rows,
    clear_run,
    config_changes,
    damaged_checkpoint,
    is_file_error,
    is_honoured,
    pid_alive,
    read_checkpoint,
    recorded_config,
    refused_changes,
    remove_leftovers,
    run_lock,
    temp_path,
)
from sspo_analysis.training.state import RunState, autocast, params_of
from sspo_analysis.training.tasks import Task, make_task
from sspo_analysis.training.update import lr_lambda, update

__all__ = ["TIMING_KEYS", "train", "pretrain", "evaluate", "sweep", "check_sweep", "read_metrics", "read_log_ratios",
           "load_config", "ensure_warm_start", "build_policy", "cache_root", "warm_start_key", "make_task_from",
           "check_room", "format_prompts", "params_of", "rl_step"]

TIMING_KEYS = ("wall_time", "step_time", "tokens_per_s", "sequences_per_s")
"""Metric keys that measure time: they differ between a straight and a resumed run."""


# --------------------------------------------------------------------------- setup helpers


def _resolve(config: TrainConfig | str | Path | None, overrides) -> TrainConfig:
    """A validated config from a TrainConfig, a TOML path or None (defaults), with overrides on top."""
    if isinstance(config, TrainConfig):
        if overrides:
            return load_config(None, _flatten_overrides(config) + list(overrides))
        return config.validate()
    return load_config(config, list(overrides or ()))


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but no CUDA device is available; allowed here: cpu, auto")
    return torch.device(cfg.device)


def make_task_from(cfg: TrainConfig) -> Task:
    t = cfg.task
    sandbox = dict(grader=t.grader, timeout_s=t.sandbox_timeout_s, memory_mb=t.sandbox_memory_mb, sandbox=t.sandbox)
    params = {"addition": dict(digits=t.digits), "reversal": dict(length=t.length, grader=t.grader),
              "countdown": dict(numbers=t.numbers, max_value=t.max_value),
              "jsonl": dict(path=t.path, grader=t.grader, prompt_key=t.prompt_key, answer_key=t.answer_key),
              "code": dict(path=t.path, prompt_key=t.prompt_key, tests_key=t.tests_key,
                           entry_point_key=t.entry_point_key, **sandbox),
              "synthesis": sandbox}
    return make_task(t.name, **params[t.name])


def check_room(cfg: TrainConfig, task: Task, tokenizer) -> None:
    """Fail early when a built-in task's answers (plus ``<eos>``) cannot fit in ``rollout.max_new_tokens``."""
    if cfg.task.name == "code" and cfg.model.warm_start:
        raise ValueError("model.warm_start: task 'code' has no reference solutions to warm-start from; "
                         "set model.path (a checkpoint that writes code) or model.warm_start = false")
    if cfg.task.name in ("jsonl", "code"):
        return
    _, answers = task.sample(np.random.default_rng(12345), 256)
    need = max(len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers) + 1
    if need > cfg.rollout.max_new_tokens:
        raise ValueError(f"rollout.max_new_tokens: {cfg.rollout.max_new_tokens} is too small for task "
                         f"{cfg.task.name!r} (answers need up to {need} tokens with <eos>); allowed: >= {need}")


def cache_root(cfg: TrainConfig) -> Path:
    """The warm-start cache: ``warm_start.dir``, else ``$SSPO_CACHE``, else ``~/.cache/sspo_analysis``."""
    root = cfg.warm_start.dir or os.environ.get("SSPO_CACHE") or Path.home() / ".cache" / "sspo_analysis"
    return Path(root)


def warm_start_key(cfg: TrainConfig) -> str:
    """Hash of everything the warm start depends on."""
    d = cfg.to_dict()
    w = dict(d["warm_start"])
    w.pop("dir")
    key = {"v": 1, "preset": cfg.model.preset, "task": d["task"], "warm_start": w,
           "temperature": cfg.rollout.temperature, "max_new_tokens": cfg.rollout.max_new_tokens,
           "forward": cfg.model.forward}  # its evaluations sample with it
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def warm_start_dir(cfg: TrainConfig) -> Path:
    """Where the warm start of ``cfg`` is cached: one directory per key, under the one cache of every entry point
    (``sspo train``, ``sspo figures``, the study, the notebooks); ``warm_start.dir`` or ``$SSPO_CACHE`` move it."""
    return cache_root(cfg) / "warm_start" / f"{cfg.model.preset}-{cfg.task.name}-{warm_start_key(cfg)}"


SHIPPED_WARM_STARTS = Path(__file__).resolve().parent.parent / "warm_starts"
"""The warm starts that ship with the package (``sspo_analysis/warm_starts/<name>``, named as in the cache): the
figures' and the tuned study's, so that every machine starts from the same weights and trains no supervised phase."""


def shipped_warm_start(cfg: TrainConfig) -> Path | None:
    """The shipped warm start of ``cfg``, or None (none ships for it, or ``warm_start.dir`` names a cache of the
    user's own, which then holds the only warm starts used)."""
    if cfg.warm_start.dir:
        return None
    path = SHIPPED_WARM_STARTS / warm_start_dir(cfg).name
    return path if (path / "warm_start.json").is_file() else None


def ready_warm_start(cfg: TrainConfig) -> Path | None:
    """The warm start ``cfg`` would start from without training one (shipped first, then cached), or None."""
    cached = warm_start_dir(cfg)
    return shipped_warm_start(cfg) or (cached if (cached / "warm_start.json").exists() else None)


def ensure_warm_start(cfg: TrainConfig, progress: bool | None = None) -> Path:
    """The warm start for ``cfg`` (preset + task + warm_start settings): the shipped one, else the cached one, else
    one made now into the cache (``sspo pretrain --out DIR`` remakes any of them elsewhere)."""
    ready = ready_warm_start(cfg)
    if ready is not None:
        return ready
    target = warm_start_dir(cfg)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a killed process
        pid = stale.name.split(".")[-2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    pretrain(cfg, tmp, progress=progress)
    try:
        os.replace(tmp, target)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), disable=not enabled, transient=False)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- warm start


class WarmStartProgress:
    """The warm start's progress: rich's bar on a terminal or in Jupyter; elsewhere (a log file, a pipe) one plain
    line on stderr per evaluation, at most every :attr:`LOG_SECONDS` (and the last), so a log shows where time goes.
    """

    LOG_SECONDS = 10.0

    def __init__(self, enabled: bool, total: int) -> None:
        from rich.console import Console

        self.total, self.start, self.logged, self.unlogged = total, time.time(), 0.0, ""
        self.live = enabled and (Console().is_terminal or Console().is_jupyter)
        self.lines = enabled and not self.live
        self.bar = _progress(self.live)
        self.task_id = self.bar.add_task("warm start", total=total, info="")

    def __enter__(self) -> WarmStartProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)
        if self.unlogged:  # the last evaluation, if the time limit held it back
            print(self.unlogged, file=sys.stderr, flush=True)

    def update(self, step: int, info: str | None = None) -> None:
        """``step`` done; ``info`` (the evaluation's loss and success) when it evaluated."""
        if info is None:
            self.bar.update(self.task_id, completed=step)
            return
        self.bar.update(self.task_id, completed=step, info=info)
        if not self.lines:
            return
        now = time.time()
        self.unlogged = f"warm start: step {step}/{self.total}, {info}, {now - self.start:.0f} s"
        if now - self.logged >= self.LOG_SECONDS:
            print(self.unlogged, file=sys.stderr, flush=True)
            self.logged, self.unlogged = now, ""


def _sft_batch(tok, texts: list[str], answers: list[str], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(ids, attention, labels)`` for cross-entropy on ``answer<eos>`` after each prompt text (prompt: -100)."""
    full = [t + a + tok.eos_token for t, a in zip(texts, answers)]
    n_prompt = [len(tok(t, add_special_tokens=False).input_ids) for t in texts]
    enc = tok(full, padding=True, add_special_tokens=False, return_tensors="pt")
    ids, attn = enc.input_ids.to(device), enc.attention_mask.to(device)
    labels = ids.clone()
    pad_left = (attn == 0).sum(-1)
    pos = torch.arange(ids.shape[1], device=device)[None]
    is_prompt = pos < (pad_left + torch.tensor(n_prompt, device=device))[:, None]
    labels[is_prompt | (attn == 0)] = -100
    return ids, attn, labels


def _sft_step(model, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...], cfg: TrainConfig,
              device: torch.device) -> float:
    """One clipped AdamW step on the batch's cross-entropy; returns the loss."""
    ids, attn, labels = batch
    with autocast(cfg, device):
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def pretrain(config: TrainConfig | str | Path | None = None, out_dir: str | Path | None = None, *,
             overrides=(), progress: bool | None = None) -> Path:
    """Supervised warm start on the task until the sampled success rate reaches ``warm_start.target_success``.

    Trains the random-init preset with cross-entropy on ``answer<eos>``,
    evaluates every ``eval_every`` steps on ``eval_prompts`` fresh prompts sampled
    at the rollout temperature, stops at the target (or ``max_steps``), and saves
    a ``from_pretrained`` directory with ``warm_start.json`` (success, steps, seconds).
    """
    cfg = _resolve(config, overrides)
    out = Path(out_dir) if out_dir else cache_root(cfg) / "warm_start" / f"{cfg.model.preset}-{cfg.task.name}-manual"
    check_output_dir(out, "out")
    try:
        with run_lock(out):
            _pretrain_locked(cfg, out, progress)
    except OSError as err:
        if is_file_error(err):
            raise ValueError(f"out {str(out)!r}: {err.strerror}: {err.filename or out}") from err
        raise
    return out


def _pretrain_locked(cfg: TrainConfig, out: Path, progress: bool | None) -> None:
    """The supervised phase of :func:`pretrain`, writing into ``out`` (owned by this process)."""
    w = cfg.warm_start
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg)
    task = make_task_from(cfg)
    model, tok = load_model(cfg.model.preset, path=cfg.model.path or None, seed=w.seed, tokenizer=cfg.model.tokenizer)
    check_room(cfg, task, tok)
    model.to(device)
    rng = np.random.default_rng(w.seed)
    gen = torch.Generator(device=device).manual_seed(w.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, history, success = time.time(), [], 0.0
    with WarmStartProgress(cfg.log.progress if progress is None else progress, w.max_steps) as bar:
        for step in range(1, w.max_steps + 1):
            prompts, answers = task.sample(rng, w.batch_size)
            batch = _sft_batch(tok, format_prompts(tok, prompts, cfg.task.chat_template), answers, device)
            loss = _sft_step(model, opt, batch, cfg, device)
            if step % w.eval_every == 0 or step == w.max_steps:
                success = evaluate(model, tok, task, cfg, n=w.eval_prompts, seed=w.seed + 10_000, generator=gen)
                history.append({"step": step, "loss": loss, "success": success})
                bar.update(step, f"loss {loss:.3f} success {success:.2f} (target {w.target_success:g})")
                if success >= w.target_success:
                    break
            else:
                bar.update(step)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers_bars():
        model.save_pretrained(out)
        tok.save_pretrained(out)
    write_json(out / "warm_start.json", {"success": success, "steps": step, "seconds": time.time() - start,
                                         "history": history, "config": cfg.to_dict()},
               temp_path(out / "warm_start.json"))


def evaluate(model, tok, task: Task, cfg: TrainConfig, *, n: int = 256, seed: int = 0,
             generator: torch.Generator | None = None) -> float:
    """Mean reward of one completion sampled at the rollout settings on ``n`` fresh prompts."""
    prompts, answers = task.sample(np.random.default_rng(seed), n)
    return float(score(model, tok, task, cfg, HeldOut(tuple(prompts), tuple(answers)),
                       temperature=cfg.rollout.temperature, samples=1, generator=generator).mean())


# --------------------------------------------------------------------------- the RL loop


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
    :mod:`sspo_analysis.training.health`) when it diverges, which stops it.

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
            if not _claim(recorded, cfg, run):
                return run
            _train_locked(cfg, run, resume, progress, write_config=recorded is None or recorded != cfg)
    except OSError as err:
        if is_file_error(err):
            raise ValueError(f"run {str(run)!r}: {err.strerror}: {err.filename or run}") from err
        raise
    except KeyboardInterrupt as err:  # Ctrl-C: the checkpoint and the metrics are consistent; say how to go on
        raise RunInterrupted(run, _count_lines(run / "metrics.jsonl"), (run / "config.toml").is_file()) from err
    return run


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
    _keep_lines(metrics_path, counters["metrics_lines"])  # drop lines written after the checkpoint
    monitor, watch = Monitor(cfg.algo.updates_per_batch), SignalWatch()
    for row in kept:
        monitor.update(row)
        _warn_no_signal(watch, row)
    if cfg.algo.staleness and not state.snapshots:
        state.snapshot()
    if state.heldout is not None:
        _keep_heldout(run / "heldout.jsonl", counters["step"])
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


def _warn_no_signal(watch: SignalWatch, row: dict[str, Any]) -> None:
    """Warn once when the run's first steps give no learning signal (:func:`~.health.no_signal`)."""
    message = watch.update(row)
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _loop(state: RunState, run: Path, counters: dict[str, Any], monitor: Monitor, show: bool,
          watch: SignalWatch) -> Verdict:
    """Steps ``counters["step"] + 1 .. cfg.steps``, one metrics line and the checkpoints; stops on divergence."""
    cfg = state.cfg
    ckpt_path = run / "checkpoint" / "state.pt"
    t_run = time.time() - counters["elapsed"]
    state.policy.train()
    with Reporters(run, cfg, counters["step"]) as report, _progress(show) as bar, \
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
        _device(cfg)  # a device this machine lacks is refused here, before any file changes
        return recorded, cfg, run
    cfg = _resolve(config, overrides)
    _device(cfg)  # ... and before any folder is made
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = Path(out_dir) if out_dir else Path("runs") / f"{cfg.objective.name}_seed{cfg.seed}_{stamp}"
    check_output_dir(run, "out")
    return None, cfg, run


def _claim(recorded: TrainConfig | None, cfg: TrainConfig, run: Path) -> bool:
    """Under the lock: whether there is work to do in ``run`` (ValueError if the request cannot be honoured)."""
    remove_leftovers(run)  # our own temporary files, left by a process killed mid-write; we own the run now
    if recorded is None:
        if (run / "metrics.jsonl").exists() or (run / "checkpoint").exists():
            raise ValueError(f"out: {str(run)!r} already holds a run; use --resume or another directory")
        return True
    if (run / "DIVERGED").exists():
        raise ValueError(f"--resume: run {str(run)!r} diverged ({_diverged_reason(run)}); start a new run")
    done = recorded.steps if (run / "DONE").exists() else _count_lines(run / "metrics.jsonl")
    refused = refused_changes(recorded, cfg, done)
    if refused:
        raise ValueError(f"--resume: run {str(run)!r} cannot change {'; '.join(refused)} (it would change what "
                         "the run means); start a new run in another directory")
    if (run / "DONE").exists():
        if cfg.steps <= recorded.steps:
            return False
        if not (run / "checkpoint" / "state.pt").is_file():
            raise ValueError(f"--resume: run {str(run)!r} has no checkpoint to extend from; start a new run")
    _check_checkpoint_present(run, done)
    return True


def _check_checkpoint_present(run: Path, done: int) -> None:
    """ValueError when ``run`` has recorded more steps than its first checkpoint comes after but has no
    checkpoint: restarting would silently replace its metrics (a run killed before its first checkpoint
    has none to lose and restarts exactly)."""
    every = recorded_config(run).log.checkpoint_every  # as written, before this resume's overrides
    ckpt = run / "checkpoint" / "state.pt"
    if done >= every and not ckpt.exists():
        raise ValueError(f"--resume: {str(ckpt)!r} is missing, but metrics.jsonl records {done} steps (a checkpoint "
                         f"is written every {every}); the run cannot continue exactly; start a new run")


def _diverged_reason(run: Path) -> str:
    """The reason recorded in ``RUN/DIVERGED``."""
    try:
        return str(json.loads((run / "DIVERGED").read_text()).get("reason", "no reason recorded"))
    except (OSError, ValueError, AttributeError):
        return "no reason recorded"


def _log_heldout(state: RunState, run: Path, step: int) -> None:
    """Append the policy's held-out scores at ``step`` to ``RUN/heldout.jsonl`` (zeros when it cannot sample)."""
    try:
        row = evaluate_heldout(state.policy, state.tok, state.task, state.cfg, state.heldout, step)
    except NonFiniteError:  # non-finite logits: a broken policy answers nothing right
        k = state.cfg.log.eval_samples
        row = {"step": step, "sampled": 0.0, "greedy": 0.0, f"pass@{k}": 0.0, "prompts": len(state.heldout.prompts)}
    with (run / "heldout.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def _keep_heldout(path: Path, last_step: int) -> None:
    """Drop the held-out rows after ``last_step`` (written after the checkpoint a resume goes back to)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
    if len(kept) != len(lines):
        write_text(path, "".join(line + "\n" for line in kept), temp_path(path))


def _count_lines(path: Path) -> int:
    """The complete lines of ``path`` (0 when it is missing): the steps a metrics file records."""
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _setup(cfg: TrainConfig, run: Path, show: bool) -> RunState:
    """Build the policy (making the warm start if needed), seed everything, and return the run's state."""
    objective = cfg.build_objective()
    device = _device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = make_task_from(cfg)
    if cfg.model.path and cfg.model.tokenizer == "chars":
        from sspo_analysis.training.models import CHARS

        check_alphabet(task, CHARS, "task.path")
    if not cfg.model.path:  # the character tokenizer: check before the warm start is made
        from sspo_analysis.training.models import CHARS, PRESETS, char_tokenizer

        check_chat(task, char_tokenizer(), cfg.task.chat_template)
        check_alphabet(task, CHARS, "task.path")
        check_room(cfg, task, char_tokenizer())
        check_prompt_lengths(task, char_tokenizer(), PRESETS[cfg.model.preset]["max_position_embeddings"],
                             cfg.rollout.max_new_tokens)
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


def _keep_lines(path: Path, n_lines: int) -> None:
    """Keep the first ``n_lines`` lines of ``path`` (creating it empty if missing)."""
    lines = path.read_bytes().splitlines(keepends=True)[:n_lines] if path.exists() else []
    with atomic_path(path, temp_path(path)) as tmp:
        tmp.write_bytes(b"".join(lines))


def _flatten_overrides(cfg: TrainConfig) -> list[str]:
    """A config as ``section.field=value`` strings (to re-apply overrides on top of a TrainConfig)."""
    import tomli_w

    out = []
    for section, value in cfg.to_dict().items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for k, v in items:
            key = f"{section}.{k}" if k is not None else section
            out.append(f"{key}={tomli_w.dumps({'v': v})[4:].strip()}")
    return out


# --------------------------------------------------------------------------- sweeps and reading runs


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
            refused = refused_changes(recorded_config(run), cfg, _count_lines(run / "metrics.jsonl"))
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
        base_over = _flatten_overrides(base_config) + base_over
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
        extra = [s for s in _flatten_overrides(cfg) if s.split("=", 1)[0] in changed]
        train(None, run, overrides=extra, resume=True, progress=progress)
    else:
        if run.is_dir():
            with run_lock(run):  # never delete a run another process is writing
                clear_run(run)  # the trainer's own files, by name: a user's files in the folder stay
        train(cfg, run, progress=progress)
    (run / "FAILED").unlink(missing_ok=True)


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
