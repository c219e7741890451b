"""A training run's directory: what a run writes there (checkpoint, metrics, adapter/, loss curve), the rules
for starting over (--overwrite) or continuing (--resume) a run found there, and the metrics file."""

from __future__ import annotations

import json
from pathlib import Path

from llama_adapter import train_state
from llama_adapter.adapter import CONFIG_FILE, WEIGHTS_FILE
from llama_adapter.loading import CheckpointError


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
