"""Property tests for gates and objectives: the package's own battery, public.

``check_gate`` and ``check_objective`` run every property the package's tests
run on its built-in gates and objectives, on any gate or objective, and return a
report (``.ok``, ``.failures``, a rich table when printed); ``assert_gate`` and
``assert_objective`` raise ``AssertionError`` with the report, for a user's pytest::

    from sspo_analysis.testing import assert_gate, assert_objective

    def test_my_gate():
        assert_gate("mymod:mygate", taus=(0.5, 1.0, 4.0))
        assert_objective("sspo", gate="mymod:mygate")

The hypothesis-driven properties search for a counterexample with
``hypothesis.find`` (derandomised, so a report is reproducible) and give the
shrunk one. The strategies are public too (:func:`batches`, :func:`log_ratios`,
:func:`advantages`, :func:`masks`, :func:`dtypes`, :func:`temperatures`); they
draw the data itself, so hypothesis shrinks the data, not a seed.

hypothesis is an optional dependency of this module: ``pip install hypothesis``
(or the package's ``test`` extra).
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sspo_analysis import gates
from sspo_analysis.objectives import AGG_MODES, Objective, get_objective

Tensor = torch.Tensor

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16)
DEFAULT_TAUS: tuple[float, ...] = (0.5, 1.0, 4.0)
DEFAULT_EXAMPLES = 100
BOUNDED_TAU_U = 3.0
"""Derivative checks draw ``|tau u| <= 3``, where every admissible weight is still far from 0
(``exp(-9)`` for erf), so that the comparison is never ``0`` against ``0``."""


def _hypothesis() -> Any:
    try:
        import hypothesis
    except ImportError:
        raise ImportError("sspo_analysis.testing needs hypothesis: pip install hypothesis "
                          "(or pip install 'sspo-analysis[test]')") from None
    return hypothesis


def _st() -> Any:
    return _hypothesis().strategies


# --------------------------------------------------------------------------- strategies


def temperatures(lo: float = 0.05, hi: float = 20.0) -> Any:
    """Gate temperatures ``tau`` in ``[lo, hi]``."""
    return _st().floats(lo, hi, allow_nan=False)


def dtypes(choices: Sequence[torch.dtype] = DTYPES) -> Any:
    """Floating dtypes: float32, float64, bfloat16."""
    return _st().sampled_from(tuple(choices))


def log_ratio_values(max_abs: float = 3.0, extremes: bool = False) -> Any:
    """One token log-ratio in ``[-max_abs, max_abs]``; with ``extremes`` also +-1e4 and +-20 (the clamp)."""
    st = _st()
    values = st.floats(-max_abs, max_abs, allow_nan=False)
    return st.one_of(values, st.sampled_from((1e4, -1e4, 20.0, -20.0))) if extremes else values


def log_ratios(rows: int, cols: int, max_abs: float = 3.0, extremes: bool = False) -> Any:
    """A ``rows x cols`` list of log-ratios (see :func:`log_ratio_values`)."""
    st = _st()
    return st.lists(st.lists(log_ratio_values(max_abs, extremes), min_size=cols, max_size=cols),
                    min_size=rows, max_size=rows)


def advantages(rows: int, cols: int, level: str | None = None) -> Any:
    """Advantages of both signs and exact zeros: ``(rows,)`` per sequence or ``(rows, cols)`` per token.

    ``level`` is ``"sequence"``, ``"token"`` or ``None`` (drawn).
    """
    st = _st()
    value = st.one_of(st.just(0.0), st.floats(-3.0, 3.0, allow_nan=False))
    seq = st.lists(value, min_size=rows, max_size=rows)
    tok = st.lists(st.lists(value, min_size=cols, max_size=cols), min_size=rows, max_size=rows)
    if level is None:
        return st.one_of(seq, tok)
    if level not in ("sequence", "token"):
        raise ValueError(f"level: unknown value {level!r}; allowed values: sequence, token, None")
    return seq if level == "sequence" else tok


def masks(rows: int, cols: int) -> Any:
    """Response lengths, one per row in ``[0, cols]``: ragged, with empty rows (right padding)."""
    st = _st()
    return st.lists(st.integers(0, cols), min_size=rows, max_size=rows)


@dataclass(frozen=True)
class Batch:
    """One drawn batch: ``(log_prob, old_log_prob, advantages, mask)`` as an objective takes it."""

    log_prob: Tensor
    old_log_prob: Tensor
    advantages: Tensor
    mask: Tensor

    def __repr__(self) -> str:
        lengths = self.mask.sum(-1).tolist()
        lr = (self.log_prob.double() - self.old_log_prob.double()).tolist()
        rows = [row[:n] for row, n in zip(lr, lengths)]  # the unmasked tokens; padding is right-hand
        return (f"Batch(log_ratio={rows}, lengths={lengths}, "
                f"advantages={self.advantages.double().tolist()}, dtype={str(self.log_prob.dtype)[6:]})")


def _make_batch(lr: list, old: list, lengths: list, adv: list, dtype: torch.dtype, poison: bool) -> Batch:
    old_t = torch.tensor(old, dtype=torch.float64)
    cols = old_t.shape[1]
    mask = torch.arange(cols)[None, :] < torch.tensor(lengths)[:, None]
    log_prob = old_t + torch.tensor(lr, dtype=torch.float64)
    if poison:  # masked positions may hold anything, infinities included
        log_prob = torch.where(mask, log_prob, math.inf)
        old_t = torch.where(mask, old_t, -math.inf)
    return Batch(log_prob.to(dtype), old_t.to(dtype), torch.tensor(adv, dtype=torch.float64).to(dtype), mask)


def batches(max_rows: int = 4, max_cols: int = 6, max_abs_log_ratio: float = 3.0, *, extremes: bool = False,
            level: str | None = None, dtype_choices: Sequence[torch.dtype] = (torch.float64,),
            on_policy: bool = False) -> Any:
    """Batches of ragged responses: log-ratios, advantages (zeros included), masks (empty rows included).

    With ``extremes`` the log-ratios include +-1e4 and masked positions may hold
    ``+inf`` / ``-inf``; with ``on_policy`` every log-ratio is 0.
    """
    st = _st()

    @st.composite
    def draw_batch(draw: Callable) -> Batch:
        rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
        lr = [[0.0] * cols] * rows if on_policy else draw(log_ratios(rows, cols, max_abs_log_ratio, extremes))
        # The objectives see only log_prob - old_log_prob: one old log-prob level per batch keeps the data small.
        old = [[draw(st.floats(-8.0, 0.0))] * cols] * rows
        poison = extremes and draw(st.booleans())
        return _make_batch(lr, old, draw(masks(rows, cols)), draw(advantages(rows, cols, level)),
                           draw(dtypes(dtype_choices)), poison)

    return draw_batch()


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class PropertyResult:
    """One property's verdict: ``ok`` is None when it does not apply."""

    name: str
    ok: bool | None
    detail: str = ""
    counterexample: str | None = None


