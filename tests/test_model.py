"""The minimal LLaMA with LLaMA-Adapter: float64 parity with a naive re-derivation, the zero-init property,
what trains, the KV cache, per-sample prompt offsets and RoPE (incl. LLaMA-3.1 scaling)."""

import math

import pytest
import torch

from llama_adapter import AdapterConfig, LLaMA, ModelArgs
from llama_adapter.model import RMSNorm, apply_rope, rope_frequencies
from llama_adapter.model_args import CONFIGS

F64 = torch.float64
TINY = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)


def make_model(adapter=None, seed=0, **overrides):
    torch.manual_seed(seed)
    return LLaMA(ModelArgs(**{**TINY, **overrides}), adapter, dtype=F64)


def with_open_gates(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad and p.dim() == 1:  # gates
            p.data.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def tokens(B=2, N=9, seed=3, vocab=97):
    return torch.randint(0, vocab, (B, N), generator=torch.Generator().manual_seed(seed))


def naive_forward(model, toks, offset=None):
    """Meta's reference written out per head: complex RoPE, explicit concatenated keys with two softmaxes."""
    p, sd = model.params, model.state_dict()
    B, N = toks.shape
    H, D, G = p.n_heads, p.head_dim, p.n_heads // p.n_kv_heads
    freqs = 1.0 / p.rope_theta ** (torch.arange(0, D, 2, dtype=F64) / D)
    rot = torch.polar(torch.ones(N, D // 2, dtype=F64), torch.outer(torch.arange(N, dtype=F64), freqs))

    def rope(x):  # (B, N, h, D)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], D // 2, 2))
        return torch.view_as_real(xc * rot[None, :, None]).flatten(-2)

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + p.norm_eps) * w

    h = sd["tok_embeddings.weight"][toks]
    for i in range(p.n_layers):
        pre = f"layers.{i}."
        x = norm(h, sd[pre + "attention_norm.weight"])
        q = rope((x @ sd[pre + "attention.wq.weight"].T).view(B, N, H, D))
        k = rope((x @ sd[pre + "attention.wk.weight"].T).view(B, N, -1, D))
        v = (x @ sd[pre + "attention.wv.weight"].T).view(B, N, -1, D)
        prompt = sd.get(pre + "attention.adapter_prompt")
        out = torch.zeros(B, N, H, D, dtype=F64)
        for b in range(B):
            for head in range(H):
                kv = head // G
                s = q[b, :, head] @ k[b, :, kv].T / math.sqrt(D)
                s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), -math.inf)
                out[b, :, head] = torch.softmax(s, -1) @ v[b, :, kv]
                if prompt is not None:
                    pr = prompt if offset is None else prompt + offset[b]
                    ak = (pr @ sd[pre + "attention.wk.weight"].T).view(-1, p.n_kv_heads, D)[:, kv]
                    av = (pr @ sd[pre + "attention.wv.weight"].T).view(-1, p.n_kv_heads, D)[:, kv]
                    gate = sd[pre + "attention.adapter_gate"]
                    gate = gate[head if gate.numel() > 1 else 0]
                    gate = torch.tanh(gate) if model.adapter_config.gate_act == "tanh" else gate
                    out[b, :, head] += gate * torch.softmax(q[b, :, head] @ ak.T / math.sqrt(D), -1) @ av
        h = h + out.flatten(2) @ sd[pre + "attention.wo.weight"].T
        x = norm(h, sd[pre + "ffn_norm.weight"])
        a, c = x @ sd[pre + "feed_forward.w1.weight"].T, x @ sd[pre + "feed_forward.w3.weight"].T
        h = h + (torch.nn.functional.silu(a) * c) @ sd[pre + "feed_forward.w2.weight"].T
    return norm(h, sd["norm.weight"]) @ sd["output.weight"].T


@pytest.mark.parametrize("gate,gate_act", [("head", "tanh"), ("scalar", "none")])
def test_forward_matches_naive_float64(gate, gate_act):
    model = with_open_gates(make_model(AdapterConfig(adapter_len=3, adapter_layers=2, gate=gate, gate_act=gate_act)))
    toks = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(toks), naive_forward(model, toks), rtol=0, atol=1e-12)


