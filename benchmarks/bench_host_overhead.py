"""Python overhead of one decode-shaped `adapter_attention` call, with the Triton kernel launches stubbed out.

What a decode step pays on the host before any kernel runs: the input checks, backend dispatch, the custom op,
and the launcher's own work (block sizes, split count, buffers, autotuner look-up). Runs on the CPU: it sets
TRITON_INTERPRET=1 (so CPU tensors take the Triton path) and replaces the interpreter's kernel launch with a
no-op, so what is timed is Python only. On a GPU the launch itself (triton's argument binding and the driver
call, ~20-40 us per kernel) comes on top and is not measured here; nor is the autotuner's multi-config look-up
(the interpreter tunes over one config).

    python -m benchmarks.bench_host_overhead                 # 7B-shaped: B=1, Hq=Hkv=32, D=128, Ka=10
    python -m benchmarks.bench_host_overhead --profile       # plus the top functions by cumulative time

Prints microseconds per call (median of --repeats runs of --calls calls each, thread CPU time) for: a decode step
with a prompt and kv_lens (what `generate` runs per layer), the same without kv_lens, a step without a prompt, and
the input checks alone for the first case (on CPU tensors they include reading kv_lens's values; on CUDA they do
not).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel modules are imported: before any of them

import torch  # noqa: E402

from llama_adapter.validation import POSITIVE_INT  # noqa: E402


def stub_kernel_launches() -> None:
    """Make every Triton kernel launch a no-op (the interpreter's entry point; the autotuner calls it too)."""
    from triton.runtime.interpreter import InterpretedFunction

    InterpretedFunction.run = lambda self, *args, grid, warmup, **kwargs: None


def decode_inputs(batch, heads, kv_heads, head_dim, cache_len, prompt_len, dtype):
    q = torch.randn(batch, heads, 1, head_dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, cache_len, head_dim, dtype=dtype)
    v = torch.randn_like(k)
    ak = torch.randn(kv_heads, prompt_len, head_dim, dtype=dtype)
    av = torch.randn_like(ak)
    gate = torch.randn(heads, dtype=torch.float32)
    kv_lens = torch.full((batch,), cache_len // 2, dtype=torch.int32)
    return q, k, v, ak, av, gate, kv_lens


def time_calls(fn, calls: int, repeats: int) -> float:
    """Median microseconds per call, in this thread's CPU time: on a shared machine wall time also counts the
    time other processes hold the core, which here was several times the figure itself."""
    for _ in range(max(10, calls // 10)):  # first calls compile plans, import modules, fill caches
        fn()
    runs = []
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        runs.append((time.thread_time() - start) / calls * 1e6)
    return statistics.median(runs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=POSITIVE_INT, default=1)
    parser.add_argument("--heads", type=POSITIVE_INT, default=32)
    parser.add_argument("--kv-heads", type=POSITIVE_INT, default=32)
    parser.add_argument("--head-dim", type=POSITIVE_INT, default=128)
    parser.add_argument("--cache-len", type=POSITIVE_INT, default=640)
    parser.add_argument("--prompt-len", type=POSITIVE_INT, default=10)
    parser.add_argument("--calls", type=POSITIVE_INT, default=2000)
    parser.add_argument("--repeats", type=POSITIVE_INT, default=5)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the prompt+kv_lens case")
    args = parser.parse_args(argv)

    stub_kernel_launches()
    from llama_adapter import adapter_attention
    from llama_adapter.attention import check_inputs, set_attention_backend

    set_attention_backend("triton")
    torch.set_grad_enabled(False)
    q, k, v, ak, av, gate, kv_lens = decode_inputs(
        args.batch, args.heads, args.kv_heads, args.head_dim, args.cache_len, args.prompt_len, torch.float16
    )
    cases = {
        "prompt + kv_lens (generate)": lambda: adapter_attention(q, k, v, ak, av, gate, kv_lens=kv_lens),
        "prompt, no kv_lens": lambda: adapter_attention(q, k, v, ak, av, gate),
        "no prompt, no kv_lens": lambda: adapter_attention(q, k, v),
        "of which check_inputs (1st case)": lambda: check_inputs(q, k, v, ak, av, gate, kv_lens=kv_lens),
    }
    shape = f"B={args.batch} Hq={args.heads} Hkv={args.kv_heads} Nq=1 Nk={args.cache_len} D={args.head_dim}"
    print(f"adapter_attention host overhead, kernel launches stubbed ({shape}, Ka={args.prompt_len}, fp16, CPU)")
    print(f"torch {torch.__version__}")
    for name, fn in cases.items():
        print(f"  {name:<34} {time_calls(fn, args.calls, args.repeats):8.1f} us/call")
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            cases["prompt + kv_lens (generate)"]()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
