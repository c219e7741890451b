"""`llama-adapter extract-features`: encode images with a local CLIP into the feature file that
`finetune --image-features` and `eval-scienceqa --image-features` read (llama_adapter.multimodal)."""

from __future__ import annotations

from llama_adapter.multimodal import extract_features
from llama_adapter.validation import NON_NEGATIVE_INT, POSITIVE_INT, require_device


def run_extract_features(args) -> int:
    if args.device is not None:
        require_device(args.device, "--device")
    feats = extract_features(
        args.clip,
        args.images,
        args.out,
        layers=args.layers,
        batch_size=args.batch_size,
        naming=args.ids,
        device=args.device,
        progress=not args.no_progress,
    )
    print(f"wrote {tuple(feats.shape)} features (images, scales, channels) to {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("extract-features", help="encode images with a local CLIP into a feature file")
    p.add_argument("--clip", required=True, help="local CLIP directory (config.json + weights)")
    p.add_argument("--images", required=True, nargs="+", help="image files and/or directories")
    p.add_argument("--out", required=True, help="FILE.pt ({features, ids}) or FILE.npy (+ FILE.npy.ids.json)")
    p.add_argument(
        "--layers", type=NON_NEGATIVE_INT, nargs="+", help="hidden layers whose [CLS] are the scales (default n/3..n)"
    )
    p.add_argument(
        "--ids",
        choices=("stem", "parent", "path"),
        default="stem",
        help="image id: file stem, parent dir (ScienceQA: images/SPLIT/QID/image.png) or path",
    )
    p.add_argument("--batch-size", type=POSITIVE_INT, default=16)
    p.add_argument("--device", default=None, help="cuda or cpu (default cpu)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_extract_features)
