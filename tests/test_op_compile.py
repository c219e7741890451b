"""torch.compile on the CPU: the fused op is a registered custom op whose fake implementation matches the real one.

The kernels run under the Triton interpreter here; the compiled model and HF drop-in tests are GPU-marked elsewhere.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip("llama_adapter.ops")
from llama_adapter import ops  # noqa: E402
from llama_adapter.attention import adapter_attention, set_attention_backend  # noqa: E402


def inputs(B=1, Hq=4, Hkv=2, Nq=8, Nk=8, Ka=3, D=16, dtype=torch.float32, per_sample=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    prompt_shape = (B, Hkv, Ka, D) if per_sample else (Hkv, Ka, D)
    return dict(
        q=randn(B, Hq, Nq, D),
        k=randn(B, Hkv, Nk, D),
        v=randn(B, Hkv, Nk, D),
        adapter_k=randn(*prompt_shape),
        adapter_v=randn(*prompt_shape),
        gate=randn(B, Hq) if per_sample else randn(Hq),
    )


def op_args(x, kv_lens=None, causal=True):
    return (x["q"], x["k"], x["v"], x["adapter_k"], x["adapter_v"], x["gate"], kv_lens, causal, 0.25)


@pytest.mark.parametrize("with_prompt", [True, False])
def test_opcheck_forward_op(with_prompt):
    """Schema, fake tensor vs real outputs, autograd registration and AOT dispatch of the training forward."""
    x = inputs(Nq=5, Nk=7)
    if not with_prompt:
        x.update(adapter_k=None, adapter_v=None, gate=None)
    for name in ("q", "k", "v", "adapter_k", "adapter_v", "gate"):
        if x[name] is not None:
            x[name].requires_grad_(True)
    torch.library.opcheck(torch.ops.llama_adapter.adapter_attention_fwd.default, op_args(x))


def test_opcheck_decode_op():
    x = inputs(B=2, Nq=1, Nk=9, per_sample=True)
    kv_lens = torch.tensor([9, 4], dtype=torch.int32)
    torch.library.opcheck(torch.ops.llama_adapter.adapter_attention_decode.default, op_args(x, kv_lens))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("Nq", [1, 6])
def test_fake_tensors_give_shape_and_dtype(dtype, per_sample, Nq):
    """Tracing sees what the kernels would return: (B, Hq, Nq, D) in q's dtype; no kernel runs on fake tensors."""
    set_attention_backend("triton")
    real = inputs(B=2, Hq=8, Hkv=2, Nq=Nq, Nk=11, D=32, dtype=dtype, per_sample=per_sample)
    with FakeTensorMode() as mode:
        x = {name: mode.from_tensor(t) for name, t in real.items()}
        kv_lens = mode.from_tensor(torch.tensor([11, 5], dtype=torch.int32))
        out = adapter_attention(**x, kv_lens=kv_lens)
    assert out.shape == (2, 8, Nq, 32)
    assert out.dtype == dtype
    assert out.device == real["q"].device


def test_compiled_fullgraph_forward_and_backward_equal_eager():
    set_attention_backend("triton")
    x = inputs(Nq=6, Nk=6)
    leaves = {name: t.requires_grad_(True) for name, t in x.items()}

    def loss(**kw):
        return (adapter_attention(**kw) ** 2).sum()

    expected = loss(**leaves)
    expected_grads = torch.autograd.grad(expected, list(leaves.values()))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(**leaves)
    got_grads = torch.autograd.grad(got, list(leaves.values()))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same kernels run, traced or not
    for name, g, e in zip(leaves, got_grads, expected_grads):
        assert e.abs().max() > 0, name
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=name)


def test_compiled_decode_path_is_traced_without_graph_break():
    """Inference with few queries takes the decode op; fullgraph fails on any graph break in the dispatch."""
    set_attention_backend("triton")
    x = inputs(B=2, Nq=1, Nk=9)
    kv_lens = torch.tensor([9, 3], dtype=torch.int32)
    with torch.no_grad():
        expected = adapter_attention(**x, kv_lens=kv_lens)
        got = torch.compile(adapter_attention, fullgraph=True, backend="aot_eager")(**x, kv_lens=kv_lens)
    assert ops._decode_launcher() is not None
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
