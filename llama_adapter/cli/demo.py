"""`llama-adapter demo` (`make demo`): the steps of llama_adapter.demo in order, the fine-tuning through the real
`llama-adapter finetune` command, with what each step did printed as it ends."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import torch

from llama_adapter import demo
from llama_adapter.cli.finetune import finetune, finetune_args, finetune_argv
from llama_adapter.data import InstructionDataset, collate, load_examples
from llama_adapter.prompts import alpaca_prompt
from llama_adapter.quantize import QUANTIZATIONS
from llama_adapter.validation import ANY_INT, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, Number


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="pretrain a tiny LLaMA, fine-tune an adapter, show before/after (CPU)",
        description=demo.__doc__.splitlines()[0],
    )
    p.add_argument("--out", default="demo_out", help="output directory (default ./demo_out)")
    p.add_argument("--pretrain-steps", type=POSITIVE_INT, default=1000)
    p.add_argument("--epochs", type=POSITIVE, default=30, help="adapter fine-tuning epochs")
    p.add_argument("--adapter-len", type=POSITIVE_INT, default=8)
    p.add_argument("--blr", type=POSITIVE, default=0.8, help="base lr (lr = blr * 32 / 256)")
    p.add_argument("--dim", type=Number(int, min=32), default=demo.TINY["dim"], help="base model width")
    p.add_argument("--layers", type=POSITIVE_INT, default=demo.TINY["n_layers"], help="base model depth (all adapted)")
    p.add_argument("--vocab-size", type=Number(int, min=16), default=1000)
    p.add_argument("--seed", type=ANY_INT, default=0)
    p.add_argument("--show", type=NON_NEGATIVE_INT, default=8, help="held-out answers to print")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None, help="frozen base in nf4 or int8 (torchao)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from llama_adapter import LLaMA

    torch.manual_seed(args.seed)
    # A 0.5M-parameter model's matmuls are too small to share: extra OpenMP threads only spin (up to ~10x slower
    # on a busy 2-core machine, measured), and one thread makes the printed numbers the same on every machine.
    torch.set_num_threads(1)
    out = Path(args.out)
    demo.claim_out_dir(out)
    base_dir, run_dir = out / "base", out / "finetune"
    t_start = time.perf_counter()
    paragraphs = (demo.DATA_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()
    train_records = load_examples(demo.DATA_DIR / "instructions.json")
    heldout = json.loads((demo.DATA_DIR / "heldout.json").read_text(encoding="utf-8"))
    print(f"[setup] torch {torch.__version__}, {torch.get_num_threads()} CPU thread")
    print(f"[data] corpus: {len(paragraphs)} paragraphs; instructions: {len(train_records)}; held-out: {len(heldout)}")

    tokenizer, stream = build_tokenizer(args, out, paragraphs, train_records)
    pretrain_base(args, stream, tokenizer.n_words, out / "tokenizer.model", base_dir)
    base = LLaMA.from_pretrained(base_dir, quantize=args.quantize)
    heldout_set = InstructionDataset(heldout, tokenizer, base.params.max_seq_len)
    quantized = f" ({args.quantize})" if args.quantize else ""
    base_loss = ask(
        base, tokenizer, heldout, heldout_set, args.show, f"[before] frozen base{quantized} on held-out instructions"
    )
    trainer = finetune_adapter(args, base_dir, run_dir, base.params.max_seq_len)

    tuned = LLaMA.from_pretrained(base_dir, quantize=args.quantize)
    tuned.load_adapter(run_dir / "adapter")
    same = same_logits(tuned, trainer.model, heldout_set, tokenizer.pad_id)
    size = sum(f.stat().st_size for f in (run_dir / "adapter").iterdir())
    print(
        f"[reload] adapter dir {run_dir / 'adapter'} ({size / 1024:.1f} KB) loaded into a fresh base: "
        f"logits {'identical' if same else 'DIFFERENT'} to the trained model's"
    )
    tuned_loss = ask(
        tuned,
        tokenizer,
        heldout,
        heldout_set,
        args.show,
        f"[after] base{quantized} + adapter on held-out instructions",
        note=f" (base: {base_loss:.3f})",
    )
    if args.quantize:  # the adapter trained on the quantized base, served on the full-precision one
        full = LLaMA.from_pretrained(base_dir)
        full.load_adapter(run_dir / "adapter")
        on_full = demo.exact_match(demo.answer(full, tokenizer, heldout), heldout)
        print(
            f"[full base] the same adapter on the unquantized base: exact match {on_full:.0%}, "
            f"loss {demo.heldout_loss(full, heldout_set, tokenizer.pad_id):.3f}"
        )
    print(
        f"[done] {time.perf_counter() - t_start:.0f}s in all; files in {out}/ (base/, finetune/adapter/, "
        "finetune/metrics.jsonl, finetune/loss.png)"
    )
    return 0 if same and tuned_loss < base_loss else 1


def build_tokenizer(args, out: Path, paragraphs: list[str], train_records: list[dict]):
    """Step 1: a SentencePiece tokenizer trained on the corpus and the instructions, saved in `out`; returns it
    and the corpus as one token stream."""
    from llama_adapter.tokenizer import Tokenizer

    t = time.perf_counter()
    texts = paragraphs + [alpaca_prompt(r["instruction"], r["input"]) + " " + r["output"] for r in train_records]
    tokenizer = Tokenizer(demo.train_tokenizer(texts, out / "tokenizer.model", args.vocab_size))
    stream = demo.corpus_stream(tokenizer, paragraphs)
    print(
        f"[tokenizer] SentencePiece BPE, {tokenizer.n_words} pieces, corpus = {len(stream)} tokens "
        f"({time.perf_counter() - t:.1f}s)"
    )
    return tokenizer, stream


def pretrain_base(args, stream: torch.Tensor, vocab_size: int, tokenizer_model: Path, base_dir: Path) -> None:
    """Step 2: a tiny LLaMA pretrained on the corpus, saved as a Meta checkpoint directory."""
    from llama_adapter import LLaMA, ModelArgs

    t = time.perf_counter()
    shape = {**demo.TINY, "dim": args.dim, "n_layers": args.layers, "n_heads": max(1, args.dim // 32)}  # head dim 32
    model = LLaMA(ModelArgs(vocab_size=vocab_size, **shape))
    print(
        f"[pretrain] tiny LLaMA {shape} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
        f"{args.pretrain_steps} steps on the corpus"
    )
    demo.pretrain(model, stream, args.pretrain_steps, seed=args.seed)
    demo.save_base(model, tokenizer_model, base_dir)
    print(f"[pretrain] done in {time.perf_counter() - t:.0f}s; base checkpoint: {base_dir}")


def ask(model, tokenizer, records: list[dict], dataset: InstructionDataset, n: int, title: str, note: str = ""):
    """Steps 3 and 5: greedy answers to the held-out records, printed with exact match and loss; returns the loss."""
    answers = demo.answer(model, tokenizer, records)
    loss = demo.heldout_loss(model, dataset, tokenizer.pad_id)
    demo.show(
        f"{title}: exact match {demo.exact_match(answers, records):.0%}, loss {loss:.3f}{note}", records, answers, n
    )
    return loss


def finetune_adapter(args, base_dir: Path, run_dir: Path, max_seq_len: int):
    """Step 4: `llama-adapter finetune` on the bundled instructions, its command line printed first."""
    t = time.perf_counter()
    settings = dict(
        adapter_len=args.adapter_len,
        adapter_layers=args.layers,
        epochs=args.epochs,
        warmup_epochs=1,
        global_batch_size=32,
        micro_batch_size=32,
        blr=args.blr,
        max_seq_len=max_seq_len,
        val_fraction=0.1,
        seed=args.seed,
        eval_every=30,
        no_progress=True,
        overwrite=True,  # the demo rebuilds everything under --out, its previous run included
        **({"quantize": args.quantize} if args.quantize else {}),
    )
    data = demo.DATA_DIR / "instructions.json"
    # the very arguments run below, so that the line pasted into a shell repeats this step
    print(f"[finetune] {shlex.join(['llama-adapter', *finetune_argv(base_dir, data, run_dir, **settings)])}")
    trainer = finetune(finetune_args(base_dir, data, run_dir, **settings))
    print(f"[finetune] {trainer.step} steps in {time.perf_counter() - t:.0f}s")
    return trainer


def same_logits(model, other, dataset: InstructionDataset, pad_id: int) -> bool:
    """Whether the two models give identical logits on every example of `dataset` (one batch)."""
    probe = collate([dataset[i] for i in range(len(dataset))], pad_id)["tokens"]
    with torch.no_grad():
        return torch.equal(model(probe), other(probe))
