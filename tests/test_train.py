import ast
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from train_helpers import WordTokenizer, make_examples, single_thread, tiny_model

from llama_adapter import train_state
from llama_adapter.attention import get_attention_backend, set_attention_backend
from llama_adapter.data import InstructionDataset, collate, global_batches
from llama_adapter.loading import CheckpointError
from llama_adapter.recipe import TrainConfig, fit_batch_to_data, lm_loss_sum, lr_factor, make_optimizer
from llama_adapter.run_dir import RunDirectoryError, check_run_dir, read_metrics
from llama_adapter.trainer import Trainer

TOK = WordTokenizer()
pytestmark = pytest.mark.usefixtures(single_thread.__name__)


def dataset(n: int, offset: int = 0) -> InstructionDataset:
    return InstructionDataset(make_examples(n + offset)[offset:], TOK, max_seq_len=64)


def config(tmp_path, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(tmp_path),
        epochs=2,
        warmup_epochs=0.5,
        global_batch_size=4,
        micro_batch_size=2,
        blr=64.0,
        progress=False,
    )  # (lr = 64 * 4 / 256 = 1: visible moves in few steps)
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_key_steps():
    f = lambda step: lr_factor(step, steps_per_epoch=10, warmup_epochs=2, epochs=5)  # noqa: E731
    assert f(0) == 0.0  # the official schedule starts at 0
    assert f(10) == pytest.approx(0.5) and f(5) == pytest.approx(0.25)
    assert f(20) == pytest.approx(1.0)  # peak at the end of warmup
    assert f(35) == pytest.approx(0.5)  # half-way down the half cosine
    assert f(50) == pytest.approx(0.0, abs=1e-12)  # zero at the end
    assert 0 < f(49) < 0.01
    assert f(47) == pytest.approx(0.5 * (1 + math.cos(math.pi * 27 / 30)))
    values = [f(s) for s in range(51)]
    assert values[:21] == sorted(values[:21]) and values[20:] == sorted(values[20:], reverse=True)


def test_trainer_applies_schedule_and_lr_scaling(tmp_path):
    cfg = config(tmp_path, epochs=3, warmup_epochs=1, blr=9e-3)
    history = Trainer(tiny_model(), dataset(8), None, cfg).fit()  # 2 steps per epoch
    peak = 9e-3 * 4 / 256
    expected = [peak * lr_factor(s, 2, 1, 3) for s in range(6)]
    assert [r["lr"] for r in history] == pytest.approx(expected, rel=1e-12)
    assert expected[2] == pytest.approx(peak)


@pytest.mark.parametrize("n, world, fitted", [(3, 1, (2, 2)), (1, 1, (1, 1)), (6, 2, (4, 2)), (3, 2, (2, 1))])
def test_a_data_set_smaller_than_one_global_batch_gets_the_largest_batch_it_fills(tmp_path, n, world, fitted, capsys):
    cfg = config(tmp_path, global_batch_size=8, micro_batch_size=2)
    got = fit_batch_to_data(cfg, n, world)
    assert (got.global_batch_size, got.micro_batch_size) == fitted and got.lr == got.blr * fitted[0] / 256
    assert f"note: {n} training examples are fewer than one global batch (8)" in capsys.readouterr().out
    assert fit_batch_to_data(cfg, 8, 1) is cfg and fit_batch_to_data(cfg, 1, 2) is cfg  # fits / too few for ranks
    trainer = Trainer(tiny_model(), dataset(3), None, config(tmp_path, global_batch_size=8))  # the Python API too
    assert (trainer.cfg.global_batch_size, trainer.steps_per_epoch) == (2, 1)


def test_optimizer_holds_only_adapter_with_decay_on_prompts_only():
    model = tiny_model(adapter_layers=2)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.02)
    decay, no_decay = opt.param_groups
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    prompts = [model.layers[i].attention.adapter_prompt for i in range(2)]
    gates = [model.layers[i].attention.adapter_gate for i in range(2)]
    assert [id(p) for p in decay["params"]] == [id(p) for p in prompts]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in gates]
    model.layers[0].attention.wq.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"layers\.0\.attention\.wq\.weight"):
        make_optimizer(model, lr=1e-3, weight_decay=0.02)


