"""Packed vs padded fine-tuning steps on an Alpaca-like length mix (issue 7): tokens/s of real (non-pad) tokens.

A micro-batch of --batch examples with lengths drawn uniformly from --min-len..--max-len (Alpaca's instructions
run ~50..512 tokens) goes through one adapter training step (forward, loss, backward) twice: right-padded to the
longest, (B, N_max), and packed into one row with cu_seqlens, (1, sum of lengths). Packing skips the pads' compute
(attention and every matmul), so the gain approaches N_max / mean length. Rows: mode, step ms (median), real
tokens/s, share of pad tokens, peak memory.

    python -m benchmarks.bench_packing                         # 7B shape, 4 layers, batch 8, 50..512
    python -m benchmarks.bench_packing --size tiny --layers 1 --max-len 40 --batch 4   # CPU smoke run
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import (
    DTYPES,
    HAS_CUDA,
    Budget,
    Results,
    add_common_args,
    build_model,
    describe_error,
    log,
    peak_memory_mb,
    reset_peak_memory,
    time_ms,
)
from llama_adapter.validation import ANY_INT, NON_NEGATIVE, POSITIVE_INT


def length_mix(n: int, low: int, high: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (n,), generator=gen).tolist()


def micro_batches(model, lengths: list[int], device) -> dict:
    """{"padded": (tokens, labels, {}), "packed": (tokens, labels, {layout})} of random tokens,
    every token a target, as `llama_adapter.data.collate` lays them out."""
    from llama_adapter.data import IGNORE_INDEX, collate

    gen = torch.Generator().manual_seed(0)
    items = [(torch.randint(3, model.params.vocab_size, (n,), generator=gen).tolist(), 1) for n in lengths]
    out = {}
    for mode in ("padded", "packed"):
        batch = collate(items, pad_id=0, pack=mode == "packed")
        extra = {}
        if mode == "packed":
            extra = dict(layout=batch["layout"].to(device))
        assert (batch["labels"] != IGNORE_INDEX).sum() == sum(n - 1 for n in lengths)
        out[mode] = (batch["tokens"].to(device), batch["labels"].to(device), extra)
    return out


def run(args: argparse.Namespace) -> Results:
    from llama_adapter import set_attention_backend
    from llama_adapter.recipe import lm_loss_sum

    device = torch.device("cuda" if HAS_CUDA else "cpu")
    set_attention_backend(args.backend)
    budget = Budget(args.budget)
    results = Results("bench_packing", args.out, args)
    model = build_model(args.size, layers=args.layers, seq=args.max_len, device=device, dtype=DTYPES[args.dtype])
    lengths = length_mix(args.batch, args.min_len, args.max_len, args.seed)
    log(f"lengths {lengths}: mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}")
    for mode, (tokens, labels, extra) in micro_batches(model, lengths, device).items():

        def step(tokens=tokens, labels=labels, extra=extra):
            model.zero_grad(set_to_none=True)
            lm_loss_sum(model(tokens, **extra), labels).backward()

        row = dict(
            mode=mode,
            backend=args.backend,
            dtype=args.dtype,
            size=args.size,
            layers=args.layers,
            batch=args.batch,
            tokens=sum(lengths),
            shape=list(tokens.shape),
        )
        if budget.expired():
            log(f"budget of {args.budget:.0f}s spent: {mode} skipped")
            break
        try:
            reset_peak_memory()
            ms = time_ms(step, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
            row.update(
                step_ms=ms,
                tokens_per_s=sum(lengths) / ms * 1e3,
                pad_share=1 - sum(lengths) / tokens.numel(),
                peak_mb=peak_memory_mb(),
            )
        except Exception as exc:  # a failing mode is a row, not the end of the run
            row["error"] = describe_error(exc)
        results.add(row)
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return results  # no plot: two rows read best as the table above


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # without CUDA a tiny fp32 shape, so both modes run in seconds (the comparison is the point, not the times)
    p.add_argument("--size", default="7B" if HAS_CUDA else "tiny", help="ModelArgs.from_name shape")
    p.add_argument("--layers", type=POSITIVE_INT, default=4 if HAS_CUDA else 2, help="transformer layers (all adapted)")
    p.add_argument("--batch", type=POSITIVE_INT, default=8 if HAS_CUDA else 4, help="examples per micro-batch")
    p.add_argument("--min-len", type=POSITIVE_INT, default=50 if HAS_CUDA else 4)
    p.add_argument("--max-len", type=POSITIVE_INT, default=512 if HAS_CUDA else 32)
    p.add_argument("--seed", type=ANY_INT, default=0)
    p.add_argument("--backend", default="triton" if HAS_CUDA else "reference")
    p.add_argument("--dtype", default="bf16" if HAS_CUDA else "fp32", choices=sorted(DTYPES))
    p.add_argument("--warmup-ms", type=NON_NEGATIVE, default=25 if HAS_CUDA else 0)
    p.add_argument("--rep-ms", type=NON_NEGATIVE, default=200 if HAS_CUDA else 20)
    add_common_args(p, budget=120)
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
