"""A quantized frozen base: NF4 (QLoRA) or int8 weight-only storage of the seven linear layers of every block.

LLaMA-Adapter trains only prompts and gates, so the base's weights are read, never updated: they can be kept in
4 or 8 bits and dequantized on the fly by each matmul, while activations (and the fused attention kernels) stay
in the compute dtype. The formats are torchao's tensor subclasses, which compose with autograd (the gradient
reaches the activations, hence the prompts), FSDP2 (NF4) and torch.compile:

- "nf4": QLoRA's 4-bit NormalFloat (Dettmers et al. 2023): blocks of 64 weights share an absmax scale, each
  weight is the nearest of 16 levels placed at normal quantiles; the scales are themselves quantized to int8 in
  groups of 256 blocks ("double quantization"). ~0.52 bytes per weight.
- "int8": symmetric per-output-channel int8 with one scale per row (gpt-fast's int8 weight-only). ~1 byte.

Embeddings, norms, the output head and the adapter stay in full precision (QLoRA and litgpt do the same: the head
is small next to the blocks and sensitive to rounding).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from llama_adapter.model_args import BLOCK_LINEARS

QUANTIZATIONS = ("nf4", "int8")
NF4_BLOCK = 64  # weights per absmax scale (QLoRA)
NF4_SCALER_BLOCK = 256  # scales per double-quantization group (QLoRA); smaller where a tensor has fewer blocks
INSTALL_HINT = "pip install torchao  (or: pip install 'llama-adapter[quant]')"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class QuantizationUnavailable(ImportError):
    """torchao, which provides the quantized formats, is not installed."""


def check_quantize(quantize: str | None) -> str | None:
    """Validate a `quantize=` argument and that its library is importable: None, "nf4" or "int8"."""
    if quantize is None:
        return None
    if not isinstance(quantize, str) or quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be None or one of {QUANTIZATIONS}, got {quantize!r}")
    _torchao()
    return quantize


def check_quantize_dtype(quantize: str | None, dtype: torch.dtype) -> None:
    """The formats hold float32/bfloat16/float16 weights only (torchao's int8 refuses float64): a ValueError
    naming both, for loaders to raise before any weight is converted."""
    if quantize is not None and dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize={quantize!r} needs dtype float32, bfloat16 or float16, got dtype={dtype}")


def _torchao():
    """The torchao.quantization module; a QuantizationUnavailable error saying how to install it."""
    quiet = [logging.getLogger("torch.utils._pytree")]  # newer torch warns about torchao's enum registration
    if not torch.cuda.is_available():  # its CUDA-only extension libraries fail to load on CPU builds, harmlessly
        quiet.append(logging.getLogger("torchao"))
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq
    except ImportError as e:
        raise QuantizationUnavailable(f"quantize= needs torchao, which is not installed ({e}): {INSTALL_HINT}") from e
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return tq


def is_quantized_linear(name: str) -> bool:
    """Whether a state-dict name (`layers.N.attention.wq.weight`, ...) is one of the weights stored quantized."""
    parts = name.split(".")
    in_block = len(parts) == 5 and parts[0] == "layers" and parts[-1] == "weight"
    return in_block and ".".join(parts[2:4]) in BLOCK_LINEARS


def quantize_weight(weight: torch.Tensor, quantize: str, name: str = "weight") -> torch.Tensor:
    """`weight` (out, in) as a torchao NF4Tensor or Int8Tensor (same shape and nominal dtype, on its device)."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: only 2-D linear weights are quantized, got shape {tuple(weight.shape)}")
    try:
        check_quantize_dtype(quantize, weight.dtype)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    tq = _torchao()
    weight = weight.detach()
    if quantize == "nf4":
        if weight.numel() % NF4_BLOCK:
            raise ValueError(f"{name}: nf4 needs a multiple of {NF4_BLOCK} weights, got shape {tuple(weight.shape)}")
        n_blocks = weight.numel() // NF4_BLOCK
        return tq.to_nf4(weight.contiguous(), NF4_BLOCK, math.gcd(n_blocks, NF4_SCALER_BLOCK))
    if quantize == "int8":
        # quantize_ is torchao's public entry point; it acts on a module, so lend it a shell around the weight.
        # set_inductor_config=False: quantizing must not change torch.compile's global settings behind our back.
        shell = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        shell.weight = nn.Parameter(weight, requires_grad=False)
        tq.quantize_(shell, tq.Int8WeightOnlyConfig(set_inductor_config=False))
        return shell.weight.data
    raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")


def dequantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """A plain tensor with the values a quantized weight computes with (a plain weight is returned as is)."""
    if type(weight) is torch.Tensor or type(weight) is nn.Parameter:
        return weight.detach()
    if hasattr(weight, "get_original_weight"):  # NF4Tensor
        return weight.get_original_weight()
    return weight.dequantize()


def quantization_of(model: nn.Module) -> str | None:
    """The format ("nf4", "int8" or None) of the model's block linears (they are quantized all alike)."""
    for name, p in model.named_parameters():
        if is_quantized_linear(name):
            kind = type(p.data).__name__
            return {"NF4Tensor": "nf4", "Int8Tensor": "int8"}.get(kind)
    return None


def quantize_model(model: nn.Module, quantize: str) -> nn.Module:
    """Quantize the block linears of an already-built `LLaMA` in place, one weight at a time (so memory peaks at
    the model plus one layer's weight). Loading a checkpoint with `from_pretrained(quantize=)` never holds the full
    precision model at all; this serves models built in memory (benchmarks, tests)."""
    check_quantize(quantize)
    for i, layer in enumerate(model.layers):
        for path in BLOCK_LINEARS:
            parent_name, child = path.split(".")
            linear = getattr(getattr(layer, parent_name), child)
            if type(linear.weight.data) is not torch.Tensor:
                raise ValueError(f"layers.{i}.{path}.weight is already quantized ({type(linear.weight.data).__name__})")
            q = quantize_weight(linear.weight, quantize, f"layers.{i}.{path}.weight")
            linear.weight = nn.Parameter(q, requires_grad=False)
    return model


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly quantized) tensor occupies as stored: quantized data, scales and all."""
    t = t.data if isinstance(t, nn.Parameter) else t
    if type(t) is torch.Tensor:
        return t.numel() * t.element_size()
    inner, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, name)) for name in inner)


def quantized_nbytes(rows: int, cols: int, quantize: str | None, element_size: int = 2) -> int:
    """Bytes a (rows, cols) weight of `element_size`-byte floats occupies in a format, from its shape alone (what
    `tensor_bytes` reports once quantized; memory planning for models too big to build)."""
    numel = rows * cols
    if quantize is None:
        return numel * element_size
    if quantize == "int8":  # int8 codes, a float32 scale and an int8 zero point per row
        return numel + rows * 5
    if quantize == "nf4":  # 4-bit codes, an int8 scale per block, a factor per scale group, their mean, the levels
        n_blocks = numel // NF4_BLOCK
        n_groups = n_blocks // math.gcd(n_blocks, NF4_SCALER_BLOCK)
        return numel // 2 + n_blocks + (n_groups + 1 + 16) * element_size
    raise ValueError(f"quantize must be None or one of {QUANTIZATIONS}, got {quantize!r}")


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters occupy as stored."""
    return sum(tensor_bytes(p) for p in model.parameters())
