"""Several adapters in one batch (llama_adapter.multi_adapter): every row equals its adapter run alone."""

import pytest
import torch
from test_generation import F64, TINY, make_model, prompts_of, stream_logits

from llama_adapter import AdapterConfig, LLaMA, ModelArgs, adapter_io
from llama_adapter.attention import set_attention_backend
from llama_adapter.loading import CheckpointError
from llama_adapter.model import Attention
from llama_adapter.multi_adapter import Adapter, AdapterBank

K, L = 3, 2
HEAD_TANH = AdapterConfig(adapter_len=K, adapter_layers=L)


def fresh_adapter(model, cfg, seed):
    """Attach `cfg` with random prompts and open (random) gates, so each adapter changes the output."""
    model.attach_adapter(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_rows_of_one_batch_equal_each_adapter_alone(tmp_path):
    """A path (our format, per-head tanh gates), an in-memory Adapter (PEFT's form: one raw gate per layer) and
    None (the base model, although the model itself holds an adapter) in one batch of different prompt lengths."""
    model = make_model(adapter=None)
    prompts = prompts_of([4, 9, 2, 6])
    steps = 5

    def alone(prompt):
        return stream_logits(model, [prompt], steps)

    base = [alone(p) for p in prompts]
    # adapted layers 0 and 2 of 3 (V2's early fusion without images): the bank follows the model's layer set
    fresh_adapter(model, AdapterConfig(adapter_len=K, adapter_layers=1, early_fusion=1), seed=1)
    model.save_adapter(tmp_path / "first")
    first = [alone(p) for p in prompts]
    scalar_raw = AdapterConfig(adapter_len=K, adapter_layers=1, early_fusion=1, gate="scalar", gate_act="none")
    fresh_adapter(model, scalar_raw, seed=2)
    second_adapter = Adapter.from_model(model)
    second = [alone(p) for p in prompts]

    choices = [str(tmp_path / "first"), second_adapter, None, tmp_path / "first"]
    tokens, logits = stream_logits(model, prompts, steps, adapters=choices)
    expected = [first[0], second[1], base[2], first[3]]
    for b, (alone_tokens, alone_logits) in enumerate(expected):
        assert [t[b] for t in tokens] == [t[0] for t in alone_tokens], b
        torch.testing.assert_close(logits[b], alone_logits[0], rtol=0, atol=1e-12, msg=f"row {b}")
    # the three alone runs differ, so a row served by the wrong adapter would have failed above
    assert not torch.allclose(first[0][1], second[0][1]) and not torch.allclose(first[0][1], base[0][1])


def test_adapters_load_once_and_project_once_per_layer(tmp_path, monkeypatch):
    """No loop over rows: one prompt projection per adapted layer for the whole batch, one read per file."""
    model = make_model(adapter=None)
    fresh_adapter(model, HEAD_TANH, seed=1)
    model.save_adapter(tmp_path / "a")
    reads, projections = [], []
    real_read, real_project = adapter_io.read_adapter, Attention.project_prompt
    monkeypatch.setattr(
        "llama_adapter.multi_adapter.read_adapter", lambda *a, **kw: reads.append(a[1]) or real_read(*a, **kw)
    )
    monkeypatch.setattr(
        Attention, "project_prompt", lambda self, p: projections.append(p.shape) or real_project(self, p)
    )

    bank = AdapterBank(model, {"a": tmp_path / "a"})
    kv = bank.adapter_kv(["a", None, str(tmp_path / "a"), "a", None])
    assert len(reads) == 1 and len(bank) == 1
    assert projections == [(5, K, TINY["dim"])] * L
    assert kv[: TINY["n_layers"] - L] == [None] * (TINY["n_layers"] - L)
    for ak, av, gate in kv[TINY["n_layers"] - L :]:
        assert ak.shape == av.shape == (5, TINY["n_kv_heads"], K, TINY["dim"] // TINY["n_heads"])
        assert gate.shape == (5, TINY["n_heads"])
        assert torch.equal(gate[1], torch.zeros(TINY["n_heads"], dtype=F64)) and gate[0].abs().min() > 0
        torch.testing.assert_close(ak[0], ak[3], rtol=0, atol=0)  # the same adapter, the same slot

    model.generate(prompts_of([3, 5]), 2, adapters=["a", None], adapter_bank=bank)
    assert len(reads) == 1  # a kept bank serves later calls without reading the file again


def test_triton_backend_rows_equal_each_adapter_alone():
    """The kernels' per-sample prompt path (interpreter, float32) against the shared-prompt path alone."""
    pytest.importorskip("llama_adapter.ops")
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=53, multiple_of=16, max_seq_len=16)
    model = LLaMA(args)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    adapters = []
    for seed in (1, 2):
        fresh_adapter(model, AdapterConfig(adapter_len=2, adapter_layers=1), seed)
        adapters.append(Adapter.from_model(model))
    set_attention_backend("triton")
    alone = [stream_logits(model, [p], 3, adapters=[a]) for p, a in zip(prompts, adapters)]
    tokens, logits = stream_logits(model, prompts, 3, adapters=adapters)
    set_attention_backend("reference")
    _, reference = stream_logits(model, prompts, 3, adapters=adapters)
    _, swapped = stream_logits(model, prompts, 3, adapters=adapters[::-1])
    assert (swapped - reference).abs().max() > 0.1  # the adapters matter: a row on the wrong one would show
    for b, (alone_tokens, alone_logits) in enumerate(alone):
        assert [t[b] for t in tokens] == [t[0] for t in alone_tokens]
        # float32 on logits of size ~2 (seen: 2.4e-7 apart): rounding only, not a different prompt or gate
        torch.testing.assert_close(logits[b], alone_logits[0], rtol=0, atol=2e-6)
        torch.testing.assert_close(logits[b], reference[b], rtol=0, atol=2e-6)


def test_bad_adapters_raise_clear_errors(tmp_path):
    model = make_model(adapter=None)
    fresh_adapter(model, HEAD_TANH, seed=1)
    first = Adapter.from_model(model)
    fresh_adapter(model, AdapterConfig(adapter_len=K + 1, adapter_layers=L), seed=2)
    longer = Adapter.from_model(model)
    fresh_adapter(model, AdapterConfig(adapter_len=K, adapter_layers=L + 1), seed=3)
    deeper = Adapter.from_model(model)
    prompts = prompts_of([3, 4])

    with pytest.raises(ValueError, match="adapter_len=4.*must share"):
        model.generate(prompts, 2, adapters=[first, longer])
    with pytest.raises(ValueError, match="adapter_layers=3.*must share"):
        AdapterBank(model, {"first": first, "deeper": deeper})
    fresh_adapter(model, AdapterConfig(adapter_len=K, adapter_layers=L, bias_tuning=True), seed=4)
    with pytest.raises(ValueError, match="bias_tuning=True.*prompts and gates only"):
        AdapterBank(model).add(Adapter.from_model(model))
    with pytest.raises(ValueError, match=r"one entry per prompt \(2\), got 3"):
        model.generate(prompts, 2, adapters=[first, None, None])
    with pytest.raises(ValueError, match="prompt_offset"):
        model.generate(prompts, 2, adapters=[first, None], prompt_offset=torch.zeros(2, 1, TINY["dim"], dtype=F64))
    with pytest.raises(TypeError, match=r"adapters\[1\].*Adapter\(config, state_dict\)"):
        model.generate(prompts, 2, adapters=[first, model.adapter_state_dict()])
    with pytest.raises(FileNotFoundError, match="no-such-adapter"):
        model.generate(prompts, 2, adapters=[str(tmp_path / "no-such-adapter"), None])
    with pytest.raises(ValueError, match="another model"):
        model.generate(prompts, 2, adapters=[None, None], adapter_bank=AdapterBank(make_model()))
    with pytest.raises(ValueError, match="without adapters="):
        model.generate(prompts, 2, adapter_bank=AdapterBank(model))
    other = make_model(adapter=HEAD_TANH, dim=32)
    with pytest.raises(CheckpointError, match="adapter_prompt.*shape"):
        AdapterBank(other).add(first)
    bank = AdapterBank(model, {"x": first})
    with pytest.raises(ValueError, match="'x' is already taken"):
        bank.add(Adapter(first.config, dict(first.tensors)), name="x")
