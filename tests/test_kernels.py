"""Fused forward/backward kernels against the float64 reference (FlashAttention's rule), on odd shapes.

On the CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); shapes stay tiny and the
interpreter config is 16 x 16 blocks, so lengths like 37 or 53 cross several blocks and end mid-block.
Every launcher output starts as NaN here (`POISON_OUTPUTS`), so an element a kernel forgets shows up.

Rule: max |kernel - float64| <= 2x (output) or 3x (gradients) max |reference.py in the same dtype - float64|,
plus a floor: for fp32 1e-6 x the value's scale (torch's fp32 einsums over a handful of terms can be almost
exact while the kernel's online-softmax rescaling and exp2 add a few ulps), for fp16 half an ulp at that
scale (the rounding any fp16 result of that size has; reference.py computes in fp32 and can round luckily).
"""

import functools
import math

import pytest
import torch

from llama_adapter import adapter_attention, set_attention_backend
from llama_adapter.kernels import _common
from llama_adapter.kernels.attention_bwd import adapter_attention_bwd
from llama_adapter.kernels.attention_fwd import adapter_attention_fwd
from llama_adapter.reference import adapter_attention as reference

NAMES = ("o", "dq", "dk", "dv", "dadapter_k", "dadapter_v", "dgate")


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def make_inputs(
    B=1,
    Hq=2,
    Hkv=2,
    Nq=37,
    Nk=37,
    D=16,
    Ka=10,
    dtype=torch.float32,
    per_sample=False,
    gate_per_sample=False,
    kv_lens=None,
    strided=False,
    seed=0,
):
    """Random inputs (gate fp32, as the model keeps it); `strided` gives every tensor non-unit, non-packed strides."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dt=dtype):
        if strided:  # a (…, 2D) buffer's every other element, heads/tokens swapped like a (B, N, H, D) layout
            full = torch.randn(*shape[:-3], shape[-2], shape[-3], 2 * shape[-1], generator=gen, dtype=dt)
            return full.transpose(-3, -2)[..., ::2]
        return torch.randn(*shape, generator=gen, dtype=dt)

    prompt_shape = (B, Hkv, Ka, D) if per_sample else (Hkv, Ka, D)
    inputs = dict(
        q=randn(B, Hq, Nq, D),
        k=randn(B, Hkv, Nk, D),
        v=randn(B, Hkv, Nk, D),
        adapter_k=randn(*prompt_shape) if Ka else None,
        adapter_v=randn(*prompt_shape) if Ka else None,
        gate=torch.randn((B, Hq) if gate_per_sample else (Hq,), generator=gen) if Ka else None,
    )
    if strided:
        assert not inputs["q"].is_contiguous()
    do = torch.randn(B, Hq, Nq, D, generator=gen, dtype=dtype)
    lens = None if kv_lens is None else torch.tensor(kv_lens, dtype=torch.int32)
    return inputs, do, lens


def run_reference(inputs, do, *, causal, kv_lens, cast=None, **packed):
    """reference.py on (optionally cast) copies: (output, *grads of the given inputs). `packed`: cu_seqlens."""
    leaves = {
        n: (t.to(cast) if cast is not None else t.clone()).requires_grad_() if t is not None else None
        for n, t in inputs.items()
    }
    out = reference(**leaves, causal=causal, sm_scale=1 / math.sqrt(do.shape[-1]), kv_lens=kv_lens, **packed)
    out.backward(do.to(out.dtype))
    return [out] + [t.grad for t in leaves.values() if t is not None]


def run_op(inputs, do, *, causal, kv_lens, **packed):
    """The public op on the triton backend (custom op + autograd). `packed`: cu_seqlens, max_seqlen."""
    set_attention_backend("triton")
    leaves = {n: t.clone().requires_grad_() if t is not None else None for n, t in inputs.items()}
    out = adapter_attention(**leaves, causal=causal, kv_lens=kv_lens, **packed)
    out.backward(do)
    return [out] + [t.grad for t in leaves.values() if t is not None]


def run_launchers(inputs, do, *, causal, kv_lens, config=None):
    """The launchers directly (lets a test pick the block shapes)."""
    scale = 1 / math.sqrt(do.shape[-1])
    o, lse_w, lse_a = adapter_attention_fwd(**inputs, causal=causal, sm_scale=scale, kv_lens=kv_lens, config=config)
    grads = adapter_attention_bwd(
        do, *inputs.values(), o, lse_w, lse_a, causal=causal, sm_scale=scale, kv_lens=kv_lens, config=config
    )
    return [o] + [g for g in grads if g is not None]


def assert_flash_rule(got, inputs, do, *, causal, kv_lens, floors=None, **packed):
    """`floors` overrides the absolute floor per name (for values that are zero in math, see below); `packed`:
    cu_seqlens for packed sequences."""
    exact = run_reference(inputs, do, causal=causal, kv_lens=kv_lens, cast=torch.float64, **packed)
    same_dtype = run_reference(inputs, do, causal=causal, kv_lens=kv_lens, **packed)
    assert len(got) == len(exact)
    for i, (name, g, ref_lo, ref64) in enumerate(zip(NAMES, got, same_dtype, exact)):
        assert g.shape == ref64.shape and g.dtype == ref_lo.dtype, (name, g.shape, g.dtype)
        assert torch.isfinite(g).all(), f"{name}: NaN/inf (unwritten or overflowed elements)"
        scale = ref64.abs().max().item()
        floor = 1e-6 * scale if g.dtype == torch.float32 else 0.5 * torch.finfo(g.dtype).eps * scale
        floor = (floors or {}).get(name, floor)
        err = (g.double() - ref64).abs().max().item()
        ref_err = (ref_lo.double() - ref64).abs().max().item()
        factor = 2 if i == 0 else 3
        assert err <= factor * ref_err + floor, f"{name}: kernel err {err:.3g} > {factor} x torch err {ref_err:.3g}"


# (case id, make_inputs kwargs, causal). Lengths avoid multiples of any block; Ka = 20 > the 16-wide prompt block.
CASES = [
    ("causal-37", dict(Nq=37, Nk=37), True),
    ("chunked-prefill-gqa-kvlens", dict(B=2, Hq=4, Hkv=2, Nq=5, Nk=53, D=32, Ka=20, kv_lens=[53, 20]), True),
    ("decode-1x29", dict(Nq=1, Nk=29, Ka=3), True),
    ("nq-gt-nk-mqa-empty-row", dict(B=2, Hq=4, Hkv=1, Nq=40, Nk=13, Ka=3, kv_lens=[13, 0], gate_per_sample=True), True),
    ("noncausal-no-prompt", dict(Nq=37, Nk=53, Ka=0), False),
    ("noncausal-kvlens-per-sample", dict(B=2, Nq=30, Nk=50, Ka=5, kv_lens=[50, 22], per_sample=True), False),
    ("strided-gqa", dict(B=2, Hq=4, Hkv=2, Nq=21, Nk=35, D=32, Ka=2, strided=True), True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kwargs,causal", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forward_and_gradients_match_float64(kwargs, causal, dtype):
    inputs, do, kv_lens = make_inputs(**kwargs, dtype=dtype)
    got = run_op(inputs, do, causal=causal, kv_lens=kv_lens)
    assert_flash_rule(got, inputs, do, causal=causal, kv_lens=kv_lens)


def test_single_query_single_key_fp32():
    # fp32 only: with one key the word softmax has zero gradient exactly, reference.py (fp32 inside) gets dq = dk = 0
    # bit for bit, while the kernel's D_w uses the fp16-rounded output (as FlashAttention's does), so in fp16 the
    # 2x rule would compare 1e-3 with 0. decode-1x29 covers a single fp16 query.
    # The same holds in fp32 for dq, dk and d(adapter_k) (one prompt key too): their floor is 1e-6 of the size of
    # the terms that cancel, s |do| |v| |k| (1 + |g|), instead of 1e-6 of a zero.
    inputs, do, _ = make_inputs(Hq=2, Hkv=1, Nq=1, Nk=1, Ka=1)
    got = run_op(inputs, do, causal=True, kv_lens=None)
    norm = {n: t.norm(dim=-1).max().item() for n, t in inputs.items() if n != "gate"}
    terms = do.norm(dim=-1).max().item() * max(norm["v"], norm["adapter_v"]) / 4  # s = 1/4 at D = 16
    terms *= max(norm["q"], norm["k"], norm["adapter_k"]) * (1 + inputs["gate"].abs().max().item())
    floors = dict.fromkeys(("dq", "dk", "dadapter_k"), 1e-6 * terms)
    assert_flash_rule(got, inputs, do, causal=True, kv_lens=None, floors=floors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_single_prompt_key(dtype):
    # One prompt key: softmax over it is 1, so d(adapter_k) is exactly zero in math, a sum of terms
    # s g A (do.av - do.O_a) q that cancel. reference.py cancels them bit for bit; the kernel recomputes O_a
    # separately, so its floor is 1e-6 of the size of those terms (all fp32 arithmetic, in either input dtype).
    inputs, do, _ = make_inputs(B=2, Hq=4, Hkv=2, Nq=21, Nk=35, D=32, Ka=1, dtype=dtype, seed=7)
    got = run_op(inputs, do, causal=True, kv_lens=None)
    q, av, g = (inputs[n].double() for n in ("q", "adapter_v", "gate"))
    do_av = torch.einsum("bhnd,hd->bhn", do.double(), av[:, 0].repeat_interleave(2, 0)).abs()  # (B, Hq, Nq)
    terms = (g.abs()[None, :, None, None] * do_av[..., None] * q.abs()).sum((0, 1, 2)).max().item() / math.sqrt(32)
    assert_flash_rule(got, inputs, do, causal=True, kv_lens=None, floors={"dadapter_k": 1e-6 * terms})


@pytest.mark.parametrize(
    "block_m,block_n", [(32, 16), (16, 32)], ids=["tall-query-blocks", "wide-key-blocks"]
)  # the interpreter default is 16 x 16; unequal blocks move the diagonal within a block
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_unequal_block_shapes(block_m, block_n, causal):
    inputs, do, kv_lens = make_inputs(B=2, Hq=2, Hkv=1, Nq=45, Nk=61, Ka=20, kv_lens=[61, 30], seed=1)
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1)
    got = run_launchers(inputs, do, causal=causal, kv_lens=kv_lens, config=config)
    assert_flash_rule(got, inputs, do, causal=causal, kv_lens=kv_lens)


@pytest.mark.parametrize("prompt_first", [True, False], ids=["prompt-first", "prompt-last"])
def test_dq_prompt_part_before_or_after_the_word_loop(prompt_first, monkeypatch):
    """The dQ kernel runs the prompt's part before the word loop on sm90 and after it on sm80 (PROMPT_FIRST, chosen
    by what compiles without spills): both orders must give the same gradients. Ka = 20 spans two prompt blocks."""
    from llama_adapter.kernels import attention_bwd

    monkeypatch.setattr(attention_bwd, "bwd_dq", functools.partial(attention_bwd.bwd_dq, prompt_first=prompt_first))
    inputs, do, kv_lens = make_inputs(B=2, Hq=4, Hkv=2, Nq=21, Nk=29, Ka=20, kv_lens=[29, 17], seed=4)
    got = run_launchers(inputs, do, causal=True, kv_lens=kv_lens)
    assert_flash_rule(got, inputs, do, causal=True, kv_lens=kv_lens)


def test_zero_gate_is_plain_attention_and_only_the_gate_learns():
    inputs, do, _ = make_inputs(B=2, Hq=4, Hkv=2, Nq=23, Nk=23, Ka=10, seed=2)
    inputs["gate"] = torch.zeros(4)
    plain = dict(inputs, adapter_k=None, adapter_v=None, gate=None)
    got = run_op(inputs, do, causal=True, kv_lens=None)
    base = run_op(plain, do, causal=True, kv_lens=None)
    for name, g, b in zip(NAMES, got[:4], base):
        assert torch.equal(g, b), f"{name} differs from attention without the adapter"
    assert torch.equal(got[4], torch.zeros_like(got[4])) and torch.equal(got[5], torch.zeros_like(got[5]))
    assert (got[6] != 0).all(), "every head's gate must get a gradient at g = 0"
    expected = run_reference(inputs, do, causal=True, kv_lens=None, cast=torch.float64)[6]
    torch.testing.assert_close(got[6].double(), expected, rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic():
    # Shared prompt + GQA: the prompt gradients sum over batch, group heads and query blocks.
    inputs, do, kv_lens = make_inputs(B=2, Hq=4, Hkv=2, Nq=40, Nk=40, Ka=10, kv_lens=[40, 33], seed=3)
    first = run_op(inputs, do, causal=True, kv_lens=kv_lens)
    second = run_op(inputs, do, causal=True, kv_lens=kv_lens)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_forward_writes_into_out_and_saves_lse():
    inputs, _, _ = make_inputs(Nq=19, Nk=19, Ka=3, seed=4)
    out = torch.full_like(inputs["q"], float("nan"))
    o, lse_w, lse_a = adapter_attention_fwd(**inputs, causal=True, sm_scale=0.25, kv_lens=None, out=out)
    assert o is out and torch.isfinite(out).all()
    scores = torch.einsum("bhnd,bhmd->bhnm", inputs["q"].double(), inputs["k"].double()) * 0.25
    scores = scores.masked_fill(torch.ones(19, 19, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse_w.double(), torch.logsumexp(scores, -1) / math.log(2), rtol=0, atol=1e-5)
    prompt = torch.einsum("bhnd,hmd->bhnm", inputs["q"].double(), inputs["adapter_k"].double()) * 0.25
    torch.testing.assert_close(lse_a.double(), torch.logsumexp(prompt, -1) / math.log(2), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "change,error",
    [
        (dict(q=torch.randn(1, 2, 5, 24), k=torch.randn(1, 2, 5, 24), v=torch.randn(1, 2, 5, 24)), ValueError),
        (dict(gate=None), ValueError),
        (dict(k=torch.randn(1, 3, 5, 16), v=torch.randn(1, 3, 5, 16)), ValueError),
        (dict(adapter_k=torch.randn(2, 4, 16, dtype=torch.float16)), TypeError),
    ],
    ids=["head-dim-24", "prompt-without-gate", "heads-not-dividing", "prompt-dtype"],
)
def test_bad_inputs_raise_before_launch(change, error, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr("llama_adapter.ops.adapter_attention_fwd", no_launch)
    set_attention_backend("triton")
    args = dict(q=torch.randn(1, 2, 5, 16), k=torch.randn(1, 2, 5, 16), v=torch.randn(1, 2, 5, 16))
    args.update(adapter_k=torch.randn(2, 4, 16), adapter_v=torch.randn(2, 4, 16), gate=torch.zeros(2))
    args.update(change)
    with pytest.raises(error):
        adapter_attention(**args)


def test_float64_is_refused_on_the_triton_backend():
    set_attention_backend("triton")
    x = torch.randn(1, 1, 3, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        adapter_attention(x, x, x)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_large_shapes_on_gpu(causal):
    inputs, do, kv_lens = make_inputs(
        B=2, Hq=8, Hkv=2, Nq=1000, Nk=1537, D=128, Ka=10, dtype=torch.bfloat16, kv_lens=[1537, 700], seed=5
    )
    to_gpu = {n: t.cuda() if t is not None else None for n, t in inputs.items()}
    got = [t.cpu() for t in run_op(to_gpu, do.cuda(), causal=causal, kv_lens=kv_lens.cuda())]
    assert_flash_rule(got, inputs, do, causal=causal, kv_lens=kv_lens)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 256])
def test_head_dims_on_gpu(D):
    inputs, do, _ = make_inputs(B=1, Hq=4, Hkv=4, Nq=333, Nk=333, D=D, Ka=10, dtype=torch.float16, seed=6)
    to_gpu = {n: t.cuda() if t is not None else None for n, t in inputs.items()}
    got = [t.cpu() for t in run_op(to_gpu, do.cuda(), causal=True, kv_lens=None)]
    assert_flash_rule(got, inputs, do, causal=True, kv_lens=None)


def test_compile_specs_describe_a_launch_with_contiguous_tensors():
    """kernel_report compiles these specs: they must be specialised as a real launch is (16-byte aligned pointers and
    strides: vector loads and cp.async), else the registers and spills it reports are not what the GPU runs."""
    from triton.backends.compiler import BaseBackend

    from llama_adapter.kernels import attention_bwd, attention_fwd

    specs = attention_fwd.compile_specs() + attention_bwd.compile_specs()
    for spec in specs:
        fn, sig = spec["fn"], spec["signature"]
        pointers = {a for a, t in sig.items() if t.startswith("*")}
        assert pointers and pointers <= set(spec["divisible"]), spec["name"]
        assert all(sig[a] == "constexpr" for a in fn.arg_names if a.startswith("stride_") and a.endswith("d"))
        assert all(a in spec["divisible"] for a, t in sig.items() if t == "i32" and a.startswith("stride_"))
        assert spec["attrs"] == {(fn.arg_names.index(a),): BaseBackend.parse_attr("D") for a in spec["divisible"]}
    assert {s["sm90_mma"] for s in specs if s["arch"] == 90} == {"HGMMA", "HMMA"}
    with pytest.raises(ValueError, match="not arguments"):
        _common.divisibility_attrs(attention_fwd.adapter_attention_fwd_kernel, ["nope"])