def test_one_step_changes_only_the_adapter(tmp_path):
    model = tiny_model(adapter_layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config(tmp_path, warmup_epochs=0, max_steps=1, weight_decay=0.02)
    Trainer(model, dataset(8), None, cfg).fit()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"layers.1.attention.adapter_prompt", "layers.1.attention.adapter_gate"}
    assert (after["layers.1.attention.adapter_gate"] != 0).all()
    # zero-init gate: the prompt's gradient is exactly 0, so only AdamW's decoupled weight decay moved it
    lr = cfg.lr
    assert torch.equal(
        after["layers.1.attention.adapter_prompt"], before["layers.1.attention.adapter_prompt"] * (1 - lr * 0.02)
    )


def test_loss_is_the_global_batch_token_mean_whatever_the_micro_batching(tmp_path):
    train = dataset(8)
    runs = {}
    for micro in (4, 1):
        model = tiny_model(dtype=torch.float64)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = config(tmp_path / str(micro), micro_batch_size=micro)
        runs[micro] = (Trainer(model, train, None, cfg).fit(), model.adapter_state_dict())
    # step 1's loss, computed by hand from the global batch: sum of token losses / target tokens
    model = tiny_model(dtype=torch.float64)
    model.load_state_dict(initial)
    ids = global_batches(train.lengths, 4, seed=0, epoch=0)[0]
    batch = collate([train[i] for i in ids], TOK.pad_id)
    with torch.no_grad():
        expected = (lm_loss_sum(model(batch["tokens"]), batch["labels"]) / train.target_tokens(ids)).item()
    (h4, a4), (h1, a1) = runs[4], runs[1]
    assert h4[0]["loss"] == pytest.approx(expected, rel=1e-12)
    assert [r["loss"] for r in h1] == pytest.approx([r["loss"] for r in h4], rel=1e-10)
    for name in a4:
        torch.testing.assert_close(a1[name], a4[name], rtol=1e-10, atol=1e-12)


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    results = []
    for flag in (False, True):
        model = tiny_model(dtype=torch.float64, adapter_layers=2)
        model.gradient_checkpointing = flag
        history = Trainer(model, dataset(4), None, config(tmp_path / str(flag), epochs=2)).fit()
        results.append(([r["loss"] for r in history], model.adapter_state_dict()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for name, t in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], t, rtol=1e-12, atol=1e-12)


def test_interrupt_saves_and_resume_equals_uninterrupted(tmp_path):
    train, val = dataset(12), dataset(2, offset=12)
    full = tiny_model()
    reference = Trainer(full, train, val, config(tmp_path / "full", eval_every=2)).fit()  # 6 steps
    assert len(reference) == 6

    model, calls = tiny_model(), [0]
    forward = model.forward

    def interrupted_forward(*args, **kwargs):  # Ctrl-C in the 2nd micro-batch of step 4 (mid-accumulation)
        calls[0] += 1
        if calls[0] == 2 * 2 + 1 + 2 + 2:  # steps 1-2, one val batch, step 3, then step 4's 2nd micro-batch
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    model.forward = interrupted_forward
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(model, train, val, config(out, eval_every=2)).fit()
    assert train_state.load_checkpoint(out)["step"] == 3  # the last completed step, not the torn one
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]

    resumed_model = tiny_model()
    with torch.no_grad():  # other adapter values: everything must come from the checkpoint
        for p in resumed_model.adapter_parameters():
            p.normal_()
    resumed = Trainer(resumed_model, train, val, config(out, eval_every=2, resume=True)).fit()
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for got, want in zip(resumed, reference):
        assert {k: v for k, v in got.items() if k != "tokens_per_s"} == {
            k: v for k, v in want.items() if k != "tokens_per_s"
        }
    for name, t in full.adapter_state_dict().items():
        assert torch.equal(resumed_model.adapter_state_dict()[name], t), name
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 7))


def test_resume_refuses_a_different_recipe(tmp_path):
    Trainer(tiny_model(), dataset(4), None, config(tmp_path, max_steps=1)).fit()
    with pytest.raises(ValueError, match="blr: checkpoint 64.0 vs now 32.0"):
        Trainer(tiny_model(), dataset(4), None, config(tmp_path, blr=32.0, resume=True)).fit()


