"""TRL 1.16: the package against GRPOTrainer._compute_loss (TRL's ``vespo`` and ``luspo`` included), and
SSPOTrainer's loss path.

The TRL numbers come from TRL's own ``GRPOTrainer._compute_loss``, called on a
trainer object made without ``__init__`` (no model, no data) whose attributes are
the ones ``_compute_loss`` reads, set from a real ``GRPOConfig``; only the
policy's forward pass is replaced by fixed log-probs.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.trl

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from sspo_analysis.integrations import trl as st  # noqa: E402
from sspo_analysis.objectives import get_objective  # noqa: E402

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
MAX_LEN = 9


class FakeAccelerator:
    """Stands in for ``num_processes`` data-parallel processes that all hold this batch."""

    def __init__(self, num_processes=1):
        self.num_processes = num_processes

    def reduce(self, x, reduction="sum"):
        return x * self.num_processes

    def gather(self, x):
        return torch.cat([x] * self.num_processes)

    gather_for_metrics = gather


def batch(seed=0, b=6, t=MAX_LEN, std=0.5, empty_row=None):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=F64) * 3 - 0.1
    lp = old + std * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    if empty_row is not None:
        mask[empty_row] = 0
    return lp, old, adv, mask


def make_config(tmp_path, cls=GRPOConfig, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", max_completion_length=MAX_LEN,
                per_device_train_batch_size=2, num_generations=2, use_cpu=True)
    base.update(kw)
    return cls(**base)


def bare_trainer(args, cls=GRPOTrainer, grad_accum=1, num_processes=1):
    """A trainer without ``__init__``: exactly the attributes ``_compute_loss`` reads, from ``args``."""
    tr = object.__new__(cls)
    tr.args = args
    tr.loss_type = args.loss_type
    tr.epsilon_low = args.epsilon
    tr.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    tr.importance_sampling_level = args.importance_sampling_level
    tr.max_completion_length = args.max_completion_length
    tr.beta = args.beta
    tr.top_entropy_quantile = args.top_entropy_quantile
    tr.off_policy_mask_threshold = args.off_policy_mask_threshold
    tr.use_vllm = False
    tr.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    tr.aux_loss_enabled = False
    tr._entropy_bonus_enabled = False
    tr.current_gradient_accumulation_steps = grad_accum
    tr.accelerator = FakeAccelerator(num_processes)
    tr.model = SimpleNamespace(training=True)
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    if isinstance(tr, st.SSPOTrainer):
        tr.objective = st.objective_from_args(args)
    return tr


def trl_loss(trainer, lp, old, adv, mask, num_processes=1, entropies=None, **extra):
    """Loss and d loss / d log_prob from ``trainer._compute_loss`` on fixed log-probs (and entropies)."""
    lp = lp.clone().requires_grad_(True)
    b = lp.shape[0]
    entropies = torch.ones_like(lp) if entropies is None else entropies
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (lp, entropies, None)
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros_like(mask), "completion_mask": mask, "advantages": adv,
        "old_per_token_logps": old, "num_items_in_batch": mask.sum() * num_processes, **extra,
    }
    loss = trainer._compute_loss(None, inputs)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


def package_loss(objective, lp, old, adv, mask):
    lp = lp.clone().requires_grad_(True)
    loss, _ = objective(lp, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


CASES = {  # name -> GRPOConfig overrides
    "grpo": dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.28),
    "dapo": dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28),
    "dr_grpo": dict(loss_type="dr_grpo", epsilon=0.15),
    "bnpo": dict(loss_type="bnpo", epsilon=0.2),
    # TRL builds the temperatures with torch.where on Python floats: float32 scalars. 1.25 is exact in float32,
    # so float64 results agree to rounding; with tau_neg=1.05 they agree to about 1e-7 only.
    "sapo": dict(loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.25),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.01, epsilon_high=0.012),
}


@pytest.mark.parametrize("case", list(CASES))
def test_package_equals_trl_compute_loss(case, tmp_path):
    args = make_config(tmp_path, **CASES[case])
    std = 0.05 if case == "gspo" else 0.5
    lp, old, adv, mask = batch(seed=list(CASES).index(case), std=std)
    loss, grad = trl_loss(bare_trainer(args), lp, old, adv, mask)
    objective = st.trl_equivalent(args.loss_type, args)
    ref_loss, ref_grad = package_loss(objective, lp, old, adv, mask)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    if case != "sapo":  # the test must exercise clipping
        _, metrics = objective(lp, old, adv, mask.bool())
        assert metrics["clip_frac_low"] + metrics["clip_frac_high"] > 0


def test_cispo_gradient_equal_loss_uses_log_prob(tmp_path):
    """Pinned difference: TRL's cispo loss is -sg[min(r, eps_max)] A log_prob; the package's uses the log-ratio."""
    args = make_config(tmp_path, loss_type="cispo", epsilon_high=2.0)
    lp, old, adv, mask = batch(seed=3, std=1.0)
    loss, grad = trl_loss(bare_trainer(args), lp, old, adv, mask)
    objective = st.trl_equivalent("cispo", args)
    assert objective.params["eps_max"] == 2.0
    ref_loss, ref_grad = package_loss(objective, lp, old, adv, mask)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    old_term = objective.aggregate(torch.exp(lp - old).clamp(max=2.0) * adv[:, None] * old, mask.bool())
    torch.testing.assert_close(loss, ref_loss - old_term, **TOL)
    assert not torch.allclose(loss, ref_loss)


@pytest.mark.parametrize("case", ["grpo", "sapo", "gspo"])
def test_empty_completion_counts_in_trl_sequence_mean(case, tmp_path):
    """Pinned difference: TRL's seq-mean divides by all B rows; the package by the non-empty sequences."""
    args = make_config(tmp_path, **CASES[case])
    lp, old, adv, mask = batch(seed=4, std=0.05 if case == "gspo" else 0.5, empty_row=1)
    loss, grad = trl_loss(bare_trainer(args), lp, old, adv, mask)
    ref_loss, ref_grad = package_loss(st.trl_equivalent(args.loss_type, args), lp, old, adv, mask)
    torch.testing.assert_close(loss, ref_loss * 5 / 6, **TOL)
    torch.testing.assert_close(grad, ref_grad * 5 / 6, **TOL)
    assert torch.isfinite(grad).all() and (grad[1] == 0).all()


