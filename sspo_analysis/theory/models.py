"""Models of the token log-ratio ``l = log pi_theta - log pi_old`` under the behaviour policy.

A model answers two questions: what are its parameters (for the closed forms
and the quadrature), and how to draw sequences of log-ratios from it (for Monte
Carlo). Every model draws with :meth:`sample`, which returns a padded
``(n, T)`` float64 array and its ``(n, T)`` bool mask, the layout the
objectives take.

- :class:`LogNormalRatios`: Gaussian token log-ratios, i.i.d. or AR(1); the
  analytic model of ``docs/theory.md`` (section 7).
- :class:`EmpiricalRatios`: measured log-ratios, e.g. those the trainer logs to
  ``RUN/log_ratios/step_*.npz``.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["LogNormalRatios", "EmpiricalRatios", "RatioModel", "check_std", "check_length", "check_correlation"]


def check_std(std: float, name: str = "log_ratio_std") -> float:
    """``std`` as a float, or a ValueError naming ``name`` unless it is finite and > 0."""
    try:
        value = float(std)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a finite number > 0, got {std!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: must be a finite number > 0, got {std!r}")
    return value


def check_length(length: int, name: str = "length") -> int:
    """``length`` as an int, or a ValueError unless it is an integer >= 1."""
    if isinstance(length, bool) or not isinstance(length, (int, np.integer, float)) or length != int(length) \
            or length < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {length!r}")
    return int(length)


def check_correlation(correlation: float) -> float:
    """``correlation`` as a float, or a ValueError unless it lies in (-1, 1)."""
    try:
        rho = float(correlation)
    except (TypeError, ValueError):
        raise ValueError(f"correlation: must be a number in (-1, 1), got {correlation!r}") from None
    if not -1.0 < rho < 1.0:
        raise ValueError(f"correlation: must be a number in (-1, 1), got {correlation!r}")
    return rho


@dataclass(frozen=True)
class LogNormalRatios:
    """Gaussian token log-ratios ``l_t ~ N(mean, std^2)`` over sequences of ``length`` tokens.

    Args:
        std: standard deviation ``s`` of one token's log-ratio (> 0).
        length: tokens per sequence ``L`` (>= 1).
        mean: mean ``m`` of one token's log-ratio; default ``-std**2 / 2``, the
            value that makes ``E[r] = 1`` (a true importance ratio).
        correlation: lag-one correlation ``rho`` of an AR(1) process along the
            sequence, ``l_t - m = rho (l_{t-1} - m) + sqrt(1 - rho^2) s z_t``.
            Each token keeps the marginal ``N(m, s^2)``; only the sequence-level
            quantities (GSPO, the geometric means, ``is-seq``) feel ``rho``.

    Example::

        >>> LogNormalRatios(0.3, length=16).mean
        -0.045
    """

    std: float
    length: int = 1
    mean: float | None = None
    correlation: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "std", check_std(self.std))
        object.__setattr__(self, "length", check_length(self.length))
        mean = -self.std**2 / 2 if self.mean is None else float(self.mean)
        if not math.isfinite(mean):
            raise ValueError(f"log_ratio_mean: must be a finite number, got {self.mean!r}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "correlation", check_correlation(self.correlation))

    @property
    def iid(self) -> bool:
        """True when tokens are independent (``correlation == 0``)."""
        return self.correlation == 0.0

    @property
    def log_ratio_mean(self) -> float:
        return float(self.mean)  # type: ignore[arg-type]

    @property
    def log_ratio_std(self) -> float:
        return self.std

    @property
    def mean_length(self) -> float:
        return float(self.length)

    @property
    def n_sequences(self) -> None:
        """Unbounded: a parametric model can draw any number of sequences."""
        return None

    def sum_variance(self) -> float:
        """``Var(sum_t l_t)`` over one sequence (``L s^2`` when i.i.d.)."""
        return float(sum_variance(self.std, self.length, self.correlation))

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` sequences: ``(log_ratios (n, L) float64, mask (n, L) bool)``."""
        z = rng.standard_normal((n, self.length))
        if not self.iid:
            rho, innov = self.correlation, math.sqrt(1.0 - self.correlation**2)
            for t in range(1, self.length):
                z[:, t] = rho * z[:, t - 1] + innov * z[:, t]
        return self.mean + self.std * z, np.ones((n, self.length), dtype=bool)

    def chunks(self, n: int, rng: np.random.Generator, max_tokens: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """:meth:`sample` ``n`` sequences in pieces of at most ``max_tokens`` tokens (one sequence if longer).

        The pieces split one stream of draws: the samples are the same whatever ``max_tokens``.
        """
        per = max(1, max_tokens // self.length)
        for start in range(0, n, per):
            yield self.sample(min(per, n - start), rng)


def sum_variance(std: np.ndarray | float, length: np.ndarray | int, correlation: float = 0.0) -> np.ndarray:
    """``Var(sum_{t<L} l_t)`` for AR(1) log-ratios with marginal std ``std`` (broadcasts).

    ``s^2 [L + 2 sum_{k=1}^{L-1} (L - k) rho^k]``, the sum in closed form.
    """
    s2, L, rho = np.asarray(std, dtype=float) ** 2, np.asarray(length, dtype=float), float(correlation)
    if rho == 0.0:
        return s2 * L
    cross = rho * (L * (1.0 - rho) - (1.0 - rho**L)) / (1.0 - rho) ** 2
    return s2 * (L + 2.0 * cross)


class EmpiricalRatios:
    """Measured token log-ratios, one variable-length sequence per row.

    Args:
        samples: the log-ratios, as a list of 1-D arrays (one per sequence), a
            2-D array ``(n, L)`` of equal-length sequences, or one concatenated
            1-D array split by ``lengths``.
        lengths: tokens per sequence, needed with a concatenated 1-D array.
        advantages: optional advantage per sequence (kept for :meth:`subset`).

    Monte Carlo over this model averages over its sequences (all of them by
    default, or a bootstrap resample of ``n_samples``): the theory's numbers for
    it are the trainer's ``coef_norm_*`` metrics recomputed under any objective.
    Empty sequences carry no tokens and are dropped.
    """

    def __init__(
        self,
        samples: Sequence[np.ndarray] | np.ndarray,
        lengths: Sequence[int] | np.ndarray | None = None,
        advantages: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        if isinstance(samples, np.ndarray) and samples.ndim == 2:
            if lengths is not None:
                raise ValueError("lengths: give lengths only with a concatenated 1-D samples array")
            values = samples.astype(np.float64).ravel()
            lens = np.full(samples.shape[0], samples.shape[1], dtype=np.int64)
        elif isinstance(samples, np.ndarray) and samples.ndim == 1 and samples.dtype != object:
            values = samples.astype(np.float64)
            lens = np.array([values.size] if lengths is None else lengths, dtype=np.int64).ravel()
        else:
            if lengths is not None:
                raise ValueError("lengths: give lengths only with a concatenated 1-D samples array")
            seqs = [np.asarray(s, dtype=np.float64).ravel() for s in samples]
            values = np.concatenate(seqs) if seqs else np.zeros(0)
            lens = np.array([s.size for s in seqs], dtype=np.int64)
        if (lens < 0).any() or lens.sum() != values.size:
            raise ValueError(f"lengths: must be >= 0 and sum to the number of log-ratios ({values.size}), "
                             f"got sum {int(lens.sum())}")
        if not np.isfinite(values).all():
            raise ValueError("samples: log-ratios must be finite")
        adv = None
        if advantages is not None:
            adv = np.asarray(advantages, dtype=np.float64).ravel()
            if adv.size != lens.size:
                raise ValueError(f"advantages: need one per sequence ({lens.size}), got {adv.size}")
        keep = lens > 0
        if not keep.any():
            raise ValueError("samples: no sequence with at least one token")
        if not keep.all():
            offsets = np.concatenate([[0], np.cumsum(lens)])
            values = np.concatenate([values[offsets[i]:offsets[i + 1]] for i in np.flatnonzero(keep)])
            lens, adv = lens[keep], (adv[keep] if adv is not None else None)
        self.values: np.ndarray = values
        self.lengths: np.ndarray = lens
        self.advantages: np.ndarray | None = adv
        self.offsets: np.ndarray = np.concatenate([[0], np.cumsum(lens)])

    def __repr__(self) -> str:
        return (f"EmpiricalRatios(n_sequences={self.n_sequences}, mean_length={self.mean_length:.4g}, "
                f"log_ratio_mean={self.log_ratio_mean:.4g}, log_ratio_std={self.log_ratio_std:.4g})")

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, steps: int | Iterable[int] | None = None) -> EmpiricalRatios:
        """Read the log-ratios a training run logged to ``RUN/log_ratios/step_%06d.npz``.

        Each file holds ``log_ratios`` (float32, unmasked token log-ratios of the
        step's batch, concatenated), ``lengths`` (tokens per sequence) and
        ``advantages`` (one per sequence).

        Args:
            run_dir: the run directory.
            steps: which steps to pool: ``None`` for all, one step, or several.
        """
        folder = Path(run_dir) / "log_ratios"
        files = sorted(folder.glob("step_*.npz"))
        if steps is not None:
            wanted = {int(steps)} if isinstance(steps, (int, np.integer)) else {int(s) for s in steps}
            files = [f for f in files if int(f.stem.split("_")[-1]) in wanted]
            missing = wanted - {int(f.stem.split("_")[-1]) for f in files}
            if missing:
                raise ValueError(f"steps: no log-ratios logged for step(s) {sorted(missing)} under {folder}")
        if not files:
            raise ValueError(f"run_dir: no log-ratio files (step_*.npz) under {folder}")
        values, lengths, advantages = [], [], []
        for f in files:
            try:
                with np.load(f) as data:
                    values.append(np.asarray(data["log_ratios"], dtype=np.float64).ravel())
                    lengths.append(np.asarray(data["lengths"], dtype=np.int64).ravel())
                    adv = data["advantages"] if "advantages" in data else None
                    advantages.append(None if adv is None else np.asarray(adv, dtype=np.float64).ravel())
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                why = f"{type(err).__name__}: {err}"
                raise ValueError(f"run_dir: {f} is not a readable log-ratio file ({why})") from err
        adv_all = None if any(a is None for a in advantages) else np.concatenate(advantages)
        return cls(np.concatenate(values), np.concatenate(lengths), adv_all)

    # -- summary statistics (token level, as the trainer's metrics)
    @property
    def n_sequences(self) -> int:
        return int(self.lengths.size)

    @property
    def log_ratio_mean(self) -> float:
        return float(self.values.mean())

    @property
    def log_ratio_std(self) -> float:
        return float(self.values.std())

    @property
    def mean_length(self) -> float:
        return float(self.lengths.mean())

    @property
    def iid(self) -> bool:
        return False

    def subset(self, advantage_sign: int) -> EmpiricalRatios:
        """The sequences whose advantage has the given sign (+1 or -1).

        Useful because a trained policy moves ratios up where ``A > 0`` and down
        where ``A < 0``: analyse each sign on its own sequences.
        """
        if self.advantages is None:
            raise ValueError("advantages: this model has none; subset needs them")
        keep = np.sign(self.advantages) == np.sign(advantage_sign)
        if not keep.any():
            raise ValueError(f"advantage_sign: no sequence with sign {advantage_sign:+d}")
        seqs = [self.values[self.offsets[i]:self.offsets[i + 1]] for i in np.flatnonzero(keep)]
        return EmpiricalRatios(seqs, advantages=self.advantages[keep])

    def _pad(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lens = self.lengths[index]
        width = int(lens.max())
        pos = np.arange(width)
        mask = pos[None, :] < lens[:, None]
        src = np.minimum(self.offsets[index][:, None] + pos[None, :], self.values.size - 1)
        return np.where(mask, self.values[src], 0.0), mask

    def sample(self, n: int | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """All sequences (``n=None``) or a bootstrap resample of ``n``: padded ``(values, mask)``."""
        index = np.arange(self.n_sequences) if n is None else rng.integers(0, self.n_sequences, n)
        return self._pad(index)

    def chunks(self, n: int | None, rng: np.random.Generator,
               max_tokens: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """:meth:`sample` in pieces of about ``max_tokens`` padded tokens.

        A bootstrap draws each piece's indices as it goes (the same indices as one draw of ``n``: numpy's
        bounded 64-bit integers do not buffer), so memory is bounded by the piece whatever ``n``.
        """
        total = self.n_sequences if n is None else n
        per = max(1, max_tokens // int(self.lengths.max()))
        for start in range(0, total, per):
            size = min(per, total - start)
            yield self._pad(np.arange(start, start + size) if n is None else rng.integers(0, self.n_sequences, size))


RatioModel = LogNormalRatios | EmpiricalRatios
"""Any model :func:`sspo_analysis.theory.analyse` accepts."""
