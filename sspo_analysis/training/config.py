"""The trainer's configuration: one nested dataclass, validated, loaded from TOML, overridable.

``load_config(path=None, overrides=("objective.name=sspo", "objective.tau_pos=2"))``
reads ``sspo_analysis/configs/default.toml``-style TOML (sections = the nested dataclasses),
applies ``section.key=value`` overrides (values parsed as TOML, else strings) and
validates everything, raising ``ValueError`` that names the bad field and its
allowed values before any work starts. Keys of ``[objective]`` other than
``name``/``agg``/``horizon`` are the objective's parameters (checked by
``sspo_analysis.objectives.get_objective``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACKAGED_CONFIGS = resources.files("sspo_analysis") / "configs"
"""Configs shipped inside the package (an installed wheel included); ``--config NAME`` finds them by file name."""
DEFAULT_CONFIG = Path(str(PACKAGED_CONFIGS / "default.toml"))


@dataclass
class ModelConfig:
    preset: str = "tiny"  # a training.models.PRESETS name, used when path is empty
    path: str = ""  # local checkpoint directory (from_pretrained); wins over preset and warm_start
    tokenizer: str = "auto"  # auto: path's own tokenizer (an error if it has none), presets' characters; chars
    warm_start: bool = True  # start the preset from the cached supervised warm start (made on first use)
    precision: str = "fp32"  # fp32 | bf16 (bf16 autocast on the run's device, CUDA or CPU)
    gradient_checkpointing: bool = False
    lean: bool = True  # Llama-family models (qwen2, llama, mistral) run training.lean's forward; false: transformers'
    kernels: str = "fast"  # fast | exact: CPU float32 projections of the lean path in oneDNN and fused AdamW (fast),
    # or torch's default kernels, bitwise the transformers forward and the foreach AdamW (exact)

    @property
    def forward(self) -> str:
        """The ``forward`` argument of ``models.generate`` and ``models.sequence_logprobs``."""
        return self.kernels if self.lean else "transformers"


@dataclass
class TaskConfig:
    name: str = "addition"  # a registered task: addition | countdown | reversal | jsonl | code | synthesis | ...
    digits: int = 2  # addition
    length: int = 5  # reversal
    numbers: int = 3  # countdown
    max_value: int = 9  # countdown
    path: str = ""  # jsonl, code: a JSONL, JSON or parquet file, or a datasets save_to_disk directory
    grader: str = ""  # "": the default; jsonl: exact, number, math; reversal: exact, chars; code: tests-fraction, ...
    prompt_key: str = "prompt"  # jsonl, code
    answer_key: str = "answer"  # jsonl
    tests_key: str = "tests"  # code
    entry_point_key: str = "entry_point"  # code
    sandbox_timeout_s: float = 5.0  # code, synthesis: wall-clock limit per program
    sandbox_memory_mb: int = 512  # code, synthesis: address-space limit per process
    sandbox: str = "bwrap"  # code, synthesis: bwrap (contained) | unsafe-process (no isolation, explicit opt-in)
    chat_template: bool = False  # wrap prompts with the tokenizer's chat template (chat-message prompts: always)


@dataclass
class WarmStartConfig:
    target_success: float = 0.35  # stop the supervised phase at this sampled success rate
    max_steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    eval_every: int = 25
    eval_prompts: int = 256
    seed: int = 0
    dir: str = ""  # cache root (default $SSPO_CACHE or ~/.cache/sspo_analysis)


@dataclass
class RolloutConfig:
    prompts: int = 16  # P prompts per step
    group_size: int = 8  # G samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 6


@dataclass
class ObjectiveConfig:
    name: str = "grpo"
    agg: str = ""  # empty: the objective's default aggregation
    horizon: int = 0  # seq-mean-token-sum-norm constant (0: the batch's T)
    params: dict[str, Any] = field(default_factory=dict)  # e.g. tau_pos, eps_hi, gate


@dataclass
class AlgoConfig:
    advantage: str = "grpo"  # grpo: (R - mean) / (std + 1e-4); drgrpo: R - mean
    updates_per_batch: int = 2  # minibatch optimiser updates per rollout batch
    staleness: int = 0  # rollouts come from the policy this many updates old
    kl_coef: float = 0.0  # k3 KL penalty to the frozen initial policy
    track_kl_ref: bool = True  # keep the reference to log kl_ref even when kl_coef = 0


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_updates: int = 4
    schedule: str = "constant"  # constant | linear | cosine (after warmup)
    min_lr_ratio: float = 0.1
    token_budget: int = 0  # gradient accumulation: max padded tokens per micro-batch (0: whole minibatch)
    logprob_chunk: int = 2048  # tokens per chunk of the log-prob / entropy projection


@dataclass
class LogConfig:
    log_ratios_every: int = 5  # RUN/log_ratios/step_%06d.npz every N steps (0: never)
    checkpoint_every: int = 10  # RUN/checkpoint/state.pt every N steps (and at the end)
    progress: bool = True
    entropy_change: bool = True  # entropy after the updates (one no-grad forward): entropy_change_real
    entropy_taylor: bool = True  # also log grad(H) . delta(theta) (one extra backward; 2 parameter copies)
    report_to: list[str] = field(default_factory=lambda: ["none"])  # ["tensorboard"], ["wandb"]: RUN/tensorboard/ ...
    samples_every: int = 10  # RUN/samples.jsonl: a few completions with their rewards every N steps (0: never)
    samples_per_step: int = 4  # completions written each time, from different prompts
    eval_every: int = 0  # RUN/heldout.jsonl: held-out accuracy every N steps and before the first (0: never)
    eval_prompts: int = 256  # the fixed held-out prompts (never drawn for training while eval_every > 0)
    eval_samples: int = 4  # samples per held-out prompt: mean sampled reward and pass@k with k = eval_samples


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 60
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 1  # torch CPU threads (0: torch default); 1 is fastest for tiny models on a shared CPU
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict; ``[objective]`` parameters flattened into the table (the TOML layout)."""
        d = dataclasses.asdict(self)
        d["objective"].update(d["objective"].pop("params"))
        return d

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def validate(self) -> TrainConfig:
        """Check every field (its one type, then its range); raise ``ValueError`` naming the field and the allowed
        values."""
        _check_types(self)
        for check in (_check_run, _check_model, _check_task, _check_warm_start, _check_rollout, _check_objective,
                      _check_algo, _check_optim, _check_log):
            check(self)
        return self

    def build_objective(self):
        """The configured ``sspo_analysis.objectives.Objective``."""
        import warnings

        from sspo_analysis.objectives import get_objective

        o = self.objective
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_objective(o.name, agg=o.agg or None, horizon=o.horizon or None, **o.params)


