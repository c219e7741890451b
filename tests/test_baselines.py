"""The SDPA and eager baselines compute the reference's function, values and all six gradients, in float64."""

import pytest
import torch

from llama_adapter import attention, baselines, reference

BASELINES = {"sdpa": baselines.sdpa_adapter_attention, "eager": baselines.eager_adapter_attention}

# (B, Hq, Hkv, Nq, Nk, D, Ka, causal, prompt, gate, kv_lens)
CASES = {
    "mha_square_causal": (2, 4, 4, 9, 9, 16, 3, True, "shared", "head", None),
    "gqa_decode": (2, 4, 2, 3, 11, 16, 5, True, "shared", "batch", None),
    "mqa_per_sample_prompt": (2, 4, 1, 7, 7, 32, 2, True, "batch", "head", None),
    "more_queries_than_keys": (1, 2, 2, 6, 4, 16, 1, True, "shared", "head", None),
    "kv_lens_ragged": (3, 4, 2, 2, 8, 16, 4, True, "batch", "batch", [8, 3, 1]),
    "kv_lens_blind_rows": (2, 2, 2, 4, 6, 16, 2, True, "shared", "head", [6, 2]),
    "non_causal": (2, 4, 2, 5, 8, 16, 3, False, "shared", "head", None),
    "non_causal_kv_lens": (2, 2, 1, 3, 5, 16, 2, False, "shared", "head", [5, 2]),
    "no_prompt": (2, 4, 2, 6, 6, 16, 0, True, None, None, None),
}


def make_inputs(B, Hq, Hkv, Nq, Nk, D, Ka, causal, prompt, gate, kv_lens, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    q, k, v = rand(B, Hq, Nq, D), rand(B, Hkv, Nk, D), rand(B, Hkv, Nk, D)
    ak = av = g = None
    if prompt is not None:
        pshape = (Hkv, Ka, D) if prompt == "shared" else (B, Hkv, Ka, D)
        ak, av = rand(*pshape), rand(*pshape)
        g = rand(*((Hq,) if gate == "head" else (B, Hq)))
    lens = None if kv_lens is None else torch.tensor(kv_lens, dtype=torch.int32)
    return (q, k, v, ak, av, g), dict(causal=causal, sm_scale=D**-0.5, kv_lens=lens)


def value_and_grads(fn, tensors, kwargs, seed=1):
    out = fn(*tensors, **kwargs)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    wrt = [t for t in tensors if t is not None]
    return out, torch.autograd.grad(out, wrt, do)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_matches_reference_float64(name, case):
    tensors, kwargs = make_inputs(*CASES[case])
    out, grads = value_and_grads(BASELINES[name], tensors, kwargs)
    ref_out, ref_grads = value_and_grads(reference.adapter_attention, tensors, kwargs)
    assert out.dtype == torch.float64 and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert len(grads) == len(ref_grads) == (6 if CASES[case][8] else 3)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(BASELINES))
def test_blind_rows_get_zero_word_output_and_no_nan(name):
    # Nq > Nk, causal bottom-right: the first Nq - Nk queries see no word key, only the prompt.
    tensors, kwargs = make_inputs(*CASES["more_queries_than_keys"])
    q, k, v, ak, av, g = tensors
    out, grads = value_and_grads(BASELINES[name], tensors, kwargs)
    prompt_only = reference.adapter_attention(q, k, v, ak, av, g, causal=False, sm_scale=kwargs["sm_scale"])
    prompt_only = prompt_only - reference.adapter_attention(q, k, v, causal=False, sm_scale=kwargs["sm_scale"])
    torch.testing.assert_close(out[:, :, :2], prompt_only[:, :, :2], rtol=1e-10, atol=1e-10)
    assert all(torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("name", list(BASELINES))
def test_float32_within_rounding_of_float64(name):
    tensors, kwargs = make_inputs(*CASES["gqa_decode"])
    want = reference.adapter_attention(*tensors, **kwargs)
    low = [t.detach().float() for t in tensors]
    got = BASELINES[name](*low, **kwargs)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", list(BASELINES))
def test_public_op_dispatches_to_baseline(name, monkeypatch):
    tensors, kwargs = make_inputs(*CASES["mha_square_causal"])
    calls = []
    original = BASELINES[name]

    def spy(*args, **kw):
        calls.append(kw["sm_scale"])
        return original(*args, **kw)

    monkeypatch.setattr(baselines, f"{name}_adapter_attention", spy)
    attention.set_attention_backend(name)
    out = attention.adapter_attention(*tensors, causal=True)
    assert calls == [pytest.approx(16**-0.5)]
    torch.testing.assert_close(out, reference.adapter_attention(*tensors, **kwargs), rtol=1e-10, atol=1e-10)


def test_zero_gate_gives_plain_attention_and_zero_prompt_grads():
    tensors, kwargs = make_inputs(*CASES["gqa_decode"])
    q, k, v, ak, av, g = tensors
    g0 = torch.zeros_like(g, requires_grad=True)
    for fn in BASELINES.values():
        out = fn(q, k, v, ak, av, g0, **kwargs)
        plain = reference.adapter_attention(q, k, v, **kwargs)
        torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
        dak, dav, dg = torch.autograd.grad(out.square().sum(), (ak, av, g0))
        assert torch.count_nonzero(dak) == 0 and torch.count_nonzero(dav) == 0
        assert dg.abs().max() > 0


def test_sdpa_without_enable_gqa_repeats_kv(monkeypatch):
    # torch < 2.5 has no enable_gqa: the fallback repeats K/V per query head and must agree.
    monkeypatch.setattr(baselines, "_SDPA_HAS_GQA", False)
    tensors, kwargs = make_inputs(*CASES["kv_lens_ragged"])
    out, grads = value_and_grads(baselines.sdpa_adapter_attention, tensors, kwargs)
    ref_out, ref_grads = value_and_grads(reference.adapter_attention, tensors, kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
