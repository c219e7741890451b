"""The transformers drop-in on padded batches, packed rows and cached decoding: the fused op's varlen and kv_lens
paths, equal to PEFT's AdaptionPrompt (float64, reference backend) and launching only our kernels (Triton backend
under TRITON_INTERPRET=1)."""

import copy
from collections import Counter

import pytest
import torch

pytest.importorskip("peft")
from test_hf_dropin import (  # noqa: E402
    K,
    L,
    adapted,
    logits,
    peft_float64_softmax,  # noqa: F401  (fixture)
    peft_twin,
    tiny_base,
    tokens,
)
from transformers import MistralConfig, MistralForCausalLM  # noqa: E402

from llama_adapter import (  # noqa: E402
    AdapterConfig,  # noqa: E402
    hf,
    hf_layout,
    ops,
)
from llama_adapter.attention import set_attention_backend  # noqa: E402

B, N = 3, 9


def padding(kind: str) -> torch.Tensor:
    """(B, N) attention masks: each row a different number of pads, placed as the kind says."""
    mask = torch.ones(B, N, dtype=torch.long)
    if kind == "left":
        mask[0, :3], mask[2, :1] = 0, 0
    elif kind == "right":
        mask[0, -3:], mask[2, -1:] = 0, 0
    else:  # holes: not a prefix/suffix pattern; unpadding keeps each row's tokens in order, as SDPA's mask does
        mask[0, 2:4], mask[2, [0, 5, 8]] = 0, 0
    return mask


def grads(model, x, mask):
    """Adapter gradients of the LM loss with labels -100 on pads (the HF collators' convention). A token after a pad
    between two tokens is masked too: the shifted loss would predict it from that pad, whose output the drop-in
    sets to 0 (as FA2 does) where SDPA attends the tokens before it."""
    model.zero_grad()
    hole = (mask == 0) & (mask.cumsum(dim=1) > 0)  # pads after a row's first token
    after_hole = torch.zeros_like(hole)
    after_hole[:, 1:] = hole[:, :-1] & (mask[:, 1:] == 1)
    labels = x.masked_fill((mask == 0) | after_hole, -100)
    model(input_ids=x, attention_mask=mask, labels=labels).loss.backward()
    return {n.removeprefix(hf.PEFT_PREFIX): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["left", "right", "holes"])
def test_padded_batch_logits_and_gradients_equal_peft(kind, peft_float64_softmax):  # noqa: F811
    base = tiny_base()
    ours = adapted(base)
    peft = peft_twin(base, ours)
    x, mask = tokens(B, N), padding(kind)
    got, expected = logits(ours, x, attention_mask=mask), logits(peft, x, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - logits(base, x, attention_mask=mask)[real]).abs().max() > 1e-3  # the adapter is live
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-10)
    assert torch.all(torch.isfinite(got))
    ours_grads, peft_grads = grads(ours, x, mask), grads(peft, x, mask)
    assert set(ours_grads) == set(peft_grads) and len(ours_grads) == 2 * L
    for name, g in ours_grads.items():
        assert g.abs().max() > 0
        torch.testing.assert_close(g, peft_grads[name], rtol=0, atol=1e-10)


def test_padded_row_equals_the_row_alone(peft_float64_softmax):  # noqa: F811
    """Unpadding must not let rows see each other: a left-padded row gives what it gives unpadded."""
    ours = adapted(tiny_base())
    x, mask = tokens(B, N), padding("left")
    got = logits(ours, x, attention_mask=mask)
    alone = logits(ours, x[:1, 3:])  # row 0 without its 3 pads (transformers' default positions restart at 0)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # what generate() passes for left padding
    shifted = logits(ours, x, attention_mask=mask, position_ids=position_ids)
    torch.testing.assert_close(shifted[0, 3:], alone[0], rtol=0, atol=1e-10)
    assert (got[0, 3:] - alone[0]).abs().max() > 1e-6  # without shifted positions RoPE differs: a real comparison


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_generation_equals_peft(cache, peft_float64_softmax):  # noqa: F811
    base = tiny_base()
    ours = adapted(base)
    peft = peft_twin(base, ours)
    x, mask = tokens(B, N), padding("left")
    args = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=mask)
    if cache == "static":
        args["cache_implementation"] = "static"
    got = ours.generate(x, **args)
    assert got.shape == (B, N + 6)
    assert torch.equal(got, peft.generate(input_ids=x, **args))
    alone = ours.generate(x[:1, 3:], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got[0, N:], alone[0, N - 3 :])  # padding changes nothing for the padded row


