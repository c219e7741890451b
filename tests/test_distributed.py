"""torch.distributed on the CPU: 2 gloo processes must train the same adapter as 1 process, same global batch."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import WordTokenizer, make_examples, single_thread, tiny_model

from llama_adapter.attention import set_attention_backend
from llama_adapter.data import InstructionDataset
from llama_adapter.train import TrainConfig, Trainer, init_distributed

pytestmark = pytest.mark.usefixtures(single_thread.__name__)


def _setup(out_dir: str, fsdp: bool):
    data = InstructionDataset(make_examples(20), WordTokenizer(), max_seq_len=64)
    val = InstructionDataset(make_examples(23)[20:], WordTokenizer(), max_seq_len=64)
    cfg = TrainConfig(out_dir=out_dir, epochs=2, warmup_epochs=0.5, global_batch_size=8, micro_batch_size=2,
                      blr=32.0, progress=False, fsdp=fsdp)  # fmt: skip
    return tiny_model(dtype=torch.float64, adapter_layers=2), data, val, cfg


def _worker(rank: int, world: int, port: int, out_dir: str, fsdp: bool):
    torch.set_num_threads(1)
    set_attention_backend("reference")  # as conftest does for this (parent) process
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )  # fmt: skip  (what torchrun sets)
    info = init_distributed("cpu")
    model, data, val, cfg = _setup(out_dir, fsdp)
    history = Trainer(model, data, val, cfg, dist_info=info).fit()
    adapter = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.adapter_state_dict().items()}
    if info.is_main:
        torch.save({"history": history, "adapter": adapter}, os.path.join(out_dir, "result.pt"))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_gloo_processes_equal_one(tmp_path, fsdp):
    model, data, val, cfg = _setup(str(tmp_path / "single"), fsdp=False)
    single = Trainer(model, data, val, cfg).fit()
    out = tmp_path / "multi"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out), fsdp), nprocs=2, join=True)
    result = torch.load(out / "result.pt", weights_only=False)

    assert len(single) == len(result["history"]) == 4
    for a, b in zip(single, result["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        assert ("val_loss" in a) == ("val_loss" in b)
        assert a.get("val_loss", 0) == pytest.approx(b.get("val_loss", 0), rel=1e-12)
    trained = model.adapter_state_dict()
    assert (trained["layers.1.attention.adapter_gate"] != 0).all()
    for name, t in trained.items():
        torch.testing.assert_close(result["adapter"][name], t, rtol=1e-10, atol=1e-12)