def test_dr_grpo_horizon_is_max_completion_length(tmp_path):
    """Pinned: dr_grpo divides by max_completion_length; the package's default horizon is the padded T."""
    args = make_config(tmp_path, **CASES["dr_grpo"])
    lp, old, adv, mask = batch(seed=5, t=6)  # padded to 6 < max_completion_length = 9
    loss, _ = trl_loss(bare_trainer(args), lp, old, adv, mask)
    objective = st.trl_equivalent("dr_grpo", args)
    assert objective.horizon == MAX_LEN
    torch.testing.assert_close(loss, package_loss(objective, lp, old, adv, mask)[0], **TOL)
    padded = get_objective("grpo", agg="seq-mean-token-sum-norm", eps=0.15)
    torch.testing.assert_close(loss, package_loss(padded, lp, old, adv, mask)[0] * 6 / MAX_LEN, **TOL)


# ----------------------------------------------------------------------------- SSPOTrainer's loss path


SUBCLASS_CASES = {  # TRL loss type -> the SSPOConfig that runs the same loss through the package
    "grpo": (dict(loss_type="grpo", epsilon=0.2), dict(loss_type="package:grpo", epsilon=0.2)),
    "dapo": (dict(loss_type="dapo", epsilon_high=0.28), dict(loss_type="package:dapo")),
    "dr_grpo": (dict(loss_type="dr_grpo", epsilon=0.2),
                dict(loss_type="package:grpo", epsilon=0.2, objective_agg="seq-mean-token-sum-norm")),
    "sapo": (dict(loss_type="sapo", sapo_temperature_neg=1.25),
             dict(loss_type="package:sapo", sapo_temperature_neg=1.25)),
}


@pytest.mark.parametrize("case", list(SUBCLASS_CASES))
def test_subclass_matches_trl_normalisation(case, tmp_path):
    """SSPOTrainer's package path reproduces TRL under gradient accumulation and data parallelism."""
    trl_kw, pkg_kw = SUBCLASS_CASES[case]
    kw = dict(gradient_accumulation_steps=2, per_device_train_batch_size=3, num_generations=2)
    lp, old, adv, mask = batch(seed=6)
    ref = trl_loss(bare_trainer(make_config(tmp_path, **trl_kw, **kw), grad_accum=2, num_processes=2),
                   lp, old, adv, mask, num_processes=2)
    tr = bare_trainer(make_config(tmp_path, cls=st.SSPOConfig, **pkg_kw, **kw), cls=st.SSPOTrainer, grad_accum=2,
                      num_processes=2)
    assert tr.objective is not None
    got = trl_loss(tr, lp, old, adv, mask, num_processes=2)
    torch.testing.assert_close(got[0], ref[0], **TOL)
    torch.testing.assert_close(got[1], ref[1], **TOL)


