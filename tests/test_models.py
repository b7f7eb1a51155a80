"""training.models: which tokenizer a checkpoint trains with, exports that reload as they were trained
(tokenizer encodings, dtype, no machine-local flags), and greedy decoding against transformers' own."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sspo_analysis.training import lean
from sspo_analysis.training.config import TrainConfig, load_config
from sspo_analysis.training.config_doc import annotated_toml
from sspo_analysis.training.models import (
    CHARS,
    LOCAL_FLAGS,
    SPECIALS,
    Sampling,
    char_tokenizer,
    generate,
    load_model,
    load_tokenizer,
)
from sspo_analysis.training.rollout import format_prompts
from sspo_analysis.training.tasks import make_task_from
from sspo_analysis.training.trainer import build_policy, train

FAST = ["model.warm_start=false", "rollout.prompts=2", "rollout.group_size=2", "rollout.max_new_tokens=4",
        "log.log_ratios_every=0", "log.progress=false", "log.entropy_taylor=false", "steps=1", "threads=1"]
# spaces, letters and punctuation: what the character tokenizer's earlier export lost (spaces) on reload
TEXT_ROWS = [{"prompt": "What is 12 + 34? Answer: ", "answer": "46"},
             {"prompt": "Reverse 'abc' (letters, no spaces)! ", "answer": "cba"}]


def _weights_only(directory, preset: str = "micro", dtype=torch.float32):
    """A checkpoint directory holding a model's config and weights and no tokenizer."""
    model, _ = load_model(preset)
    model.to(dtype).save_pretrained(directory)
    return directory


