"""`make demo`: LLaMA-Adapter end to end on a CPU in a few minutes, with nothing downloaded.

1. Train a small SentencePiece tokenizer on the bundled texts (demo_data/).
2. Pretrain a tiny LLaMA on demo_data/corpus.txt: statements of facts (capitals, opposites, sums, animal
   sounds, colors). It never sees an instruction. Saved as a Meta checkpoint directory (params.json,
   consolidated.00.pth, tokenizer.model), the layout `llama-adapter finetune --model` reads.
3. Ask the frozen base the held-out instructions (demo_data/heldout.json: facts the corpus states, questions
   the instruction set never asks).
4. Fine-tune only the adapter with the real trainer (`llama-adapter finetune`) on demo_data/instructions.json.
5. Reload the saved adapter into a fresh model, check that it gives the same outputs, and ask again.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from pathlib import Path

import torch

from llama_adapter.data import InstructionDataset, collate, load_examples
from llama_adapter.prompts import alpaca_prompt
from llama_adapter.quantize import QUANTIZATIONS
from llama_adapter.train import RunDirectoryError, evaluate_loss, finetune, lm_loss_sum
from llama_adapter.train import register_cli as register_finetune_cli
from llama_adapter.validation import ANY_INT, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, Number

DATA_DIR = Path(__file__).parent / "demo_data"
# Written into --out before anything else: the files beside it are a demo's, so the next demo may replace them.
DEMO_MARKER = ".llama-adapter-demo"
TINY = dict(dim=96, n_layers=3, multiple_of=32, max_seq_len=160)  # n_heads = dim // 32


def train_tokenizer(texts: list[str], path, vocab_size: int = 512) -> Path:
    """A LLaMA-style SentencePiece BPE model (unk 0, bos 1, eos 2, no pad) trained on `texts`, saved at `path`."""
    import sentencepiece as spm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )  # fmt: skip
    return path.with_suffix(".model")


def corpus_stream(tokenizer, paragraphs: list[str]) -> torch.Tensor:
    """All paragraphs as one token stream, each bos ... eos."""
    ids = [t for p in paragraphs for t in tokenizer.encode(p, bos=True, eos=True)]
    return torch.tensor(ids, dtype=torch.long)


def pretrain(model, stream: torch.Tensor, steps: int, batch: int = 16, seq_len: int = 64, lr: float = 1e-2,
             seed: int = 0, log=print) -> list[float]:  # fmt: skip
    """Plain language-model pretraining of every weight on random windows of `stream` (AdamW, cosine lr)."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters()]
    model.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup, losses = max(1, steps // 20), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
        starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=gen)
        tokens = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
        loss = lm_loss_sum(model(tokens), tokens) / (batch * (seq_len - 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"  pretrain step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.requires_grad_(False)
    return losses


def save_base(model, tokenizer_model: Path, directory) -> Path:
    """Write a Meta checkpoint directory: params.json, consolidated.00.pth (no adapter), tokenizer.model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys = "dim n_layers n_heads n_kv_heads vocab_size multiple_of norm_eps rope_theta max_seq_len".split()
    params = {k: getattr(model.params, k) for k in keys}
    (directory / "params.json").write_text(json.dumps(params, indent=1), encoding="utf-8")
    weights = {k: v for k, v in model.state_dict().items() if k not in model.adapter_state_dict()}
    torch.save(weights, directory / "consolidated.00.pth")
    (directory / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    return directory


def answer(model, tokenizer, records: list[dict], max_new_tokens: int = 20) -> list[str]:
    """Greedy answers (one batch) to Alpaca-format records."""
    from llama_adapter.generation import generate

    prompts = [tokenizer.encode(alpaca_prompt(r["instruction"], r.get("input")), bos=True, eos=False) for r in records]
    out = generate(model, prompts, max_new_tokens, eos_id=tokenizer.eos_id)
    return [tokenizer.decode(ids).strip() for ids in out]


def exact_match(answers: list[str], records: list[dict]) -> float:
    return sum(a == r["output"] for a, r in zip(answers, records)) / len(records)


def heldout_loss(model, dataset: InstructionDataset, pad_id: int) -> float:
    return evaluate_loss(model, dataset, 32, pad_id, model.tok_embeddings.weight.device)


def finetune_argv(base: Path, data: Path, out: Path, **overrides) -> list[str]:
    """`llama-adapter finetune`'s arguments, overrides as flags (True: a switch)."""
    argv = ["finetune", "--model", str(base), "--data", str(data), "--out", str(out)]
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def finetune_args(base: Path, data: Path, out: Path, **overrides) -> argparse.Namespace:
    """Arguments for `llama-adapter finetune`, parsed by its own parser (so the demo runs the real command)."""
    parser = argparse.ArgumentParser()
    register_finetune_cli(parser.add_subparsers())
    return parser.parse_args(finetune_argv(base, data, out, **overrides))


def show(title: str, records: list[dict], answers: list[str], n: int) -> None:
    """Print the title, exact match per family, and n answers spread over the families."""
    families = sorted({r.get("family", "") for r in records})
    per_family = []
    for fam in families:
        pairs = [(r, a) for r, a in zip(records, answers) if r.get("family", "") == fam]
        per_family.append(f"{fam} {sum(a == r['output'] for r, a in pairs)}/{len(pairs)}")
    print(f"{title}\n  exact match by family: {', '.join(per_family)}")
    step = max(1, len(records) // max(1, n))
    for r, a in list(zip(records, answers))[::step][:n]:
        mark = "ok" if a == r["output"] else "  "
        print(f"  {mark} {r['instruction']:<36} -> {a!r}")


def claim_out_dir(out) -> None:
    """Make `out` the demo's: refused if it holds files and no previous demo wrote it (the demo overwrites
    tokenizer.model and base/ without asking, as finetune's run-directory rule does not cover them)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {out} exists and is not a directory")
    if out.is_dir() and not (out / DEMO_MARKER).is_file() and any(out.iterdir()):
        raise RunDirectoryError(
            f"--out {out} holds files that no demo wrote ({DEMO_MARKER} is missing); the demo would overwrite "
            "them: choose an empty or new --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).touch()


def run_demo(args) -> int:
    from llama_adapter import LLaMA, ModelArgs
    from llama_adapter.tokenizer import Tokenizer

    torch.manual_seed(args.seed)
    # A 0.5M-parameter model's matmuls are too small to share: extra OpenMP threads only spin (up to ~10x slower
    # on a busy 2-core machine, measured), and one thread makes the printed numbers the same on every machine.
    torch.set_num_threads(1)
    out = Path(args.out)
    claim_out_dir(out)
    base_dir, run_dir = out / "base", out / "finetune"
    t_start = time.perf_counter()
    paragraphs = (DATA_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()
    train_records = load_examples(DATA_DIR / "instructions.json")
    heldout = json.loads((DATA_DIR / "heldout.json").read_text(encoding="utf-8"))
    print(f"[setup] torch {torch.__version__}, {torch.get_num_threads()} CPU thread")
    print(f"[data] corpus: {len(paragraphs)} paragraphs; instructions: {len(train_records)}; held-out: {len(heldout)}")

    t = time.perf_counter()
    texts = paragraphs + [alpaca_prompt(r["instruction"], r["input"]) + " " + r["output"] for r in train_records]
    tokenizer = Tokenizer(train_tokenizer(texts, out / "tokenizer.model", args.vocab_size))
    stream = corpus_stream(tokenizer, paragraphs)
    print(f"[tokenizer] SentencePiece BPE, {tokenizer.n_words} pieces, corpus = {len(stream)} tokens "
          f"({time.perf_counter() - t:.1f}s)")  # fmt: skip

    t = time.perf_counter()
    shape = {**TINY, "dim": args.dim, "n_layers": args.layers, "n_heads": max(1, args.dim // 32)}  # head dim 32
    model = LLaMA(ModelArgs(vocab_size=tokenizer.n_words, **shape))
    print(f"[pretrain] tiny LLaMA {shape} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
          f"{args.pretrain_steps} steps on the corpus")  # fmt: skip
    pretrain(model, stream, args.pretrain_steps, seed=args.seed)
    save_base(model, out / "tokenizer.model", base_dir)
    print(f"[pretrain] done in {time.perf_counter() - t:.0f}s; base checkpoint: {base_dir}")

    t = time.perf_counter()
    base = LLaMA.from_pretrained(base_dir, quantize=args.quantize)
    max_len = base.params.max_seq_len
    before = answer(base, tokenizer, heldout)
    heldout_set = InstructionDataset(heldout, tokenizer, max_len)
    base_loss = heldout_loss(base, heldout_set, tokenizer.pad_id)
    quantized = f" ({args.quantize})" if args.quantize else ""
    show(f"[before] frozen base{quantized} on held-out instructions: exact match {exact_match(before, heldout):.0%}, "
         f"loss {base_loss:.3f}", heldout, before, args.show)  # fmt: skip

    t = time.perf_counter()
    settings = dict(
        adapter_len=args.adapter_len,
        adapter_layers=args.layers,
        epochs=args.epochs,
        warmup_epochs=1,
        global_batch_size=32,
        micro_batch_size=32,
        blr=args.blr,
        max_seq_len=max_len,
        val_fraction=0.1,
        seed=args.seed,
        eval_every=30,
        no_progress=True,
        overwrite=True,  # the demo rebuilds everything under --out, its previous run included
        **({"quantize": args.quantize} if args.quantize else {}),
    )
    argv = finetune_argv(base_dir, DATA_DIR / "instructions.json", run_dir, **settings)
    # the very arguments run below, so that the line pasted into a shell repeats this step
    print(f"[finetune] {shlex.join(['llama-adapter', *argv])}")
    trainer = finetune(finetune_args(base_dir, DATA_DIR / "instructions.json", run_dir, **settings))
    print(f"[finetune] {trainer.step} steps in {time.perf_counter() - t:.0f}s")

    tuned = LLaMA.from_pretrained(base_dir, quantize=args.quantize)
    tuned.load_adapter(run_dir / "adapter")
    probe = collate([heldout_set[i] for i in range(len(heldout_set))], tokenizer.pad_id)["tokens"]
    with torch.no_grad():
        same = torch.equal(tuned(probe), trainer.model(probe))
    size = sum(f.stat().st_size for f in (run_dir / "adapter").iterdir())
    print(f"[reload] adapter dir {run_dir / 'adapter'} ({size / 1024:.1f} KB) loaded into a fresh base: "
          f"logits {'identical' if same else 'DIFFERENT'} to the trained model's")  # fmt: skip
    after = answer(tuned, tokenizer, heldout)
    tuned_loss = heldout_loss(tuned, heldout_set, tokenizer.pad_id)
    show(f"[after] base{quantized} + adapter on held-out instructions: exact match {exact_match(after, heldout):.0%}, "
         f"loss {tuned_loss:.3f} (base: {base_loss:.3f})", heldout, after, args.show)  # fmt: skip
    if args.quantize:  # the adapter trained on the quantized base, served on the full-precision one
        full = LLaMA.from_pretrained(base_dir)
        full.load_adapter(run_dir / "adapter")
        on_full = answer(full, tokenizer, heldout)
        print(f"[full base] the same adapter on the unquantized base: exact match {exact_match(on_full, heldout):.0%}, "
              f"loss {heldout_loss(full, heldout_set, tokenizer.pad_id):.3f}")  # fmt: skip
    print(
        f"[done] {time.perf_counter() - t_start:.0f}s in all; files in {out}/ (base/, finetune/adapter/, "
        "finetune/metrics.jsonl, finetune/loss.png)"
    )
    return 0 if same and tuned_loss < base_loss else 1


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="pretrain a tiny LLaMA, fine-tune an adapter, show before/after (CPU)",
                              description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--out", default="demo_out", help="output directory (default ./demo_out)")
    p.add_argument("--pretrain-steps", type=POSITIVE_INT, default=1000)
    p.add_argument("--epochs", type=POSITIVE, default=30, help="adapter fine-tuning epochs")
    p.add_argument("--adapter-len", type=POSITIVE_INT, default=8)
    p.add_argument("--blr", type=POSITIVE, default=0.8, help="base lr (lr = blr * 32 / 256)")
    p.add_argument("--dim", type=Number(int, min=32), default=TINY["dim"], help="base model width")
    p.add_argument("--layers", type=POSITIVE_INT, default=TINY["n_layers"], help="base model depth (all adapted)")
    p.add_argument("--vocab-size", type=Number(int, min=16), default=1000)
    p.add_argument("--seed", type=ANY_INT, default=0)
    p.add_argument("--show", type=NON_NEGATIVE_INT, default=8, help="held-out answers to print")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None, help="frozen base in nf4 or int8 (torchao)")
    p.set_defaults(func=run_demo)
