"""The transformers drop-in (`llama_adapter.hf`) against PEFT's AdaptionPrompt on the same LlamaForCausalLM.

One random-weight base (7B-shaped: hidden 4096, 32 heads, MLP 11008, but --layers layers, all adapted; bf16 on
CUDA, a tiny fp32 config on the CPU) is given two adapters: `peft` (peft.get_peft_model with AdaptionPromptConfig)
and `ours` (hf.apply_adapter, gate="scalar", gate_act="none", attention backend --backend). PEFT's nonzero gates and
its prompts are copied into ours, so both compute the same function: the `logits_max_abs_diff` column is the max
|ours - peft| of the full logits on one batch (`adapter_effect` is max |peft - base|, showing the adapter is live),
and train rows add `grad_max_abs_diff` over the prompts' and gates' gradients.

Modes: "train" (forward + backward of the LM loss; only prompts and gates get gradients) and "prefill" (inference
mode, the KV cache filled and only the last logits kept, as generate() does). Rows: ms (median, common.time_ms),
tokens/s, peak memory (CUDA: both models' weights included; `act_mem_mb` is the part above them), speedup vs peft.

    python -m benchmarks.bench_hf                     # CUDA: 4 layers, batch 8, seq 512, bf16
    python -m benchmarks.bench_hf --layers 2 --batch 4
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.common import (
    DTYPES,
    HAS_CUDA,
    Budget,
    Results,
    add_common_args,
    describe_error,
    free_memory,
    log,
    peak_memory_mb,
    reset_peak_memory,
    str_list,
    time_ms,
)

PROVIDERS = ("peft", "ours")  # peft first: ours' speedup needs its time
MODES = ("train", "prefill")
SEVEN_B = dict(hidden_size=4096, num_attention_heads=32, intermediate_size=11008, vocab_size=32000)
TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=128)


def build_base(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SEVEN_B if args.size == "7B" else TINY
    config = LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=max(args.seq, 64), **shape)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def build_pair(base, args):
    """(peft model, our model, adapter_effect): `base` becomes PEFT's; ours is a copy holding PEFT's adapter."""
    from peft import AdaptionPromptConfig, get_peft_model

    from llama_adapter import hf
    from llama_adapter.model import AdapterConfig

    L = base.config.num_hidden_layers
    ours = hf.apply_adapter(
        copy.deepcopy(base), AdapterConfig(adapter_len=args.ka, adapter_layers=L, gate="scalar", gate_act="none")
    )
    peft = get_peft_model(base, AdaptionPromptConfig(adapter_len=args.ka, adapter_layers=L, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(1)
    ours_params = dict(ours.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if not hf.is_adapter_param(name):
                continue
            if name.endswith("adaption_gate"):  # zero-init would hide the prompt path from the comparison
                param.copy_(torch.empty(param.shape).uniform_(0.25, 0.75, generator=gen))
            ours_params[name.removeprefix(hf.PEFT_PREFIX)].copy_(param)
            copied += 1
    if copied != 2 * L:
        raise RuntimeError(f"copied {copied} adapter tensors from PEFT, expected {2 * L} (prompt and gate per layer)")
    return peft, ours


def adapter_grads(model) -> dict[str, torch.Tensor]:
    from llama_adapter import hf

    return {n.removeprefix(hf.PEFT_PREFIX): p.grad for n, p in model.named_parameters() if p.requires_grad}


def correctness(peft, ours, base_logits, tokens) -> dict:
    """Max abs differences ours vs peft: logits (one forward) and adapter gradients (one LM-loss backward)."""
    with torch.inference_mode():
        peft_logits = peft(input_ids=tokens, use_cache=False).logits.float()
        ours_logits = ours(input_ids=tokens, use_cache=False).logits.float()
    for model in (peft, ours):
        model.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
    peft_grads, ours_grads = adapter_grads(peft), adapter_grads(ours)
    if set(peft_grads) != set(ours_grads):
        raise RuntimeError(f"trainable parameters differ: {sorted(set(peft_grads) ^ set(ours_grads))}")
    grad_diff = max((ours_grads[n].float() - g.float()).abs().max().item() for n, g in peft_grads.items())
    for model in (peft, ours):
        model.zero_grad(set_to_none=True)
    return dict(
        logits_max_abs_diff=(ours_logits - peft_logits).abs().max().item(),
        adapter_effect=(peft_logits - base_logits).abs().max().item(),
        grad_max_abs_diff=grad_diff,
    )


def make_step(model, mode: str, tokens):
    if mode == "train":

        def step():
            model.zero_grad(set_to_none=True)
            model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()

    else:

        def step():
            with torch.inference_mode():
                model(input_ids=tokens, use_cache=True, logits_to_keep=1)

    return step


def run(args: argparse.Namespace) -> Results:
    from llama_adapter.attention import get_attention_backend, resolve_backend, set_attention_backend

    device = torch.device("cuda" if HAS_CUDA else "cpu")
    dtype = DTYPES[args.dtype]
    results = Results("bench_hf", args.out, args)
    budget = Budget(args.budget)
    previous_backend = get_attention_backend()
    set_attention_backend(args.backend)
    base_row = dict(dtype=args.dtype, size=args.size, B=args.batch, N=args.seq, layers=args.layers, Ka=args.ka,
                    adapter_layers=args.layers, ms=None, tokens_per_s=None, peak_mem_mb=None,
                    speedup_vs_peft=None)  # fmt: skip
    log(f"bench_hf on {results.device.name}: {args.size} layers={args.layers} B={args.batch} N={args.seq} "
        f"{args.dtype} -> {results.path}")  # fmt: skip
    try:
        base = build_base(args, device, dtype)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
        with torch.inference_mode():
            base_logits = base(input_ids=tokens, use_cache=False).logits.float()
        peft, ours = build_pair(base, args)
        check = correctness(peft, ours, base_logits, tokens)
        del base_logits
    except Exception as exc:  # no models, no rows to measure: say why in each
        error = f"set-up failed: {describe_error(exc)}"
        for mode in str_list(args.modes):
            for provider in PROVIDERS:
                results.add({"provider": provider, "mode": mode, **base_row, "error": error})
        log(error)
        set_attention_backend(previous_backend)
        return results
    log(" ".join(f"{k}={v:.3g}" for k, v in check.items()))
    models = {"peft": peft, "ours": ours}
    # PEFT wraps the base's own attention (SDPA by default) and adds the prompt attention beside it
    backends = {"peft": f"peft+{base.config._attn_implementation}", "ours": resolve_backend(device)}
    for mode in str_list(args.modes):
        peft_ms = None
        for provider in PROVIDERS:
            model = models[provider]
            model.train(mode == "train")
            row = {"provider": provider, "mode": mode, **base_row, "backend": backends[provider], **check,
                   "error": None}  # fmt: skip
            if mode != "train":
                row.pop("grad_max_abs_diff")
            if budget.expired():
                row["error"] = "skipped: time budget"
            else:
                try:
                    free_memory()
                    reset_peak_memory()
                    resident = torch.cuda.memory_allocated() if HAS_CUDA else None
                    ms = time_ms(make_step(model, mode, tokens), warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
                    peak = peak_memory_mb()
                    row.update(ms=round(ms, 3), tokens_per_s=round(args.batch * args.seq / ms * 1e3, 1),
                               peak_mem_mb=peak)  # fmt: skip
                    if peak is not None:
                        row["act_mem_mb"] = round(peak - resident / 2**20, 1)
                    if provider == "peft":
                        peft_ms = ms
                    if peft_ms:
                        row["speedup_vs_peft"] = float(f"{peft_ms / ms:.4g}")
                except Exception as exc:  # a failing provider is a row, not the end of the run
                    row["error"] = describe_error(exc)
            model.zero_grad(set_to_none=True)
            results.add(row)
            log(format_row(row))
    set_attention_backend(previous_backend)
    return results


def format_row(row: dict) -> str:
    head = f"{row['provider']:>5} {row['mode']:>7}"
    if row["error"]:
        return f"{head}: {row['error']}"
    mem = f" peak {row['peak_mem_mb']:.0f} MiB" if row.get("peak_mem_mb") else ""
    speed = f" x{row['speedup_vs_peft']:.2f} vs peft" if row.get("speedup_vs_peft") else ""
    return (f"{head}: {row['ms']:9.2f} ms {row['tokens_per_s']:10.0f} tok/s{mem}{speed} "
            f"|logits diff| {row['logits_max_abs_diff']:.2e}")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="7B" if HAS_CUDA else "tiny", choices=("7B", "tiny"), help="layer shape")
    p.add_argument("--layers", type=int, default=4 if HAS_CUDA else 2, help="decoder layers, all adapted")
    p.add_argument("--batch", type=int, default=8 if HAS_CUDA else 2)
    p.add_argument("--seq", type=int, default=512 if HAS_CUDA else 16)
    p.add_argument("--ka", type=int, default=10, help="adapter prompt length")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--backend", default="auto", help="our attention backend (auto: Triton on CUDA)")
    p.add_argument("--dtype", default="bf16" if HAS_CUDA else "fp32", choices=sorted(DTYPES))
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--rep-ms", type=float, default=100)
    add_common_args(p, budget=0)
    args = p.parse_args(argv)
    unknown = sorted(set(str_list(args.modes)) - set(MODES))
    if unknown:
        p.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    return args


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
