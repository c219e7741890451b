import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from train_helpers import WordTokenizer, make_examples, single_thread, tiny_model

from llama_adapter import train_state
from llama_adapter.data import InstructionDataset, collate, global_batches
from llama_adapter.train import TrainConfig, Trainer, lm_loss_sum, lr_factor, make_optimizer, read_metrics

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
    )  # fmt: skip  (lr = 64 * 4 / 256 = 1: visible moves in few steps)
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
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
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
