"""What the stability study trains: the arms (objectives with their parameters), the regimes and the plans.

A *regime* fixes how hard training is pushed off-policy and how long the answers
are: the learning rate, the optimiser updates per rollout batch (every update
after the first is off-policy), the rollout staleness and the answer length
(``reversal`` of ``length`` letters with partial credit, so a response has
``length + 1`` tokens and every token moves the reward). An *arm* is an
objective with its parameters. A *plan* is the grid: every arm in every map
regime over the map seeds, and the headline regime over more seeds, paired by
seed (a seed fixes the warm start's sampling stream and the prompts, so two arms
with one seed start from the same policy and see the same first batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Arm:
    """An objective as the study trains it: ``label`` (its name in tables), the registered ``objective``, ``params``."""

    label: str
    objective: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def tag(self) -> str:
        """Run-directory suffix that keeps two arms of one objective apart ('' for the defaults)."""
        return "_".join(f"{k}{v}" for k, v in self.params)

    def overrides(self) -> list[str]:
        """The trainer settings that select this arm (``objective.*``)."""
        out = [f'objective.name="{self.objective}"']
        for key, value in self.params:
            out.append(f'objective.{key}="{value}"' if isinstance(value, str) else f"objective.{key}={value}")
        return out


@dataclass(frozen=True)
class Regime:
    """How hard training is pushed: answer ``length`` (letters), ``lr``, ``updates`` per rollout batch, staleness."""

    length: int
    lr: float
    updates: int
    staleness: int = 0

    @property
    def label(self) -> str:
        """Short readable name, e.g. ``L16 lr1e-03 u8 k0``."""
        return f"L{self.length} lr{self.lr:.0e} u{self.updates} k{self.staleness}"

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "_")

    def overrides(self) -> list[str]:
        """The trainer settings of this regime (the task and the push)."""
        return [f"task.length={self.length}", f"rollout.max_new_tokens={self.length + 2}", f"optim.lr={self.lr}",
                f"algo.updates_per_batch={self.updates}", f"algo.staleness={self.staleness}"]

    def as_columns(self) -> dict[str, Any]:
        return {"regime": self.label, "length": self.length, "lr": self.lr, "updates": self.updates,
                "staleness": self.staleness}


@dataclass(frozen=True)
class Plan:
    """A whole study: the arms, the map regimes and seeds, the headline regime and seeds, and the run settings."""

    name: str
    arms: tuple[Arm, ...]
    regimes: tuple[Regime, ...]
    seeds: tuple[int, ...]
    headline: Regime
    headline_seeds: tuple[int, ...]
    steps: int
    settings: tuple[str, ...] = field(default=())
    """Trainer settings every run shares (``section.field=value``)."""
    gradient_batches: int = 1000
    """Sampled batches per lag of the exact-gradient staleness figure."""

    def runs(self) -> list[StudyRun]:
        """Every run of the plan, headline runs first (they carry the statistical comparison), without repeats."""
        specs = [StudyRun(a, self.headline, s) for s in self.headline_seeds for a in self.arms]
        specs += [StudyRun(a, r, s) for r in self.regimes for s in self.seeds for a in self.arms]
        return list(dict.fromkeys(specs))

    def regime_labels(self) -> list[str]:
        """Every regime's label from the shortest answers and the gentlest push to the hardest (the edge shows)."""
        regimes = {r.label: r for r in (self.headline, *self.regimes)}
        return sorted(regimes, key=lambda k: (regimes[k].length, regimes[k].staleness, regimes[k].updates,
                                              regimes[k].lr))

    def with_seeds(self, seeds: tuple[int, ...]) -> Plan:
        """The plan with ``seeds`` as the headline seeds and the first of them as the map seeds."""
        from dataclasses import replace

        n_map = min(len(self.seeds), len(seeds))
        return replace(self, headline_seeds=seeds, seeds=seeds[:n_map])