KL_CASES = {  # TRL's loss type -> the SSPOConfig running the same loss through the package, with a KL term
    "grpo": (dict(loss_type="grpo", epsilon=0.2), dict(loss_type="package:grpo", epsilon=0.2)),
    "dapo": (dict(loss_type="dapo", epsilon_high=0.28), dict(loss_type="package:dapo")),
    "gspo": (dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.01, epsilon_high=0.012),
             dict(loss_type="gspo", epsilon=0.01, epsilon_high=0.012)),
}


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("case", list(KL_CASES))
def test_kl_term_equals_trls_with_and_without_bias_correction(case, bias_correction, tmp_path):
    """beta = 0.04: TRL's use_bias_correction_kl (True by default) multiplies the k3 KL by the importance ratio;
    SSPOTrainer's gradient equals GRPOTrainer's with the field on and off, on the same tensors."""
    trl_kw, pkg_kw = KL_CASES[case]
    kw = dict(beta=0.04, use_bias_correction_kl=bias_correction, gradient_accumulation_steps=2,
              per_device_train_batch_size=3, num_generations=2)
    lp, old, adv, mask = batch(seed=17, std=0.05 if case == "gspo" else 0.5)
    ref_logps = lp + 0.4 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(18), dtype=F64)
    trl_args = make_config(tmp_path, **trl_kw, **kw)
    expected = trl_loss(bare_trainer(trl_args, grad_accum=2, num_processes=2), lp, old, adv, mask,
                        num_processes=2, ref_per_token_logps=ref_logps)
    tr = bare_trainer(make_config(tmp_path, cls=st.SSPOConfig, **pkg_kw, **kw), cls=st.SSPOTrainer, grad_accum=2,
                      num_processes=2)
    got = trl_loss(tr, lp, old, adv, mask, num_processes=2, ref_per_token_logps=ref_logps)
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1], expected[1], **TOL)
    assert tr._metrics["train"]["kl"] == [pytest.approx(_trl_kl(trl_args, lp, old, adv, mask, ref_logps), rel=1e-9)]
    other = make_config(tmp_path, **trl_kw, **{**kw, "use_bias_correction_kl": not bias_correction})
    flipped = trl_loss(bare_trainer(other, grad_accum=2, num_processes=2), lp, old, adv, mask, num_processes=2,
                       ref_per_token_logps=ref_logps)
    assert (flipped[1] - expected[1]).abs().max() > 1e-4  # the field changes the gradient on these tensors


def _trl_kl(args, lp, old, adv, mask, ref_logps):
    """The ``kl`` metric TRL's own ``_compute_loss`` logs on these tensors."""
    tr = bare_trainer(args)
    trl_loss(tr, lp, old, adv, mask, ref_per_token_logps=ref_logps)
    return tr._metrics["train"]["kl"][0]


def test_trl_loss_types_pass_through(tmp_path):
    args = make_config(tmp_path, cls=st.SSPOConfig, loss_type="bnpo")
    assert args.package_objective() is None
    lp, old, adv, mask = batch(seed=7)
    got = trl_loss(bare_trainer(args, cls=st.SSPOTrainer), lp, old, adv, mask)
    ref = trl_loss(bare_trainer(make_config(tmp_path, loss_type="bnpo")), lp, old, adv, mask)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)


def token_gate(loss_type, l, a):
    """By hand, for one token of log-ratio ``l`` in a sequence with advantage ``a``: ``(phi, phi', low, high)``.

    ``phi`` is the token's log-weight inside the sequence's geometric mean (the log-ratio itself for the token
    objective ``grpo``), ``phi'`` the multiplier of its gradient, ``low`` / ``high`` whether a clip cut it.
    """
    if loss_type == "package:grpo":  # PPO's clip of r = e^l at [0.8, 1.2]
        high, low = a > 0 and math.exp(l) > 1.2, a < 0 and math.exp(l) < 0.8
        return l, 0.0 if (high or low) else 1.0, low, high
    if loss_type == "gmpo":  # the one-sided clip of l at [-0.4, 0.4]
        high, low = a > 0 and l > 0.4, a < 0 and l < -0.4
        return (0.4 if high else -0.4 if low else l), 0.0 if (high or low) else 1.0, low, high
    tau = 1.0 if a > 0 else 1.05  # sspo: arctan gate in log space
    return math.atan(tau * l) / tau, 1.0 / (1.0 + (tau * l) ** 2), False, False


