"""Packed variable-length sequences (cu_seqlens, FlashAttention's varlen API) on the kernels and the reference.

Several sequences share one (1, H, T, D) row: each attends only within itself and sees the shared prompt. The
kernels must match the float64 reference by FlashAttention's rule (the helpers of test_kernels.py), and packing
must change nothing: the packed op equals each sequence run alone through the ordinary (B = 1) op.
"""

import pytest
import torch
from test_kernels import _poisoned_outputs, assert_flash_rule, make_inputs, run_op  # noqa: F401 (autouse fixture)

from llama_adapter import adapter_attention, ops, set_attention_backend
from llama_adapter.reference import adapter_attention as reference


def packing(lengths):
    """cu_seqlens (S+1,) int32 of sequences of these lengths, and the longest."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu, max(lengths)


def packed_inputs(lengths, dtype=torch.float32, seed=0, **kwargs):
    T = sum(lengths)
    inputs, do, _ = make_inputs(B=1, Nq=T, Nk=T, dtype=dtype, seed=seed, **kwargs)
    return inputs, do


# (id, lengths, make_inputs kwargs, causal). Interpreter blocks are 16 wide: 19 crosses a block, 1 is a lone row,
# 0 an empty sequence; Ka = 20 takes two prompt blocks.
CASES = [
    ("causal-mha", [1, 7, 19, 5], dict(Hq=2, Hkv=2, D=16, Ka=10), True),
    ("causal-gqa-d32-empty-seq", [7, 0, 19, 1, 5], dict(Hq=4, Hkv=2, D=32, Ka=20), True),
    ("noncausal-mqa", [5, 19, 7], dict(Hq=3, Hkv=1, D=16, Ka=3), False),
    ("causal-no-prompt", [19, 1, 7], dict(Hq=2, Hkv=1, D=16, Ka=0), True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lengths,kwargs,causal", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_packed_forward_and_gradients_match_float64(lengths, kwargs, causal, dtype):
    inputs, do = packed_inputs(lengths, dtype, **kwargs)
    cu, max_len = packing(lengths)
    got = run_op(inputs, do, causal=causal, kv_lens=None, cu_seqlens=cu, max_seqlen=max_len)
    assert_flash_rule(got, inputs, do, causal=causal, kv_lens=None, cu_seqlens=cu)


def _each_sequence_alone(inputs, do, lengths, causal):
    """The non-packed op on every sequence in turn, outputs concatenated and gradients accumulated."""
    leaves = {n: t.clone().requires_grad_() if t is not None else None for n, t in inputs.items()}
    starts = packing(lengths)[0].tolist()
    outs = []
    for a, b in zip(starts, starts[1:]):
        if a == b:
            continue
        rows = {n: leaves[n][:, :, a:b] for n in ("q", "k", "v")}
        out = adapter_attention(
            **rows, adapter_k=leaves["adapter_k"], adapter_v=leaves["adapter_v"], gate=leaves["gate"], causal=causal
        )
        out.backward(do[:, :, a:b])
        outs.append(out.detach())
    return [torch.cat(outs, dim=2)] + [t.grad for t in leaves.values() if t is not None]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_packed_equals_each_sequence_alone(backend, causal):
    lengths = [7, 19, 1, 5]
    inputs, do = packed_inputs(lengths, Hq=4, Hkv=2, D=16, Ka=10, seed=1)
    cu, max_len = packing(lengths)
    set_attention_backend(backend)
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    packed = adapter_attention(**leaves, causal=causal, cu_seqlens=cu, max_seqlen=max_len)
    packed.backward(do)
    got = [packed.detach()] + [t.grad for t in leaves.values()]
    alone = _each_sequence_alone(inputs, do, lengths, causal)
    for name, g, want in zip(("o", "dq", "dk", "dv", "dadapter_k", "dadapter_v", "dgate"), got, alone):
        # Same blocks and arithmetic per sequence; only the prompt gradients sum in another order.
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_reference_mask_is_block_diagonal_in_float64():
    lengths = [3, 1, 6]
    inputs, do = packed_inputs(lengths, dtype=torch.float64, Hq=2, Hkv=1, D=16, Ka=4, seed=2)
    cu, _ = packing(lengths)
    packed = reference(**inputs, causal=True, sm_scale=0.25, cu_seqlens=cu)
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        alone = reference(
            *(inputs[n][:, :, a:b] for n in ("q", "k", "v")),
            inputs["adapter_k"],
            inputs["adapter_v"],
            inputs["gate"],
            causal=True,
            sm_scale=0.25,
        )
        torch.testing.assert_close(packed[:, :, a:b], alone, rtol=0, atol=1e-12)


def test_varlen_never_takes_the_decode_kernel(monkeypatch):
    """A short packed batch without grad is still a prefill: the decode kernel knows no cu_seqlens."""

    def refuse(*args, **kwargs):
        raise AssertionError("packed sequences reached the decode kernel")

    monkeypatch.setattr(ops, "_decode_op", refuse)
    monkeypatch.setattr(ops, "_decode_launcher", lambda: refuse)
    lengths = [2, 3]
    inputs, _ = packed_inputs(lengths, Hq=2, Hkv=2, D=16, Ka=3)
    cu, max_len = packing(lengths)
    set_attention_backend("triton")
    with torch.no_grad():
        out = adapter_attention(**inputs, cu_seqlens=cu, max_seqlen=max_len)
    want = reference(**inputs, causal=True, sm_scale=0.25, cu_seqlens=cu)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_max_seqlen_is_derived_from_cu_seqlens():
    lengths = [19, 7]
    inputs, _ = packed_inputs(lengths, Hq=2, Hkv=2, D=16, Ka=3)
    cu, _ = packing(lengths)
    set_attention_backend("triton")
    out = adapter_attention(**inputs, cu_seqlens=cu)  # no max_seqlen: the grid must still cover the 19
    torch.testing.assert_close(out, reference(**inputs, sm_scale=0.25, cu_seqlens=cu), rtol=1e-5, atol=1e-5)


def test_opcheck_with_cu_seqlens():
    lengths = [5, 1, 11]
    inputs, _ = packed_inputs(lengths, Hq=2, Hkv=1, D=16, Ka=3)
    for t in inputs.values():
        t.requires_grad_()
    cu, max_len = packing(lengths)
    args = (*inputs.values(), None, True, 0.25, cu, max_len)
    result = torch.library.opcheck(ops._fwd_op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def _bad(change):
    lengths = [3, 4]
    inputs, _ = packed_inputs(lengths, Hq=2, Hkv=2, D=16, Ka=3)
    kwargs = dict(inputs, cu_seqlens=packing(lengths)[0])
    change(kwargs)
    return kwargs


BAD = [
    ("int64", lambda kw: kw.update(cu_seqlens=kw["cu_seqlens"].long()), TypeError, "cu_seqlens must be int32"),
    ("2d", lambda kw: kw.update(cu_seqlens=kw["cu_seqlens"][None]), ValueError, "cu_seqlens must have shape"),
    ("list", lambda kw: kw.update(cu_seqlens=[0, 3, 7]), TypeError, "cu_seqlens must be a torch.Tensor"),
    ("with-kv-lens", lambda kw: kw.update(kv_lens=torch.tensor([7], dtype=torch.int32)), ValueError, "kv_lens"),
    (
        "batch-2",
        lambda kw: kw.update({n: kw[n].expand(2, -1, -1, -1) for n in ("q", "k", "v")}),
        ValueError,
        "packed rows",
    ),
    (
        "per-sample-prompt",
        lambda kw: kw.update(adapter_k=kw["adapter_k"][None], adapter_v=kw["adapter_v"][None]),
        ValueError,
        "shared prompt",
    ),
    ("per-sample-gate", lambda kw: kw.update(gate=kw["gate"][None]), ValueError, "shared prompt"),
    ("bad-max-seqlen", lambda kw: kw.update(max_seqlen=0), ValueError, "max_seqlen must be a positive int"),
    (
        "wrong-total",
        lambda kw: kw.update(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)),
        ValueError,
        "end at T=7",
    ),
    (
        "decreasing",
        lambda kw: kw.update(cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32)),
        ValueError,
        "never decrease",
    ),
    ("max-without-cu", lambda kw: kw.update(cu_seqlens=None, max_seqlen=4), ValueError, "without cu_seqlens"),
]


@pytest.mark.parametrize("change,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_packed_inputs_raise_before_launch(change, error, match, monkeypatch):
    monkeypatch.setattr(ops, "_fwd_op", None)  # a launch would fail differently
    set_attention_backend("triton")
    with pytest.raises(error, match=match):
        adapter_attention(**_bad(change))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_baselines_refuse_cu_seqlens(backend):
    set_attention_backend(backend)
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        adapter_attention(**_bad(lambda kw: None))


def test_packed_backward_is_deterministic():
    """The shared prompt's gradient sums partials over sequences and query blocks in a fixed order (no atomics)."""
    lengths = [19, 7, 5]
    inputs, do = packed_inputs(lengths, Hq=4, Hkv=2, D=16, Ka=10, seed=3)
    cu, max_len = packing(lengths)
    first, second = (run_op(inputs, do, causal=True, kv_lens=None, cu_seqlens=cu, max_seqlen=max_len) for _ in "ab")
    for a, b in zip(first, second):
        assert torch.equal(a, b)
