"""The transformers drop-in (`llama_adapter.hf`) against PEFT's AdaptionPrompt on the same LlamaForCausalLM.

One random-weight base (7B-shaped: hidden 4096, 32 heads, MLP 11008, but --layers layers, all adapted; bf16 on
CUDA, a tiny fp32 config on the CPU) is given three adapters holding the same prompts and nonzero gates:
`peft` (peft.get_peft_model with AdaptionPromptConfig, the base's own SDPA attention plus PEFT's prompt attention),
`peft_fused` (the same PEFT model after `hf.accelerate_peft`: PEFT's modules and parameters, our attention) and `ours`
(hf.apply_adapter, gate="scalar", gate_act="none"). The fused providers use the attention backend --backend.

Modes, each a row per provider:
- "train": forward + backward of the LM loss on a full (B, N) batch; only prompts and gates get gradients.
- "train_padded": the same on a right-padded batch with an Alpaca-like length mix (`alpaca_lengths`, as in
  bench_packing: lengths uniform from N/10 to N; labels -100 on pads), as the HF Trainer gives it: the fused
  providers unpad it for the varlen kernel.
- "prefill": inference mode, the KV cache filled and only the last logits kept, as generate() does.
- "generate": HF `generate`, greedy, --new-tokens tokens for left-padded prompts of the same length mix
  (prefill, then one token per step through the decode kernel with per-row cache lengths).

Columns: ms (median, common.time_ms); `tokens` per step (real tokens for the padded modes, B x new tokens for
generate) and tokens/s; peak memory (CUDA: every model's weights included; `act_mem_mb` is the part above them);
speedup vs peft. Parity with peft on the same inputs: `logits_max_abs_diff` (max |provider - peft| over real
tokens; `adapter_effect` is max |peft - base|, showing the adapter is live), `grad_max_abs_diff` for the train
modes (prompts' and gates' gradients), `tokens_equal` for generate (fraction of generated tokens equal to peft's).

    python -m benchmarks.bench_hf                     # CUDA: 4 layers, batch 8, seq 512, bf16
    python -m benchmarks.bench_hf --layers 2 --batch 4 --modes train_padded,generate
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
    significant,
    skip_reason,
    str_list,
    time_ms,
)
from llama_adapter.validation import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE_INT

PROVIDERS = ("peft", "peft_fused", "ours")  # peft first: the others' speedup and parity need its results
MODES = ("train_padded", "generate", "train", "prefill")  # what the HF Trainer and generate() run first (budget)
SEVEN_B = dict(hidden_size=4096, num_attention_heads=32, intermediate_size=11008, vocab_size=32000)
TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=128)


def alpaca_lengths(batch: int, longest: int) -> list[int]:
    """Per-row lengths of an Alpaca-like batch (bench_packing's mix: uniform from longest/10 up), the first the
    longest, so the padded batch is (batch, longest)."""
    from benchmarks.bench_packing import length_mix

    return [longest] + length_mix(batch - 1, max(1, longest // 10), longest, seed=0)


def padding_mask(lengths: list[int], longest: int, side: str) -> torch.Tensor:
    """(B, longest) long mask, 1 on tokens: right padding for training batches, left padding for prompts."""
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return mask if side == "right" else mask.flip(1)


def build_base(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SEVEN_B if args.size == "7B" else TINY
    config = LlamaConfig(
        num_hidden_layers=args.layers,
        max_position_embeddings=max(args.seq + args.new_tokens, 64),
        pad_token_id=0,
        **shape,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def build_models(base, args) -> dict:
    """{provider: model}: `base` becomes PEFT's (nonzero gates); peft_fused and ours are copies holding its adapter."""
    from peft import AdaptionPromptConfig, get_peft_model

    from llama_adapter import AdapterConfig, hf

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
    peft_fused = hf.accelerate_peft(copy.deepcopy(peft))
    return {"peft": peft, "peft_fused": peft_fused, "ours": ours}


def make_inputs(args, vocab: int, device) -> dict:
    """Token batches for every mode: full (B, N), right-padded training batch, left-padded prompts."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab, (args.batch, args.seq), generator=gen)
    lengths = alpaca_lengths(args.batch, args.seq)
    right, left = padding_mask(lengths, args.seq, "right"), padding_mask(lengths, args.seq, "left")
    return {
        "tokens": tokens.to(device),
        "padded": tokens.masked_fill(right == 0, 0).to(device),
        "padded_mask": right.to(device),
        "padded_labels": tokens.masked_fill(right == 0, -100).to(device),
        "prompts": tokens.masked_fill(left == 0, 0).to(device),
        "prompt_mask": left.to(device),
        "real_tokens": sum(lengths),
    }


def run_mode(model, mode: str, inputs: dict, args):
    """One step of `mode`; returns what parity compares: logits (inference), loss (train) or generated tokens."""
    if mode == "train":
        return model(input_ids=inputs["tokens"], labels=inputs["tokens"], use_cache=False).loss.backward()
    if mode == "train_padded":
        return model(
            input_ids=inputs["padded"],
            attention_mask=inputs["padded_mask"],
            labels=inputs["padded_labels"],
            use_cache=False,
        ).loss.backward()
    with torch.inference_mode():
        if mode == "prefill":
            return model(input_ids=inputs["tokens"], use_cache=True, logits_to_keep=1).logits
        n = args.new_tokens
        return model.generate(
            input_ids=inputs["prompts"],
            attention_mask=inputs["prompt_mask"],
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
        )


def adapter_grads(model) -> dict[str, torch.Tensor]:
    from llama_adapter import hf

    return {n.removeprefix(hf.PEFT_PREFIX): p.grad for n, p in model.named_parameters() if p.requires_grad}


def outputs(model, mode: str, inputs: dict, args) -> dict:
    """What parity compares for `mode`: full logits on the mode's inputs (real tokens only), gradients, tokens."""
    if mode == "generate":
        return {"tokens": run_mode(model, mode, inputs, args)[:, args.seq :]}
    padded = mode == "train_padded"
    ids, mask = (inputs["padded"], inputs["padded_mask"]) if padded else (inputs["tokens"], None)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    result = {"logits": logits[mask.bool()] if padded else logits}
    if mode.startswith("train"):
        model.zero_grad(set_to_none=True)
        run_mode(model, mode, inputs, args)
        result["grads"] = {n: g.float() for n, g in adapter_grads(model).items()}
        model.zero_grad(set_to_none=True)
    return result


def parity(got: dict, expected: dict, base_logits) -> dict:
    """Max abs differences of logits / gradients, or the fraction of equal generated tokens, vs peft's."""
    row = {}
    if "tokens" in got:
        row["tokens_equal"] = (got["tokens"] == expected["tokens"]).float().mean().item()
        return row
    row["logits_max_abs_diff"] = (got["logits"] - expected["logits"]).abs().max().item()
    row["adapter_effect"] = (expected["logits"] - base_logits).abs().max().item()
    if "grads" in got:
        if set(got["grads"]) != set(expected["grads"]):
            raise RuntimeError(f"trainable parameters differ: {sorted(set(got['grads']) ^ set(expected['grads']))}")
        row["grad_max_abs_diff"] = max((g - expected["grads"][n]).abs().max().item() for n, g in got["grads"].items())
    return row


def step_tokens(mode: str, inputs: dict, args) -> int:
    if mode == "train_padded":
        return inputs["real_tokens"]
    if mode == "generate":
        return args.batch * args.new_tokens
    return args.batch * args.seq


def set_up(args, device, dtype) -> tuple[dict, dict, dict]:
    """The three providers' models, every mode's inputs, and the base's logits before any adapter."""
    base = build_base(args, device, dtype)
    inputs = make_inputs(args, base.config.vocab_size, device)
    base_logits = adapterless_logits(base, inputs)
    return build_models(base, args), inputs, base_logits


def adapterless_logits(base, inputs: dict) -> dict:
    """{padded?: logits} of the base before any adapter, real tokens only for the padded batch: each row's
    `adapter_effect` is measured against them."""
    with torch.inference_mode():
        return {
            False: base(input_ids=inputs["tokens"], use_cache=False).logits.float(),
            True: base(
                input_ids=inputs["padded"], attention_mask=inputs["padded_mask"], use_cache=False
            ).logits.float()[inputs["padded_mask"].bool()],
        }


def time_mode(row: dict, model, mode: str, inputs: dict, args) -> float:
    """Time `mode` on `model` into `row` (ms, tokens, tokens/s, peak and activation memory); returns the ms."""
    reset_peak_memory()
    resident = torch.cuda.memory_allocated() if HAS_CUDA else None

    def step():
        if mode.startswith("train"):
            model.zero_grad(set_to_none=True)
        run_mode(model, mode, inputs, args)

    ms = time_ms(step, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    peak = peak_memory_mb()
    tokens = step_tokens(mode, inputs, args)
    row.update(ms=significant(ms), tokens=tokens, tokens_per_s=significant(tokens / ms * 1e3), peak_mem_mb=peak)
    if peak is not None:
        row["act_mem_mb"] = round(peak - resident / 2**20, 1)
    return ms


def run(args: argparse.Namespace) -> Results:
    from llama_adapter.attention import get_attention_backend, resolve_backend, set_attention_backend

    device = torch.device("cuda" if HAS_CUDA else "cpu")
    dtype = DTYPES[args.dtype]
    results = Results("bench_hf", args.out, args)
    budget = Budget(args.budget)
    previous_backend = get_attention_backend()
    set_attention_backend(args.backend)
    modes = str_list(args.modes)
    base_row = shared_columns(args)
    log(
        f"bench_hf on {results.device.name}: {args.size} layers={args.layers} B={args.batch} N={args.seq} "
        f"{args.dtype} -> {results.path}"
    )
    try:
        models, inputs, base_logits = set_up(args, device, dtype)
    except Exception as exc:  # no models, no rows to measure: say why in each
        error = f"set-up failed: {describe_error(exc)}"
        for mode in modes:
            for provider in PROVIDERS:
                results.add({"provider": provider, "mode": mode, **base_row, "error": error})
        log(error)
        set_attention_backend(previous_backend)
        return results
    # PEFT wraps the base's own attention (SDPA by default) and adds the prompt attention beside it
    fused = resolve_backend(device)
    backends = {"peft": f"peft+{models['peft'].config._attn_implementation}", "peft_fused": fused, "ours": fused}
    for mode in modes:
        measure_mode(results, mode, models, backends, base_row, inputs, base_logits, args, budget)
    set_attention_backend(previous_backend)
    return results


def shared_columns(args) -> dict:
    """The columns of every row: the problem's shape, and the measurements still empty."""
    return dict(
        dtype=args.dtype,
        size=args.size,
        B=args.batch,
        N=args.seq,
        layers=args.layers,
        Ka=args.ka,
        adapter_layers=args.layers,
        ms=None,
        tokens=None,
        tokens_per_s=None,
        peak_mem_mb=None,
        speedup_vs_peft=None,
    )


def measure_mode(
    results: Results, mode: str, models: dict, backends: dict, base_row: dict, inputs, base_logits, args, budget
) -> None:
    """Every provider's row of `mode`, peft first: the others' parity and speedup are measured against its."""
    peft_ms = expected = None
    for provider in PROVIDERS:
        model = models[provider]
        model.train(mode.startswith("train"))
        row = {"provider": provider, "mode": mode, **base_row, "backend": backends[provider]}
        row["error"] = skip_reason(budget)
        if row["error"] is not None:
            results.add(row)
            continue
        try:
            got = outputs(model, mode, inputs, args)
            expected = got if provider == "peft" else expected
            row.update(parity(got, expected, base_logits[mode == "train_padded"]))
            del got
            free_memory()
            ms = time_mode(row, model, mode, inputs, args)
            if provider == "peft":
                peft_ms = ms
            if peft_ms:
                row["speedup_vs_peft"] = significant(peft_ms / ms)
        except Exception as exc:  # a failing provider is a row, not the end of the run
            row["error"] = describe_error(exc)
        model.zero_grad(set_to_none=True)
        results.add(row)
        log(format_row(row))


def format_row(row: dict) -> str:
    head = f"{row['provider']:>10} {row['mode']:>12}"
    if row["error"]:
        return f"{head}: {row['error']}"
    mem = f" peak {row['peak_mem_mb']:.0f} MiB" if row.get("peak_mem_mb") else ""
    speed = f" x{row['speedup_vs_peft']:.2f} vs peft" if row.get("speedup_vs_peft") else ""
    if "tokens_equal" in row:
        check = f"tokens equal {row['tokens_equal']:.3f}"
    else:
        check = f"|logits diff| {row['logits_max_abs_diff']:.2e}"
    return f"{head}: {row['ms']:9.2f} ms {row['tokens_per_s']:10.0f} tok/s{mem}{speed} {check}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="7B" if HAS_CUDA else "tiny", choices=("7B", "tiny"), help="layer shape")
    p.add_argument("--layers", type=POSITIVE_INT, default=4 if HAS_CUDA else 2, help="decoder layers, all adapted")
    p.add_argument("--batch", type=POSITIVE_INT, default=8 if HAS_CUDA else 2)
    p.add_argument("--seq", type=POSITIVE_INT, default=512 if HAS_CUDA else 16, help="longest example / prompt")
    p.add_argument("--new-tokens", type=POSITIVE_INT, default=32 if HAS_CUDA else 3, help="tokens generate() adds")
    p.add_argument("--ka", type=NON_NEGATIVE_INT, default=10, help="adapter prompt length")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--backend", default="auto", help="our attention backend (auto: Triton on CUDA)")
    p.add_argument("--dtype", default="bf16" if HAS_CUDA else "fp32", choices=sorted(DTYPES))
    p.add_argument("--warmup-ms", type=NON_NEGATIVE, default=25)
    p.add_argument("--rep-ms", type=NON_NEGATIVE, default=100)
    add_common_args(p, budget=0)
    args = p.parse_args(argv)
    unknown = sorted(set(str_list(args.modes)) - set(MODES))
    if unknown:
        p.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    if args.new_tokens < 1:
        p.error("--new-tokens must be at least 1")
    return args


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
