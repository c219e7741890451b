"""Index-like inputs (kv_lens, cu_seqlens, max_seqlen): every backend accepts and rejects the same values.

CPU tensors are checked on the host by `attention.check_inputs`, before any backend runs; CUDA tensors are not
(a sync per call): the kernels clamp what arrives, and packed launches start their outputs zeroed
(`_common.zeroed_outputs`), which the zeroed-output test below runs on the CPU. The property test draws
shapes, strides, dtypes, gates and index inputs, valid and not, and asserts either the same error on the
reference and Triton backends or a Triton result within FlashAttention's rule of a float64 computation.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_kernels import NAMES, assert_flash_rule, make_inputs, run_op, run_reference

from llama_adapter import adapter_attention, set_attention_backend
from llama_adapter.kernels import _common
from llama_adapter.kernels.attention_fwd import adapter_attention_fwd
from llama_adapter.reference import adapter_attention as reference

BACKENDS = ("reference", "triton", "sdpa", "eager")


def _outcome(backend, inputs, do, extra, grad):
    """("error", type, message) or ("ok", [output, *grads if grad]) of one backend on one set of inputs."""
    set_attention_backend(backend)
    try:
        if grad:
            return ("ok", run_op(inputs, do, **extra))
        with torch.no_grad():
            return ("ok", [adapter_attention(**inputs, **extra)])
    except (ValueError, TypeError, NotImplementedError) as exc:
        return ("error", type(exc), str(exc))


def _zero_gradient_floors(inputs, do, rule):
    """Absolute floors for gradients that are exactly zero in float64 (a single visible key: dq = dk = 0), where
    the rule's "2x torch's error" is 0 while the kernel's ds = P (dP - D_w) cancels to rounding noise of size
    eps * |do| |v| D times the dq/dk factor |q or k| * sm_scale."""
    exact = run_reference(inputs, do, cast=torch.float64, **rule)
    present = [n for n in NAMES[1:] if inputs[n[1:]] is not None]  # "dq" -> "q", "dgate" -> "gate"
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    D = q.shape[-1]
    size = 4 * torch.finfo(q.dtype).eps * do.abs().max() * v.abs().max() * D * max(q.abs().max(), k.abs().max())
    floor = (size / math.sqrt(D)).item()
    return {name: floor for name, g in zip(present, exact[1:]) if not g.abs().max()}


def _assert_forward_rule(out, inputs, extra):
    """FlashAttention's rule for the output alone: error vs float64 <= 2x reference.py's in the same dtype."""
    packed = {"cu_seqlens": extra["cu_seqlens"]} if "cu_seqlens" in extra else {}
    common = dict(causal=extra["causal"], sm_scale=1 / math.sqrt(inputs["q"].shape[-1]), kv_lens=extra["kv_lens"])
    exact = reference(**{n: t.double() if t is not None else None for n, t in inputs.items()}, **common, **packed)
    same = reference(**inputs, **common, **packed)
    assert out.shape == exact.shape and out.dtype == inputs["q"].dtype
    assert torch.isfinite(out).all(), "NaN/inf: unwritten (poisoned) or overflowed elements"
    scale = exact.abs().max().item()
    floor = 1e-6 * scale if out.dtype == torch.float32 else 0.5 * torch.finfo(out.dtype).eps * scale
    err = (out.double() - exact).abs().max().item()
    ref_err = (same.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + floor, f"kernel err {err:.3g} > 2 x torch err {ref_err:.3g}"


@st.composite
def index_cases(draw):
    """make_inputs kwargs plus the index inputs: a padded batch with kv_lens, or a packing with cu_seqlens."""
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 2))
    Ka = draw(st.sampled_from([0, 1, 3]))
    strided = draw(st.booleans())
    causal = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    if draw(st.booleans()):  # packed sequences
        lengths = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
        T = sum(lengths)
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        damage = draw(st.sampled_from(["none", "none", "none", "start", "short", "long", "decreasing"]))
        if damage == "start":
            cu[0] = 1
        elif damage == "short":
            cu[-1] -= 1
        elif damage == "long":
            cu[-1] += 2
        elif damage == "decreasing" and len(cu) > 2:
            cu[1], cu[2] = cu[2], cu[1]
        longest = max(lengths)
        max_seqlen = draw(st.sampled_from([None, longest, longest + 2, longest - 1, 0]))
        make = dict(B=1, Hq=Hq, Hkv=Hkv, Nq=T, Nk=T, D=16, Ka=Ka, dtype=dtype, strided=strided, seed=seed)
        extra = dict(cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max_seqlen, causal=causal)
        return make, extra
    B = draw(st.integers(1, 2))
    Nq = draw(st.integers(1, 9))
    Nk = draw(st.integers(1, 9))
    kv_lens = draw(st.none() | st.lists(st.integers(-1, Nk + 1), min_size=B, max_size=B))
    make = dict(
        B=B,
        Hq=Hq,
        Hkv=Hkv,
        Nq=Nq,
        Nk=Nk,
        D=16,
        Ka=Ka,
        dtype=dtype,
        strided=strided,
        seed=seed,
        kv_lens=kv_lens,
        per_sample=Ka > 0 and draw(st.booleans()),
        gate_per_sample=Ka > 0 and draw(st.booleans()),
    )
    return make, dict(causal=causal)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=index_cases(), grad=st.booleans())
def test_backends_agree_on_index_inputs(case, grad):
    """Gradients too for fp32 draws. Not fp16: at these tiny sizes its D_w = rowsum(do * o) on the fp16-rounded
    output (FlashAttention's, by design) dominates gradients that are near zero, while reference.py is exact
    there; tests/test_kernels.py holds fp16 gradients to the rule at sizes where that averages out."""
    make, extra = case
    grad = grad and make["dtype"] == torch.float32
    inputs, do, kv_lens = make_inputs(**make)
    extra = dict(extra, kv_lens=kv_lens)
    if extra.get("max_seqlen", 0) is None:
        del extra["max_seqlen"]
    poisoned = _common.POISON_OUTPUTS
    _common.POISON_OUTPUTS = True  # an element a kernel leaves unwritten reads NaN
    try:
        want = _outcome("reference", inputs, do, extra, grad=False)
        got = _outcome("triton", inputs, do, extra, grad)
    finally:
        _common.POISON_OUTPUTS = poisoned
    event(f"{'packed' if 'cu_seqlens' in extra else 'padded'}: {want[0]}{' + grads' if grad else ''}")
    if want[0] == "error":
        assert got == want, f"reference raised {want[1].__name__}: {want[2]}; triton gave {got[:2]}"
        assert any(name in want[2] for name in ("kv_lens", "cu_seqlens", "max_seqlen")), want[2]
        return
    assert got[0] == "ok", f"triton raised {got[1].__name__}: {got[2]}; the reference accepted the inputs"
    if grad:
        packed = {"cu_seqlens": extra["cu_seqlens"]} if "cu_seqlens" in extra else {}
        rule = dict(causal=extra["causal"], kv_lens=kv_lens, **packed)
        floors = _zero_gradient_floors(inputs, do, rule)
        assert_flash_rule(got[1], inputs, do, floors=floors, **rule)
    else:
        _assert_forward_rule(got[1][0], inputs, extra)


def _small(Nk=6, B=2):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, 2, 3, 16, generator=gen)
    k = torch.randn(B, 2, Nk, 16, generator=gen)
    return dict(
        q=q,
        k=k,
        v=torch.randn_like(k),
        adapter_k=torch.randn(2, 2, 16, generator=gen),
        adapter_v=torch.randn(2, 2, 16, generator=gen),
        gate=torch.randn(2, generator=gen),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens", [[-1, 3], [3, 7]], ids=["negative", "past-nk"])
def test_kv_lens_out_of_range_is_refused_by_every_backend(backend, lens):
    set_attention_backend(backend)
    with pytest.raises(ValueError, match=r"kv_lens must lie in \[0, Nk=6\]"):
        adapter_attention(**_small(), kv_lens=torch.tensor(lens, dtype=torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cu,max_seqlen,match",
    [
        ([1, 3, 7], 4, "cu_seqlens must start at 0"),
        ([0, 3, 6], 3, "end at T=7"),
        ([0, 3, 9], 6, "end at T=7"),
        ([0, 5, 3, 7], 5, "never decrease"),
        ([0, 3, 7], 3, "max_seqlen must be at least the longest sequence \\(4\\)"),
    ],
    ids=["starts-above-0", "ends-early", "ends-past-t", "decreasing", "max-seqlen-too-small"],
)
def test_bad_packing_values_are_refused_by_every_backend(backend, cu, max_seqlen, match):
    x = _small(Nk=7, B=1)
    x["q"] = torch.randn(1, 2, 7, 16)
    set_attention_backend(backend)
    with pytest.raises(ValueError, match=match):
        adapter_attention(**x, cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max_seqlen)


def test_layout_cache_does_not_skip_value_or_type_checks():
    x = _small()
    set_attention_backend("reference")
    adapter_attention(**x, kv_lens=torch.tensor([6, 2], dtype=torch.int32))  # caches this layout as valid
    with pytest.raises(ValueError, match="kv_lens must lie"):
        adapter_attention(**x, kv_lens=torch.tensor([6, 9], dtype=torch.int32))
    with pytest.raises(TypeError, match="causal must be a bool"):
        adapter_attention(**x, causal=1)
    with pytest.raises(TypeError, match="sm_scale must be a number"):
        adapter_attention(**x, sm_scale="abc")


def test_bf16_on_the_triton_interpreter_is_refused():
    x = {n: t.to(torch.bfloat16) if n != "gate" else t for n, t in _small().items()}
    set_attention_backend("triton")
    with pytest.raises(TypeError, match="q is bfloat16, which the Triton interpreter"):
        adapter_attention(**x)
    set_attention_backend("reference")
    assert adapter_attention(**x).dtype == torch.bfloat16  # the reference computes it (in fp32)


def test_unchecked_packing_leaves_no_row_unwritten(monkeypatch):
    """What a GPU launch with unchecked cu_seqlens does, on the CPU: rows that no sequence covers (the packing
    starts at 2 and ends at 9 of 11 rows) read 0, never stale memory (NaN here); covered rows are exact. (Rows
    past a too-small max_seqlen are left to the same zeroing on a GPU; the interpreter's 16-row block covers
    these sequences whole.)"""
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)
    gen = torch.Generator().manual_seed(1)
    T, D = 11, 16
    q, k, v = (torch.randn(1, 2, T, D, generator=gen) for _ in range(3))
    cu = torch.tensor([2, 5, 9], dtype=torch.int32)
    with _common.zeroed_outputs():
        o, lse_w, _ = adapter_attention_fwd(q, k, v, causal=True, sm_scale=0.25, cu_seqlens=cu, max_seqlen=2)
    assert torch.isfinite(o).all() and not torch.isnan(lse_w).any()
    assert (o[:, :, :2] == 0).all() and (o[:, :, 9:] == 0).all()
    for start, end in ((2, 5), (5, 9)):
        alone = reference(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], causal=True, sm_scale=0.25)
        torch.testing.assert_close(o[:, :, start:end], alone, rtol=1e-5, atol=1e-5)
    assert not _common._zero_outputs  # the context restores the default