def test_atomic_checkpoint_survives_a_kill_between_write_and_rename(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from llama_adapter import train_state

        def save(step):
            train_state.save_checkpoint({str(tmp_path)!r}, adapter={{"p": torch.full((64, 64), float(step))}},
                                        optimizer={{}}, scheduler={{}}, step=step, rng=train_state.capture_rng(),
                                        meta={{}})
        save(1)
        os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # die after the fsync'd write
        save(2)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)  # hang guard
    assert proc.returncode == -9, proc.stderr
    leftovers = train_state.stale_temporaries(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 64 * 64 * 4  # step 2 was fully written...
    state = train_state.load_checkpoint(tmp_path)  # ...but never replaced the good checkpoint
    assert state["step"] == 1 and torch.equal(state["adapter"]["p"], torch.ones(64, 64))
    assert train_state.stale_temporaries(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == [train_state.CHECKPOINT_NAME]


def test_a_failed_write_leaves_no_temporary(tmp_path, monkeypatch):
    train_state.atomic_save({"step": 1}, tmp_path / "x.pt")

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(train_state.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        train_state.atomic_save({"step": 2}, tmp_path / "x.pt")
    assert sorted(os.listdir(tmp_path)) == ["x.pt"]
    assert torch.load(tmp_path / "x.pt") == {"step": 1}


# ----------------------------------------------------------------------------- hardening: loads run no code
class _CreatesMarker:
    """Unpickling this calls open(path, "w"): a file appears if a loader runs code from a checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted_checkpoints(directory, marker):
    """A checkpoint.pt that would create `marker` when unpickled, in each container a loader may meet."""
    payload = {"format_version": train_state.FORMAT_VERSION, "step": 1, "rng": _CreatesMarker(marker)}
    yield "zip", lambda path: torch.save(payload, path)
    yield "legacy", lambda path: torch.save(payload, path, _use_new_zipfile_serialization=False)
    yield "raw pickle", lambda path: path.write_bytes(pickle.dumps(payload, protocol=2))


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw pickle"])
def test_a_crafted_checkpoint_runs_no_code_on_resume(tmp_path, kind):
    marker = tmp_path / "marker"
    write = dict(_crafted_checkpoints(tmp_path, marker))[kind]
    out = tmp_path / "run"
    out.mkdir()
    write(out / train_state.CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt holds objects other than tensors.*not loaded"):
        train_state.load_checkpoint(out)
    with pytest.raises(CheckpointError, match="not loaded"):
        Trainer(tiny_model(), dataset(4), None, config(out, resume=True)).fit()
    assert not marker.exists()


def test_every_checkpoint_we_write_reads_back_with_weights_only(tmp_path):
    """The whole trainer state (numpy and python RNG included) survives a weights_only round trip."""
    import numpy as np

    random.seed(5)
    np.random.seed(7)
    Trainer(tiny_model(), dataset(4), None, config(tmp_path, max_steps=1)).fit()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    state = torch.load(tmp_path / train_state.CHECKPOINT_NAME, weights_only=True)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    train_state.restore_rng(state["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    with pytest.raises(TypeError, match=r"checkpoint\['meta'\]\['x'\] is a _CreatesMarker"):
        train_state.save_checkpoint(
            tmp_path, adapter={}, optimizer={}, scheduler={}, step=1, rng={}, meta={"x": _CreatesMarker(tmp_path / "m")}
        )


def test_no_loader_in_the_project_may_unpickle_code():
    """Every torch.load in the package and the benchmarks passes weights_only=True; no pickle.load(s) at all."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*root.joinpath("llama_adapter").rglob("*.py"), *root.joinpath("benchmarks").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load"):
                offenders.append(f"{path.name}:{node.lineno} {name}")
            if name.endswith("torch.load"):
                safe = any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if name.endswith(("np.load", "numpy.load")):
                if not any(k.arg == "allow_pickle" and ast.unparse(k.value) == "False" for k in node.keywords):
                    offenders.append(f"{path.name}:{node.lineno} np.load without allow_pickle=False")
    assert offenders == []


# ----------------------------------------------------------------------------- hardening: signals, step boundaries
STEPS_PER_EPOCH = 3  # dataset(12), global batch 4
SIGNAL_POINTS = {  # where the signal lands -> (what to hook, on which call, the step whose boundary stops the run)
    "forward, 2nd micro-batch of step 4": ("forward", 9, 4),  # calls: step 1-2 (4), eval (1), step 3-4 (4)
    "right after optimizer.step of step 4": ("optimizer.step", 4, 4),
    "right after scheduler.step of step 4": ("scheduler.step", 4, 4),
    "during the evaluation after step 4": ("evaluate", 2, 4),
    "while step 3's checkpoint is written": ("save", 1, 3),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, single_thread):
    previous = get_attention_backend()
    set_attention_backend("reference")  # conftest's per-test choice does not cover module fixtures
    model = tiny_model()
    out = tmp_path_factory.mktemp("full")
    history = Trainer(model, dataset(12), dataset(2, offset=12), config(out, eval_every=2)).fit()
    set_attention_backend(previous)
    return history, {k: v.clone() for k, v in model.adapter_state_dict().items()}


def _hook_signal(trainer, target: str, call: int, signals: list[int]):
    """Make the `call`-th call of `target` send `signals` to this process (after the call's own work)."""
    # Only the main thread can take over SIGTERM; elsewhere the signal would end the test process.
    assert threading.current_thread() is threading.main_thread(), "signal tests must run in the main thread"
    owner, name = {
        "forward": (trainer.model, "forward"),
        "optimizer.step": (trainer.optimizer, "step"),
        "scheduler.step": (type(trainer.scheduler), "step"),  # its instance __dict__ is its state_dict
        "evaluate": (trainer, "evaluate"),
        "save": (train_state, "save_checkpoint"),
    }[target]
    original, calls = getattr(owner, name), [0]

    def hooked(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == call:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return result

    hooked.__dict__.update(getattr(original, "__dict__", {}))  # e.g. the lr scheduler's mark on optimizer.step
    return owner, name, original, hooked


def _scrambled_adapter():
    """The same base with other adapter values: a resumed run must take everything from the checkpoint."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.normal_()
    return model


def _without_timing(history):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in history]


SIGNAL_CASES = [(point, signal.SIGTERM) for point in SIGNAL_POINTS] + [
    (point, signal.SIGINT)
    for point in list(SIGNAL_POINTS)[:2]  # Ctrl-C takes the same path
]


@pytest.mark.parametrize("point, sig", SIGNAL_CASES, ids=[f"{s.name}: {p}" for p, s in SIGNAL_CASES])
def test_a_signal_anywhere_stops_at_a_step_boundary_and_resume_is_exact(tmp_path, uninterrupted, point, sig):
    target, call, boundary = SIGNAL_POINTS[point]
    train, val, out = dataset(12), dataset(2, offset=12), tmp_path / "run"
    model = tiny_model()
    trainer = Trainer(model, train, val, config(out, eval_every=2))
    owner, name, original, hooked = _hook_signal(trainer, target, call, [sig])
    setattr(owner, name, hooked)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
    finally:
        setattr(owner, name, original)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    state = train_state.load_checkpoint(out)
    assert state["step"] == trainer.step == boundary
    for key, t in model.adapter_state_dict().items():  # the checkpoint holds exactly that step's weights
        assert torch.equal(state["adapter"][key], t), key
    assert [r["step"] for r in read_metrics(out)] == list(range(1, boundary + 1))

    resumed_model = _scrambled_adapter()
    resumed = Trainer(resumed_model, train, val, config(out, eval_every=2, resume=True)).fit()
    history, adapter = uninterrupted
    assert _without_timing(resumed) == _without_timing(history)  # the same loss curve, bitwise
    for key, t in adapter.items():
        assert torch.equal(resumed_model.adapter_state_dict()[key], t), key


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, uninterrupted):
    """Two signals inside step 4's update: no checkpoint of torn weights; step 3's stays and resumes exactly."""
    train, val, out = dataset(12), dataset(2, offset=12), tmp_path / "run"
    trainer = Trainer(tiny_model(), train, val, config(out, eval_every=2))
    owner, name, original, hooked = _hook_signal(trainer, "optimizer.step", 4, [signal.SIGTERM, signal.SIGTERM])
    setattr(owner, name, hooked)
    with pytest.raises(KeyboardInterrupt, match="second signal"):
        trainer.fit()
    assert train_state.load_checkpoint(out)["step"] == 3
    resumed_model = _scrambled_adapter()
    resumed = Trainer(resumed_model, train, val, config(out, eval_every=2, resume=True)).fit()
    assert _without_timing(resumed) == _without_timing(uninterrupted[0])
    for key, t in uninterrupted[1].items():
        assert torch.equal(resumed_model.adapter_state_dict()[key], t), key


# ----------------------------------------------------------------------------- hardening: run directories
def test_an_existing_run_is_refused_without_resume_or_overwrite(tmp_path):
    Trainer(tiny_model(), dataset(8), None, config(tmp_path, max_steps=2)).fit()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(
        RunDirectoryError,
        match=r"already holds a run \(checkpoint\.pt, metrics\.jsonl\).*--resume.*"
        r"--overwrite",
    ):
        Trainer(tiny_model(), dataset(8), None, config(tmp_path, max_steps=1)).fit()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing touched

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    Trainer(tiny_model(), dataset(8), None, config(tmp_path, max_steps=1, overwrite=True)).fit()
    assert train_state.load_checkpoint(tmp_path)["step"] == 1 and len(read_metrics(tmp_path)) == 1
    assert not (tmp_path / "adapter").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        config(tmp_path, resume=True, overwrite=True)


def test_overwrite_and_cleanup_delete_only_files_a_run_wrote(tmp_path):
    """--out may be a directory full of the user's files (their home): --overwrite and the stale-temporary
    cleanup delete the run's own files and nothing else, not even inside adapter/ or under a .tmp- name."""
    Trainer(tiny_model(), dataset(8), None, config(tmp_path, max_steps=1)).fit()
    (tmp_path / "adapter").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "mine.txt"):
        (tmp_path / "adapter" / name).write_text("x")
    theirs = [
        tmp_path / "adapter" / "mine.txt",
        tmp_path / ".tmp-notes",
        tmp_path / ".tmp-12-notes.txt",
        tmp_path / f".tmp-x-{train_state.CHECKPOINT_NAME}",
        tmp_path / "notes.txt",
    ]
    for path in theirs:
        path.write_text("mine")
    ours = tmp_path / f"{train_state._TMP_PREFIX}99-metrics.jsonl"
    ours.write_text("half a line")
    Trainer(tiny_model(), dataset(8), None, config(tmp_path, max_steps=1, overwrite=True)).fit()
    assert all(path.read_text() == "mine" for path in theirs)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["mine.txt"] and not ours.exists()

    (tmp_path / "loss.png").mkdir()
    (tmp_path / "loss.png" / "kept").write_text("mine")
    with pytest.raises(RunDirectoryError, match=r"loss\.png is a directory"):
        Trainer(tiny_model(), dataset(8), None, config(tmp_path, max_steps=1, overwrite=True)).fit()
    assert (tmp_path / "loss.png" / "kept").read_text() == "mine"


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    train = dataset(8)
    Trainer(tiny_model(), train, None, config(tmp_path, max_steps=2)).fit()
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 3, "epoch": 1.5, "lo')  # killed while writing step 3's line
    history = Trainer(tiny_model(), train, None, config(tmp_path, resume=True)).fit()
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert "metrics.jsonl:3: dropping a torn last line" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]

    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")  # damage that is not a torn write
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl:2: unreadable metrics line"):
        read_metrics(tmp_path)
    path.write_bytes(b'{"step": 1}\n\xff\n')
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl is not UTF-8"):
        read_metrics(tmp_path)


@pytest.mark.parametrize("keep", [0, 100, 0.5, 0.9])
def test_a_truncated_checkpoint_is_an_error_naming_the_file(tmp_path, keep):
    Trainer(tiny_model(), dataset(4), None, config(tmp_path, max_steps=1)).fit()
    path = tmp_path / train_state.CHECKPOINT_NAME
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cannot read .*checkpoint\.pt \(truncated"):
        train_state.load_checkpoint(tmp_path)


def test_temporaries_of_a_killed_first_write_are_removed(tmp_path, capsys):
    """A kill during the very first checkpoint write leaves a temporary file and no checkpoint: the next start
    (fresh or --resume) removes it and says so."""
    for resume in (False, True):
        stale = tmp_path / f"{train_state._TMP_PREFIX}4242-{train_state.CHECKPOINT_NAME}"
        stale.write_bytes(b"half a checkpoint")
        Trainer(tiny_model(), dataset(4), None, config(tmp_path, max_steps=1, resume=resume)).fit()
        assert not stale.exists() and train_state.stale_temporaries(tmp_path) == []
        assert f"removed {stale}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("micro_batch_size", 0, "micro_batch_size must be an int >= 1, got 0"),
        ("global_batch_size", 0, "global_batch_size must be an int >= 1, got 0"),
        ("global_batch_size", 4.0, "global_batch_size must be an int >= 1, got 4.0"),
        ("epochs", float("nan"), "epochs must be a number > 0"),
        ("blr", "1e-3", "blr must be a number >= 0, got '1e-3'"),
        ("max_steps", 0, "max_steps must be an int >= 1 or None"),
        ("pack", 1, "pack must be one of True, False, 'auto', got 1"),
    ],
)
def test_train_config_rejects_bad_values_naming_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config(tmp_path, **{field: value})


