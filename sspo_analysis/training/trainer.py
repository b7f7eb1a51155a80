"""The RL loop: sample, grade, update, measure. One file, read top to bottom.

Each step of :func:`train`:

1. draw P prompts, sample G completions each from the behaviour policy (the
   policy ``algo.staleness`` optimiser updates old), recording behaviour log-probs;
2. grade them, form group-normalised advantages (Dr.GRPO: no std);
3. measure the policy on the rollout batch before the updates (entropy, KL to
   the reference, and ``grad H`` for the Taylor prediction);
4. ``algo.updates_per_batch`` minibatch AdamW updates with the configured
   objective (``sspo_analysis.objectives``), gradient clipping and the LR schedule;
   non-finite loss or gradient norm skips the update (counted, logged);
5. measure the entropy again, append one line to ``RUN/metrics.jsonl``, every N
   steps write the token log-ratios and an atomic checkpoint.

Entropy-change metrics (per step, mean token entropy of the rollout batch):

- ``entropy_change_real``: ``H(after) - H(before)`` on the same rollout batch.
- ``entropy_change_pred``: the first-order change of a softmax policy with one
  free logit vector per visited state under SGD with the step's learning rate
  (Cui et al. 2505.22617): the update moves state ``s_t``'s logits by
  ``lr n_t c_t (e_{y_t} - pi)``, which changes its entropy by
  ``-lr n_t c_t pi(y_t) (log pi(y_t) + H_t)`` -- a one-sample estimate of
  ``-Cov_{a~pi}(log pi(a), dz_a)``. Summed over the step's updates, divided by
  the number of tokens. It uses the objective's analytic coefficient ``c`` and
  normalisation ``n``, so it is the theory's prediction; its absolute scale
  assumes SGD (the trainer uses AdamW), so compare signs and objectives, not units.
- ``entropy_change_taylor``: ``grad_theta H(before) . (theta_after - theta_before)``,
  the network's own first-order prediction for the realised update (``log.entropy_taylor``).
- ``entropy_cov``: Cui et al.'s batch covariance ``Cov_t(log pi(y_t), c_t)`` over
  the sampled tokens (their Clip-Cov quantity), averaged over the updates.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import json
import math
import os
import random
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sspo_analysis.io import atomic_path, write_json, write_text
from sspo_analysis.training.config import TrainConfig, load_config
from sspo_analysis.training.models import generate, load_model, sequence_logprobs
from sspo_analysis.training.tasks import Task, make_task

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


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.model.precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_task_from(cfg: TrainConfig) -> Task:
    t = cfg.task
    sandbox = dict(grader=t.grader, timeout_s=t.sandbox_timeout_s, memory_mb=t.sandbox_memory_mb)
    params = {"addition": dict(digits=t.digits), "reversal": dict(length=t.length),
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


def format_prompts(tokenizer, prompts: list[str], chat: bool) -> list[str]:
    """Prompts as model input text: the chat template, or the BOS token (if any) then the prompt."""
    if chat:
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=False) for p in prompts]
    return [(tokenizer.bos_token or "") + p for p in prompts]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def cache_root(cfg: TrainConfig) -> Path:
    root = cfg.warm_start.dir or os.environ.get("SSPO_CACHE") or Path.home() / ".cache" / "sspo_analysis"
    return Path(root)


def warm_start_key(cfg: TrainConfig) -> str:
    """Hash of everything the warm start depends on."""
    d = cfg.to_dict()
    w = dict(d["warm_start"])
    w.pop("dir")
    key = {"v": 1, "preset": cfg.model.preset, "task": d["task"], "warm_start": w,
           "temperature": cfg.rollout.temperature, "max_new_tokens": cfg.rollout.max_new_tokens}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def ensure_warm_start(cfg: TrainConfig, progress: bool | None = None) -> Path:
    """The cached warm start for ``cfg`` (preset + task + warm_start settings), made now if missing."""
    target = cache_root(cfg) / "warm_start" / f"{cfg.model.preset}-{cfg.task.name}-{warm_start_key(cfg)}"
    if (target / "warm_start.json").exists():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    pretrain(cfg, tmp, progress=progress)
    try:
        os.replace(tmp, target)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_policy(cfg: TrainConfig, device: torch.device, progress: bool | None = None):
    """``(model, tokenizer, init_path)``: from ``model.path``, the warm start, or a random preset."""
    if cfg.model.path:
        model, tok = load_model(path=cfg.model.path)
        init = cfg.model.path
    elif cfg.model.warm_start:
        init = str(ensure_warm_start(cfg, progress))
        model, tok = load_model(path=init)
    else:
        model, tok = load_model(cfg.model.preset, seed=cfg.seed)
        init = ""
    model.to(device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tok, init


def _progress(enabled: bool, total: int, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), disable=not enabled, transient=False)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- warm start


def pretrain(config: TrainConfig | str | Path | None = None, out_dir: str | Path | None = None, *,
             overrides=(), progress: bool | None = None) -> Path:
    """Supervised warm start on the task until the sampled success rate reaches ``warm_start.target_success``.

    Trains the random-init preset with cross-entropy on ``answer<eos>``,
    evaluates every ``eval_every`` steps on ``eval_prompts`` fresh prompts sampled
    at the rollout temperature, stops at the target (or ``max_steps``), and saves
    a ``from_pretrained`` directory with ``warm_start.json`` (success, steps, seconds).
    """
    cfg = _resolve(config, overrides)
    w = cfg.warm_start
    out = Path(out_dir) if out_dir else cache_root(cfg) / "warm_start" / f"{cfg.model.preset}-{cfg.task.name}-manual"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg)
    task = make_task_from(cfg)
    model, tok = load_model(cfg.model.preset, path=cfg.model.path or None, seed=w.seed)
    check_room(cfg, task, tok)
    model.to(device)
    rng = np.random.default_rng(w.seed)
    eval_rng_seed = w.seed + 10_000
    gen = torch.Generator(device=device).manual_seed(w.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, betas=(0.9, 0.99), weight_decay=0.0)
    show = cfg.log.progress if progress is None else progress
    start, history, success = time.time(), [], 0.0
    with _progress(show, w.max_steps, "warm start") as bar:
        task_id = bar.add_task("warm start", total=w.max_steps, info="")
        for step in range(1, w.max_steps + 1):
            prompts, answers = task.sample(rng, w.batch_size)
            texts = format_prompts(tok, prompts, cfg.task.chat_template)
            full = [t + a + tok.eos_token for t, a in zip(texts, answers)]
            n_prompt = [len(tok(t, add_special_tokens=False).input_ids) for t in texts]
            enc = tok(full, padding=True, add_special_tokens=False, return_tensors="pt")
            ids, attn = enc.input_ids.to(device), enc.attention_mask.to(device)
            labels = ids.clone()
            pad_left = (attn == 0).sum(-1)
            pos = torch.arange(ids.shape[1], device=device)[None]
            is_prompt = pos < (pad_left + torch.tensor(n_prompt, device=device))[:, None]
            labels[is_prompt | (attn == 0)] = -100
            with _autocast(cfg, device):
                position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % w.eval_every == 0 or step == w.max_steps:
                success = evaluate(model, tok, task, cfg, n=w.eval_prompts, seed=eval_rng_seed, generator=gen)
                history.append({"step": step, "loss": loss.item(), "success": success})
                bar.update(task_id, completed=step, info=f"loss {loss.item():.3f} success {success:.2f}")
                if success >= w.target_success:
                    break
            else:
                bar.update(task_id, completed=step)
    seconds = time.time() - start
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_json(out / "warm_start.json", {"success": success, "steps": step, "seconds": seconds,
                                         "history": history, "config": cfg.to_dict()})
    return out


@torch.no_grad()
def evaluate(model, tok, task: Task, cfg: TrainConfig, *, n: int = 256, seed: int = 0,
             generator: torch.Generator | None = None, temperature: float | None = None) -> float:
    """Mean reward of one sampled completion on ``n`` fresh prompts."""
    device = next(model.parameters()).device
    prompts, answers = task.sample(np.random.default_rng(seed), n)
    enc = tok(format_prompts(tok, prompts, cfg.task.chat_template), padding=True, add_special_tokens=False,
              return_tensors="pt")
    was_training = model.training
    model.eval()
    with _autocast(cfg, device):
        tokens, _, _ = generate(model, enc.input_ids.to(device), enc.attention_mask.to(device),
                                max_new_tokens=cfg.rollout.max_new_tokens, eos_id=_eos_ids(model, tok),
                                pad_id=tok.pad_token_id, temperature=temperature or cfg.rollout.temperature,
                                top_p=cfg.rollout.top_p, generator=generator)
    model.train(was_training)
    completions = tok.batch_decode(tokens.cpu(), skip_special_tokens=True)
    return float(np.mean([task.reward(c, a) for c, a in zip(completions, answers)]))


# --------------------------------------------------------------------------- the RL loop


def _lr_lambda(cfg: TrainConfig):
    total = cfg.steps * cfg.algo.updates_per_batch
    o = cfg.optim

    def f(update: int) -> float:
        if update < o.warmup_updates:
            return (update + 1) / (o.warmup_updates + 1)
        frac = (update - o.warmup_updates) / max(1, total - o.warmup_updates)
        if o.schedule == "linear":
            return 1.0 - (1.0 - o.min_lr_ratio) * frac
        if o.schedule == "cosine":
            return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
        return 1.0

    return f


def _micro_batches(idx: torch.Tensor, seq_len: int, budget: int) -> list[torch.Tensor]:
    if budget <= 0:
        return [idx]
    per = max(1, budget // seq_len)
    return list(idx.split(per))


def _micro_weight(objective, mask_micro: torch.Tensor, mask_mini: torch.Tensor) -> float:
    """Share of a micro-batch in the minibatch loss under the objective's aggregation."""
    if objective.agg == "token-mean":
        return float(mask_micro.sum()) / max(1.0, float(mask_mini.sum()))
    if objective.agg == "seq-mean-token-sum-norm":
        return mask_micro.shape[0] / mask_mini.shape[0]
    return float(mask_micro.any(-1).sum()) / max(1.0, float(mask_mini.any(-1).sum()))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(torch.where(mask, x.float(), 0.0).sum() / mask.sum().clamp(min=1))


