"""Models, the character tokenizer, and the two numerical kernels of the trainer.

- :func:`char_tokenizer`: a character-level ``PreTrainedTokenizerFast`` built in
  code from a ``tokenizers`` byte-level BPE without merges (nothing downloaded), so the
  same code path serves real tokenizers.
- :data:`PRESETS` and :func:`load_model`: named tiny configs built with
  ``from_config``, or any local checkpoint through ``from_pretrained`` with its own tokenizer
  (refused when it has none, unless the character tokenizer is asked for).
- :func:`save_pretrained`: a checkpoint that reloads as it was trained (the tokenizer's
  encodings, the original dtype) on any machine.
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

from sspo_analysis.failure import NonFiniteError
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


TOKENIZERS = ("auto", "chars")
"""Values of ``model.tokenizer``: ``"auto"`` is the checkpoint's own tokenizer for ``model.path`` (an error when
its directory holds none) and the character tokenizer for a preset; ``"chars"`` is always the character tokenizer."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""The files ``AutoTokenizer`` builds a tokenizer from; a checkpoint directory with none of them has no tokenizer."""

LOCAL_FLAGS = ("local_files_only", "is_local")
"""Loading flags transformers records in a loaded tokenizer's config; meaningless on another machine."""


def char_tokenizer(chars: str = CHARS):
    """A character-level ``PreTrainedTokenizerFast``: one token per character, ``<bos>``/``<eos>``/``<pad>``.

    Spelled as a byte-level BPE without merges (the format of Qwen2's and GPT-2's own
    tokenizers), so that ``AutoTokenizer``, which loads a ``qwen2`` checkpoint's tokenizer
    as ``Qwen2Tokenizer`` whatever class it was saved as, encodes the alphabet the same way.
    Each character is its own pre-token, and a character outside ``chars`` is one ``<unk>``
    (``Qwen2Tokenizer`` drops it instead). ``chars``: single-byte (ASCII) characters.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wide = sorted({ch for ch in chars if len(ch.encode()) > 1})
    if wide:
        raise ValueError(f"char_tokenizer: characters must be single-byte (ASCII), got {''.join(wide[:5])!r}")
    byte_char = _byte_chars()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in chars:
        vocab.setdefault(byte_char[ord(ch)], len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False)


def _byte_chars() -> dict[int, str]:
    """The byte-level alphabet: the printable character that stands for each byte (``' '`` is ``'Ġ'``)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _legacy_chars(path: Path) -> str | None:
    """The alphabet of a character tokenizer saved in its earlier WordLevel form, else None.

    That form encodes as :func:`char_tokenizer` does (the same ids) but reloads through
    ``AutoTokenizer`` as a ``Qwen2Tokenizer`` that drops spaces, so it is rebuilt when loaded.
    """
    import json

    file = path / "tokenizer.json"
    spec = json.loads(file.read_text()) if file.exists() else {}
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "WordLevel" or pre.get("pattern") != {"Regex": "[\\s\\S]"}:
        return None
    ordered = sorted(model.get("vocab", {}).items(), key=lambda kv: kv[1])
    names = [name for name, _ in ordered]
    added = [token.get("content") for token in spec.get("added_tokens") or []]
    if names[:len(SPECIALS)] != list(SPECIALS) or [i for _, i in ordered] != list(range(len(ordered))) \
            or added != list(SPECIALS):
        return None
    chars = "".join(names[len(SPECIALS):])
    return chars if len(chars.encode()) == len(chars) == len(names) - len(SPECIALS) else None


def tokenizer_files(path: str | Path) -> list[str]:
    """The :data:`TOKENIZER_FILES` present in the directory ``path``."""
    return [name for name in TOKENIZER_FILES if (Path(path) / name).is_file()]


def check_has_tokenizer(path: str | Path, field: str = "model.path") -> None:
    """ValueError naming ``field`` and the files looked for when the directory ``path`` holds no tokenizer."""
    if Path(path).is_dir() and not tokenizer_files(path):
        raise ValueError(f"{field}: {str(path)!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                         "save the checkpoint's tokenizer there (tokenizer.save_pretrained), or set "
                         "model.tokenizer = \"chars\" to train it with the character tokenizer")


