"""Packed training batches: the model on cu_seqlens (RoPE restarting per sequence), collate(pack=True) and the
trainer packing by default. The loss of a packed batch must equal the padded batch's."""

from pathlib import Path

import pytest
import torch
from train_helpers import WordTokenizer, make_examples, single_thread, tiny_model

import llama_adapter.trainer as trainer_module
from llama_adapter import set_attention_backend
from llama_adapter.data import IGNORE_INDEX, InstructionDataset, collate
from llama_adapter.layout import Layout
from llama_adapter.recipe import TrainConfig, lm_loss_sum
from llama_adapter.trainer import Trainer

pytestmark = pytest.mark.usefixtures(single_thread.__name__)
TOK = WordTokenizer()


def dataset(n: int) -> InstructionDataset:
    return InstructionDataset(make_examples(n), TOK, max_seq_len=64)


def model_with_open_gates(dtype, seed=0):
    """A tiny model whose gates are non-zero, so the prompt takes part in every adapted layer."""
    model = tiny_model(seed=seed, adapter_len=3, adapter_layers=2, dtype=dtype)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.normal_(0, 0.5)
    return model


def test_collate_pack_concatenates_and_masks_each_boundary():
    items = [dataset(5)[i] for i in range(4)]
    packed, padded = collate(items, pad_id=0, pack=True), collate(items, pad_id=0)
    lengths = [len(ids) for ids, _ in items]
    layout = packed["layout"]
    assert layout.cu_seqlens.dtype == torch.int32 and layout.max_seqlen == max(lengths)
    assert layout.cu_seqlens.tolist() == [sum(lengths[:i]) for i in range(len(items) + 1)]
    assert packed["tokens"].shape == (1, sum(lengths))
    cu = layout.cu_seqlens.tolist()
    assert layout.positions[0].tolist() == [p for n in lengths for p in range(n)]  # RoPE restarts per sequence
    for row, (a, b) in enumerate(zip(cu, cu[1:])):
        n = b - a
        assert packed["tokens"][0, a:b].tolist() == padded["tokens"][row, :n].tolist()
        # the same loss-bearing labels; the first token of each sequence (prompt anyway) is never a target
        assert packed["labels"][0, a:b].tolist() == padded["labels"][row, :n].tolist()
        assert packed["labels"][0, a] == IGNORE_INDEX


def test_packed_logits_equal_each_sequence_alone_float64():
    set_attention_backend("reference")
    model = model_with_open_gates(torch.float64)
    seqs = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 1, 12, 7)]
    cu = torch.tensor([0, 5, 6, 18, 25], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs)[None], layout=Layout.packed(cu))  # max_seqlen read from cu
        alone = torch.cat([model(s[None]) for s in seqs], dim=1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-10)


def _loss_and_grads(model, batch, **packed):
    model.zero_grad(set_to_none=True)
    loss = lm_loss_sum(model(batch["tokens"], **packed), batch["labels"])
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.adapter_parameters()]


@pytest.mark.parametrize(
    "backend,dtype,tol",
    [("reference", torch.float64, 1e-10), ("triton", torch.float32, 1e-4)],
    ids=["reference-fp64", "triton-fp32"],
)
def test_packed_loss_and_grads_equal_padded(backend, dtype, tol):
    set_attention_backend(backend)
    model = model_with_open_gates(dtype, seed=1)
    items = [dataset(6)[i] for i in (0, 2)]
    packed = collate(items, pad_id=0, pack=True)
    got = _loss_and_grads(model, packed, layout=packed["layout"])
    want = _loss_and_grads(model, collate(items, pad_id=0))
    assert got[0] > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_model_refuses_cu_seqlens_with_a_batch_or_a_cache():
    model = tiny_model()
    layout = Layout.packed(torch.tensor([0, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.ones(2, 4, dtype=torch.long), layout=layout)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.ones(1, 4, dtype=torch.long), layout=layout, cache=model.new_cache(1, 8), input_pos=0)
    with pytest.raises(ValueError, match="cu_seqlens .*per row"):
        model(torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 1, 64), layout=layout)


