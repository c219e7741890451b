"""Reading checkpoint files and writing them safely: the file-level helpers every loader shares.

Nothing here knows a model: `loading` (base checkpoints), `adapter` / `adapter_io` (adapter files) and
`train_state` (training checkpoints) build on it, so it sits below all of them in the import graph.
Every problem with a file is a FileNotFoundError or a CheckpointError (a ValueError) naming the file.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only with a tensor file: the tokenizer reads JSON through here
    import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose tensors do not fit the model."""


def read_json_object(path) -> dict:
    """A JSON file holding an object (a config): CheckpointError naming the file if it is not UTF-8 JSON or
    holds anything else (a list, a number)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, expected an object of keys")
    return value


def _torch_load(path: str) -> dict:
    import torch

    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated zips raise RuntimeError or OSError depending on where they end
        raise CheckpointError(f"cannot read {path} (truncated or not a torch checkpoint?): {e}") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, expected a dict of tensors")
    if isinstance(sd.get("model"), dict):  # training checkpoints wrap the state dict
        sd = sd["model"]
    return sd


def _safetensors_load(path: str, names=None) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            available = set(f.keys())
            return {n: f.get_tensor(n) for n in (available if names is None else names) if n in available}
    except Exception as e:  # SafetensorError: truncated header or data
        raise CheckpointError(f"cannot read {path} (truncated or not a safetensors file?): {e}") from e


def read_tensor_file(path: str, names=None) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or torch (.pth / .bin / .pt) file, memory-mapped; only `names` if given
    (a sharded checkpoint's index lists them), each of which must be there."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    tensors = _safetensors_load(path, names) if path.endswith(".safetensors") else _torch_load(path)
    if names is None:
        return tensors
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(f"{path} lacks tensor {missing[0]!r} (listed for it in the index)")
    return {n: tensors[n] for n in names}


def fsync_dir(directory) -> None:
    """Make a rename inside `directory` durable (a no-op where a directory cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
