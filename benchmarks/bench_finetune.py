"""One adapter fine-tuning step (forward, backward, AdamW on the prompts and gates) of a 7B-shaped LLaMA.

Random weights built directly on the device in the compute dtype (no download); adapter length 10 on the top
30 layers; sequence 512; for each attention backend the largest micro-batch of --batches that fits. Rows:
step ms (median of --steps), tokens/s, model FLOP utilisation, peak memory.

Model FLOPs of one step, T = B * N tokens (a frozen base gets no weight gradients, so 6*P*T would overstate it):
  forward    2 * P * T + n_layers * A              P: every matmul weight (attention, MLP, output head)
  backward   2 * P_bwd * T + n_adapted * 2.5 * A   P_bwd: matmul weights at and above the lowest adapted layer,
                                                   plus the head (activation gradients only; nothing flows
                                                   below the lowest prompt)
  A = 4 * B * H * N^2 * D * 0.5 (causal words) + 4 * B * H * N * Ka * D (prompt), the prompt only where adapted
MFU = model FLOPs / step time / the device's dense bf16 peak.

    python -m benchmarks.bench_finetune                       # 7B, seq 512, backends triton,sdpa,eager
    python -m benchmarks.bench_finetune --layers 4 --batches 8,4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (
    DTYPES,
    HAS_CUDA,
    Budget,
    Results,
    add_common_args,
    attention_flops,
    build_model,
    describe_error,
    free_memory,
    int_list,
    is_fatal,
    is_oom,
    log,
    peak_memory_mb,
    reset_peak_memory,
    significant,
    skip_reason,
    str_list,
    synchronize,
)
from benchmarks.plot import maybe_plot
from llama_adapter.validation import NON_NEGATIVE_INT, POSITIVE_INT

# attention backend -> provider name used across the benchmarks
PROVIDER = {"triton": "fused", "sdpa": "sdpa_adapter", "eager": "eager", "reference": "reference"}


def step_flops(model, B: int, N: int) -> float:
    p = model.params
    cfg = model.adapter_config
    first = model.first_adapter_layer()

    def matmul_params(modules) -> int:
        return sum(
            w.numel() for m in modules for name, w in m.named_parameters() if w.dim() == 2 and "adapter" not in name
        )

    head = model.output.weight.numel()
    per_layer = [matmul_params([layer]) for layer in model.layers]
    T = B * N
    words = attention_flops(B, p.n_heads, N, N, p.head_dim, causal=True)
    prompt = 4.0 * B * p.n_heads * N * cfg.adapter_len * p.head_dim if cfg else 0.0
    n_adapted = p.n_layers - first
    forward = 2.0 * (sum(per_layer) + head) * T + p.n_layers * words + n_adapted * prompt
    backward = 2.0 * (sum(per_layer[first:]) + head) * T + n_adapted * 2.5 * (words + prompt)
    return forward + backward


def train_step(model, optimizer, tokens):
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def try_step(model, optimizer, tokens) -> str | None:
    """One step; the error line if it failed. The traceback is dropped before memory is freed."""
    try:
        train_step(model, optimizer, tokens)
        synchronize()
        return None
    except Exception as exc:
        error = describe_error(exc)
    optimizer.zero_grad(set_to_none=True)
    free_memory()
    return error


def run(args: argparse.Namespace) -> Results:
    from llama_adapter.attention import get_attention_backend, set_attention_backend

    previous_backend = get_attention_backend()

    device = "cuda" if HAS_CUDA else "cpu"
    size = args.model or ("7B" if HAS_CUDA else "tiny")
    seq = args.seq or (512 if HAS_CUDA else 16)
    batches = int_list(args.batches or ("16,12,8,6,4,2,1" if HAS_CUDA else "2,1"))
    dtype = DTYPES[args.dtype or ("bf16" if HAS_CUDA else "fp32")]
    results = Results("finetune", args.out, args)
    dev = results.device
    budget = Budget(args.budget)
    log(f"finetune on {dev.name}: {size} layers={args.layers or 'all'} seq={seq} -> {results.path}")
    fatal = None
    for quantize in str_list(args.quantize):
        fatal = run_base(args, results, budget, quantize, size, seq, batches, device, dtype, fatal)
    set_attention_backend(previous_backend)
    maybe_plot(results, args)
    return results


def run_base(
    args,
    results: Results,
    budget: Budget,
    quantize: str,
    size: str,
    seq: int,
    batches: list[int],
    device,
    dtype,
    fatal: str | None,
) -> str | None:
    """The rows of one base (full precision, nf4 or int8) for every backend; returns the CUDA-fatal error seen."""
    base = dict(
        dtype=str(dtype).removeprefix("torch."),
        N=seq,
        model=size,
        B=None,
        ms=None,
        tokens_per_s=None,
        quantize=quantize,
    )
    providers = [
        (PROVIDER.get(b, b) + ("" if quantize == "none" else f"+{quantize}"), b) for b in str_list(args.backends)
    ]
    try:
        model = build_model(
            size, layers=args.layers, seq=seq + 1, device=device, dtype=dtype, adapter_len=args.ka, quantize=quantize
        )
    except Exception as exc:
        error = f"model build failed: {describe_error(exc)}"
        for provider, backend in providers:
            results.add({**base, "provider": provider, "backend": backend, "error": error})
        return fatal
    base.update(model_columns(model))
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    for provider, backend in providers:
        row = {**base, "provider": provider, "backend": backend, "error": skip_reason(budget, fatal), "tried": []}
        if row["error"] is None:
            measure_backend(row, model, optimizer, batches, seq, device, gen, args, budget, results.device)
            fatal = row["error"][:120] if is_fatal(row["error"]) else None
        results.add(row)
        log(format_row(row))
    del model, optimizer
    free_memory()
    return fatal


def model_columns(model) -> dict:
    """The columns every row of one base shares: its shape, adapter, parameter counts and weight memory."""
    from llama_adapter.quantize import weight_bytes

    p = model.params
    return dict(
        layers=p.n_layers,
        dim=p.dim,
        Ka=model.adapter_config.adapter_len,
        adapter_layers=model.adapter_config.adapter_layers,
        params=sum(w.numel() for w in model.parameters()),
        trainable=sum(w.numel() for w in model.adapter_parameters()),
        weight_mb=round(weight_bytes(model) / 2**20, 1),
    )


def measure_backend(
    row: dict, model, optimizer, batches: list[int], seq: int, device, gen, args, budget: Budget, dev
) -> None:
    """Fill the row of `row["backend"]`: the largest batch that fits, then the timing of its steps."""
    from llama_adapter.attention import set_attention_backend

    set_attention_backend(row["backend"])
    B, tokens, row["error"] = largest_batch(model, optimizer, row, batches, seq, device, gen, budget)
    if row["error"] is None:
        row["B"] = B
        row["peak_mem_mb"] = peak_memory_mb()
        row.update(time_steps(model, optimizer, tokens, args, budget, dev))
    del tokens
    free_memory()


def largest_batch(model, optimizer, row: dict, batches: list[int], seq: int, device, gen, budget: Budget):
    """(B, tokens, error) of the first of `batches` (descending) whose step does not run out of memory, each try
    recorded in row["tried"]; error is the last try's (None: B fits)."""
    for B in batches:
        tokens = torch.randint(0, model.params.vocab_size, (B, seq + 1), device=device, generator=gen)
        reset_peak_memory()
        error = try_step(model, optimizer, tokens)  # also the warm-up (autotuning, first allocations)
        row["tried"].append({"B": B, "error": error})
        if error is None or not is_oom(error) or budget.expired():
            break
        log(f"{row['provider']:>14}: B={B} does not fit")
    return B, tokens, error