@pytest.mark.parametrize(
    "cu, max_seqlen, match",
    [
        ([0, 3, 9], 4, "at least the longest sequence \\(6\\)"),  # a too-small max_seqlen is caught, not trusted
        ([0, 3, 12], 9, "end at T=9"),  # past the tokens
        ([1, 3, 9], 6, "start at 0"),  # leaves tokens uncovered
    ],
)
def test_model_checks_a_cpu_cu_seqlens_even_with_max_seqlen(cu, max_seqlen, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        model(torch.ones(1, 9, dtype=torch.long), layout=Layout.packed(torch.tensor(cu, dtype=torch.int32), max_seqlen))


def test_a_packed_layout_given_its_total_is_the_same_layout():
    """`total` spares a device cu_seqlens its sync; on the CPU it is checked against cu_seqlens like the rest."""
    cu = torch.tensor([0, 3, 9, 10], dtype=torch.int32)
    given, read = Layout.packed(cu, 6, total=10), Layout.packed(cu)
    assert torch.equal(given.positions, read.positions) and given.max_seqlen == read.max_seqlen == 6
    with pytest.raises(ValueError, match="end at T=12"):
        Layout.packed(cu, 6, total=12)
    # nothing is read on the host: a meta tensor has no values to read (int() of one raises)
    assert Layout.packed(cu.to("meta"), 6, total=10).positions.shape == (1, 10)


def _one_step(tmp_path, pack):
    model = tiny_model(seed=2, dtype=torch.float64)
    cfg = TrainConfig(
        out_dir=str(tmp_path),
        epochs=1,
        warmup_epochs=0.5,
        global_batch_size=4,
        micro_batch_size=2,
        blr=64.0,
        progress=False,
        pack=pack,
    )
    trainer = Trainer(model, dataset(4), None, cfg)
    return trainer, trainer.train_step([0, 1, 2, 3]), model.adapter_state_dict()


def test_trainer_packs_by_default_with_the_same_step(tmp_path, monkeypatch):
    set_attention_backend("reference")
    calls = []

    def recording_collate(items, pad_id, pack=False):
        calls.append(pack)
        return collate(items, pad_id, pack)

    monkeypatch.setattr(trainer_module, "collate", recording_collate)
    trainer, (loss, tokens), adapter = _one_step(tmp_path / "packed", pack=True)
    assert trainer.packs() and calls == [True, True]
    _, (padded_loss, padded_tokens), padded_adapter = _one_step(tmp_path / "padded", pack=False)
    assert calls[2:] == [False, False] and tokens == padded_tokens
    assert loss == pytest.approx(padded_loss, rel=1e-10)
    for name, t in adapter.items():
        torch.testing.assert_close(t, padded_adapter[name], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_trainer_pads_on_backends_without_cu_seqlens(backend, tmp_path):
    set_attention_backend(backend)
    cfg = TrainConfig(out_dir=str(tmp_path), global_batch_size=4, micro_batch_size=2, progress=False)
    assert cfg.pack and not Trainer(tiny_model(), dataset(4), None, cfg).packs()


def test_pack_true_packs_wherever_the_op_takes_cu_seqlens_and_auto_where_it_saves_work(tmp_path):
    set_attention_backend("reference")  # takes cu_seqlens through a T x T mask: slower than padding
    cfg = dict(out_dir=str(tmp_path), global_batch_size=4, micro_batch_size=2, progress=False)
    assert Trainer(tiny_model(), dataset(4), None, TrainConfig(**cfg, pack=True)).packs()
    assert not Trainer(tiny_model(), dataset(4), None, TrainConfig(**cfg, pack="auto")).packs()
    set_attention_backend("triton")
    assert Trainer(tiny_model(), dataset(4), None, TrainConfig(**cfg, pack="auto")).packs()
    assert not Trainer(tiny_model(), dataset(4), None, TrainConfig(**cfg, pack=False)).packs()


def test_packing_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # benchmarks/ runs as `python -m`
    from benchmarks import bench_packing

    argv = [
        "--size",
        "tiny",
        "--layers",
        "1",
        "--batch",
        "3",
        "--min-len",
        "3",
        "--max-len",
        "20",
        "--backend",
        "reference",
        "--dtype",
        "fp32",
        "--warmup-ms",
        "0",
        "--rep-ms",
        "1",
        "--out",
        str(tmp_path),
        "--budget",
        "0",
    ]  # (no budget: the rows must not depend on how busy the machine is)
    rows = {r["mode"]: r for r in bench_packing.run(bench_packing.parse_args(argv)).rows}
    assert set(rows) == {"padded", "packed"} and all("error" not in r for r in rows.values())
    assert rows["packed"]["shape"] == [1, rows["packed"]["tokens"]] and rows["packed"]["pad_share"] == 0
    assert rows["padded"]["tokens_per_s"] > 0 and rows["padded"]["pad_share"] > 0
