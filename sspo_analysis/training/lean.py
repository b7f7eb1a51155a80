"""A lean forward pass for Llama-family decoders (Qwen2, Llama, Mistral), on the model's own modules.

With a small model on a CPU, the trainer's two hot loops (token-by-token sampling, and
the training forward and backward) spend much of their time outside the matrix products:
the transformers forward builds mask and cache objects, dispatches through hooks and
output dataclasses, and grows the key/value cache by concatenation at every token. This
module computes the same layers with the model's own projection and norm modules (so
gradients, the optimiser and checkpoints are untouched) and nothing else:

- a preallocated key/value cache written in place while sampling;
- prompt keys and values computed once per distinct prompt and shared by its completions.

:func:`unsupported` says why a model cannot take this path (any architecture or option it
does not recognise), and callers then use the transformers forward. The two agree to float
rounding (the training forward is bitwise equal on the tiny presets); ``tests/test_lean.py``
checks hidden states, gradients, masks and sampled tokens against transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

ARCHITECTURES = ("qwen2", "llama", "mistral")
"""``config.model_type`` values whose decoder layer is RMSNorm, rotary GQA attention, SwiGLU MLP (pre-norm)."""


def unsupported(model) -> str | None:
    """Why ``model`` cannot take the lean path, or None when it can.

    The lean path computes what the transformers modules would, so anything that changes
    that computation sends the model back to them: another architecture or activation,
    sliding-window or dynamically scaled rotary attention, attention dropout in training,
    gradient checkpointing, an attention backend other than SDPA or eager, projections that
    are not plain ``nn.Linear`` (adapters such as LoRA), and any forward hook.
    """
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"model type {kind!r} (lean path: {', '.join(ARCHITECTURES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    layer_types = getattr(config, "layer_types", None) or ()  # absent from older configs
    if getattr(config, "sliding_window", None) and (kind == "mistral" or getattr(config, "use_sliding_window", False)
                                                    or "sliding_attention" in layer_types):
        return "sliding-window attention"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") in ("dynamic", "longrope"):
        return f"rotary type {rope['rope_type']!r} (its frequencies depend on the sequence length)"
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation!r}"
    if model.training and getattr(config, "attention_dropout", 0.0):
        return "attention dropout in training"
    modules = list(model.modules())
    if any(getattr(m, "gradient_checkpointing", False) for m in modules):
        return "gradient checkpointing (the transformers layers recompute themselves)"
    if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
        return "forward hooks (the lean path would not call them)"
    for layer in model.base_model.layers:
        a, m = layer.self_attn, layer.mlp
        if any(type(p) is not torch.nn.Linear for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj,
                                                        m.up_proj, m.down_proj)):
            return "projections that are not plain nn.Linear (adapters)"
    return None


# --------------------------------------------------------------------------- one layer


def _rms_norm(x: Tensor, norm) -> Tensor:
    """RMSNorm exactly as the transformers module computes it (float32 statistics).

    Not ``F.rms_norm``: its fused kernel, taken when nothing needs a gradient, rounds differently.
    """
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x32.to(x.dtype)


def _linear(x: Tensor, proj) -> Tensor:
    """``proj(x)`` for an ``nn.Linear`` without the module-call machinery (hooks: none on these models)."""
    return F.linear(x, proj.weight, proj.bias)


def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotary embedding ``x cos + rotate_half(x) sin`` with the sign of ``rotate_half`` folded into the sine.

    ``rotate_half(x) * sin = roll(x, D/2) * signed_sin``, with ``signed_sin = (-sin_1, sin_2)``:
    negation is exact, so the values are bitwise the same, in fewer and cheaper operations.
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class _KV:
    """Keys and values that a layer's queries attend to beyond their own: a prefix, or a preallocated cache."""

    def __init__(self, keys: list[Tensor], values: list[Tensor], length: int, static: bool):
        self.keys, self.values, self.length, self.static = keys, values, length, static

    def fill(self, keep: list[tuple[Tensor, Tensor]], repeats: int) -> None:
        """Start the (static, empty) cache with a call's kept keys and values, each row ``repeats`` times."""
        for layer, (k, v) in enumerate(keep):
            end = k.shape[2]
            self.keys[layer][:, :, :end] = k.repeat_interleave(repeats, 0)
            self.values[layer][:, :, :end] = v.repeat_interleave(repeats, 0)
        self.length = keep[0][0].shape[2]

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, Hkv, length + T, D) with ``k``, ``v`` (B, Hkv, T, D) appended."""
        if not self.static:
            return torch.cat([self.keys[layer], k], 2), torch.cat([self.values[layer], v], 2)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA's enable_gqa


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool) -> Tensor:
    """SDPA of q (B, Hq, T, D) over k, v (B, Hkv, S, D), called the way transformers calls it.

    Grouped-query heads go to the kernel as they are when there is no mask. With a mask (CUDA's
    fused kernels take none with grouped queries), a single query token is packed as
    (B, Hkv, Hq / Hkv, D) over the shared mask, and longer queries repeat the key and value heads.
    """
    B, Hq, T, D = q.shape
    groups = Hq // k.shape[1]
    if groups > 1 and mask is None and _GQA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    if groups > 1 and T == 1:
        out = F.scaled_dot_product_attention(q.reshape(B, Hq // groups, groups, D), k, v, attn_mask=mask, scale=scale)
        return out.reshape(B, Hq, 1, D)
    if groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale)


def _layer(layer, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, kv: _KV | None,
           index: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(output, keys, values)`` of one pre-norm decoder layer; keys and values include ``kv``'s."""
    a, m = layer.self_attn, layer.mlp
    B, T, _ = x.shape
    h = _rms_norm(x, layer.input_layernorm)
    q, k, v = (_linear(h, p).view(B, T, -1, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
    q, k = _rotate(q, *rope), _rotate(k, *rope)
    if kv is not None:
        k, v = kv.extend(index, k, v)
    o = _attend(q, k, v, mask, a.scaling, causal=kv is None)
    x = x + _linear(o.transpose(1, 2).reshape(B, T, -1), a.o_proj)
    h = _rms_norm(x, layer.post_attention_layernorm)
    return x + _linear(F.silu(_linear(h, m.gate_proj)) * _linear(h, m.up_proj), m.down_proj), k, v


# --------------------------------------------------------------------------- the decoder


def decoder(model) -> LeanDecoder | None:
    """The lean decoder of ``model``, or None when :func:`unsupported` gives a reason not to use one."""
    return None if unsupported(model) is not None else LeanDecoder(model)


class LeanDecoder:
    """The base model of a Llama-family causal LM, run as plain functions over its modules (see :func:`decoder`)."""

    def __init__(self, model):
        self.model = model
        self.base = model.base_model

    def hidden(self, ids: Tensor, pos: Tensor, key_mask: Tensor | None, kv: _KV | None = None,
               keep: list | None = None) -> Tensor:
        """Final hidden states (B, T, H) of ``ids`` at positions ``pos`` (B or 1, T).

        ``key_mask`` (B, S) marks the keys a query may see (None: all, S = kv length + T);
        attention is causal within ``ids``. ``keep`` (a list) receives each layer's
        ``(keys, values)``, to serve as a later call's prefix.
        """
        x = self.base.embed_tokens(ids)
        cos, sin = self.base.rotary_emb(x, pos)
        half = sin.shape[-1] // 2
        rope = (cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, None])
        mask = _mask(key_mask, ids.shape[1], 0 if kv is None else kv.length, kv is not None, ids.device)
        for i, layer in enumerate(self.base.layers):
            x, k, v = _layer(layer, x, rope, mask, kv, i)
            if keep is not None:
                keep.append((k, v))
        if kv is not None and kv.static:
            kv.length += ids.shape[1]
        return _rms_norm(x, self.base.norm)

    def cache(self, batch: int, length: int, like: Tensor) -> _KV:
        """An empty preallocated key/value cache for ``batch`` rows of up to ``length`` positions."""
        a = self.base.layers[0].self_attn
        shape = (batch, a.k_proj.out_features // a.head_dim, length, a.head_dim)
        n = len(self.base.layers)
        return _KV([like.new_empty(shape) for _ in range(n)], [like.new_empty(shape) for _ in range(n)], 0, True)


def prefix(keep: list[tuple[Tensor, Tensor]], rows: Tensor) -> _KV:
    """The kept keys and values of a call, row-selected by ``rows``, as the prefix of another call (autograd-safe)."""
    return _KV([k[rows] for k, _ in keep], [v[rows] for _, v in keep], keep[0][0].shape[2], False)


def _mask(key_mask: Tensor | None, T: int, past: int, has_past: bool, device: torch.device) -> Tensor | None:
    """(B or 1, 1, T, past + T) bool, True = may attend: causal, key padding; None when plain causal suffices.

    A padding query (one whose own key is masked) still sees itself, so no row is all-masked
    (its output is never used, but a row of -inf would make NaN that later layers could read).
    """
    if key_mask is None and (T == 1 or not has_past):
        return None
    q = torch.arange(past, past + T, device=device)[:, None]
    k = torch.arange(past + T, device=device)[None]
    see = k <= q
    if key_mask is not None:
        see = (see & key_mask.bool()[:, None, None, :]) | (k == q)
    return see[None, None] if see.dim() == 2 else see
