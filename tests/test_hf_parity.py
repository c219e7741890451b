"""Parity with the peers in float64: transformers' LlamaForCausalLM (logits, greedy generation) and PEFT's
AdaptionPrompt, with the model loaded from HF and Meta directories written from the same weights.

Float64 rounding gives ~4e-15 here; transformers without `float64_upcasts` is ~8e-7 off, so TOL = 1e-10 is
a check that its float32 rounding (or any real difference) would fail.
"""

import pytest
import torch

pytest.importorskip("transformers")
from helpers import float64_upcasts, random_hf_model, tiny_hf_config, write_meta_dir  # noqa: E402

from llama_adapter import LLaMA  # noqa: E402
from llama_adapter.adapter_io import load_adapter  # noqa: E402

TOL = 1e-10
SOURCES = ("hf", "hf_sharded", "meta", "meta_2shards")


def _write_all(hf, root) -> dict:
    dirs = {name: root / name for name in SOURCES}
    hf.save_pretrained(dirs["hf"])
    hf.save_pretrained(dirs["hf_sharded"], max_shard_size="40KB")
    write_meta_dir(hf, dirs["meta"])
    write_meta_dir(hf, dirs["meta_2shards"], n_shards=2, vocab_size=-1)
    return dirs


@pytest.fixture(scope="module", params=["default_rope", "llama3_rope"])
def peer(request, tmp_path_factory):
    """A float64 HF model with its checkpoint dirs, and its logits on random tokens."""
    rope = "llama3" if request.param == "llama3_rope" else None
    extra = dict(max_position_embeddings=16384) if rope else {}  # llama3 scaling wants more than its 8192
    with float64_upcasts():
        hf = random_hf_model(tiny_hf_config(rope_scaling=rope, **extra), seed=1)
        tokens = torch.randint(0, hf.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            logits = hf(tokens).logits
    return hf, tokens, logits, _write_all(hf, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("source", SOURCES)
def test_logits_equal_transformers(peer, source):
    hf, tokens, expected, dirs = peer
    if source == "hf_sharded":
        assert len(list(dirs[source].glob("model-*.safetensors"))) > 1  # the index path really ran
    model = LLaMA.from_pretrained(dirs[source])
    assert model.tok_embeddings.weight.dtype == torch.float64
    with torch.no_grad():
        got = model(tokens)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


def test_greedy_generation_equals_transformers(peer):
    hf, _, _, dirs = peer
    model = LLaMA.from_pretrained(dirs["meta_2shards"])
    prompts = [[1, 17, 40, 5, 66, 9, 31], [1, 80, 3]]
    eos = hf.config.eos_token_id
    with float64_upcasts(), torch.no_grad():
        expected = []
        for p in prompts:  # one at a time: HF would need left padding, which shifts its positions
            out = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
            new = out[0, len(p) :].tolist()
            expected.append(new[: new.index(eos)] if eos in new else new)
    got = model.generate(prompts, max_new_tokens=12, eos_id=eos)
    assert got == expected
    assert max(len(e) for e in expected) >= 6  # a real comparison, not two empty lists


def _peft_model(hf, adapter_len=3, adapter_layers=2, seed=3):
    """PEFT AdaptionPrompt on a deep copy of `hf`, with random prompts and nonzero per-layer gates."""
    import copy

    from peft import AdaptionPromptConfig, get_peft_model

    gen = torch.Generator().manual_seed(seed)
    with float64_upcasts():
        peft_model = get_peft_model(
            copy.deepcopy(hf),
            AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers, task_type="CAUSAL_LM"),
        )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("adaption_prompt"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif name.endswith("adaption_gate"):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
    return peft_model.eval()


def test_peft_adapter_equals_peft(peer, tmp_path):
    pytest.importorskip("peft")
    hf, tokens, base_logits, dirs = peer
    peft_model = _peft_model(hf)
    with float64_upcasts(), torch.no_grad():
        expected = peft_model(input_ids=tokens).logits
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter changes the output
    peft_model.save_pretrained(tmp_path / "peft")

    model = LLaMA.from_pretrained(dirs["hf"], adapter=str(tmp_path / "peft"))
    cfg = model.adapter_config
    assert (cfg.adapter_len, cfg.adapter_layers, cfg.gate, cfg.gate_act) == (3, 2, "scalar", "none")
    assert all(p.dtype == torch.float64 and p.requires_grad for p in model.adapter_parameters())
    with torch.no_grad():
        got = model(tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


def test_official_pth_equals_peft(peer, tmp_path):
    """The same prompts and gates as an official v1 .pth (per-head gates all equal to PEFT's scalar, a gate for
    every layer, the unused bottom one set to garbage) load to PEFT's model."""
    pytest.importorskip("peft")
    hf, tokens, _, dirs = peer
    peft_model = _peft_model(hf, adapter_len=4, adapter_layers=2, seed=5)
    with float64_upcasts(), torch.no_grad():
        expected = peft_model(input_ids=tokens).logits
    weights = {n.split("model.layers.")[-1]: p.detach() for n, p in peft_model.named_parameters() if "adaption" in n}
    n_layers, n_heads = hf.config.num_hidden_layers, hf.config.num_attention_heads
    official = {"adapter_query.weight": torch.cat([weights[f"{i}.self_attn.adaption_prompt"][0] for i in (1, 2)])}
    for i in range(n_layers):
        gate = weights[f"{i}.self_attn.adaption_gate"] if i >= 1 else torch.tensor([123.0], dtype=torch.float64)
        official[f"layers.{i}.attention.gate"] = gate.expand(n_heads).reshape(1, n_heads, 1, 1).clone()
    torch.save(official, tmp_path / "adapter.pth")

    model = LLaMA.from_pretrained(dirs["meta"])
    cfg = load_adapter(model, tmp_path / "adapter.pth", adapter_len=4)
    assert (cfg.adapter_len, cfg.adapter_layers, cfg.gate, cfg.gate_act) == (4, 2, "head", "none")
    with torch.no_grad():
        got = model(tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
