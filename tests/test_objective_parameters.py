"""A parameter the chosen objective does not read is an error, in the trainer's config as in TRL's.

One check (``objectives.check_parameters_read``) decides for both; the TRL side is in
``test_integrations_trl.py`` (``test_trl_and_the_trainer_refuse_the_same_parameter``).
"""

from __future__ import annotations

import pytest

from sspo_analysis.objectives import get_spec, objective_names, read_parameters, unread_parameters
from sspo_analysis.training import load_config

SSPO = ['objective.name="sspo"']


def test_sspo_with_eps_lo_is_refused_naming_what_it_reads():
    """The issue's case: the arctan gate never reads eps_lo; before, 60 steps trained with it silently."""
    with pytest.raises(ValueError) as err:
        load_config(None, [*SSPO, "objective.eps_lo=0.3"])
    assert str(err.value) == ("objective.eps_lo: not used by objective 'sspo' with gate 'arctan', which reads "
                              "objective.gate, objective.tau_pos, objective.tau_neg, objective.one_sided; "
                              "leave it unset")


@pytest.mark.parametrize("overrides, field", [
    ([*SSPO, "objective.eps=0.3"], "objective.eps"),  # the shorthand for eps_lo and eps_hi
    ([*SSPO, 'objective.gate="hard-clip"', "objective.tau=2.0"], "objective.tau"),
    ([*SSPO, 'objective.gate="erf"', "objective.eps_hi=0.3"], "objective.eps_hi"),
    (['objective.name="sapo"', 'objective.gate="hard-clip"', "objective.tau_neg=2.0"], "objective.tau_neg"),
])
def test_a_parameter_the_gate_does_not_read_is_an_error(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}: not used by objective"):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides", [
    [*SSPO, 'objective.gate="hard-clip"', "objective.eps=0.3", "objective.one_sided=true"],
    [*SSPO, 'objective.gate="softsign"', "objective.tau=2.0"],
    [*SSPO, "objective.tau_pos=2.0"],
])
def test_what_the_gate_reads_is_accepted(overrides):
    load_config(None, overrides)


@pytest.mark.parametrize("name", objective_names())
def test_every_parameter_an_objective_reads_may_be_set(name):
    """No false alarm: each objective accepts every parameter it reads, set to its default explicitly."""
    defaults = get_spec(name).defaults
    overrides = [f"objective.name={name!r}".replace("'", '"')]
    for key in read_parameters(name):
        value = defaults[key]
        if value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else repr(value).replace("'", '"')
        overrides.append(f"objective.{key}={text}")
    cfg = load_config(None, overrides)
    assert cfg.build_objective().params == {**defaults, **cfg.objective.params}
    assert unread_parameters(name, {k: defaults[k] for k in read_parameters(name)}) == []


def test_the_cli_refuses_before_any_work(tmp_path, capsys):
    from sspo_analysis.cli import main

    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--set", 'objective.name="sspo"', "--set", "objective.eps_lo=0.3"])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "objective.eps_lo: not used by objective 'sspo'" in err


def test_config_show_lists_only_what_the_objective_reads_and_reloads(tmp_path):
    """``sspo config show`` writes the objective's parameters out; what it writes must load back."""
    from sspo_analysis.training.config_doc import annotated_toml

    cfg = load_config(None, SSPO)
    text = annotated_toml(cfg)
    assert "tau_pos = 1.0" in text and "eps_lo" not in text
    path = tmp_path / "shown.toml"
    path.write_text(text)
    assert load_config(path).build_objective().params == cfg.build_objective().params
