"""`make demo`: LLaMA-Adapter end to end on a CPU in a few minutes, with nothing downloaded.

Its steps (run in order by `llama-adapter demo`, llama_adapter.cli.demo):

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

import json
import math
from pathlib import Path

import torch

from llama_adapter.data import InstructionDataset
from llama_adapter.prompts import alpaca_prompt
from llama_adapter.recipe import evaluate_loss, lm_loss_sum
from llama_adapter.run_dir import RunDirectoryError

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
        sentence_iterator=iter(texts),
        model_prefix=str(path.with_suffix("")),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return path.with_suffix(".model")


def corpus_stream(tokenizer, paragraphs: list[str]) -> torch.Tensor:
    """All paragraphs as one token stream, each bos ... eos."""
    ids = [t for p in paragraphs for t in tokenizer.encode(p, bos=True, eos=True)]
    return torch.tensor(ids, dtype=torch.long)


def pretrain(
    model,
    stream: torch.Tensor,
    steps: int,
    batch: int = 16,
    seq_len: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    log=print,
) -> list[float]:
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
