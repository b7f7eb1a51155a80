"""Models, the character tokenizer, and the two numerical kernels of the trainer.

- :func:`char_tokenizer`: a character-level ``PreTrainedTokenizerFast`` built in
  code from a ``tokenizers`` WordLevel model (nothing downloaded), so the same
  code path serves real tokenizers.
- :data:`PRESETS` and :func:`load_model`: named tiny configs built with
  ``from_config``, or any local checkpoint through ``from_pretrained``.
- :func:`token_logprobs`: the sampled tokens' log-probabilities and the exact
  per-token entropy, computed chunk by chunk from the last hidden state so that
  full-vocabulary float32 logits never exist for the whole batch.
- :func:`generate`: a batched sampler with a KV cache (temperature, top-p) that
  records the behaviour log-probs while sampling.
"""

from __future__ import annotations

import contextlib
import inspect
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sspo_analysis.primitives import entropy_from_logits
from sspo_analysis.training import lean

Tensor = torch.Tensor

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = string.digits + "+-*/=()<>.,:;?!#' " + string.ascii_lowercase + string.ascii_uppercase

PRESETS: dict[str, dict[str, Any]] = {
    # Qwen2 architecture, 1.0M parameters with the character vocabulary (84 tokens).
    "tiny": dict(model_type="qwen2", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=512, tie_word_embeddings=True,
                 max_position_embeddings=512, rope_theta=10000.0),
    # A still smaller one for smoke tests.
    "micro": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=256, tie_word_embeddings=True,
                  max_position_embeddings=512, rope_theta=10000.0),
}


def char_tokenizer(chars: str = CHARS):
    """A character-level ``PreTrainedTokenizerFast``: one token per character, ``<bos>``/``<eos>``/``<pad>``."""
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


def load_tokenizer(path: str | Path):
    """The tokenizer saved in the directory ``path``; the character tokenizer when it holds none.

    A tokenizer saved as a plain ``tokenizers`` backend (the character tokenizer)
    is loaded as such: ``AutoTokenizer`` would pick the model type's tokenizer
    class (``Qwen2Tokenizer`` for the tiny presets), whose pre-tokenizer drops spaces.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer path: {str(path)!r} is not a local directory (nothing is downloaded)")
    config = path / "tokenizer_config.json"
    if not config.exists() and not (path / "tokenizer.json").exists():
        return char_tokenizer()
    saved_class = json.loads(config.read_text()).get("tokenizer_class", "") if config.exists() else ""
    if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@contextlib.contextmanager
def quiet_transformers_bars() -> Iterator[None]:
    """transformers' own progress bars off inside the block, as they were after it: the package's loading and
    saving calls are steps of its own progress display, and a tqdm bar beside it (stuck at 0% in a saved
    notebook) only adds noise."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(preset: str = "tiny", path: str | Path | None = None, *, seed: int = 0, tokenizer=None,
               dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)``.

    ``path`` (a local directory) wins: ``AutoModelForCausalLM.from_pretrained``
    and its tokenizer (the character tokenizer when the directory has none).
    Otherwise the named preset, randomly initialised with ``seed``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if path:
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"model.path: {str(path)!r} is not a local directory (nothing is downloaded)")
        with quiet_transformers_bars():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        if tokenizer is None:
            tokenizer = load_tokenizer(path)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    if preset not in PRESETS:
        raise ValueError(f"model.preset: unknown value {preset!r}; allowed values: {', '.join(PRESETS)}")
    tokenizer = tokenizer or char_tokenizer()
    cfg = dict(PRESETS[preset])
    config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tokenizer


# --------------------------------------------------------------------------- log-probs and entropy

FORWARDS = ("fast", "exact", "transformers")
"""How :func:`sequence_logprobs` and :func:`generate` run the model: ``"fast"`` and ``"exact"`` take the
:mod:`.lean` forward where the model allows it (with oneDNN projections on CPU, or torch's own kernels,
bitwise the transformers values), ``"transformers"`` always the transformers forward."""


def _decoder(model, forward: str) -> lean.LeanDecoder | None:
    if forward not in FORWARDS:
        raise ValueError(f"forward: unknown value {forward!r}; allowed values: {', '.join(FORWARDS)}")
    return None if forward == "transformers" else lean.decoder(model, fast=forward == "fast")


