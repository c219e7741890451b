"""The transformers drop-in (`llama_adapter.hf`) against PEFT's AdaptionPrompt on tiny random Llama/Mistral models."""

import copy
import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")
from peft import AdaptionPromptConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.adaption_prompt import layer as peft_layer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402

from llama_adapter import (
    AdapterConfig,  # noqa: E402
    hf,  # noqa: E402
)
from llama_adapter.attention import set_attention_backend  # noqa: E402

VOCAB, K, L = 64, 3, 2
PEFT_ADAPTER = AdapterConfig(adapter_len=K, adapter_layers=L, gate="scalar", gate_act="none")


def tiny_config(kind="llama"):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: PEFT repeats the prompt K/V, the op groups heads
        max_position_embeddings=64,
        pad_token_id=0,
    )
    if kind == "mistral":
        return MistralConfig(sliding_window=None, **common)
    return LlamaConfig(**common)


def tiny_base(kind="llama", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cls = MistralForCausalLM if kind == "mistral" else LlamaForCausalLM
    return cls(tiny_config(kind)).to(dtype).eval()


@pytest.fixture
def peft_float64_softmax(monkeypatch):
    """PEFT computes the prompt softmax in float32 even for a float64 model; let it keep float64 for 1e-10 parity."""

    def softmax(x, dim, dtype=None):
        return F.softmax(x, dim=dim, dtype=torch.promote_types(x.dtype, dtype) if dtype else None)

    monkeypatch.setattr(peft_layer, "F", SimpleNamespace(softmax=softmax))


def randomize_gates(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("adaption_gate"):
                param.uniform_(-1.0, 1.0)


def peft_twin(base, ours):
    """PEFT's AdaptionPrompt on a copy of `base`, holding `ours`'s prompts and gates."""
    model = get_peft_model(
        copy.deepcopy(base), AdaptionPromptConfig(adapter_len=K, adapter_layers=L, task_type="CAUSAL_LM")
    ).eval()
    state = {hf.PEFT_PREFIX + name: t for name, t in hf.adapter_state_dict(ours).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if hf.is_adapter_param(m)]
    return model


def adapted(base, config=PEFT_ADAPTER, gates=True):
    model = hf.apply_adapter(copy.deepcopy(base), config)
    if gates:
        randomize_gates(model)
    return model


def logits(model, tokens, **kwargs):
    with torch.no_grad():
        return model(tokens, **kwargs).logits


def tokens(B=2, N=7, seed=1):
    return torch.randint(1, VOCAB, (B, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_matches_peft_float64(kind, peft_float64_softmax):
    base = tiny_base(kind)
    ours = adapted(base)
    x = tokens()
    expected = logits(peft_twin(base, ours), x)
    got = logits(ours, x)
    assert (got - logits(base, x)).abs().max() > 1e-3  # the adapter is live
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_matches_peft_float32_within_twice_peft_error(peft_float64_softmax):
    base64 = tiny_base()
    ours64 = adapted(base64)
    x = tokens()
    truth = logits(peft_twin(base64, ours64), x)
    base32, ours32 = base64.float(), copy.deepcopy(ours64).float()
    peft_err = (logits(peft_twin(base32, ours32), x).double() - truth).abs().max()
    our_err = (logits(ours32, x).double() - truth).abs().max()
    assert 0 < peft_err < 1e-4
    assert our_err <= 2 * peft_err


def test_every_layer_runs_through_the_op(monkeypatch):
    calls = []

    def spy(q, k, v, adapter_k=None, adapter_v=None, gate=None, **kwargs):
        calls.append(adapter_k is not None)
        return real(q, k, v, adapter_k, adapter_v, gate, **kwargs)

    real = hf.adapter_attention
    monkeypatch.setattr(hf, "adapter_attention", spy)
    logits(adapted(tiny_base()), tokens())
    assert calls == [False, True, True]  # 3 layers, the top L=2 adapted


def test_zero_init_is_the_base_model_and_prompts_get_no_gradient():
    base = tiny_base()
    ours = adapted(base, gates=False)
    x = tokens()
    torch.testing.assert_close(logits(ours, x), logits(base, x), rtol=0, atol=1e-12)
    ours(x, labels=x).loss.backward()
    grads = {name: p.grad for name, p in ours.named_parameters() if p.requires_grad}
    assert all(g.abs().max() == 0 for name, g in grads.items() if name.endswith("adaption_prompt"))
    assert all(g.abs().max() > 0 for name, g in grads.items() if name.endswith("adaption_gate"))


def test_only_prompts_and_gates_train():
    base = tiny_base()
    ours = adapted(base)
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    assert trainable == set(hf.adapter_state_dict(ours))
    assert len(trainable) == 2 * L
    peft = peft_twin(base, ours)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == sum(
        p.numel() for p in peft.parameters() if p.requires_grad
    )

    before = {name: t.clone() for name, t in ours.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    x = tokens()
    ours(x, labels=x).loss.backward()
    optimizer.step()
    for name, t in ours.state_dict().items():
        changed = not torch.equal(t, before[name])
        assert changed == hf.is_adapter_param(name), name


def test_gradients_match_peft(peft_float64_softmax):
    base = tiny_base()
    ours = adapted(base)
    peft = peft_twin(base, ours)
    x = tokens()
    ours(x, labels=x).loss.backward()
    peft(input_ids=x, labels=x).loss.backward()
    peft_grads = {n.removeprefix(hf.PEFT_PREFIX): p.grad for n, p in peft.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().max() > 0
            torch.testing.assert_close(p.grad, peft_grads[name], rtol=0, atol=1e-10)


def test_head_gates_and_tanh_reduce_to_the_scalar_gate():
    base = tiny_base()
    scalar = adapted(base)
    per_head = hf.apply_adapter(copy.deepcopy(base), AdapterConfig(adapter_len=K, adapter_layers=L))  # head, tanh
    with torch.no_grad():
        for module_s, module_h in zip(hf.attention_modules(scalar), hf.attention_modules(per_head)):
            if hasattr(module_s, "adaption_prompt"):
                assert module_h.adaption_gate.shape == (4,)
                module_h.adaption_prompt.copy_(module_s.adaption_prompt)
                module_h.adaption_gate.copy_(torch.atanh(module_s.adaption_gate).expand(4))
    x = tokens()
    torch.testing.assert_close(logits(per_head, x), logits(scalar, x), rtol=0, atol=1e-12)


def test_save_peft_loads_in_peft(tmp_path, peft_float64_softmax):
    base = tiny_base()
    ours = adapted(base)
    hf.save_peft(ours, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = tokens()
    torch.testing.assert_close(logits(loaded, x), logits(ours, x), rtol=0, atol=1e-10)


def test_load_peft_reads_a_peft_directory(tmp_path, peft_float64_softmax):
    base = tiny_base()
    peft = peft_twin(base, adapted(base))
    peft.save_pretrained(tmp_path)
    ours = hf.load_peft(copy.deepcopy(base), tmp_path)
    assert ours.adapter_config == PEFT_ADAPTER
    x = tokens()
    torch.testing.assert_close(logits(ours, x), logits(peft, x), rtol=0, atol=1e-10)


def test_greedy_generation_with_cache_equals_peft(peft_float64_softmax):
    base = tiny_base()
    ours = adapted(base)
    peft = peft_twin(base, ours)
    x = tokens()
    args = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    mask = torch.ones_like(x)
    ours_out = ours.generate(x, attention_mask=mask, **args)
    assert ours_out.shape == (2, 13)
    assert torch.equal(ours_out, peft.generate(input_ids=x, attention_mask=mask, **args))
    # A static cache (per-row kv_lens) and left padding (varlen prefill, gathered cache) must agree too.
    assert torch.equal(ours.generate(x, attention_mask=mask, cache_implementation="static", **args), ours_out)
    mask[0, :2] = 0
    assert torch.equal(
        ours.generate(x, attention_mask=mask, **args), peft.generate(input_ids=x, attention_mask=mask, **args)
    )


def test_padding_mask_matches_peft_on_real_tokens(peft_float64_softmax):
    base = tiny_base()
    ours = adapted(base)
    x = tokens()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    got = logits(ours, x, attention_mask=mask)
    expected = logits(peft_twin(base, ours), x, attention_mask=mask)
    torch.testing.assert_close(got[0, 3:], expected[0, 3:], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-10)


needs_ops = pytest.mark.skipif(
    importlib.util.find_spec("llama_adapter.ops") is None, reason="llama_adapter.ops (the Triton op) not present"
)


def loss_and_adapter_grads(model, x):
    model.zero_grad()
    loss = model(x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}


@needs_ops
def test_triton_backend_within_twice_reference_error():
    """FlashAttention's rule on the whole drop-in: fp32 Triton vs a float64 truth, at most 2x (3x for gradients)
    the error of the fp32 reference backend."""
    ours64 = adapted(tiny_base())
    ours32 = copy.deepcopy(ours64).float()
    x = tokens(B=1, N=5)
    truth, truth_grads = loss_and_adapter_grads(ours64, x)
    truth_logits = logits(ours64, x)
    errors = {}
    for backend in ("reference", "triton"):
        set_attention_backend(backend)
        loss, grads = loss_and_adapter_grads(ours32, x)
        errors[backend] = (
            (logits(ours32, x).double() - truth_logits).abs().max(),
            max((grads[n] - truth_grads[n]).abs().max() for n in grads),
        )
    (ref_out, ref_grad), (tri_out, tri_grad) = errors["reference"], errors["triton"]
    assert 0 < ref_out and 0 < ref_grad
    assert tri_out <= 2 * ref_out
    assert tri_grad <= 3 * ref_grad

    args = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    set_attention_backend("reference")
    expected = ours32.generate(x, **args)
    set_attention_backend("triton")
    assert torch.equal(ours32.generate(x, **args), expected)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_ops)])
def test_forward_compiles_fullgraph(backend):
    ours = adapted(tiny_base(dtype=torch.float32))
    x = tokens(B=1, N=5)
    expected = logits(ours, x)
    set_attention_backend(backend)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(logits(compiled, x), expected, rtol=0, atol=1e-5)


def test_bad_inputs_raise_clear_errors(tmp_path):
    base = tiny_base()
    with pytest.warns(UserWarning, match="config.adapter_layers 30 > the model's 3 layers; adapting all 3"):
        everywhere = hf.apply_adapter(copy.deepcopy(base), AdapterConfig(adapter_len=K, adapter_layers=30))
    assert everywhere.adapter_config == AdapterConfig(adapter_len=K, adapter_layers=3)  # as LLaMA.attach_adapter
    assert len(hf.adapter_state_dict(everywhere)) == 2 * 3
    hf.save_peft(adapted(base), tmp_path / "peft")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**peft_config, "adapter_layers": 4}))
    with pytest.raises(ValueError, match="adapter_layers 4 > the model's 3 layers: .*made for another model"):
        hf.load_peft(copy.deepcopy(base), tmp_path / "peft")
    with pytest.raises(TypeError, match="AdapterConfig"):
        hf.apply_adapter(copy.deepcopy(base), {"adapter_len": K})
    with pytest.raises(ValueError, match="transformers model of type"):
        hf.apply_adapter(torch.nn.Linear(2, 2), PEFT_ADAPTER)
    ours = adapted(base)
    with pytest.raises(ValueError, match="already has an adapter"):
        hf.apply_adapter(ours, PEFT_ADAPTER)
    with pytest.raises(ValueError, match="gate='scalar'"):
        hf.save_peft(adapted(base, AdapterConfig(adapter_len=K, adapter_layers=L)), tmp_path / "head")
    with pytest.raises(ValueError, match="adapter_config.json"):
        hf.load_peft(copy.deepcopy(base), tmp_path / "missing")
    hf.save_peft(ours, tmp_path / "ok")
    with pytest.raises(ValueError, match="already has adapter"):
        hf.load_peft(
            adapted(base, AdapterConfig(adapter_len=K + 1, adapter_layers=L, gate="scalar", gate_act="none")),
            tmp_path / "ok",
        )


@pytest.mark.parametrize(
    "content, key",
    [
        (b"[1, 2]", "JSON list"),
        (b'{"peft_type": "ADAPTION_PROMPT", "adapter_len": "4", "adapter_layers": 2}', "adapter_len"),
        (b'{"peft_type": "ADAPTION_PROMPT", "adapter_len": 4.0, "adapter_layers": 2}', "adapter_len"),
        (b'{"peft_type": "ADAPTION_PROMPT", "adapter_len": 4, "adapter_layers": 0}', "adapter_layers"),
        (b'{"peft_type": "ADAPTION_PROMPT", "adapter_len": 4}', "adapter_layers"),
        (b'{"peft_type": "LORA", "adapter_len": 4, "adapter_layers": 2}', "peft_type"),
        (
            b'{"peft_type": "ADAPTION_PROMPT", "target_modules": "mlp", "adapter_len": 4, "adapter_layers": 2}',
            "target_modules",
        ),
        (b'{"peft_type": "ADAPTION_PROMPT", "adapter_len": 4, "adapter_layers": 2, "x": "\xff"}', "UTF-8"),
        (b'{"peft_type": ', "not valid JSON"),
    ],
)
def test_load_peft_reads_its_config_by_the_shared_rules(tmp_path, content, key):
    """A bad adapter_config.json is a CheckpointError naming the file and the key (as for our own loader), and
    the model is left without an adapter."""
    from llama_adapter.loading import CheckpointError

    hf.save_peft(adapted(tiny_base()), tmp_path)
    (tmp_path / "adapter_config.json").write_bytes(content)
    base = tiny_base()
    with pytest.raises(CheckpointError, match=key) as info:
        hf.load_peft(base, tmp_path)
    assert "adapter_config.json" in str(info.value)
    assert getattr(base, "adapter_config", None) is None


def test_load_peft_names_a_damaged_weights_file(tmp_path):
    from llama_adapter.loading import CheckpointError

    hf.save_peft(adapted(tiny_base()), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    base = tiny_base()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        hf.load_peft(base, tmp_path)
    assert getattr(base, "adapter_config", None) is None