SEED_LIMIT = 2**32
"""Seeds are integers in ``[0, 2**32)``: what every generator the trainer seeds takes (numpy's global
``np.random.seed`` the narrowest)."""
MAX_SEQUENCES = 2**16
"""At most this many sequences per step (``rollout.prompts x rollout.group_size``) or per warm-start batch."""
MIN_TEMPERATURE = 1e-3
"""The smallest ``rollout.temperature``. The log-probs are ``log softmax(logits / temperature)``, so their size
and gradient grow as ``1 / temperature``: far below this they leave any useful range (and ``logits / temperature``
overflows float32 near 1e-37, a NaN in sampling); a nearly greedy policy is better had with a small ``top_p``."""
FLOAT32_MAX = 3.4028234663852886e38
"""An objective parameter's largest magnitude: the trainer computes the objective in float32 (or bfloat16)."""


def _choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: unknown value {value!r}; allowed values: {', '.join(map(str, allowed))}")


def _number(name: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False,
            integer: bool = False, hi_open: bool = False, why: str = "") -> None:
    """``value`` is a finite number (an int if ``integer``; never a bool) in ``lo..hi`` (``hi`` excluded if
    ``hi_open``); else ValueError naming it, the allowed range and ``why`` (a reason for the bound)."""
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and math.isfinite(value) and (value < hi if hi_open else value <= hi)
    ok = ok and (value > lo if lo_open else value >= lo)
    if not ok:
        upper = f" and {'<' if hi_open else '<='} {hi}" if hi < math.inf else ""
        reason = f" ({why})" if why else ""
        raise ValueError(f"{name}: must be {kind} {'>' if lo_open else '>='} {lo}{upper}{reason}, got {value!r}")


