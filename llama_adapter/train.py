"""Adapter fine-tuning with the official LLaMA-Adapter recipe, on one device or many (torchrun: DDP or FSDP).

Recipe (the official training code): only prompts and gates train; AdamW betas (0.9, 0.95), weight decay 0.02
on prompts and 0 on gates; lr = blr * global_batch / 256 (blr 9e-3); per optimizer step, linear warmup over
`warmup_epochs`, then a half cosine to 0 at the end of the last epoch. Gradients accumulate to the global
batch = micro_batch x accumulation x world_size.

The loss of a global batch is the sum of token losses divided by its number of target tokens, counted in
advance from the batch's example ids (every rank knows the whole batch), so the gradient is the same whatever
the split into micro-batches and ranks; each rank scales by world_size because DDP averages.

Precision: on CUDA the frozen base is bf16 (fp16 + GradScaler where bf16 is missing) under autocast, the
adapter fp32; on the CPU everything is fp32. The layers below the first adapted one run without autograd by
construction (nothing there requires grad), and `--grad-checkpointing` recomputes the adapted layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama_adapter import train_state
from llama_adapter.adapter import copy_in, is_adapter_param
from llama_adapter.adapter_io import CONFIG_FILE, WEIGHTS_FILE
from llama_adapter.attention import resolve_backend
from llama_adapter.chat import FORMATS
from llama_adapter.data import (
    IGNORE_INDEX,
    DataError,
    InstructionDataset,
    collate,
    global_batches,
    image_inputs,
    load_examples,
    rank_micro_batches,
    split_examples,
)
from llama_adapter.loading import CheckpointError
from llama_adapter.quantize import QUANTIZATIONS, check_quantize, quantization_of
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
    require_device,
)


# ----------------------------------------------------------------------------- recipe
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


# ----------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, init_method: str | None = None) -> DistInfo:
    """torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) -> process group (nccl on CUDA, gloo on CPU) and device.

    `init_method` (e.g. "file:///tmp/x") replaces the env:// rendezvous (MASTER_ADDR/PORT): processes spawned
    without torchrun can then meet through a file, with no TCP port to pick and lose to another process."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if init_method is None:
            dist.init_process_group(backend)
        else:  # only env:// reads rank and world size from the environment itself
            dist.init_process_group(backend, init_method, rank=int(os.environ["RANK"]), world_size=world)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    return DistInfo(device=dev)


def wrap_model(model, info: DistInfo, fsdp: bool = False):
    """DDP (reduces only the adapter's grads: DDP skips parameters that do not require grad) or FSDP2.

    Under FSDP every frozen weight is sharded layer by layer (each layer projects its prompt through its own
    wk, wv inside its forward, where FSDP has gathered them) and the small adapter stays replicated (ignored by
    FSDP), its gradients averaged by one all-reduce per step (`sync_adapter_grads`)."""
    if info.world_size == 1 and not fsdp:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        check_fsdp_quantize(fsdp, quantization_of(model))

        replicated = set(model.adapter_parameters())
        for layer in model.layers:
            fully_shard(layer, ignored_params=replicated & set(layer.parameters()))
        fully_shard(model, ignored_params=replicated)
        for p in replicated:  # FSDP does not move the parameters it ignores
            p.data = p.data.to(info.device)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


def sync_adapter_grads(model, world_size: int) -> None:
    """Average the adapter's gradients across ranks (FSDP path; DDP does this itself)."""
    grads = [p.grad for p in model.adapter_parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# ----------------------------------------------------------------------------- trainer
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
        epochs=POSITIVE, warmup_epochs=NON_NEGATIVE, global_batch_size=POSITIVE_INT, micro_batch_size=POSITIVE_INT,
        blr=NON_NEGATIVE, weight_decay=NON_NEGATIVE, seed=ANY_INT, eval_every=NON_NEGATIVE_INT,
        save_every=NON_NEGATIVE_INT, max_steps=Number(int, min=1, optional=True),
        sample_max_new_tokens=NON_NEGATIVE_INT,
        progress=Flag(), resume=Flag(), fsdp=Flag(), pack=Choice((True, False, "auto")), overwrite=Flag(),
    )  # fmt: skip

    def __post_init__(self):
        check_fields(self, self.RULES)
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other (--resume continues a run, --overwrite "
                             "replaces it)")  # fmt: skip

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


