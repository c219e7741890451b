"""torch.distributed on the CPU: 2 gloo processes train the same adapter as 1 process with the same global batch,
with DDP and with FSDP2 (`fully_shard` runs on CPU tensors with gloo, so both are tested here)."""

import os

import pytest
import torch
from train_helpers import WordTokenizer, make_examples, single_thread, spawn_gloo, tiny_model

from llama_adapter.data import InstructionDataset
from llama_adapter.distributed import adapter_tensors
from llama_adapter.generation import generate
from llama_adapter.multi_adapter import Adapter
from llama_adapter.recipe import TrainConfig
from llama_adapter.trainer import Trainer

pytestmark = pytest.mark.usefixtures(single_thread.__name__)


def _run(out_dir: str, fsdp: bool = False, dist_info=None):
    data = InstructionDataset(make_examples(20), WordTokenizer(), max_seq_len=64)
    val = InstructionDataset(make_examples(25)[20:], WordTokenizer(), max_seq_len=64)  # 3 micro-batches: uneven
    cfg = TrainConfig(
        out_dir=out_dir,
        epochs=2,
        warmup_epochs=0.5,
        global_batch_size=8,
        micro_batch_size=2,
        blr=32.0,
        progress=False,
        fsdp=fsdp,
    )
    model = tiny_model(dtype=torch.float64, adapter_layers=2)
    history = Trainer(model, data, val, cfg, dist_info=dist_info).fit()
    # Every rank generates (FSDP's forward is collective). Plain generation projects each layer's prompt once per
    # call; under FSDP the layer's wk, wv are gathered for it (model.whole_layers), as for an AdapterBank's per-row
    # prompts (one row the trained adapter, one the base model) and for a per-row prompt offset (image prompts).
    prompts = [[5, 6, 7], [9]]
    trained = Adapter(model.adapter_config, {k: v.detach().clone() for k, v in adapter_tensors(model).items()})
    offset = torch.randn(2, 1, model.params.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    generated = [
        generate(model, prompts, 3),
        generate(model, prompts, 3, adapters=[trained, None]),
        generate(model, prompts, 3, prompt_offset=offset),
    ]
    attention = model.layers[1].attention  # an adapted layer
    kinds = {name: type(getattr(attention, name).weight).__name__ for name in ("wq", "wk", "wv")}
    kinds["adapter_prompt"] = type(attention.adapter_prompt).__name__
    return history, {k: v.clone() for k, v in adapter_tensors(model).items()}, generated, kinds


def _worker(info, out_dir: str):
    results = {mode: _run(os.path.join(out_dir, mode), mode == "fsdp", info) for mode in ("ddp", "fsdp")}
    if info.is_main:
        torch.save(results, os.path.join(out_dir, "results.pt"))


def test_two_gloo_processes_equal_one_with_ddp_and_fsdp(tmp_path):
    single_history, single_adapter, single_generated, _ = _run(str(tmp_path / "single"))
    assert len(single_history) == 4 and (single_adapter["layers.1.attention.adapter_gate"] != 0).all()
    plain, per_row, offset = single_generated
    assert per_row[0] == plain[0] and offset != plain  # the cases differ, so equal results below mean something
    spawn_gloo(_worker, 2, tmp_path, str(tmp_path))
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    for mode, (history, adapter, generated, kinds) in results.items():
        assert generated == single_generated, mode
        # FSDP shards every frozen weight, the adapted layers' wk and wv included; the adapter stays replicated
        sharded = "DTensor" if mode == "fsdp" else "Parameter"
        assert kinds == dict(wq=sharded, wk=sharded, wv=sharded, adapter_prompt="Parameter"), mode
        assert [r["step"] for r in history] == [1, 2, 3, 4], mode
        for a, b in zip(single_history, history):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-12), mode
            assert ("val_loss" in a) == ("val_loss" in b)
            assert a.get("val_loss", 0) == pytest.approx(b.get("val_loss", 0), rel=1e-12), mode
        for name, t in single_adapter.items():
            torch.testing.assert_close(adapter[name], t, rtol=1e-10, atol=1e-12, msg=f"{mode} {name}")


def _gated_model():
    """The tiny model with gates open (so prompts change the tokens), and a snapshot of its adapter."""
    model = tiny_model(dtype=torch.float64, adapter_layers=2)
    with torch.no_grad():
        for layer in model.layers:
            if layer.attention.adapter_gate is not None:
                layer.attention.adapter_gate.fill_(0.8)
    return model, Adapter(model.adapter_config, {k: v.detach().clone() for k, v in adapter_tensors(model).items()})


def _generations(model, adapter) -> list:
    """Greedy tokens of plain, per-row-adapter and prompt-offset generation."""
    prompts = [[5, 6, 7], [9]]
    offset = torch.randn(2, 1, model.params.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return [
        generate(model, prompts, 3),
        generate(model, prompts, 3, adapters=[adapter, None]),
        generate(model, prompts, 3, prompt_offset=offset),
    ]


def _root_sharded_worker(info, out_dir: str):
    from torch.distributed.fsdp import fully_shard

    model, adapter = _gated_model()
    fully_shard(model)  # the root only: every layer's weights (the adapter's too) live in the root's unit
    generations = _generations(model, adapter)
    if info.is_main:
        torch.save(generations, os.path.join(out_dir, "root_sharded.pt"))


def test_generation_on_a_model_sharded_only_at_the_root(tmp_path):
    """Prompt projections ahead of the forward gather the unit that holds the layer, here the root's."""
    want = _generations(*_gated_model())
    assert want[1] != want[0] and want[2] != want[0]  # each case's prompts change the tokens
    spawn_gloo(_root_sharded_worker, 2, tmp_path, str(tmp_path))
    assert torch.load(tmp_path / "root_sharded.pt", weights_only=True) == want


def test_prompt_projection_gathers_each_fsdp_unit_once():
    """Layers that are units of their own are gathered one at a time; the root's unit once for the whole loop.
    FSDP units are stood in for by their unshard / reshard methods (what `whole_layers` calls)."""
    calls = []

    def as_unit(module, name):
        module.unshard = lambda: calls.append(f"unshard {name}")
        module.reshard = lambda: calls.append(f"reshard {name}")

    model, _ = _gated_model()  # 2 layers, both adapted
    as_unit(model, "root")
    model.adapter_kv()
    assert calls == ["unshard root", "reshard root"]  # only the root sharded: one gather, not one per layer
    calls.clear()
    as_unit(model.layers[0], "0")
    as_unit(model.layers[1], "1")
    model.adapter_kv()
    assert calls == ["unshard 0", "reshard 0", "unshard 1", "reshard 1"]  # each layer its own unit, in turn