def _legacy_char_tokenizer(chars: str = CHARS):
    """The character tokenizer as this package built it before exports had to round-trip (a WordLevel
    model, one pre-token per character): the ids every earlier run was trained with."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------- which tokenizer


def test_a_checkpoint_without_a_tokenizer_is_refused_naming_the_files(tmp_path):
    path = _weights_only(tmp_path / "weights")
    message = (r"^model.path: '.*weights' holds no tokenizer \(none of tokenizer.json, tokenizer_config.json, "
               r"tokenizer.model, vocab.json, vocab.txt\); .*model.tokenizer = \"chars\"")
    with pytest.raises(ValueError, match=message):
        load_config(None, [f'model.path="{path}"'])
    with pytest.raises(ValueError, match=message):
        load_model(path=path)
    with pytest.raises(ValueError, match=message):
        train(None, tmp_path / "run", overrides=[f'model.path="{path}"'] + FAST)
    assert not (tmp_path / "run").exists()  # refused before any work


def test_an_incomplete_tokenizer_is_one_line_naming_model_path(tmp_path):
    from sspo_analysis.training.models import char_tokenizer

    path = _weights_only(tmp_path / "weights")
    char_tokenizer().save_pretrained(tmp_path / "tok")
    shutil.copy(tmp_path / "tok" / "tokenizer_config.json", path)  # the config without the vocabulary
    with pytest.raises(ValueError, match=r"^model.path: the tokenizer in '.*weights' cannot be loaded \(") as err:
        load_model(path=path)
    assert "\n" not in str(err.value)


def test_model_tokenizer_chars_opts_in_to_the_character_tokenizer(tmp_path):
    path = _weights_only(tmp_path / "weights")
    run = train(None, tmp_path / "run", overrides=[f'model.path="{path}"', 'model.tokenizer="chars"'] + FAST)
    saved = AutoTokenizer.from_pretrained(run / "final")
    assert saved.get_vocab() == char_tokenizer().get_vocab()
    data = tmp_path / "accents.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "deux é"}) + "\n")
    with pytest.raises(ValueError, match="^task.path: 1 of 1 answers use characters the character tokenizer lacks"):
        train(None, tmp_path / "run2", overrides=[f'model.path="{path}"', 'model.tokenizer="chars"',
                                                  'task.name="jsonl"', f'task.path="{data}"'] + FAST)
    with pytest.raises(ValueError, match=r"^model.tokenizer: unknown value 'bpe'; allowed values: auto, chars$"):
        load_config(None, ['model.tokenizer="bpe"'])


def test_config_show_lists_model_tokenizer_with_its_values():
    lines = {line.split(" = ")[0]: line for line in annotated_toml(TrainConfig().validate()).splitlines()}
    assert lines["tokenizer"] == 'tokenizer = "auto"  # allowed values: auto, chars'


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    path = _weights_only(tmp_path / "weights")
    tok = char_tokenizer()
    tok.add_tokens([f"<x{i}>" for i in range(3)])
    tok.save_pretrained(path)
    with pytest.raises(ValueError, match=r"^model.path: .*the tokenizer has 87 tokens but the model's embedding "
                                         r"only 84 rows$"):
        load_model(path=path)


# --------------------------------------------------------------------------- the character tokenizer


def test_char_tokenizer_ids_are_the_earlier_ones_on_any_text():
    """Fixed-seed runs depend on these ids: the byte-level form encodes and decodes every text as the
    earlier WordLevel form did, characters outside the alphabet (one ``<unk>`` each) included."""
    ours, earlier = char_tokenizer(), _legacy_char_tokenizer()
    assert ours.get_vocab().keys() != earlier.get_vocab().keys()  # ' ' is stored as the byte-level 'Ġ'
    rng = random.Random(0)
    pool = CHARS + "\n\t_\"é€😀\x00ÿ<>eos"
    for _ in range(500):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 24)))
        ids = ours(text, add_special_tokens=False).input_ids
        assert ids == earlier(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == earlier.decode(ids), text
    with pytest.raises(ValueError, match="single-byte"):
        char_tokenizer(CHARS + "é")


def test_a_character_tokenizer_saved_in_the_earlier_form_loads_in_the_new_one(tmp_path):
    legacy = _legacy_char_tokenizer()
    legacy.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    legacy.save_pretrained(tmp_path)
    _weights_only(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.get_vocab() == char_tokenizer().get_vocab() and tok.chat_template == legacy.chat_template
    tok.save_pretrained(tmp_path / "again")
    (tmp_path / "again" / "config.json").write_text((tmp_path / "config.json").read_text())
    text = "12 + 34 = 46"
    assert AutoTokenizer.from_pretrained(tmp_path / "again")(text).input_ids == tok(text).input_ids


# --------------------------------------------------------------------------- exports


@pytest.mark.parametrize("task", ["addition", "jsonl"])
def test_final_tokenizer_reloads_through_autotokenizer_encoding_as_the_trainer_did(tmp_path, task):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TEXT_ROWS))
    overrides = ['model.preset="tiny"', f'task.name="{task}"', f'task.path="{data}"'] + FAST
    run = train(None, tmp_path / "run", overrides=overrides)
    cfg = load_config(None, overrides)
    _, trainer_tok = build_policy(cfg, torch.device("cpu"))
    prompts = make_task_from(cfg).sample(np.random.default_rng(0), 8)[0]
    texts = format_prompts(trainer_tok, prompts, chat=False)
    reloaded = AutoTokenizer.from_pretrained(run / "final")
    for text in texts:
        ids = trainer_tok(text, add_special_tokens=False).input_ids
        assert reloaded(text, add_special_tokens=False).input_ids == ids, text
        assert reloaded.decode(ids, skip_special_tokens=True) == text.removeprefix("<bos>")
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (
        trainer_tok.bos_token_id, trainer_tok.eos_token_id, trainer_tok.pad_token_id)


def test_final_keeps_the_checkpoint_dtype_and_no_machine_local_flags(tmp_path):
    """A bf16 checkpoint trains in float32 and is saved back as bf16, by the run and by ``sspo export``."""
    from sspo_analysis.cli import main

    path = _weights_only(tmp_path / "weights", dtype=torch.bfloat16)
    char_tokenizer().save_pretrained(path)
    run = train(None, tmp_path / "run", overrides=[f'model.path="{path}"'] + FAST)
    trained = torch.load(run / "checkpoint" / "state.pt", weights_only=False)["model"]
    for _ in range(2):  # the run's own final, then sspo export's
        assert json.loads((run / "final" / "config.json").read_text())["dtype"] == "bfloat16"
        for name in ("config.json", "tokenizer_config.json"):
            assert not set(LOCAL_FLAGS) & set(json.loads((run / "final" / name).read_text())), name
        model = AutoModelForCausalLM.from_pretrained(run / "final", dtype="auto")
        assert model.dtype == torch.bfloat16
        loaded = model.state_dict()
        for key, value in trained.items():
            assert value.dtype == torch.float32
            torch.testing.assert_close(loaded[key], value.to(torch.bfloat16), rtol=0, atol=0)
        assert main(["export", str(run)]) == 0


# --------------------------------------------------------------------------- greedy decoding


@pytest.mark.parametrize("forward", ["transformers", "exact", "fast"])
def test_temperature_zero_is_transformers_greedy_generate(forward, monkeypatch):
    monkeypatch.setattr(lean, "ONEDNN_MIN_MACS", 0)  # the fast kernels on every product of the tiny model
    torch.manual_seed(0)
    model, tok = load_model("tiny", seed=0)
    model.eval()
    enc = tok(["<bos>12+34=", "<bos>7+5=", "<bos>Reverse: 'ab c'"], padding=True, add_special_tokens=False,
              return_tensors="pt")
    tokens, logp, mask, entropy = generate(model, enc.input_ids, enc.attention_mask, Sampling(10, temperature=0.0),
                                           eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, forward=forward)
    with torch.no_grad():
        expected = model.generate(enc.input_ids, attention_mask=enc.attention_mask, do_sample=False,
                                  max_new_tokens=10, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    expected = expected[:, enc.input_ids.shape[1]:]
    assert tokens.shape[1] == expected.shape[1] and torch.equal(tokens, expected)
    assert mask.any(-1).all() and (tokens[mask] != tok.pad_token_id).all()  # no empty completions
    assert (logp == 0).all() and (entropy == 0).all()  # a point mass
