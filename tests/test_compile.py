"""torch.compile of the model (fullgraph) and the static-cache decode of `generate(compile=True)`.

On the CPU, backend="aot_eager" traces everything dynamo and AOT autograd do (graph breaks, functionalised cache
writes, the backward) without building C++; the reference attention backend. GPU-marked: inductor and CUDA
graphs (mode="reduce-overhead") on the Triton backend, and tokens/s eager vs compiled. The op's fake
implementation and opcheck are tested in test_ops.py and test_op_compile.py.
"""

import time

import pytest
import torch
from test_generation import make_model, prompts_of, stream_logits

from llama_adapter import AdapterConfig, LLaMA, ModelArgs, generation
from llama_adapter.attention import set_attention_backend
from llama_adapter.generation import generate, generate_stream
from llama_adapter.multi_adapter import Adapter

CPU_COMPILE = {"backend": "aot_eager"}


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_forward_and_adapter_grads_compile_fullgraph(backend):
    """The training forward and backward trace whole; on "triton" the fused op's fake impl stands in for tracing
    and the kernels run (interpreter) in float32, so compiled and eager run the very same kernels."""
    dtype, tol = (torch.float64, 1e-12) if backend == "reference" else (torch.float32, 1e-6)
    if backend == "triton":
        pytest.importorskip("llama_adapter.ops")
    model = make_model(n_layers=2).to(dtype)  # compile time grows with the (unrolled) layers
    set_attention_backend(backend)
    tokens = torch.tensor(prompts_of([7, 7]))

    def loss_and_grads(forward):
        loss = forward(tokens).square().mean()
        return loss, torch.autograd.grad(loss, model.adapter_parameters())

    expected, expected_grads = loss_and_grads(model)
    got, grads = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)
    for g, e in zip(grads, expected_grads):
        assert e.abs().max() > 0
        torch.testing.assert_close(g, e, rtol=0, atol=tol * e.abs().max().item())


def test_static_cache_equals_dynamic_cache():
    """A static cache attends over all its max_len keys with kv_lens: the same logits, with no host sync."""
    model = make_model()
    prompts = prompts_of([5, 2, 8])
    B, longest = len(prompts), 8
    padded = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])
    lengths = torch.tensor([len(p) for p in prompts])
    steps = torch.tensor(prompts_of([4, 4, 4], seed=3)).T[:, :, None]  # (4 steps, B, 1) tokens to feed
    caches = [model.new_cache(B, max_len=20), model.new_cache(B, max_len=32, static=True)]
    with torch.no_grad():
        runs = [
            [model(padded, cache=c, input_pos=torch.zeros(B, dtype=torch.long), logits_pos=lengths - 1)] for c in caches
        ]
        for i, tokens in enumerate(steps):
            for run, cache in zip(runs, caches):
                run.append(model(tokens, cache=cache, input_pos=lengths + i))
    assert caches[0].length == longest + len(steps) and caches[1].length == 0  # the static cache never learnt a length
    for static, dynamic in zip(*runs[::-1]):
        torch.testing.assert_close(static, dynamic, rtol=0, atol=1e-12)


def test_compiled_static_decode_equals_eager_and_does_not_recompile():
    """generate(compile=True) with two adapters and the base model in one batch: eager's greedy tokens and
    logits. Later calls of the same batch size reuse the graph and the static cache; a generation running
    at the same time gets a cache of its own."""
    model = make_model(adapter=None, n_layers=2)
    adapters = []
    for seed in (1, 2):
        model.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=2))
        for p in model.adapter_parameters():
            p.data.normal_(generator=torch.Generator().manual_seed(seed))
        adapters.append(Adapter.from_model(model))
    rows = [adapters[0], None, adapters[1]]
    prompts, other_prompts = prompts_of([4, 7, 3]), prompts_of([5, 2, 6], seed=9)
    compiled = dict(adapters=rows, compile=True, compile_options=CPU_COMPILE)
    eager_tokens, eager_logits = stream_logits(model, prompts, 6, adapters=rows)
    got_tokens, got_logits = stream_logits(model, prompts, 6, **compiled)
    assert got_tokens == eager_tokens
    torch.testing.assert_close(got_logits, eager_logits, rtol=0, atol=1e-12)

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    cache = generation._STATIC_CACHES[model]
    assert generate(model, other_prompts, 6, **compiled) == generate(model, other_prompts, 6, adapters=rows)
    assert generation._STATIC_CACHES[model] is cache
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs

    running = generate_stream(model, prompts, 6, **compiled)
    head = [next(running).tokens for _ in range(2)]
    assert generate(model, other_prompts, 6, **compiled) == generate(model, other_prompts, 6, adapters=rows)
    assert head + [step.tokens for step in running] == eager_tokens


# ----- GPU -----
def gpu_model(dtype, seed=0, **overrides):
    torch.manual_seed(seed)
    # two layers: inductor's compile time grows with them, and the GPU suite's pytest step has ~100 s for all
    args = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=64, max_seq_len=512)
    model = LLaMA(ModelArgs(**{**args, **overrides}), AdapterConfig(adapter_len=10, adapter_layers=2))
    model = model.to(device="cuda", dtype=dtype)
    for p in model.adapter_parameters():
        p.data.normal_()
    return model


@pytest.mark.gpu
def test_gpu_model_compiles_fullgraph_with_the_triton_kernels():
    set_attention_backend("triton")
    model = gpu_model(torch.float32)
    tokens = torch.randint(0, 1000, (2, 100), device="cuda")

    def loss_and_grads(forward):
        loss = forward(tokens).float().square().mean()
        return loss, torch.autograd.grad(loss, model.adapter_parameters())

    expected, expected_grads = loss_and_grads(model)
    got, grads = loss_and_grads(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5 * e.abs().max().item())


@pytest.mark.gpu
def test_gpu_compiled_decode_equals_eager_and_replays_cuda_graphs(capsys):
    """CUDA graphs over the static cache: eager's greedy tokens; tokens/s eager vs compiled are printed, not
    asserted (a shared GPU's load decides them)."""
    set_attention_backend("triton")
    model = gpu_model(torch.float32)
    prompts = [list(range(1, 60)), list(range(7, 30))]
    torch._dynamo.utils.counters.clear()

    def timed(**kw):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(model, prompts, 48, **kw)
        torch.cuda.synchronize()
        return out, sum(map(len, out)) / (time.perf_counter() - start)

    timed()  # warm-up: kernels' autotuning and first launches
    timed(compile=True)  # compile, record the graph
    eager, eager_rate = timed()
    compiled, compiled_rate = timed(compile=True)
    with capsys.disabled():  # shown in the GPU suite's log although the test passes
        print(f"\ndecode B=2 (dim 256, 2 layers, fp32): eager {eager_rate:.0f} tokens/s, compiled {compiled_rate:.0f}")
    assert compiled == eager
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"], "CUDA graphs were not used"
    assert eager_rate > 0 and compiled_rate > 0
