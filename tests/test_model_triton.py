"""The LLaMA model on the Triton kernels (interpreter, fp32) equals the model on the PyTorch reference.

Oracle: the same model in float64 on the reference backend (the kernels take no float64). FlashAttention's rule:
the fp32 model on the kernels may be at most 2x (logits) / 3x (gradients) as far from that oracle as the fp32
model on the reference attention is. The tiny config has GQA (4 query heads over 2 KV heads), head_dim 16, and
the lengths below cross the interpreter's 16-row blocks, so masked and unmasked blocks, the prompt and the GQA
mapping all take part. Greedy generation then runs prefill through the forward kernel and every decode step
through the split-KV decode kernel (rows of different lengths: kv_lens), and must pick the reference's tokens.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from llama_adapter import AdapterConfig, LLaMA, ModelArgs, ops
from llama_adapter.attention import set_attention_backend


@pytest.fixture(scope="module")
def models():
    """(float64 oracle, float32 copy): tiny LLaMA, adapter on both layers, non-zero per-head gates."""
    torch.manual_seed(0)
    params = ModelArgs.from_name("tiny")
    model = LLaMA(params, AdapterConfig(adapter_len=10, adapter_layers=2), device="cpu", dtype=torch.float64)
    with torch.no_grad():
        for p in model.adapter_parameters():
            if p.dim() == 1:  # a gate: zero-initialised; give it weight so the prompt path shows in every result
                p.copy_(torch.linspace(-0.8, 0.8, p.numel(), dtype=p.dtype))
    return model, copy.deepcopy(model).to(torch.float32)


def _logits_and_grads(model, tokens, targets, backend):
    set_attention_backend(backend)
    model.zero_grad(set_to_none=True)
    logits = model(tokens)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return logits.detach().double(), [p.grad.double() for p in model.adapter_parameters()]


def _err(a, b):
    return (a - b).abs().max().item()


def test_logits_and_adapter_gradients_match_the_reference(models):
    oracle, model = models
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (2, 21), generator=gen)
    targets = torch.randint(0, 128, (2, 21), generator=gen)
    names = [n for n, _ in model.named_parameters() if n.endswith(("adapter_prompt", "adapter_gate"))]
    assert len(names) == 4 and len(model.adapter_parameters()) == 4

    want, want_grads = _logits_and_grads(oracle, tokens, targets, "reference")
    ref, ref_grads = _logits_and_grads(model, tokens, targets, "reference")
    got, got_grads = _logits_and_grads(model, tokens, targets, "triton")

    assert _err(got, want) <= 2 * _err(ref, want), (_err(got, want), _err(ref, want))
    for name, g, r, w in zip(names, got_grads, ref_grads, want_grads, strict=True):
        assert w.abs().max() > 0, f"{name}: the oracle's gradient is zero, the test would prove nothing"
        assert _err(g, w) <= 3 * _err(r, w), (name, _err(g, w), _err(r, w))


def test_greedy_generation_matches_the_reference_on_the_decode_kernel(models, monkeypatch):
    _, model = models
    calls = {"fwd": 0, "decode": 0}
    fwd, decode = ops.adapter_attention_fwd, ops._decode_launcher()
    assert decode is not None, "kernels/decode.py is missing: generation would not use the decode kernel"

    def count(kind, fn):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(ops, "adapter_attention_fwd", count("fwd", fwd))
    monkeypatch.setattr(ops, "_decode_launcher", lambda: count("decode", decode))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (19, 6)]  # prefill: 19 > 16 rows

    with torch.no_grad():
        set_attention_backend("reference")
        want = model.generate(prompts, max_new_tokens=6)
        set_attention_backend("triton")
        got = model.generate(prompts, max_new_tokens=6)

    assert [len(t) for t in want] == [6, 6]
    assert got == want
    n_layers = model.params.n_layers
    assert calls == {"fwd": n_layers, "decode": 5 * n_layers}  # prefill once, then 5 single-token steps
