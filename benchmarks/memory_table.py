"""Device memory of adapter fine-tuning, computed from the model's shapes: bf16, int8 and nf4 bases.

Counted (bf16 compute, the fused attention, nothing offloaded):
  base         the 7 block linears of every layer, stored as the format holds them (`quantized_nbytes`)
  other        embedding, output head and norms, always bf16
  adapter      prompts and gates in fp32 with their gradients and AdamW's two moments (16 bytes each)
  acts/seq     what autograd keeps per 512-token sequence, in the adapted layers only (no gradient flows below the
               lowest prompt; frozen linears keep no inputs), per token and layer: the two RMSNorms' fp32 inputs
               (2 x 4 dim), q, k, v and the attention output (2 x (2 dim + 2 kv_dim)), the log-sum-exp (4 H), the
               SwiGLU's w1 and w3 outputs and silu (3 x 2 hidden); plus the loss's fp32 log-softmax and logit
               gradient (~10 vocab bytes per token)
  ckpt/seq     the same with --grad-checkpointing: each adapted layer keeps its bf16 input, one layer is live
  transient    dequantizing the largest matrix for one matmul (torchao, eager, measured on the CPU: nf4 16, int8 2
               bytes per weight; benchmarks/NOTES.md); bf16 reads its weights in place
Not counted: the CUDA context and allocator slack (~1-3 GB), which the "fits" columns leave room for.

    python -m benchmarks.memory_table                  # the table in benchmarks/NOTES.md
"""

from __future__ import annotations

import argparse

from llama_adapter import ModelArgs
from llama_adapter.quantize import quantized_nbytes
from llama_adapter.validation import NON_NEGATIVE, POSITIVE_INT

GB = 1e9
FORMATS = (None, "int8", "nf4")
DEQUANT_BYTES_PER_WEIGHT = {None: 0, "int8": 2, "nf4": 16}  # measured, see the module docstring


def layer_matrices(p: ModelArgs) -> list[tuple[int, int]]:
    """(out, in) of the 7 block linears of one layer."""
    kv = p.n_kv_heads * p.head_dim
    return [
        (p.dim, p.dim),
        (kv, p.dim),
        (kv, p.dim),
        (p.dim, p.dim),
        (p.hidden_dim, p.dim),
        (p.dim, p.hidden_dim),
        (p.hidden_dim, p.dim),
    ]


def finetune_memory(
    p: ModelArgs, quantize: str | None, seq: int = 512, adapter_layers: int = 30, adapter_len: int = 10
) -> dict[str, float]:
    """Bytes of each component (see the module docstring) for one base format."""
    adapted = min(adapter_layers, p.n_layers)
    kv = p.n_kv_heads * p.head_dim
    base = p.n_layers * sum(quantized_nbytes(r, c, quantize) for r, c in layer_matrices(p))
    other = 2 * (2 * p.vocab_size * p.dim + (2 * p.n_layers + 1) * p.dim)
    adapter = 16 * adapted * (adapter_len * p.dim + p.n_heads)
    per_token_layer = 2 * (4 * p.dim + 4) + 2 * (2 * p.dim + 2 * kv) + 4 * p.n_heads + 3 * 2 * p.hidden_dim
    loss = 10 * p.vocab_size * seq
    acts = adapted * seq * per_token_layer + loss
    ckpt = adapted * seq * 2 * p.dim + seq * per_token_layer + loss
    transient = DEQUANT_BYTES_PER_WEIGHT[quantize] * max(r * c for r, c in layer_matrices(p))
    return dict(base=base, other=other, adapter=adapter, acts=acts, ckpt=ckpt, transient=transient)


def total(m: dict[str, float], batch: int, checkpointing: bool = False) -> float:
    fixed = m["base"] + m["other"] + m["adapter"] + m["transient"]
    return fixed + batch * (m["ckpt"] if checkpointing else m["acts"])


def largest_batch(m: dict[str, float], budget_gb: float, checkpointing: bool) -> int:
    """The largest micro-batch whose total fits in budget_gb (0 if not even one)."""
    per_seq = m["ckpt"] if checkpointing else m["acts"]
    room = budget_gb * GB - total(m, 0)
    return max(0, int(room // per_seq))


def table(models=("7B", "13B", "70B"), seq: int = 512, reserve_gb: float = 3.0) -> str:
    head = (
        "| model | base | base GB | other GB | adapter+AdamW GB | acts GB/seq | acts GB/seq (ckpt) | "
        "dequant GB | total B=1 | total B=8 | total B=8 (ckpt) | max B on 80 GB | max B on 141 GB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in models:
        p = ModelArgs.from_name(name)
        for fmt in FORMATS:
            m = finetune_memory(p, fmt, seq)

            def fits(gb):
                plain, ckpt = largest_batch(m, gb - reserve_gb, False), largest_batch(m, gb - reserve_gb, True)
                return f"{plain} ({ckpt} ckpt)"

            cells = [
                name,
                fmt or "bf16",
                *(f"{m[k] / GB:.2f}" for k in ("base", "other", "adapter", "acts", "ckpt")),
                f"{m['transient'] / GB:.2f}",
                *(f"{total(m, b, c) / GB:.1f}" for b, c in ((1, 0), (8, 0), (8, 1))),
                fits(80),
                fits(141),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=POSITIVE_INT, default=512)
    p.add_argument("--reserve-gb", type=NON_NEGATIVE, default=3.0, help="left for the CUDA context and allocator slack")
    args = p.parse_args(argv)
    print(table(seq=args.seq, reserve_gb=args.reserve_gb))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