def hand_metrics(loss_type, lp, old, adv, mask, entropies, ref):
    """The logged metrics from the raw tensors, element by element in plain Python."""
    tokens, seq_weights, entropy, kl = [], [], [], []
    for i in range(lp.shape[0]):
        a = float(adv[i])
        row = [t for t in range(lp.shape[1]) if mask[i, t]]
        gated = [token_gate(loss_type, float(lp[i, t] - old[i, t]), a) for t in row]
        if row:
            seq_weights.append(math.exp(sum(g[0] for g in gated) / len(row)))
            seq_ratio = math.exp(sum(float(lp[i, t] - old[i, t]) for t in row) / len(row))
        for t, (_, dphi, low, high) in zip(row, gated):
            tokens.append((float(lp[i, t] - old[i, t]), dphi, low, high, a))
            entropy.append(float(entropies[i, t]))
            d = float(ref[i, t] - lp[i, t])
            # use_bias_correction_kl (TRL's default): the KL times the ratio at the objective's level
            kl_weight = math.exp(float(lp[i, t] - old[i, t])) if loss_type == "package:grpo" else seq_ratio
            kl.append((math.exp(d) - d - 1) * kl_weight)
    n = len(tokens)
    signal = [tok for tok in tokens if tok[4] != 0]
    mean_w = sum(seq_weights) / len(seq_weights)
    return {
        "objective/ratio_mean": sum(math.exp(tok[0]) for tok in tokens) / n,
        "objective/ratio_max": max(math.exp(tok[0]) for tok in tokens),
        "objective/log_ratio_mean": sum(tok[0] for tok in tokens) / n,
        "objective/kl_old_k3": sum(math.exp(tok[0]) - 1 - tok[0] for tok in tokens) / n,
        "objective/clip_frac_low": sum(tok[2] for tok in tokens) / n,
        "objective/clip_frac_high": sum(tok[3] for tok in tokens) / n,
        "objective/gate_weight_mean": sum(tok[1] for tok in tokens) / n,
        "objective/dead_frac": sum(tok[1] == 0 for tok in signal) / len(signal),
        "objective/seq_weight_mean": mean_w,
        "objective/seq_weight_var": sum((w - mean_w) ** 2 for w in seq_weights) / len(seq_weights),
        "objective/ess_frac": sum(seq_weights) ** 2 / (len(seq_weights) * sum(w * w for w in seq_weights)),
        "objective/n_tokens": n,
        "clip_ratio/low_mean": sum(tok[2] for tok in tokens) / n,
        "clip_ratio/high_mean": sum(tok[3] for tok in tokens) / n,
        "clip_ratio/region_mean": sum(tok[2] or tok[3] for tok in tokens) / n,
        "entropy": sum(entropy) / n,
        "kl": sum(kl) / n,
    }


@pytest.mark.parametrize("loss_type", ["package:grpo", "gmpo", "sspo"])
def test_subclass_logs_the_package_metrics(loss_type, tmp_path):
    """The logged metrics against a plain-Python computation from the raw log-probs, not the package's code."""
    args = make_config(tmp_path, cls=st.SSPOConfig, loss_type=loss_type, beta=0.1,
                       **({"epsilon": 0.2} if loss_type == "package:grpo" else {}))
    tr = bare_trainer(args, cls=st.SSPOTrainer)
    lp, old, adv, mask = batch(seed=8, std=0.8)
    mask[2] = 0  # an empty completion: no tokens, no sequence weight
    g = torch.Generator().manual_seed(9)
    entropies = torch.rand(lp.shape, generator=g, dtype=F64) * 3
    ref = lp + 0.3 * torch.randn(lp.shape, generator=g, dtype=F64)
    trl_loss(tr, lp, old, adv, mask, entropies=entropies, ref_per_token_logps=ref)
    expected = hand_metrics(loss_type, lp, old, adv, mask, entropies, ref)
    logged = tr._metrics["train"]
    for key, value in expected.items():
        assert logged[key] == [pytest.approx(value, rel=2e-6, abs=1e-7)], key
    # the batch exercises what the metrics measure
    assert expected["objective/gate_weight_mean"] < 1
    if loss_type != "sspo":
        assert 0 < expected["objective/dead_frac"] and expected["objective/clip_frac_low"] > 0
        assert expected["objective/clip_frac_high"] > 0