def test_base_model_matches_naive_float64():
    model = make_model(n_kv_heads=4)
    toks = tokens(B=1, N=12)
    with torch.no_grad():
        torch.testing.assert_close(model(toks), naive_forward(model, toks), rtol=0, atol=1e-12)


@pytest.mark.parametrize("gate,gate_act", [("head", "tanh"), ("scalar", "none")])
def test_zero_init_equals_base_model_exactly(gate, gate_act):
    adapted = make_model(AdapterConfig(adapter_len=4, adapter_layers=2, gate=gate, gate_act=gate_act))
    base = make_model()
    base.load_state_dict({k: v for k, v in adapted.state_dict().items() if "adapter_" not in k})
    toks = tokens()
    with torch.no_grad():
        assert torch.equal(adapted(toks), base(toks))
        with_open_gates(adapted)
        assert not torch.equal(adapted(toks), base(toks))  # the comparison can fail


@pytest.mark.parametrize("gate,per_layer", [("head", TINY["n_heads"]), ("scalar", 1)])
def test_trainable_parameters(gate, per_layer):
    L, K, dim = 2, 5, TINY["dim"]
    model = make_model(AdapterConfig(adapter_len=K, adapter_layers=L, gate=gate))
    expected = L * K * dim + L * per_layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    first = TINY["n_layers"] - L
    adapted = range(first, TINY["n_layers"])
    names = {f"layers.{i}.attention.{s}" for i in adapted for s in ("adapter_prompt", "adapter_gate")}
    assert trainable == names == set(model.adapter_state_dict())
    assert sum(p.numel() for p in model.adapter_parameters()) == expected
    total = sum(p.numel() for p in model.parameters())
    assert model.trainable_summary() == (
        f"trainable params: {expected:,d} || all params: {total:,d} || trainable%: {100 * expected / total:.4f}"
    )
    prompt, gate_p = model.layers[first].attention.adapter_prompt, model.layers[first].attention.adapter_gate
    assert prompt.shape == (K, dim) and prompt.dtype == F64 and gate_p.shape == (per_layer,)
    assert torch.count_nonzero(gate_p) == 0 and prompt.std() > 0.5
    assert model.layers[0].attention.adapter_prompt is None


def test_float32_adapter_on_low_precision_model():
    torch.manual_seed(0)
    model = LLaMA(ModelArgs(**TINY), AdapterConfig(adapter_len=2, adapter_layers=1), dtype=torch.bfloat16)
    assert {p.dtype for p in model.adapter_parameters()} == {torch.float32}
    assert model(tokens(N=4)).dtype == torch.bfloat16


def test_first_backward_moves_only_gates_and_skips_lower_layers():
    model = make_model(AdapterConfig(adapter_len=3, adapter_layers=2))
    seen = {}
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, out.requires_grad))
    model(tokens()).square().mean().backward()
    assert seen == {0: False, 1: True, 2: True}  # no autograd graph below the first adapted layer
    for layer in model.layers[1:]:
        attn = layer.attention
        assert torch.count_nonzero(attn.adapter_prompt.grad) == 0
        assert torch.all(attn.adapter_gate.grad != 0)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_gradient_checkpointing_gives_same_gradients():
    model = with_open_gates(make_model(AdapterConfig(adapter_len=3, adapter_layers=2)))
    toks = tokens()
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(toks).square().mean().backward()
        grads.append([p.grad.clone() for p in model.adapter_parameters()])
    for a, b in zip(*grads):
        assert torch.count_nonzero(a) > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_cached_chunks_equal_full_forward():
    model = with_open_gates(make_model(AdapterConfig(adapter_len=3, adapter_layers=2)))
    toks = tokens(B=2, N=11)
    with torch.no_grad():
        full = model(toks)
        cache = model.new_cache(batch=2, max_len=16)
        parts, start = [], 0
        for n in (5, 1, 3, 2):
            parts.append(model(toks[:, start : start + n], cache=cache, input_pos=start))
            start += n
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-12)


