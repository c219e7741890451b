"""Crash-safe training checkpoints: adapter weights, optimizer, scheduler, step, RNG states, data position.

`atomic_save` writes to a temporary file in the target's directory, fsyncs it, then `os.replace`s it over the
target (atomic on POSIX and Windows) and fsyncs the directory. A crash at any moment leaves either the old
checkpoint or the new one, never a torn file; a temporary file a killed writer left behind is never read, and
the next save or resume (`remove_stale_temporaries`) deletes it.

Everything in a checkpoint is a tensor, number, string, list or dict (RNG states included), and it is read
with `torch.load(weights_only=True)`: a crafted checkpoint cannot run code when a run resumes from it.

The base model is frozen, so it is not saved: a checkpoint is a few MB even for 65B. RNG states are captured
at optimizer-step boundaries by the trainer (`capture_rng`), so a checkpoint written on Ctrl-C in the middle
of gradient accumulation restores the state of the last completed step.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path

import torch

from llama_adapter.files import CheckpointError, fsync_dir

CHECKPOINT_NAME = "checkpoint.pt"
_TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 2  # 1 pickled RNG states (numpy arrays, tuples) and needed weights_only=False


def _atomic_write(path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_save(obj, path) -> Path:
    """torch.save `obj` to `path` atomically (temporary file in the same directory, fsync, os.replace)."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text: str) -> Path:
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def stale_temporaries(directory, names=(CHECKPOINT_NAME,)) -> list[Path]:
    """Temporary files a killed `_atomic_write` of one of `names` left behind (never valid checkpoints).
    Only `.tmp-<pid>-<name>` counts: a run directory may be a user's directory holding other `.tmp-*` files,
    which are not ours to delete."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    ours = re.compile(rf"{re.escape(_TMP_PREFIX)}\d+-(?:{'|'.join(map(re.escape, names))})")
    return sorted(p for p in directory.iterdir() if ours.fullmatch(p.name) and p.is_file() and not p.is_symlink())


def capture_rng() -> dict:
    """Every RNG the trainer touches, as tensors and plain numbers (a checkpoint loads with weights_only=True)."""
    version, mt_state, gauss_next = random.getstate()
    state = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss_next": gauss_next},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    except ImportError:  # numpy is optional for the trainer
        pass
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))


_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(value, where: str) -> None:
    """Refuse to write anything weights_only loading would refuse to read back (so every checkpoint we write
    can be resumed, and nothing we read needs the unpickler's trust)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise TypeError(f"checkpoint entry {where}: key {k!r} is a {type(k).__name__}, not str or int")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(
            f"checkpoint entry {where} is a {type(value).__name__}: only tensors, numbers, strings, "
            "lists and dicts are stored"
        )


def save_checkpoint(
    directory, *, adapter: dict, optimizer: dict, scheduler: dict, step: int, rng: dict, meta: dict, scaler=None
) -> Path:
    """Write `directory/checkpoint.pt` atomically. `step` = optimizer steps done (the data position follows from
    it and the seeded batch order); `meta` holds what must match on resume (recipe, adapter config)."""
    state = {
        "format_version": FORMAT_VERSION,
        "adapter": {k: v.detach().cpu() for k, v in adapter.items()},
        "optimizer": optimizer,
        "scheduler": scheduler,
        "step": int(step),
        "rng": rng,
        "meta": meta,
        "scaler": scaler,
    }
    _check_plain(state, "checkpoint")
    directory = Path(directory)
    remove_stale_temporaries(directory)
    return atomic_save(state, directory / CHECKPOINT_NAME)


def remove_stale_temporaries(directory, names=(CHECKPOINT_NAME,)) -> list[Path]:
    """Delete the temporary files a killed writer of `names` left in `directory`; returns them."""
    stale = stale_temporaries(directory, names)
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def load_checkpoint(directory_or_file) -> dict:
    """Read a checkpoint written by `save_checkpoint` (a directory holding checkpoint.pt, or the file itself).

    It is read with weights_only=True: tensors, numbers, strings, lists and dicts only, so a crafted file cannot
    run code; anything else, a truncated file or another format is a CheckpointError naming the file."""
    path = Path(directory_or_file)
    if path.is_dir():
        remove_stale_temporaries(path)
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds objects other than tensors, numbers, strings, lists and dicts, which are not loaded "
            f"(loading them could run code; a checkpoint of format {FORMAT_VERSION} has none): "
            f"{str(e).splitlines()[0]}"
        ) from None
    except Exception as e:  # truncated zip: RuntimeError or OSError depending on where it ends
        raise CheckpointError(f"cannot read {path} (truncated or not a torch checkpoint?): {e}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a llama-adapter training checkpoint of format {FORMAT_VERSION} (found {found!r})"
        )
    _check_entries(state, path)
    return state


# What save_checkpoint writes, by entry: a file that unpickles safely can still lack one or hold another type.
_ENTRIES = {
    "adapter": dict,
    "optimizer": dict,
    "scheduler": dict,
    "step": int,
    "rng": dict,
    "meta": dict,
    "scaler": (dict, type(None)),
}


def _check_entries(state: dict, path) -> None:
    for key, kind in _ENTRIES.items():
        if key not in state:
            raise CheckpointError(f"{path} lacks the entry {key!r}: damaged, or not written by save_checkpoint")
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, expected {expected}")
    if state["step"] < 0:
        raise CheckpointError(f"{path}: entry 'step' must be >= 0, got {state['step']}")
    bad = [k for k, v in state["adapter"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entry 'adapter' must map names to tensors; {bad[0]!r} does not")


def check_resume_compatible(saved: dict, current: dict, path) -> None:
    """Raise ValueError naming each recipe setting that differs between the checkpoint and this run."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: the checkpoint's 'meta' is not a dict of recipe settings")
    keys = [*current, *(k for k in saved if k not in current)]  # a setting only the checkpoint has differs too
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise ValueError(f"cannot resume from {path}: the run differs in " + "; ".join(diffs))
