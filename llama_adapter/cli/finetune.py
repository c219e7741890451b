"""Adapter fine-tuning with the official LLaMA-Adapter recipe, on one device or many (torchrun: DDP or FSDP).

`llama-adapter finetune` loads a base, attaches an adapter, trains it (llama_adapter.recipe, llama_adapter.trainer)
and saves it. Its flags' dests are the fields of TrainConfig and AdapterConfig they set: both are built from the
arguments by name (`config_from_args`).
"""

from __future__ import annotations

import argparse
import signal
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist

from llama_adapter.chat import FORMATS
from llama_adapter.cli import config_from_args
from llama_adapter.data import DataError, InstructionDataset, load_examples, split_examples
from llama_adapter.distributed import check_fsdp_quantize, init_distributed
from llama_adapter.quantize import QUANTIZATIONS, check_quantize
from llama_adapter.recipe import TrainConfig
from llama_adapter.run_dir import ADAPTER_DIR, METRICS_FILE, check_run_dir, plot_loss
from llama_adapter.trainer import Trainer
from llama_adapter.validation import (
    ANY_INT,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Number,
    require_device,
)

FRACTION = Number(float, min=0, max=1, max_open=True)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter-len", type=POSITIVE_INT, default=10, help="prompt tokens per adapted layer (K)")
    p.add_argument(
        "--adapter-layers",
        type=POSITIVE_INT,
        default=None,
        help="adapted top layers (default 30, or all of a smaller model's; clamped to n_layers)",
    )
    p.add_argument("--epochs", type=POSITIVE, default=5)
    p.add_argument("--warmup-epochs", type=NON_NEGATIVE, default=2)
    p.add_argument("--global-batch-size", type=POSITIVE_INT, default=64, help="= micro x accumulation x world size")
    p.add_argument("--micro-batch-size", type=POSITIVE_INT, default=4)
    p.add_argument(
        "--max-seq-len",
        type=POSITIVE_INT,
        default=None,
        help="longer examples are truncated (and counted); default 512, or a shorter model context",
    )
    p.add_argument("--blr", type=NON_NEGATIVE, default=9e-3, help="base lr; lr = blr * global_batch / 256")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.02, help="on prompts; gates get none")
    p.add_argument("--seed", type=ANY_INT, default=0)
    p.add_argument("--val-fraction", type=FRACTION, default=0.02, help="held out for validation loss (0: none)")
    p.add_argument(
        "--eval-every", type=NON_NEGATIVE_INT, default=0, help="optimizer steps between evaluations (0: each epoch)"
    )
    p.add_argument(
        "--save-every", type=NON_NEGATIVE_INT, default=0, help="optimizer steps between checkpoints (0: each epoch)"
    )
    p.add_argument("--image-features", help="feature file/dir (extract-features): records' 'image' ids -> prompts")
    p.add_argument("--bias-tuning", action="store_true", help="V2: train bias and scale of every block linear")
    p.add_argument("--norm-tuning", action="store_true", help="V2: train the RMSNorm weights")
    p.add_argument(
        "--early-fusion", type=NON_NEGATIVE_INT, default=0, help="V2: image offsets only in the first N layers"
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="train a LLaMA-Adapter on Alpaca-format instructions", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", required=True, help="Meta or Hugging Face checkpoint directory")
    p.add_argument("--data", required=True, help="JSON list or JSONL of Alpaca records or chat {messages} records")
    # dest: TrainConfig's field (see the module's docstring)
    p.add_argument(
        "--out", dest="out_dir", metavar="OUT", required=True, help="output directory (checkpoint, metrics, adapter/)"
    )
    p.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json (default: in --model or its parent)")
    p.add_argument(
        "--chat-format",
        choices=FORMATS,
        default="auto",
        help="how examples are formatted (auto: the checkpoint's chat template, else llama3 for a LLaMA-3 "
        "vocabulary, else alpaca); see llama_adapter.chat",
    )
    add_recipe_args(p)
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/checkpoint.pt")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="OUT holds a run: delete it (checkpoint, metrics, adapter/, loss.png) and start again",
    )
    p.add_argument("--max-steps", type=POSITIVE_INT, help="stop after this many optimizer steps (checkpoint written)")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="frozen base weights (auto: bf16 on CUDA, fp16 without bf16, fp32 on CPU)",
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute adapted layers in backward")
    p.add_argument("--fsdp", action="store_true", help="shard the frozen base across ranks (FSDP2)")
    p.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default=None,
        help="store the frozen block linears in 4-bit NF4 or int8 (needs torchao)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--no-pack",
        dest="pack",
        action="store_const",
        const=False,
        default="auto",
        help="pad micro-batches (default: pack them where the fused kernels run)",
    )
    p.set_defaults(func=run_finetune)


def prepare_data(
    examples: list[dict], tokenizer, max_seq_len: int, val_fraction: float, seed: int, say=print, chat_format=None
):
    """Split and tokenize `load_examples`' records; reports truncation. Raises DataError on nothing to learn."""
    train, val = split_examples(examples, val_fraction, seed)
    train_set = InstructionDataset(train, tokenizer, max_seq_len, chat_format)
    val_set = InstructionDataset(val, tokenizer, max_seq_len, chat_format) if val else None
    say(f"train: {train_set.stats}")
    if val_set is not None:
        say(f"val:   {val_set.stats}")
    if len(train_set) == 0:
        raise DataError(f"no usable training example (all prompts fill max_seq_len={max_seq_len})")
    return train_set, val_set


def _base_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


RECIPE_ADAPTER_LAYERS, RECIPE_MAX_SEQ_LEN = 30, 512  # the paper's, for a 7B with a 2048-token context


