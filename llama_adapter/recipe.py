"""The official LLaMA-Adapter training recipe: schedule, optimizer, loss, precision and the run's settings.

The loop that runs it is llama_adapter.trainer; its distributed setup (torchrun: DDP or FSDP) is
llama_adapter.distributed.

Recipe (the official training code): only prompts and gates train; AdamW betas (0.9, 0.95), weight decay 0.02
on prompts and 0 on gates; lr = blr * global_batch / 256 (blr 9e-3); per optimizer step, linear warmup over
`warmup_epochs`, then a half cosine to 0 at the end of the last epoch. Gradients accumulate to the global
batch = micro_batch x accumulation x world_size, whose loss is its token losses' sum over its number of target
tokens (llama_adapter.trainer).

Precision: on CUDA the frozen base is bf16 (fp16 + GradScaler where bf16 is missing) under autocast, the
adapter fp32; on the CPU everything is fp32. The layers below the first adapted one run without autograd by
construction (nothing there requires grad), and `--grad-checkpointing` recomputes the adapted layers.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama_adapter.data import IGNORE_INDEX, InstructionDataset, collate, image_inputs
from llama_adapter.validation import (
    ANY_INT,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Choice,
    Flag,
    Number,
    check_fields,
)


def lr_factor(step: int, steps_per_epoch: int, warmup_epochs: float, epochs: float) -> float:
    """Multiplier of the peak lr for the update after `step` optimizer steps (official per-iteration schedule)."""
    t = step / steps_per_epoch  # fractional epoch
    if t < warmup_epochs:
        return t / warmup_epochs
    if epochs <= warmup_epochs:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warmup_epochs) / (epochs - warmup_epochs))))


class LRSchedule:
    """Picklable lr lambda for torch's LambdaLR (its state_dict then stores the schedule's parameters)."""

    def __init__(self, steps_per_epoch: int, warmup_epochs: float, epochs: float):
        self.steps_per_epoch, self.warmup_epochs, self.epochs = steps_per_epoch, warmup_epochs, epochs

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.steps_per_epoch, self.warmup_epochs, self.epochs)


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the adapter only: prompts and matrices decay; gates, biases, scales and norms (1-D, as in the
    official V2 code's timm param groups) do not. Fails if anything else requires grad."""
    adapter_ids = {id(p) for p in model.adapter_parameters()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    stray = [n for n, p in trainable if id(p) not in adapter_ids]
    if stray:
        raise RuntimeError(f"only adapter parameters may require grad, but so do: {stray[:5]}")
    if not trainable:
        raise RuntimeError("the model has no trainable adapter parameters (attach_adapter first)")
    decay = [p for n, p in trainable if p.dim() >= 2]
    no_decay = [p for n, p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions (labels aligned with the tokens), in fp32
    (fp64 for a fp64 model: upcasts never round down)."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def precision(device: torch.device):
    """(autocast context, GradScaler or None) for this device: bf16 (or fp16 + scaler) on CUDA, fp32 elsewhere."""
    if device.type != "cuda":
        return nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


@dataclass
class TrainConfig:
    out_dir: str
    epochs: float = 5
    warmup_epochs: float = 2
    global_batch_size: int = 64
    micro_batch_size: int = 4
    blr: float = 9e-3
    weight_decay: float = 0.02
    seed: int = 0
    eval_every: int = 0  # optimizer steps; 0: at the end of each epoch
    save_every: int = 0  # optimizer steps; 0: at the end of each epoch
    max_steps: int | None = None  # stop early (a checkpoint is written), e.g. for smoke tests
    sample_max_new_tokens: int = 48
    progress: bool = True
    resume: bool = False
    fsdp: bool = False
    # Packed micro-batches (cu_seqlens): "auto" packs where it saves work (the fused kernels skip the blocks
    # between sequences); True packs wherever the backend takes cu_seqlens (the reference then builds a T x T
    # mask: right, but slower than padding); False pads.
    pack: bool | str = "auto"
    overwrite: bool = False  # replace a run already in out_dir (else it is refused unless resume)

    RULES: ClassVar[dict] = dict(
        epochs=POSITIVE,
        warmup_epochs=NON_NEGATIVE,
        global_batch_size=POSITIVE_INT,
        micro_batch_size=POSITIVE_INT,
        blr=NON_NEGATIVE,
        weight_decay=NON_NEGATIVE,
        seed=ANY_INT,
        eval_every=NON_NEGATIVE_INT,
        save_every=NON_NEGATIVE_INT,
        max_steps=Number(int, min=1, optional=True),
        sample_max_new_tokens=NON_NEGATIVE_INT,
        progress=Flag(),
        resume=Flag(),
        fsdp=Flag(),
        pack=Choice((True, False, "auto")),
        overwrite=Flag(),
    )

    def __post_init__(self):
        check_fields(self, self.RULES)
        if self.resume and self.overwrite:
            raise ValueError(
                "resume and overwrite exclude each other (--resume continues a run, --overwrite replaces it)"
            )

    @property
    def lr(self) -> float:
        return self.blr * self.global_batch_size / 256


def recipe_key(cfg: TrainConfig, n_train: int, adapter: dict | None, quantize: str | None = None) -> dict:
    """What a resumed run must share with the checkpoint so that its loss curve continues the same run (the
    base's quantization too: an nf4 run resumed on a full base would silently become another run). `quantize`
    is left out when None, so checkpoints written before it existed still resume on a full base."""
    keys = ("epochs", "warmup_epochs", "global_batch_size", "blr", "weight_decay", "seed")
    key = {**{k: getattr(cfg, k) for k in keys}, "n_train": n_train, "adapter": adapter}
    return key if quantize is None else {**key, "quantize": quantize}


def fit_batch_to_data(cfg: TrainConfig, n_examples: int, world_size: int = 1, say=print) -> TrainConfig:
    """cfg, or a copy whose global (and if needed micro) batch fits a data set smaller than one global batch: the
    largest multiple of micro x world within it, so an epoch is at least one step. lr follows (blr x global / 256).
    Fewer examples than processes stays an error (Trainer's)."""
    if n_examples >= cfg.global_batch_size or n_examples < world_size:
        return cfg
    micro = min(cfg.micro_batch_size, n_examples // world_size)
    global_batch = micro * world_size * (n_examples // (micro * world_size))
    fitted = dataclasses.replace(cfg, global_batch_size=global_batch, micro_batch_size=micro)
    say(
        f"note: {n_examples} training examples are fewer than one global batch ({cfg.global_batch_size}); "
        f"using --global-batch-size {global_batch} --micro-batch-size {micro} (lr {fitted.lr:.3g})"
    )
    return fitted


@torch.no_grad()
def evaluate_loss(
    model, dataset: InstructionDataset, batch_size: int, pad_id: int, device, autocast=None, shard: bool = False
) -> float:
    """Token-mean loss over `dataset`; with `shard`, each rank takes every world_size-th batch and the sums
    are all-reduced."""
    order = sorted(range(len(dataset)), key=lambda i: dataset.lengths[i])  # little padding
    chunks = [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
    if shard:
        chunks = chunks[dist.get_rank() :: dist.get_world_size()]
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for ids in chunks:
        batch = collate([dataset[i] for i in ids], pad_id)
        with autocast or nullcontext():
            logits = model(batch["tokens"].to(device), **image_inputs(dataset, ids, device))
        totals[0] += lm_loss_sum(logits, batch["labels"].to(device)).double()
        totals[1] += (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    if shard:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()
