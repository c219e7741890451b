"""Adapter files: our round trip, PEFT and official .pth layouts (layer placement, gate form), refusals.

Logit parity of PEFT and official adapters with PEFT itself is in test_hf_parity.py; the PEFT names used
here are the ones that test reads from a real `PeftModel.save_pretrained`.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_adapter import AdapterConfig, LLaMA, ModelArgs
from llama_adapter.adapter import CONFIG_FILE, WEIGHTS_FILE
from llama_adapter.adapter_io import load_adapter, save_adapter
from llama_adapter.loading import CheckpointError

PEFT_PREFIX = "base_model.model.model.layers"
BASE = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=32)  # tiny_model()'s shape


def tiny_model(seed=0, **overrides) -> LLaMA:
    torch.manual_seed(seed)
    args = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=32, multiple_of=16, max_seq_len=32)
    model = LLaMA(ModelArgs(**{**args, **overrides}), dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def randomize_adapter(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def write_peft_dir(path, prompts: dict, gates: dict, adapter_len, adapter_layers, **config):
    path.mkdir(exist_ok=True)
    tensors = {f"{PEFT_PREFIX}.{i}.self_attn.adaption_prompt": p for i, p in prompts.items()}
    tensors.update({f"{PEFT_PREFIX}.{i}.self_attn.adaption_gate": g for i, g in gates.items()})
    save_file(tensors, path / WEIGHTS_FILE)
    cfg = dict(
        peft_type="ADAPTION_PROMPT", adapter_len=adapter_len, adapter_layers=adapter_layers, target_modules="self_attn"
    )
    (path / CONFIG_FILE).write_text(json.dumps({**cfg, **config}))
    return path


def test_round_trip(tmp_path):
    model = tiny_model()
    model.attach_adapter(AdapterConfig(adapter_len=5, adapter_layers=2, gate="head", gate_act="tanh"))
    randomize_adapter(model)
    model.save_adapter(tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
    assert config["format"] == "llama_adapter"
    assert config["adapter"] == dict(adapter_len=5, adapter_layers=2, gate="head", gate_act="tanh")
    assert config["base_model"] == dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=32)

    other = tiny_model()  # same base weights, a different adapter already attached: it gets replaced
    other.attach_adapter(AdapterConfig(adapter_len=2, adapter_layers=3, gate="scalar"))
    other.load_adapter(tmp_path / "ad")
    assert other.adapter_config == model.adapter_config
    theirs, ours = model.adapter_state_dict(), other.adapter_state_dict()
    assert theirs.keys() == ours.keys() and len(ours) == 4
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert other.layers[0].attention.adapter_prompt is None
    tokens = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(tokens), other(tokens))


def test_a_save_killed_between_its_two_files_leaves_the_previous_adapter(tmp_path, monkeypatch):
    import llama_adapter.adapter_io as adapter_io

    old = tiny_model()
    old.attach_adapter(AdapterConfig(adapter_len=5, adapter_layers=2))
    randomize_adapter(old, seed=1)
    save_adapter(old, tmp_path / "ad")
    (tmp_path / "ad" / "notes.txt").write_text("the user's")
    new = tiny_model()
    new.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=1, gate="head"))
    randomize_adapter(new, seed=2)

    def killed(*args, **kwargs):  # the weights file is written by now: the config is the second write
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_io.json, "dump", killed)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(new, tmp_path / "ad")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no staging directory left behind
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE, "notes.txt"]
    reader = tiny_model()
    reader.load_adapter(tmp_path / "ad")
    assert reader.adapter_config == old.adapter_config
    assert all(torch.equal(v, reader.adapter_state_dict()[k]) for k, v in old.adapter_state_dict().items())

    save_adapter(new, tmp_path / "ad")  # and a save that completes replaces ours, keeps the user's file
    reader.load_adapter(tmp_path / "ad")
    assert reader.adapter_config == new.adapter_config
    assert all(torch.equal(v, reader.adapter_state_dict()[k]) for k, v in new.adapter_state_dict().items())
    assert (tmp_path / "ad" / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_save_without_adapter(tmp_path):
    with pytest.raises(ValueError, match="no adapter to save"):
        save_adapter(tiny_model(), tmp_path)


def test_wrong_shape_is_refused_and_keeps_the_current_adapter(tmp_path):
    model = tiny_model()
    model.attach_adapter(AdapterConfig(adapter_len=5, adapter_layers=2))
    save_adapter(model, tmp_path / "ad")
    wider = tiny_model(dim=128, n_heads=8, n_kv_heads=4)
    wider.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=1))
    before = {k: v.clone() for k, v in wider.adapter_state_dict().items()}
    with pytest.raises(CheckpointError, match=r"made for a model with \{'dim': 64, .*this model has \{'dim': 128"):
        load_adapter(wider, tmp_path / "ad")
    after = wider.adapter_state_dict()
    assert wider.adapter_config.adapter_len == 3 and all(torch.equal(before[k], after[k]) for k in before)


def test_peft_layout_goes_to_the_top_layers_as_scalar_gates(tmp_path):
    model = tiny_model()
    prompts = {i: torch.randn(1, 4, 64) for i in (1, 2)}
    gates = {i: torch.tensor([0.25 * i]) for i in (1, 2)}
    cfg = load_adapter(model, write_peft_dir(tmp_path / "peft", prompts, gates, 4, 2))
    assert cfg == AdapterConfig(adapter_len=4, adapter_layers=2, gate="scalar", gate_act="none")
    for i in (1, 2):
        attn = model.layers[i].attention
        assert torch.equal(attn.adapter_prompt, prompts[i][0].double())
        assert attn.prompt_kv()[2].tolist() == [0.25 * i] * 4  # applied as is, every head
    assert model.layers[0].attention.adapter_prompt is None


def test_peft_bin_weights(tmp_path):
    model = tiny_model()
    path = write_peft_dir(tmp_path / "peft", {2: torch.randn(1, 3, 64)}, {2: torch.tensor([0.5])}, 3, 1)
    tensors = load_file(path / WEIGHTS_FILE)
    (path / WEIGHTS_FILE).unlink()
    torch.save(tensors, path / "adapter_model.bin")
    load_adapter(model, path)
    assert torch.equal(model.layers[2].attention.adapter_gate, torch.tensor([0.5], dtype=torch.float64))


@pytest.mark.parametrize(
    "prompts, gates, K, L, config, message",
    [
        (
            {i: torch.randn(1, 4, 64) for i in (2, 3)},
            {i: torch.ones(1) for i in (2, 3)},
            4,
            2,
            {},
            r"adapted_layers.*\[2\]..\[3\].*this model has dim=64, n_layers=3",
        ),
        (
            {i: torch.randn(1, 4, 32) for i in (1, 2)},
            {i: torch.ones(1) for i in (1, 2)},
            4,
            2,
            {},
            r"made for a model with \{'dim': 32",
        ),
        (
            {i: torch.randn(1, 4, 64) for i in (1, 2)},
            {1: torch.ones(1)},
            4,
            2,
            {},
            "layer 2 has .'prompt'., needs both",
        ),
        ({2: torch.randn(1, 4, 64)}, {2: torch.ones(2)}, 4, 1, {}, r"adaption_gate \(2,\), expected .* / \(1,\)"),
        ({2: torch.randn(1, 4, 64)}, {2: torch.ones(1)}, 4, 1, {"target_modules": "attn"}, "target_modules 'attn'"),
    ],
)
def test_peft_refusals(tmp_path, prompts, gates, K, L, config, message):
    with pytest.raises(CheckpointError, match=message):
        load_adapter(tiny_model(), write_peft_dir(tmp_path / "peft", prompts, gates, K, L, **config))


def test_peft_unexpected_tensor(tmp_path):
    path = write_peft_dir(tmp_path / "peft", {2: torch.randn(1, 4, 64)}, {2: torch.ones(1)}, 4, 1)
    save_file({f"{PEFT_PREFIX}.2.self_attn.q_proj.lora_A": torch.ones(2)}, path / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="unexpected tensor .*lora_A"):
        load_adapter(tiny_model(), path)


def official_pth(path, query, gates: dict):
    torch.save({"adapter_query.weight": query, **{f"layers.{i}.attention.gate": g for i, g in gates.items()}}, path)
    return path


def test_official_layout_goes_to_the_top_layers_as_head_gates(tmp_path):
    model = tiny_model()
    query = torch.randn(2 * 10, 64)  # L=2 layers of the official K=10
    gates = {i: torch.randn(1, 4, 1, 1) for i in range(3)}
    cfg = load_adapter(model, official_pth(tmp_path / "a.pth", query, gates))
    assert cfg == AdapterConfig(adapter_len=10, adapter_layers=2, gate="head", gate_act="none")
    for j, i in enumerate((1, 2)):  # prompt block j -> layer n_layers - L + j; the bottom gate is unused
        attn = model.layers[i].attention
        assert torch.equal(attn.adapter_prompt, query[10 * j : 10 * (j + 1)].double())
        assert torch.equal(attn.prompt_kv()[2], gates[i].flatten().double())  # no tanh

    only_top = official_pth(tmp_path / "b.pth", query[:15], {2: torch.randn(1, 4, 1, 1)})  # 3 layers of K=5
    with pytest.raises(CheckpointError, match="lacks tensor 'layers.0.attention.gate'"):
        load_adapter(model, only_top, adapter_len=5)
    official_pth(only_top, query[:5], {2: torch.randn(1, 4, 1, 1)})
    assert load_adapter(model, only_top, adapter_len=5).adapter_layers == 1


@pytest.mark.parametrize(
    "rows, dim, heads, layers, message",
    [
        (20, 64, 8, 3, r"made for a model with \{'dim': 64, 'n_heads': \[8\]"),
        (20, 32, 4, 3, r"\{'dim': 32,"),
        (20, 64, 4, 32, r"'n_layers': 32"),
        (40, 64, 4, 3, r"'adapter_layers': 4"),
        (25, 64, 4, 3, r"shape \(25, 64\), not \(L\*10, dim\)"),
    ],
)
def test_official_refusals(tmp_path, rows, dim, heads, layers, message):
    path = official_pth(
        tmp_path / "a.pth", torch.randn(rows, dim), {i: torch.zeros(1, heads, 1, 1) for i in range(layers)}
    )
    with pytest.raises(CheckpointError, match=message):
        load_adapter(tiny_model(), path)


def test_official_unexpected_tensor_and_missing_query(tmp_path):
    path = tmp_path / "a.pth"
    torch.save({"adapter_query.weight": torch.randn(10, 64), "tok_embeddings.weight": torch.randn(32, 64)}, path)
    with pytest.raises(CheckpointError, match="unexpected tensor 'tok_embeddings.weight'"):
        load_adapter(tiny_model(), path)
    torch.save({"layers.0.attention.gate": torch.zeros(1, 4, 1, 1)}, path)
    with pytest.raises(CheckpointError, match="lacks 'adapter_query.weight'"):
        load_adapter(tiny_model(), path)


def test_unknown_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter not found"):
        load_adapter(tiny_model(), tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=f"no {CONFIG_FILE} in adapter directory"):
        load_adapter(tiny_model(), tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(CheckpointError, match="peft_type='LORA'"):
        load_adapter(tiny_model(), tmp_path)


def test_truncated_adapter_file(tmp_path):
    model = tiny_model()
    model.attach_adapter(AdapterConfig(adapter_len=5, adapter_layers=2))
    save_adapter(model, tmp_path)
    data = (tmp_path / WEIGHTS_FILE).read_bytes()
    (tmp_path / WEIGHTS_FILE).write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=f"cannot read .*{WEIGHTS_FILE} .truncated"):
        load_adapter(tiny_model(), tmp_path)


@pytest.mark.parametrize("gate_shape", [(1,), (1, 1, 1, 1)])
def test_official_first_release_scalar_gates_load_as_scalar_gates(tmp_path, gate_shape):
    """The official code's first release saved one gate per layer (zeros(1)): it loads as gate="scalar" and
    computes what the per-head form with that value in every head computes."""
    query = torch.randn(2 * 10, 64, dtype=torch.float64)
    values = {i: torch.randn(1, dtype=torch.float64) for i in range(3)}
    scalar = official_pth(tmp_path / "scalar.pth", query, {i: v.reshape(gate_shape) for i, v in values.items()})
    per_head = {i: v.expand(4).reshape(1, 4, 1, 1) for i, v in values.items()}
    per_head = official_pth(tmp_path / "head.pth", query, per_head)
    a, b = tiny_model(), tiny_model()
    assert load_adapter(a, scalar) == AdapterConfig(adapter_len=10, adapter_layers=2, gate="scalar", gate_act="none")
    assert load_adapter(b, per_head).gate == "head"
    assert torch.equal(a.layers[2].attention.adapter_gate, values[2])
    tokens = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(a(tokens), b(tokens), rtol=1e-12, atol=1e-12)

    mixed = {0: torch.zeros(1), 1: torch.zeros(1, 4, 1, 1), 2: torch.zeros(1)}
    mixed = official_pth(tmp_path / "mixed.pth", query, mixed)
    with pytest.raises(CheckpointError, match=r"mixes gate sizes \[1, 4\].*one scalar gate per layer"):
        load_adapter(tiny_model(), mixed)


@pytest.mark.parametrize(
    "config, message",
    [
        (["format", "llama_adapter"], r"adapter_config\.json holds a JSON list, expected an object"),
        ("not an object", r"adapter_config\.json holds a JSON str"),
        ({"format": "llama_adapter", "base_model": BASE, "adapter": ["adapter_len", 5]}, "has no 'adapter' section"),
        (
            {"format": "llama_adapter", "base_model": BASE, "adapter": {"adapter_len": "5", "adapter_layers": 2}},
            r"adapter_config\.json: 'adapter': adapter_len must be an int >= 1, got '5'",
        ),
        (
            {"format": "llama_adapter", "base_model": BASE, "adapter": {"adapter_len": 5, "adapter_layers": 2.0}},
            r"adapter_layers must be an int >= 1, got 2\.0",
        ),
        (
            {"format": "llama_adapter", "base_model": BASE, "adapter": {"adapter_len": 5, "gate": 1}},
            r"'adapter': gate must be one of 'head', 'scalar', got 1",
        ),
        (
            {"format": "llama_adapter", "base_model": BASE, "adapter": {"adapter_len": 5, "bias_tuning": "yes"}},
            r"bias_tuning must be true or false",
        ),
        ({"format": "llama_adapter", "base_model": "3 layers", "adapter": {}}, r"'base_model' must be an object"),
        (
            {"format": "llama_adapter", "format_version": 2, "base_model": BASE, "adapter": {"adapter_len": 5}},
            r"adapter_config\.json: format_version must be 1, got 2",
        ),
        (
            {"format": "llama_adapter", "format_version": "1", "base_model": BASE, "adapter": {"adapter_len": 5}},
            r"format_version must be 1, got '1'",
        ),
        (
            {"peft_type": "ADAPTION_PROMPT", "adapter_len": 0, "adapter_layers": 2},
            r"adapter_config\.json: adapter_len must be an int >= 1, got 0",
        ),
        ({"peft_type": "ADAPTION_PROMPT", "adapter_len": 4, "adapter_layers": "2"}, r"adapter_layers must be an int"),
    ],
)
def test_adapter_config_json_with_wrong_types_names_file_and_key(tmp_path, config, message):
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_adapter(tiny_model(), tmp_path)


def test_adapter_config_json_not_utf8(tmp_path):
    (tmp_path / CONFIG_FILE).write_bytes(b'{"format": "llama_adapter\xff"}')
    with pytest.raises(CheckpointError, match=r"adapter_config\.json is not UTF-8"):
        load_adapter(tiny_model(), tmp_path)


def test_adapter_len_argument_is_checked(tmp_path):
    path = official_pth(tmp_path / "a.pth", torch.randn(20, 64), {i: torch.zeros(1, 4, 1, 1) for i in range(3)})
    for bad in ("10", 0, 2.0):
        with pytest.raises(ValueError, match=r"adapter_len must be an int >= 1 or None"):
            load_adapter(tiny_model(), path, adapter_len=bad)
