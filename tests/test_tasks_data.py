"""Real data for the ``jsonl`` task: the formats ``datasets`` reads (JSONL, JSON, parquet, ``save_to_disk``),
TRL's and verl's layouts, refused records, the math grader on GSM8K's own solutions, the no-signal warning, and
the real-checkpoint command of docs/trainer.md end to end on a config-built Qwen2.5-architecture checkpoint with its own
tokenizer (``tests/data/gsm8k_sample.jsonl``: eight problems written in GSM8K's format for these tests)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sspo_analysis.cli import main
from sspo_analysis.training import tasks
from sspo_analysis.training.health import NO_SIGNAL_STEPS, SignalWatch, no_signal
from sspo_analysis.training.tasks import JsonlTask, final_number, make_task

datasets = pytest.importorskip("datasets")

GSM8K = Path(__file__).parent / "data" / "gsm8k_sample.jsonl"
ROWS = [json.loads(line) for line in GSM8K.read_text().splitlines()]
FINAL = [row["answer"].split("####")[-1].strip() for row in ROWS]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, Path]:
    """GSM8K's rows as JSONL (the fixture), a JSON array, parquet, and a save_to_disk directory."""
    root = tmp_path_factory.mktemp("formats")
    (root / "rows.json").write_text(json.dumps(ROWS, indent=1))
    data = datasets.Dataset.from_list(ROWS)
    data.to_parquet(str(root / "rows.parquet"))
    data.save_to_disk(str(root / "saved"))
    datasets.DatasetDict(train=data, test=data.select(range(2))).save_to_disk(str(root / "splits"))
    return {"jsonl": GSM8K, "json": root / "rows.json", "parquet": root / "rows.parquet", "disk": root / "saved",
            "splits": root / "splits"}


# --------------------------------------------------------------------------- formats and layouts


@pytest.mark.parametrize("fmt", ["json", "parquet", "disk", "splits"])
def test_every_format_gives_the_same_prompts_and_answers_as_the_jsonl(formats, fmt):
    reference = JsonlTask(path=str(GSM8K), prompt_key="question")
    task = JsonlTask(path=str(formats[fmt]), prompt_key="question")
    assert task.prompts == reference.prompts == [row["question"] for row in ROWS]
    assert task.answers == reference.answers == FINAL  # the part after GSM8K's ####


def test_a_dataset_dict_without_a_train_split_is_refused_naming_its_splits(tmp_path):
    data = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict(a=data, b=data).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(ValueError, match=r"ab: a DatasetDict without a 'train' split \(splits: a, b\)"):
        JsonlTask(path=str(tmp_path / "ab"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"plain: a directory, but not a dataset saved with datasets' save_to_disk"):
        JsonlTask(path=str(tmp_path / "plain"))


def test_verl_rl_layout_reads_as_it_is(tmp_path):
    # verl's examples/data_preprocess/gsm8k.py: prompt as chat messages, the answer in reward_model.ground_truth
    instruction = "Let's think step by step and output the final answer after \"####\"."
    rows = [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": r["question"] + " " + instruction}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": final},
             "extra_info": {"split": "train", "index": i, "answer": r["answer"], "question": r["question"]}}
            for i, (r, final) in enumerate(zip(ROWS, FINAL))]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    task = JsonlTask(path=str(tmp_path / "train.parquet"), grader="number")
    assert task.prompts == [r["prompt"] for r in rows] and task.answers == FINAL
    assert task.reward(ROWS[0]["answer"], task.answers[0]) == 1.0
    # the GSM8K config's keys (question, answer) fall back to verl's prompt and reward_model.ground_truth
    gsm8k_keys = JsonlTask(path=str(tmp_path / "train.parquet"), prompt_key="question", answer_key="answer")
    assert (gsm8k_keys.prompts, gsm8k_keys.answers) == (task.prompts, task.answers)