@dataclass(frozen=True)
class StudyRun:
    """One run: an arm in a regime with a seed."""

    arm: Arm
    regime: Regime
    seed: int

    @property
    def name(self) -> str:
        return f"{self.regime.slug}/{self.arm.objective}_seed{self.seed}{'_' + self.arm.tag if self.arm.tag else ''}"

    def run_dir(self, root: Path) -> Path:
        return root / self.name

    def overrides(self, plan: Plan, cache: Path | None = None) -> list[str]:
        """Every trainer setting of this run, shared ones first; the warm start comes from the trainer's one cache
        (``$SSPO_CACHE`` or ``~/.cache/sspo_analysis``, shared with ``sspo train``, the figures and the notebooks)
        unless ``cache`` names another."""
        where = [f'warm_start.dir="{cache}"'] if cache is not None else []
        return [*where, *plan.settings, f"steps={plan.steps}", *self.regime.overrides(), *self.arm.overrides(),
                f"seed={self.seed}"]


ARMS: tuple[Arm, ...] = (
    Arm("grpo", "grpo"),
    Arm("dapo", "dapo"),
    Arm("cispo", "cispo"),
    Arm("gspo", "gspo"),
    Arm("gmpo", "gmpo"),
    Arm("sapo", "sapo"),
    Arm("sspo", "sspo"),
    Arm("sspo-erf", "sspo", (("gate", "erf"),)),
    Arm("sspo-sigmoid", "sspo-sigmoid"),
    Arm("sspo-sigmoid-tau2", "sspo-sigmoid", (("tau_pos", 2.0), ("tau_neg", 2.0))),
    Arm("vespo", "vespo"),
)
"""Hard clipping (grpo, dapo, gspo, gmpo), truncated weights (cispo), token-level soft gates (sapo), sequence-level
soft gates (sspo with its arctan default and an erf variant; sspo-sigmoid at its default temperature and at the
admissible tau = 2) and VESPO's soft sequence weight."""

BASE_SETTINGS: tuple[str, ...] = (
    'task.name="reversal"', 'task.grader="chars"', 'model.preset="tiny"', "threads=1", "log.progress=false",
    "log.entropy_taylor=false", "log.entropy_change=false", "algo.track_kl_ref=false", "log.log_ratios_every=0",
    "log.checkpoint_every=10",
)
"""Every study run: the tiny preset on partial-credit reversal, one torch thread, only the metrics the study reads."""

FULL = Plan(
    name="full",
    arms=ARMS,
    regimes=tuple(Regime(16, lr, u) for u in (2, 8) for lr in (5e-4, 1e-3, 2e-3))
    + (Regime(16, 5e-4, 2, staleness=4), Regime(6, 1e-3, 8), Regime(6, 2e-3, 8)),
    seeds=(0, 1, 2),
    headline=Regime(16, 1e-3, 8),
    headline_seeds=tuple(range(10)),
    steps=30,
    settings=BASE_SETTINGS,
    gradient_batches=4000,
)
"""The committed study (``docs/results/stability``): 11 arms x 9 map regimes x 3 seeds, and 10 paired seeds in the
headline regime, 30 steps each; about an hour with two jobs on a 2-core CPU. The headline regime was chosen from a
pilot before the study (the smallest push at which some objectives' reward collapsed), not from its results."""

QUICK = Plan(
    name="quick",
    arms=tuple(a for a in ARMS if a.label in ("grpo", "gmpo", "sspo", "sspo-sigmoid-tau2", "vespo")),
    regimes=(Regime(6, 3e-4, 2), Regime(6, 3e-3, 8)),
    seeds=(0, 1),
    headline=Regime(6, 3e-3, 8),
    headline_seeds=(0, 1),
    steps=6,
    settings=(*BASE_SETTINGS, "rollout.prompts=8", "rollout.group_size=4", "warm_start.max_steps=150"),
    gradient_batches=200,
)
"""CI's smoke version (every code path, a few minutes): too few seeds and steps for any conclusion."""

PLANS: dict[str, Plan] = {"quick": QUICK, "full": FULL}