_TYPE_NAMES = {bool: "true or false", str: "a string", int: "an integer", float: "a number", list: "a list"}


def _check_types(cfg: TrainConfig) -> None:
    """Every field holds its one type (a bool field a TOML boolean, never ``"no"`` or 1; no lists or tables)."""
    defaults = TrainConfig()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            items = [(f"{section.name}.{f.name}", getattr(value, f.name), getattr(getattr(defaults, section.name),
                                                                                   f.name))
                     for f in dataclasses.fields(value) if f.name != "params"]
        else:
            items = [(section.name, value, getattr(defaults, section.name))]
        for name, v, default in items:
            kind = type(default)
            ok = isinstance(v, kind) and (kind is bool or not isinstance(v, bool))
            if kind is float:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not ok:
                raise ValueError(f"{name}: must be {_TYPE_NAMES[kind]}, got {v!r}")


def _check_run(cfg: TrainConfig) -> None:
    _number("seed", cfg.seed, 0, SEED_LIMIT - 1, integer=True)
    _number("steps", cfg.steps, 1, integer=True)
    _choice("device", cfg.device, ("cpu", "cuda", "auto"))
    _number("threads", cfg.threads, 0, os.cpu_count() or 1, integer=True)


def _check_model(cfg: TrainConfig) -> None:
    from sspo_analysis.training.models import PRESETS, TOKENIZERS, check_has_tokenizer

    m = cfg.model
    if not m.path:
        _choice("model.preset", m.preset, tuple(PRESETS))
    _choice("model.tokenizer", m.tokenizer, TOKENIZERS)
    if m.path and m.tokenizer == "auto":
        check_has_tokenizer(m.path)
    _choice("model.precision", m.precision, ("fp32", "bf16"))
    _choice("model.kernels", m.kernels, ("fast", "exact"))


def _check_task(cfg: TrainConfig) -> None:
    """The name, every registered task's field checks (every config holds every task's fields), then the chosen
    task's grader and file."""
    from sspo_analysis.training.tasks import GRADERS, TASKS, task_spec

    t = cfg.task
    spec = task_spec(t.name)
    for check in dict.fromkeys(s.check for s in TASKS.values() if s.check):  # code and synthesis share one
        check(t)
    if t.grader:  # a task without graders of its own accepts the jsonl ones, and ignores them, as before
        _choice("task.grader", t.grader, spec.graders or GRADERS)
    if spec.reads_file and not (t.path and (Path(t.path).is_file() or Path(t.path).is_dir())):
        raise ValueError(f"task.path: {t.path!r} is not a file or a directory; task.name = {t.name!r} needs a local "
                         "JSONL, JSON or parquet file, or a datasets save_to_disk directory")


def _check_warm_start(cfg: TrainConfig) -> None:
    w = cfg.warm_start
    _number("warm_start.target_success", w.target_success, 0.0, 1.0, lo_open=True)
    for key in ("max_steps", "eval_every"):
        _number(f"warm_start.{key}", getattr(w, key), 1, integer=True)
    for key in ("batch_size", "eval_prompts"):
        _number(f"warm_start.{key}", getattr(w, key), 1, MAX_SEQUENCES, integer=True)
    _number("warm_start.lr", w.lr, 0.0, lo_open=True)
    _number("warm_start.seed", w.seed, 0, SEED_LIMIT - 1, integer=True)


