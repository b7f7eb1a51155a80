"""A tabular autoregressive policy: how policy lag biases each objective's gradient.

The policy emits ``L`` tokens from a vocabulary of ``V``; token ``t`` is drawn
from ``softmax(theta[t, y_{t-1}])`` (``y_{-1}`` is a start symbol), so the
policy is a table of ``L (V + 1) V`` logits and the ``V^L`` sequences can be
enumerated. A sequence is *correct* (reward 1) when its token sum is divisible
by ``V``: a verifiable reward that about one sequence in ``V`` earns and that
only the whole sequence decides.

:func:`staleness_study` measures, as the policy lag ``k`` grows, the bias and
variance of each objective's gradient estimate (``-grad loss`` of the real
objective, by autograd) computed on groups sampled from a policy ``k`` updates
old, against the exact gradient of the expected reward at the current policy;
:func:`staleness_data` runs it for several objectives on the same samples (paper
figure 9 and the stability study draw it with :mod:`sspo_analysis.plotting.staleness`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sspo_analysis.objectives import Objective, resolve_objective
from sspo_analysis.primitives import group_advantages
from sspo_analysis.simulation.bandit import check_int

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["STALENESS_LAGS", "STALENESS_OBJECTIVES", "TabularPolicy", "staleness_data", "staleness_study"]


@dataclass(frozen=True)
class TabularPolicy:
    """The sequence space of a tabular autoregressive policy: ``length`` tokens, ``vocab`` symbols.

    A policy is a logit table ``theta`` of shape :attr:`shape`, ``(L, V + 1, V)``.
    """

    length: int = 4
    vocab: int = 3

    def __post_init__(self) -> None:
        if not (isinstance(self.length, int) and self.length >= 1):
            raise ValueError(f"length: must be an integer >= 1, got {self.length!r}")
        if not (isinstance(self.vocab, int) and self.vocab >= 2):
            raise ValueError(f"vocab: must be an integer >= 2, got {self.vocab!r}")
        if self.vocab**self.length > 200_000:
            raise ValueError(f"length, vocab: V^L = {self.vocab**self.length} sequences is too many to enumerate "
                             "(allowed: <= 200000)")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.length, self.vocab + 1, self.vocab)

    def sequences(self) -> torch.Tensor:
        """All ``V^L`` sequences, ``(V^L, L)`` long."""
        return torch.tensor(list(itertools.product(range(self.vocab), repeat=self.length)), dtype=torch.long)

    def reward(self, y: torch.Tensor) -> torch.Tensor:
        """1.0 where the token sum is divisible by ``V``, else 0.0 (float64)."""
        return (y.sum(-1) % self.vocab == 0).to(torch.float64)

    def token_log_probs(self, theta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-token log-probabilities ``(..., L)`` of sequences ``y (..., L)``.

        ``theta`` is one table ``(L, V + 1, V)`` or a batch of tables
        ``(B, L, V + 1, V)`` matched to ``y (B, ..., L)``.
        """
        start = torch.full_like(y[..., :1], self.vocab)
        prev = torch.cat([start, y[..., :-1]], -1)
        pos = torch.arange(self.length).expand_as(y)
        if theta.dim() == 3:
            logits = theta[pos, prev]
        else:
            b = torch.arange(theta.shape[0]).view(-1, *([1] * (y.dim() - 1)))
            logits = theta[b, pos, prev]
        return torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def expected_reward(self, theta: torch.Tensor) -> torch.Tensor:
        """``J(theta) = sum_y pi_theta(y) R(y)``, exact (differentiable)."""
        y = self.sequences()
        return (self.token_log_probs(theta, y).sum(-1).exp() * self.reward(y)).sum()

    def exact_gradient(self, theta: torch.Tensor) -> torch.Tensor:
        """``grad_theta J``, exact by enumeration."""
        th = theta.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.expected_reward(th), th)
        return grad

    def kl(self, theta_old: torch.Tensor, theta: torch.Tensor) -> float:
        """``KL(pi_old || pi_theta)`` over whole sequences, exact."""
        y = self.sequences()
        lp_old = self.token_log_probs(theta_old, y).sum(-1)
        lp = self.token_log_probs(theta, y).sum(-1)
        return float((lp_old.exp() * (lp_old - lp)).sum())


