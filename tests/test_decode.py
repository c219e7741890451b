"""Split-KV decode kernel (kernels/decode.py) against the float64 reference, FlashAttention's rule.

The kernel's max error against the reference run on float64 copies must be at most twice the error of
the reference itself run in the kernel's dtype. Runs under the interpreter on the CPU (conftest).
Every launcher output (o and the split partials) starts as NaN here (`POISON_OUTPUTS`), so an element a kernel
forgets to write, or the merge reads unwritten, shows up.
"""

import math

import pytest
import torch

from llama_adapter.attention import check_inputs
from llama_adapter.kernels import _common
from llama_adapter.kernels.decode import _split_granule, choose_splits, decode_attention
from llama_adapter.reference import adapter_attention as reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name: (B, Hq, Hkv, Nq, Nk, D, Ka or None, per-sample prompt, kv_lens or None, causal, num_splits)
CASES = {
    "mha_nq1": (2, 2, 2, 1, 77, 32, 10, False, None, True, None),
    "gqa_nq5_splits": (2, 4, 2, 5, 150, 64, 3, False, None, True, 4),
    "mqa_ragged_lens_per_sample": (3, 4, 1, 5, 130, 32, 1, True, [130, 9, 3], True, 3),
    "long_prompt_noncausal_lens": (2, 2, 2, 1, 45, 16, 70, False, [45, 20], False, 2),
    "no_prompt": (2, 4, 2, 5, 99, 32, None, False, [60, 99], True, 2),
    "rows_over_one_block": (1, 16, 1, 5, 40, 16, 10, True, None, True, None),
}


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def make_inputs(case, dtype, *, seed=0):
    B, Hq, Hkv, Nq, Nk, D, Ka, per_sample, lens, causal, _ = case
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    # q as the model makes it, (B, Nq, Hq, D) transposed; k, v a slice of a longer preallocated cache
    q = randn(B, Nq, Hq, D).transpose(1, 2)
    cache_k, cache_v = randn(B, Hkv, Nk + 37, D), randn(B, Hkv, Nk + 37, D)
    k, v = cache_k[:, :, :Nk], cache_v[:, :, :Nk]
    ak = av = gate = None
    if Ka is not None:
        prompt_shape = (B, Hkv, Ka, D) if per_sample else (Hkv, Ka, D)
        ak, av = randn(*prompt_shape), randn(*prompt_shape)
        gate = randn(B, Hq) if per_sample else randn(Hq)
    kv_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=DEVICE)

    def cast(t, dt):
        return None if t is None else t.to(device=DEVICE, dtype=dt)

    low = [cast(t, dtype) for t in (q, k, v, ak, av)] + [cast(gate, torch.float32)]  # gates stay fp32, as in the model
    high = [cast(t, torch.float64) for t in (q, k, v, ak, av, gate)]
    return low, high, dict(causal=causal, kv_lens=kv_lens)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_against_reference(case, dtype, num_splits):
    low, high, kw = make_inputs(case, dtype)
    scale = check_inputs(*low, **kw)
    truth = reference(*high, sm_scale=scale, **kw)
    same_dtype = reference(*low, sm_scale=scale, **kw)
    out = torch.full_like(low[0], float("nan"), memory_format=torch.contiguous_format)  # poison
    got = decode_attention(*low, sm_scale=scale, num_splits=num_splits, out=out, **kw)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype and got.shape == low[0].shape
    assert torch.isfinite(got).all(), "unwritten or NaN output elements"
    err, ref_err = max_err(got, truth), max_err(same_dtype, truth)
    assert err <= 2 * ref_err, f"kernel error {err:.3e} > 2x reference error {ref_err:.3e} ({dtype})"
    return got, truth


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)], ids=str
)
@pytest.mark.parametrize("name", list(CASES))
def test_decode_matches_reference(name, dtype):
    case = CASES[name]
    check_against_reference(case, dtype, case[-1])