def _chunk_logprob_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                           temperature: float) -> tuple[Tensor, Tensor]:
    logits = F.linear(h, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    probs = torch.softmax(logits, dim=-1)
    # H = logZ - E_pi[logit]: the same entropy as primitives.entropy_from_logits, reusing logZ so the
    # chunk's (n, V) logits pass through one softmax instead of a second log-softmax
    entropy = logz - (probs * logits).sum(-1)
    return logp, entropy


def token_logprobs(hidden: Tensor, lm_head: torch.nn.Module, targets: Tensor, mask: Tensor, *,
                   temperature: float = 1.0, chunk_tokens: int = 2048) -> tuple[Tensor, Tensor]:
    """Log-prob of each target token and the exact entropy of each position, (B, T) float32 each.

    ``hidden`` (B, T, H) are the final hidden states at the positions that
    predict ``targets`` (B, T). Only unmasked positions are projected, ``chunk_tokens``
    at a time; with gradients on, each chunk is recomputed in the backward pass
    (activation checkpointing), so neither pass holds the full-vocabulary logits.
    Masked positions get 0.
    """
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
    y = targets.reshape(-1).index_select(0, idx)
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    logps, ents = [], []
    many = h.shape[0] > chunk_tokens
    for s in range(0, h.shape[0], chunk_tokens):
        args = (h[s:s + chunk_tokens], weight, bias, y[s:s + chunk_tokens], temperature)
        if many and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            lp, en = checkpoint(_chunk_logprob_entropy, *args, use_reentrant=False)
        else:
            lp, en = _chunk_logprob_entropy(*args)
        logps.append(lp)
        ents.append(en)
    flat_lp = hidden.new_zeros(mask.numel(), dtype=torch.float32)
    flat_en = hidden.new_zeros(mask.numel(), dtype=torch.float32)
    if idx.numel():
        flat_lp = flat_lp.index_copy(0, idx, torch.cat(logps))
        flat_en = flat_en.index_copy(0, idx, torch.cat(ents))
    return flat_lp.view(mask.shape), flat_en.view(mask.shape)


def sequence_logprobs(model, input_ids: Tensor, attention_mask: Tensor, n_prompt: int, completion_mask: Tensor, *,
                      temperature: float = 1.0, chunk_tokens: int = 2048, forward: str = "fast"
                      ) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies (B, T_c) of the completion ``input_ids[:, n_prompt:]`` under ``model``.

    Runs the base model once and projects only completion positions (see
    :func:`token_logprobs`); rows that share a prompt (a rollout group) run it once
    (:func:`_completion_hidden`). Assumes ``logits = lm_head(last_hidden_state)``
    (true for Qwen2, Llama, Mistral and most causal LMs; not for models with
    logit soft-capping). ``forward``: see :data:`FORWARDS`.
    """
    if bool(attention_mask[:, :n_prompt].all()):
        # no left padding: the right padding after <eos> is never attended under the causal mask,
        # so the plain causal path (no mask tensor) gives the same values, faster
        attention_mask, position_ids = None, None
    else:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    decoder = _decoder(model, forward)
    if decoder is not None:
        hidden = _lean_completion_hidden(decoder, input_ids, attention_mask, position_ids, n_prompt)
    else:
        hidden = _completion_hidden(model, input_ids, attention_mask, position_ids, n_prompt)
    if hidden is None:
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False)
        hidden = out.last_hidden_state[:, n_prompt - 1:-1]
    return token_logprobs(hidden, model.get_output_embeddings(), input_ids[:, n_prompt:], completion_mask,
                          temperature=temperature, chunk_tokens=chunk_tokens)


def _prompt_groups(model, input_ids: Tensor, attention_mask: Tensor | None, n_prompt: int
                   ) -> tuple[Tensor, Tensor] | None:
    """``(a row of each distinct prompt, each row's prompt index)``, or None when sharing does not apply."""
    if input_ids.shape[1] - n_prompt < 2 or any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return None
    prompts = input_ids[:, :n_prompt]
    if attention_mask is not None:
        prompts = torch.cat([prompts, attention_mask[:, :n_prompt]], 1)
    unique, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    if unique.shape[0] == input_ids.shape[0]:
        return None
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return torch.zeros_like(rows[:unique.shape[0]]).scatter_(0, inverse, rows), inverse


def _completion_hidden(model, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                       n_prompt: int) -> Tensor | None:
    """Final hidden states (B, T_c, H) at the positions that predict the completion, each distinct prompt run once.

    The prompts run as a batch of distinct rows with a KV cache; each row's cache is
    selected (differentiably) for the completions that follow it. The same values as
    one full forward up to float rounding (attention over a cache instead of one square
    causal block; gradients of a shared prompt summed once). None when no two rows share
    a prompt, or under gradient checkpointing (recomputing a layer would grow the cache twice).
    """
    groups = _prompt_groups(model, input_ids, attention_mask, n_prompt)
    if groups is None:
        return None
    first, inverse = groups
    prompt_mask = None if attention_mask is None else attention_mask[first, :n_prompt]
    prompt_pos = None if position_ids is None else position_ids[first, :n_prompt]
    out = model.base_model(input_ids=input_ids[first, :n_prompt], attention_mask=prompt_mask,
                           position_ids=prompt_pos, use_cache=True)
    cache = _cache_of(out)
    cache.batch_select_indices(inverse)
    completion_pos = (torch.arange(n_prompt, input_ids.shape[1], device=input_ids.device)[None]
                      if position_ids is None else position_ids[:, n_prompt:])
    rest = model.base_model(input_ids=input_ids[:, n_prompt:-1], attention_mask=None if attention_mask is None
                            else attention_mask[:, :-1], position_ids=completion_pos[:, :-1], use_cache=True,
                            **{_cache_arg(model.base_model): cache})
    return torch.cat([out.last_hidden_state[inverse, -1:], rest.last_hidden_state], 1)


def _lean_completion_hidden(decoder: lean.LeanDecoder, input_ids: Tensor, attention_mask: Tensor | None,
                            position_ids: Tensor | None, n_prompt: int) -> Tensor:
    """:func:`_completion_hidden` on the lean path: each distinct prompt run once, its keys and values shared."""
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    groups = _prompt_groups(decoder.model, input_ids, attention_mask, n_prompt)
    if groups is None:
        return decoder.hidden(input_ids[:, :-1], position_ids[:, :-1],
                              None if attention_mask is None else attention_mask[:, :-1])[:, n_prompt - 1:]
    first, inverse = groups
    prompt_pos = position_ids[:, :n_prompt] if position_ids.shape[0] == 1 else position_ids[first, :n_prompt]
    keep: list = []
    prompt = decoder.hidden(input_ids[first, :n_prompt], prompt_pos,
                            None if attention_mask is None else attention_mask[first, :n_prompt], keep=keep)
    rest = decoder.hidden(input_ids[:, n_prompt:-1], position_ids[:, n_prompt:-1],
                          None if attention_mask is None else attention_mask[:, :-1], kv=lean.prefix(keep, inverse))
    return torch.cat([prompt[inverse, -1:], rest], 1)


# --------------------------------------------------------------------------- sampling


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix with mass >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _cache_of(out):
    """The KV cache of a model output (``cache`` in transformers >= 5.24, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_arg(model) -> str:
    """The forward argument that takes a KV cache (``cache`` in transformers >= 5.24, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class Sampling:
    """How :func:`generate` samples: at most ``max_new_tokens``, softmax temperature (0: greedy), top-p."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


def _shared_prompts(prompt_ids: Tensor, attn: Tensor | None, pos: Tensor) -> int:
    """The group size when the rows come in equal runs of identical prompts (a rollout), else 1."""
    rows = torch.cat([prompt_ids, pos] + ([attn] if attn is not None else []), 1)
    _, counts = torch.unique_consecutive(rows, dim=0, return_counts=True)
    group = int(counts[0])
    return group if group > 1 and bool((counts == group).all()) else 1


class _Steps:
    """Next-token logits of a batch, one token at a time, through the transformers forward and its cache.

    The prompts' prefill computes each run of identical rows once and repeats the cache and
    logits: the same computation on ``1 / group_size`` of the rows (a row's result does not
    depend on the batch around it).
    """

    def __init__(self, model, prompt_ids: Tensor, attn: Tensor | None, pos: Tensor):
        self.model, self.cache_arg = model, _cache_arg(model)
        group = _shared_prompts(prompt_ids, attn, pos)
        first = slice(None, None, group)
        out = model(input_ids=prompt_ids[first], attention_mask=None if attn is None else attn[first],
                    position_ids=pos[first], use_cache=True, logits_to_keep=1)
        self.past, self.logits = _cache_of(out), out.logits[:, -1]
        if group > 1:
            self.past.batch_repeat_interleave(group)
            self.logits = self.logits.repeat_interleave(group, 0)

    def next(self, tok: Tensor, pos: Tensor, attn: Tensor | None) -> Tensor:
        out = self.model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos, use_cache=True,
                         **{self.cache_arg: self.past})
        self.past = _cache_of(out)
        return out.logits[:, -1]


class _LeanSteps:
    """:class:`_Steps` on the lean path (:mod:`.lean`): a preallocated cache written in place, and the rotary
    angles of every position to sample computed in one call."""

    def __init__(self, decoder: lean.LeanDecoder, prompt_ids: Tensor, attn: Tensor | None, pos: Tensor,
                 max_new_tokens: int):
        self.decoder, self.head = decoder, decoder.model.get_output_embeddings()
        decoder.freeze()  # no update or gradient until the last token is drawn
        group = _shared_prompts(prompt_ids, attn, pos)
        first = slice(None, None, group)
        keep: list = []
        hidden = self.decoder.hidden(prompt_ids[first], pos[first], None if attn is None else attn[first], keep=keep)
        self.kv = self.decoder.cache(prompt_ids.shape[0], prompt_ids.shape[1] + max_new_tokens, hidden)
        self.kv.fill(keep, group)
        # the head on (B, 1, H), as transformers' logits_to_keep=1: a 2-D slice can round differently
        self.logits = self.head(hidden[:, -1:])[:, -1].repeat_interleave(group, 0)
        ahead = pos[:, -1:] + torch.arange(1, max_new_tokens + 1, device=pos.device)
        self.rope, self.t = self.decoder.rope(hidden, ahead), 0

    def next(self, tok: Tensor, pos: Tensor, attn: Tensor | None) -> Tensor:
        rope = tuple(r[:, :, self.t:self.t + 1] for r in self.rope)  # the angles of ``pos``
        self.t += 1
        return self.head(self.decoder.hidden(tok[:, None], pos, attn, kv=self.kv, rope=rope))[:, -1]


@torch.no_grad()
def generate(model, prompt_ids: Tensor, prompt_mask: Tensor, sampling: Sampling, *, eos_id: int | list[int],
             pad_id: int, generator: torch.Generator | None = None, forward: str = "fast"
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sample completions for left-padded prompts with a KV cache.

    Returns ``(tokens, log_probs, mask, entropy)``, each (B, T<=max_new_tokens): the
    sampled tokens (``pad_id`` after ``<eos>``), the behaviour log-probs
    ``log softmax(logits / temperature)`` of the sampled tokens (top-p is a
    sampling filter and is not in the recorded log-prob, as in TRL and verl),
    the completion mask (tokens up to and including ``<eos>``; ``eos_id`` may be a list),
    and the exact entropy of ``softmax(logits / temperature)`` at each position, 0 after ``<eos>``.
    ``forward``: see :data:`FORWARDS` (the lean ones decode with a preallocated cache).
    """
    max_new_tokens, temperature, top_p = sampling.max_new_tokens, sampling.temperature, sampling.top_p
    B = prompt_ids.shape[0]
    eos = torch.as_tensor(eos_id, device=prompt_ids.device).reshape(-1)
    attn = prompt_mask.long()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    padded = not bool(attn.all())  # without left padding the causal path needs no mask tensor
    decoder = _decoder(model, forward)
    steps = (_Steps(model, prompt_ids, attn if padded else None, pos) if decoder is None
             else _LeanSteps(decoder, prompt_ids, attn if padded else None, pos, max_new_tokens))
    logits = steps.logits
    pos = pos[:, -1:]
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    toks, logps, masks, ents = [], [], [], []
    for t in range(max_new_tokens):
        logits = logits.float()
        if temperature != 1.0:
            logits = logits / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            probs = (_top_p_filter(logits, top_p) if top_p < 1.0 else logits).softmax(-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        masks.append(~done)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        toks.append(tok)
        logps.append(torch.where(done, 0.0, logp_all.gather(-1, tok[:, None]).squeeze(-1)))
        ents.append(torch.where(done, 0.0, entropy_from_logits(logits)))
        done = done | torch.isin(tok, eos)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, attn.new_ones(B, 1)], dim=1) if padded else None
        pos = pos + 1
        logits = steps.next(tok, pos, attn)
    return torch.stack(toks, 1), torch.stack(logps, 1), torch.stack(masks, 1), torch.stack(ents, 1)
