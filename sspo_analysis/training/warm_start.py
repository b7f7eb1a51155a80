"""The supervised warm start: a preset trained with cross-entropy on the task's answers until its sampled success
reaches ``warm_start.target_success``, so that RL starts from a policy that sometimes succeeds.

:func:`ensure_warm_start` gives the one a config starts from: the one shipped with the package
(:data:`SHIPPED_WARM_STARTS`), else the cached one (:func:`warm_start_dir`), else one made now by
:func:`pretrain` into the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sspo_analysis.io import write_json
from sspo_analysis.training.config import TrainConfig, resolve_config
from sspo_analysis.training.heldout import HeldOut, score
from sspo_analysis.training.inputs import check_room
from sspo_analysis.training.models import load_model, quiet_transformers_bars
from sspo_analysis.training.outputs import progress_bar
from sspo_analysis.training.rollout import format_prompts
from sspo_analysis.training.runs import check_output_dir, is_file_error, pid_alive, run_lock, temp_path
from sspo_analysis.training.state import autocast, run_device
from sspo_analysis.training.tasks import Task, make_task_from

__all__ = ["SHIPPED_WARM_STARTS", "WarmStartProgress", "cache_root", "ensure_warm_start", "pretrain",
           "ready_warm_start", "sampled_success", "shipped_warm_start", "warm_start_dir", "warm_start_key"]


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
        self.bar = progress_bar(self.live)
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
    cfg = resolve_config(config, overrides)
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
    device = run_device(cfg)
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
                success = sampled_success(model, tok, task, cfg, n=w.eval_prompts, seed=w.seed + 10_000, generator=gen)
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


def sampled_success(model, tok, task: Task, cfg: TrainConfig, *, n: int = 256, seed: int = 0,
                    generator: torch.Generator | None = None) -> float:
    """Mean reward of one completion sampled at the rollout settings on ``n`` fresh prompts."""
    prompts, answers = task.sample(np.random.default_rng(seed), n)
    return float(score(model, tok, task, cfg, HeldOut(tuple(prompts), tuple(answers)),
                       temperature=cfg.rollout.temperature, samples=1, generator=generator).mean())
