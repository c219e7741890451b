"""Crash-safe training checkpoints: adapter weights, optimizer, scheduler, step, RNG states, data position.

`atomic_save` writes to a temporary file in the target's directory, fsyncs it, then `os.replace`s it over the
target (atomic on POSIX and Windows) and fsyncs the directory. A crash at any moment leaves either the old
checkpoint or the new one, never a torn file; a leftover temporary file is ignored and cleaned up later.

The base model is frozen, so it is not saved: a checkpoint is a few MB even for 65B. RNG states are captured
at optimizer-step boundaries by the trainer (`capture_rng`), so a checkpoint written on Ctrl-C in the middle
of gradient accumulation restores the state of the last completed step.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"
_TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


def _fsync_dir(directory: Path) -> None:
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
    _fsync_dir(path.parent)
    return path


def atomic_save(obj, path) -> Path:
    """torch.save `obj` to `path` atomically (temporary file in the same directory, fsync, os.replace)."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text: str) -> Path:
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def stale_temporaries(directory) -> list[Path]:
    """Temporary files a killed writer left behind (never valid checkpoints)."""
    directory = Path(directory)
    return sorted(directory.glob(f"{_TMP_PREFIX}*")) if directory.is_dir() else []


def capture_rng() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # numpy is optional for the trainer
        pass
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


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
    return atomic_save(state, Path(directory) / CHECKPOINT_NAME)


def load_checkpoint(directory_or_file) -> dict:
    """Read a checkpoint written by `save_checkpoint` (a directory holding checkpoint.pt, or the file itself)."""
    path = Path(directory_or_file)
    if path.is_dir():
        for tmp in stale_temporaries(path):
            tmp.unlink(missing_ok=True)
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # RNG states hold numpy/python objects, so weights_only loading cannot read them; the file is our own.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a llama-adapter training checkpoint (format {FORMAT_VERSION})")
    return state


def check_resume_compatible(saved: dict, current: dict, path) -> None:
    """Raise ValueError naming each recipe setting that differs between the checkpoint and this run."""
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in current if saved.get(k) != current[k]
    ]
    if diffs:
        raise ValueError(f"cannot resume from {path}: the run differs in " + "; ".join(diffs))