def test_cache_errors():
    model = make_model()
    cache = model.new_cache(batch=2, max_len=8)
    with pytest.raises(ValueError, match="input_pos"):
        model(tokens(N=3), cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        model(tokens(N=3), cache=cache, input_pos=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="max_len"):
        model.new_cache(batch=1, max_len=TINY["max_seq_len"] + 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(B=1, N=TINY["max_seq_len"] + 1))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(2, 3))


def test_prompt_offset_changes_only_adapted_layers():
    model = with_open_gates(make_model(AdapterConfig(adapter_len=3, adapter_layers=2)))
    toks = tokens()
    offset = torch.randn(2, 3, TINY["dim"], dtype=F64)
    outs = {}
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda mod, inp, out, i=i: outs.setdefault(i, []).append(out))
    with torch.no_grad():
        logits = model(toks, prompt_offset=offset)
        model(toks)
        torch.testing.assert_close(logits, naive_forward(model, toks, offset), rtol=0, atol=1e-12)
    assert torch.equal(outs[0][0], outs[0][1])
    assert not torch.equal(outs[1][0], outs[1][1]) and not torch.equal(outs[2][0], outs[2][1])


def test_broadcast_prompt_offset_equals_per_row_runs():
    model = with_open_gates(make_model(AdapterConfig(adapter_len=3, adapter_layers=2)))
    toks = tokens(B=3)
    offset = torch.randn(3, 1, TINY["dim"], dtype=F64)
    with torch.no_grad():
        batch = model(toks, prompt_offset=offset)
        rows = torch.cat([model(toks[b : b + 1], prompt_offset=offset[b : b + 1]) for b in range(3)])
    torch.testing.assert_close(batch, rows, rtol=0, atol=1e-12)
    assert not torch.allclose(batch[0], batch[1])


def test_prompt_offset_errors():
    model = make_model(AdapterConfig(adapter_len=3, adapter_layers=1))
    with pytest.raises(ValueError, match="prompt_offset"):
        model(tokens(B=2), prompt_offset=torch.zeros(2, 2, TINY["dim"], dtype=F64))
    with pytest.raises(ValueError, match="prompt_offset"):
        model(tokens(B=2), prompt_offset=torch.zeros(3, 1, TINY["dim"], dtype=F64))
    with pytest.raises(ValueError, match="no adapter"):
        make_model()(tokens(B=2), prompt_offset=torch.zeros(2, 1, TINY["dim"], dtype=F64))