def test_trl_conversational_prompts_read_as_they_are_and_use_the_chat_template(tmp_path):
    from sspo_analysis.training.models import char_tokenizer
    from sspo_analysis.training.rollout import format_prompts

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="}]
    task = JsonlTask(path=str(_write(tmp_path / "c.jsonl", [{"prompt": messages, "answer": 2}])))
    assert task.prompts == [messages] and task.answers == ["2"]
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    # a chat prompt goes through the template even with task.chat_template = false; a string prompt does not
    assert format_prompts(tok, [messages, "2+2="], chat=False) == ["<system>Be brief.<user>1+1=<assistant>",
                                                                    "<bos>2+2="]


def test_chat_prompts_without_a_chat_template_are_refused_in_one_line(tmp_path, capsys):
    path = _write(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}])
    over = ['model.preset="micro"', "model.warm_start=false", 'task.name="jsonl"', f'task.path="{path}"', "steps=1"]
    assert main(["train", "--no-progress", "--out", str(tmp_path / "r"), *[f for o in over for f in ("--set", o)]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 prompts are chat messages" in err and "chat template" in err


def test_json_values_are_the_files_own_in_rows_of_different_shapes(tmp_path):
    chat = [{"role": "user", "content": "2+2="}]
    rows = [{"prompt": "1+1=", "answer": 2}, {"prompt": chat, "answer": "4", "note": {"a": 1}},
            {"question": "3+3=", "answer": 6.0}, {"prompt": "0.5+0=", "answer": 0.5}]
    (tmp_path / "mixed.json").write_text(json.dumps(rows))
    for path in (_write(tmp_path / "mixed.jsonl", rows), tmp_path / "mixed.json"):
        task = JsonlTask(path=str(path))
        assert task.prompts == ["1+1=", chat, "3+3=", "0.5+0="] and task.answers == ["2", "4", "6", "0.5"]


def test_numeric_answers_are_written_as_numbers():
    assert tasks.record_answer(72, "w", "answer") == "72"
    assert tasks.record_answer(72.0, "w", "answer") == "72"  # arrow reads a column of 72 and 0.5 as floats
    assert tasks.record_answer(0.5, "w", "answer") == "0.5"
    with pytest.raises(ValueError, match="w: 'answer' must be a string or a number, got list"):
        tasks.record_answer([1], "w", "answer")


def test_datasets_is_imported_only_when_a_parquet_or_saved_task_is_loaded(formats):
    def load(path: Path) -> str:
        return f"make_task_from(load_config(None, ['task.name=\"jsonl\"', 'task.path=\"{path}\"']))\n"

    code = ("import sys, contextlib, io\n"
            "from sspo_analysis.cli import main\n"
            "from sspo_analysis.training.config import load_config\n"
            "from sspo_analysis.training.tasks import make_task_from\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['config', 'show'])\n"
            "make_task_from(load_config(None, []))\n" + load(GSM8K) +
            "assert 'datasets' not in sys.modules and 'pyarrow' not in sys.modules, 'imported early'\n"
            + load(formats["parquet"]) + "assert 'datasets' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- refused records


@pytest.mark.parametrize("record, message", [
    ({"prompt": "  ", "answer": "2"}, r"bad\.jsonl:2: 'prompt' is empty"),
    ({"prompt": "1+1=", "answer": ""}, r"bad\.jsonl:2: 'answer' is empty; an empty answer would reward an empty"),
    ({"question": "1+1=", "answer": "two #### "}, r"bad\.jsonl:2: 'answer' is empty"),
    ({"prompt": [], "answer": "2"}, r"bad\.jsonl:2: 'prompt' must be a string or a list of chat messages"),
    ({"prompt": [{"role": "user", "content": ""}], "answer": "2"}, r"bad\.jsonl:2: 'prompt' holds no text"),
    ({"prompt": "1+1=", "solution": "2"}, r"bad\.jsonl:2: no field 'answer' \(the fields are 'prompt', 'solution'\)"),
])
def test_bad_records_are_refused_with_file_line_and_field(tmp_path, record, message):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "2+2=", "answer": "4"}, record])
    with pytest.raises(ValueError, match=message):
        make_task("jsonl", path=str(path))


