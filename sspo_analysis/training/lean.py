"""A lean forward pass for Llama-family decoders (Qwen2, Llama, Mistral), on the model's own modules.

With a small model on a CPU, the trainer's two hot loops (token-by-token sampling, and
the training forward and backward) spend much of their time outside the matrix products:
the transformers forward builds mask and cache objects, dispatches through hooks and
output dataclasses, and grows the key/value cache by concatenation at every token. This
module computes the same layers with the model's own projection and norm modules (so
gradients, the optimiser and checkpoints are untouched) and nothing else:

- a preallocated key/value cache written in place while sampling, and the rotary angles of
  every sampled position computed once;
- prompt keys and values computed once per distinct prompt and shared by its completions;
- with ``fast`` kernels (the default), float32 projections on the CPU through oneDNN
  (:class:`OneDNNLinear`): the same products as torch's default BLAS, summed in another order.
  On CPUs whose default BLAS takes no AVX-512 path (MKL on AMD) they run about twice as fast.
  ``fast=False`` keeps torch's own kernels, whose values are bitwise those of transformers.

:func:`unsupported` says why a model cannot take this path (any architecture or option it
does not recognise), and callers then use the transformers forward. The two agree to float
rounding (bitwise equal on the tiny presets without ``fast``); ``tests/test_lean.py`` checks hidden
states, gradients, masks and sampled tokens against transformers on either setting.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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


# --------------------------------------------------------------------------- kernels


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm exactly as the transformers module computes it (float32 statistics).

    Not ``F.rms_norm``: its fused kernel, taken when nothing needs a gradient, rounds differently.
    """
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _onednn_op():
    """oneDNN's float32 linear kernel (the one torch.compile's CPU backend calls), or None in builds without it."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    return op if torch.backends.mkldnn.is_available() else None


_ONEDNN = _onednn_op()
ONEDNN_MIN_MACS = 2**20
"""Below this many multiply-adds a product stays with torch's BLAS: oneDNN's fixed cost per call (about 10 us
here) outweighs its faster arithmetic (measured on one core: a (64, 128) x (128, 64) product takes 12 us in MKL
and 16 in oneDNN; (64, 128) x (128, 512) takes 84 and 50; (480, 128) x (128, 512) 596 and 272)."""


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` by oneDNN's kernel (no fused activation), outside autograd."""
    return _ONEDNN(x, weight, bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose three products (output, input and weight gradients) run in oneDNN.

    The products are those of ``F.linear`` and its backward; only the order of each float32 sum
    differs. Float32 CPU tensors only (see :func:`fast_linear`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the oneDNN kernel has no derivative of its own
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        dx = _onednn(grad, weight.t()) if ctx.needs_input_grad[0] else None
        dw = _onednn(flat.t(), x.reshape(-1, x.shape[-1]).t()) if ctx.needs_input_grad[1] else None
        db = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def _fast_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` in oneDNN when the product is large enough to gain (no autograd node when none is needed)."""
    if x.numel() * weight.shape[0] < ONEDNN_MIN_MACS:
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return OneDNNLinear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


def fast_linear(x: Tensor) -> bool:
    """Whether :class:`OneDNNLinear` serves ``x``: a float32 CPU tensor outside autocast, in a build with oneDNN."""
    return (_ONEDNN is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


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


def _fast_attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool) -> Tensor:
    """:func:`_attend` for float32 on the CPU, in the kernels that serve these shapes faster there.

    A single query token (sampling) attends through two batched products and a softmax: the flash
    kernel would run a matrix-vector product per row and head. Longer queries under a mask give
    SDPA the grouped heads as they are (its CPU kernel takes them; CUDA's fused ones would not).
    """
    B, Hq, T, D = q.shape
    groups = Hq // k.shape[1]
    if T == 1:
        scores = torch.matmul(q.reshape(B, Hq // groups, groups, D), k.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(scores.softmax(-1), v).reshape(B, Hq, 1, D)
    if groups > 1 and mask is not None and _GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return _attend(q, k, v, mask, scale, causal)


# --------------------------------------------------------------------------- one layer


@dataclass(frozen=True)
class _Weights:
    """A decoder layer's tensors (``(weight, bias)`` per projection), read from its modules once per decoder:
    a module attribute lookup costs about as much as a small kernel, and sampling runs the layer per token."""

    norms: tuple[tuple[Tensor, float], tuple[Tensor, float]]  # (weight, eps) before attention, before the MLP
    q: tuple[Tensor, Tensor | None]
    k: tuple[Tensor, Tensor | None]
    v: tuple[Tensor, Tensor | None]
    o: tuple[Tensor, Tensor | None]
    gate: tuple[Tensor, Tensor | None]
    up: tuple[Tensor, Tensor | None]
    down: tuple[Tensor, Tensor | None]
    head_dim: int
    scaling: float
    qkv: tuple[Tensor, Tensor | None] | None = None  # q, k and v stacked: one product (fast sampling)
    gate_up: tuple[Tensor, Tensor | None] | None = None  # gate and up stacked

    @staticmethod
    def of(layer) -> _Weights:
        a, m = layer.self_attn, layer.mlp
        norms = tuple((n.weight, n.variance_epsilon) for n in (layer.input_layernorm, layer.post_attention_layernorm))
        named = (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj), ("o", a.o_proj), ("gate", m.gate_proj),
                 ("up", m.up_proj), ("down", m.down_proj))
        return _Weights(norms, **{name: (p.weight, p.bias) for name, p in named}, head_dim=a.head_dim,
                        scaling=a.scaling)

    def stacked(self) -> _Weights:
        """These weights with q, k, v and gate, up stacked (copies: for weights that stay as they are)."""
        return replace(self, qkv=_stack(self.q, self.k, self.v), gate_up=_stack(self.gate, self.up))


def _stack(*projections: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor | None] | None:
    """One projection computing all of ``projections`` side by side (None when only some have a bias)."""
    biases = [b for _, b in projections]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    return torch.cat([w for w, _ in projections]), None if biases[0] is None else torch.cat(biases)


def _layer(w: _Weights, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, kv: _KV | None,
           index: int, fast: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(output, keys, values)`` of one pre-norm decoder layer; keys and values include ``kv``'s."""
    linear, attend = (_fast_linear, _fast_attend) if fast else (F.linear, _attend)
    B, T, _ = x.shape
    h = _rms_norm(x, *w.norms[0])
    if w.qkv is not None:  # one product, q and k rotated together, then the heads split
        qkv = linear(h, *w.qkv).view(B, T, -1, w.head_dim).transpose(1, 2)
        nq, nk = w.q[0].shape[0] // w.head_dim, w.k[0].shape[0] // w.head_dim
        qk = _rotate(qkv[:, :nq + nk], *rope)
        q, k, v = qk[:, :nq], qk[:, nq:], qkv[:, nq + nk:]
    else:
        q, k, v = (linear(h, *p).view(B, T, -1, w.head_dim).transpose(1, 2) for p in (w.q, w.k, w.v))
        q, k = _rotate(q, *rope), _rotate(k, *rope)
    if kv is not None:
        k, v = kv.extend(index, k, v)
    o = attend(q, k, v, mask, w.scaling, causal=kv is None)
    x = x + linear(o.transpose(1, 2).reshape(B, T, -1), *w.o)
    h = _rms_norm(x, *w.norms[1])
    gate, up = linear(h, *w.gate_up).chunk(2, -1) if w.gate_up is not None else (linear(h, *w.gate),
                                                                                  linear(h, *w.up))
    return x + linear(F.silu(gate) * up, *w.down), k, v


# --------------------------------------------------------------------------- the decoder


def decoder(model, fast: bool = True) -> LeanDecoder | None:
    """The lean decoder of ``model``, or None when :func:`unsupported` gives a reason not to use one.

    ``fast``: float32 CPU projections through oneDNN (:class:`OneDNNLinear`) and attention in the
    kernels that serve these shapes best there (:func:`_fast_attend`); False: transformers' kernels.
    """
    return None if unsupported(model) is not None else LeanDecoder(model, fast)


class LeanDecoder:
    """The base model of a Llama-family causal LM, run as plain functions over its modules (see :func:`decoder`)."""

    def __init__(self, model, fast: bool = True):
        self.model, self.fast = model, fast
        self.base = model.base_model
        self.weights = [_Weights.of(layer) for layer in self.base.layers]
        self.final_norm = (self.base.norm.weight, self.base.norm.variance_epsilon)

    def freeze(self) -> None:
        """Stack projections for calls that will neither change nor differentiate the weights (sampling): with
        the fast kernels on float32 CPU weights only. The products are the same; a stacked one may be summed in
        another order (another kernel, or the other side of :data:`ONEDNN_MIN_MACS`), bitwise equal on tiny."""
        if self.fast and fast_linear(self.final_norm[0]):
            self.weights = [w.stacked() for w in self.weights]

    def rope(self, like: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """``(cos, signed_sin)`` (B or 1, 1, T, D) of positions ``pos`` (B or 1, T), in ``like``'s dtype (see
        :func:`_rotate`). Each position's angles depend on that position alone, so a slice of a longer call's
        table is bitwise the table of the slice."""
        cos, sin = self.base.rotary_emb(like, pos)
        half = sin.shape[-1] // 2
        return cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, None]

    def hidden(self, ids: Tensor, pos: Tensor, key_mask: Tensor | None, kv: _KV | None = None,
               keep: list | None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Final hidden states (B, T, H) of ``ids`` at positions ``pos`` (B or 1, T).

        ``key_mask`` (B, S) marks the keys a query may see (None: all, S = kv length + T);
        attention is causal within ``ids``. ``keep`` (a list) receives each layer's
        ``(keys, values)``, to serve as a later call's prefix. ``rope``: :meth:`rope` of ``pos``,
        when the caller has it already.
        """
        x = self.base.embed_tokens(ids)
        rope = rope or self.rope(x, pos)
        mask = _mask(key_mask, ids.shape[1], 0 if kv is None else kv.length, kv is not None, ids.device)
        fast = self.fast and fast_linear(x)
        for i, w in enumerate(self.weights):
            x, k, v = _layer(w, x, rope, mask, kv, i, fast)
            if keep is not None:
                keep.append((k, v))
        if kv is not None and kv.static:
            kv.length += ids.shape[1]
        return _rms_norm(x, *self.final_norm)

    def cache(self, batch: int, length: int, like: Tensor) -> _KV:
        """An empty preallocated key/value cache for ``batch`` rows of up to ``length`` positions."""
        w = self.weights[0]
        shape = (batch, w.k[0].shape[0] // w.head_dim, length, w.head_dim)
        n = len(self.weights)
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
