"""Load a Meta or Hugging Face LLaMA checkpoint directory into `model.Transformer` (Meta's parameter names).

`checkpoint_meta` and `checkpoint_hf` read the two formats (Meta: params.json + consolidated.NN.pth;
HF: config.json + safetensors or pytorch_model.bin) into one `Checkpoint`; this module checks it against the model
and assigns it. The model is built on the meta device and the checkpoint's tensors (memory-mapped) are assigned to
it, so nothing is allocated twice. Every problem with the files is a FileNotFoundError or CheckpointError
(a ValueError) naming the file and the tensor.
"""

from __future__ import annotations

import os

import torch

from llama_adapter.adapter import AdapterConfig
from llama_adapter.adapter_io import load_adapter
from llama_adapter.checkpoint import Checkpoint, materialize
from llama_adapter.checkpoint_hf import HF_CONFIG, hf_model_args, read_hf_checkpoint
from llama_adapter.checkpoint_meta import META_PARAMS, meta_model_args, read_meta_checkpoint
from llama_adapter.files import CheckpointError, read_json_object
from llama_adapter.model import Transformer
from llama_adapter.model_args import ModelArgs
from llama_adapter.validation import require_device


def read_checkpoint(path, deferred: bool = False) -> Checkpoint:
    """A Meta (params.json) or HF (config.json) checkpoint directory; deferred: tensors that need a copy (shard
    concatenation, q/k un-permutation) are `Deferred` until assigned."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if os.path.isfile(os.path.join(path, META_PARAMS)):
        return read_meta_checkpoint(path, deferred)
    if os.path.isfile(os.path.join(path, HF_CONFIG)):
        return read_hf_checkpoint(path, deferred)
    raise FileNotFoundError(f"{path} is neither a Meta checkpoint ({META_PARAMS}) nor a Hugging Face one ({HF_CONFIG})")


def check_state_dict(ckpt: Checkpoint, expected: dict[str, torch.Size], where: str) -> None:
    """Raise CheckpointError on a missing, unexpected or wrongly shaped tensor, naming it and its file."""
    missing = [n for n in expected if n not in ckpt.tensors]
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} is missing from {where} ({len(missing)} missing in all)")
    extra = [n for n in ckpt.tensors if n not in expected]
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]!r} in {ckpt.sources[extra[0]]} ({len(extra)} unexpected)")
    for name, shape in expected.items():
        got = ckpt.tensors[name].shape
        if got != shape:
            raise CheckpointError(
                f"tensor {name!r} in {ckpt.sources[name]} has shape {tuple(got)}, the model expects {tuple(shape)}"
            )


def check_float_tensors(ckpt: Checkpoint) -> None:
    """Raise CheckpointError on integer weights: a checkpoint already quantized (bitsandbytes, GPTQ, AWQ, ...) by
    another tool, which this loader cannot dequantize. Only metadata is read (mapped data stays on disk)."""
    for name, t in ckpt.tensors.items():
        if not t.dtype.is_floating_point:
            raise CheckpointError(
                f"tensor {name!r} in {ckpt.sources[name]} is {t.dtype}: an already-quantized checkpoint; load the "
                "original floating-point weights (quantize='nf4' or 'int8' quantizes them while loading)"
            )


def read_model_config(path) -> dict:
    """The ModelArgs fields a checkpoint dir's params.json / config.json states (checked), reading no weights."""
    path = os.fspath(path)
    meta, hf = os.path.join(path, META_PARAMS), os.path.join(path, HF_CONFIG)
    if os.path.isfile(meta):
        return meta_model_args(read_json_object(meta), meta)
    if os.path.isfile(hf):
        return hf_model_args(read_json_object(hf), hf)
    return read_checkpoint(path).args  # neither file: raises the error naming what is missing


def load_pretrained(
    path, adapter=None, dtype: torch.dtype | None = None, device=None, quantize=None, cls=Transformer, **overrides
):
    """A `cls` (the network, `Transformer`, or a subclass: `LLaMA.from_pretrained` passes `LLaMA`) with the
    weights of a Meta or HF directory.

    adapter: None, an AdapterConfig (fresh prompts, zero gates), or a path `load_adapter` accepts.
    dtype: None keeps the checkpoint's (its embedding's dtype); device: None is the CPU.
    quantize: None, "nf4" or "int8": the block linears are stored so (llama_adapter.quantize), each converted as
    it is read, so neither host nor device ever holds more than one full-precision weight beyond the mapped files.
    overrides: ModelArgs fields to replace, e.g. max_seq_len (Meta's params.json does not record it).
    """
    from llama_adapter.quantize import check_quantize, check_quantize_dtype, is_quantized_linear, quantize_weight

    require_device("cpu" if device is None else device)  # before reading gigabytes for a device we lack
    check_quantize(quantize)  # a bad name or a missing library surfaces before any file is opened
    ckpt = read_checkpoint(path, deferred=True)
    try:  # the rules were checked key by key; what remains are relations (dim divisible by n_heads, ...)
        args = ModelArgs(**{**ckpt.args, **overrides})
    except ValueError as e:
        with_overrides = f" (with overrides {overrides})" if overrides else ""
        raise CheckpointError(f"{ckpt.config_path}: {e}{with_overrides}") from None
    model = cls(args, device="meta")
    expected = {name: t.shape for name, t in model.state_dict().items()}
    check_float_tensors(ckpt)
    check_state_dict(ckpt, expected, os.fspath(path))
    if dtype is None:
        dtype = ckpt.tensors["tok_embeddings.weight"].dtype
    check_quantize_dtype(quantize, dtype)  # before the first weight is converted
    device = torch.device("cpu" if device is None else device)
    # Tensors already in the right dtype and place stay memory-mapped (torch.load's mmap is copy-on-write).
    state = {}
    for name in list(ckpt.tensors):
        # popped: a concatenated or converted copy dies once quantized
        t = materialize(ckpt.tensors.pop(name)).to(device=device, dtype=dtype)
        state[name] = quantize_weight(t, quantize, name) if quantize and is_quantized_linear(name) else t
        del t
    model.load_state_dict(state, strict=True, assign=True)
    if adapter is not None:
        if isinstance(adapter, AdapterConfig):
            model.attach_adapter(adapter)
        elif isinstance(adapter, str | os.PathLike):
            load_adapter(model, adapter)
        else:
            raise TypeError(f"adapter must be an AdapterConfig or a path, got {type(adapter).__name__}")
    return model