def _check_rollout(cfg: TrainConfig) -> None:
    r = cfg.rollout
    _number("rollout.group_size", r.group_size, 2, MAX_SEQUENCES // 2, integer=True)
    _number("rollout.prompts", r.prompts, 1, MAX_SEQUENCES // r.group_size, integer=True,
            why=f"at most {MAX_SEQUENCES} sequences per step: rollout.prompts x rollout.group_size {r.group_size}")
    _number("rollout.temperature", r.temperature, MIN_TEMPERATURE,
            why="log-probs and their gradients grow as 1 / temperature; a small top_p samples nearly greedily")
    _number("rollout.top_p", r.top_p, 0.0, 1.0, lo_open=True)
    context = _context_length(cfg.model)
    if context is None:
        _number("rollout.max_new_tokens", r.max_new_tokens, 1, integer=True)
    else:
        _number("rollout.max_new_tokens", r.max_new_tokens, 1, context - 1, integer=True,
                why=f"the model has {context} positions, and a prompt needs at least one")


def _context_length(model: ModelConfig) -> int | None:
    """The model's positions (``max_position_embeddings``): the preset's, or ``model.path``'s ``config.json``'s
    when it can be read (None otherwise)."""
    if not model.path:
        from sspo_analysis.training.models import PRESETS

        return PRESETS.get(model.preset, {}).get("max_position_embeddings")
    try:
        import json

        value = json.loads((Path(model.path) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else None


def _check_objective(cfg: TrainConfig) -> None:
    from sspo_analysis.objectives import AGG_MODES

    o = cfg.objective
    if o.agg:
        _choice("objective.agg", o.agg, AGG_MODES)
    _number("objective.horizon", o.horizon, 0, integer=True)
    try:
        cfg.build_objective()  # unknown objective name / parameter, wrong parameter type, not a gate -> ValueError
    except (TypeError, AttributeError) as err:  # a parameter the objective's own checks did not foresee
        raise ValueError(f"objective.{o.name}: invalid parameters {o.params!r} ({err})") from err
    for key, value in o.params.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and abs(v) > FLOAT32_MAX:
                raise ValueError(f"objective.{key}: must be a number of magnitude <= {FLOAT32_MAX:.4g} (the "
                                 f"trainer computes the objective in float32), got {v!r}")
    from sspo_analysis.objectives import PARAM_ALIASES, check_parameters_read, get_spec

    keys = (*get_spec(o.name).defaults, *PARAM_ALIASES, *o.params)
    check_parameters_read(o.name, o.params, {k: f"objective.{k}" for k in keys})  # sspo's arctan gate: no eps_lo


def _check_algo(cfg: TrainConfig) -> None:
    a, r = cfg.algo, cfg.rollout
    _choice("algo.advantage", a.advantage, ("grpo", "drgrpo"))
    _number("algo.updates_per_batch", a.updates_per_batch, 1, r.prompts * r.group_size, integer=True)
    _number("algo.staleness", a.staleness, 0, integer=True)
    _number("algo.kl_coef", a.kl_coef, 0.0)


def _check_optim(cfg: TrainConfig) -> None:
    op = cfg.optim
    _number("optim.lr", op.lr, 0.0, lo_open=True)
    _number("optim.weight_decay", op.weight_decay, 0.0)
    _number("optim.beta1", op.beta1, 0.0, 1.0, hi_open=True, why="AdamW's moment decay")
    _number("optim.beta2", op.beta2, 0.0, 1.0, hi_open=True, why="AdamW's moment decay")
    _number("optim.eps", op.eps, 0.0, lo_open=True)
    _number("optim.grad_clip", op.grad_clip, 0.0, lo_open=True)
    _number("optim.warmup_updates", op.warmup_updates, 0, integer=True)
    _choice("optim.schedule", op.schedule, ("constant", "linear", "cosine"))
    _number("optim.min_lr_ratio", op.min_lr_ratio, 0.0, 1.0)
    _number("optim.token_budget", op.token_budget, 0, integer=True)
    _number("optim.logprob_chunk", op.logprob_chunk, 1, integer=True)


def _check_log(cfg: TrainConfig) -> None:
    _number("log.log_ratios_every", cfg.log.log_ratios_every, 0, integer=True)
    _number("log.checkpoint_every", cfg.log.checkpoint_every, 1, integer=True)
    _number("log.samples_every", cfg.log.samples_every, 0, integer=True)
    _number("log.samples_per_step", cfg.log.samples_per_step, 1, integer=True)
    _number("log.eval_every", cfg.log.eval_every, 0, integer=True)
    _number("log.eval_prompts", cfg.log.eval_prompts, 1, 100_000, integer=True)
    _number("log.eval_samples", cfg.log.eval_samples, 1, 1024, integer=True)
    from sspo_analysis.training.outputs import check_report_to

    check_report_to(cfg.log.report_to)


_SECTIONS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _from_dict(data: dict[str, Any], where: str = "") -> TrainConfig:
    cfg = TrainConfig()
    for key, value in data.items():
        _set(cfg, key, value, where)
    return cfg


def _set(cfg: TrainConfig, key: str, value: Any, where: str = "") -> None:
    """Set ``key`` (``section`` table or ``section.field``) on ``cfg``."""
    parts = key.split(".")
    if parts[0] not in _SECTIONS:
        raise ValueError(f"{where}{key}: unknown field; allowed: {', '.join(_SECTIONS)}")
    target = getattr(cfg, parts[0])
    if not dataclasses.is_dataclass(target):
        if len(parts) != 1:
            raise ValueError(f"{where}{key}: {parts[0]} is not a section")
        setattr(cfg, parts[0], value)
        return
    if len(parts) == 1:
        if not isinstance(value, dict):
            raise ValueError(f"{where}{key}: is a section, expected a table")
        for k, v in value.items():
            _set(cfg, f"{key}.{k}", v, where)
        return
    if len(parts) != 2:
        raise ValueError(f"{where}{key}: expected section.field")
    section, name = parts
    names = [f.name for f in dataclasses.fields(target)]
    if section == "objective" and name not in ("name", "agg", "horizon"):
        target.params[name] = value  # an objective parameter: get_objective checks it
        return
    if name not in names:
        raise ValueError(f"{where}{key}: unknown field; allowed in [{section}]: {', '.join(names)}")
    default = getattr(type(target)(), name)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    setattr(target, name, value)


def parse_override(text: str) -> tuple[str, Any]:
    """``"objective.tau_pos=2"`` -> ``("objective.tau_pos", 2)``; the value is parsed as TOML, else kept a string."""
    if "=" not in text:
        raise ValueError(f"--set: expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def packaged_config(path: str | Path) -> Any:
    """``path`` if it is a file, else the packaged config of that name (``.toml`` optional); ValueError if neither."""
    if Path(path).is_file():
        return Path(path)
    name = str(path) if str(path).endswith(".toml") else f"{path}.toml"
    if "/" not in name and (PACKAGED_CONFIGS / name).is_file():
        return PACKAGED_CONFIGS / name
    shipped = sorted(p.name.removesuffix(".toml") for p in PACKAGED_CONFIGS.iterdir() if p.name.endswith(".toml"))
    raise ValueError(f"config: {str(path)!r} is not a file; packaged configs: {', '.join(shipped)}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                **fields: Any) -> TrainConfig:
    """Load and validate a config.

    Args:
        path: a TOML file, or the name of a config shipped in ``sspo_analysis/configs``
            (e.g. ``"qwen2.5-0.5b-gsm8k"``); None means the built-in defaults
            (``sspo_analysis/configs/default.toml`` mirrors them).
        overrides: ``"section.field=value"`` strings, applied in order.
        **fields: more overrides as ``section__field=value`` keyword arguments.
    """
    data: dict[str, Any] = {}
    if path is not None:
        source = packaged_config(path)
        try:
            data = tomllib.loads(source.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as err:
            raise ValueError(f"config: {path}: {err}") from err
    cfg = _from_dict(data, f"{path}: " if path else "")
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value, "--set ")
    for key, value in fields.items():
        _set(cfg, key.replace("__", "."), value, "")
    return cfg.validate()


def resolve_config(config: TrainConfig | str | Path | None, overrides) -> TrainConfig:
    """A validated config from a TrainConfig, a TOML path or None (defaults), with overrides on top."""
    if isinstance(config, TrainConfig):
        if overrides:
            return load_config(None, flatten_overrides(config) + list(overrides))
        return config.validate()
    return load_config(config, list(overrides or ()))


def flatten_overrides(cfg: TrainConfig) -> list[str]:
    """A config as ``section.field=value`` strings (to re-apply overrides on top of a TrainConfig)."""
    import tomli_w

    out = []
    for section, value in cfg.to_dict().items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for k, v in items:
            key = f"{section}.{k}" if k is not None else section
            out.append(f"{key}={tomli_w.dumps({'v': v})[4:].strip()}")
    return out
