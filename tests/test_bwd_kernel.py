"""The backward kernels' own paths: the dK/dV query loop split into masked (diagonal, last partial block) and
unmasked runs, the prompt's gradients from the dK/dV kernel's prompt programs, and their buffers.

Numerics by FlashAttention's rule against float64 (the helpers of test_kernels.py), under the interpreter.
"""

import math

import pytest
import torch
from test_kernels import _poisoned_outputs, assert_flash_rule, make_inputs, run_launchers  # noqa: F401 (autouse)

from llama_adapter.kernels import _common, attention_bwd
from llama_adapter.kernels.attention_fwd import adapter_attention_fwd

# (id, make_inputs kwargs, causal, BLOCK_M, BLOCK_N). The interpreter's prompt tile is 16 keys.
CASES = [
    # Nq a multiple of BLOCK_M: no partial last block, every non-diagonal block unmasked
    ("no-partial-block-noncausal", dict(Nq=32, Nk=48, Ka=10), False, 16, 16),
    # diagonal blocks, then an unmasked run, then the partial last block (masked again)
    ("diagonal-run-tail", dict(B=2, Nq=53, Nk=53, Ka=5), True, 16, 32),
    # a query block taller than the key tile: one diagonal block per key tile, tail after it
    ("tall-query-blocks-gqa", dict(B=2, Hq=4, Hkv=2, Nq=45, Nk=61, Ka=10, kv_lens=[61, 30]), True, 32, 16),
    # three prompt tiles (40 keys), one prompt and gate per sample
    (
        "three-prompt-tiles-per-sample",
        dict(B=2, Hq=2, Hkv=1, Nq=21, Nk=21, Ka=40, per_sample=True, gate_per_sample=True),
        True,
        16,
        16,
    ),
    # Nq > Nk (bottom-right causal): the first query rows see no key at all
    ("more-queries-than-keys", dict(Nq=40, Nk=13, Ka=3, kv_lens=[9]), True, 16, 16),
]


@pytest.mark.parametrize("kwargs,causal,block_m,block_n", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_gradients_match_float64(kwargs, causal, block_m, block_n):
    inputs, do, kv_lens = make_inputs(**kwargs, seed=7)
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1)
    got = run_launchers(inputs, do, causal=causal, kv_lens=kv_lens, config=config)
    assert_flash_rule(got, inputs, do, causal=causal, kv_lens=kv_lens)


def test_prompt_gradient_buffers_are_one_slot_per_sequence_and_kv_head(monkeypatch):
    """With fp16 inputs the only fp32 (.., .., .., D) buffers are the prompt's (B, Hkv, Ka, D) slots: no per-query-block
    partials (which grew with Nq)."""
    inputs, do, _ = make_inputs(B=3, Hq=4, Hkv=2, Nq=50, Nk=50, Ka=10, dtype=torch.float16, seed=8)
    scale = 1 / math.sqrt(do.shape[-1])
    o, lse_w, lse_a = adapter_attention_fwd(**inputs, causal=True, sm_scale=scale)
    made = []

    def recording(shape, dtype, device):
        made.append((tuple(shape), dtype))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_common, "new_output", recording)
    grads = attention_bwd.adapter_attention_bwd(do, *inputs.values(), o, lse_w, lse_a, causal=True, sm_scale=scale)
    prompt_buffers = [shape for shape, dtype in made if dtype == torch.float32 and len(shape) == 4]
    assert prompt_buffers == [(3, 2, 10, 16)] * 2
    assert grads[3].shape == inputs["adapter_k"].shape and torch.isfinite(grads[3]).all()


def test_out_of_range_kv_lens_act_clamped():
    """kv_lens is not checked on a GPU (that needs a sync): values past Nk or below 0 act as Nk and 0."""
    inputs, do, _ = make_inputs(B=3, Hq=2, Hkv=1, Nq=20, Nk=29, Ka=10, seed=9)
    config = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    wild = run_launchers(
        inputs, do, causal=False, kv_lens=torch.tensor([1000, -5, 17], dtype=torch.int32), config=config
    )
    clamped = run_launchers(
        inputs, do, causal=False, kv_lens=torch.tensor([29, 0, 17], dtype=torch.int32), config=config
    )
    for a, b in zip(wild, clamped):
        assert torch.equal(a, b)
