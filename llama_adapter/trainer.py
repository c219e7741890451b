"""The training loop: `Trainer` runs the recipe (llama_adapter.recipe) on a model with an adapter attached, on
one process or many (llama_adapter.distributed), with crash-safe checkpoints (llama_adapter.train_state) in a
run directory (llama_adapter.run_dir); SIGINT/SIGTERM stop it at a step boundary.

The loss of a global batch is the sum of token losses divided by its number of target tokens, counted in
advance from the batch's example ids (every rank knows the whole batch), so the gradient is the same whatever
the split into micro-batches and ranks; each rank scales by world_size because DDP averages.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from llama_adapter import train_state
from llama_adapter.attention import supports_packing
from llama_adapter.data import DataError, InstructionDataset, collate, global_batches, image_inputs, rank_micro_batches
from llama_adapter.distributed import (
    DistInfo,
    adapter_tensors,
    load_adapter_tensors,
    sync_adapter_grads,
    unwrap,
    wrap_model,
)
from llama_adapter.loading import CheckpointError
from llama_adapter.quantize import quantization_of
from llama_adapter.recipe import (
    LRSchedule,
    TrainConfig,
    evaluate_loss,
    fit_batch_to_data,
    lm_loss_sum,
    make_optimizer,
    precision,
    recipe_key,
)
from llama_adapter.run_dir import (
    ATOMIC_FILES,
    METRICS_FILE,
    RUN_FILES,
    RUN_MARKER,
    RunDirectoryError,
    check_run_dir,
    read_metrics,
    remove_run,
    write_metrics,
)


class Trainer:
    """Runs the recipe on `model` (with an adapter attached); `fit()` returns the per-step metrics."""

    def __init__(
        self,
        model,
        train_set: InstructionDataset,
        val_set: InstructionDataset | None,
        cfg: TrainConfig,
        *,
        pad_id: int = 0,
        tokenizer=None,
        dist_info: DistInfo | None = None,
    ):
        self.cfg, self.train_set, self.val_set, self.pad_id, self.tokenizer = cfg, train_set, val_set, pad_id, tokenizer
        self.info = dist_info or DistInfo(device=next(model.parameters()).device)
        self.model = model
        cfg = self.cfg = fit_batch_to_data(
            cfg, len(train_set), self.info.world_size, print if self.info.is_main else (lambda *a: None)
        )
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
            raise CheckpointError(
                f"{self.out_dir / train_state.CHECKPOINT_NAME} is at step {state['step']}, past "
                f"this run's {self.total_steps} steps"
            )
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
        # From here until `_step_and_log` has advanced the step counter the weights belong to no step: an exception
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
        """Whether micro-batches go packed (see TrainConfig.pack): "auto" where packing saves work, True wherever
        the op takes cu_seqlens. Same loss either way (tests/test_varlen_train.py)."""
        return self.cfg.pack is not False and supports_packing(self.info.device, saves_work=self.cfg.pack == "auto")

    # -- evaluation
    def evaluate(self, dataset: InstructionDataset) -> float:
        # FSDP's forward is collective, so there every rank runs every batch (validation sets are small)
        shard = not self.cfg.fsdp and self.info.world_size > 1
        return evaluate_loss(
            self.wrapped, dataset, self.cfg.micro_batch_size, self.pad_id, self.info.device, self.autocast, shard=shard
        )

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
            out = generate(
                unwrap(self.model),
                [tokens[:prompt_len]],
                room,
                eos_id=eos_id,
                stop_ids=getattr(self.tokenizer, "stop_ids", None),
            )
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
                self._step_and_log(epoch_cache[1][index], last, bar)
                saved = self.step % save_every == 0 or self.step == last
                if saved:
                    self.save()
                if self._stop_requested(signals):
                    if not saved:
                        self.save()
                    raise StoppedAtStepBoundary(f"signal {signals.received}")
        except KeyboardInterrupt as stop:
            self._checkpoint_on_interrupt(stop)
            raise
        finally:
            signals.restore()
            if bar is not None:
                bar.close()
        return self.history

    def _step_and_log(self, batch_ids: list[int], last: int, bar) -> None:
        """One optimizer step and its metrics record (with validation loss and a sample where due), logged and
        shown on the progress bar."""
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        loss, tokens = self.train_step(batch_ids)
        self.step += 1
        self.rng = train_state.capture_rng()
        self._mid_update = False
        seconds = time.perf_counter() - t0
        record = {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "loss": loss,
            "lr": lr,
            "tokens_per_s": tokens / seconds,
        }
        eval_every = self.cfg.eval_every or self.steps_per_epoch
        if self.val_set is not None and len(self.val_set) and (self.step % eval_every == 0 or self.step == last):
            record["val_loss"] = self.evaluate(self.val_set)
            record["sample"] = self.sample()
        self.log(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
            if "val_loss" in record:
                bar.write(f"step {self.step}: val_loss {record['val_loss']:.4f} | sample: {record['sample']!r}")

    def _checkpoint_on_interrupt(self, stop: KeyboardInterrupt) -> None:
        """Leave a checkpoint of the last whole step where the weights hold one, and say where it is."""
        if isinstance(stop, StoppedAtStepBoundary):
            where = f"checkpoint at step {self.step}"
        elif self._mid_update:  # the weights are past the counted step: keep the last checkpoint as it is
            where = "stopped during an optimizer update; the last checkpoint written is kept"
        else:  # raised inside a step before its update: the model still holds step `self.step`'s weights
            self.optimizer.zero_grad(set_to_none=True)
            self.save()
            where = f"checkpoint at step {self.step}"
        if self.info.is_main:
            print(f"\ninterrupted: {where} in {self.out_dir} (resume with --resume)", file=sys.stderr)


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
