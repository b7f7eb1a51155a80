"""Standard outputs of a training run, beside the trainer's own ``metrics.jsonl`` and checkpoint.

- ``log.report_to`` (TRL's list form; ``["none"]`` the default) takes ``"tensorboard"``
  (``RUN/tensorboard/``; the ``tensorboard`` extra) and ``"wandb"`` (Weights & Biases,
  ``RUN/wandb/``; the ``wandb`` extra; ``WANDB_MODE=offline`` runs with no network,
  ``WANDB_PROJECT`` names the project). Every numeric metric of every step is logged under
  TRL's ``GRPOTrainer`` names (:func:`metric_tag`: ``train/reward``, ``train/kl``,
  ``train/clip_ratio/low_mean``, ``train/objective/<key>``, ...), the resolved config as
  hyper-parameters (TensorBoard's hparams and a ``config`` text; W&B's run config).
- Every ``log.samples_every`` steps, ``log.samples_per_step`` of the step's completions with
  their prompt, reference answer, reward and advantage go to ``RUN/samples.jsonl`` (and to
  TensorBoard as text, to W&B as a table): the first thing to read when a run goes wrong.
- At the end of a run, and with ``sspo export RUN`` from its last checkpoint, the policy
  and tokenizer are saved with ``save_pretrained`` to ``RUN/final/``: a transformers
  checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads, in the dtype of the checkpoint the
  run started from, and ``AutoTokenizer.from_pretrained`` reloads its tokenizer with the same encodings
  (the presets' character tokenizer is a byte-level ``PreTrainedTokenizerFast``, see
  :func:`sspo_analysis.training.models.char_tokenizer`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

REPORTERS = ("none", "tensorboard", "wandb")
"""Values of ``log.report_to``."""

_EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}

TRL_TAGS: dict[str, str] = {
    "reward_mean": "reward", "reward_std": "reward_std", "zero_std_frac": "frac_reward_zero_std",
    "response_length": "completions/mean_length", "kl_ref": "kl", "lr": "learning_rate", "loss": "loss",
    "grad_norm": "grad_norm", "entropy": "entropy", "clip_frac_low": "clip_ratio/low_mean",
    "clip_frac_high": "clip_ratio/high_mean",
}
"""The trainer's metric -> the name TRL's ``GRPOTrainer`` logs the same quantity under."""


@functools.cache
def _objective_keys() -> frozenset[str]:
    """The metrics ``objectives.compute_metrics`` returns (logged as ``objective/<key>``, as the TRL integration)."""
    import torch

    from sspo_analysis.objectives import get_objective

    one = torch.zeros(1, 1)
    return frozenset(get_objective("pg")(one, one, torch.ones(1), torch.ones(1, 1, dtype=torch.bool))[1])


def metric_tag(key: str) -> str:
    """The logged name of a metrics line's ``key``: ``train/`` and TRL's name where TRL has one
    (``reward_mean`` -> ``train/reward``), ``train/objective/<key>`` for the objective's metrics
    (``train/objective/gate_weight_mean``), else ``train/<key>``."""
    if key in TRL_TAGS:
        return f"train/{TRL_TAGS[key]}"
    if key in _objective_keys():
        return f"train/objective/{key}"
    return f"train/{key}"


def check_report_to(report_to: Any) -> list[str]:
    """Validate ``log.report_to`` (a list of :data:`REPORTERS`); ValueError naming the field otherwise."""
    if isinstance(report_to, str) or not isinstance(report_to, (list, tuple)):
        raise ValueError(f"log.report_to: must be a list such as [\"tensorboard\"], got {report_to!r}; "
                         f"allowed values: {', '.join(REPORTERS)}")
    for name in report_to:
        if name not in REPORTERS:
            raise ValueError(f"log.report_to: unknown value {name!r}; allowed values: {', '.join(REPORTERS)}")
    if "none" in report_to and len(report_to) > 1:
        raise ValueError(f"log.report_to: 'none' cannot be combined with others, got {list(report_to)!r}")
    for name in report_to:
        if name in _EXTRAS and importlib.util.find_spec(name) is None:
            raise ValueError(f"log.report_to: {name!r} needs the {name} package: "
                             f"pip install -e '.[{_EXTRAS[name]}]' (or pip install {name})")
    return list(report_to)


def flat_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as ``{"section.field": value}`` (lists as text): the run's hyper-parameters."""
    flat: dict[str, Any] = {}
    for section, value in cfg.to_dict().items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, item in items:
            name = f"{section}.{key}" if key is not None else section
            flat[name] = item if isinstance(item, (bool, int, float, str)) else json.dumps(item)
    return flat


SAMPLE_KEYS = ("step", "prompt", "completion", "answer", "reward", "advantage")
"""The fields of a ``RUN/samples.jsonl`` row."""


def sample_rows(roll: Any, count: int) -> list[dict[str, Any]]:
    """``count`` completions of a rollout, from as many different prompts as possible (no randomness used)."""
    size = len(roll.completions)
    stride = max(1, size // max(count, 1))
    return [{"prompt": roll.prompts[i], "completion": roll.completions[i], "answer": str(roll.answers[i]),
             "reward": float(roll.rewards[i]), "advantage": float(roll.advantages[i])}
            for i in range(0, size, stride)[:count]]


def _keep_samples(path: Path, last_step: int) -> None:
    """Drop the rows of ``RUN/samples.jsonl`` after ``last_step`` (a resume redoes those steps); atomically."""
    if not path.exists():
        return
    kept = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(text)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}: line {number} is not a samples row (JSON with a step)") from None
        if step <= last_step:
            kept.append(text)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