def time_steps(model, optimizer, tokens, args, budget: Budget, dev) -> dict:
    """The row's timing columns: median step time of --steps after --warmup, tokens/s, TFLOP/s and MFU."""
    B, seq = tokens.shape[0], tokens.shape[1] - 1
    times = []
    for _ in range(args.warmup + args.steps):
        synchronize()
        start = time.perf_counter()
        train_step(model, optimizer, tokens)
        synchronize()
        times.append(time.perf_counter() - start)
        if budget.expired() and len(times) > args.warmup:
            break
    timed = times[args.warmup :] or times[-1:]
    seconds = statistics.median(timed)
    flops = step_flops(model, B, seq)
    columns = dict(
        ms=significant(seconds * 1e3),
        tokens_per_s=significant(B * seq / seconds),
        steps_timed=len(timed),
        tflops=significant(flops / seconds / 1e12),
    )
    if dev.peak_tflops:
        columns["mfu_pct"] = round(100 * flops / seconds / 1e12 / dev.peak_tflops, 1)
    return columns


def format_row(row: dict) -> str:
    if row["error"]:
        return f"{row['provider']:>14}: {row['error']}"
    mfu = f" MFU {row['mfu_pct']}%" if "mfu_pct" in row else ""
    mem = f" peak {row['peak_mem_mb']:.0f} MiB" if row.get("peak_mem_mb") else ""
    return f"{row['provider']:>14}: B={row['B']} {row['ms']:.1f} ms/step {row['tokens_per_s']:.0f} tokens/s{mfu}{mem}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="triton,sdpa,eager", help="attention backends (set_attention_backend)")
    p.add_argument("--model", default=None, help="ModelArgs.from_name size (default 7B; 'tiny' on the CPU)")
    p.add_argument("--layers", type=POSITIVE_INT, default=None, help="fewer layers for a quick run")
    p.add_argument("--seq", type=POSITIVE_INT, default=None, help="sequence length (default 512)")
    p.add_argument("--batches", default=None, help="micro-batches to try, descending (default 16,12,8,6,4,2,1)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--ka", type=NON_NEGATIVE_INT, default=10, help="adapter prompt length")
    p.add_argument("--quantize", default="none", help="frozen bases to run, of none,nf4,int8 (torchao)")
    p.add_argument(
        "--warmup", type=NON_NEGATIVE_INT, default=1, help="untimed steps after the one that found the batch"
    )
    p.add_argument("--steps", type=POSITIVE_INT, default=3, help="timed steps")
    add_common_args(p, budget=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