def test_sspo_parameters_are_config_fields(tmp_path):
    args = make_config(tmp_path, cls=st.SSPOConfig, loss_type="sspo", gate="softsign", sapo_temperature_pos=2.0,
                       sapo_temperature_neg=3.0,
                       one_sided=True)
    obj = args.package_objective()
    assert obj.name == "sspo"
    expected = {"gate": "softsign", "tau_pos": 2.0, "tau_neg": 3.0, "one_sided": True}
    assert {k: obj.params[k] for k in expected} == expected
    assert obj.agg == "seq-mean-token-mean"
    soft = make_config(tmp_path, cls=st.SSPOConfig, loss_type="soft-erf").package_objective()
    assert soft.params["gate"] == "erf"
    norm = make_config(tmp_path, cls=st.SSPOConfig, loss_type="package:grpo", objective_agg="seq-mean-token-sum-norm")
    assert norm.package_objective().horizon == MAX_LEN


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="sspo2"), "loss_type: unknown value 'sspo2'; allowed values: grpo"),
    (dict(loss_type="gmpo", gate="erf"), "gate: not a parameter of objective 'gmpo'"),
    (dict(loss_type="soft-erf", gate="arctan"), "gate: loss_type='soft_erf' fixes gate='erf'"),
    (dict(loss_type="sspo", objective_agg="sum"), "objective_agg: unknown value 'sum'"),
    (dict(loss_type="sspo", sapo_temperature_pos=-1.0), "tau_pos must be a finite number > 0"),
])
def test_bad_config_names_the_field(kw, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, cls=st.SSPOConfig, **kw)


def test_unsupported_options_are_refused(tmp_path):
    args = make_config(tmp_path, cls=st.SSPOConfig, loss_type="sspo", top_entropy_quantile=0.5)
    with pytest.raises(ValueError, match="top_entropy_quantile: not supported"):
        st.SSPOTrainer(model=SimpleNamespace(), reward_funcs=[], args=args)


def test_version_guard():
    assert st.check_trl_version("1.16.0") == "1.16.0"
    for bad in ("1.15.2", "1.17.0", "0.27.0"):
        with pytest.raises(ImportError, match="trl >=1.16,<1.17"):
            st.check_trl_version(bad)


