"""The forward launcher's own paths against float64: the prompt's one-pass softmax (Ka within one tile) and its
two-pass form (Ka across tiles), k/v through TMA tensor descriptors and through pointers, and the saved
log-sum-exps (lse_w, lse_a in log2 units, which the backward reads).

Rule (FlashAttention's): max |kernel o - float64| <= 2x max |reference.py in the same dtype - float64|, plus the
floor of tests/test_kernels.py. Outputs start as NaN (poisoned). Under the interpreter the prompt block is 16
wide, so Ka = 10 is one tile and Ka = 37 three.
"""

import math

import pytest
import torch
from test_kernels import _poisoned_outputs, make_inputs, run_reference  # noqa: F401 (autouse fixture)

from llama_adapter.kernels import _common, attention_fwd
from llama_adapter.kernels.attention_fwd import adapter_attention_fwd

LOG2E = 1 / math.log(2)


def exact_lse(inputs, *, causal, kv_lens):
    """(lse_w, lse_a) in float64, log2 units; +inf for a row that sees no word key."""
    q, k, ak = (inputs[n].double() if inputs[n] is not None else None for n in ("q", "k", "adapter_k"))
    B, Hq, Nq, D = q.shape
    group = Hq // k.shape[1]
    scale = 1 / math.sqrt(D)
    s = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(group, 1)) * scale
    lens = kv_lens.tolist() if kv_lens is not None else [k.shape[2]] * B
    i = torch.arange(Nq)[:, None]
    j = torch.arange(k.shape[2])[None, :]
    for b, L in enumerate(lens):
        hidden = ((j >= L) | ((j > i + L - Nq) & causal)).expand(Nq, -1)
        s[b, :, hidden] = -math.inf
    lse_w = torch.logsumexp(s, -1) * LOG2E
    lse_w[torch.isneginf(lse_w)] = math.inf
    if ak is None:
        return lse_w, None
    ak = ak if ak.dim() == 4 else ak.expand(B, *ak.shape)
    s_a = torch.einsum("bhid,bhjd->bhij", q, ak.repeat_interleave(group, 1)) * scale
    return lse_w, torch.logsumexp(s_a, -1) * LOG2E


def check_forward(inputs, *, causal, kv_lens, config, k_v=None, **packed):
    """Run the forward launcher (optionally on other k / v tensors `k_v`) and check o by the 2x rule and the
    lse's against float64. lse tolerance: the scores' fp32 accumulation over D terms of fp16 / fp32 products,
    about 1e-6 of the largest |score| contribution in log2 units, taken generously as 1e-5 (fp32) and 1e-4
    (fp16) times (1 + |lse|)."""
    do = torch.zeros_like(inputs["q"])
    scale = 1 / math.sqrt(inputs["q"].shape[-1])
    run_in = dict(inputs, **(k_v or {}))
    o, lse_w, lse_a = adapter_attention_fwd(
        **run_in, causal=causal, sm_scale=scale, kv_lens=kv_lens, config=config, **packed
    )
    exact = run_reference(inputs, do, causal=causal, kv_lens=kv_lens, cast=torch.float64, **packed)[0]
    same = run_reference(inputs, do, causal=causal, kv_lens=kv_lens, **packed)[0]
    assert o.dtype == inputs["q"].dtype and torch.isfinite(o).all()
    err = (o.double() - exact).abs().max().item()
    ref_err = (same.double() - exact).abs().max().item()
    value = exact.abs().max().item()
    floor = 1e-6 * value if o.dtype == torch.float32 else 0.5 * torch.finfo(o.dtype).eps * value
    assert err <= 2 * ref_err + floor, f"o: kernel err {err:.3g} > 2 x torch err {ref_err:.3g}"
    if packed:
        return lse_w, lse_a
    want_w, want_a = exact_lse(inputs, causal=causal, kv_lens=kv_lens)
    rel = 1e-5 if o.dtype == torch.float32 else 1e-4
    for name, got, want in (("lse_w", lse_w, want_w), ("lse_a", lse_a, want_a)):
        if want is None:
            assert got is None
            continue
        assert torch.equal(torch.isinf(got), torch.isinf(want)), name
        finite = torch.isfinite(want)
        gap = (got.double()[finite] - want[finite]).abs() / (1 + want[finite].abs())
        assert gap.max().item() <= rel, f"{name}: {gap.max().item():.3g}"
    return lse_w, lse_a


# (id, make_inputs kwargs, causal); lengths avoid block multiples, Ka covers one tile, a single key, three tiles.
CASES = [
    ("causal-ka10", dict(Nq=37, Nk=37, Ka=10), True),
    ("causal-ka1-gqa", dict(B=2, Hq=4, Hkv=2, Nq=21, Nk=35, D=32, Ka=1), True),
    ("causal-ka37-three-tiles", dict(Nq=29, Nk=45, Ka=37), True),
    ("noncausal-ka37-per-sample-mqa", dict(B=2, Hq=4, Hkv=1, Nq=19, Nk=41, Ka=37, per_sample=True), False),
    ("causal-kvlens-empty-row", dict(B=2, Hq=2, Hkv=1, Nq=40, Nk=13, Ka=3, kv_lens=[13, 0]), True),
    ("noncausal-kvlens-ka10", dict(B=2, Nq=30, Nk=50, Ka=10, kv_lens=[50, 22], gate_per_sample=True), False),
    ("causal-no-prompt", dict(Nq=33, Nk=47, Ka=0), True),
]
# The two device paths: sm80 (pointer loads, prompt after the key loop) and sm90 (TMA, prompt before it).
PATHS = {"sm80-path": dict(KV_TMA=False, PROMPT_FIRST=False), "sm90-path": dict(KV_TMA=True, PROMPT_FIRST=True)}
DEVICE_PATHS = pytest.mark.parametrize("path", list(PATHS.values()), ids=list(PATHS))