def _params_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _rng_state(gen: torch.Generator, np_rng: np.random.Generator) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "sampler": gen.get_state(), "tasks": np_rng.bit_generator.state,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any], gen: torch.Generator, np_rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    gen.set_state(state["sampler"])
    np_rng.bit_generator.state = state["tasks"]
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(config: TrainConfig | str | Path | None = None, out_dir: str | Path | None = None, *,
          overrides=(), resume: bool = False, progress: bool | None = None) -> Path:
    """Run RL on the configured task; returns the run directory.

    Args:
        config: a :class:`TrainConfig`, a TOML path, or None for the defaults.
        out_dir: the run directory (default ``runs/<objective>_seed<seed>_<time>``).
        overrides: ``"section.field=value"`` strings.
        resume: continue ``out_dir`` from its checkpoint with its recorded config
            (a finished run, with ``DONE``, is returned as is).
        progress: show the progress bar (default ``log.progress``).
    """
    if resume:
        if out_dir is None or not (Path(out_dir) / "config.toml").exists():
            raise ValueError(f"--resume: {out_dir!r} is not a run directory (no config.toml)")
        run = Path(out_dir)
        if (run / "DONE").exists():
            return run
        cfg = load_config(run / "config.toml", list(overrides or ()))
    else:
        cfg = _resolve(config, overrides)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run = Path(out_dir) if out_dir else Path("runs") / f"{cfg.objective.name}_seed{cfg.seed}_{stamp}"
        if (run / "metrics.jsonl").exists() or (run / "checkpoint").exists():
            raise ValueError(f"out: {str(run)!r} already holds a run; use --resume or another directory")
    objective = cfg.build_objective()
    device = _device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    show = cfg.log.progress if progress is None else progress
    task = make_task_from(cfg)
    if not cfg.model.path:  # the character tokenizer: check before the warm start is made
        from sspo_analysis.training.models import char_tokenizer

        check_room(cfg, task, char_tokenizer())
    policy, tok, _ = build_policy(cfg, device, progress=show)
    run.mkdir(parents=True, exist_ok=True)
    if not resume or overrides:  # the resolved config, including overrides given on resume (e.g. more steps)
        write_text(run / "config.toml", cfg.to_toml())
    _seed_all(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # sampling and minibatch order
    np_rng = np.random.default_rng(cfg.seed)
    a, o = cfg.algo, cfg.optim
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    reference = None
    if a.kl_coef > 0 or a.track_kl_ref:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    # staleness: the behaviour policy is the one k optimiser updates old
    snapshots: collections.deque = collections.deque(maxlen=a.staleness + 1)
    sampler = copy.deepcopy(policy).eval().requires_grad_(False) if a.staleness else policy
    start_step, elapsed, n_lines, skipped_total = 0, 0.0, 0, 0
    ckpt_path = run / "checkpoint" / "state.pt"
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # RNG states must stay on CPU
        policy.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        snapshots.extend(state["snapshots"])
        _set_rng_state(state["rng"], gen, np_rng)
        start_step, elapsed, n_lines = state["step"], state["elapsed"], state["metrics_lines"]
        skipped_total = state["skipped_total"]
    metrics_path = run / "metrics.jsonl"
    lines = metrics_path.read_text().splitlines(keepends=True) if metrics_path.exists() else []
    with atomic_path(metrics_path) as tmp:  # drop lines written after the checkpoint
        tmp.write_text("".join(lines[:n_lines]))
    if a.staleness and not snapshots:
        snapshots.append({k: v.detach().clone() for k, v in policy.state_dict().items()})
    eos_ids, pad_id = _eos_ids(policy, tok), tok.pad_token_id
    t_run = time.time() - elapsed
    policy.train()
    with _progress(show, cfg.steps, f"{cfg.objective.name} seed {cfg.seed}") as bar, \
            metrics_path.open("a") as metrics_file:
        task_id = bar.add_task("train", total=cfg.steps, completed=start_step, info="")
        for step in range(start_step + 1, cfg.steps + 1):
            line, batch_lr = _rl_step(cfg, objective, policy, sampler, reference, snapshots, opt, sched, tok, task,
                                      gen, np_rng, device, eos_ids, pad_id, step, run)
            skipped_total += line["skipped_updates"]
            line["skipped_updates_total"] = skipped_total
            line["wall_time"] = time.time() - t_run
            metrics_file.write(json.dumps(_finite_or_none(line)) + "\n")
            metrics_file.flush()
            n_lines += 1
            bar.update(task_id, completed=step,
                       info=f"reward {line['reward_mean']:.3f} entropy {line['entropy']:.3f} lr {batch_lr:.1e}")
            if step % cfg.log.checkpoint_every == 0 or step == cfg.steps:
                if not _params_finite(policy):
                    raise RuntimeError(f"step {step}: non-finite parameters; not checkpointing")
                with atomic_path(ckpt_path) as tmp:
                    torch.save({"model": policy.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "snapshots": list(snapshots),
                                "rng": _rng_state(gen, np_rng), "step": step, "elapsed": time.time() - t_run,
                                "metrics_lines": n_lines, "skipped_total": skipped_total}, tmp)
    write_text(run / "DONE", f"finished {cfg.steps} steps\n")
    return run


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


def _finite_or_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _rl_step(cfg, objective, policy, sampler, reference, snapshots, opt, sched, tok, task, gen, np_rng, device,
             eos_ids, pad_id, step, run) -> tuple[dict[str, Any], float]:
    a, r, o = cfg.algo, cfg.rollout, cfg.optim
    t0 = time.time()
    ac = _autocast(cfg, device)
    # 1. rollouts from the behaviour policy
    prompts, answers = task.sample(np_rng, r.prompts)
    enc = tok(format_prompts(tok, prompts, cfg.task.chat_template), padding=True, add_special_tokens=False,
              return_tensors="pt")
    prompt_ids = enc.input_ids.repeat_interleave(r.group_size, 0).to(device)
    prompt_mask = enc.attention_mask.repeat_interleave(r.group_size, 0).to(device)
    if a.staleness:
        sampler.load_state_dict(snapshots[0])
    was_training = sampler.training
    sampler.eval()
    with ac:
        tokens, old_logp, cmask, gen_ent = generate(
            sampler, prompt_ids, prompt_mask, max_new_tokens=r.max_new_tokens, eos_id=eos_ids, pad_id=pad_id,
            temperature=r.temperature, top_p=r.top_p, generator=gen, return_entropy=True)
    sampler.train(was_training)
    t_gen = time.time() - t0
    # 2. rewards and group-normalised advantages
    completions = tok.batch_decode(tokens.cpu(), skip_special_tokens=True)
    answers_rep = [ans for ans in answers for _ in range(r.group_size)]
    rewards = torch.tensor([task.reward(c, ans) for c, ans in zip(completions, answers_rep)], dtype=torch.float32)
    grouped = rewards.view(r.prompts, r.group_size)
    adv = grouped - grouped.mean(-1, keepdim=True)
    if a.advantage == "grpo":
        adv = adv / (grouped.std(-1, keepdim=True) + 1e-4)
    adv = adv.reshape(-1).to(device)
    ids = torch.cat([prompt_ids, tokens], 1)
    attn = torch.cat([prompt_mask, cmask.long()], 1)
    n_prompt = prompt_ids.shape[1]
    B, n_tok = ids.shape[0], cmask.sum().clamp(min=1)
    lp_kw = dict(temperature=r.temperature, chunk_tokens=o.logprob_chunk)
    # 3. the policy before the updates
    taylor = cfg.log.entropy_taylor
    if taylor or a.staleness:  # the sampler is not the policy, or grad H is needed: one more forward
        with torch.set_grad_enabled(taylor), ac:
            logp_before, ent_before = sequence_logprobs(policy, ids, attn, n_prompt, cmask, **lp_kw)
    else:  # on-policy sampling already measured the policy on this batch
        logp_before, ent_before = old_logp, gen_ent
    h_before = torch.where(cmask, ent_before, 0.0).sum() / n_tok
    if taylor:
        grad_h = torch.autograd.grad(h_before, [p for p in policy.parameters() if p.requires_grad], allow_unused=True)
        theta_before = [p.detach().clone() for p in policy.parameters() if p.requires_grad]
        logp_before, ent_before, h_before = logp_before.detach(), ent_before.detach(), h_before.detach()
    ref_logp = None
    if reference is not None:
        with torch.no_grad(), ac:
            ref_logp, _ = sequence_logprobs(reference, ids, attn, n_prompt, cmask, **lp_kw)
    # 4. minibatch updates
    perm = torch.randperm(B, generator=gen, device=gen.device)
    obj_metrics: list[dict[str, float]] = []
    grad_norms, lrs, skipped = [], [], 0
    pred, cov = 0.0, []
    ratio_chunks, len_chunks, adv_chunks, upd_chunks = [], [], [], []
    lr_min, lr_max = math.inf, -math.inf
    for u, mb in enumerate(perm.chunk(a.updates_per_batch)):
        opt.zero_grad(set_to_none=True)
        lr_now = sched.get_last_lr()[0]
        lrs.append(lr_now)
        mask_mb = cmask[mb]
        finite = True
        for micro in _micro_batches(mb, ids.shape[1], o.token_budget):
            m_mask = cmask[micro]
            weight = _micro_weight(objective, m_mask, mask_mb)
            with ac:
                logp, ent = sequence_logprobs(policy, ids[micro], attn[micro], n_prompt, m_mask, **lp_kw)
            loss, met, terms = objective.evaluate(logp, old_logp[micro], adv[micro], m_mask)
            if reference is not None and a.kl_coef > 0:
                d = torch.where(m_mask, ref_logp[micro] - logp, 0.0).clamp(-20, 20)
                k3 = torch.expm1(d) - d
                loss = loss + a.kl_coef * (k3 * objective.token_weights(m_mask)).sum()
            finite = finite and bool(torch.isfinite(loss))
            if finite:
                (loss * weight).backward()
            # first-order entropy prediction from the objective's analytic coefficient (see module docstring)
            with torch.no_grad():
                lp_d, ent_d = logp.detach(), ent.detach()
                c = terms.coefficient.float()  # analytic, already detached and zero on masked tokens
                n = objective.normalisation(m_mask).float() * weight
                term = n * c * lp_d.exp() * (lp_d + ent_d)
                pred -= lr_now * float(torch.where(m_mask, term, 0.0).sum()) / float(n_tok)
                x, y = lp_d[m_mask], c[m_mask]
                cov.append(float(((x - x.mean()) * (y - y.mean())).mean()) if x.numel() > 1 else 0.0)
                lr_tok = (lp_d - old_logp[micro]).clamp(-20, 20)
                lr_sel = lr_tok[m_mask]
                if lr_sel.numel():
                    lr_min, lr_max = min(lr_min, float(lr_sel.min())), max(lr_max, float(lr_sel.max()))
                ratio_chunks.append(lr_sel.float().cpu())
                len_chunks.append(m_mask.sum(-1).cpu())
                adv_chunks.append(adv[micro].float().cpu())
                upd_chunks.append(torch.full((len(micro),), u, dtype=torch.int16))
            obj_metrics.append(met)
        gn = torch.nn.utils.clip_grad_norm_(params_of(policy), o.grad_clip) if finite else torch.tensor(math.nan)
        if finite and bool(torch.isfinite(gn)):
            opt.step()
        else:
            skipped += 1
            opt.zero_grad(set_to_none=True)
        grad_norms.append(float(gn))
        sched.step()
        if a.staleness:
            snapshots.append({k: v.detach().clone() for k, v in policy.state_dict().items()})
    # 5. the policy after the updates
    h_after = math.nan
    if cfg.log.entropy_change:
        with torch.no_grad(), ac:
            _, ent_after = sequence_logprobs(policy, ids, attn, n_prompt, cmask, **lp_kw)
        h_after = float(torch.where(cmask, ent_after, 0.0).sum() / n_tok)
    line: dict[str, Any] = {"step": step}
    n_seq_tok = cmask.sum(-1).float()
    line.update({
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        "accuracy": float((rewards >= 1.0).float().mean()),
        "zero_std_frac": float((grouped.std(-1) == 0).float().mean()),
        "response_length": float(n_seq_tok.mean()), "entropy": float(h_before),
    })
    for key in obj_metrics[0]:
        vals = [m[key] for m in obj_metrics]
        line[key] = min(vals) if key.endswith("_min") else max(vals) if key.endswith("_max") else (
            sum(vals) if key == "n_tokens" else float(np.mean(vals)))
    line["log_ratio_min"] = lr_min if math.isfinite(lr_min) else 0.0
    line["log_ratio_max"] = lr_max if math.isfinite(lr_max) else 0.0
    line["grad_norm"] = float(np.nanmean(grad_norms)) if np.isfinite(grad_norms).any() else math.nan
    if ref_logp is not None:
        d = torch.where(cmask, ref_logp - logp_before, 0.0).clamp(-20, 20)
        line["kl_ref"] = _masked_mean(torch.expm1(d) - d, cmask)
    else:
        line["kl_ref"] = math.nan
    line["kl_before_old"] = _masked_mean(torch.expm1(old_logp - logp_before) - (old_logp - logp_before), cmask)
    line["skipped_updates"] = skipped
    line["lr"] = float(np.mean(lrs))
    line["entropy_after"] = h_after
    line["entropy_change_real"] = h_after - float(h_before)
    line["entropy_change_pred"] = pred
    line["entropy_cov"] = float(np.mean(cov)) if cov else 0.0
    if taylor:
        dot = 0.0
        for g, p0, p in zip(grad_h, theta_before, params_of(policy)):
            if g is not None:
                dot += float((g.float() * (p.detach() - p0).float()).sum())
        line["entropy_change_taylor"] = dot
    dt = time.time() - t0
    line["step_time"] = dt
    line["generation_time"] = t_gen
    line["tokens_per_s"] = float(cmask.sum()) / dt
    line["sequences_per_s"] = B / dt
    every = cfg.log.log_ratios_every
    if every and step % every == 0:
        with atomic_path(run / "log_ratios" / f"step_{step:06d}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, log_ratios=torch.cat(ratio_chunks).numpy().astype(np.float32),
                         lengths=torch.cat(len_chunks).numpy().astype(np.int32),
                         advantages=torch.cat(adv_chunks).numpy().astype(np.float32),
                         update=torch.cat(upd_chunks).numpy())
    return line, float(np.mean(lrs))


def params_of(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- sweeps and reading runs


def sweep(objectives, seeds, base_config: TrainConfig | str | Path | None = None, out_dir: str | Path = "runs/sweep",
          overrides=(), *, tag: str = "", progress: bool | None = None) -> list[Path]:
    """Run every ``objective x seed`` from one warm start, one directory per run.

    Runs go to ``out_dir/<objective>_seed<seed>[_<tag>]``. A run with ``DONE`` is
    skipped; one with a checkpoint resumes; a crashed run writes ``FAILED``
    (the traceback) and the sweep goes on. Returns the finished run directories.
    All configs are validated before the first run starts.
    """
    if isinstance(objectives, str):
        objectives = [x for x in objectives.split(",") if x]
    if isinstance(seeds, (str, int)):
        seeds = [int(x) for x in str(seeds).split(",") if x != ""]
    base_over = list(overrides or ())
    if isinstance(base_config, TrainConfig):
        base_over = _flatten_overrides(base_config) + base_over
        base_config = None
    configs = {}
    for name in objectives:
        for seed in seeds:
            over = base_over + [f'objective.name="{name}"', f"seed={int(seed)}"]
            cfg = load_config(base_config, over)
            if cfg.objective.name != name:  # objective params of another objective would not apply
                raise ValueError(f"objective.name: {name!r} did not apply")
            configs[(name, seed)] = cfg
    out = Path(out_dir)
    finished = []
    for (name, seed), cfg in configs.items():
        run = out / f"{name}_seed{seed}{'_' + tag if tag else ''}"
        if (run / "DONE").exists():
            finished.append(run)
            continue
        try:
            if (run / "checkpoint" / "state.pt").exists():
                train(None, run, resume=True, progress=progress)
            else:
                if run.exists():
                    shutil.rmtree(run)
                train(cfg, run, progress=progress)
            (run / "FAILED").unlink(missing_ok=True)
            finished.append(run)
        except Exception:  # a crashed run must not stop the others
            run.mkdir(parents=True, exist_ok=True)
            write_text(run / "FAILED", traceback.format_exc())
            print(f"sweep: run {run} failed; see {run / 'FAILED'}")
    return finished


def read_metrics(run_dir: str | Path):
    """``RUN/metrics.jsonl`` as a pandas DataFrame (one row per step), with ``objective`` and ``seed`` columns."""
    import pandas as pd

    run = Path(run_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    df = pd.DataFrame(rows)
    cfg_path = run / "config.toml"
    if cfg_path.exists():
        from sspo_analysis.training.config import tomllib

        cfg = tomllib.loads(cfg_path.read_text())
        df["objective"] = cfg["objective"]["name"]
        df["seed"] = cfg["seed"]
        df["staleness"] = cfg["algo"]["staleness"]
    df["run"] = str(run)
    return df


def read_log_ratios(run_dir: str | Path, steps=None) -> dict[int, dict[str, np.ndarray]]:
    """``{step: {"log_ratios", "lengths", "advantages", "update"}}`` from ``RUN/log_ratios/step_*.npz``."""
    out = {}
    for path in sorted((Path(run_dir) / "log_ratios").glob("step_*.npz")):
        step = int(path.stem.split("_")[1])
        if steps is None or step in steps:
            with np.load(path) as data:
                out[step] = {k: data[k] for k in data.files}
    return out
