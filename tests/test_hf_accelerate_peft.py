"""`llama_adapter.hf.accelerate_peft`: a model built by PEFT's get_peft_model(..., AdaptionPromptConfig(...)) runs the
fused op with PEFT's own parameters, and computes what stock PEFT computes.

The float64 comparisons at 1e-10 hold under one condition, stated here and in the README: stock PEFT takes the
prompt softmax in float32 (`F.softmax(..., dtype=torch.float32)`) even for a float64 model, so these tests let it
keep float64 (the `peft_float64_softmax` fixture); `test_stock_peft_differs_only_by_its_float32_softmax` measures
what is left without it."""

import copy

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from test_hf_dropin import K, L, logits, peft_float64_softmax, tiny_base, tokens  # noqa: E402, F401
from test_hf_padded import KernelCounter, grads, padding  # noqa: E402
from test_hf_parity import _peft_model as stock_peft  # noqa: E402

from llama_adapter import hf  # noqa: E402
from llama_adapter.adapter import WEIGHTS_FILE  # noqa: E402
from llama_adapter.attention import set_attention_backend  # noqa: E402

B, N = 3, 9


def stock_and_accelerated(dtype=torch.float64):
    base = tiny_base(dtype=dtype)
    stock = stock_peft(base, adapter_len=K, adapter_layers=L, seed=4)  # random prompts, gates in [0.5, 1.5)
    return base, stock, hf.accelerate_peft(copy.deepcopy(stock))


@pytest.mark.parametrize("kind", [None, "left", "right"])
def test_logits_and_gradients_equal_stock_peft(kind, peft_float64_softmax):  # noqa: F811
    base, stock, fast = stock_and_accelerated()
    x = tokens(B, N)
    mask = torch.ones(B, N, dtype=torch.long) if kind is None else padding(kind)
    real = mask.bool()
    expected, got = logits(stock, x, attention_mask=mask), logits(fast, x, attention_mask=mask)
    assert (expected[real] - logits(base, x, attention_mask=mask)[real]).abs().max() > 1e-2  # the adapter is live
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-10)
    stock_grads, fast_grads = grads(stock, x, mask), grads(fast, x, mask)
    assert set(fast_grads) == set(stock_grads) and len(fast_grads) == 2 * L
    for name, g in fast_grads.items():
        assert g.abs().max() > 0
        torch.testing.assert_close(g, stock_grads[name], rtol=0, atol=1e-10)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generation_equals_stock_peft(cache, peft_float64_softmax):  # noqa: F811
    _, stock, fast = stock_and_accelerated()
    x = tokens(B, N)
    args = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=padding("left"))
    if cache == "static":
        args["cache_implementation"] = "static"
    got = fast.generate(input_ids=x, **args)
    assert got.shape == (B, N + 6)
    assert torch.equal(got, stock.generate(input_ids=x, **args))


def test_stock_peft_differs_only_by_its_float32_softmax():
    """Without the fixture, stock PEFT rounds the prompt softmax to float32: 4.3e-8 away here, far above float64
    rounding (~1e-15)."""
    _, stock, fast = stock_and_accelerated()
    x = tokens(B, N)
    diff = (logits(fast, x) - logits(stock, x)).abs().max()
    assert 1e-10 < diff < 1e-6


def test_peft_parameters_state_dict_and_checkpoints_unchanged(tmp_path, peft_float64_softmax):  # noqa: F811
    base, stock, fast = stock_and_accelerated()
    assert [(n, p.shape, p.requires_grad) for n, p in fast.named_parameters()] == [
        (n, p.shape, p.requires_grad) for n, p in stock.named_parameters()
    ]
    stock.save_pretrained(tmp_path / "stock")
    fast.save_pretrained(tmp_path / "fast")
    from safetensors.torch import load_file

    saved_stock = load_file(tmp_path / "stock" / WEIGHTS_FILE)
    saved_fast = load_file(tmp_path / "fast" / WEIGHTS_FILE)
    assert saved_fast.keys() == saved_stock.keys() and len(saved_fast) == 2 * L
    assert all(torch.equal(saved_fast[k], saved_stock[k]) for k in saved_fast)

    loaded = hf.accelerate_peft(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fast").eval())
    x = tokens(B, N)
    torch.testing.assert_close(logits(loaded, x), logits(stock, x), rtol=0, atol=1e-10)


def test_disabling_and_switching_back_to_sdpa_stay_correct(peft_float64_softmax):  # noqa: F811
    base, stock, fast = stock_and_accelerated()
    x = tokens(B, N)
    with fast.disable_adapter():
        torch.testing.assert_close(logits(fast, x), logits(base, x), rtol=0, atol=1e-10)
    expected = logits(stock, x)
    torch.testing.assert_close(logits(fast, x), expected, rtol=0, atol=1e-10)
    fast.get_base_model().set_attn_implementation("sdpa")  # the adapted modules fall back to PEFT's forward
    torch.testing.assert_close(logits(fast, x), expected, rtol=0, atol=1e-10)


def test_padded_training_and_generate_launch_only_our_kernels(monkeypatch):
    _, stock, fast = stock_and_accelerated(torch.float32)
    x, mask = tokens(B, N), padding("right")
    set_attention_backend("reference")
    expected_grads = grads(fast, x, mask)
    args = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, attention_mask=padding("left"))
    expected_tokens = fast.generate(input_ids=x, **args)
    set_attention_backend("triton")
    counter = KernelCounter(monkeypatch)
    got = grads(fast, x, mask)
    assert counter.calls == ["cu_seqlens"] * 3 and counter.launches == {"forward": 3, "backward": 2}
    assert counter.prompts == [False, True, True]  # PEFT's prompts go into the op, not beside it
    for name, g in got.items():
        torch.testing.assert_close(g, expected_grads[name], rtol=1e-4, atol=1e-6)
    assert torch.equal(fast.generate(input_ids=x, **args), expected_tokens)
    assert "forward" in counter.launches and counter.launches["decode"] == 2 + 3 * 2


def test_refuses_what_is_not_an_adaption_prompt_model():
    with pytest.raises(TypeError, match="AdaptionPromptConfig"):
        hf.accelerate_peft(tiny_base())
    lora = get_peft_model(tiny_base(), LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="AdaptionPromptConfig"):
        hf.accelerate_peft(lora)
