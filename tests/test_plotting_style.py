"""The shared plotting helpers: the palette (distinct colours and markers), the seed bands and the
exact-gradient staleness figure (sspo_analysis/plotting/staleness.py, its numbers from
sspo_analysis.simulation.staleness_data)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sspo_analysis.plotting import style
from sspo_analysis.plotting.bands import band_label, mean_ci, poisson_mean_ci

TRAINED = ("grpo", "dapo", "gspo", "gmpo", "sapo", "sspo")
STALENESS = ("grpo", "dapo", "cispo", "gspo", "gmpo", "sapo", "sspo", "sspo-sigmoid", "vespo")


def _lab(hex_color: str) -> np.ndarray:
    """CIE L*a*b* (D65) of an sRGB colour."""
    from matplotlib.colors import to_rgb

    c = np.array(to_rgb(hex_color))
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def _min_distance(names) -> float:
    return min(float(np.linalg.norm(_lab(style.color(a)) - _lab(style.color(b))))
               for a, b in itertools.combinations(names, 2))


def test_every_objective_has_its_own_colour_and_marker():
    assert len(set(style.OBJECTIVE_COLORS.values())) == len(style.OBJECTIVE_COLORS)
    assert set(style.OBJECTIVE_MARKERS) == set(style.OBJECTIVE_COLORS)
    shown = [n for n in style.OBJECTIVE_MARKERS if n != "pg"]  # pg is the reference line, drawn without markers
    assert len({style.marker(n) for n in shown}) == len(shown)
    assert _min_distance(style.OBJECTIVE_COLORS) > 18  # CIE76 Delta E: no two alike
    assert _min_distance(TRAINED) > 35  # grpo and the former sspo vermillion were 33 apart
    assert _min_distance(STALENESS) > 25


@pytest.mark.parametrize("name, base", [("sspo-sigmoid@tau=2", "sspo-sigmoid"), ("sspo@tau=0.5", "sspo"),
                                        ("sspo-sigmoid-tau3", "sspo-sigmoid"), ("gspo-token", "gspo")])
def test_a_variant_takes_its_base_colour_and_marker_with_its_own_dashes(name, base):
    assert style.base_name(name) == base and style.is_variant(name)
    assert style.color(name) == style.color(base) and style.marker(name) == style.marker(base)
    assert style.linestyle(name) != style.linestyle(base)
    assert style.linestyle(name) == style.linestyle(name)  # stable


def test_named_variants_and_unknown_names():
    assert style.color("sspo-erf") != style.color("sspo") and not style.is_variant("sspo-erf")
    assert style.color("sspo-sigmoid-tau2") != style.color("sspo-sigmoid")
    assert style.color("nonsense") == "#777777" and style.marker("nonsense") == "o"
    assert style.color("arctan") == style.GATE_COLORS["arctan"]
    kw = style.line_kw("gmpo", every=4, index=5)
    assert kw["markevery"] == (1, 4) and kw["marker"] == "^" and kw["ls"] != "-"


def test_mean_ci_is_a_t_interval_of_the_mean_over_seeds():
    from scipy.stats import t

    vals = np.array([[1.0, 2.0, 3.0], [2.0, np.nan, 4.0], [5.0, np.nan, np.nan]])
    mean, lo, hi = mean_ci(vals)
    assert mean.tolist() == [2.0, 3.0, 5.0]
    assert hi[0] - mean[0] == pytest.approx(t.ppf(0.975, 2) * 1.0 / np.sqrt(3))
    assert hi[1] - mean[1] == pytest.approx(t.ppf(0.975, 1) * np.sqrt(2) / np.sqrt(2))
    assert lo[2] == hi[2] == 5.0  # one seed: no interval
    gmean, glo, ghi = mean_ci([[1.0, 100.0]], log=True)
    assert gmean[0] == pytest.approx(10.0) and glo[0] * ghi[0] == pytest.approx(100.0)
    assert "95% t CI" in band_label(3) and "no band" in band_label(1)


def test_staleness_on_policy_is_unbiased_and_the_figure_draws_every_objective():
    from sspo_analysis.plotting.staleness import plot_staleness
    from sspo_analysis.simulation import staleness_data

    df = staleness_data(("grpo", "sspo", "sspo-sigmoid", ("sspo@tau=2", "sspo", {"tau": 2.0})), lags=(0, 4),
                        n_batches=200)
    k0 = df[df.staleness == 0].set_index("objective")
    # on-policy: every ratio is 1, the estimate unbiased within Monte Carlo error ...
    for name in ("grpo", "sspo", "sspo@tau=2"):
        assert k0.loc[name, "bias_raw"] < 4 * k0.loc[name, "mean_stderr"], name
    # ... except sspo-sigmoid, whose on-policy scale is tau / 2 (tau = 1: half the gradient)
    assert k0.loc["sspo-sigmoid", "scale"] == pytest.approx(0.5, abs=0.1)
    fig = plot_staleness(df)
    assert len(fig.axes) >= 4
    assert all(len(ax.get_lines()) >= 4 for ax in fig.axes[:4])
    assert "Exact" in fig.legends[0].get_title().get_text()


def test_staleness_figure_shows_the_divisor_of_its_relative_panels_and_the_variance_not_divided():
    from sspo_analysis.plotting.staleness import plot_staleness
    from sspo_analysis.simulation import staleness_data

    df = staleness_data(("grpo", "sspo"), lags=(0, 2, 8), n_batches=100)
    norm = df.groupby("staleness").target_norm2.agg(["min", "max"])
    assert (norm["min"] == norm["max"]).all() and (norm["min"] > 0).all()  # exact: one |g*|^2 per lag
    fig = plot_staleness(df)
    labels = [ax.get_ylabel() for ax in fig.axes[:6]]
    assert any(label.startswith("|g*|²") for label in labels) and any("not divided" in label for label in labels)
    divisor = fig.axes[labels.index(next(x for x in labels if x.startswith("|g*|²")))].get_lines()[0].get_ydata()
    assert np.allclose(divisor, df.groupby("staleness").target_norm2.first().to_numpy())
    raw = fig.axes[labels.index(next(x for x in labels if "not divided" in x))]
    grpo = df[df.objective == "grpo"]
    assert np.allclose(raw.get_lines()[0].get_ydata(), grpo.variance * grpo.target_norm2)
    assert "divided by the same lag's |g*|²" in fig.legends[0].get_title().get_text()


def test_poisson_interval_of_a_mean_count_is_exact_and_never_negative():
    # Garwood's exact 95% interval: 0 events in 3 runs allow up to -log(0.025) / 3 per run; 1 event in 1 run
    mean, lo, hi = poisson_mean_ci([[0, 0, 0], [1, np.nan, np.nan], [0, 1, 0]])
    assert mean[0] == 0 and lo[0] == 0 and hi[0] == pytest.approx(-np.log(0.025) / 3, rel=1e-9)
    assert lo[1] == pytest.approx(0.0253, abs=1e-4) and hi[1] == pytest.approx(5.5716, abs=1e-4)
    assert mean[2] == pytest.approx(1 / 3) and (lo >= 0).all() and (lo <= mean).all() and (mean <= hi).all()
    assert np.isnan(poisson_mean_ci([[np.nan, np.nan]])[0]).all()


def test_a_saved_figure_gives_the_same_bytes_every_time(tmp_path):
    import time

    def draw():
        fig, axes = style.subplots(1, 1, 2.0)
        axes[0, 0].plot([0, 1], [1, 0], **style.line_kw("sspo"))
        return fig

    first = style.save_figure(draw(), tmp_path / "a" / "fig")
    time.sleep(1.1)  # a creation date in seconds would differ
    second = style.save_figure(draw(), tmp_path / "b" / "fig")
    assert [p.suffix for p in first] == [".png", ".pdf"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert b"CreationDate" not in first[1].read_bytes()