@dataclass
class Report:
    """The properties checked on one gate or objective; print it for a table."""

    subject: str
    results: list[PropertyResult] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every applicable property holds."""
        return all(r.ok is not False for r in self.results)

    @property
    def failures(self) -> list[str]:
        """Names of the properties that fail."""
        return [r.name for r in self.results if r.ok is False]

    def __getitem__(self, name: str) -> PropertyResult:
        return next(r for r in self.results if r.name == name)

    def table(self) -> Any:
        """The report as a ``rich.table.Table``."""
        from rich.markup import escape
        from rich.table import Table

        verdict = "all properties hold" if self.ok else f"FAILS {', '.join(self.failures)}"
        table = Table(title=f"{self.subject}: {verdict} ({self.seconds:.1f} s)")
        for col in ("property", "holds", "detail", "counterexample"):
            table.add_column(col, overflow="fold")
        for r in self.results:
            holds = {True: "yes", False: "NO", None: "n/a"}[r.ok]
            table.add_row(r.name, holds, escape(r.detail), escape(r.counterexample or ""))
        if self.notes:
            table.caption = escape("; ".join(f"{k}: {v}" for k, v in self.notes.items()))
        return table

    def __rich__(self) -> Any:
        return self.table()

    def __str__(self) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        Console(file=buffer, width=140, force_jupyter=False, color_system=None).print(self.table())
        return buffer.getvalue()


class GateReport(Report):
    """What :func:`check_gate` returns."""


class ObjectiveReport(Report):
    """What :func:`check_objective` returns."""


def _search(strategy: Any, holds: Callable[[Any], bool], max_examples: int) -> Any | None:
    """A shrunk example on which ``holds`` is False (or raises), or None when none is found."""
    hyp = _hypothesis()

    def fails(example: Any) -> bool:
        try:
            return not holds(example)
        except Exception:  # an exception is a failure too: the example reproduces it
            return True

    config = hyp.settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                          suppress_health_check=list(hyp.HealthCheck))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hyp.find(strategy, fails, settings=config)
    except hyp.errors.NoSuchExample:
        return None


def _explain(holds: Callable[[Any], Any], example: Any) -> str:
    """The exception ``holds`` raises on ``example``, if any."""
    try:
        holds(example)
    except Exception as err:  # noqa: BLE001 - reported, not handled
        return f"raises {type(err).__name__}: {err}"
    return ""


# --------------------------------------------------------------------------- gates


def _gate_under_test(gate_or_name: Any) -> gates.GateFamily:
    """The registry entry of a name, import path, :class:`~sspo_analysis.gates.Gate`, family or function."""
    if isinstance(gate_or_name, gates.Gate):
        return gate_or_name.family
    if isinstance(gate_or_name, gates.GateFamily):
        return gates.gate_family(gate_or_name.name)
    if callable(gate_or_name):
        qualname = getattr(gate_or_name, "__qualname__", "<lambda>")
        if "<" in qualname:
            raise ValueError("gate: a lambda or local function has no import path; register it with "
                             "register_gate(name, value) and pass the name")
        return gates.gate_family(f"{gate_or_name.__module__}:{qualname}")
    return gates.gate_family(gate_or_name)


def _instances(family: gates.GateFamily, taus: Sequence[float], eps: float) -> list[gates.Gate]:
    if family.parameter == "tau":
        return [gates.get_gate(family.name, tau=float(t)) for t in taus]
    return [gates.get_gate(family.name, eps=eps)]


def _label(gate: gates.Gate) -> str:
    return f"eps={gate.eps_hi:g}" if gate.family.parameter == "eps" else (
        f"tau={float(gate.tau):g}" if gate.family.parameter == "tau" else "")


def _scale(gate: gates.Gate) -> float:
    return max(gate.eps_lo, gate.eps_hi) if gate.family.parameter == "eps" else 1.0 / float(gate.tau)


def _admissibility_results(instances: list[gates.Gate]) -> list[PropertyResult]:
    reports = [(g, g.check_admissible()) for g in instances]
    out = []
    for prop in gates.ADMISSIBILITY:
        failing = [(g, r) for g, r in reports if not getattr(r, prop)]
        where = ", ".join(_label(g) for g, _ in reports if _label(g)) or "its only setting"
        if not failing:
            out.append(PropertyResult(prop, True, f"grid check at {where}"))
            continue
        g, r = failing[0]
        bad = ", ".join(_label(x) for x, _ in failing)
        out.append(PropertyResult(prop, False, f"fails at {bad or 'its only setting'}",
                                  f"{_label(g)} {r.witnesses.get(prop, '')}".strip()))
    return out


def _origin_value_result(instances: list[gates.Gate]) -> PropertyResult:
    """``g(0) = 0``: the on-policy point is a fixed point (one-sided gates rely on it)."""
    zero = torch.zeros(1, dtype=torch.float64)
    for g in instances:
        value = float(g(zero))
        if not abs(value) <= 1e-12 * _scale(g):
            return PropertyResult("zero_at_origin", False, "g(0) = 0", f"{_label(g)} g(0) = {value:.6g}")
    return PropertyResult("zero_at_origin", True, "g(0) = 0")


def _value_and_weight(gate: gates.Gate, u: float, dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    x = torch.tensor([u], dtype=torch.float64).to(dtype)
    return float(gate(x).double()), float(gate.weight(x).double())


def _finite_property(instances: list[gates.Gate], max_examples: int) -> PropertyResult:
    st = _st()
    strategy = st.tuples(st.integers(0, len(instances) - 1), st.floats(-1e30, 1e30, allow_nan=False), dtypes())

    def holds(ex: tuple[int, float, torch.dtype]) -> bool:
        return all(map(math.isfinite, _value_and_weight(instances[ex[0]], ex[1], ex[2])))

    found = _search(strategy, holds, max_examples)
    if found is None:
        return PropertyResult("finite", True, "value and weight finite for |u| <= 1e30 in float32/64, bfloat16")
    g, u, dtype = instances[found[0]], found[1], found[2]
    value, weight = _value_and_weight(g, u, dtype) if not _explain(holds, found) else (math.nan, math.nan)
    why = _explain(holds, found) or f"value {value:.6g}, weight {weight:.6g}"
    return PropertyResult("finite", False, "a non-finite value or weight",
                          f"{_label(g)} u={u!r} ({str(dtype)[6:]}): {why}")


def _slope_error(gate: gates.Gate, u: float) -> tuple[float, float, float]:
    """``(weight, left slope, right slope)`` of the value at ``u`` (one-sided differences, float64)."""
    h = 1e-6 * _scale(gate)
    x = torch.tensor([u - h, u, u + h], dtype=torch.float64)
    v = gate(x)
    return float(gate.weight(x[1:2])), float((v[1] - v[0]) / h), float((v[2] - v[1]) / h)


def _derivative_property(instances: list[gates.Gate], max_examples: int) -> PropertyResult:
    st = _st()
    strategy = st.tuples(st.integers(0, len(instances) - 1),
                         st.floats(-BOUNDED_TAU_U, BOUNDED_TAU_U, allow_nan=False))

    def holds(ex: tuple[int, float]) -> bool:
        g = instances[ex[0]]
        w, left, right = _slope_error(g, ex[1] * _scale(g))
        # One of the one-sided slopes: the hard clip's weight at its edge is a one-sided derivative.
        return min(abs(w - left), abs(w - right)) <= 1e-5 + 1e-5 * abs(w)

    found = _search(strategy, holds, max_examples)
    detail = f"weight = slope of the value, |tau u| <= {BOUNDED_TAU_U:g} (the weight is never ~0 there)"
    if found is None:
        return PropertyResult("derivative", True, detail)
    g = instances[found[0]]
    u = found[1] * _scale(g)
    w, left, right = _slope_error(g, u)
    return PropertyResult("derivative", False, detail,
                          f"{_label(g)} u={u:.6g}: weight {w:.6g}, slope of the value {left:.6g} / {right:.6g}")


def _symmetry_property(family: gates.GateFamily, instances: list[gates.Gate], max_examples: int) -> PropertyResult:
    asymmetric_clip = family.parameter == "eps" and instances[0].eps_lo != instances[0].eps_hi
    if not family.symmetric or asymmetric_clip:
        return PropertyResult("symmetry", None, "not claimed (register_gate(..., symmetric=True) claims it)")
    st = _st()
    strategy = st.tuples(st.integers(0, len(instances) - 1), st.floats(-50.0, 50.0, allow_nan=False))

    def holds(ex: tuple[int, float]) -> bool:
        g, u = instances[ex[0]], ex[1] * _scale(instances[ex[0]])
        (v, w), (v_neg, w_neg) = _value_and_weight(g, u), _value_and_weight(g, -u)
        return math.isclose(v_neg, -v, rel_tol=1e-12, abs_tol=1e-300) and math.isclose(w_neg, w, rel_tol=1e-12)

    found = _search(strategy, holds, max_examples)
    if found is None:
        return PropertyResult("symmetry", True, "g(-u) = -g(u) and g'(-u) = g'(u)")
    g = instances[found[0]]
    u = found[1] * _scale(g)
    (v, w), (v_neg, w_neg) = _value_and_weight(g, u), _value_and_weight(g, -u)
    return PropertyResult("symmetry", False, "claimed odd, is not",
                          f"{_label(g)} u={u:.6g}: g(u)={v:.6g}, g(-u)={v_neg:.6g}, g'(u)={w:.6g}, g'(-u)={w_neg:.6g}")


def check_gate(gate_or_name: Any, taus: Sequence[float] = DEFAULT_TAUS, *, eps: float = 0.2,
               max_examples: int = DEFAULT_EXAMPLES) -> GateReport:
    """Check a gate: the four admissibility properties and the hypothesis-driven ones.

    Args:
        gate_or_name: a registered name, an import path ``package.module:function``,
            a :class:`~sspo_analysis.gates.Gate` or the :class:`~sspo_analysis.gates.GateFamily`
            that :func:`~sspo_analysis.gates.register_gate` returned.
        taus: temperatures to check a soft gate at.
        eps: the clip width of a clip gate (``parameter="eps"``).
        max_examples: hypothesis examples per property.

    Properties: ``c1``, ``max_at_origin``, ``monotone``, ``vanishing_tails`` (grid checks
    of :meth:`~sspo_analysis.gates.Gate.check_admissible`, with where each fails);
    ``zero_at_origin`` (``g(0) = 0``);
    ``finite`` (value and weight finite for any ``|u| <= 1e30`` in every dtype);
    ``derivative`` (the weight is the slope of the value, bounded ``|tau u|``);
    ``symmetry`` (odd value, even weight; only where the family claims it).
    """
    start = time.perf_counter()
    family = _gate_under_test(gate_or_name)
    if not taus or not all(t > 0 and math.isfinite(t) for t in taus):
        raise ValueError(f"taus: need one or more finite numbers > 0, got {taus!r}")
    instances = _instances(family, taus, eps)
    results = _admissibility_results(instances)
    results += [_origin_value_result(instances), _finite_property(instances, max_examples),
                _derivative_property(instances, max_examples), _symmetry_property(family, instances, max_examples)]
    report = GateReport(f"gate {family.name}", results, {"doc": family.doc} if family.doc else {})
    report.seconds = time.perf_counter() - start
    return report


def assert_gate(gate_or_name: Any, taus: Sequence[float] = DEFAULT_TAUS, **kwargs: Any) -> GateReport:
    """:func:`check_gate`, raising ``AssertionError`` with the report when a property fails."""
    report = check_gate(gate_or_name, taus, **kwargs)
    if not report.ok:
        raise AssertionError(f"{report.subject} fails {', '.join(report.failures)}\n{report}")
    return report


# --------------------------------------------------------------------------- objectives


def _objective_under_test(name_or_objective: str | Objective, params: dict[str, Any]) -> Objective:
    if isinstance(name_or_objective, Objective):
        if params:
            raise ValueError("params: give them to get_objective, or pass a name to check_objective")
        return name_or_objective
    with warnings.catch_warnings():  # a sequence objective with a token-sum mode warns; the check is the point
        warnings.simplefilter("ignore")
        return get_objective(name_or_objective, **params)


def _token_advantages(batch: Batch) -> Tensor:
    adv = batch.advantages.double()
    adv = adv if adv.dim() == 2 else adv[:, None].expand(batch.mask.shape)
    return torch.where(batch.mask, adv, 0.0)


def _gradient_holds(obj: Objective, b: Batch) -> bool:
    log_prob = b.log_prob.clone().requires_grad_(True)
    loss = obj.evaluate(log_prob, b.old_log_prob, b.advantages, b.mask)[0]
    (grad,) = torch.autograd.grad(loss, log_prob)
    c = obj.coefficient(b.log_prob, b.old_log_prob, b.advantages, b.mask)
    expected = -c * obj.normalisation(b.mask, torch.float64)
    return bool(torch.allclose(grad, expected, rtol=1e-5, atol=1e-12) and (c[~b.mask] == 0).all())


def _on_policy_expected(obj: Objective, b: Batch) -> Tensor:
    """``c`` on-policy: ``A`` per token, or the sequence's mean advantage over its length ``T_i``."""
    adv = _token_advantages(b)
    if obj.level == "token":
        return adv
    n = b.mask.sum(-1, keepdim=True).clamp(min=1).double()
    return torch.where(b.mask, adv.sum(-1, keepdim=True) / n / n, 0.0)