def staleness_study(  # noqa: PLR0913 - keyword knobs of one experiment, each a CLI flag
    objective: str | Objective,
    staleness: Iterable[int] = (0, 1, 2, 4, 8),
    *,
    length: int = 4,
    vocab: int = 3,
    group_size: int = 8,
    n_batches: int = 2000,
    groups_per_batch: int = 4,
    path_lr: float = 3.0,
    init_scale: float = 0.5,
    seed: int = 0,
    **params: Any,
) -> pd.DataFrame:
    """Bias and variance of an objective's gradient estimate as the policy lag grows.

    A fixed policy path ``theta_0, theta_1, ...`` is made by exact gradient
    ascent on the expected reward (``theta_{j+1} = theta_j + path_lr grad J``),
    the same for every objective. For a lag ``k`` the behaviour policy is
    ``theta_0`` and the current one ``theta_k``; each of ``n_batches``
    independent batches of groups sampled from ``theta_0`` gives one estimate
    ``g_hat = -grad_theta loss`` (the objective's real loss, autograd). The
    advantages are Dr.GRPO's ``R - mean_group R``, so that the on-policy estimate
    is unbiased for ``g* = (1 - 1/G) / L * grad J(theta_k)``, the target here.

    Returns:
        One row per lag: ``objective``, ``staleness``, ``kl`` (exact
        ``KL(pi_old || pi)``), ``log_ratio_std`` (token log-ratios of the
        samples), ``bias`` (``|E g_hat - g*| / |g*|``, with the sampling noise of
        the mean removed), ``bias_raw`` (without that correction), ``variance``
        (``E |g_hat - E g_hat|^2 / |g*|^2``), ``mse`` (``bias^2 + variance``),
        ``cosine`` and ``scale`` (of ``E g_hat`` against ``g*``), ``mean_stderr``
        (``sqrt(variance / n_batches)``, the noise of the mean), ``target_norm2``
        (``|g*|^2``, the divisor of the relative columns), the objective's
        ``dead_frac``, ``coef_norm_mean``, ``ess_frac``, and the settings.
    """
    import pandas as pd

    obj = resolve_objective(objective, **params)
    lags = sorted({int(k) for k in staleness})
    if not lags or lags[0] < 0:
        raise ValueError(f"staleness: need integers >= 0, got {list(staleness)!r}")
    for name, value, low in (("group_size", group_size, 2), ("n_batches", n_batches, 2),
                             ("groups_per_batch", groups_per_batch, 1)):
        check_int(value, name, low)
    if not (path_lr >= 0 and math.isfinite(path_lr)):
        raise ValueError(f"path_lr: must be a finite number >= 0, got {path_lr!r}")
    space = TabularPolicy(length, vocab)
    gen = torch.Generator().manual_seed(seed)
    theta0 = init_scale * torch.randn(space.shape, generator=gen, dtype=torch.float64)
    path = [theta0]
    for _ in range(lags[-1]):
        path.append(path[-1] + path_lr * space.exact_gradient(path[-1]))
    study = _Study(space, theta0, group_size, groups_per_batch, n_batches)
    settings = {"length": length, "vocab": vocab, "group_size": group_size, "n_batches": n_batches,
                "path_lr": float(path_lr), "seed": seed}
    rows = [{"objective": obj.name, "staleness": k, **_lag_row(obj, study, path[k], gen), **settings} for k in lags]
    return pd.DataFrame(rows)


STALENESS_OBJECTIVES: tuple[str, ...] = ("grpo", "dapo", "cispo", "gspo", "gmpo", "sapo", "sspo", "sspo-sigmoid",
                                         "vespo")
"""The objectives of :func:`staleness_data` (default; paper figure 9)."""
STALENESS_LAGS: tuple[int, ...] = (0, 1, 2, 4, 8, 16)
"""The policy lags k of :func:`staleness_data` (updates between the behaviour and the current policy)."""

Entry = str | tuple[str, str, Mapping[str, Any]]


