"""Greedy decoding of a 7B-shaped LLaMA with the adapter after a 512-token prompt, at batch 1 and 16.

Random weights on the device (no download); `llama_adapter.generation.generate` with its static KV cache.
Each decoding step is timestamped through generate's `callback` (every step ends in a host sync when the
tokens are read), so prefill and per-token decode latency come from one call. Rows: prefill ms, ms per
decoded token (median step), tokens/s (B / step), and achieved GB/s:

    bytes per step = weight bytes (all but the embedding table, of which B rows are read)
                   + KV-cache bytes read: 2 * n_layers * B * Hkv * D * (prompt + tokens so far) * element size

against the device's memory bandwidth (H100 SXM 3.35 TB/s). Achieved GB/s near the bandwidth means the
decode is memory-bound as it should be; far under means launch or host overhead.

    python -m benchmarks.bench_generate                      # 7B, prompt 512, batches 1,16, triton and sdpa
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_finetune import PROVIDER
from benchmarks.common import (
    DTYPES,
    HAS_CUDA,
    Budget,
    Results,
    add_common_args,
    build_model,
    describe_error,
    free_memory,
    int_list,
    is_fatal,
    log,
    peak_memory_mb,
    reset_peak_memory,
    significant,
    skip_reason,
    str_list,
    synchronize,
)
from benchmarks.plot import maybe_plot
from llama_adapter.validation import POSITIVE_INT


def timed_generate(model, prompts, new_tokens: int) -> list[float]:
    """Seconds from the call to each step's tokens: [prefill + first token, then one per decoded token]."""
    from llama_adapter.generation import generate

    stamps = []
    synchronize()
    start = time.perf_counter()
    out = generate(
        model, prompts, new_tokens, temperature=0.0, callback=lambda step: stamps.append(time.perf_counter())
    )
    if any(len(row) != new_tokens for row in out):
        raise RuntimeError(f"generate returned {[len(r) for r in out]} tokens per row, expected {new_tokens}")
    return [t - start for t in stamps]


def decode_bytes(model, B: int, context: float) -> float:
    """Bytes one decoding step must read: weights once, the KV cache of `context` positions per row."""
    from llama_adapter.quantize import tensor_bytes  # quantized weights: their packed data and scales

    p = model.params
    weights = sum(tensor_bytes(w) for name, w in model.named_parameters() if "tok_embeddings" not in name)
    elem = model.tok_embeddings.weight.element_size()
    return weights + 2 * p.n_layers * B * p.n_kv_heads * p.head_dim * context * elem


def run(args: argparse.Namespace) -> Results:
    from llama_adapter.attention import get_attention_backend, set_attention_backend

    previous_backend = get_attention_backend()

    device = "cuda" if HAS_CUDA else "cpu"
    size = args.model or ("7B" if HAS_CUDA else "tiny")
    prompt_len = args.prompt or (512 if HAS_CUDA else 8)
    new_tokens = args.new_tokens or (64 if HAS_CUDA else 4)
    dtype = DTYPES[args.dtype or ("bf16" if HAS_CUDA else "fp32")]
    results = Results("generate", args.out, args)
    dev = results.device
    budget = Budget(args.budget)
    log(f"generate on {dev.name}: {size} prompt={prompt_len} new={new_tokens} -> {results.path}")
    fatal = None
    for quantize in str_list(args.quantize):
        fatal = run_base(args, results, budget, quantize, size, prompt_len, new_tokens, device, dtype, fatal)
    set_attention_backend(previous_backend)
    maybe_plot(results, args)
    return results


def run_base(
    args,
    results: Results,
    budget: Budget,
    quantize: str,
    size: str,
    prompt_len: int,
    new_tokens: int,
    device,
    dtype,
    fatal: str | None,
) -> str | None:
    """The rows of one base (full precision, nf4 or int8) for every backend and batch; returns a CUDA-fatal error."""
    from llama_adapter.quantize import weight_bytes

    base = dict(
        model=size,
        dtype=str(dtype).removeprefix("torch."),
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        quantize=quantize,
    )
    model = None
    try:
        seq = prompt_len + new_tokens
        model = build_model(size, layers=args.layers, seq=seq, device=device, dtype=dtype, quantize=quantize)
        base.update(layers=model.params.n_layers, weight_mb=round(weight_bytes(model) / 2**20, 1))
    except Exception as exc:
        build_error = f"model build failed: {describe_error(exc)}"
    gen = torch.Generator().manual_seed(0)
    suffix = "" if quantize == "none" else f"+{quantize}"
    for backend in str_list(args.backends):
        for B in int_list(args.batches or "1,16"):
            row = {
                **base,
                "provider": PROVIDER.get(backend, backend) + suffix,
                "backend": backend,
                "B": B,
                "error": build_error if model is None else skip_reason(budget, fatal),
            }
            row.update(ms_per_token=None, tokens_per_s=None)
            if row["error"] is None:
                measure_decode(row, model, prompt_len, new_tokens, gen, results.device)
                fatal = row["error"][:120] if is_fatal(row["error"]) else None
            results.add(row)
            log(format_row(row))
    del model
    free_memory()
    return fatal


def measure_decode(row: dict, model, prompt_len: int, new_tokens: int, gen, dev) -> None:
    """Fill the row of `row["backend"]` at batch `row["B"]`: prefill, per-token decode and the bandwidth it reaches;
    an exception becomes the row's error."""
    from llama_adapter.attention import set_attention_backend

    set_attention_backend(row["backend"])
    B, vocab = row["B"], model.params.vocab_size
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(B)]
    try:
        timed_generate(model, prompts, 2)  # warm-up: compiles / autotunes prefill and decode
        reset_peak_memory()
        stamps = timed_generate(model, prompts, new_tokens)
        row["peak_mem_mb"] = peak_memory_mb()
    except Exception as exc:
        row["error"] = describe_error(exc)
    if not row["error"]:
        step = statistics.median([b - a for a, b in zip(stamps, stamps[1:])])
        context = prompt_len + new_tokens / 2  # the cache's mean length over the decode
        gbs = decode_bytes(model, B, context) / step / 1e9
        row.update(
            prefill_ms=significant(stamps[0] * 1e3),
            ms_per_token=significant(step * 1e3),
            tokens_per_s=significant(B / step),
            gb_per_s=significant(gbs),
        )
        if dev.bandwidth_gbs:
            row["pct_bandwidth"] = round(100 * gbs / dev.bandwidth_gbs, 1)
    free_memory()


def format_row(row: dict) -> str:
    head = f"{row['provider']:>14} B={row['B']:>3}"
    if row["error"]:
        return f"{head}: {row['error']}"
    return (
        f"{head}: prefill {row['prefill_ms']:.1f} ms, {row['ms_per_token']:.2f} ms/token, "
        f"{row['tokens_per_s']:.1f} tokens/s, {row['gb_per_s']:.0f} GB/s"
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="triton,sdpa", help="attention backends (set_attention_backend)")
    p.add_argument("--model", default=None, help="ModelArgs.from_name size (default 7B; 'tiny' on the CPU)")
    p.add_argument("--layers", type=POSITIVE_INT, default=None, help="fewer layers for a quick run")
    p.add_argument("--prompt", type=POSITIVE_INT, default=None, help="prompt tokens (default 512)")
    p.add_argument("--new-tokens", type=POSITIVE_INT, default=None, help="decoded tokens (default 64)")
    p.add_argument("--batches", default=None, help="batch sizes (default 1,16)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--quantize", default="none", help="frozen bases to run, of none,nf4,int8 (torchao)")
    add_common_args(p, budget=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
