"""The custom ops around the kernels: fake (meta) shapes, torch.library.opcheck, torch.compile, decode dispatch."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from llama_adapter import adapter_attention, ops, set_attention_backend


def small_inputs(B=1, Hq=2, Hkv=1, Nq=17, Nk=20, D=16, Ka=3, dtype=torch.float32, requires_grad=True):
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(B, Hq, Nq, D, generator=gen, dtype=dtype),
        torch.randn(B, Hkv, Nk, D, generator=gen, dtype=dtype),
        torch.randn(B, Hkv, Nk, D, generator=gen, dtype=dtype),
        torch.randn(Hkv, Ka, D, generator=gen, dtype=dtype),
        torch.randn(Hkv, Ka, D, generator=gen, dtype=dtype),
        torch.randn(B, Hq, generator=gen),
    ]
    return [t.requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fake_impls_give_the_real_shapes_and_dtypes(dtype):
    q, k, v, ak, av, gate = small_inputs(B=2, Hq=4, Hkv=2, dtype=dtype, requires_grad=False)
    gate = gate[0]  # (Hq,) shared gate
    with FakeTensorMode() as mode:
        fq, fk, fv, fak, fav, fgate = (mode.from_tensor(t) for t in (q, k, v, ak, av, gate))
        o, lse_w, lse_a = ops._fwd_op(fq, fk, fv, fak, fav, fgate, None, True, 0.25)
        grads = ops._bwd_op(o, fq, fk, fv, fak, fav, fgate, None, o, lse_w, lse_a, True, 0.25)
        _, _, no_prompt_lse = ops._fwd_op(fq, fk, fv, None, None, None, None, False, 0.25)
    assert (o.shape, o.dtype) == (q.shape, dtype)
    assert (lse_w.shape, lse_w.dtype) == ((2, 4, 17), torch.float32) and lse_a.shape == (2, 4, 17)
    assert no_prompt_lse.numel() == 0
    for grad, like in zip(grads, (q, k, v, ak, av, gate)):
        assert (grad.shape, grad.dtype) == (like.shape, like.dtype)


@pytest.mark.parametrize("with_prompt", [True, False], ids=["prompt", "no-prompt"])
def test_opcheck(with_prompt):
    q, k, v, ak, av, gate = small_inputs()
    prompt = (ak, av, gate) if with_prompt else (None, None, None)
    kv_lens = None if with_prompt else torch.tensor([13], dtype=torch.int32)
    result = torch.library.opcheck(ops._fwd_op, (q, k, v, *prompt, kv_lens, with_prompt, 0.25))
    assert set(result.values()) == {"SUCCESS"}, result


def _compiled_matches_eager(backend, device):
    set_attention_backend("triton")
    inputs = [t.detach().to(device).requires_grad_() for t in small_inputs()]

    def layer(q, k, v, ak, av, gate):  # a little work around the op, as in a model
        return adapter_attention(q * 2, k, v, ak, av, torch.tanh(gate)).square().sum()

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    eager_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    eager_loss = layer(*eager_inputs)
    eager_grads = torch.autograd.grad(eager_loss, eager_inputs)
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_torch_compile_traces_the_op_without_graph_breaks():
    _compiled_matches_eager("aot_eager", "cpu")  # inductor needs a C++ toolchain; aot_eager still traces fullgraph


@pytest.mark.gpu
def test_torch_compile_inductor_on_gpu():
    _compiled_matches_eager("inductor", "cuda")


def test_decode_kernel_serves_few_queries_without_grad(monkeypatch):
    calls = []
    real = ops._decode_launcher()

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "_decode_launcher", lambda: counting)
    set_attention_backend("triton")
    q, k, v, ak, av, gate = small_inputs(Nq=3, Nk=29, requires_grad=False)
    with torch.no_grad():
        decoded = adapter_attention(q, k, v, ak, av, gate)
    assert calls == [q.shape]
    fused = ops._fwd_op(q, k, v, ak, av, gate, None, True, 0.25)[0]
    torch.testing.assert_close(decoded, fused, rtol=1e-5, atol=1e-5)
    q.requires_grad_()
    adapter_attention(q, k, v, ak, av, gate)  # needs grad: the training kernel, not decode
    assert len(calls) == 1