def test_an_empty_answer_no_longer_rewards_an_empty_completion_through_the_cli(tmp_path, capsys):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": " "}])
    over = ['model.preset="micro"', "model.warm_start=false", 'task.name="jsonl"', f'task.path="{path}"', "steps=1"]
    assert main(["train", "--no-progress", "--out", str(tmp_path / "r"), *[f for o in over for f in ("--set", o)]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"bad\.jsonl:2: 'answer' is empty", err)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_a_lone_surrogate_is_refused_with_file_line_and_field(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "x\\ud800", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"s\.jsonl:3: 'prompt' holds a lone surrogate"):
        make_task("jsonl", path=str(path))
    array = tmp_path / "s.json"
    array.write_text('[{"prompt": "x\\ud800", "answer": "1"}]')
    with pytest.raises(ValueError, match=r"s\.json: row 0: 'prompt' holds a lone surrogate"):
        make_task("jsonl", path=str(array))


def test_a_bad_parquet_row_is_named_by_its_index(tmp_path):
    datasets.Dataset.from_list([{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": ""}]).to_parquet(
        str(tmp_path / "t.parquet"))
    with pytest.raises(ValueError, match=r"t\.parquet: row 1: 'answer' is empty"):
        make_task("jsonl", path=str(tmp_path / "t.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"broken\.parquet: not readable as parquet \("):
        make_task("jsonl", path=str(tmp_path / "broken.parquet"))


# --------------------------------------------------------------------------- the math grader


@pytest.mark.parametrize("completion, number", [
    ("Answer: 72\n\nNote: step 3 of 4", "72"),  # the example: the last number is 4
    ("#### 72\n\nNote: step 3 of 4", "72"),
    ("so the total is \\boxed{1,004} (step 3)", "1004"),
    ("\\boxed{7} and then \\boxed{72}.", "72"),  # the last box
    ("48 + 24 = 72", "72"),  # nothing marked: the last number
    ("The answer is blue.\n72", None),  # marked, but no number in the marked line
    ("", None),
])
def test_final_number_reads_the_marked_answer(completion, number):
    assert final_number(completion) == number


def _math_task(monkeypatch, math_verify: bool) -> JsonlTask:
    if math_verify:
        pytest.importorskip("math_verify")
        return JsonlTask(path=str(GSM8K), grader="math", prompt_key="question")
    monkeypatch.setattr(tasks, "math_verifier", lambda: None)
    with pytest.warns(UserWarning, match="math-verify is not installed, so answers are compared as numbers"):
        return JsonlTask(path=str(GSM8K), grader="math", prompt_key="question")


@pytest.mark.parametrize("grader", ["number", "math-verify", "math-fallback"])
def test_gsm8k_reference_solutions_score_one_and_other_solutions_zero(monkeypatch, grader):
    task = (JsonlTask(path=str(GSM8K), grader="number", prompt_key="question") if grader == "number"
            else _math_task(monkeypatch, grader == "math-verify"))
    scores = [[task.reward(row["answer"], answer) for answer in task.answers] for row in ROWS]
    assert scores == [[float(i == j) for j in range(len(ROWS))] for i in range(len(ROWS))]
    assert task.reward("Answer: 144\n\nNote: step 3 of 4", "144") == 1.0
    assert task.reward("", "144") == 0.0


def test_math_grader_uses_math_verify_when_installed(monkeypatch):
    task = _math_task(monkeypatch, math_verify=True)
    # symbolic equality: the number grader reads \frac{1}{2} as 1
    assert task.reward("so \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert JsonlTask(path=str(GSM8K), grader="number").reward("so \\boxed{\\frac{1}{2}}", "0.5") == 0.0


def test_the_gsm8k_config_has_the_math_grader_and_the_chat_template():
    from sspo_analysis.training.config import load_config

    cfg = load_config("qwen2.5-0.5b-gsm8k", [f'task.path="{GSM8K}"'])
    assert (cfg.task.name, cfg.task.grader, cfg.task.chat_template) == ("jsonl", "math", True)
    assert (cfg.task.prompt_key, cfg.task.answer_key) == ("question", "answer")


# --------------------------------------------------------------------------- no learning signal


def _rows(zero_std: list[float], reward: float = 0.0) -> list[dict]:
    return [{"step": i + 1, "zero_std_frac": z, "reward_mean": reward} for i, z in enumerate(zero_std)]


def test_no_signal_needs_every_group_flat_for_the_first_steps():
    n = NO_SIGNAL_STEPS
    message = no_signal(_rows([1.0] * n))
    assert message.startswith(f"no learning signal: every group of the first {n} steps")
    assert all(cause in message for cause in ("task.grader", "task.chat_template", "answer format"))
    assert "mean reward 1" in no_signal(_rows([1.0] * n, reward=1.0))  # every sample right: also no signal
    assert no_signal(_rows([1.0] * (n - 1))) == ""  # too early to say
    assert no_signal(_rows([1.0] * (n - 1) + [0.75])) == ""  # one group learned something
    assert no_signal(_rows([0.5] + [1.0] * n)) == ""  # judged on the first steps only


def test_signal_watch_says_it_once():
    watch = SignalWatch()
    said = [watch.update(row) for row in _rows([1.0] * (2 * NO_SIGNAL_STEPS))]
    assert [bool(s) for s in said] == [i == NO_SIGNAL_STEPS - 1 for i in range(2 * NO_SIGNAL_STEPS)]
    assert watch.message == said[NO_SIGNAL_STEPS - 1]


# ------------------------------------------------------------------ docs/trainer.md's real-checkpoint command

# Qwen2.5's chat format (ChatML, with its default system turn).
CHATML = ("{%- if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "{%- endif %}{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def _bpe_tokenizer():
    """A byte-level BPE tokenizer trained on the fixture's text, with Qwen2.5's special tokens and chat format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([text for row in ROWS for text in row.values()], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="left", clean_up_tokenization_spaces=False)
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory) -> Path:
    """A Qwen2.5-architecture checkpoint built from a ``Qwen2Config`` (tiny, random weights), saved with
    ``save_pretrained`` together with its own tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    path = tmp_path_factory.mktemp("qwen") / "Qwen2.5-tiny"
    tok = _bpe_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
                         max_position_embeddings=512, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "disk"])
def test_the_readme_real_checkpoint_command_trains_on_each_format(qwen_checkpoint, formats, fmt, tmp_path, capsys):
    run = tmp_path / "run"
    sets = [f"model.path={qwen_checkpoint}", f"task.path={formats[fmt]}", 'device="cpu"', f"steps={NO_SIGNAL_STEPS}",
            "threads=1", "rollout.prompts=2", "rollout.group_size=2", "rollout.max_new_tokens=8",
            "algo.updates_per_batch=1", f"log.checkpoint_every={NO_SIGNAL_STEPS}"]
    status = main(["train", "--config", "qwen2.5-0.5b-gsm8k", "--no-progress", "--out", str(run),
                   *[f for s in sets for f in ("--set", s)]])
    out, err = capsys.readouterr()
    assert status == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_mean"] for r in rows] == [0.0] * NO_SIGNAL_STEPS  # a random model scores 0
    # the CLI prints the package's own warning as one line on stderr, once
    warned = [line for line in err.splitlines() if line.startswith("sspo: warning: no learning signal")]
    assert len(warned) == 1, err
    message = warned[0].removeprefix("sspo: warning: ")
    assert all(cause in message for cause in ("task.grader", "task.chat_template", "answer format"))
    assert message in (run / "DONE").read_text() and "no learning signal" in out
    assert (run / "final" / "tokenizer.json").is_file()
