"""Logs a practitioner recognises: TRL's metric names, the config as hyper-parameters, sample completions, W&B.

TensorBoard and W&B are read back with their own readers (``EventAccumulator``, the offline run directory).
"""

from __future__ import annotations

import json

import pytest

from sspo_analysis.training.outputs import SAMPLE_KEYS, _keep_samples, check_report_to, metric_tag
from sspo_analysis.training.tasks import Addition
from sspo_analysis.training.trainer import train

FAST = ["model.preset=\"micro\"", "model.warm_start=false", "rollout.prompts=4", "rollout.group_size=4",
        "rollout.max_new_tokens=4", "log.log_ratios_every=0", "log.progress=false", "steps=2",
        "log.samples_every=1", "log.samples_per_step=3"]


@pytest.mark.parametrize("key, tag", [
    ("reward_mean", "train/reward"), ("reward_std", "train/reward_std"),
    ("zero_std_frac", "train/frac_reward_zero_std"), ("response_length", "train/completions/mean_length"),
    ("kl_ref", "train/kl"), ("lr", "train/learning_rate"), ("clip_frac_low", "train/clip_ratio/low_mean"),
    ("gate_weight_mean", "train/objective/gate_weight_mean"), ("ess_frac", "train/objective/ess_frac"),
    ("kl_old_k3", "train/objective/kl_old_k3"), ("step_time", "train/step_time"),
])
def test_metric_names_are_trls(key, tag):
    """TRL's GRPOTrainer names (the SSPOTrainer integration logs objective/<key> the same way)."""
    assert metric_tag(key) == tag


def test_tensorboard_has_trls_tags_the_config_and_samples(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(None, tmp_path / "run", overrides=FAST + ['log.report_to=["tensorboard"]'])
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/reward", "train/kl", "train/clip_ratio/high_mean", "train/objective/dead_frac"} <= scalars
    assert not {"reward_mean", "gate_weight_mean"} & scalars  # no flat tags
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("train/reward")] == [pytest.approx(x["reward_mean"]) for x in lines]
    texts = set(acc.Tags()["tensors"])
    assert {"config/text_summary", "train/samples/text_summary"} <= texts
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert 'name = "grpo"' in config_text and "samples_every = 1" in config_text
    samples = acc.Tensors("train/samples/text_summary")
    assert [e.step for e in samples] == [1, 2]
    assert "| prompt | completion | answer | reward | advantage |" in samples[0].tensor_proto.string_val[0].decode()
    hparams = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert b"objective.name" in hparams["_hparams_/session_start_info"]


def test_samples_jsonl_holds_completions_with_their_rewards(tmp_path):
    run = train(None, tmp_path / "run", overrides=FAST)
    rows = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 1, 1, 2, 2, 2]
    assert all(tuple(r) == SAMPLE_KEYS for r in rows)
    task = Addition(digits=2)  # the default task
    for row in rows:  # the reward is the task's grade of that completion against that answer
        assert row["reward"] == task.reward(row["completion"], row["answer"])
        x, y = row["prompt"].rstrip("=").split("+")
        assert int(row["answer"]) == int(x) + int(y)
    assert len({r["prompt"] for r in rows if r["step"] == 1}) == 3  # from different prompts
    assert "samples" not in json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def test_a_resume_drops_the_samples_it_will_redo(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"step": s, "completion": str(s)}) + "\n" for s in (1, 2, 3, 4)))
    _keep_samples(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="samples.jsonl: line 2 is not a samples row"):
        _keep_samples(path, 5)


def test_samples_every_zero_writes_none(tmp_path):
    run = train(None, tmp_path / "run", overrides=FAST + ["log.samples_every=0"])
    assert not (run / "samples.jsonl").exists()


def test_wandb_offline_leaves_a_run_directory(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train(None, tmp_path / "run", overrides=FAST + ['log.report_to=["wandb"]'])
    (offline,) = (run / "wandb").glob("offline-run-*")
    (record,) = offline.glob("run-*.wandb")  # what `wandb sync` uploads: protobuf records, strings kept as bytes
    assert (run / "wandb" / "run_id").read_text().strip() in offline.name
    data = record.read_bytes()
    assert b"objective.name" in data and b"train/reward" in data and b"train/objective/gate_weight_mean" in data
    tables = sorted(offline.glob("files/media/table/train/samples_*.table.json"))
    rows = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    logged = [dict(zip(t["columns"], r)) for t in map(json.loads, (p.read_text() for p in tables)) for r in t["data"]]
    order = lambda r: (r["step"], r["prompt"])  # noqa: E731
    assert sorted(logged, key=order) == sorted(rows, key=order)
    assert wandb.run is None  # finished


def test_report_to_wandb_needs_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"^log.report_to: 'wandb' needs the wandb package: pip install -e '.\[wandb"):
        check_report_to(["wandb"])


def test_wandb_that_cannot_start_is_one_error_before_any_step(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def refuse(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(ValueError, match=r"^log.report_to: 'wandb' could not start a run \(No API key configured"):
        train(None, tmp_path / "run", overrides=FAST + ['log.report_to=["wandb"]'])
    assert not (tmp_path / "run").exists()  # refused before its first step: no half-made run to refuse later
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(None, tmp_path / "run", overrides=FAST + ['log.report_to=["wandb"]'])  # the same --out then works
    assert (tmp_path / "run" / "DONE").exists()
