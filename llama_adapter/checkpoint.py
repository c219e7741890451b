"""A base checkpoint as read from its directory, before any model exists: model arguments and tensors under Meta's
parameter names, each tensor's file, and tensors whose copy is deferred until the loader assigns them.

`checkpoint_meta` and `checkpoint_hf` read the two directory formats into a `Checkpoint`; `loading` checks it
against the model and assigns it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llama_adapter.files import CheckpointError
from llama_adapter.model_args import ModelArgs
from llama_adapter.validation import ConfigError, check_values


class Deferred:
    """A tensor built only when the loader assigns it (model-parallel shards concatenated, HF q/k rows un-permuted):
    shapes and dtypes can be checked first, and a quantizing load never holds more than one such copy at a time."""

    def __init__(self, shape, dtype: torch.dtype, build):
        self.shape, self.dtype, self._build = torch.Size(shape), dtype, build

    def materialize(self) -> torch.Tensor:
        return self._build()


def materialize(t) -> torch.Tensor:
    """`t` itself, or the tensor a `Deferred` builds."""
    return t.materialize() if isinstance(t, Deferred) else t


@dataclass
class Checkpoint:
    """Model arguments and tensors (Meta names) read from a directory; `sources` maps each name to its file."""

    args: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    config_path: str = ""  # params.json or config.json


def check_model_args(args: dict, path, names: dict | None = None) -> dict:
    """`args` (ModelArgs fields) checked against ModelArgs.RULES; CheckpointError naming the file and the key
    (`names`: field -> the file's key, for Hugging Face's names)."""
    try:
        return check_values(args, ModelArgs.RULES, names)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