def load_tokenizer(path: str | Path, field: str = "tokenizer path"):
    """The tokenizer saved in the directory ``path``; ValueError naming ``field`` when it holds none.

    A tokenizer saved as a plain ``tokenizers`` backend (the character tokenizer)
    is loaded as such: ``AutoTokenizer`` would pick the model type's tokenizer
    class (``Qwen2Tokenizer`` for the tiny presets), which rebuilds its own pipeline.
    A character tokenizer saved in its earlier form is rebuilt (:func:`_legacy_chars`).
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{field}: {str(path)!r} is not a local directory (nothing is downloaded)")
    check_has_tokenizer(path, field)
    config = path / "tokenizer_config.json"
    saved_class = json.loads(config.read_text()).get("tokenizer_class", "") if config.exists() else ""
    try:
        if saved_class not in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        saved = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:  # files present but incomplete or of an unknown kind
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{field}: the tokenizer in {str(path)!r} cannot be loaded ({reason}); save it whole "
                         "there (tokenizer.save_pretrained), or set model.tokenizer = \"chars\"") from None
    legacy = _legacy_chars(path)
    if legacy is None:
        return saved
    tok = char_tokenizer(legacy)
    tok.chat_template = saved.chat_template
    return tok


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


def checkpoint_dtype(path: str | Path | None) -> torch.dtype:
    """The dtype the checkpoint directory ``path`` declares in its config.json (float32 for a preset: no path)."""
    if not path:
        return torch.float32
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    declared = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, declared) if isinstance(declared, str) else declared


def load_model(preset: str = "tiny", path: str | Path | None = None, *, seed: int = 0, tokenizer: Any = "auto",
               dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)``.

    ``path`` (a local directory) wins: ``AutoModelForCausalLM.from_pretrained`` and,
    with ``tokenizer = "auto"``, the tokenizer saved beside it (ValueError when there is none).
    Otherwise the named preset, randomly initialised with ``seed``, with the character tokenizer.
    ``tokenizer``: a :data:`TOKENIZERS` value (None: ``"auto"``), or a tokenizer object to use as it is.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = "auto" if tokenizer is None else tokenizer
    if isinstance(tokenizer, str) and tokenizer not in TOKENIZERS:
        raise ValueError(f"model.tokenizer: unknown value {tokenizer!r}; allowed values: {', '.join(TOKENIZERS)}")
    if path:
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"model.path: {str(path)!r} is not a local directory (nothing is downloaded)")
        if tokenizer == "auto":
            tokenizer = load_tokenizer(path, "model.path")
        elif tokenizer == "chars":
            tokenizer = char_tokenizer()
        with quiet_transformers_bars():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        _check_vocab(model, tokenizer, path)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    if preset not in PRESETS:
        raise ValueError(f"model.preset: unknown value {preset!r}; allowed values: {', '.join(PRESETS)}")
    tokenizer = char_tokenizer() if isinstance(tokenizer, str) else tokenizer
    cfg = dict(PRESETS[preset])
    config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tokenizer


def _check_vocab(model, tokenizer, path: Path) -> None:
    """ValueError when the tokenizer has ids the model's embedding has no row for."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"model.path: {str(path)!r}: the tokenizer has {len(tokenizer)} tokens but the model's "
                         f"embedding only {rows} rows")


def save_pretrained(model, tokenizer, out: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """``model`` and ``tokenizer`` with ``save_pretrained`` into ``out``, loadable on any machine as they are.

    The weights are written in ``dtype`` (the checkpoint's own, see :func:`checkpoint_dtype`; default:
    as they are held), and the configs carry none of the :data:`LOCAL_FLAGS`.
    """
    import json

    out = Path(out)
    weights = None
    if dtype is not None and dtype != model.dtype:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    held = model.config.dtype
    with quiet_transformers_bars():
        model.save_pretrained(out, state_dict=weights)
        tokenizer.save_pretrained(out)
    model.config.dtype = held  # save_pretrained records the held dtype in the live config
    for name, declared in (("config.json", dtype), ("tokenizer_config.json", None)):
        file = out / name
        spec = json.loads(file.read_text())
        clean = {k: v for k, v in spec.items() if k not in LOCAL_FLAGS}
        if declared is not None:
            clean["dtype"] = str(declared).removeprefix("torch.")
        if clean != spec:
            file.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")


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


def _draw(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(token, its log-prob, entropy)`` of each row drawn from float32 ``logits`` (B, V) as ``sampling`` says.

    Temperature 0 is the argmax of the logits (the first on a tie, as ``torch.argmax`` and transformers'
    greedy search): the limit of ``softmax(logits / T)`` as T -> 0, a point mass, so log-prob 0 and entropy 0.
    """
    if sampling.temperature == 0:
        tok = logits.argmax(-1)
        zero = logits.new_zeros(tok.shape)
        return tok, zero, zero
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    top_p = sampling.top_p
    probs = (_top_p_filter(logits, top_p) if top_p < 1.0 else logits).softmax(-1)
    tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tok[:, None]).squeeze(-1)
    return tok, logp, entropy_from_logits(logits)


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
    Temperature 0 is greedy decoding (see :func:`_draw`). ``forward``: see :data:`FORWARDS` (the lean ones
    decode with a preallocated cache).
    """
    max_new_tokens = sampling.max_new_tokens
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
        if not bool(torch.isfinite(logits).all()):  # nothing to sample from: a diverged policy
            raise NonFiniteError(f"non-finite logits while sampling completion token {t + 1}")
        tok, logp, ent = _draw(logits, sampling, generator)
        masks.append(~done)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        toks.append(tok)
        logps.append(torch.where(done, 0.0, logp))
        ents.append(torch.where(done, 0.0, ent))
        done = done | torch.isin(tok, eos)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, attn.new_ones(B, 1)], dim=1) if padded else None
        pos = pos + 1
        logits = steps.next(tok, pos, attn)
    return torch.stack(toks, 1), torch.stack(logps, 1), torch.stack(masks, 1), torch.stack(ents, 1)
