"""Checkpoint directories: Meta (sharded, LLaMA-1/2/3 params) and HF (safetensors, sharded, .bin), name mapping,
q/k permutation, dtype/device/adapter options, and an error naming the file and tensor for every broken file."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
from helpers import random_hf_model, tiny_hf_config, write_meta_dir  # noqa: E402

from llama_adapter import AdapterConfig  # noqa: E402
from llama_adapter.checkpoint_hf import hf_model_args, unpermute_rotate_half  # noqa: E402
from llama_adapter.checkpoint_meta import meta_model_args  # noqa: E402
from llama_adapter.loading import CheckpointError, load_pretrained, read_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    hf = random_hf_model(tiny_hf_config(), seed=7, dtype=torch.float32)
    hf.save_pretrained(root / "hf")
    hf.save_pretrained(root / "hf_sharded", max_shard_size="40KB")
    (root / "hf_bin").mkdir()
    shutil.copy(root / "hf" / "config.json", root / "hf_bin")
    torch.save(hf.state_dict(), root / "hf_bin" / "pytorch_model.bin")
    shutil.copytree(root / "hf_bin", root / "hf_bin_sharded")
    (root / "hf_bin_sharded" / "pytorch_model.bin").unlink()
    weight_map = {}
    for i, names in enumerate((["lm_head.weight", "model.norm.weight"], list(hf.state_dict())[:-2])):
        torch.save({n: hf.state_dict()[n] for n in names}, root / "hf_bin_sharded" / f"part{i}.bin")
        weight_map.update({n: f"part{i}.bin" for n in names})
    index = json.dumps({"weight_map": weight_map})
    (root / "hf_bin_sharded" / "pytorch_model.bin.index.json").write_text(index)
    write_meta_dir(hf, root / "meta")
    write_meta_dir(hf, root / "meta_2shards", n_shards=2, vocab_size=-1)
    write_meta_dir(hf, root / "meta_vocab_parallel", n_shards=2, vocab_parallel_embedding=True, dtype=torch.bfloat16)
    return root


@pytest.fixture
def copy_of(dirs, tmp_path):
    def make(name):
        return shutil.copytree(dirs / name, tmp_path / name)

    return make


def test_every_layout_gives_the_same_tensors(dirs):
    reference = read_checkpoint(dirs / "meta").tensors
    assert len(reference) == 2 + 1 + 3 * 9  # embeddings, output, norm; 9 tensors per layer
    for name in ("hf", "hf_sharded", "hf_bin", "hf_bin_sharded", "meta_2shards", "meta_vocab_parallel"):
        ckpt = read_checkpoint(dirs / name)
        assert ckpt.tensors.keys() == reference.keys(), name
        for key, t in reference.items():
            expected = t.to(torch.bfloat16) if name == "meta_vocab_parallel" else t
            assert torch.equal(ckpt.tensors[key], expected), (name, key)
    assert read_checkpoint(dirs / "meta_2shards").args["vocab_size"] == 96  # -1 in params.json


def test_unpermute_inverts_hf_conversion():
    """transformers' convert_llama_weights_to_hf: per head, view(H, D/2, 2, dim).transpose(1, 2) of Meta's rows."""
    H, D, dim = 3, 8, 5
    meta = torch.randn(H * D, dim)
    hf = meta.view(H, D // 2, 2, dim).transpose(1, 2).reshape(H * D, dim)
    assert torch.equal(unpermute_rotate_half(hf, H), meta)
    assert not torch.equal(hf, meta)


def test_meta_params_llama1_2_3():
    llama1 = meta_model_args(
        {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-6, "vocab_size": -1}
    )
    assert llama1 == dict(dim=4096, multiple_of=256, n_heads=32, n_layers=32, norm_eps=1e-6, vocab_size=-1)
    llama31 = dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=1024,
        ffn_dim_multiplier=1.3,
        norm_eps=1e-05,
        rope_theta=500000.0,
        use_scaled_rope=True,
    )
    args = meta_model_args(llama31)
    assert args["rope_scaling"] == dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    assert (args["n_kv_heads"], args["ffn_dim_multiplier"], args["rope_theta"]) == (8, 1.3, 500000.0)
    assert meta_model_args({**llama31, "rope_scaling_factor": 32})["rope_scaling"]["factor"] == 32.0
    assert "rope_scaling" not in meta_model_args({**llama31, "use_scaled_rope": False})
    with pytest.raises(CheckpointError, match=r"params.json lacks \['n_heads'\]"):
        meta_model_args({"dim": 64, "n_layers": 2})


def test_hf_config_layouts():
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192, vocab_size=96)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    v5 = hf_model_args({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}})
    v4 = hf_model_args({**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}})
    v4_old = hf_model_args({**base, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}})
    assert v5 == v4 == v4_old
    assert v5["rope_theta"] == 5e5 and v5["rope_scaling"] == scaling
    assert (v5["n_kv_heads"], v5["hidden_dim"]) == (4, 192)
    assert hf_model_args(base)["rope_theta"] == 10000.0 and "rope_scaling" not in hf_model_args(base)
    bad = [
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear' is not supported"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "llama3 rope scaling needs"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"head_dim": 32}, "head_dim 32"),
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ]
    for extra, message in bad:
        with pytest.raises(CheckpointError, match=message):
            hf_model_args({**base, **extra}, "x/config.json")
    with pytest.raises(CheckpointError, match=r"lacks \['vocab_size'\]"):
        hf_model_args({k: v for k, v in base.items() if k != "vocab_size"})


def test_dtype_device_adapter_and_overrides(dirs):
    model = load_pretrained(dirs / "hf", dtype=torch.float64, device="cpu", max_seq_len=32)
    assert model.params.max_seq_len == 32 and model.params.hidden_dim == 192
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" and not p.requires_grad for p in model.parameters())
    assert model.adapter_config is None
    kept = load_pretrained(dirs / "meta_vocab_parallel")  # dtype=None keeps the checkpoint's
    assert kept.output.weight.dtype == torch.bfloat16

    cfg = AdapterConfig(adapter_len=3, adapter_layers=2)
    adapted = load_pretrained(dirs / "meta", adapter=cfg, dtype=torch.float64)
    assert adapted.adapter_config == cfg
    assert [n for n, p in adapted.named_parameters() if p.requires_grad] == [
        f"layers.{i}.attention.adapter_{w}" for i in (1, 2) for w in ("prompt", "gate")
    ]
    tokens = torch.randint(0, 96, (1, 9))
    with torch.no_grad():  # zero gates: the adapter changes nothing
        assert torch.equal(adapted(tokens), model(tokens))
    with pytest.raises(TypeError, match="adapter must be an AdapterConfig or a path"):
        load_pretrained(dirs / "meta", adapter=3)


def test_tied_embeddings(tmp_path):
    hf = random_hf_model(tiny_hf_config(tie_word_embeddings=True), dtype=torch.float32)
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert torch.equal(model.output.weight, hf.model.embed_tokens.weight)


def test_llama1_rope_freqs_is_ignored(copy_of):
    path = copy_of("meta")
    shard = torch.load(path / "consolidated.00.pth")
    torch.save({**shard, "rope.freqs": torch.randn(8)}, path / "consolidated.00.pth")
    assert "rope.freqs" not in read_checkpoint(path).tensors


def _edit_shard(path, name="consolidated.00.pth", **changes):
    shard = torch.load(path / name)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del shard[key]
        else:
            shard[key] = value
    torch.save(shard, path / name)


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def test_missing_paths(dirs, copy_of, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: .*absent"):
        load_pretrained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a Meta checkpoint"):
        load_pretrained(tmp_path / "empty")
    meta = copy_of("meta")
    (meta / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match="no consolidated.*pth checkpoint files"):
        load_pretrained(meta)
    hf = copy_of("hf")
    (hf / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        load_pretrained(hf)
    sharded = copy_of("hf_sharded")
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"checkpoint file not found: .*{victim.name}"):
        load_pretrained(sharded)


def test_tensor_errors_name_tensor_and_file(copy_of):
    meta = copy_of("meta")
    _edit_shard(meta, layers__1__ffn_norm__weight=None)
    with pytest.raises(CheckpointError, match="tensor 'layers.1.ffn_norm.weight' is missing from"):
        load_pretrained(meta)
    _edit_shard(meta, layers__1__ffn_norm__weight=torch.ones(64), adapter_query__weight=torch.zeros(2, 64))
    with pytest.raises(CheckpointError, match="unexpected tensor 'adapter_query.weight' in .*consolidated.00.pth"):
        load_pretrained(meta)
    _edit_shard(meta, adapter_query__weight=None, layers__2__attention__wv__weight=torch.zeros(64, 64))
    message = (
        r"'layers.2.attention.wv.weight' in .*consolidated.00.pth has shape \(64, 64\), the model expects \(32, 64\)"
    )
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(meta)

    hf = copy_of("hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match="'layers.0.feed_forward.w1.weight' in .*model.safetensors has shape"):
        load_pretrained(hf)


def test_shards_that_disagree(copy_of):
    meta = copy_of("meta_2shards")
    _edit_shard(meta, "consolidated.01.pth", norm__weight=None)
    with pytest.raises(
        CheckpointError, match="'norm.weight' is in only one of .*consolidated.00.pth and .*consolidated.01.pth"
    ):
        load_pretrained(meta)
    _edit_shard(meta, "consolidated.01.pth", norm__weight=torch.ones(32))
    with pytest.raises(CheckpointError, match=r"'norm.weight' has shape \(32,\) in .*consolidated.01.pth"):
        load_pretrained(meta)


def test_truncated_and_corrupt_files(copy_of):
    hf = copy_of("hf")
    _truncate(hf / "model.safetensors")
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors .truncated"):
        load_pretrained(hf)
    meta = copy_of("meta_2shards")
    _truncate(meta / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="cannot read .*consolidated.01.pth .truncated"):
        load_pretrained(meta)
    (meta / "params.json").write_text('{"dim": 64,')
    with pytest.raises(CheckpointError, match="params.json is not valid JSON"):
        load_pretrained(meta)


def test_index_listing_a_tensor_its_file_lacks(copy_of):
    sharded = copy_of("hf_sharded")
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first_file = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first_file
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{first_file} lacks tensor 'model.layers.9.mlp.up_proj.weight'"):
        load_pretrained(sharded)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"dim": "64"}, r"params\.json: dim must be an int >= 1, got '64' \(str\)"),
        ({"dim": 64.0}, r"params\.json: dim must be an int >= 1, got 64\.0 \(float\)"),
        ({"n_heads": 0}, r"params\.json: n_heads must be an int >= 1, got 0"),
        ({"n_layers": True}, r"params\.json: n_layers must be an int >= 1, got True \(bool\)"),
        ({"norm_eps": "1e-5"}, r"params\.json: norm_eps must be a number > 0, got '1e-5' \(str\)"),
        ({"rope_theta": -1.0}, r"params\.json: rope_theta must be a number > 0, got -1\.0"),
        ({"n_kv_heads": [2]}, r"params\.json: n_kv_heads must be an int >= 1 or None, got \[2\]"),
        ({"use_scaled_rope": True, "rope_scaling_factor": "8"}, r"params\.json: rope_scaling\['factor'\] must be"),
        ({"n_heads": 3}, r"params\.json: dim \(64\) must be divisible by n_heads \(3\)"),
        ({"n_heads": 8, "n_kv_heads": 3}, r"params\.json: n_heads \(8\) must be divisible by n_kv_heads \(3\)"),
    ],
)
def test_params_json_with_wrong_types_names_file_and_key(copy_of, edit, message):
    meta = copy_of("meta")
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, **edit}))
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(meta)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"hidden_size": "64"}, r"config\.json: hidden_size must be an int >= 1, got '64'"),
        ({"num_attention_heads": 0}, r"config\.json: num_attention_heads must be an int >= 1, got 0"),
        ({"rms_norm_eps": "1e-5"}, r"config\.json: rms_norm_eps must be a number > 0, got '1e-5'"),
        ({"max_position_embeddings": 1.5}, r"config\.json: max_position_embeddings must be an int"),
        ({"rope_parameters": [1, 2]}, r"config\.json: rope_parameters must be an object"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}}, r"config\.json: rope_theta must be"),
    ],
)
def test_config_json_with_wrong_types_names_file_and_key(copy_of, edit, message):
    hf = copy_of("hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(hf)


@pytest.mark.parametrize("name", ["meta", "hf"])
def test_config_files_that_are_not_a_json_object_or_not_utf8(copy_of, name):
    path = copy_of(name)
    config = path / ("params.json" if name == "meta" else "config.json")
    config.write_text("[64, 2, 4]")
    with pytest.raises(CheckpointError, match=rf"{config.name} holds a JSON list, expected an object"):
        load_pretrained(path)
    config.write_bytes(b'{"dim": 64, "name": "\xff"}')
    with pytest.raises(CheckpointError, match=rf"{config.name} is not UTF-8"):
        load_pretrained(path)


def test_model_args_and_adapter_config_check_every_field():
    """One rule per field (ModelArgs.RULES, AdapterConfig.RULES): the loaders and the constructors share them."""
    from llama_adapter import ModelArgs

    good = dict(dim=64, n_layers=2, n_heads=4, vocab_size=32)
    for field in ModelArgs.RULES:
        with pytest.raises(ValueError, match=rf"^{field} must be"):
            ModelArgs(**{**good, field: "1"})
    for field in AdapterConfig.RULES:
        with pytest.raises(ValueError, match=rf"^{field} must be"):
            AdapterConfig(**{field: "1"})
    assert ModelArgs(**good, norm_eps=1).norm_eps == 1.0 and isinstance(ModelArgs(**good, norm_eps=1).norm_eps, float)
    with pytest.raises(ValueError, match="head_dim = dim / n_heads = 3 must be even"):
        ModelArgs(dim=12, n_layers=1, n_heads=4, vocab_size=8)


def test_asking_for_cuda_without_it_is_one_sentence(dirs):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=r"^device 'cuda' needs (CUDA|a CUDA GPU), but [^\n]*$"):
        load_pretrained(dirs / "hf", device="cuda")
