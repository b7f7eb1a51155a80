"""Tests of the compact trainer (CPU, tiny models, a few seconds each)."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch

from sspo_analysis.objectives import objective_names
from sspo_analysis.training import TrainConfig, load_config, read_log_ratios, read_metrics, sweep, train
from sspo_analysis.training.models import (
    Sampling,
    char_tokenizer,
    generate,
    load_model,
    sequence_logprobs,
    token_logprobs,
)
from sspo_analysis.training.tasks import Addition, Countdown, JsonlTask, Reversal, evaluate_expression, make_task
from sspo_analysis.training.trainer import TIMING_KEYS

# A random-init micro model, 2 steps of 4 x 4 short rollouts: fast enough to run per objective.
FAST = ["model.preset=\"micro\"", "model.warm_start=false", "rollout.prompts=4", "rollout.group_size=4",
        "rollout.max_new_tokens=4", "log.progress=false", "log.log_ratios_every=1", "log.checkpoint_every=2",
        "threads=1", "optim.lr=1e-3"]

CONTRACT_KEYS = {
    "step", "wall_time", "reward_mean", "reward_std", "accuracy", "zero_std_frac", "response_length", "entropy",
    "ratio_mean", "ratio_std", "ratio_min", "ratio_max", "log_ratio_mean", "log_ratio_std", "log_ratio_min",
    "log_ratio_max", "seq_weight_mean", "seq_weight_var", "ess_frac", "dead_frac", "coef_norm_mean", "coef_norm_var",
    "clip_frac_low", "clip_frac_high", "gate_weight_mean", "kl_old_k3", "grad_norm", "kl_ref", "tokens_per_s",
    "skipped_updates", "entropy_change_pred", "entropy_change_real",
}


# --------------------------------------------------------------------------- tasks


def test_addition_reward_and_samples():
    task = Addition(digits=3)
    prompts, answers = task.sample(np.random.default_rng(0), 50)
    for p, a in zip(prompts, answers):
        x, y = p.rstrip("=").split("+")
        assert len(x) == 3 and len(y) == 3 and int(a) == int(x) + int(y)
    assert task.reward("579", "579") == 1.0
    assert task.reward(" 579 ", "579") == 1.0
    assert task.reward("578", "579") == 0.0
    assert task.reward("5790", "579") == 0.0
    assert task.reward("", "579") == 0.0


def test_reversal_reward():
    task = Reversal(length=4)
    prompts, answers = task.sample(np.random.default_rng(1), 20)
    assert all(p[:-1][::-1] == a for p, a in zip(prompts, answers))
    assert task.reward("dcba", "dcba") == 1.0
    assert task.reward("abcd", "dcba") == 0.0


def test_countdown_reward():
    assert evaluate_expression("3*5+7") == 22
    assert evaluate_expression("2+3*4-5") == 9
    assert evaluate_expression("3**5") is None
    assert evaluate_expression("(3+5)") is None
    task = Countdown(numbers=3)
    assert task.reward("3*5+7", "3*5+7") == 1.0
    assert task.reward("7+5*3", "3*5+7") == 1.0  # another correct expression
    assert task.reward("7+15", "3*5+7") == 0.0  # right value, number not given
    assert task.reward("3*5+7+0", "3*5+7") == 0.0
    assert task.reward("3*5*7", "3*5+7") == 0.0
    assert task.reward("abc", "3*5+7") == 0.0
    prompts, answers = task.sample(np.random.default_rng(2), 30)
    for p, a in zip(prompts, answers):
        nums, target = p.rstrip(":").split("=")
        assert evaluate_expression(a) == int(target)
        assert task.reward(a, a) == 1.0
        assert sorted(nums.split(",")) == sorted(re.findall(r"\d+", a))


def test_jsonl_task(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "one and one #### 2"}) + "\n"
                    + json.dumps({"question": "2+2?", "answer": "#### 1,004"}) + "\n")
    exact = JsonlTask(path=str(path))
    assert exact.answers == ["2", "1,004"]
    assert exact.reward(" 2", "2") == 1.0 and exact.reward("so 2", "2") == 0.0
    number = JsonlTask(path=str(path), grader="number")
    assert number.reward("so the answer is 1004.", "1,004") == 1.0
    assert number.reward("1004 or 5", "1,004") == 0.0
    with pytest.raises(ValueError, match="task.grader"):
        JsonlTask(path=str(path), grader="fuzzy")
    with pytest.raises(ValueError, match="task.name"):
        make_task("sudoku")


# --------------------------------------------------------------------------- model kernels


def test_char_tokenizer_round_trip():
    tok = char_tokenizer()
    ids = tok("<bos>12+34=", add_special_tokens=False).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == 7
    assert tok.decode(ids, skip_special_tokens=True) == "12+34="
    assert type(tok).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_match_full_softmax(temperature):
    torch.manual_seed(0)
    B, T, H, V = 3, 7, 16, 50
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False).double()
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3
    lp, ent = token_logprobs(hidden, head, targets, mask, temperature=temperature, chunk_tokens=4)
    logp_full = torch.log_softmax(head(hidden).float() / temperature, -1)
    naive = logp_full.gather(-1, targets[..., None]).squeeze(-1)
    naive_ent = -(logp_full.exp() * logp_full).sum(-1)
    assert torch.allclose(lp[mask], naive[mask], atol=1e-5)
    assert torch.allclose(ent[mask], naive_ent[mask], atol=1e-5)
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()
    # gradients through the checkpointed chunks equal the naive ones
    g = torch.autograd.grad(lp.sum() + ent.sum(), hidden)[0]
    g_naive = torch.autograd.grad((torch.where(mask, naive, 0.0).sum() + torch.where(mask, naive_ent, 0.0).sum()),
                                  hidden)[0]
    assert torch.allclose(g, g_naive, atol=1e-5)


@pytest.mark.parametrize("prompts", [["<bos>1+2=", "<bos>13+4="], ["<bos>11+2=", "<bos>13+4="]])
def test_sampler_logprobs_match_forward(prompts):
    torch.set_num_threads(1)
    model, tok = load_model("micro", seed=0)
    enc = tok(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
    gen = torch.Generator().manual_seed(0)
    tokens, logp, mask, ent_gen = generate(model, enc.input_ids, enc.attention_mask, Sampling(max_new_tokens=5),
                                           eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generator=gen)
    ids = torch.cat([enc.input_ids, tokens], 1)
    attn = torch.cat([enc.attention_mask, mask.long()], 1)
    with torch.no_grad():
        lp2, ent = sequence_logprobs(model, ids, attn, enc.input_ids.shape[1], mask)
    assert torch.allclose(logp[mask], lp2[mask], atol=1e-4)
    assert torch.allclose(ent_gen[mask], ent[mask], atol=1e-4)
    assert (ent[mask] > 0).all()


# --------------------------------------------------------------------------- config


def test_config_defaults_match_default_toml():
    from sspo_analysis.training.config import DEFAULT_CONFIG

    assert load_config(DEFAULT_CONFIG).to_dict() == TrainConfig().validate().to_dict()


@pytest.mark.parametrize("override, message", [
    ("objective.name=ppo2", "objective: unknown name 'ppo2'; allowed values: pg, grpo"),
    ("objective.eps_hi=-1", "eps_hi must be a finite number >= 0"),
    ("objective.delta=3", "unknown parameter"),
    ("rollout.top_p=1.5", "rollout.top_p: must be a number > 0.0 and <= 1.0"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("algo.advantage=\"rloo\"", "algo.advantage: unknown value 'rloo'; allowed values: grpo, drgrpo"),
    ("optim.schedule=\"step\"", "allowed values: constant, linear, cosine"),
    ("task.name=\"chess\"", "task.name: unknown value 'chess'; allowed values: addition, countdown"),
    ("model.preset=\"huge\"", "model.preset: unknown value 'huge'; allowed values: tiny"),
    ("model.precision=\"fp16\"", "model.precision: unknown value 'fp16'; allowed values: fp32, bf16"),
    ("rollout.nonsense=1", "rollout.nonsense: unknown field; allowed in [rollout]: prompts"),
    ("steps=0", "steps: must be an integer >= 1"),
    ("log.progress=3", "log.progress: must be true or false"),
    ("task.name=\"jsonl\"", "task.path"),
    ("nokey", "expected key=value"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_too_few_new_tokens_fails_before_work(tmp_path):
    with pytest.raises(ValueError, match="rollout.max_new_tokens: 3 is too small"):
        train(None, tmp_path / "r", overrides=FAST + ["task.name=\"reversal\"", "rollout.max_new_tokens=3"])
    assert not (tmp_path / "r").exists()


def test_config_overrides_and_round_trip(tmp_path):
    cfg = load_config(None, ["objective.name=sspo", "objective.tau_pos=2", "rollout.temperature=1"])
    assert cfg.objective.name == "sspo" and cfg.objective.params == {"tau_pos": 2}
    assert isinstance(cfg.rollout.temperature, float)
    assert cfg.build_objective().params["tau_pos"] == 2
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path).to_dict() == cfg.to_dict()


def test_cli_config_error_fails_before_work(tmp_path, capsys):
    from sspo_analysis.cli import main

    out = tmp_path / "run"
    assert main(["train", "--set", "objective.name=nope", "--out", str(out)]) == 2
    assert "objective: unknown name 'nope'" in capsys.readouterr().err
    assert not out.exists()


def test_config_files_with_a_bom_or_bad_bytes(tmp_path):
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbfseed = 3\n")
    assert load_config(tmp_path / "bom.toml").seed == 3
    (tmp_path / "bad.toml").write_bytes(b"seed = 3\n# \xff\n")
    with pytest.raises(ValueError, match=r"config: .*bad\.toml: 'utf-8' codec"):
        load_config(tmp_path / "bad.toml")


@pytest.mark.parametrize("override, field", [
    ("objective.one_sided=\"no\"", "one_sided"), ("objective.one_sided=1", "one_sided"),
    ("objective.tau=true", "tau"), ("objective.eps=[1,2,3]", "eps"), ("objective.gate=[1]", "gate"),
    ("log.progress=\"no\"", "log.progress"), ("model.warm_start=1", "model.warm_start"),
    ("steps=[5]", "steps"), ("optim.lr=true", "optim.lr"), ("task.name=[\"addition\"]", "task.name"),
    ("seed=123456789012345678901", "seed"), ("seed=-1", "seed"), ("warm_start.seed=18446744073709551616", "seed"),
])
def test_a_field_of_the_wrong_type_or_range_is_one_error_naming_it(override, field):
    with pytest.raises(ValueError, match=field):
        load_config(None, ["objective.name=\"sspo\"", override])


def test_eps_true_is_refused_not_one():
    with pytest.raises(ValueError, match="eps must be a number"):
        load_config(None, ["objective.eps=true"])
    assert load_config(None, ["objective.eps=[0.1,0.3]"]).build_objective().params["eps_hi"] == 0.3


def test_threads_are_bounded_by_the_machine():
    n = os.cpu_count() or 1
    assert load_config(None, [f"threads={n}"]).threads == n
    with pytest.raises(ValueError, match=f"threads: .*<= {n}"):
        load_config(None, [f"threads={n + 1}"])


# --------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("name", objective_names())
def test_two_steps_per_objective_write_contract_metrics(tmp_path, name):
    run = train(None, tmp_path / name, overrides=FAST + [f"objective.name=\"{name}\"", "steps=2"])
    df = read_metrics(run)
    assert list(df.step) == [1, 2]
    assert CONTRACT_KEYS <= set(df.columns)
    for key in CONTRACT_KEYS - {"kl_ref"}:
        assert df[key].notna().all() and np.isfinite(df[key].astype(float)).all(), key
    assert (df.response_length > 0).all() and (df.response_length <= 4).all()
    assert ((df.reward_mean >= 0) & (df.reward_mean <= 1)).all()
    assert (df.entropy > 0).all()
    assert (run / "DONE").exists() and (run / "checkpoint" / "state.pt").exists()
    assert load_config(run / "config.toml").objective.name == name
    ratios = read_log_ratios(run)
    assert sorted(ratios) == [1, 2]
    r = ratios[2]
    assert r["log_ratios"].dtype == np.float32 and r["log_ratios"].shape[0] == r["lengths"].sum()
    assert r["lengths"].shape == r["advantages"].shape == (16,)


def test_staleness_makes_rollouts_off_policy(tmp_path):
    # partial credit, so a random policy gets non-zero advantages and its updates move it
    learns = FAST + ["steps=3", "optim.lr=3e-3", 'task.name="reversal"', "task.length=3", 'task.grader="chars"']
    fresh = read_metrics(train(None, tmp_path / "k0", overrides=learns))
    stale = read_metrics(train(None, tmp_path / "k4", overrides=learns + ["algo.staleness=4"]))
    assert (fresh.reward_mean > 0).any()
    # before the first update both sample from the initial policy; later, stale rollouts are off-policy
    assert stale.kl_before_old.iloc[0] < 1e-5
    assert fresh.kl_before_old.iloc[-1] < 1e-6 < 1e-3 < stale.kl_before_old.iloc[-1]


def test_resume_continues_exactly(tmp_path):
    over = FAST + ["steps=5", "log.checkpoint_every=2", "objective.name=\"sspo\"", "algo.staleness=1"]
    straight = read_metrics(train(None, tmp_path / "straight", overrides=over))
    run = tmp_path / "killed"
    _run_killed(load_config(None, over), run, kill_after_step=3)  # dies in step 4: checkpoint of step 2, 3 lines
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    assert not (run / "DONE").exists()
    resumed = read_metrics(train(None, run, resume=True, progress=False))
    assert list(resumed.step) == [1, 2, 3, 4, 5]
    assert (run / "DONE").exists()
    for key in straight.columns:
        if key in TIMING_KEYS or key in ("run", "generation_time"):
            continue
        a, b = straight[key].to_numpy(), resumed[key].to_numpy()
        if a.dtype.kind == "f":
            assert np.array_equal(a, b, equal_nan=True), key
        else:
            assert (a == b).all(), key


def _run_killed(cfg: TrainConfig, run, kill_after_step: int) -> None:
    """Run ``cfg`` in ``run`` and raise out of the loop after ``kill_after_step`` metric lines."""
    import sspo_analysis.training.trainer as trainer

    original = trainer.rl_step

    def step(*args, **kwargs):
        line = original(*args, **kwargs)
        if line["step"] > kill_after_step:
            raise KeyboardInterrupt
        return line

    trainer.rl_step = step
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.train(cfg, run)
    finally:
        trainer.rl_step = original


def test_non_finite_loss_skips_the_update(tmp_path, monkeypatch):
    import sspo_analysis.objectives as objectives

    original = objectives.Objective.loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        calls["n"] += 1
        return loss * math.nan if calls["n"] == 1 else loss

    monkeypatch.setattr(objectives.Objective, "loss", poisoned)
    run = train(None, tmp_path / "nan", overrides=FAST + ["steps=2"])
    df = read_metrics(run)
    assert list(df.skipped_updates) == [1, 0]
    assert df.skipped_updates_total.iloc[-1] == 1
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_sweep_skips_finished_and_survives_a_crash(tmp_path, monkeypatch):
    over = FAST + ["steps=1"]
    runs = sweep(["grpo", "sapo"], [0], None, tmp_path, over)
    assert [r.name for r in runs] == ["grpo_seed0", "sapo_seed0"]
    mtime = (runs[0] / "metrics.jsonl").stat().st_mtime_ns
    import sspo_analysis.training.sweeps as sweeps

    original = sweeps.train

    def crash_on_gspo(cfg, out_dir, **kw):
        if "gspo" in str(out_dir):
            raise RuntimeError("boom")
        return original(cfg, out_dir, **kw)

    monkeypatch.setattr(sweeps, "train", crash_on_gspo)
    runs = sweeps.sweep(["grpo", "gspo", "sapo", "gmpo"], [0], None, tmp_path, over)
    assert [r.name for r in runs] == ["grpo_seed0", "sapo_seed0", "gmpo_seed0"]
    assert (tmp_path / "gspo_seed0" / "FAILED").read_text().count("boom")
    assert (runs[0] / "metrics.jsonl").stat().st_mtime_ns == mtime  # skipped, not re-run


# --------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def warm_1digit(tmp_path_factory) -> list[str]:
    """Overrides for a tiny-preset run from a (just made) warm start on 1-digit addition."""
    cache = tmp_path_factory.mktemp("cache")
    return ["task.digits=1", "rollout.max_new_tokens=3", "warm_start.eval_every=10", "warm_start.eval_prompts=128",
            "warm_start.target_success=0.3", f"warm_start.dir=\"{cache}\"", "log.progress=false", "threads=1",
            "log.log_ratios_every=0", "log.checkpoint_every=100", "log.entropy_taylor=false",
            "algo.track_kl_ref=false"]


def test_warm_started_grpo_improves_reward(tmp_path, warm_1digit):
    from sspo_analysis.training import load_config
    from sspo_analysis.training.warm_start import ensure_warm_start

    cfg = load_config(None, warm_1digit)
    info = json.loads((ensure_warm_start(cfg) / "warm_start.json").read_text())
    assert 0.2 <= info["success"] <= 0.7  # a moderate, non-saturated start
    df = read_metrics(train(None, tmp_path / "grpo", overrides=warm_1digit + [
        "steps=30", "rollout.prompts=16", "rollout.group_size=8", "optim.lr=5e-4", "objective.name=\"grpo\""]))
    first, last = df.reward_mean.iloc[:10].mean(), df.reward_mean.iloc[-10:].mean()
    assert last > first + 0.04, (first, last)


def _parity_reward(self, completion: str, answer: str) -> float:
    """A reward a random-init model earns about half the time, so that every step has a learning signal."""
    return float(sum(map(ord, completion)) % 2 == 0)


def test_metrics_do_not_depend_on_token_budget(tmp_path, monkeypatch):
    """Gradient accumulation changes neither the updates nor any logged metric (one micro-batch per row vs one)."""
    from sspo_analysis.training.tasks import Addition

    monkeypatch.setattr(Addition, "reward", _parity_reward)
    over = FAST + ["steps=3", "objective.name=\"dapo\"", "algo.kl_coef=0.05", "optim.lr=3e-3"]
    whole = read_metrics(train(None, tmp_path / "whole", overrides=over))
    micro = read_metrics(train(None, tmp_path / "micro", overrides=over + ["optim.token_budget=1"]))
    assert whole.reward_std.gt(0).all() and whole.grad_norm.gt(0).all()  # the runs really learn
    assert whole.ratio_max.iloc[-1] > 1.0001  # and go off-policy, so the ratio metrics are not trivially 1
    for key in whole.columns:
        if key in TIMING_KEYS or key in ("run", "generation_time"):
            continue
        a, b = whole[key].to_numpy(), micro[key].to_numpy()
        if a.dtype.kind == "f":
            assert np.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True), (key, a, b)
        else:
            assert (a == b).all(), key


# --------------------------------------------------------------------------- the update's pieces


def test_lr_schedule_against_hand_values():
    from sspo_analysis.training.update import lr_lambda

    def schedule(name: str) -> list[float]:
        cfg = load_config(None, ["steps=5", "algo.updates_per_batch=2", "optim.warmup_updates=3",
                                 f"optim.schedule=\"{name}\"", "optim.min_lr_ratio=0.1"])
        f = lr_lambda(cfg)
        return [f(u) for u in range(11)]

    warmup = [0.25, 0.5, 0.75]  # (u + 1) / (warmup + 1)
    # after warmup, from 1 to min_lr_ratio = 0.1 over the remaining 10 - 3 = 7 updates
    linear = [1.0, 0.87142857, 0.74285714, 0.61428571, 0.48571429, 0.35714286, 0.22857143, 0.1]
    cosine = [1.0, 0.95543599, 0.83057041, 0.65013442, 0.44986558, 0.26942959, 0.14456401, 0.1]
    assert np.allclose(schedule("constant"), warmup + [1.0] * 8)
    assert np.allclose(schedule("linear"), warmup + linear)
    assert np.allclose(schedule("cosine"), warmup + cosine)


@pytest.mark.parametrize("name, agg", [("grpo", a) for a in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum",
                                                              "seq-mean-token-sum-norm")]
                         + [("gspo", "seq-mean-token-mean"), ("gspo", "token-mean")])
@pytest.mark.parametrize("rows_per_micro", [1, 2, 4])
def test_accumulated_micro_batches_give_the_minibatch_gradient(name, agg, rows_per_micro):
    from sspo_analysis.objectives import get_objective
    from sspo_analysis.training.update import micro_batches, micro_weight

    torch.manual_seed(0)
    B, T = 7, 5
    objective = get_objective(name, agg=agg)
    lengths = torch.tensor([5, 1, 3, 0, 2, 5, 4])  # ragged, one empty row
    mask = torch.arange(T)[None] < lengths[:, None]
    old = torch.randn(B, T, dtype=torch.float64) - 1.0
    logp = (old + 0.3 * torch.randn(B, T, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(B, dtype=torch.float64)
    rows = torch.tensor([3, 0, 6, 2, 5, 1, 4])  # a shuffled minibatch, as the trainer draws it

    objective.evaluate(logp[rows], old[rows], adv[rows], mask[rows])[0].backward()
    whole = logp.grad.clone()
    logp.grad = None
    micros = micro_batches(rows, T, budget=rows_per_micro * T)
    assert [len(m) for m in micros] == [rows_per_micro] * (B // rows_per_micro) + [B % rows_per_micro] * (
        B % rows_per_micro > 0)
    for micro in micros:
        loss = objective.evaluate(logp[micro], old[micro], adv[micro], mask[micro])[0]
        (loss * micro_weight(objective, mask[micro], mask[rows])).backward()
    assert whole.abs().max() > 0
    assert torch.allclose(logp.grad, whole, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- the entropy predictions


def _softmax_entropy(z: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(z, -1)
    return -(logp.exp() * logp).sum(-1)


def _one_state_step(name: str, eta: float, old_shift: torch.Tensor) -> tuple[float, float, float]:
    """One SGD step of size ``eta`` on the objective's loss for a free-logit softmax over 5 actions.

    The batch is 8 one-token sequences, all at the same state. Returns the real entropy change,
    the trainer's prediction (``entropy_change_prediction`` times ``eta``) and the term that the
    prediction leaves out, ``eta K sum_t n_t c_t`` with ``K = Cov_pi(log pi, pi)`` by hand.
    """
    from sspo_analysis.objectives import get_objective
    from sspo_analysis.training.measure import entropy_change_prediction

    objective = get_objective(name)
    z = torch.tensor([0.3, -1.2, 0.8, 0.0, -0.4], dtype=torch.float64, requires_grad=True)
    actions = torch.tensor([0, 2, 2, 1, 4, 3, 0, 2])
    adv = torch.tensor([1.0, -0.5, 0.25, 1.5, -1.0, 0.75, -2.0, 0.0], dtype=torch.float64)
    adv = adv - adv.mean()  # a group baseline
    mask = torch.ones(8, 1, dtype=torch.bool)
    logp = torch.log_softmax(z, -1)[actions][:, None]
    old = logp.detach() + old_shift[:, None]
    loss, _, terms = objective.evaluate(logp, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, z)
    with torch.no_grad():
        h = _softmax_entropy(z)
        real = float(_softmax_entropy(z - eta * grad) - h)
        norm = objective.normalisation(mask, torch.float64)
        c = terms.coefficient
        pred = eta * float(entropy_change_prediction(logp.detach(), h.expand(8, 1), c, norm, mask))
        pi = z.softmax(-1)
        k = float((pi * pi * (pi.log() + h)).sum())  # Cov_pi(log pi, pi): E_pi[(log pi - E log pi) pi]
        left_out = eta * k * float((norm * c).sum())
    return real, pred, left_out


@pytest.mark.parametrize("name", ["grpo", "dapo", "sapo", "gspo", "sspo", "cispo"])
def test_entropy_prediction_is_first_order_exact_on_policy(name):
    """On-policy with a group baseline, sum_t n_t c_t = 0 and the prediction is the exact first-order change."""
    errors = []
    for eta in (1e-2, 1e-3):
        real, pred, left_out = _one_state_step(name, eta, torch.zeros(8, dtype=torch.float64))
        assert abs(left_out) < 1e-15
        assert abs(pred) > 1e-3 * eta  # not trivially zero
        errors.append(abs(real - pred))
        assert errors[-1] < 0.05 * abs(real)
    assert errors[1] < errors[0] / 50  # the error is second order in the step size


@pytest.mark.parametrize("name", ["dapo", "sspo", "gmpo"])
def test_entropy_prediction_off_policy_misses_only_the_mean_coefficient_term(name):
    """Off-policy, sum_t n_t c_t != 0: the real change is the prediction plus eta K sum_t n_t c_t, to first order."""
    shift = torch.tensor([0.1, -0.15, 0.05, 0.2, -0.1, 0.0, 0.12, -0.05], dtype=torch.float64)
    errors = []
    for eta in (1e-2, 1e-3):
        real, pred, left_out = _one_state_step(name, eta, shift)
        assert abs(left_out) > 1e-3 * abs(real)  # the left-out term matters here
        errors.append(abs(real - pred - left_out))
        assert errors[-1] < 0.05 * abs(real)
    assert errors[1] < errors[0] / 50


def test_entropy_cov_is_the_population_covariance_over_unmasked_tokens():
    from sspo_analysis.training.measure import token_covariance

    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    coef = torch.tensor([[1.0, -1.0, 2.0], [0.5, 1e6, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    x, y = [-1.0, -2.0, -0.5, -0.1], [1.0, -1.0, 2.0, 0.5]
    mx, my = sum(x) / 4, sum(y) / 4
    hand = sum((a - mx) * (b - my) for a, b in zip(x, y)) / 4
    assert token_covariance(logp, coef, mask) == pytest.approx(hand, rel=1e-6)
    assert token_covariance(logp, coef, torch.zeros_like(mask)) == 0.0
    one = torch.zeros_like(mask)
    one[0, 0] = True
    assert token_covariance(logp, coef, one) == 0.0


def test_update_metrics_reduce_as_declared():
    from sspo_analysis.training.measure import reduce_updates

    per_update = [{"ratio_min": 0.9, "ratio_max": 1.2, "n_tokens": 10.0, "loss": 1.0, "grad_norm": math.nan},
                  {"ratio_min": 0.7, "ratio_max": 1.1, "n_tokens": 6.0, "loss": 3.0, "grad_norm": 2.0}]
    assert reduce_updates(per_update) == {"ratio_min": 0.7, "ratio_max": 1.2, "n_tokens": 16.0, "loss": 2.0,
                                          "grad_norm": 2.0}
    with pytest.raises(ValueError, match=r"metrics \['ratio_p90'\]: no reduction declared"):
        reduce_updates([{"ratio_p90": 1.0}])


def test_load_tokenizer_keeps_spaces_from_a_string_path_and_refuses_a_missing_one(tmp_path):
    """The saved character tokenizer comes back as itself (AutoTokenizer's Qwen2Tokenizer would drop spaces)."""
    from sspo_analysis.training.models import char_tokenizer, load_model, load_tokenizer

    model, _ = load_model("micro")
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.decode(tok("1 + 2").input_ids) == "1 + 2"
    with pytest.raises(ValueError, match="not a local directory"):
        load_tokenizer(tmp_path / "missing")