def model_defaults(args, say=print) -> tuple[int, int]:
    """(max_seq_len, adapter_layers) for this model: the recipe's values where the model has room for them, else
    the model's context / all its layers, with one line saying what was chosen. Read from the checkpoint's config
    only, so data errors still surface before any weight is read. An explicit --max-seq-len beyond the context
    is an error; an explicit --adapter-layers beyond the depth is clamped (as AdapterConfig on a model is)."""
    from llama_adapter.adapter import fit_adapter_layers
    from llama_adapter.loading import read_model_config
    from llama_adapter.model_args import ModelArgs

    config = read_model_config(args.model)
    context = config.get("max_seq_len", next(f.default for f in fields(ModelArgs) if f.name == "max_seq_len"))
    n_layers = config["n_layers"]
    if args.max_seq_len is not None and args.max_seq_len > context:
        raise ValueError(f"--max-seq-len {args.max_seq_len} exceeds the model's max_seq_len {context}")
    chosen = []
    max_seq_len = args.max_seq_len
    if max_seq_len is None:
        max_seq_len = min(RECIPE_MAX_SEQ_LEN, context)
        why = " (the model's context)" if max_seq_len < RECIPE_MAX_SEQ_LEN else ""
        chosen.append(f"--max-seq-len {max_seq_len}{why}")
    layers = args.adapter_layers
    if layers is None:
        layers = min(RECIPE_ADAPTER_LAYERS, n_layers)
        why = " (all the model's layers)" if layers < RECIPE_ADAPTER_LAYERS else ""
        chosen.append(f"--adapter-layers {layers}{why}")
    else:
        layers, note = fit_adapter_layers(layers, n_layers, "--adapter-layers")
        if note:
            say(f"warning: {note}")
    if chosen:
        say(f"defaults for this model ({n_layers} layers, {context}-token context): {', '.join(chosen)}")
    return max_seq_len, layers


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
    register(parser.add_subparsers())
    return parser.parse_args(finetune_argv(base, data, out, **overrides))


def run_finetune(args) -> int:
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # torchrun / schedulers stop jobs with SIGTERM
    try:
        finetune(args)
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def finetune(args) -> Trainer:
    """`llama-adapter finetune` without the signal handling: load, train, save; returns the trainer (whose
    `.model` holds the trained adapter)."""
    if args.device is not None:
        require_device(args.device, "--device")
    check_run_dir(args.out_dir, args.resume, args.overwrite)  # before anything heavy loads
    check_fsdp_quantize(args.fsdp, args.quantize)
    info = init_distributed(args.device)
    say = print if info.is_main else (lambda *a, **k: None)
    if args.fsdp and info.world_size == 1:
        say("note: --fsdp with one process shards nothing")
    check_quantize(args.quantize)  # a missing torchao surfaces before the data is read
    tokenizer, train_set, val_set, adapter_config = load_data(args, say)
    model = load_model(args, adapter_config, info.device)
    say(model.trainable_summary())
    cfg = config_from_args(TrainConfig, args)
    trainer = Trainer(model, train_set, val_set, cfg, pad_id=tokenizer.pad_id, tokenizer=tokenizer, dist_info=info)
    cfg = trainer.cfg  # batch sizes fitted to a small data set
    accum = cfg.global_batch_size // (cfg.micro_batch_size * info.world_size)
    say(
        f"lr {cfg.lr:.3g} (blr {cfg.blr} x {cfg.global_batch_size} / 256); {trainer.steps_per_epoch} steps/epoch, "
        f"{trainer.total_steps} steps; micro {cfg.micro_batch_size} x accum {accum} x world {info.world_size}"
    )
    trainer.fit()
    if info.is_main:
        out = Path(args.out_dir)
        model.save_adapter(out / ADAPTER_DIR)
        png = plot_loss(trainer.history, out / "loss.png")
        say(
            f"adapter: {out / 'adapter'}; metrics: {out / METRICS_FILE}; "
            + (f"loss curve: {png}" if png else "no loss curve (pip install matplotlib)")
        )
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return trainer


def load_data(args, say=print):
    """(tokenizer, train_set, val_set, AdapterConfig) from the arguments; reads no weight, so data errors surface
    before anything heavy is loaded."""
    from llama_adapter import AdapterConfig
    from llama_adapter.chat import get_chat_format
    from llama_adapter.tokenizer import Tokenizer

    examples = load_examples(args.data)
    visual_dim = None
    if args.image_features:
        from llama_adapter.multimodal import attach_image_features

        visual_dim = attach_image_features(examples, args.image_features)
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else Tokenizer.from_dir(args.model)
    chat_format = get_chat_format(args.chat_format, tokenizer)
    say(f"tokenizer: {tokenizer.kind} ({tokenizer.model_path}, {tokenizer.n_words} tokens); {chat_format.name} format")
    max_seq_len, layers = model_defaults(args, say)
    train_set, val_set = prepare_data(examples, tokenizer, max_seq_len, args.val_fraction, args.seed, say, chat_format)
    adapter_config = config_from_args(AdapterConfig, args, adapter_layers=layers, visual_dim=visual_dim)
    return tokenizer, train_set, val_set, adapter_config


def load_model(args, adapter_config, device: torch.device):
    """The frozen base with a freshly initialised adapter (the same on every rank and every (re)start)."""
    from llama_adapter import LLaMA

    # FSDP shards from host memory; DDP loads straight onto this rank's device.
    model = LLaMA.from_pretrained(
        args.model, dtype=_base_dtype(args.dtype, device), device="cpu" if args.fsdp else device, quantize=args.quantize
    )
    torch.manual_seed(args.seed)
    model.attach_adapter(adapter_config)
    model.gradient_checkpointing = args.grad_checkpointing
    return model


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
