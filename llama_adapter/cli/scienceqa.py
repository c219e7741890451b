"""`llama-adapter eval-scienceqa` (an adapter's accuracy on ScienceQA-style problems) and `prepare-scienceqa`
(problems as finetune training records); the data and scoring are llama_adapter.scienceqa."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llama_adapter.scienceqa import LETTERS, accuracy_report, format_report, load_problems, predict, to_record
from llama_adapter.validation import POSITIVE_INT, require_device


def run_eval(args) -> int:
    from llama_adapter import LLaMA
    from llama_adapter.multimodal import ImageFeatures
    from llama_adapter.tokenizer import Tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    require_device(device, "--device")  # before any file is read
    problems = load_problems(args.data, args.split)[: args.limit]
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else Tokenizer.from_dir(args.model)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = LLaMA.from_pretrained(args.model, dtype=dtype, device=device)
    model.load_adapter(args.adapter)
    visual_dim = model.adapter_config.visual_dim
    features = None
    if visual_dim is not None:
        if not args.image_features:
            raise SystemExit(f"the adapter {args.adapter} takes image features: pass --image-features")
        features = ImageFeatures(args.image_features, visual_dim)
    predictions = predict(model, tokenizer, problems, features, progress=not args.no_progress)
    report = accuracy_report(problems, predictions)
    print(format_report(report))
    if args.out:
        report["predictions"] = {
            p.qid: {"predicted": LETTERS[y], "answer": LETTERS[p.answer]} for p, y in zip(problems, predictions)
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"report: {args.out}")
    return 0


def run_prepare(args) -> int:
    problems = load_problems(args.data, args.split)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(to_record(p)) + "\n")
    print(f"wrote {len(problems)} training records to {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("eval-scienceqa", help="accuracy of an adapter on ScienceQA-style problems")
    p.add_argument("--model", required=True, help="Meta or Hugging Face checkpoint directory")
    p.add_argument("--adapter", required=True, help="adapter directory (from finetune: OUT/adapter)")
    p.add_argument("--data", required=True, help="problems.json (official) or a JSON/JSONL list of problems")
    p.add_argument("--split", default=None, help="keep this split only (e.g. test)")
    p.add_argument("--image-features", help="feature file/directory (extract-features); needed with a projector")
    p.add_argument("--tokenizer", help="tokenizer.model (default: in --model or its parent)")
    p.add_argument("--out", help="write the report and per-problem predictions as JSON")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="evaluate the first N problems only")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_eval)

    p = subparsers.add_parser("prepare-scienceqa", help="write ScienceQA problems as finetune training records")
    p.add_argument("--data", required=True, help="problems.json (official) or a JSON/JSONL list of problems")
    p.add_argument("--split", default=None, help="keep this split only (e.g. train)")
    p.add_argument("--out", required=True, help="JSONL of {instruction, input, output, image}")
    p.set_defaults(func=run_prepare)
