"""Stage 1 of a step: sample completions from the behaviour policy, grade them, form advantages."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sspo_analysis.primitives import group_advantages
from sspo_analysis.training.heldout import training_prompts
from sspo_analysis.training.models import Sampling, generate, sequence_logprobs
from sspo_analysis.training.state import RunState

Tensor = torch.Tensor


def format_prompts(tokenizer, prompts: list, chat: bool) -> list[str]:
    """Prompts as model input text: the chat template (``chat``, and always for a prompt given as a list of
    chat messages), or the BOS token (if any) then the prompt."""
    return [tokenizer.apply_chat_template(p if isinstance(p, list) else [{"role": "user", "content": p}],
                                          add_generation_prompt=True, tokenize=False)
            if chat or isinstance(p, list) else (tokenizer.bos_token or "") + p for p in prompts]


def eos_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the tokenizer's ``<eos>`` and the model's generation config's."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@dataclass
class Rollout:
    """One step's batch of ``B = prompts x group_size`` sampled completions (rows grouped by prompt)."""

    ids: Tensor  # (B, n_prompt + T): left-padded prompt, then the completion
    attn: Tensor  # (B, n_prompt + T) attention mask
    n_prompt: int
    mask: Tensor  # (B, T) completion tokens up to and including <eos>
    old_logp: Tensor  # (B, T) behaviour-policy log-probs of the sampled tokens
    old_entropy: Tensor  # (B, T) behaviour-policy entropy at each position
    rewards: Tensor  # (B,)
    advantages: Tensor  # (B,) group-normalised
    ref_logp: Tensor | None  # (B, T) reference-policy log-probs, when there is a reference
    group_size: int
    generation_time: float
    prompts: list[str] = field(default_factory=list)  # (B,) the task's prompt of each row, before any template
    answers: list[str] = field(default_factory=list)  # (B,) its reference answer
    completions: list[str] = field(default_factory=list)  # (B,) the decoded completion that was graded

    @property
    def size(self) -> int:
        return self.ids.shape[0]

    @property
    def n_tokens(self) -> float:
        """Completion tokens in the batch (at least 1): the divisor of per-token step metrics."""
        return float(self.mask.sum().clamp(min=1))


def logprobs(state: RunState, model, roll: Rollout, rows: Tensor | slice = slice(None)) -> tuple[Tensor, Tensor]:
    """``(log-probs, entropies)`` (b, T) of ``roll``'s completions ``rows`` under ``model``."""
    r = state.cfg.rollout
    return sequence_logprobs(model, roll.ids[rows], roll.attn[rows], roll.n_prompt, roll.mask[rows],
                             temperature=r.temperature, chunk_tokens=state.cfg.optim.logprob_chunk,
                             forward=state.cfg.model.forward)


def _sample(state: RunState, prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, ...]:
    """``(tokens, log-probs, mask, entropy)`` from the behaviour policy (``snapshots[0]`` under staleness)."""
    r, sampler = state.cfg.rollout, state.sampler
    if state.cfg.algo.staleness:
        sampler.load_state_dict(state.snapshots[0])
    was_training = sampler.training
    sampler.eval()
    with state.autocast():
        out = generate(sampler, prompt_ids, prompt_mask, Sampling(r.max_new_tokens, r.temperature, r.top_p),
                       eos_id=state.eos_ids, pad_id=state.tok.pad_token_id, generator=state.gen,
                       forward=state.cfg.model.forward)
    sampler.train(was_training)
    return out


def rollout(state: RunState) -> Rollout:
    """Draw ``rollout.prompts`` prompts, sample ``group_size`` completions each, grade them, form advantages."""
    cfg, tok, device = state.cfg, state.tok, state.device
    r = cfg.rollout
    t0 = time.time()
    excluded = state.heldout.excluded if state.heldout is not None else frozenset()
    prompts, answers = training_prompts(state.task, state.np_rng, r.prompts, excluded)
    enc = tok(format_prompts(tok, prompts, cfg.task.chat_template), padding=True, add_special_tokens=False,
              return_tensors="pt")
    prompt_ids = enc.input_ids.repeat_interleave(r.group_size, 0).to(device)
    prompt_mask = enc.attention_mask.repeat_interleave(r.group_size, 0).to(device)
    tokens, old_logp, mask, old_entropy = _sample(state, prompt_ids, prompt_mask)
    generation_time = time.time() - t0
    completions = tok.batch_decode(tokens.cpu(), skip_special_tokens=True)
    answers = [ans for ans in answers for _ in range(r.group_size)]
    rewards = torch.tensor(state.task.rewards(completions, answers), dtype=torch.float32)
    adv = group_advantages(rewards.view(r.prompts, r.group_size), scale=cfg.algo.advantage == "grpo")
    roll = Rollout(ids=torch.cat([prompt_ids, tokens], 1), attn=torch.cat([prompt_mask, mask.long()], 1),
                   n_prompt=prompt_ids.shape[1], mask=mask, old_logp=old_logp, old_entropy=old_entropy,
                   rewards=rewards, advantages=adv.reshape(-1).to(device), ref_logp=None,
                   group_size=r.group_size, generation_time=generation_time,
                   prompts=[p for p in prompts for _ in range(r.group_size)], answers=answers, completions=completions)
    if state.reference is not None:
        with torch.no_grad(), state.autocast():
            roll.ref_logp, _ = logprobs(state, state.reference, roll)
    return roll