def _on_policy_holds(obj: Objective, b: Batch) -> bool:
    c = obj.coefficient(b.log_prob, b.log_prob, b.advantages, b.mask)
    return bool(torch.allclose(c, _on_policy_expected(obj, b), rtol=1e-9, atol=1e-15))


def on_policy_factors(obj: Objective) -> dict[str, float]:
    """``c / A`` on-policy for one token with ``A = +1`` and ``A = -1`` (1 for an unbiased objective)."""
    lp = torch.zeros(1, 1, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    out = {}
    for key, sign in (("A>0", 1.0), ("A<0", -1.0)):
        c = obj.coefficient(lp, lp, torch.tensor([sign], dtype=torch.float64), mask)
        out[key] = float(c[0, 0]) / sign
    return out


def _extremes_hold(obj: Objective, b: Batch) -> bool:
    log_prob = b.log_prob.clone().requires_grad_(True)
    loss, metrics, _ = obj.evaluate(log_prob, b.old_log_prob, b.advantages, b.mask)
    (grad,) = torch.autograd.grad(loss, log_prob)
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
    return finite and grad.dtype == b.log_prob.dtype and bool((grad[~b.mask] == 0).all()) and all(
        math.isfinite(v) for v in metrics.values())


def _pad(b: Batch, extra: int, poison: bool) -> Batch:
    fill = (math.inf, -math.inf) if poison else (0.0, 0.0)
    rows = b.mask.shape[0]

    def widen(x: Tensor, value: float) -> Tensor:
        return torch.cat([x, torch.full((rows, extra), value, dtype=x.dtype)], dim=1)

    adv = b.advantages if b.advantages.dim() == 1 else widen(b.advantages, 7.0)
    return Batch(widen(b.log_prob, fill[0]), widen(b.old_log_prob, fill[1]), adv,
                 torch.cat([b.mask, torch.zeros(rows, extra, dtype=torch.bool)], dim=1))


def _padding_holds(obj: Objective, ex: tuple[Batch, int, bool]) -> bool:
    b, extra, poison = ex
    cols = b.mask.shape[1]
    # seq-mean-token-sum-norm divides by a horizon that defaults to the padded width: fix it.
    obj = dataclasses.replace(obj, horizon=obj.horizon if obj.horizon is not None else cols)
    results = []
    for batch in (b, _pad(b, extra, poison)):
        log_prob = batch.log_prob.clone().requires_grad_(True)
        loss = obj.evaluate(log_prob, batch.old_log_prob, batch.advantages, batch.mask)[0]
        results.append((loss, torch.autograd.grad(loss, log_prob)[0]))
    (loss, grad), (loss_p, grad_p) = results
    return bool(torch.allclose(loss, loss_p, rtol=1e-12, atol=1e-15)
                and torch.allclose(grad, grad_p[:, :cols], rtol=1e-12, atol=1e-15) and (grad_p[:, cols:] == 0).all())


def _aggregation_holds(obj: Objective, b: Batch) -> bool:
    """Each mode's definition: the weight of every token's surrogate in the loss."""
    weights = obj.token_weights(b.mask, torch.float64)
    m = b.mask
    n_tok, rows = m.sum(-1, keepdim=True).double(), m.shape[0]
    n_seq = max(int((n_tok > 0).sum()), 1)
    expected = {  # per token: 1/(T_i n_seq), 1/N, 1/n_seq, 1/(B H)
        "seq-mean-token-mean": 1.0 / (n_tok.clamp(min=1) * n_seq),
        "token-mean": torch.tensor(1.0 / max(int(m.sum()), 1), dtype=torch.float64),
        "seq-mean-token-sum": torch.tensor(1.0 / n_seq, dtype=torch.float64),
        "seq-mean-token-sum-norm": torch.tensor(1.0 / (rows * (obj.horizon or m.shape[1])), dtype=torch.float64),
    }[obj.agg]
    return bool(torch.allclose(weights, torch.where(m, expected, 0.0), rtol=1e-12, atol=0.0))


def _objective_property(name: str, detail: str, strategy: Any, holds: Callable[[Any], bool],
                        max_examples: int) -> PropertyResult:
    found = _search(strategy, holds, max_examples)
    if found is None:
        return PropertyResult(name, True, detail)
    return PropertyResult(name, False, detail, f"{found!r} {_explain(holds, found)}".strip())


def check_objective(name_or_objective: str | Objective, *, max_examples: int = DEFAULT_EXAMPLES,
                    **params: Any) -> ObjectiveReport:
    """Check an objective's analytic coefficient, on-policy identity, numerics, padding and aggregation.

    Args:
        name_or_objective: a registered name (then ``params`` go to ``get_objective``,
            ``agg`` and ``horizon`` included) or an :class:`~sspo_analysis.objectives.Objective`.
        max_examples: hypothesis examples per property.

    Properties: ``gradient`` (autograd of the loss equals ``-n c``), ``on_policy``
    (``c = A`` per token, ``A_i / T_i`` per sequence, at ``pi = pi_old``; the factor
    ``c / A`` is in the notes when it is not 1), ``extremes`` (finite loss, gradient
    and metrics for log-ratios of +-1e4 and infinities on masked positions, in
    float32, float64 and bfloat16), ``padding`` (masked columns change nothing),
    ``aggregation`` (each token's weight in the loss is the mode's).
    """
    start = time.perf_counter()
    obj = _objective_under_test(name_or_objective, params)
    st = _st()

    def guarded(fn: Callable[[Objective, Any], bool]) -> Callable[[Any], bool]:
        def holds(example: Any) -> bool:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fn(obj, example)
        return holds

    specs = [
        ("gradient", "autograd of the loss = -n c", batches(), _gradient_holds),
        ("on_policy", "c = A (token) or A_i / T_i (sequence) at pi = pi_old", batches(on_policy=True),
         _on_policy_holds),
        ("extremes", "finite loss, gradient, metrics at |l| = 1e4, inf on masked tokens, every dtype",
         batches(max_abs_log_ratio=50.0, extremes=True, dtype_choices=DTYPES), _extremes_hold),
        ("padding", "masked columns (inf or 0) change neither loss nor gradient",
         st.tuples(batches(), st.integers(1, 3), st.booleans()), _padding_holds),
        ("aggregation", f"token weights are {obj.agg}'s", batches(), _aggregation_holds),
    ]
    results = [_objective_property(n, d, s, guarded(fn), max_examples) for n, d, s, fn in specs]
    factors = on_policy_factors(obj)
    notes: dict[str, Any] = {"params": obj.params, "agg": obj.agg}
    if any(abs(f - 1.0) > 1e-9 for f in factors.values()):
        notes["on-policy c / A"] = ", ".join(f"{k}: {v:.6g}" for k, v in factors.items())
        on = next(i for i, r in enumerate(results) if r.name == "on_policy")
        detail = f"{results[on].detail}; c / A = {notes['on-policy c / A']}"
        results[on] = dataclasses.replace(results[on], detail=detail)
    report = ObjectiveReport(f"objective {obj.name}", results, notes)
    report.seconds = time.perf_counter() - start
    return report


def assert_objective(name_or_objective: str | Objective, **params: Any) -> ObjectiveReport:
    """:func:`check_objective`, raising ``AssertionError`` with the report when a property fails."""
    report = check_objective(name_or_objective, **params)
    if not report.ok:
        raise AssertionError(f"{report.subject} fails {', '.join(report.failures)}\n{report}")
    return report


__all__ = [
    "AGG_MODES", "Batch", "GateReport", "ObjectiveReport", "PropertyResult", "Report", "advantages",
    "assert_gate", "assert_objective", "batches", "check_gate", "check_objective", "dtypes", "log_ratio_values",
    "log_ratios", "masks", "on_policy_factors", "temperatures",
]
