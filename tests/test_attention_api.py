"""The public op `adapter_attention`: its input errors (docs/design.md §3), backend selection, and the PyTorch
reference against a naive float64 computation written out query by query."""

import math

import pytest
import torch

from llama_adapter import attention, reference
from llama_adapter.attention import adapter_attention, resolve_backend, set_attention_backend

F64 = torch.float64


def inputs(B=2, Hq=4, Hkv=2, Nq=5, Nk=7, D=16, Ka=3, per_sample=False, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)

    prompt_shape = (B, Hkv, Ka, D) if per_sample else (Hkv, Ka, D)
    return dict(
        q=rand(B, Hq, Nq, D),
        k=rand(B, Hkv, Nk, D),
        v=rand(B, Hkv, Nk, D),
        adapter_k=rand(*prompt_shape),
        adapter_v=rand(*prompt_shape),
        gate=rand(B, Hq) if per_sample else rand(Hq),
    )


def naive(q, k, v, adapter_k=None, adapter_v=None, gate=None, *, causal=True, kv_lens=None):
    """One query at a time: which keys it sees, their softmax, then the gated prompt softmax."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D)
    out = torch.zeros(B, Hq, Nq, D, dtype=F64)
    for b in range(B):
        n_keys = Nk if kv_lens is None else int(kv_lens[b])
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Nq):
                seen = [j for j in range(n_keys) if not causal or j <= i + n_keys - Nq]
                if seen:
                    p = torch.softmax(torch.stack([q[b, h, i] @ k[b, kh, j] for j in seen]) * scale, 0)
                    out[b, h, i] = sum(p[n] * v[b, kh, j] for n, j in enumerate(seen))
                if adapter_k is not None:
                    ak = adapter_k[b] if adapter_k.dim() == 4 else adapter_k
                    av = adapter_v[b] if adapter_v.dim() == 4 else adapter_v
                    g = gate[b, h] if gate.dim() == 2 else gate[h]
                    out[b, h, i] += g * torch.softmax(ak[kh] @ q[b, h, i] * scale, 0) @ av[kh]
    return out


CASES = {
    "causal, Nq < Nk (decode-like)": dict(shape=dict(Nq=3, Nk=7)),
    "causal, Nq > Nk (rows see no key)": dict(shape=dict(Nq=6, Nk=4)),
    "not causal": dict(shape=dict(Nq=5, Nk=3), causal=False),
    "MHA": dict(shape=dict(Hq=2, Hkv=2)),
    "MQA": dict(shape=dict(Hq=4, Hkv=1)),
    "per-sample prompts and gates": dict(shape=dict(per_sample=True)),
    "kv_lens": dict(shape=dict(Nq=2, Nk=8), kv_lens=[5, 8]),
    "kv_lens < Nq (rows see no key)": dict(shape=dict(Nq=4, Nk=6), kv_lens=[2, 6]),
    "kv_lens, not causal, per-sample": dict(shape=dict(Nq=3, Nk=6, per_sample=True), kv_lens=[1, 4], causal=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_naive_float64(case):
    spec = CASES[case]
    x = inputs(**spec["shape"])
    kw = dict(causal=spec.get("causal", True))
    if "kv_lens" in spec:
        kw["kv_lens"] = torch.tensor(spec["kv_lens"], dtype=torch.int32)
    expected = naive(**x, **kw)
    torch.testing.assert_close(adapter_attention(**x, **kw), expected, rtol=0, atol=1e-13)
    words_only = {n: x[n] for n in ("q", "k", "v")}
    torch.testing.assert_close(adapter_attention(**words_only, **kw), naive(**words_only, **kw), rtol=0, atol=1e-13)


def test_rows_without_visible_keys_are_zero_and_differentiable():
    x = {n: t.requires_grad_() for n, t in inputs(Nq=6, Nk=3).items()}
    out = adapter_attention(x["q"], x["k"], x["v"])
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))  # queries 0..2 see keys j <= i - 3
    adapter_attention(**x).sum().backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in x.values())


def test_low_precision_computes_in_float32():
    x16 = inputs(dtype=torch.float16)
    x32 = {n: t.float() for n, t in x16.items()}
    out = adapter_attention(**x16)
    assert out.dtype == torch.float16
    assert torch.equal(out, adapter_attention(**x32).half())


def test_default_scale_and_explicit_scale():
    x = inputs()
    torch.testing.assert_close(adapter_attention(**x, sm_scale=0.25), adapter_attention(**x), rtol=0, atol=0)
    assert not torch.allclose(adapter_attention(**x, sm_scale=0.1), adapter_attention(**x))


def _bad(name, change, error, match):
    """A copy of good inputs with `change(inputs) -> dict of replacements` applied."""
    return pytest.param(change, error, match, id=name)


def _head_dim(x, d):
    return {n: t[..., :d] for n, t in x.items() if n != "gate"}


def _kv_heads(x, h):
    return {n: x[n][:, :1].expand(-1, h, -1, -1) for n in ("k", "v")}


BAD = [
    _bad("q not a tensor", lambda x: dict(q=x["q"].tolist()), TypeError, "q must be a torch.Tensor"),
    _bad("q integer", lambda x: dict(q=x["q"].long()), TypeError, "q must be float16"),
    _bad("q rank 3", lambda x: dict(q=x["q"][0]), ValueError, r"q must have shape \(B, Hq, Nq, D\)"),
    _bad("k rank 3", lambda x: dict(k=x["k"][0]), ValueError, r"k must have shape \(B=2, Hkv, Nk, D=16\)"),
    _bad("k batch", lambda x: dict(k=x["k"][:1]), ValueError, r"k must have shape \(B=2"),
    _bad("v head dim", lambda x: dict(v=x["v"][..., :8]), ValueError, "v must have shape"),
    _bad("v length", lambda x: dict(v=x["v"][:, :, :3]), ValueError, "v must have the shape of k"),
    _bad("kv heads do not divide", lambda x: _kv_heads(x, 3), ValueError, "k heads must divide q heads"),
    _bad("D not a power of two", lambda x: _head_dim(x, 12), ValueError, "power of two"),
    _bad("D too small", lambda x: _head_dim(x, 8), ValueError, "D=8"),
    _bad("k dtype", lambda x: dict(k=x["k"].float()), TypeError, "k must have q's dtype"),
    _bad("k device", lambda x: dict(k=x["k"].to("meta")), ValueError, "k must be on q's device"),
    _bad("prompt without gate", lambda x: dict(gate=None), ValueError, "gate of shape"),
    _bad("gate without prompt", lambda x: dict(adapter_k=None, adapter_v=None), ValueError, "gate was given"),
    _bad("adapter_v missing", lambda x: dict(adapter_v=None), ValueError, "adapter_k and adapter_v"),
    _bad("adapter_k not a tensor", lambda x: dict(adapter_k=1.0), TypeError, "adapter_k must be a torch.Tensor"),
    _bad(
        "adapter_k heads",
        lambda x: dict(adapter_k=x["adapter_k"][:1]),
        ValueError,
        r"adapter_k must have shape \(Hkv=2, Ka, D=16\)",
    ),
    _bad(
        "adapter_v batch",
        lambda x: dict(adapter_v=x["adapter_v"].expand(3, -1, -1, -1)),
        ValueError,
        r"adapter_v must have shape .* or \(B=2, Hkv=2, Ka, D=16\)",
    ),
    _bad(
        "adapter_v length",
        lambda x: dict(adapter_v=x["adapter_v"][:, :2]),
        ValueError,
        "adapter_v must have the shape of adapter_k",
    ),
    _bad(
        "adapter_k dtype", lambda x: dict(adapter_k=x["adapter_k"].float()), TypeError, "adapter_k must have q's dtype"
    ),
    _bad(
        "adapter_v device",
        lambda x: dict(adapter_v=x["adapter_v"].to("meta")),
        ValueError,
        "adapter_v must be on q's device",
    ),
    _bad("gate shape", lambda x: dict(gate=x["gate"][:2]), ValueError, r"gate must have shape \(Hq=4,\)"),
    _bad("gate integer", lambda x: dict(gate=x["gate"].long()), TypeError, "gate must be a floating"),
    _bad("gate device", lambda x: dict(gate=x["gate"].to("meta")), ValueError, "gate must be on q's device"),
]


@pytest.mark.parametrize("change,error,match", BAD)
def test_bad_inputs_are_named(change, error, match):
    x = inputs()
    with pytest.raises(error, match=match):
        adapter_attention(**{**x, **change(x)})


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(kv_lens=[3, 4]), TypeError, "kv_lens must be a torch.Tensor"),
        (dict(kv_lens=torch.tensor([3.0, 4.0])), TypeError, "kv_lens must be int32"),
        (dict(kv_lens=torch.tensor([3], dtype=torch.int32)), ValueError, r"kv_lens must have shape \(B=2,\)"),
        (dict(kv_lens=torch.tensor([3, 4], dtype=torch.int32, device="meta")), ValueError, "kv_lens must be on"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(sm_scale=0.0), ValueError, "sm_scale must be a positive"),
        (dict(sm_scale=float("nan")), ValueError, "sm_scale must be a positive"),
    ],
)
def test_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        adapter_attention(**inputs(), **kwargs)


def test_errors_come_before_any_backend_runs(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("backend ran on bad input")

    monkeypatch.setattr(reference, "adapter_attention", forbidden)
    with pytest.raises(ValueError, match="gate"):
        adapter_attention(**{**inputs(), "gate": None})


def test_backend_names_and_auto_resolution(monkeypatch):
    with pytest.raises(ValueError, match="attention backend must be one of"):
        set_attention_backend("flash")
    set_attention_backend("auto")
    assert attention.get_attention_backend() == "auto"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend(torch.device("cpu")) == "reference"
    assert resolve_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(torch.device("cpu")) == "triton"
    for name in ("reference", "triton", "sdpa", "eager"):
        set_attention_backend(name)
        assert resolve_backend(torch.device("cpu")) == name == attention.get_attention_backend()


@pytest.mark.parametrize(
    "backend,module,name",
    [
        ("reference", "llama_adapter.reference", "adapter_attention"),
        ("sdpa", "llama_adapter.baselines", "sdpa_adapter_attention"),
        ("eager", "llama_adapter.baselines", "eager_adapter_attention"),
    ],
)
def test_dispatch_reaches_the_chosen_backend(monkeypatch, backend, module, name):
    import importlib

    seen = {}

    def spy(q, *args, **kwargs):
        seen.update(kwargs)
        return q

    monkeypatch.setattr(importlib.import_module(module), name, spy)
    set_attention_backend(backend)
    x = inputs()
    assert adapter_attention(**x) is x["q"]
    assert seen["sm_scale"] == 0.25 and seen["causal"] is True  # resolved scale is passed on


def test_triton_backend_refuses_float64():
    set_attention_backend("triton")
    with pytest.raises(TypeError, match="float64"):
        adapter_attention(**inputs())


def test_supports_packing_answers_for_the_backend_a_call_runs_on(monkeypatch):
    """Whether the op takes cu_seqlens, and whether packing saves work there, is the op's answer; a backend it
    calls unable to pack is one whose call refuses cu_seqlens."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    set_attention_backend("auto")  # the reference on the CPU, the kernels on CUDA
    assert attention.supports_packing(cpu) and not attention.supports_packing(cpu, saves_work=True)
    assert attention.supports_packing(cuda, saves_work=True)
    set_attention_backend("triton")
    assert attention.supports_packing(cpu, saves_work=True)
    x = inputs(B=1, Nq=7, Nk=7)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    for name in ("sdpa", "eager"):
        set_attention_backend(name)
        assert not attention.supports_packing(cpu) and not attention.supports_packing(cuda, saves_work=True)
        with pytest.raises(NotImplementedError, match="does not take cu_seqlens"):
            adapter_attention(**x, cu_seqlens=cu, max_seqlen=4)
