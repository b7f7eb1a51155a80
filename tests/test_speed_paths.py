"""The real-checkpoint path on CPU: a Qwen2.5-architecture checkpoint saved with ``save_pretrained``,
loaded through ``model.path`` with its chat template, a JSONL task graded by number, gradient
checkpointing, token-budget accumulation and bf16 autocast; and the GPU benchmark at tiny size."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sspo_analysis.training import load_config, read_metrics, train
from sspo_analysis.training.models import Sampling, char_tokenizer, generate, load_model, sequence_logprobs
from sspo_analysis.training.rollout import rollout
from sspo_analysis.training.trainer import _setup
from sspo_analysis.training.update import _micro_loss, minibatch_update

ROOT = Path(__file__).resolve().parents[1]

# A chat template in the Qwen2.5 style (a system turn, then user/assistant turns) over the character vocabulary.
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")

# Qwen2.5's architecture (attention biases on q/k/v, grouped KV heads, tied embeddings, rope 1e6) at tiny size.
QWEN25_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, tie_word_embeddings=True, max_position_embeddings=256,
                   rope_theta=1_000_000.0, rms_norm_eps=1e-6)

# bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2% per operation); through two layers and a
# softmax the loss stays within 1% and the gradient within 3% (relative L2) of float32 (measured: 0.3%).
BF16_LOSS_RTOL, BF16_GRAD_RTOL = 0.01, 0.03


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """``(model directory, task JSONL)``: a saved tiny Qwen2.5 checkpoint with a chat-template tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("ckpt")
    tok = char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    config = AutoConfig.for_model("qwen2", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **QWEN25_TINY)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    task = root / "sums.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"What is {a}+{b}?", "answer": f"#### {a + b}"}) + "\n"
                            for a in range(3) for b in range(3)))
    return root / "model", task


def _overrides(model_dir: Path, task: Path, precision: str, budget: int) -> list[str]:
    return [f'model.path="{model_dir}"', 'task.name="jsonl"', f'task.path="{task}"', 'task.grader="number"',
            "task.chat_template=true", "model.gradient_checkpointing=true", f"optim.token_budget={budget}",
            f'model.precision="{precision}"', 'device="cpu"', "rollout.prompts=4", "rollout.group_size=4",
            "rollout.max_new_tokens=12", "algo.updates_per_batch=1", "optim.grad_clip=1e9", "log.progress=false",
            "threads=1", "steps=2", "log.checkpoint_every=2"]


def test_real_checkpoint_path_trains_end_to_end_in_bf16(checkpoint, tmp_path):
    model_dir, task = checkpoint
    run = train(None, tmp_path / "run", overrides=_overrides(model_dir, task, "bf16", 96))
    df = read_metrics(run)
    assert list(df.step) == [1, 2]
    assert df[["loss", "entropy", "grad_norm", "kl_old_k3"]].map(math.isfinite).all().all()
    assert (df.skipped_updates == 0).all()


def _gradients(state, roll, rows) -> list[torch.Tensor]:
    """The minibatch's accumulated gradient, the parameters left as they were (the update is undone)."""
    saved = {k: v.clone() for k, v in state.policy.state_dict().items()}
    minibatch_update(state, roll, rows)
    grads = [p.grad.detach().clone() for p in state.policy.parameters()]
    state.policy.load_state_dict(saved)
    return grads


def _relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    diff = math.sqrt(sum(float((x - y).double().pow(2).sum()) for x, y in zip(a, b)))
    return diff / math.sqrt(sum(float(y.double().pow(2).sum()) for y in b))


def test_bf16_matches_fp32_and_accumulation_matches_one_batch(checkpoint, tmp_path):
    model_dir, task = checkpoint
    cfg = load_config(None, _overrides(model_dir, task, "fp32", 0))
    state = _setup(cfg, tmp_path / "run", show=False)
    state.policy.train()  # gradient checkpointing is active in training mode only
    roll = rollout(state)
    # a random model earns no reward, so every advantage is 0 and so is the gradient: give it advantages
    roll.advantages = torch.randn(roll.size, generator=torch.Generator().manual_seed(1))
    rows = torch.arange(roll.size)
    assert roll.mask.sum() > 2 * roll.size  # the completions are long enough to test something

    def with_config(precision: str, budget: int) -> None:
        state.cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, precision=precision),
                                        optim=dataclasses.replace(cfg.optim, token_budget=budget))

    with_config("fp32", 0)
    one_batch = _gradients(state, roll, rows)
    loss32 = float(_micro_loss(state, roll, rows)[0].detach())
    with_config("fp32", 2 * roll.ids.shape[1])  # micro-batches of two rows: eight of them
    accumulated = _gradients(state, roll, rows)
    assert _relative_error(accumulated, one_batch) < 1e-5  # float32 summation order only
    with_config("bf16", 2 * roll.ids.shape[1])
    bf16 = _gradients(state, roll, rows)
    loss16 = float(_micro_loss(state, roll, rows)[0].detach())
    assert abs(loss16 - loss32) <= BF16_LOSS_RTOL * abs(loss32) + 1e-6
    assert 0 < _relative_error(bf16, one_batch) < BF16_GRAD_RTOL  # > 0: bf16 really ran