class TrackerStartError(ValueError):
    """A tracker (W&B) could not start: one line for the CLI; a new run refused so leaves no files behind."""


class Reporters:
    """The run's standard loggers: ``log(line, step, samples)`` after each step, ``close()`` at the end.

    ``cfg`` is the run's resolved :class:`~sspo_analysis.training.config.TrainConfig`; ``last_step``
    the step the run (re)starts after.
    """

    def __init__(self, run: str | Path, cfg: Any, last_step: int = 0):
        report_to = check_report_to(cfg.log.report_to)
        self.run = Path(run)
        self.samples_path = self.run / "samples.jsonl"
        _keep_samples(self.samples_path, last_step)
        self.writer = self.wandb = None
        if "tensorboard" in report_to:
            self.writer = _tensorboard_writer(self.run, cfg)
        if "wandb" in report_to:
            self.wandb = _wandb_run(self.run, cfg)

    def log(self, line: dict[str, Any], step: int, samples: list[dict[str, Any]] = ()) -> None:
        """Every finite number of ``line`` at ``step`` under :func:`metric_tag`; ``samples`` (rows of
        :func:`sample_rows`) to ``RUN/samples.jsonl`` and the trackers."""
        scalars = {metric_tag(k): v for k, v in line.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        rows = [{"step": step, **row} for row in samples]
        if rows:
            with self.samples_path.open("a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            if rows:
                self.writer.add_text("train/samples", _markdown_table(rows), step)
            self.writer.flush()
        if self.wandb is not None:
            import wandb

            extra = {"train/samples": wandb.Table(columns=list(SAMPLE_KEYS),
                                                  data=[[r[k] for k in SAMPLE_KEYS] for r in rows])} if rows else {}
            self.wandb.log({**scalars, **extra}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()

    def __enter__(self) -> Reporters:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tensorboard_writer(run: Path, cfg: Any):
    """A SummaryWriter on ``RUN/tensorboard`` holding the config as hparams and as a ``config`` text."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    writer = SummaryWriter(log_dir=str(run / "tensorboard"))
    # the hparams plugin's summaries only; their metric values are the train/* scalars logged at each step
    for summary in hparams(flat_config(cfg), {"train/reward": 0.0, "train/accuracy": 0.0}):
        writer.file_writer.add_summary(summary)
    writer.add_text("config", "```toml\n" + cfg.to_toml() + "```")
    return writer


def _wandb_run(run: Path, cfg: Any):
    """A W&B run in ``RUN/wandb`` with the config; a ValueError (one line) if W&B cannot start one."""
    import secrets

    import wandb

    id_path = run / "wandb" / "run_id"  # kept so that a resumed run continues the same W&B run
    run_id = id_path.read_text().strip() if id_path.exists() else secrets.token_hex(4)
    id_path.parent.mkdir(parents=True, exist_ok=True)  # W&B writes into RUN/wandb only if it exists
    try:
        wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sspo_analysis"), name=run.name,
                               dir=str(run), config=flat_config(cfg), resume="allow", id=run_id)
    except (wandb.errors.Error, OSError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TrackerStartError(f"log.report_to: 'wandb' could not start a run ({message}); log in with `wandb login` "
                         "or WANDB_API_KEY, or run without a network with WANDB_MODE=offline") from None
    id_path.write_text(run_id + "\n")
    return wandb_run


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    """Sample rows as a Markdown table (TensorBoard's text plugin renders it)."""
    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "<br>")

    keys = SAMPLE_KEYS[1:]
    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    return head + "".join("| " + " | ".join(cell(r[k]) for k in keys) + " |\n" for r in rows)


def save_final(run: str | Path, policy, tokenizer, dtype=None) -> Path:
    """Save ``policy`` (its weights in ``dtype``, the checkpoint's own) and ``tokenizer`` with
    :func:`~sspo_analysis.training.models.save_pretrained` to ``RUN/final`` (replaced whole); returns it."""
    from sspo_analysis.training.models import save_pretrained
    from sspo_analysis.training.runs import temp_path

    final = Path(run) / "final"
    tmp = temp_path(final)  # the run's lock makes it ours
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(policy, tokenizer, tmp, dtype=dtype)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def export_run(run: str | Path) -> Path:
    """``RUN/final`` from the run's last checkpoint (``sspo export RUN``): the policy as trained so far. Taken
    under the run's lock: refused while another process writes the run."""
    from sspo_analysis.training.models import checkpoint_dtype, load_model
    from sspo_analysis.training.runs import damaged_checkpoint, read_checkpoint, recorded_config, run_lock

    run = Path(run)
    ckpt_path = run / "checkpoint" / "state.pt"
    if not (run / "config.toml").exists() or not ckpt_path.exists():
        raise ValueError(f"run: {str(run)!r} is not a run directory with a checkpoint "
                         "(needs config.toml and checkpoint/state.pt)")
    with run_lock(run):  # a training process may be writing the checkpoint and RUN/final
        cfg = recorded_config(run)
        # the architecture and tokenizer the run started from; the weights come from the checkpoint
        policy, tok = load_model(cfg.model.preset, path=cfg.model.path or None, seed=cfg.seed,
                                 tokenizer=cfg.model.tokenizer)
        try:
            policy.load_state_dict(read_checkpoint(ckpt_path)["model"])
        except (RuntimeError, KeyError) as err:  # weights of another model
            raise damaged_checkpoint(ckpt_path, err) from err
        return save_final(run, policy, tok, checkpoint_dtype(cfg.model.path))


def progress_bar(enabled: bool):
    """The console's progress bar (rich) of the warm start and the RL loop: one line per task, with an ``info`` field;
    hidden when not ``enabled``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), disable=not enabled, transient=False)