@DEVICE_PATHS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kwargs,causal", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forward_matches_float64(kwargs, causal, dtype, path):
    inputs, _, kv_lens = make_inputs(**kwargs, dtype=dtype)
    config = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, **path)
    check_forward(inputs, causal=causal, kv_lens=kv_lens, config=config)


@DEVICE_PATHS
@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32)], ids=["tall", "wide"])
def test_forward_unequal_blocks(block_m, block_n, path):
    inputs, _, kv_lens = make_inputs(B=2, Hq=2, Hkv=1, Nq=45, Nk=61, Ka=20, kv_lens=[61, 30], seed=3)
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1, **path)
    check_forward(inputs, causal=True, kv_lens=kv_lens, config=config)


@DEVICE_PATHS
def test_keys_past_kv_lens_are_never_read(path):
    # A KV cache past kv_lens may hold anything; the descriptor path reads those rows (they lie inside the
    # tensor) and must keep them out of the output: NaN there must not reach o.
    inputs, _, kv_lens = make_inputs(B=2, Hq=4, Hkv=2, Nq=7, Nk=53, D=32, Ka=10, kv_lens=[53, 19], seed=5)
    k, v = inputs["k"].clone(), inputs["v"].clone()
    k[1, :, 19:] = float("nan")
    v[1, :, 19:] = float("nan")
    config = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, **path)
    for causal in (True, False):
        check_forward(inputs, causal=causal, kv_lens=kv_lens, config=config, k_v=dict(k=k, v=v))


@DEVICE_PATHS
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("ka", [10, 37], ids=["ka10", "ka37"])
def test_varlen_forward(causal, ka, path):
    # Three packed sequences (lengths 20, 1, 26): each attends only within itself; the descriptor reads the next
    # sequence's rows in its last tile, which must not leak in.
    inputs, _, _ = make_inputs(B=1, Hq=4, Hkv=2, Nq=47, Nk=47, Ka=ka, seed=11)
    cu = torch.tensor([0, 20, 21, 47], dtype=torch.int32)
    config = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, **path)
    check_forward(inputs, causal=causal, kv_lens=None, config=config, cu_seqlens=cu, max_seqlen=26)


def test_autotuned_launch_matches_forced_pointer_path():
    # The launcher's own choice under the interpreter (the sm80 path) agrees bit for bit with config's.
    inputs, _, _ = make_inputs(Nq=37, Nk=37, Ka=10, dtype=torch.float16, seed=2)
    scale = 1 / math.sqrt(16)
    auto = adapter_attention_fwd(**inputs, sm_scale=scale)
    config = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, **PATHS["sm80-path"])
    forced = adapter_attention_fwd(**inputs, sm_scale=scale, config=config)
    for a, b in zip(auto, forced):
        assert torch.equal(a, b)


def test_smem_estimate_admits_128x128_s3_on_sm90():
    # triton 3.6's and 3.9's `shared` for sm90 bf16 D = 128 (kernel_report): 128x128 s3 230,400, 128x64 s3 132,096
    assert attention_fwd.fwd_smem_bytes(128, 128, 128, 3) == 230_400 <= _common.SMEM_BYTES[90]
    assert attention_fwd.fwd_smem_bytes(128, 64, 128, 3) == 132_096
    # and no table entry is dead weight: each fits its chip by the same estimate
    tables, estimate = attention_fwd.FWD_CONFIGS, attention_fwd.fwd_smem_bytes
    for arch, by_dim in tables.items():
        for head_dim, table in by_dim.items():
            assert _common.fitting_configs(tables, head_dim, arch, estimate) == table, (arch, head_dim)


def test_tma_only_for_layouts_the_copy_engine_reads():
    k = torch.zeros(2, 4, 37, 64, dtype=torch.bfloat16)
    assert attention_fwd._tma_ready(k)
    assert attention_fwd._tma_ready(k[:, :, :20])  # a KV cache filled to 20 of 37 rows
    assert attention_fwd._tma_ready(torch.zeros(2, 37, 4, 64, dtype=torch.float16).transpose(1, 2))  # (B, N, H, D)
    assert not attention_fwd._tma_ready(k.float())  # 4-byte elements: pointer path
    assert not attention_fwd._tma_ready(k[..., ::2])  # last stride 2
    assert not attention_fwd._tma_ready(k[:, :1].expand(2, 4, 37, 64))  # stride 0 (broadcast heads)
    assert not attention_fwd._tma_ready(torch.zeros(2, 4, 37, 12, dtype=torch.bfloat16))  # 24-byte rows