def test_packed_rows_equal_separate_sequences(monkeypatch):
    """position_ids restarting at each sequence (padding-free packing) take the varlen kernel, no cross-talk."""
    ours = adapted(tiny_base())
    lengths = (4, 2, 5)
    seqs = [tokens(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(seqs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    got = logits(ours, packed, position_ids=position_ids, use_cache=False)
    expected = torch.cat([logits(ours, s, use_cache=False) for s in seqs], dim=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    # FA2's padding-free keywords (DataCollatorWithFlattening; what torch.compile needs) pack on their own
    monkeypatch.setattr(hf_layout, "_packed_sequences", lambda *args: None)
    assert (logits(ours, packed, position_ids=position_ids, use_cache=False) - expected).abs().max() > 1e-3
    cu = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5, position_ids=position_ids)
    torch.testing.assert_close(logits(ours, packed, use_cache=False, **kwargs), expected, rtol=0, atol=1e-10)
    # the keywords are checked (a device sync) once per forward, not per layer; q and k may be separate tensors (a
    # Trainer moves each batch entry to the device on its own), max_length_q may be left out
    checks = Counter()
    equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: checks.update(["equal"]) or equal(a, b))
    for _ in range(2):
        kwargs.update(cu_seq_lens_q=cu.clone(), cu_seq_lens_k=cu.clone(), max_length_q=None)
        torch.testing.assert_close(logits(ours, packed, use_cache=False, **kwargs), expected, rtol=0, atol=1e-10)
    assert checks["equal"] == 2
    # ... and afresh each forward: a buffer refilled in place with another packing (lengths 2, 4, 5) is read anew
    cu_buffer = cu.long()  # int64, as a collator gives it: the op gets an int32 copy
    logits(ours, packed, use_cache=False, **{**kwargs, "cu_seq_lens_q": cu_buffer, "cu_seq_lens_k": cu_buffer})
    cu_buffer.copy_(torch.tensor([0, 2, 6, 11]))
    position_ids = torch.cat([torch.arange(n) for n in (2, 4, 5)])[None]
    expected = torch.cat([logits(ours, packed[:, a:b], use_cache=False) for a, b in [(0, 2), (2, 6), (6, 11)]], dim=1)
    kwargs.update(cu_seq_lens_q=cu_buffer, cu_seq_lens_k=cu_buffer, position_ids=position_ids)
    torch.testing.assert_close(logits(ours, packed, use_cache=False, **kwargs), expected, rtol=0, atol=1e-10)
    kwargs.update(cu_seq_lens_k=torch.tensor([0, 4, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seq_lens_k equal to cu_seq_lens_q"):
        logits(ours, packed, use_cache=False, **kwargs)


def test_unsupported_masks_raise_clear_errors():
    ours = adapted(tiny_base())
    x = tokens(B, N)
    with pytest.raises(ValueError, match="2D padding mask"):
        logits(ours, x, attention_mask=torch.ones(B, 1, N, N, dtype=torch.bool))
    with torch.no_grad():
        cache = ours(x, use_cache=True).past_key_values
    step = tokens(B, 2, seed=5)
    mask = torch.ones(B, N + 2, dtype=torch.long)
    mask[1, -1] = 0
    with pytest.raises(ValueError, match="new tokens must not be padding"):
        logits(ours, step, attention_mask=mask, past_key_values=cache)
    for short in (torch.ones(B, 2, dtype=torch.long), mask[:, -2:]):  # the new tokens' mask only: keys unmatched
        with torch.no_grad():
            cache = ours(x, use_cache=True).past_key_values
        with pytest.raises(ValueError, match=r"attention_mask covers 2 positions, but the attention sees 11 keys"):
            logits(ours, step, attention_mask=short, past_key_values=cache)

    config = MistralConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
    )
    mistral = hf.apply_adapter(MistralForCausalLM(config).double(), AdapterConfig(adapter_len=K, adapter_layers=1))
    with pytest.raises(ValueError, match="sliding_window=4 must cover all 9 keys"):
        logits(mistral, x, use_cache=False)
    logits(mistral, x[:, :4], use_cache=False)  # a window reaching every key changes nothing: allowed


class KernelCounter:
    """Counts the Triton launchers behind llama_adapter.ops and how the drop-in called the op; SDPA is forbidden."""

    def __init__(self, monkeypatch):
        self.launches = Counter()
        self.calls = []  # per op call: "cu_seqlens", "kv_lens" or "plain"
        self.prompts = []  # per op call: whether the prompt went in with the words

        def counted(name, fn):
            def launcher(*args, **kwargs):
                self.launches[name] += 1
                return fn(*args, **kwargs)

            return launcher

        decode = counted("decode", ops._decode_launcher())
        monkeypatch.setattr(ops, "adapter_attention_fwd", counted("forward", ops.adapter_attention_fwd))
        monkeypatch.setattr(ops, "adapter_attention_bwd", counted("backward", ops.adapter_attention_bwd))
        monkeypatch.setattr(ops, "_decode_launcher", lambda: decode)

        def no_sdpa(*args, **kwargs):
            raise AssertionError("torch SDPA was called: the drop-in fell back to an unfused path")

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
        real = hf.adapter_attention

        def spy(q, k, v, **kwargs):
            modes = [m for m in ("cu_seqlens", "kv_lens") if kwargs.get(m) is not None]
            self.calls.append(modes[0] if modes else "plain")
            self.prompts.append(kwargs.get("adapter_k") is not None)
            return real(q, k, v, **kwargs)

        monkeypatch.setattr(hf, "adapter_attention", spy)
        self.plans = 0  # padding plans made: one per model forward, whatever the number of layers
        plan = hf_layout._PaddingPlan

        def counted_plan(*args):
            self.plans += 1
            return plan(*args)

        monkeypatch.setattr(hf_layout, "_PaddingPlan", counted_plan)


def test_padded_training_step_launches_only_our_kernels(monkeypatch):
    """Left padding (right padding: test_hf_accelerate_peft's launch test)."""
    ours = adapted(tiny_base(dtype=torch.float32))
    x, mask = tokens(B, N), padding("left")
    set_attention_backend("reference")
    expected = grads(ours, x, mask)
    set_attention_backend("triton")
    counter = KernelCounter(monkeypatch)
    got = grads(ours, x, mask)
    # 3 layers, each unpadded into packed sequences; the 2 adapted layers also give the pads before each row's
    # first token their prompt attention (no word keys: kv_lens = 0), as SDPA + PEFT do
    assert counter.calls == ["cu_seqlens"] + ["cu_seqlens", "kv_lens"] * 2
    # every call's forward; backward where something upstream needs a gradient: the adapted layers' calls
    assert counter.launches == Counter(forward=len(counter.calls), backward=len(counter.calls) - 1)
    assert counter.plans == 1  # the mask's unpadding indices (and their device syncs) are worked out once
    for name, g in got.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_padded_generate_launches_only_our_kernels(cache, monkeypatch):
    ours = adapted(tiny_base(dtype=torch.float32))
    x, mask = tokens(B, N), padding("left")
    new = 4
    args = dict(max_new_tokens=new, do_sample=False, pad_token_id=0, attention_mask=mask)
    if cache == "static":
        args["cache_implementation"] = "static"
    set_attention_backend("reference")
    expected = ours.generate(x, **args)
    set_attention_backend("triton")
    counter = KernelCounter(monkeypatch)
    assert torch.equal(ours.generate(x, **args), expected)
    # the prompt unpadded through the varlen forward (plus the leading pads' prompt attention in the 2 adapted
    # layers, few queries without grad: the decode kernel), then each new token through the decode kernel with
    # per-row kv_lens over the cache's real tokens
    prefill = ["cu_seqlens"] + ["cu_seqlens", "kv_lens"] * 2
    assert counter.calls == prefill + ["kv_lens"] * 3 * (new - 1)
    assert counter.launches == Counter(forward=3, decode=2 + 3 * (new - 1))
    assert counter.plans == new  # one per forward: the prefill and each decoding step


def test_static_cache_without_padding_uses_kv_lens(monkeypatch):
    ours = adapted(tiny_base(dtype=torch.float32))
    x = tokens(B, N)
    args = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
    set_attention_backend("reference")
    expected = copy.deepcopy(ours).generate(x, **args)
    set_attention_backend("triton")
    counter = KernelCounter(monkeypatch)
    assert torch.equal(ours.generate(x, **args), expected)
    assert counter.calls == ["kv_lens"] * 3 * 3  # prefill and decode read the cache's filled length, no mask
    assert counter.launches == Counter(decode=3 * 3)  # a 9-token prefill without grad is "few queries" too


def test_gradient_checkpointing_gives_the_same_gradients():
    """The Trainer's gradient checkpointing re-runs each layer in backward, with the forward's mask."""
    ours = adapted(tiny_base())
    x, mask = tokens(B, N), padding("left")
    expected = grads(ours, x, mask)
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours.train()
    assert ours.model.gradient_checkpointing
    got = grads(ours, x, mask)
    for name, g in got.items():
        torch.testing.assert_close(g, expected[name], rtol=0, atol=1e-12)