def meta_apply_scaling(freqs, scaling):
    """Meta's llama3.1 `apply_scaling`, loop form."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=F64)


def test_llama31_rope_scaling_matches_meta_and_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # original_max_position_embeddings=64 puts frequencies in all three regimes (kept, divided, blended)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    ours = rope_frequencies(128, 500000.0, scaling)
    base = rope_frequencies(128, 500000.0)
    assert (ours == base).sum() > 0 and (ours == base / 8).sum() > 0 and ((ours != base) & (ours != base / 8)).sum() > 0
    torch.testing.assert_close(ours, meta_apply_scaling(base, scaling), rtol=1e-15, atol=0)
    cfg = LlamaConfig(
        hidden_size=512,
        num_attention_heads=4,
        max_position_embeddings=1024,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, **scaling),
    )
    hf, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert attention_factor == 1.0
    # transformers computes inverse frequencies in float32: compare at float32 rounding
    torch.testing.assert_close(hf.double(), ours, rtol=1e-6, atol=0)


def test_rope_is_meta_interleaved_complex_rotation():
    x = torch.randn(2, 5, 3, 16, dtype=F64)
    angles = torch.outer(torch.arange(5, dtype=F64), rope_frequencies(16, 10000.0))
    ours = apply_rope(x, angles.cos()[None], angles.sin()[None])
    rot = torch.polar(torch.ones_like(angles), angles)[None, :, None]
    meta = torch.view_as_real(torch.view_as_complex(x.reshape(2, 5, 3, 8, 2)) * rot).flatten(-2)
    torch.testing.assert_close(ours, meta, rtol=0, atol=1e-15)


def test_scaled_model_uses_scaled_tables():
    scaling = dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
    model = make_model(rope_scaling=scaling)
    cos, sin = model.rope_tables("cpu", F64)
    angles = torch.outer(torch.arange(TINY["max_seq_len"], dtype=F64), rope_frequencies(16, 10000.0, scaling))
    assert cos.dtype == F64 and torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())
    assert model.rope_tables("cpu", torch.bfloat16)[0].dtype == torch.float32


def test_rmsnorm_upcasts_never_down():
    norm = RMSNorm(8, eps=1e-6, dtype=F64)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 8, dtype=F64) * 1e3
    expected = x / x.square().mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-15, atol=0)
    x16 = torch.randn(3, 8).to(torch.bfloat16)
    norm16 = RMSNorm(8, dtype=torch.bfloat16)
    xf = x16.float()
    expected = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert norm16(x16).dtype == torch.bfloat16 and torch.equal(norm16(x16), expected)


def test_model_args_and_named_configs():
    assert ModelArgs().hidden_dim == 11008 and ModelArgs().head_dim == 128 and ModelArgs().n_kv_heads == 32
    assert ModelArgs.from_name("13B").hidden_dim == 13824
    assert ModelArgs.from_name("70B").hidden_dim == 28672 and ModelArgs.from_name("70B").n_kv_heads == 8
    assert ModelArgs.from_name("llama3-8B").hidden_dim == 14336
    assert ModelArgs.from_name("llama3.1-8B").rope_scaling["factor"] == 8.0
    assert ModelArgs(dim=64, n_heads=4, hidden_dim=100).hidden_dim == 100
    assert ModelArgs.from_name("tiny", n_layers=5).n_layers == 5
    assert {"7B", "13B", "70B", "llama3-8B", "tiny"} <= set(CONFIGS)
    with pytest.raises(ValueError, match="unknown model name"):
        ModelArgs.from_name("8B")
    with pytest.raises(ValueError, match="n_heads"):
        ModelArgs(dim=64, n_heads=5)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelArgs(dim=64, n_heads=4, rope_scaling={"factor": 8.0})


def test_adapter_config_round_trip_and_errors():
    cfg = AdapterConfig(adapter_len=7, adapter_layers=2, gate="scalar", gate_act="none")
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict() == dict(adapter_len=7, adapter_layers=2, gate="scalar", gate_act="none")
    for bad in (dict(adapter_len=0), dict(adapter_layers=0), dict(gate="layer"), dict(gate_act="relu")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AdapterConfig(**bad)
    with pytest.raises(ValueError, match="unknown AdapterConfig keys"):
        AdapterConfig.from_dict({"adapter_len": 3, "bogus": 1})
    n = TINY["n_layers"]  # more layers than the model has: all of them, saying so (as finetune --adapter-layers)
    with pytest.warns(UserWarning, match=f"adapter_layers {n + 1} > the model's {n} layers; adapting all {n}"):
        model = make_model(AdapterConfig(adapter_layers=n + 1))
    assert model.adapter_config.adapter_layers == n and model.adapted_layers() == list(range(n))
    with pytest.raises(TypeError, match="AdapterConfig"):
        make_model().attach_adapter({"adapter_len": 3})


def test_attach_adapter_replaces_previous_and_builds_on_meta():
    model = make_model(AdapterConfig(adapter_len=3, adapter_layers=3))
    model.attach_adapter(AdapterConfig(adapter_len=2, adapter_layers=1, gate="scalar"))
    assert set(model.adapter_state_dict()) == {"layers.2.attention.adapter_prompt", "layers.2.attention.adapter_gate"}
    assert model.adapter_config.adapter_len == 2
    meta = LLaMA(ModelArgs.from_name("7B", n_layers=2), AdapterConfig(adapter_layers=2), device="meta")
    assert meta.layers[1].attention.adapter_prompt.device.type == "meta"
    assert meta.output.weight.shape == (32000, 4096) and not meta.output.weight.requires_grad