def test_qwen_example_command_line_parses():
    """The command in examples/trl_sspo_qwen.py's docstring parses into an SSPOConfig selecting SSPO with vLLM."""
    import importlib.util
    import shlex
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "trl_sspo_qwen.py"
    spec = importlib.util.spec_from_file_location("trl_sspo_qwen", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    command = module.__doc__.split("::\n\n", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:4] == ["accelerate", "launch", "--config_file", "examples/accelerate_multi_gpu.yaml"]
    assert (path.parent / "accelerate_multi_gpu.yaml").exists()
    argv = argv[argv.index("examples/trl_sspo_qwen.py") + 1:]
    # bf16 needs a GPU at validation time: this machine has none.
    script, args, model = module.build_parser().parse_args_into_dataclasses(args=argv + ["--bf16", "false"])
    assert isinstance(args, st.SSPOConfig)
    assert (args.use_vllm, args.vllm_mode, args.vllm_importance_sampling_correction) == (True, "colocate", True)
    assert model.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and script.dataset_name == "openai/gsm8k"
    objective = args.package_objective()
    assert (objective.name, objective.params["gate"], objective.agg) == ("sspo", "arctan", "seq-mean-token-mean")
    assert module.correctness([[{"content": "so #### 1,234."}], "42"], ["x #### 1234", "#### 41"]) == [1.0, 0.0]


def test_gmpo_equals_trl_experimental_gmpo(tmp_path):
    """Our loss_type="gmpo" (the package's gmpo) against TRL's own trl.experimental.gmpo trainer."""
    from trl.experimental.gmpo import GMPOConfig, GMPOTrainer

    lp, old, adv, mask = batch(seed=9, std=0.5)
    ref = trl_loss(bare_trainer(make_config(tmp_path, cls=GMPOConfig, epsilon=0.4), cls=GMPOTrainer),
                   lp, old, adv, mask)
    tr = bare_trainer(make_config(tmp_path, cls=st.SSPOConfig, loss_type="gmpo"), cls=st.SSPOTrainer)
    got = trl_loss(tr, lp, old, adv, mask)
    assert tr._metrics["train"]["objective/clip_frac_high"][0] + tr._metrics["train"]["objective/clip_frac_low"][0] > 0
    torch.testing.assert_close(got[0], ref[0], **TOL)
    torch.testing.assert_close(got[1], ref[1], **TOL)


def test_plain_grpo_config_may_name_a_package_objective(tmp_path):
    args = make_config(tmp_path, loss_type="soft-softsign")  # a GRPOConfig: TRL itself would reject the name
    objective = st.objective_from_args(args)
    assert (objective.name, objective.params["gate"]) == ("sspo", "softsign")
    assert st.objective_from_args(make_config(tmp_path, loss_type="dapo")) is None


# ----------------------------------------------------------------------------- one set of names (TRL's)


@pytest.mark.parametrize("kw, field_name", [
    (dict(loss_type="sspo", epsilon=0.3), "epsilon"),  # the arctan gate has no clip range
    (dict(loss_type="sspo", gate="hard-clip", sapo_temperature_pos=2.0), "sapo_temperature_pos"),
    (dict(loss_type="gmpo", sapo_temperature_neg=2.0), "sapo_temperature_neg"),
    (dict(loss_type="pg", epsilon_high=0.3), "epsilon_high"),
    (dict(loss_type="sspo", delta=2.0), "delta"),
    (dict(loss_type="sapo", gate="erf"), "gate"),  # TRL's own sapo has no gate choice
    (dict(loss_type="dapo", one_sided=True), "one_sided"),
])
def test_a_field_the_loss_does_not_read_is_an_error(kw, field_name, tmp_path):
    with pytest.raises(ValueError, match=f"^{field_name}: not used by"):
        make_config(tmp_path, cls=st.SSPOConfig, **kw)


def test_trl_fields_mean_what_they_mean_in_trl(tmp_path):
    gmpo = make_config(tmp_path, cls=st.SSPOConfig, loss_type="gmpo", epsilon=0.1).package_objective()
    assert (gmpo.params["eps_lo"], gmpo.params["eps_hi"]) == (0.1, 0.1)  # epsilon_high defaults to epsilon
    gspo = make_config(tmp_path, cls=st.SSPOConfig, loss_type="gspo", epsilon=1e-3, epsilon_high=2e-3)
    assert (gspo.package_objective().params["eps_lo"], gspo.package_objective().params["eps_hi"]) == (1e-3, 2e-3)
    hard = make_config(tmp_path, cls=st.SSPOConfig, loss_type="sspo", gate="hard-clip", epsilon=0.3)
    assert hard.package_objective().params["eps_lo"] == 0.3
    # unset: the objective's own defaults (GMPO's paper's 0.4), not TRL's 0.2
    assert make_config(tmp_path, cls=st.SSPOConfig, loss_type="gmpo").package_objective().params["eps_lo"] == 0.4
    # TRL's own loss types get TRL's defaults
    trl = make_config(tmp_path, cls=st.SSPOConfig, loss_type="sapo")
    assert (trl.epsilon, trl.sapo_temperature_pos, trl.importance_sampling_level) == (0.2, 1.0, "token")


def test_importance_sampling_level_matches_the_objective(tmp_path):
    ok = make_config(tmp_path, cls=st.SSPOConfig, loss_type="sspo", importance_sampling_level="sequence")
    assert ok.package_objective().level == "sequence"
    with pytest.raises(ValueError, match="^importance_sampling_level: objective 'sspo' is sequence-level"):
        make_config(tmp_path, cls=st.SSPOConfig, loss_type="sspo", importance_sampling_level="token")
    with pytest.raises(ValueError, match="^importance_sampling_level: objective 'pg' is token-level"):
        make_config(tmp_path, cls=st.SSPOConfig, loss_type="pg", importance_sampling_level="sequence")


def test_plain_grpo_config_warns_once_about_trls_defaults(tmp_path):
    st._warned.clear()
    args = make_config(tmp_path, loss_type="soft_softsign")  # GRPOConfig: epsilon=0.2 etc. set by TRL
    with pytest.warns(UserWarning, match="epsilon.*not used by objective 'sspo'"):
        st.objective_from_args(args)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.objective_from_args(args)  # once only
    with pytest.raises(ValueError, match="^epsilon: not used by"):
        st.objective_from_args(make_config(tmp_path, loss_type="soft_softsign", epsilon=0.3))


@pytest.mark.parametrize("alias, canonical", [
    ("soft-erf-one-sided", "soft_erf_one_sided"), ("sspo-sigmoid", "sspo_sigmoid"), ("soft_erf", "soft_erf"),
    ("package:clip-cov", "package:clip_cov"),
])
def test_loss_names_use_trls_underscores_and_accept_hyphens(alias, canonical, tmp_path):
    a = make_config(tmp_path, cls=st.SSPOConfig, loss_type=alias)
    b = make_config(tmp_path, cls=st.SSPOConfig, loss_type=canonical)
    assert a.loss_type == canonical
    assert (a.package_objective().name, a.package_objective().params) == (
        b.package_objective().name, b.package_objective().params)


def test_trl_loss_types_accept_hyphens_too(tmp_path):
    args = make_config(tmp_path, cls=st.SSPOConfig, loss_type="dr-grpo")
    assert args.loss_type == "dr_grpo" and args.package_objective() is None


def test_clip_ratio_metrics_with_sspo(tmp_path):
    """TRL's clip_ratio/* are logged for the package's losses: zero for a soft gate, the cut fraction for gmpo."""
    lp, old, adv, mask = batch(seed=8, std=0.8)
    for loss_type in ("sspo", "gmpo"):
        tr = bare_trainer(make_config(tmp_path, cls=st.SSPOConfig, loss_type=loss_type), cls=st.SSPOTrainer)
        trl_loss(tr, lp, old, adv, mask)
        logged = tr._metrics["train"]
        region = logged["clip_ratio/region_mean"][0]
        low, high = logged["objective/clip_frac_low"][0], logged["objective/clip_frac_high"][0]
        if loss_type == "sspo":
            assert region == 0.0 and logged["clip_ratio/high_max"] == [0.0]
        else:  # by hand: gmpo cuts l > 0.4 for A > 0 and l < -0.4 for A < 0
            lr = (lp - old)[mask.bool()]
            a = adv[:, None].expand_as(lp)[mask.bool()]
            expected = float((((lr > 0.4) & (a > 0)) | ((lr < -0.4) & (a < 0))).double().mean())
            assert region == pytest.approx(expected) and expected > 0
            assert region == pytest.approx(low + high)
            assert 0 < logged["clip_ratio/high_max"][0] <= 1


def test_trl_and_the_trainer_refuse_the_same_parameter(tmp_path):
    """One check for both: sspo's arctan gate reads no clip range, whether TRL's epsilon or the config's eps_lo."""
    from sspo_analysis.training import load_config

    with pytest.raises(ValueError) as trl_err:
        make_config(tmp_path, cls=st.SSPOConfig, loss_type="sspo", epsilon=0.3)
    with pytest.raises(ValueError) as config_err:
        load_config(None, ['objective.name="sspo"', "objective.eps_lo=0.3"])
    said = " not used by objective 'sspo' with gate 'arctan', which reads "
    assert str(trl_err.value) == (f"epsilon:{said}gate, sapo_temperature_pos, sapo_temperature_neg, one_sided; "
                                  "leave it unset")
    assert str(config_err.value).startswith(f"objective.eps_lo:{said}objective.gate, objective.tau_pos")


def test_every_field_trls_loss_reads_is_accounted_for():
    """Each GRPOConfig field TRL 1.16's _compute_loss reads is honoured, mapped, refused or warned about
    (st.LOSS_FIELDS says which); a TRL release reading a new field fails here until it is decided."""
    import inspect
    import re

    source = inspect.getsource(GRPOTrainer._compute_loss)
    fields = set(GRPOConfig.__dataclass_fields__)
    read = {name for name in re.findall(r"self\.(?:args\.)?(\w+)", source) if name in fields}
    if "self.epsilon_low" in source:  # GRPOTrainer's name for args.epsilon
        read.add("epsilon")
    assert {"beta", "use_bias_correction_kl", "epsilon", "top_entropy_quantile"} <= read  # the parse finds them
    assert read - set(st.LOSS_FIELDS) == set()
    assert set(st.LOSS_FIELDS) <= fields


def test_package_vespo_under_vllm_correction_warns_once(tmp_path, monkeypatch):
    st._warned.discard("vespo-vllm")
    args = make_config(tmp_path, cls=st.SSPOConfig, loss_type="package:vespo", importance_sampling_level="token")
    monkeypatch.setattr(GRPOTrainer, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(args, "use_vllm", True)
    with pytest.warns(UserWarning, match="^vllm_importance_sampling_correction: package:vespo"):
        st.SSPOTrainer(model=SimpleNamespace(), reward_funcs=[], args=args)


# ----------------------------------------------------------------------------- peer objectives (TRL's own)
# TRL 1.16's ``vespo`` and ``luspo`` against the package's, on the same float64 tensors.

VESPO_TRL = dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.25)
VESPO_PKG = dict(k_pos=1.5, lambda_pos=2.5, k_neg=2.5, lambda_neg=1.25)


def vespo_old_term(objective, lp, old, adv, mask):
    """TRL's VESPO loss is ``-phi A log_prob``, the package's ``-phi A l``: they differ by ``phi A old_log_prob``."""
    t = objective.terms(lp, old, adv, mask)[0]
    return objective.aggregate(t.coefficient * old, mask.bool())


@pytest.mark.parametrize(("trl_kw", "pkg_kw"), [({}, {}), (VESPO_TRL, VESPO_PKG)])
@pytest.mark.parametrize("seed", [0, 1])
def test_vespo_gradient_equals_trl_loss_uses_log_prob(trl_kw, pkg_kw, seed, tmp_path):
    args = make_config(tmp_path, loss_type="vespo", **trl_kw)
    lp, old, adv, mask = batch(seed=seed, std=0.4)
    loss, grad = trl_loss(bare_trainer(args), lp, old, adv, mask)
    objective = get_objective("vespo", **pkg_kw)
    ref_loss, ref_grad = package_loss(objective, lp, old, adv, mask)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    torch.testing.assert_close(loss, ref_loss - vespo_old_term(objective, lp, old, adv, mask), **TOL)
    assert (adv > 0).any() and (adv < 0).any()
    # the weights are far from 1 on this batch, so the test sees the gamma function, not the on-policy point
    phi = objective.terms(lp, old, adv, mask)[0].weight[:, 0]
    assert (phi - 1).abs().max() > 0.3


def test_vespo_empty_row_and_extremes_match_trl(tmp_path):
    """An empty completion and log-ratios of +-15 (W clamped at 1e-8 and e^20 inside TRL too)."""
    args = make_config(tmp_path, loss_type="vespo")
    lp, old, adv, mask = batch(seed=2, std=0.5, empty_row=2)
    lp[0, 0] += 15.0
    lp[3, 0] -= 15.0
    loss, grad = trl_loss(bare_trainer(args), lp, old, adv, mask)
    objective = get_objective("vespo")
    ref_loss, ref_grad = package_loss(objective, lp, old, adv, mask)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    torch.testing.assert_close(loss, ref_loss - vespo_old_term(objective, lp, old, adv, mask), **TOL)


@pytest.mark.parametrize("seed", [0, 3])
def test_luspo_equals_trl_at_sequence_level(seed, tmp_path):
    args = make_config(tmp_path, loss_type="luspo", importance_sampling_level="sequence", epsilon=0.01,
                       epsilon_high=0.012)
    lp, old, adv, mask = batch(seed=seed, std=0.05)
    loss, grad = trl_loss(bare_trainer(args), lp, old, adv, mask)
    objective = get_objective("luspo", eps_lo=0.01, eps_hi=0.012)
    ref_loss, ref_grad = package_loss(objective, lp, old, adv, mask)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    _, metrics = objective(lp, old, adv, mask.bool())
    assert 0 < metrics["clip_frac_low"] + metrics["clip_frac_high"] < 1  # both sides of the clip are exercised


def test_luspo_empty_completion_counts_in_trl(tmp_path):
    """Pinned difference: TRL's ``luspo`` averages over all ``B`` rows, the package over the non-empty ones."""
    args = make_config(tmp_path, loss_type="luspo", importance_sampling_level="sequence", epsilon=0.01)
    lp, old, adv, mask = batch(seed=4, std=0.05, empty_row=1)
    loss, grad = trl_loss(bare_trainer(args), lp, old, adv, mask)
    ref_loss, ref_grad = package_loss(get_objective("luspo", eps=0.01), lp, old, adv, mask)
    torch.testing.assert_close(loss, ref_loss * 5 / 6, **TOL)
    torch.testing.assert_close(grad, ref_grad * 5 / 6, **TOL)


def test_luspo_at_token_level_is_grpo_summed_over_tokens(tmp_path):
    """TRL's default ``importance_sampling_level="token"`` turns ``luspo`` into token PPO-clip, seq-mean-token-sum."""
    args = make_config(tmp_path, loss_type="luspo", epsilon=0.2, epsilon_high=0.28)
    lp, old, adv, mask = batch(seed=5, std=0.5)
    loss, grad = trl_loss(bare_trainer(args), lp, old, adv, mask)
    ref_loss, ref_grad = package_loss(get_objective("grpo", agg="seq-mean-token-sum", eps_lo=0.2, eps_hi=0.28),
                                      lp, old, adv, mask)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


@pytest.mark.parametrize("loss_type", ["vespo", "luspo"])
def test_sspo_trainer_passes_trls_own_types_through(loss_type, tmp_path):
    kw = dict(loss_type=loss_type, importance_sampling_level="sequence" if loss_type == "luspo" else "token")
    args = make_config(tmp_path, cls=st.SSPOConfig, **kw)
    assert st.resolve_loss_type(loss_type) is None and args.package_objective() is None
    lp, old, adv, mask = batch(seed=7, std=0.3)
    got = trl_loss(bare_trainer(args, cls=st.SSPOTrainer), lp, old, adv, mask)
    ref = trl_loss(bare_trainer(make_config(tmp_path, **kw)), lp, old, adv, mask)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)


def test_package_vespo_in_sspo_trainer_has_trls_gradient(tmp_path):
    """``package:vespo`` through SSPOTrainer (token-mean over the generation batch) has TRL's ``vespo`` gradient."""
    lp, old, adv, mask = batch(seed=8, std=0.4)
    ref = trl_loss(bare_trainer(make_config(tmp_path, loss_type="vespo")), lp, old, adv, mask)
    tr = bare_trainer(make_config(tmp_path, cls=st.SSPOConfig, loss_type="package:vespo"), cls=st.SSPOTrainer)
    got = trl_loss(tr, lp, old, adv, mask)
    torch.testing.assert_close(got[1], ref[1], **TOL)