def unwrap(model):
    return getattr(model, "module", model)


def fit_batch_to_data(cfg: TrainConfig, n_examples: int, world_size: int = 1, say=print) -> TrainConfig:
    """cfg, or a copy whose global (and if needed micro) batch fits a data set smaller than one global batch: the
    largest multiple of micro x world within it, so an epoch is at least one step. lr follows (blr x global / 256).
    Fewer examples than processes stays an error (Trainer's)."""
    if n_examples >= cfg.global_batch_size or n_examples < world_size:
        return cfg
    micro = min(cfg.micro_batch_size, n_examples // world_size)
    global_batch = micro * world_size * (n_examples // (micro * world_size))
    fitted = dataclasses.replace(cfg, global_batch_size=global_batch, micro_batch_size=micro)
    say(f"note: {n_examples} training examples are fewer than one global batch ({cfg.global_batch_size}); "
        f"using --global-batch-size {global_batch} --micro-batch-size {micro} (lr {fitted.lr:.3g})")  # fmt: skip
    return fitted


class Trainer:
    """Runs the recipe on `model` (with an adapter attached); `fit()` returns the per-step metrics."""

    def __init__(self, model, train_set: InstructionDataset, val_set: InstructionDataset | None, cfg: TrainConfig,
                 *, pad_id: int = 0, tokenizer=None, dist_info: DistInfo | None = None):  # fmt: skip
        self.cfg, self.train_set, self.val_set, self.pad_id, self.tokenizer = cfg, train_set, val_set, pad_id, tokenizer
        self.info = dist_info or DistInfo(device=next(model.parameters()).device)
        self.model = model
        cfg = self.cfg = fit_batch_to_data(cfg, len(train_set), self.info.world_size,
                                           print if self.info.is_main else (lambda *a: None))  # fmt: skip
        per_step = cfg.micro_batch_size * self.info.world_size
        if cfg.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({cfg.global_batch_size}) must be a multiple of micro_batch_size x world_size "
                f"({cfg.micro_batch_size} x {self.info.world_size})"
            )
        self.steps_per_epoch = len(train_set) // cfg.global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(train_set)} training examples are fewer than one global batch ({cfg.global_batch_size})"
            )
        self.total_steps = math.ceil(self.steps_per_epoch * cfg.epochs)
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, LRSchedule(self.steps_per_epoch, cfg.warmup_epochs, cfg.epochs)
        )
        self.autocast, self.scaler = precision(self.info.device)
        quantize = quantization_of(model)  # before FSDP turns the weights into DTensors
        self.wrapped = wrap_model(model, self.info, cfg.fsdp)
        self.out_dir = Path(cfg.out_dir)
        self.step = 0
        self.rng = train_state.capture_rng()
        self.history: list[dict] = []
        adapter = model.adapter_config.to_dict() if model.adapter_config else None
        self.meta = recipe_key(cfg, len(train_set), adapter, quantize)
        self._mid_update = False  # between optimizer.step() and the step counter's advance (see train_step)

    # -- checkpoints
    def save(self) -> None:
        if not self.info.is_main:
            return
        train_state.save_checkpoint(
            self.out_dir,
            adapter=adapter_tensors(self.model),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            step=self.step,
            rng=self.rng,
            meta=self.meta,
            scaler=self.scaler.state_dict() if self.scaler else None,
        )

    def restore(self) -> None:
        state = train_state.load_checkpoint(self.out_dir)
        train_state.check_resume_compatible(state["meta"], self.meta, self.out_dir)
        try:  # entries of the right type whose contents are not what they should be (a damaged or edited file)
            load_adapter_tensors(self.model, state["adapter"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler and state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
            train_state.restore_rng(state["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            path = self.out_dir / train_state.CHECKPOINT_NAME
            raise CheckpointError(f"{path} cannot be restored ({type(e).__name__}: {e})") from e
        if state["step"] > self.total_steps:
            raise CheckpointError(f"{self.out_dir / train_state.CHECKPOINT_NAME} is at step {state['step']}, past "
                                  f"this run's {self.total_steps} steps")  # fmt: skip
        self.step = state["step"]
        self.rng = state["rng"]
        self.history = [m for m in read_metrics(self.out_dir, say=self._warn) if m["step"] <= self.step]
        if self.info.is_main:  # drop what an interrupted run logged past its last checkpoint
            write_metrics(self.out_dir, self.history)

    # -- one optimizer step
    def train_step(self, batch_ids: list[int]) -> tuple[float, int]:
        """Accumulate over this rank's micro-batches of one global batch, then update. -> (loss, tokens)."""
        cfg, info = self.cfg, self.info
        target = self.train_set.target_tokens(batch_ids)
        micro = rank_micro_batches(batch_ids, cfg.micro_batch_size, info.world_size, info.rank)
        loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
        for j, ids in enumerate(micro):
            images = image_inputs(self.train_set, ids, info.device)  # {} for text-only data
            # Image prompts are per example, which packed rows cannot carry: those batches stay padded.
            pack = self.packs() and not images
            batch = collate([self.train_set[i] for i in ids], self.pad_id, pack=pack)
            packed = dict(layout=batch["layout"]) if pack else {}  # moved to the tokens' device by the model
            last = j == len(micro) - 1
            no_sync = self.wrapped.no_sync if hasattr(self.wrapped, "no_sync") and not last else nullcontext
            with no_sync():
                with self.autocast:
                    logits = self.wrapped(batch["tokens"].to(info.device), **images, **packed)
                micro_loss = lm_loss_sum(logits, batch["labels"].to(info.device))
                scaled = micro_loss * (info.world_size / target)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += micro_loss.detach().double()
        if cfg.fsdp and info.world_size > 1:
            sync_adapter_grads(self.model, info.world_size)
        # From here until fit() has advanced the step counter the weights belong to no step: an exception
        # raised in between must not be saved as a checkpoint (signals wait for the step boundary anyway).
        self._mid_update = True
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if info.world_size > 1:
            dist.all_reduce(loss_sum)
        tokens = sum(self.train_set.lengths[i] for i in batch_ids)
        return (loss_sum / target).item(), tokens

    def packs(self) -> bool:
        """Whether micro-batches go packed (see TrainConfig.pack); never on the baselines (sdpa, eager), which
        have no cu_seqlens. Same loss either way (tests/test_varlen_train.py)."""
        backend = resolve_backend(self.info.device)
        if self.cfg.pack is False or backend in ("sdpa", "eager"):
            return False
        return self.cfg.pack is True or backend == "triton"

    # -- evaluation
    def evaluate(self, dataset: InstructionDataset) -> float:
        # FSDP's forward is collective, so there every rank runs every batch (validation sets are small)
        shard = not self.cfg.fsdp and self.info.world_size > 1
        return evaluate_loss(self.wrapped, dataset, self.cfg.micro_batch_size, self.pad_id, self.info.device,
                             self.autocast, shard=shard)  # fmt: skip

    def sample(self) -> str | None:
        """Greedy answer to one validation (else training) instruction, or None without a tokenizer."""
        if self.tokenizer is None:
            return None
        from llama_adapter.generation import generate
        tokens, prompt_len = (self.val_set or self.train_set)[0][:2]  # the conversation up to its first answer
        room = min(self.cfg.sample_max_new_tokens, self.model.params.max_seq_len - prompt_len)
        if room < 1:
            return None
        with torch.no_grad(), self.autocast:
            eos_id = self.tokenizer.eos_id if self.tokenizer.eos_id >= 0 else None  # -1: the tokenizer has none
            out = generate(unwrap(self.model), [tokens[:prompt_len]], room, eos_id=eos_id,
                           stop_ids=getattr(self.tokenizer, "stop_ids", None))  # fmt: skip
        return self.tokenizer.decode(out[0])

    # -- the loop
    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.info.is_main:
            with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _warn(self, message: str) -> None:
        if self.info.is_main:
            print(f"warning: {message}", file=sys.stderr)

    def _prepare_out_dir(self) -> bool:
        """Apply the run-directory rules (`check_run_dir`); True if there is a checkpoint to resume from."""
        cfg = self.cfg
        refused = None
        if self.info.is_main:
            try:
                check_run_dir(self.out_dir, cfg.resume, cfg.overwrite)
            except RunDirectoryError as e:
                refused = e
            else:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                if not any((self.out_dir / name).exists() for name in RUN_FILES):  # never vouch for files we found
                    (self.out_dir / RUN_MARKER).touch()
                for tmp in train_state.remove_stale_temporaries(self.out_dir, ATOMIC_FILES):
                    self._warn(f"removed {tmp}, a partial file left by an interrupted write")
                if cfg.overwrite:
                    remove_run(self.out_dir)
        if self.info.world_size > 1:  # every rank learns the main rank's verdict before anyone reads the dir
            flag = torch.tensor([float(refused is not None)], device=self.info.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and refused is None:
                refused = RunDirectoryError(f"rank 0 refused the output directory {self.out_dir}")
        if refused is not None:
            raise refused
        resumable = cfg.resume and (self.out_dir / train_state.CHECKPOINT_NAME).exists()
        if cfg.resume and not resumable:
            self._warn(f"--resume: no {train_state.CHECKPOINT_NAME} in {self.out_dir}, starting from step 0")
        return resumable

    def _stop_requested(self, signals: StepBoundarySignals) -> bool:
        """Whether a signal arrived on any rank (all ranks must stop at the same step boundary)."""
        stop = signals.received is not None
        if self.info.world_size > 1:
            flag = torch.tensor([float(stop)], device=self.info.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def fit(self) -> list[dict]:
        """Train to the end (or max_steps). SIGINT/SIGTERM stop it at the next step boundary with a checkpoint
        of that step (then KeyboardInterrupt propagates); `resume=True` continues exactly where it stopped."""
        cfg, info = self.cfg, self.info
        if self._prepare_out_dir():
            self.restore()
        elif info.is_main:
            (self.out_dir / METRICS_FILE).unlink(missing_ok=True)
        last = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
        bar = None
        if cfg.progress and info.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="finetune", dynamic_ncols=True)
        eval_every = cfg.eval_every or self.steps_per_epoch
        save_every = cfg.save_every or self.steps_per_epoch
        epoch_cache = (None, None)
        self._mid_update = False
        signals = StepBoundarySignals()
        try:
            signals.install()
            while self.step < last:
                epoch, index = divmod(self.step, self.steps_per_epoch)
                if epoch_cache[0] != epoch:
                    epoch_cache = (
                        epoch,
                        global_batches(self.train_set.lengths, cfg.global_batch_size, cfg.seed, epoch),
                    )
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                loss, tokens = self.train_step(epoch_cache[1][index])
                self.step += 1
                self.rng = train_state.capture_rng()
                self._mid_update = False
                seconds = time.perf_counter() - t0
                record = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": loss, "lr": lr,
                          "tokens_per_s": tokens / seconds}  # fmt: skip
                if (
                    self.val_set is not None
                    and len(self.val_set)
                    and (self.step % eval_every == 0 or self.step == last)
                ):
                    record["val_loss"] = self.evaluate(self.val_set)
                    record["sample"] = self.sample()
                self.log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
                    if "val_loss" in record:
                        bar.write(f"step {self.step}: val_loss {record['val_loss']:.4f} | sample: {record['sample']!r}")
                saved = self.step % save_every == 0 or self.step == last
                if saved:
                    self.save()
                if self._stop_requested(signals):
                    if not saved:
                        self.save()
                    raise StoppedAtStepBoundary(f"signal {signals.received}")
        except KeyboardInterrupt as stop:
            if isinstance(stop, StoppedAtStepBoundary):
                where = f"checkpoint at step {self.step}"
            elif self._mid_update:  # the weights are past the counted step: keep the last checkpoint as it is
                where = "stopped during an optimizer update; the last checkpoint written is kept"
            else:  # raised inside a step before its update: the model still holds step `self.step`'s weights
                self.optimizer.zero_grad(set_to_none=True)
                self.save()
                where = f"checkpoint at step {self.step}"
            if info.is_main:
                print(f"\ninterrupted: {where} in {self.out_dir} (resume with --resume)", file=sys.stderr)
            raise
        finally:
            signals.restore()
            if bar is not None:
                bar.close()
        return self.history


class StoppedAtStepBoundary(KeyboardInterrupt):
    """Training stopped on a signal at a step boundary, after writing that step's checkpoint."""


class StepBoundarySignals:
    """While training runs, SIGINT (Ctrl-C) and SIGTERM (torchrun, schedulers) only set `received`; the loop
    stops at the next step boundary, so the checkpoint it writes holds exactly that step's weights. A second
    signal interrupts at once. Handlers can only be installed from the main thread; elsewhere signals keep
    their handlers (Python delivers them to the main thread anyway)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second signal {signum}")
        self.received = signum

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class RunDirectoryError(ValueError):
    """An output directory that holds a run which this run would silently replace or continue."""




def check_run_dir(out_dir, resume: bool, overwrite: bool) -> None:
    """A run directory that already holds a run (checkpoint, metrics, adapter) is continued with resume, replaced
    with overwrite, and refused otherwise."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirectoryError(f"--out {out_dir} exists and is not a directory")
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not (resume or overwrite):
        raise RunDirectoryError(
            f"{out_dir} already holds a run ({', '.join(existing)}): pass --resume to continue it, or --overwrite "
            "to delete it and start again"
        )
    if existing and overwrite and not (out_dir / RUN_MARKER).is_file():
        raise RunDirectoryError(
            f"--overwrite: {out_dir} holds {', '.join(existing)} but no {RUN_MARKER}, so no run of ours wrote "
            "them; they are not deleted (move them away, or choose another --out)"
        )


def remove_run(out_dir) -> None:
    """Delete what a run wrote into `out_dir`, file by file, nothing else: --out may be a directory holding the
    user's own files (their home, a project folder), and `adapter/` may hold more than our two files, so no
    directory is removed while it still holds something; a run file's name taken by a directory is refused, and
    so is a directory whose run files no run of ours wrote (no RUN_MARKER)."""
    out_dir = Path(out_dir)
    check_run_dir(out_dir, resume=False, overwrite=True)
    files = [out_dir / name for name in RUN_FILES if name != ADAPTER_DIR]
    files += [out_dir / ADAPTER_DIR / name for name in ADAPTER_FILES]
    for path in files:
        if path.is_dir() and not path.is_symlink():
            raise RunDirectoryError(f"--overwrite: {path} is a directory, not a file this run wrote; move it away")
    for path in files:
        path.unlink(missing_ok=True)
    adapter = out_dir / ADAPTER_DIR
    if adapter.is_dir() and not adapter.is_symlink() and not any(adapter.iterdir()):
        adapter.rmdir()


METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what save_adapter writes into ADAPTER_DIR
RUN_FILES = (train_state.CHECKPOINT_NAME, METRICS_FILE, ADAPTER_DIR, "loss.png")  # what a run writes into its dir
# Written before any RUN_FILES (a fresh run starts only where none exist): the run files beside it are ours, so
# --overwrite may delete them; without it they could be anyone's (--out is the user's home, say).
RUN_MARKER = ".llama-adapter-run"
ATOMIC_FILES = (train_state.CHECKPOINT_NAME, METRICS_FILE)  # written through a .tmp-<pid>-<name> file


def read_metrics(out_dir, say=None) -> list[dict]:
    """The records of OUT/metrics.jsonl. A torn last line (a kill while it was written) is dropped, with a
    warning through `say`; any other unreadable line is a CheckpointError naming the file and line."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({e}); delete it or start again with --overwrite") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records = []
    for n, line in numbered:
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except ValueError as e:  # JSONDecodeError too
            if n == numbered[-1][0]:
                if say is not None:
                    say(f"{path}:{n}: dropping a torn last line (the run was stopped while writing it)")
                break
            raise CheckpointError(f"{path}:{n}: unreadable metrics line ({e}); fix or delete the line") from None
        records.append(record)
    return records


def write_metrics(out_dir, records: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    train_state.atomic_write_text(Path(out_dir) / METRICS_FILE, text)


@torch.no_grad()
def evaluate_loss(model, dataset: InstructionDataset, batch_size: int, pad_id: int, device, autocast=None,
                  shard: bool = False) -> float:  # fmt: skip
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


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter's parameters by state-dict name, read without `state_dict()` (whose FSDP hooks communicate)."""
    return {name: p.detach() for name, p in model.named_parameters() if is_adapter_param(name, model.adapter_config)}


def load_adapter_tensors(model, tensors: dict) -> None:
    """Copy adapter tensors (adapter_state_dict names) into the model; every adapter key must match."""
    copy_in(adapter_tensors(model), tensors, "the checkpoint's adapter")


def plot_loss(history: list[dict], path) -> Path | None:
    """Loss curve PNG (train loss per step, validation loss where measured); None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train")
    val = [r for r in history if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- command line
FRACTION = Number(float, min=0, max=1, max_open=True)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter-len", type=POSITIVE_INT, default=10, help="prompt tokens per adapted layer (K)")
    p.add_argument("--adapter-layers", type=POSITIVE_INT, default=None,
                   help="adapted top layers (default 30, or all of a smaller model's; clamped to n_layers)")
    p.add_argument("--epochs", type=POSITIVE, default=5)
    p.add_argument("--warmup-epochs", type=NON_NEGATIVE, default=2)
    p.add_argument("--global-batch-size", type=POSITIVE_INT, default=64, help="= micro x accumulation x world size")
    p.add_argument("--micro-batch-size", type=POSITIVE_INT, default=4)
    p.add_argument("--max-seq-len", type=POSITIVE_INT, default=None,
                   help="longer examples are truncated (and counted); default 512, or a shorter model context")
    p.add_argument("--blr", type=NON_NEGATIVE, default=9e-3, help="base lr; lr = blr * global_batch / 256")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.02, help="on prompts; gates get none")
    p.add_argument("--seed", type=ANY_INT, default=0)
    p.add_argument("--val-fraction", type=FRACTION, default=0.02, help="held out for validation loss (0: none)")
    p.add_argument("--eval-every", type=NON_NEGATIVE_INT, default=0,
                   help="optimizer steps between evaluations (0: each epoch)")  # fmt: skip
    p.add_argument("--save-every", type=NON_NEGATIVE_INT, default=0,
                   help="optimizer steps between checkpoints (0: each epoch)")  # fmt: skip
    p.add_argument("--image-features", help="feature file/dir (extract-features): records' 'image' ids -> prompts")
    p.add_argument("--bias-tuning", action="store_true", help="V2: train bias and scale of every block linear")
    p.add_argument("--norm-tuning", action="store_true", help="V2: train the RMSNorm weights")
    p.add_argument("--early-fusion", type=NON_NEGATIVE_INT, default=0,
                   help="V2: image offsets only in the first N layers")  # fmt: skip


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="train a LLaMA-Adapter on Alpaca-format instructions",
                              description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--model", required=True, help="Meta or Hugging Face checkpoint directory")
    p.add_argument("--data", required=True, help="JSON list or JSONL of Alpaca records or chat {messages} records")
    p.add_argument("--out", required=True, help="output directory (checkpoint, metrics, adapter/)")
    p.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json (default: in --model or its parent)")
    p.add_argument("--chat-format", choices=FORMATS, default="auto",
                   help="how examples are formatted (auto: the checkpoint's chat template, else llama3 for a LLaMA-3 "
                        "vocabulary, else alpaca); see llama_adapter.chat")  # fmt: skip
    add_recipe_args(p)
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/checkpoint.pt")
    run.add_argument("--overwrite", action="store_true",
                     help="OUT holds a run: delete it (checkpoint, metrics, adapter/, loss.png) and start again")
    p.add_argument("--max-steps", type=POSITIVE_INT, help="stop after this many optimizer steps (checkpoint written)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="frozen base weights (auto: bf16 on CUDA, fp16 without bf16, fp32 on CPU)")  # fmt: skip
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute adapted layers in backward")
    p.add_argument("--fsdp", action="store_true", help="shard the frozen base across ranks (FSDP2)")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                   help="store the frozen block linears in 4-bit NF4 or int8 (needs torchao)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--no-pack", action="store_true", help="pad micro-batches (default: pack them where the fused kernels run)"
    )
    p.set_defaults(func=run_finetune)


def prepare_data(examples: list[dict], tokenizer, max_seq_len: int, val_fraction: float, seed: int, say=print,
                 chat_format=None):  # fmt: skip
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


def run_finetune(args) -> int:
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # torchrun / schedulers stop jobs with SIGTERM
    try:
        finetune(args)
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def check_fsdp_quantize(fsdp: bool, quantize: str | None) -> None:
    """FSDP2 shards an NF4 base but not an int8 one: torchao's Int8Tensor has no aten.split. Checked in
    `finetune` before the base is read (quantizing a 70B base takes minutes) and in `wrap_model` for the API."""
    if fsdp and quantize == "int8":
        raise ValueError("FSDP cannot shard an int8 base (--fsdp with --quantize int8); use --quantize nf4 "
                         "(which FSDP2 shards) or DDP")  # fmt: skip


def finetune(args) -> Trainer:
    """`llama-adapter finetune` without the signal handling: load, train, save; returns the trainer (whose
    `.model` holds the trained adapter)."""
    from llama_adapter import AdapterConfig, LLaMA
    from llama_adapter.chat import get_chat_format
    from llama_adapter.tokenizer import Tokenizer

    if args.device is not None:
        require_device(args.device, "--device")
    check_run_dir(args.out, args.resume, args.overwrite)  # before anything heavy loads
    check_fsdp_quantize(args.fsdp, getattr(args, "quantize", None))
    info = init_distributed(args.device)
    say = print if info.is_main else (lambda *a, **k: None)
    if args.fsdp and info.world_size == 1:
        say("note: --fsdp with one process shards nothing")
    check_quantize(getattr(args, "quantize", None))  # a missing torchao surfaces before the data is read
    examples = load_examples(args.data)  # data errors surface before anything heavy is loaded
    visual_dim = None
    if args.image_features:
        from llama_adapter.multimodal import attach_image_features

        visual_dim = attach_image_features(examples, args.image_features)
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else Tokenizer.from_dir(args.model)
    chat_format = get_chat_format(args.chat_format, tokenizer)
    say(f"tokenizer: {tokenizer.kind} ({tokenizer.model_path}, {tokenizer.n_words} tokens); {chat_format.name} format")
    max_seq_len, layers = model_defaults(args, say)
    train_set, val_set = prepare_data(examples, tokenizer, max_seq_len, args.val_fraction, args.seed, say,
                                      chat_format)  # fmt: skip

    dtype = _base_dtype(args.dtype, info.device)
    # FSDP shards from host memory; DDP loads straight onto this rank's device.
    model = LLaMA.from_pretrained(args.model, dtype=dtype, device="cpu" if args.fsdp else info.device,
                                  quantize=getattr(args, "quantize", None))  # fmt: skip
    torch.manual_seed(args.seed)  # the same initial prompts on every rank and every (re)start
    v2 = dict(bias_tuning=args.bias_tuning, norm_tuning=args.norm_tuning, early_fusion=args.early_fusion)
    model.attach_adapter(AdapterConfig(args.adapter_len, layers, visual_dim=visual_dim, **v2))
    model.gradient_checkpointing = args.grad_checkpointing
    say(model.trainable_summary())

    cfg = TrainConfig(
        out_dir=args.out, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size, blr=args.blr,
        weight_decay=args.weight_decay, seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
        max_steps=args.max_steps, progress=not args.no_progress, resume=args.resume, fsdp=args.fsdp,
        pack=False if args.no_pack else "auto", overwrite=args.overwrite,
    )  # fmt: skip
    trainer = Trainer(model, train_set, val_set, cfg, pad_id=tokenizer.pad_id, tokenizer=tokenizer, dist_info=info)
    cfg = trainer.cfg  # batch sizes fitted to a small data set
    accum = cfg.global_batch_size // (cfg.micro_batch_size * info.world_size)
    say(
        f"lr {cfg.lr:.3g} (blr {cfg.blr} x {cfg.global_batch_size} / 256); {trainer.steps_per_epoch} steps/epoch, "
        f"{trainer.total_steps} steps; micro {cfg.micro_batch_size} x accum {accum} x world {info.world_size}"
    )

    trainer.fit()
    if info.is_main:
        out = Path(args.out)
        model.save_adapter(out / ADAPTER_DIR)
        png = plot_loss(trainer.history, out / "loss.png")
        say(f"adapter: {out / 'adapter'}; metrics: {out / METRICS_FILE}; "
            + (f"loss curve: {png}" if png else "no loss curve (pip install matplotlib)"))  # fmt: skip
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return trainer


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


__all__ = [
    "DistInfo",
    "LRSchedule",
    "TrainConfig",
    "Trainer",
    "evaluate_loss",
    "finetune",
    "init_distributed",
    "lm_loss_sum",
    "lr_factor",
    "make_optimizer",
    "prepare_data",
    "register_cli",
    "run_finetune",
]