def test_no_test_helper_turns_off_weights_only():
    """Tests and their helpers are run by users too: none may load with weights_only=False (torch >= 2.6
    defaults to True, so a plain torch.load is safe; an explicit False is the only way back to unpickling)."""
    offenders = []
    for path in Path(__file__).resolve().parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("load"):
                for k in node.keywords:
                    if (k.arg, ast.unparse(k.value)) in (("weights_only", "False"), ("allow_pickle", "True")):
                        offenders.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert offenders == []


def _drop(key):
    return lambda state: state.pop(key)


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop("meta"), "lacks the entry 'meta'"),
        (_drop("rng"), "lacks the entry 'rng'"),
        (_set("step", "1"), "entry 'step' is a str, expected int"),
        (_set("step", True), "entry 'step' is a bool"),
        (_set("step", -1), "'step' must be >= 0"),
        (_set("step", 10**6), "at step 1000000, past this run's 4 steps"),
        (_set("adapter", {"x": 1}), "entry 'adapter' must map names to tensors"),
        (_set("adapter", {}), r"cannot be restored \(CheckpointError: the checkpoint's adapter lacks tensor 'layers"),
        (_set("rng", {}), r"cannot be restored \(KeyError"),
        (_set("optimizer", {"state": {}, "param_groups": []}), r"cannot be restored \(ValueError"),
        (_set("scaler", 3), "entry 'scaler' is a int, expected dict or NoneType"),
    ],
)
def test_a_checkpoint_that_unpickles_safely_but_is_damaged_names_the_file(tmp_path, edit, message):
    """weights_only lets only plain data through; what that data holds is checked too (an edited or damaged
    file is a CheckpointError naming it, not a KeyError or a run resumed at a step it never had)."""
    Trainer(tiny_model(), dataset(8), None, config(tmp_path, max_steps=1)).fit()
    path = tmp_path / train_state.CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=message) as info:
        Trainer(tiny_model(), dataset(8), None, config(tmp_path, resume=True)).fit()
    assert str(path) in str(info.value)


def test_overwrite_refuses_run_files_no_run_of_ours_wrote(tmp_path):
    """--out is the user's home holding their own checkpoint.pt and loss.png: --overwrite (even after a failed
    --resume there) deletes nothing; a directory a run started in fresh is ours to overwrite."""
    mine = {"checkpoint.pt": b"my other tool's checkpoint", "loss.png": b"my plot", "notes.txt": b"mine"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(CheckpointError):
        Trainer(tiny_model(), dataset(8), None, config(tmp_path, resume=True)).fit()
    for attempt in range(2):  # the Trainer and the CLI's early check both refuse
        with pytest.raises(RunDirectoryError, match=r"no \.llama-adapter-run.*not deleted"):
            if attempt:
                check_run_dir(tmp_path, resume=False, overwrite=True)
            else:
                Trainer(tiny_model(), dataset(8), None, config(tmp_path, max_steps=1, overwrite=True)).fit()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == mine

    run = tmp_path / "run"
    Trainer(tiny_model(), dataset(8), None, config(run, max_steps=1)).fit()
    Trainer(tiny_model(), dataset(8), None, config(run, max_steps=1, overwrite=True)).fit()
    assert train_state.load_checkpoint(run)["step"] == 1
