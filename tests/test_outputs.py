"""Standard outputs of the compact trainer: TensorBoard scalars and RUN/final as a transformers checkpoint."""

import json

import pytest
import torch

from sspo_analysis.training.outputs import check_report_to, metric_tag
from sspo_analysis.training.trainer import train

FAST = ["model.preset=\"micro\"", "model.warm_start=false", "rollout.prompts=4", "rollout.group_size=4",
        "rollout.max_new_tokens=4", "log.log_ratios_every=0", "log.progress=false", "steps=2"]


def test_final_loads_with_from_pretrained_and_holds_the_trained_weights(tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from sspo_analysis.training.models import load_tokenizer

    run = train(None, tmp_path / "run", overrides=FAST)
    model = AutoModelForCausalLM.from_pretrained(run / "final", local_files_only=True)
    trained = torch.load(run / "checkpoint" / "state.pt", weights_only=False)["model"]  # the last checkpoint
    loaded = model.state_dict()
    assert set(trained) <= set(loaded)
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    for tok in (PreTrainedTokenizerFast.from_pretrained(run / "final"), load_tokenizer(run / "final")):
        assert tok.decode(tok("12 + 3 = 15")["input_ids"], skip_special_tokens=True) == "12 + 3 = 15"


def test_sspo_export_writes_final_from_the_checkpoint(tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    from sspo_analysis.cli import main

    run = train(None, tmp_path / "run", overrides=FAST)
    expected = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    shutil.rmtree(run / "final")
    assert main(["export", str(run)]) == 0
    got = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a run directory with a checkpoint"):
        from sspo_analysis.training.outputs import export_run

        export_run(tmp_path)


def test_tensorboard_holds_every_metric_of_every_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(None, tmp_path / "run", overrides=FAST + ['log.report_to=["tensorboard"]'])
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    numeric = {k for k, v in lines[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)} - {"step"}
    assert {metric_tag(k) for k in numeric} <= set(acc.Tags()["scalars"])
    for key in ("reward_mean", "entropy", "lr"):
        got = [(e.step, e.value) for e in acc.Scalars(metric_tag(key))]
        assert got == [(x["step"], pytest.approx(x[key], rel=1e-6)) for x in lines]


@pytest.mark.parametrize("value, match", [
    ("tensorboard", "must be a list"),
    (["mlflow"], "unknown value 'mlflow'; allowed values: none, tensorboard, wandb"),
    (["none", "tensorboard"], "'none' cannot be combined"),
])
def test_report_to_errors_name_the_field(value, match):
    with pytest.raises(ValueError, match=f"^log.report_to: .*{match}"):
        check_report_to(value)