def test_gpu_benchmark_runs_at_tiny_size_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--tiny",
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("machine: ") and "roofline: float32" in out.stdout
    assert all(f"{name:5s} utilisation " in out.stdout for name in ("sspo", "trl"))
    result = json.loads((tmp_path / "r.json").read_text())
    for trainer in ("sspo", "trl"):
        r = result[trainer]
        assert r["completion_tokens_per_s"] > 0 and r["generation_s"] > 0 and r["training_s"] > 0
        assert r["step_s"] >= r["generation_s"]


@pytest.mark.parametrize("prompts", [["<bos>1+2=", "<bos>13+4="], ["<bos>11+2=", "<bos>13+4="]])
def test_grouped_prompts_are_prefilled_once_with_the_same_result(prompts):
    """Repeated prompts run once in the prefill; the behaviour log-probs still match a plain full forward."""
    model, tok = load_model("micro", seed=0)
    enc = tok(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
    ids, attn = enc.input_ids.repeat_interleave(4, 0), enc.attention_mask.repeat_interleave(4, 0)
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: batch_sizes.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    tokens, logp, mask, entropy = generate(model, ids, attn, Sampling(max_new_tokens=6), eos_id=tok.eos_token_id,
                                           pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert batch_sizes[0] == 2 and set(batch_sizes[1:]) == {8}  # one prefill row per group, then every row
    assert len({tuple(t) for t in tokens.tolist()}) > 2  # the rows of a group sample independently
    with torch.no_grad():
        lp_full, ent_full = sequence_logprobs(model, torch.cat([ids, tokens], 1),
                                              torch.cat([attn, mask.long()], 1), ids.shape[1], mask)
    assert torch.allclose(logp[mask], lp_full[mask], atol=1e-5)
    assert torch.allclose(entropy[mask], ent_full[mask], atol=1e-5)


@pytest.mark.parametrize("prompts", [["<bos>1+2=", "<bos>13+4="], ["<bos>11+2=", "<bos>13+4=", "<bos>5+5="]])
def test_shared_prompt_training_forward_matches_a_full_forward(prompts):
    """Rows sharing a prompt (shuffled, left-padded, right-padded after <eos>) run the prompt once; the
    log-probs, entropies and parameter gradients equal a plain full forward's up to float rounding."""
    model, tok = load_model("micro", seed=0)
    model.train()
    enc = tok(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
    order = torch.randperm(3 * len(prompts), generator=torch.Generator().manual_seed(0))
    ids, attn = enc.input_ids.repeat_interleave(3, 0)[order], enc.attention_mask.repeat_interleave(3, 0)[order]
    completion = torch.randint(4, len(tok), (ids.shape[0], 5), generator=torch.Generator().manual_seed(1))
    lengths = torch.arange(ids.shape[0]) % 5 + 1
    mask = torch.arange(5)[None] < lengths[:, None]
    full_ids = torch.cat([ids, torch.where(mask, completion, tok.pad_token_id)], 1)
    full_attn = torch.cat([attn, mask.long()], 1)
    n = ids.shape[1]
    calls = []
    hook = model.base_model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    lp, ent = sequence_logprobs(model, full_ids, full_attn, n, mask)
    hook.remove()
    assert calls[0] == (len(prompts), n)  # each distinct prompt ran once
    grads = torch.autograd.grad(lp.sum() + ent.sum(), list(model.parameters()))
    # the oracle: one plain forward of every row through the full model, log-softmax of its logits
    logits = model(input_ids=full_ids, attention_mask=full_attn,
                   position_ids=(full_attn.cumsum(-1) - 1).clamp(min=0)).logits[:, n - 1:-1].float()
    logp_all = torch.log_softmax(logits, -1)
    lp_ref = torch.where(mask, logp_all.gather(-1, full_ids[:, n:, None]).squeeze(-1), 0.0)
    ent_ref = torch.where(mask, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    grads_ref = torch.autograd.grad(lp_ref.sum() + ent_ref.sum(), list(model.parameters()))
    assert torch.allclose(lp, lp_ref, atol=1e-5) and torch.allclose(ent, ent_ref, atol=1e-5)
    assert _relative_error(list(grads), list(grads_ref)) < 1e-5
