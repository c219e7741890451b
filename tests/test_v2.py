"""LLaMA-Adapter V2 switches (bias/scale tuning, norm tuning, early fusion) and the image projector:
unchanged logits at init, exactly the right parameters trainable, save/load round trips, fresh re-attach."""

import pytest
import torch

from llama_adapter import AdapterConfig, LLaMA, ModelArgs
from llama_adapter.adapter import BiasScaleLinear

ARGS = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16, max_seq_len=32)
V2 = dict(bias_tuning=True, norm_tuning=True, visual_dim=6, visual_hidden=8, early_fusion=1)


def base_model(seed=0):
    torch.manual_seed(seed)
    model = LLaMA(ModelArgs(**ARGS), dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1, 0.2) if name.endswith("norm.weight") else p.normal_(0, 0.2)
    return model


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "switch", [dict(bias_tuning=True), dict(norm_tuning=True), dict(visual_dim=6, early_fusion=1), V2]
)
def test_switches_at_init_leave_logits_unchanged(switch):
    model = base_model()
    tokens = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        base = model(tokens)
        model.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=2, **switch))
        kwargs = {"image_features": torch.randn(2, 6, dtype=torch.float64)} if "visual_dim" in switch else {}
        torch.testing.assert_close(model(tokens, **kwargs), base, rtol=0, atol=1e-12)


def test_bias_scale_is_exactly_the_plain_linear_with_the_same_prompts_and_open_gates():
    v1, v2 = base_model(), base_model()
    tokens = torch.randint(0, 61, (2, 6))
    v1.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=2))
    v2.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=2, bias_tuning=True, norm_tuning=True))
    with torch.no_grad():
        for p in v1.adapter_parameters():
            p.normal_()
        shared = v1.adapter_state_dict()
        for name, p in v2.named_parameters():
            if name in shared:
                p.copy_(shared[name])
        torch.testing.assert_close(v2(tokens), v1(tokens), rtol=0, atol=1e-12)
        lin = v2.layers[0].attention.wq
        lin.bias.normal_()
        lin.scale.normal_()
        x = torch.randn(5, 64, dtype=torch.float64)
        torch.testing.assert_close(lin(x), lin.scale * (x @ lin.weight.T + lin.bias), rtol=0, atol=1e-12)


def test_the_right_parameters_train_and_get_gradients():
    model = base_model()
    model.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=2, **V2))
    linears = (
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    )
    want = {f"layers.{i}.{lin}.{t}" for i in range(3) for lin in linears for t in ("bias", "scale")}
    want |= {f"layers.{i}.{n}.weight" for i in range(3) for n in ("attention_norm", "ffn_norm")} | {"norm.weight"}
    want |= {f"layers.{i}.attention.adapter_{t}" for i in (0, 1, 2) for t in ("prompt", "gate")}  # 0: early fusion
    want |= {f"visual_proj.fc{j}.{t}" for j in (1, 2) for t in ("weight", "bias")}
    assert trainable(model) == want
    assert set(model.adapter_state_dict()) == want
    assert {id(p) for p in model.adapter_parameters()} == {id(p) for n, p in model.named_parameters() if n in want}
    assert model.first_adapter_layer() == 0
    assert isinstance(model.layers[0].attention.wq, BiasScaleLinear)
    assert model.layers[0].attention.wq.weight.requires_grad is False

    tokens = torch.randint(0, 61, (2, 6))
    model(tokens, image_features=torch.randn(2, 6, dtype=torch.float64)).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, g in grads.items():
        if name.endswith("adapter_prompt") or name.startswith("visual_proj."):
            assert g is None or g.abs().max() == 0, name  # zero-init gates: no gradient reaches them yet
        else:
            assert g.abs().max() > 0, name  # gates, biases, scales, norms move from the first step

    # switching off restores the plain v1 model: plain linears, the checkpoint's norms, v1's trainable set
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    model.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=2))
    assert type(model.layers[0].attention.wq) is torch.nn.Linear and model.visual_proj is None
    assert trainable(model) == {f"layers.{i}.attention.adapter_{t}" for i in (1, 2) for t in ("prompt", "gate")}
    fresh = base_model()
    assert torch.equal(model.norm.weight, fresh.norm.weight)
    assert model.first_adapter_layer() == 1


def test_early_fusion_sends_the_image_offset_to_the_first_layers_only():
    model = base_model()
    model.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=1, early_fusion=2))
    offset = torch.randn(2, 3, 64, dtype=torch.float64)
    kv = model.adapter_kv(offset, 2)
    assert [None if x is None else x[0].dim() for x in kv] == [
        4,
        4,
        3,
    ]  # (B, Hkv, K, D) below, shared (Hkv, K, D) on top
    model.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=2))
    assert [None if x is None else x[0].dim() for x in model.adapter_kv(offset, 2)] == [None, 4, 4]  # v1: every layer


def test_save_load_round_trips_v2_and_the_projector(tmp_path):
    model = base_model()
    cfg = AdapterConfig(adapter_len=3, adapter_layers=2, **V2)
    model.attach_adapter(cfg)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    tokens = torch.randint(0, 61, (2, 6))
    feats = torch.randn(2, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model(tokens, image_features=feats)
    model.save_adapter(tmp_path / "a")

    other = base_model()
    other.load_adapter(tmp_path / "a")
    assert other.adapter_config == cfg
    assert trainable(other) == trainable(model)
    with torch.no_grad():
        torch.testing.assert_close(other(tokens, image_features=feats), want, rtol=0, atol=0)

    v1 = base_model()
    v1.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=2))
    v1.save_adapter(tmp_path / "v1")
    saved = (tmp_path / "v1" / "adapter_config.json").read_text()
    assert "bias_tuning" not in saved and "visual_dim" not in saved  # v1 files look as before


def test_bad_v2_settings_and_inputs_are_clear_errors():
    for bad in (dict(bias_tuning=1), dict(visual_dim=0), dict(visual_hidden=0), dict(early_fusion=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AdapterConfig(**bad)
    model = base_model()
    with pytest.raises(ValueError, match="early_fusion"):
        model.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=1, early_fusion=4))
    model.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=1))
    with pytest.raises(ValueError, match="no visual projector"):
        model(torch.zeros(1, 3, dtype=torch.long), image_features=torch.zeros(1, 6))
    model.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=1, visual_dim=6))
    with pytest.raises(ValueError, match="expects 6"):
        model(torch.zeros(1, 3, dtype=torch.long), image_features=torch.zeros(1, 5))