def test_cases_cover_several_splits_and_row_blocks():
    # the parity test above only means something if these paths really run
    granule = _split_granule()
    B, Hq, Hkv, Nq, Nk, *_, num_splits = CASES["gqa_nq5_splits"]
    assert choose_splits(Nk, B * Hkv, 1, granule, num_splits)[0] >= 3
    B, Hq, Hkv, Nq, Nk, *_, num_splits = CASES["mqa_ragged_lens_per_sample"]
    splits, chunk = choose_splits(Nk, B * Hkv, 1, granule, num_splits)
    assert splits >= 3 and chunk < 130 and 9 < chunk  # the short rows hold keys in the first split only
    assert CASES["rows_over_one_block"][1] // CASES["rows_over_one_block"][2] * 5 > 64  # two 64-row tiles


def test_rows_without_visible_keys_get_the_prompt_term_only():
    # kv_lens[b] = 0 and rows i < Nq - len_b see no word key: O_w = 0 there, not NaN
    case = (2, 2, 1, 4, 33, 16, 3, False, [0, 2], True, 2)
    got, _ = check_against_reference(case, torch.float32, 2)
    q, k, v, ak, av, gate = make_inputs(case, torch.float32)[0]
    prompt_only = reference(q, k, torch.zeros_like(v), ak, av, gate)  # zero values: O_w = 0 in every row
    torch.testing.assert_close(got[0], prompt_only[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1, :, :2], prompt_only[1, :, :2], rtol=1e-5, atol=1e-6)


def test_split_count_does_not_change_the_result():
    case = CASES["gqa_nq5_splits"]
    low, _, kw = make_inputs(case, torch.float32)
    one = decode_attention(*low, num_splits=1, **kw)
    many = decode_attention(*low, num_splits=5, **kw)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-6)


def test_split_heuristic():
    # a long cache with few programs fills about two waves of SMs, in whole blocks of keys
    assert choose_splits(4096, 8, 132, 128) == (32, 128)
    assert choose_splits(4096, 1, 108, 128) == (32, 128)  # capped by the number of key blocks
    assert choose_splits(4096, 512, 132, 128) == (1, 4096)  # enough programs already
    assert choose_splits(100, 1, 1, 32) == (2, 64)
    splits, chunk = choose_splits(1000, 2, 132, 64)
    assert chunk % 64 == 0 and (splits - 1) * chunk < 1000 <= splits * chunk
    with pytest.raises(ValueError, match="num_splits"):
        choose_splits(100, 1, 1, 32, num_splits=0)


def test_rejects_float64_and_bad_out():
    low, high, kw = make_inputs(CASES["mha_nq1"], torch.float32)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        decode_attention(*high, **kw)
    with pytest.raises(ValueError, match="out must be"):
        decode_attention(*low, out=torch.empty(1, device=DEVICE), **kw)


def test_default_scale_is_inverse_sqrt_head_dim():
    low, _, kw = make_inputs(CASES["mha_nq1"], torch.float32)
    D = low[0].shape[-1]
    torch.testing.assert_close(decode_attention(*low, **kw), decode_attention(*low, sm_scale=1 / math.sqrt(D), **kw))


def test_every_launcher_buffer_is_a_poisoned_output(monkeypatch):
    # out (when not given) and both partial buffers come from _common.new_output, so the poisoning covers them;
    # the merge then reads only split slots the split kernel wrote (a NaN read would reach o)
    case = CASES["mqa_ragged_lens_per_sample"]
    low, high, kw = make_inputs(case, torch.float32)
    made = []

    def recording(shape, dtype, device):
        made.append((tuple(shape), dtype))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_common, "new_output", recording)
    got = decode_attention(*low, num_splits=case[-1], **kw)
    B, Hq, Hkv, Nq, Nk, D = case[:6]
    splits, _ = choose_splits(Nk, B * Hkv, 1, _split_granule(), case[-1])
    rows = 64  # Hq / Hkv * Nq = 20 packed rows: one 64-row tile (`_block_m`)
    part = (B * Hkv, splits, rows)
    assert made == [((B, Hq, Nq, D), torch.float32), ((*part, D), torch.float32), (part, torch.float32)]
    assert torch.isfinite(got).all()
    truth = reference(*high, **kw)
    assert max_err(got, truth) <= 2 * max_err(reference(*low, **kw), truth)
