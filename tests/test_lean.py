"""The lean forward (training.lean) against the transformers forward it replaces: the same hidden states,
gradients, sampled tokens and log-probs, for each supported architecture, with its exact kernels (bitwise on
the tiny preset) and its fast ones (oneDNN projections: float32 rounding); and every reason it steps aside."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sspo_analysis.training import lean
from sspo_analysis.training.models import Sampling, generate, load_model, sequence_logprobs

# float32 rounding through two or four layers (measured on the tiny preset: bitwise equal). One thread: with
# more, torch's CPU backward kernels reduce in a varying order, and the transformers path itself then differs
# from call to call by up to 2e-3 in the embedding gradient.
TOL = dict(rtol=1e-4, atol=1e-5)


def assert_scaled_close(ours, ref, rel: float = 1e-5):
    """Each entry within ``rel`` of the tensor's largest magnitude: the fast kernels sum in another order, and a
    gradient whose entries reach 1000 (the tied embedding's) rounds at 1e-4 in any order (measured against
    float64: transformers' own float32 error there is 2.6e-4, the fast kernels' 2.7e-4)."""
    torch.testing.assert_close(ours, ref, rtol=TOL["rtol"], atol=max(TOL["atol"], rel * float(ref.abs().max())))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def every_product_in_onednn(monkeypatch):
    """The test models are small: without this, most of their products would stay below the size at which the
    fast kernels hand them to oneDNN, and the tests would not exercise it."""
    monkeypatch.setattr(lean, "ONEDNN_MIN_MACS", 0)

SMALL = dict(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=64)


def _model(kind: str, **extra):
    if kind == "tiny":
        return load_model("tiny", seed=0)[0]
    config = AutoConfig.for_model(kind, **SMALL, **extra)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config)


ARCHS = [("tiny", {}), ("qwen2", {}), ("llama", {"attention_bias": True}), ("llama", {}),
         ("mistral", {"sliding_window": None})]


def _batch(vocab: int, padded: bool, rows: int = 6, length: int = 11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
        mask[2, :1] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("kind,extra", ARCHS)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("fast", [False, True])
def test_hidden_states_and_gradients_match_transformers(kind, extra, padded, fast):
    model = _model(kind, **extra).train()
    assert lean.unsupported(model) is None
    ids, mask, pos = _batch(model.config.vocab_size, padded)
    ref = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    ours = lean.decoder(model, fast).hidden(ids, pos, mask if padded else None)
    valid = mask.bool()  # padding positions are never read
    torch.testing.assert_close(ours[valid], ref[valid], **TOL)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    g_ref = torch.autograd.grad((ref * weights)[valid].sum(), params, allow_unused=True)
    g_ours = torch.autograd.grad((ours * weights)[valid].sum(), params, allow_unused=True)
    for a, b in zip(g_ours, g_ref):
        if b is None or not fast:  # a parameter the hidden states do not use has no gradient on either path
            torch.testing.assert_close(a, b, **TOL)
        else:
            assert_scaled_close(a, b)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("fast", [False, True])
def test_a_shared_prompt_prefix_and_a_preallocated_cache_give_the_full_forward(padded, fast):
    model = _model("qwen2").eval()
    ids, mask, pos = _batch(model.config.vocab_size, padded)
    n = 5
    dec = lean.decoder(model, fast)
    full = dec.hidden(ids, pos, mask if padded else None)
    keep: list = []
    dec.hidden(ids[:, :n], pos[:, :n], mask[:, :n] if padded else None, keep=keep)
    rest = dec.hidden(ids[:, n:], pos[:, n:], mask if padded else None, kv=lean.prefix(keep, torch.arange(len(ids))))
    torch.testing.assert_close(rest, full[:, n:], **TOL)
    cache = dec.cache(len(ids), ids.shape[1], full)
    dec.hidden(ids[:, :n], pos[:, :n], mask[:, :n] if padded else None, kv=cache)
    steps = [dec.hidden(ids[:, t:t + 1], pos[:, t:t + 1], mask[:, :t + 1] if padded else None, kv=cache)
             for t in range(n, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, n:], **TOL)
    assert cache.length == ids.shape[1]


@pytest.mark.parametrize("kind,extra", ARCHS)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("forward", ["exact", "fast"])
def test_sampling_draws_the_same_tokens_with_the_same_log_probs(kind, extra, padded, forward):
    model = _model(kind, **extra).eval()
    ids, mask, _ = _batch(model.config.vocab_size, padded, rows=4, length=5)
    prompts, prompt_mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)  # groups share prompts
    out = {}
    for path in (forward, "transformers"):
        out[path] = generate(model, prompts, prompt_mask, Sampling(12, temperature=0.9, top_p=0.95), eos_id=[3, 7],
                             pad_id=0, generator=torch.Generator().manual_seed(5), forward=path)
    (tok, logp, done, ent), (tok_hf, logp_hf, done_hf, ent_hf) = out[forward], out["transformers"]
    assert torch.equal(tok, tok_hf) and torch.equal(done, done_hf)
    torch.testing.assert_close(logp, logp_hf, **TOL)
    torch.testing.assert_close(ent, ent_hf, **TOL)


@pytest.mark.parametrize("forward", ["exact", "fast"])
def test_training_log_probs_match_on_a_rollout_batch(forward):
    model = _model("tiny").train()
    ids, mask, _ = _batch(model.config.vocab_size, padded=True, rows=4, length=6)
    prompts = ids.repeat_interleave(2, 0)
    comp = torch.randint(4, 80, (8, 7), generator=torch.Generator().manual_seed(3))
    full = torch.cat([prompts, comp], 1)
    attn = torch.cat([mask.repeat_interleave(2, 0), torch.ones_like(comp)], 1)
    cmask = torch.ones_like(comp, dtype=torch.bool)
    cmask[1, 4:] = False
    ours = sequence_logprobs(model, full, attn, 6, cmask, forward=forward)
    ref = sequence_logprobs(model, full, attn, 6, cmask, forward="transformers")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


class _Adapter(torch.nn.Linear):
    """Stands for a LoRA-style projection: a subclass whose forward adds something."""

    def forward(self, x):
        return super().forward(x) + 1.0


@pytest.mark.parametrize("change,reason", [
    (lambda m: getattr(m, "activation_checkpointing_enable", m.gradient_checkpointing_enable)(),
     "gradient checkpointing"),
    (lambda m: m.model.layers[0].register_forward_hook(lambda *a: None), "forward hooks"),
    (lambda m: setattr(m.model.layers[1].self_attn, "q_proj", _Adapter(64, 64)), "nn.Linear"),
])
def test_it_steps_aside_for_what_it_would_not_compute(change, reason):
    model = _model("qwen2")
    change(model)
    assert reason in lean.unsupported(model)
    assert lean.decoder(model) is None


@pytest.mark.parametrize("kind,extra,reason", [
    ("gpt2", {}, "model type 'gpt2'"),
    ("mistral", {}, "sliding-window"),  # Mistral's default window
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "dynamic"),
])
def test_it_steps_aside_for_architectures_it_does_not_know(kind, extra, reason):
    config = AutoConfig.for_model(kind, **({} if kind == "gpt2" else SMALL), **extra)
    assert reason in lean.unsupported(AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("kernels", ["exact", "fast"])
def test_a_run_gives_the_same_metrics_on_either_path(tmp_path, kernels):
    from sspo_analysis.training import read_metrics, train
    from sspo_analysis.training.trainer import TIMING_KEYS

    over = ['model.preset="micro"', "model.warm_start=false", "rollout.prompts=4", "rollout.group_size=4",
            "rollout.max_new_tokens=4", 'task.name="reversal"', "task.length=3", 'task.grader="chars"',
            "steps=3", "optim.lr=3e-3", "log.progress=false", "threads=1"]
    # the transformers forward with foreach AdamW against the lean one with the kernels under test
    paths = {"transformers": ["model.lean=false", 'model.kernels="exact"'], kernels: [f'model.kernels="{kernels}"']}
    runs = {path: read_metrics(train(None, tmp_path / path, overrides=over + extra)) for path, extra in paths.items()}
    assert (runs[kernels].reward_mean > 0).any()  # the updates move the policy
    numbers = [c for c in runs[kernels].columns if c not in TIMING_KEYS and c != "generation_time"
               and runs[kernels][c].dtype.kind == "f"]
    for c in numbers:
        torch.testing.assert_close(torch.tensor(runs[kernels][c].values), torch.tensor(runs["transformers"][c].values),
                                   rtol=1e-5, atol=1e-6, equal_nan=True, msg=c)


def test_bf16_autocast_takes_the_lean_path_with_the_same_values():
    model = _model("tiny").eval()
    ids, mask, _ = _batch(model.config.vocab_size, padded=True, rows=4, length=5)
    out = {}
    for path in ("fast", "transformers"):  # autocast takes torch's kernels on either path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tok, logp, done, _ = generate(model, ids, mask, Sampling(6), eos_id=3, pad_id=0,
                                          generator=torch.Generator().manual_seed(4), forward=path)
            full = torch.cat([ids, tok], 1)
            train_logp = sequence_logprobs(model.train(), full, torch.cat([mask, done.long()], 1), 5, done,
                                           forward=path)[0]
            model.eval()
        out[path] = tok, logp, train_logp
    assert torch.equal(out["fast"][0], out["transformers"][0])
    for a, b in zip(out["fast"][1:], out["transformers"][1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)  # bf16 products; float32 log-softmax


def test_masks_are_made_on_the_inputs_device():
    # a mask on another device than the queries would fail on CUDA; "meta" stands in for it here
    meta = torch.device("meta")
    assert lean._mask(None, 3, 5, True, meta).device == meta
    assert lean._mask(torch.ones(2, 8, device=meta), 3, 5, True, meta).device == meta
    assert lean._mask(None, 1, 5, True, meta) is None and lean._mask(None, 4, 0, False, meta) is None


@pytest.mark.parametrize("padded", [False, True])
def test_exact_kernels_give_the_transformers_values_bitwise_on_the_tiny_preset(padded):
    model = _model("tiny").train()
    ids, mask, pos = _batch(model.config.vocab_size, padded)
    ref = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    ours = lean.decoder(model, fast=False).hidden(ids, pos, mask if padded else None)
    assert torch.equal(ours[mask.bool()], ref[mask.bool()])


@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_gives_the_products_and_gradients_of_f_linear(shape, bias):
    if lean._ONEDNN is None:
        pytest.skip("this torch build has no oneDNN")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).transpose(-1, -2).contiguous().transpose(-1, -2)  # not contiguous
    weight, b = torch.randn(24, 16, generator=g), torch.randn(24, generator=g) if bias else None
    wanted = torch.randn(shape[:-1] + (24,), generator=g)
    args = [t.clone().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
    refs = [t.double().detach().requires_grad_() for t in args]
    ours = lean.OneDNNLinear.apply(*args, *(() if bias else (None,)))
    ref = torch.nn.functional.linear(*refs)  # float64: the exact products
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(torch.autograd.grad((ours * wanted).sum(), args),
                    torch.autograd.grad((ref * wanted.double()).sum(), refs)):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)


def test_fast_kernels_serve_float32_cpu_tensors_outside_autocast_only():
    if lean._ONEDNN is None:
        pytest.skip("this torch build has no oneDNN")
    x = torch.randn(2, 3)
    assert lean.fast_linear(x)
    assert not lean.fast_linear(x.double()) and not lean.fast_linear(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lean.fast_linear(x)
    model = _model("qwen2").eval()
    ids, _, pos = _batch(model.config.vocab_size, False)
    with torch.no_grad():  # nothing needs a gradient: the kernel is called without an autograd node
        assert lean.decoder(model).hidden(ids, pos, None).grad_fn is None


def test_fast_kernels_give_the_bias_gradient_when_only_biases_train():
    model = _model("qwen2").train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    ids, _, pos = _batch(model.config.vocab_size, False)
    grads = {}
    for fast in (False, True):
        out = lean.decoder(model, fast).hidden(ids, pos, None)
        biases = [p for p in model.parameters() if p.requires_grad]
        grads[fast] = torch.autograd.grad(out.square().sum(), biases)
    for a, b in zip(grads[True], grads[False]):
        assert_scaled_close(a, b)


def test_onednn_linear_refuses_a_second_derivative():
    if lean._ONEDNN is None:
        pytest.skip("this torch build has no oneDNN")
    x, weight = torch.randn(4, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    (g,) = torch.autograd.grad(lean.OneDNNLinear.apply(x, weight, None).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):  # rather than a silent zero
        torch.autograd.grad(g.sum(), weight)
