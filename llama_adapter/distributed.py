"""Training on several processes (torchrun): process group and device, DDP or FSDP2 wrapping, the adapter's
gradient all-reduce under FSDP, and the adapter's tensors read and written without FSDP's collective hooks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llama_adapter.adapter import copy_in, is_adapter_param
from llama_adapter.quantize import quantization_of


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


def unwrap(model):
    return getattr(model, "module", model)


def check_fsdp_quantize(fsdp: bool, quantize: str | None) -> None:
    """FSDP2 shards an NF4 base but not an int8 one: torchao's Int8Tensor has no aten.split. Checked in
    `finetune` before the base is read (quantizing a 70B base takes minutes) and in `wrap_model` for the API."""
    if fsdp and quantize == "int8":
        raise ValueError(
            "FSDP cannot shard an int8 base (--fsdp with --quantize int8); use --quantize nf4 "
            "(which FSDP2 shards) or DDP"
        )


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter's parameters by state-dict name, read without `state_dict()` (whose FSDP hooks communicate)."""
    return {name: p.detach() for name, p in model.named_parameters() if is_adapter_param(name, model.adapter_config)}


def load_adapter_tensors(model, tensors: dict) -> None:
    """Copy adapter tensors (adapter_state_dict names) into the model; every adapter key must match."""
    copy_in(adapter_tensors(model), tensors, "the checkpoint's adapter")