def staleness_data(
    objectives: Sequence[Entry] = STALENESS_OBJECTIVES,
    lags: Sequence[int] = STALENESS_LAGS,
    n_batches: int = 1000,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
    **study: Any,
) -> pd.DataFrame:
    """One :func:`staleness_study` per objective, stacked in one table (what
    :func:`sspo_analysis.plotting.staleness.plot_staleness` draws).

    ``objectives`` holds registered names or ``(label, name, params)`` triples
    (a variant, e.g. ``("sspo-sigmoid@tau=2", "sspo-sigmoid", {"tau": 2.0})``);
    the ``objective`` column holds the name or the label. Every objective sees
    the same policy path and the same samples (the same ``seed``), so the
    differences between them are the objectives', not the sampling's.
    ``progress(done, total, name)`` is called before each objective; ``study``
    goes to ``staleness_study`` (``length``, ``vocab``, ``group_size``, ...).
    Runs on one torch thread (restored afterwards).
    """
    import pandas as pd

    frames = []
    threads = torch.get_num_threads()
    # The tensors are tiny: one thread is fastest, and several slow to a crawl on a busy machine.
    torch.set_num_threads(1)
    try:
        for i, entry in enumerate(objectives):
            label, name, params = (entry, entry, {}) if isinstance(entry, str) else entry
            if progress is not None:
                progress(i, len(objectives), label)
            df = staleness_study(name, lags, n_batches=n_batches, seed=seed, **study, **dict(params))
            frames.append(df.assign(objective=label))
    finally:
        torch.set_num_threads(threads)
    if progress is not None:
        progress(len(objectives), len(objectives), "done")
    return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class _Study:
    """What every lag of a staleness study shares: the sequence space, the behaviour policy and the batch shape."""

    space: TabularPolicy
    theta0: torch.Tensor
    group_size: int
    groups_per_batch: int
    n_batches: int


def _estimates(obj: Objective, study: _Study, theta: torch.Tensor,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """``n_batches`` gradient estimates ``-grad loss`` at ``theta`` from batches sampled under ``theta0``.

    Returns the estimates (n_batches, P), the samples' token log-ratios and the objective's metrics.
    """
    space, n_batches, length = study.space, study.n_batches, study.space.length
    ys = space.sequences()
    with torch.no_grad():
        p_old = space.token_log_probs(study.theta0, ys).sum(-1).exp()
    per_batch = study.groups_per_batch * study.group_size
    idx = torch.multinomial(p_old, n_batches * per_batch, replacement=True, generator=gen)
    y = ys[idx].view(n_batches, per_batch, length)
    rewards = space.reward(y).view(n_batches, study.groups_per_batch, study.group_size)
    adv = group_advantages(rewards, scale=False).reshape(-1)
    with torch.no_grad():
        old_lp = space.token_log_probs(study.theta0, y.reshape(-1, length))
    tables = theta.expand(n_batches, *space.shape).clone().requires_grad_(True)
    lp = space.token_log_probs(tables, y).reshape(-1, length)
    loss, metrics = obj(lp, old_lp, adv, torch.ones_like(lp, dtype=torch.bool))
    (grad,) = torch.autograd.grad(loss, tables)
    # The loss averages over all batches' sequences (equal lengths): each batch
    # contributes 1 / n_batches of its own loss.
    return -n_batches * grad.reshape(n_batches, -1), lp.detach() - old_lp, metrics


def _lag_row(obj: Objective, study: _Study, theta: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
    """Bias, variance and the objective's metrics at one lag (current policy ``theta``)."""
    space, n_batches = study.space, study.n_batches
    target = (1.0 - 1.0 / study.group_size) / space.length * space.exact_gradient(theta).reshape(-1)
    g_hat, log_ratios, metrics = _estimates(obj, study, theta, gen)
    mean = g_hat.mean(0)
    var = float(((g_hat - mean) ** 2).sum(-1).mean()) * n_batches / (n_batches - 1)
    norm2 = float(target.pow(2).sum())
    err2 = float((mean - target).pow(2).sum())
    return {
        "kl": space.kl(study.theta0, theta),
        "log_ratio_std": float(log_ratios.std()),
        "bias": math.sqrt(max(err2 - var / n_batches, 0.0) / norm2),
        "bias_raw": math.sqrt(err2 / norm2),
        "variance": var / norm2,
        "mse": max(err2 - var / n_batches, 0.0) / norm2 + var / norm2,
        "cosine": float(mean @ target) / math.sqrt(float(mean.pow(2).sum()) * norm2),
        "scale": float(mean @ target) / norm2,
        "mean_stderr": math.sqrt(var / n_batches / norm2),
        "target_norm2": norm2,  # |g*|^2: what the relative columns are divided by
        "dead_frac": metrics["dead_frac"],
        "coef_norm_mean": metrics["coef_norm_mean"],
        "ess_frac": metrics["ess_frac"],
    }
