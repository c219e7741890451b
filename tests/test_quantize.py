"""A quantized frozen base (llama_adapter.quantize): NF4 and int8 weight-only block linears via torchao.

The formats are checked against independent references written from their definitions (QLoRA's NF4: 64-weight
blocks, absmax scale, nearest of 16 levels; int8: per-row symmetric absmax / 127), the model against the same
model computing with the dequantized weights (which must agree to float rounding) and against the unquantized
model (which it approximates to the format's precision), training against "only the adapter moves", and loading
against "bad input fails before any weight is read".
"""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from train_helpers import single_thread, tiny_model

pytest.importorskip("torchao")

from llama_adapter import LLaMA  # noqa: E402
from llama_adapter.loading import CheckpointError  # noqa: E402
from llama_adapter.model_args import BLOCK_LINEARS  # noqa: E402
from llama_adapter.quantize import (  # noqa: E402
    QuantizationUnavailable,
    dequantize_weight,
    is_quantized_linear,
    quantization_of,
    quantize_model,
    quantize_weight,
    tensor_bytes,
    weight_bytes,
)

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

# QLoRA (Dettmers et al. 2023, appendix E): the 16 NF4 levels, quantiles of N(0, 1) scaled to [-1, 1] with an exact 0.
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float64,
)


def nf4_codes(w: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA's NF4 in float64: per element the nearest level's index to w / block absmax, that ratio's distance to
    the nearest decision midpoint (where rounding may flip the choice), and the block absmax."""
    blocks = w.double().reshape(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    ratio = blocks / absmax
    codes = (ratio.unsqueeze(-1) - NF4_LEVELS).abs().argmin(dim=-1)
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    margin = (ratio.unsqueeze(-1) - midpoints).abs().amin(dim=-1)
    return codes.view(w.shape), margin.view(w.shape), absmax.expand_as(blocks).reshape(w.shape)


def int8_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 in float64 (torchao's mapping: absmax -> 127.5, codes clamped to [-128, 127]): the
    codes, each ratio's distance to a rounding tie, and the row scales."""
    scale = w.double().abs().amax(dim=1, keepdim=True) / 127.5
    ratio = w.double() / scale
    return ratio.round().clamp(-128, 127), ((ratio - ratio.floor()) - 0.5).abs(), scale


def write_meta_checkpoint(model: LLaMA, directory) -> None:
    p = model.params
    directory.mkdir(parents=True, exist_ok=True)
    keys = "dim n_layers n_heads n_kv_heads vocab_size multiple_of norm_eps rope_theta max_seq_len".split()
    (directory / "params.json").write_text(json.dumps({k: getattr(p, k) for k in keys}))
    base = {k: v for k, v in model.state_dict().items() if k not in model.adapter_state_dict()}
    torch.save(base, directory / "consolidated.00.pth")


def with_gates(model: LLaMA, value: float = 0.3) -> LLaMA:
    """Non-zero gates, so the prompts get gradients (at the zero init only the gates move)."""
    with torch.no_grad():
        for layer in model.layers:
            if layer.attention.adapter_gate is not None:
                layer.attention.adapter_gate.fill_(value)
    return model


def dequantized_copy(model: LLaMA, dtype: torch.dtype | None = None) -> LLaMA:
    """The same model computing with plain tensors holding the quantized weights' values (in `dtype`)."""
    twin = tiny_model(
        adapter_layers=model.adapter_config.adapter_layers, dtype=dtype or model.tok_embeddings.weight.dtype
    )
    twin.load_state_dict({k: dequantize_weight(v) for k, v in model.state_dict().items()})
    return twin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_linear_is_the_format_and_computes_with_its_dequantized_weight(fmt, dtype):
    torch.manual_seed(0)
    w = torch.randn(96, 160, dtype=dtype)  # 240 NF4 blocks: not a multiple of QLoRA's 256-scale groups
    q = quantize_weight(w, fmt)
    assert q.shape == w.shape and q.dtype == dtype and not q.requires_grad
    deq = dequantize_weight(q)
    assert type(deq) is torch.Tensor and deq.dtype == dtype
    # how near a rounding boundary (relative to the scaled value) the dtype's own rounding may flip a code
    tie = 1e-5 if dtype == torch.float32 else 2**-7
    if fmt == "nf4":
        codes, margin, absmax = nf4_codes(w)
        stored = torch.stack([q.quantized_data >> 4, q.quantized_data & 15], dim=-1).view(w.shape).long()
        # flips only where w / absmax lies on a decision midpoint, to the dtype's rounding or to that of the levels
        # (torchao stores them to 4 decimals, which moves a midpoint by up to 5e-5)
        flipped = stored != codes
        assert (margin[flipped] < max(tie, 1e-4)).all()
        # the 8-bit double-quantized scales are within 1% of the absmax (measured: 0.4% fp32, 0.8% bf16)
        err = (deq.double() - NF4_LEVELS[stored] * absmax).abs() / absmax
        assert err.max() < (0.005 if dtype == torch.float32 else 0.015), float(err.max())
    else:
        codes, margin, scale = int8_codes(w)
        stored = q.qdata.double()
        flipped = stored != codes
        assert (margin[flipped] < tie * stored[flipped].abs().clamp(min=1)).all()
        stored_scale = q.scale.double().view(-1, 1)
        assert ((stored_scale - scale).abs() <= scale * (1e-6 if dtype == torch.float32 else 2**-8)).all()
        torch.testing.assert_close(deq, (stored * stored_scale).to(dtype))  # the dtype's rounding of code * scale
        # half a step, plus (bf16) a code flipped by rounding w / scale and the rounding of code * scale
        assert ((deq.double() - w.double()).abs() <= scale * (0.5 + 1e-4 if dtype == torch.float32 else 1.25)).all()
    # The matmul computes with the dequantized weight, forward and backward into the activations: against float64
    # on that weight, its error is at most 2x (3x for the gradient) that of F.linear on the plain weight.
    x = torch.randn(3, 5, 160, dtype=dtype, requires_grad=True)
    y = F.linear(x, q)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    y_plain = F.linear(x, deq)
    (dx_plain,) = torch.autograd.grad(y_plain, x, dy)
    y_64, dx_64 = F.linear(x.double(), deq.double()), dy.double() @ deq.double()
    for got, plain, want, factor in ((y, y_plain, y_64, 2), (dx, dx_plain, dx_64, 3)):
        err, err_plain = (got.double() - want).abs().max(), (plain.double() - want).abs().max()
        assert err <= factor * err_plain + 1e-12, (float(err), float(err_plain))


def test_quantize_weight_rejects_what_the_formats_cannot_hold():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        quantize_weight(torch.randn(64, 64, dtype=torch.float64), "int8", "layers.0.attention.wq.weight")
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_weight(torch.randn(10, 10), "nf4")
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(64), "nf4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_model_equals_its_dequantized_twin_and_approximates_the_original(fmt, dtype):
    """Only the block linears change; logits match the dequantized twin to float rounding; against the unquantized
    model they are off by what the format costs. Measured (tiny random model, fp32): weights 9.2% (nf4) / 0.70%
    (int8) relative RMS error, logits 24% / 1.6%: a 2-layer random model amplifies the weight error ~2.5x."""
    model = with_gates(tiny_model(adapter_layers=2, dtype=dtype))
    tokens = torch.randint(0, model.params.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the unquantized model, exactly (float64) and in its dtype
        ref = dequantized_copy(model, torch.float64)(tokens)
        own_err = float((model(tokens).double() - ref).norm() / ref.norm())
    plain = {n: p.detach().clone() for n, p in model.named_parameters() if is_quantized_linear(n)}
    before = weight_bytes(model)
    quantize_model(model, fmt)
    assert quantization_of(model) == fmt
    for name, p in model.named_parameters():
        assert (type(p.data) is torch.Tensor) != is_quantized_linear(name), name
    stored = sum(tensor_bytes(p) for n, p in model.named_parameters() if n in plain)
    n_weights = sum(w.numel() for w in plain.values())
    # nf4: 4 bits + an 8-bit scale per 64 weights (+ a factor per scale group); int8: 8 bits + 5 bytes per row of 64
    assert stored / n_weights < (0.55 if fmt == "nf4" else 1.1), stored / n_weights
    assert weight_bytes(model) == before - sum(tensor_bytes(w) for w in plain.values()) + stored
    # against float64 on the dequantized weights, at most 2x the error of plain matmuls in the same dtype (int8 in
    # bf16 scales after the matmul, so it rounds differently from dequantize-then-matmul)
    with torch.no_grad():
        out = model(tokens).double()
        twin = dequantized_copy(model)(tokens).double()
        exact = dequantized_copy(model, torch.float64)(tokens)
    assert (out - exact).abs().max() <= 2 * (twin - exact).abs().max() + 1e-6
    deq = {n: dequantize_weight(p).double() for n, p in model.named_parameters() if n in plain}
    weight_err = math.sqrt(
        sum((deq[n] - w.double()).square().sum() for n, w in plain.items())
        / sum(w.double().square().sum() for w in plain.values())
    )
    logit_err = float((out - ref).norm() / ref.norm())
    assert 0.3 * weight_err < logit_err < 3 * weight_err + 2 * own_err, (logit_err, weight_err, own_err)
    assert weight_err < (0.1 if fmt == "nf4" else 0.008), weight_err  # N(0, 1)-like weights: 9.2% / 0.70%
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, fmt)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_one_step_on_a_quantized_base_moves_the_adapter_and_only_the_adapter(fmt):
    """Gradients reach the prompts through the quantized wk/wv (Attention.project_prompt) and the gates."""
    torch.manual_seed(2)
    model = quantize_model(with_gates(tiny_model(adapter_layers=2)), fmt)
    frozen = {n: dequantize_weight(p).clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert set(adapter) == {f"layers.{i}.attention.adapter_{k}" for i in (0, 1) for k in ("prompt", "gate")}
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    tokens = torch.randint(0, model.params.vocab_size, (2, 12))
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    opt.step()
    for name, p in model.named_parameters():
        if name in adapter:
            assert not torch.equal(p.detach(), adapter[name]), name
        else:
            assert torch.equal(dequantize_weight(p), frozen[name]), name


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_from_pretrained_quantizes_while_loading_and_the_adapter_moves_to_a_full_base(fmt, tmp_path):
    torch.manual_seed(3)
    model = with_gates(tiny_model(adapter_layers=2))
    write_meta_checkpoint(model, tmp_path / "base")
    loaded = LLaMA.from_pretrained(tmp_path / "base", quantize=fmt)
    assert quantization_of(loaded) == fmt
    for name, p in loaded.state_dict().items():
        if is_quantized_linear(name):  # the same values as quantizing the weight directly
            assert torch.equal(dequantize_weight(p), dequantize_weight(quantize_weight(model.state_dict()[name], fmt)))
        else:
            assert type(p) is torch.Tensor and torch.equal(p, model.state_dict()[name]), name
    # an adapter trained on the quantized base saves as usual and loads on the full-precision base
    loaded.attach_adapter(model.adapter_config)
    with_gates(loaded, 0.2)
    opt = torch.optim.AdamW(loaded.adapter_parameters(), lr=1e-2)
    tokens = torch.randint(0, model.params.vocab_size, (2, 10))
    F.cross_entropy(loaded(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    loaded.save_adapter(tmp_path / "adapter")
    full = LLaMA.from_pretrained(tmp_path / "base", adapter=str(tmp_path / "adapter"))
    assert quantization_of(full) is None
    for name, t in loaded.adapter_state_dict().items():
        assert torch.equal(full.adapter_state_dict()[name], t), name


def test_generate_on_a_quantized_base_equals_its_dequantized_twin():
    torch.manual_seed(4)
    model = quantize_model(with_gates(tiny_model(adapter_layers=2)), "nf4")
    twin = dequantized_copy(model)
    prompts = [[5, 17, 3, 9], [8, 2]]
    assert model.generate(prompts, 6) == twin.generate(prompts, 6)


def test_bad_quantize_arguments_fail_before_any_file_is_read(tmp_path, monkeypatch):
    missing = tmp_path / "does-not-exist"  # reading it would be a FileNotFoundError: these come first
    with pytest.raises(ValueError, match=r"quantize must be None or one of \('nf4', 'int8'\), got 'fp4'"):
        LLaMA.from_pretrained(missing, quantize="fp4")
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    with pytest.raises(QuantizationUnavailable, match="pip install torchao"):
        LLaMA.from_pretrained(missing, quantize="nf4")
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        LLaMA.from_pretrained(missing, quantize="nf4")


def test_already_quantized_checkpoints_are_refused_before_their_weights_are_read(tmp_path):
    torch.manual_seed(5)
    model = tiny_model()
    write_meta_checkpoint(model, tmp_path / "meta")
    state = torch.load(tmp_path / "meta" / "consolidated.00.pth")
    state["layers.0.attention.wq.weight"] = torch.zeros(64, 64, dtype=torch.int8)
    torch.save(state, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"layers.0.attention.wq.weight.*torch.int8: an already-quantized"):
        LLaMA.from_pretrained(tmp_path / "meta", quantize="nf4")
    hf = tmp_path / "hf"
    hf.mkdir()
    config = dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=192,
        vocab_size=128,
    )
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "model.safetensors").write_bytes(b"not read")  # a read would fail differently
    with pytest.raises(CheckpointError, match=r"already quantized \(bitsandbytes\)"):
        LLaMA.from_pretrained(hf)


def test_quantized_linears_are_the_models_block_linears():
    model = tiny_model()
    names = {n for n, _ in model.named_parameters() if is_quantized_linear(n)}
    assert names == {f"layers.{i}.{path}.weight" for i in range(model.params.n_layers) for path in BLOCK_LINEARS}


def test_finetune_and_generate_cli_on_a_quantized_base(tmp_path, capsys):
    from helpers import train_sentencepiece
    from train_helpers import make_examples

    from llama_adapter import ModelArgs
    from llama_adapter.cli import main

    torch.manual_seed(6)
    base = tmp_path / "base"
    write_meta_checkpoint(LLaMA(ModelArgs.from_name("tiny", vocab_size=100)), base)
    train_sentencepiece(base, vocab_size=100)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(make_examples(8)))
    out = tmp_path / "run"
    argv = [
        "finetune",
        "--model",
        str(base),
        "--data",
        str(data),
        "--out",
        str(out),
        "--quantize",
        "nf4",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--blr",
        "2.0",
        "--global-batch-size",
        "4",
        "--micro-batch-size",
        "4",
        "--max-steps",
        "1",
        "--adapter-layers",
        "2",
        "--adapter-len",
        "3",
        "--max-seq-len",
        "256",
        "--val-fraction",
        "0",
        "--no-progress",
    ]
    assert main(argv) == 0
    full = LLaMA.from_pretrained(base, adapter=str(out / "adapter"))  # trained on nf4, served on the full base
    assert quantization_of(full) is None and all((layer.attention.adapter_gate != 0).all() for layer in full.layers)
    capsys.readouterr()
    argv = [
        "generate",
        "--model",
        str(base),
        "--adapter",
        str(out / "adapter"),
        "--quantize",
        "int8",
        "--instruction",
        "Repeat cat.",
        "--max-new-tokens",
        "3",
    ]
    assert main(argv) == 0
    assert "tokens in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(base), "--instruction", "x", "--quantize", "fp4"])
    assert "invalid choice: 'fp4'" in capsys.readouterr().err


def _fsdp_model(fmt: str) -> LLaMA:
    """Shapes whose NF4 pieces (data, block scales, their 256-group factors) split evenly across 2 ranks, as
    every real LLaMA's do (the tiny model's do not: FSDP2 shards each of them along dim 0)."""
    from llama_adapter import AdapterConfig, ModelArgs

    torch.manual_seed(7)
    model = LLaMA(ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=128, multiple_of=256, max_seq_len=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=2))
    return quantize_model(model, fmt)


def _fsdp_train(out_dir, fsdp: bool, info=None):
    from train_helpers import WordTokenizer, make_examples

    from llama_adapter.data import InstructionDataset
    from llama_adapter.distributed import adapter_tensors
    from llama_adapter.recipe import TrainConfig
    from llama_adapter.trainer import Trainer

    data = InstructionDataset(make_examples(16), WordTokenizer(), max_seq_len=64)
    cfg = TrainConfig(
        out_dir=str(out_dir),
        epochs=1,
        warmup_epochs=0.5,
        global_batch_size=8,
        micro_batch_size=2,
        blr=32.0,
        progress=False,
        fsdp=fsdp,
    )
    model = _fsdp_model("nf4")
    history = Trainer(model, data, None, cfg, dist_info=info).fit()
    wq = model.layers[0].attention.wq.weight  # a DTensor under FSDP: this rank's shard of the NF4 weight
    shard = wq.to_local() if hasattr(wq, "to_local") else wq
    losses = [r["loss"] for r in history]
    return losses, {k: v.clone() for k, v in adapter_tensors(model).items()}, (type(shard).__name__, shard.shape[0])


def _fsdp_worker(info, out_dir: str):
    import os

    result = _fsdp_train(os.path.join(out_dir, "fsdp"), True, info)
    if info.is_main:
        torch.save(result, os.path.join(out_dir, "fsdp.pt"))


def test_fsdp2_shards_an_nf4_base_on_gloo_and_trains_as_one_process(tmp_path):
    from train_helpers import spawn_gloo

    losses, adapter, (kind, rows) = _fsdp_train(tmp_path / "single", False)
    assert (kind, rows) == ("NF4Tensor", 256)
    assert len(losses) == 2 and (adapter["layers.1.attention.adapter_gate"] != 0).all()
    spawn_gloo(_fsdp_worker, 2, tmp_path, str(tmp_path))
    fsdp_losses, fsdp_adapter, (kind, rows) = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert (kind, rows) == ("NF4Tensor", 128)  # sharded, still 4-bit
    assert fsdp_losses == pytest.approx(losses, rel=1e-5)
    for name, t in adapter.items():
        torch.testing.assert_close(fsdp_adapter[name], t, rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp_refuses_an_int8_base():
    from llama_adapter.distributed import DistInfo, wrap_model

    with pytest.raises(ValueError, match="FSDP cannot shard an int8 base"):
        wrap_model(_fsdp_model("int8"), DistInfo(), fsdp=True)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_compiled_decode_on_a_quantized_base_equals_eager(fmt):
    """generate(compile=True): the quantized weights trace through dynamo and AOT autograd in one graph
    (fullgraph; aot_eager on the CPU as in test_compile.py; inductor was run once by hand, see the notes)."""
    from llama_adapter.generation import generate

    torch.manual_seed(8)
    model = quantize_model(with_gates(tiny_model(adapter_layers=2)), fmt)
    prompts = [[5, 17, 3, 9], [8, 2]]
    eager = generate(model, prompts, 5)
    assert generate(model, prompts, 5, compile=True, compile_options={"backend": "aot_eager"}) == eager


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nf4", "int8", None])
def test_quantized_nbytes_from_the_shape_is_what_the_tensor_holds(fmt, dtype):
    from llama_adapter.quantize import quantized_nbytes

    for rows, cols in ((512, 1024), (96, 160), (1024, 2816)):
        w = torch.randn(rows, cols, dtype=dtype)
        stored = tensor_bytes(quantize_weight(w, fmt) if fmt else w)
        assert quantized_nbytes(rows, cols, fmt, w.element_size()) == stored, (rows, cols)


def test_sharded_meta_and_hf_checkpoints_quantize_as_the_plain_load(tmp_path):
    """Shard concatenation and HF's q/k un-permutation are deferred to assignment (one copy at a time), and the
    quantized load equals quantizing the plain load's weights."""
    pytest.importorskip("transformers")
    from helpers import random_hf_model, tiny_hf_config, write_meta_dir

    from llama_adapter.checkpoint import Deferred
    from llama_adapter.loading import read_checkpoint

    hf = random_hf_model(tiny_hf_config(), seed=7, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "hf")
    write_meta_dir(hf, tmp_path / "meta2", n_shards=2)
    plain = LLaMA.from_pretrained(tmp_path / "hf").state_dict()
    for directory, deferred in (("hf", {"attention.wq", "attention.wk"}), ("meta2", set(BLOCK_LINEARS))):
        tensors = read_checkpoint(tmp_path / directory, deferred=True).tensors
        got = {
            n.split(".", 2)[2].rsplit(".", 1)[0]
            for n, t in tensors.items()
            if isinstance(t, Deferred) and n[:7] == "layers."
        }
        assert deferred <= got, directory
        loaded = LLaMA.from_pretrained(tmp_path / directory, quantize="nf4")
        for name, p in loaded.state_dict().items():
            if is_quantized_linear(name):
                assert torch.equal(dequantize_weight(p), dequantize_weight(quantize_weight(plain[name], "nf4"))), name
            else:
                assert torch.equal(p, plain[name]), name


def test_fsdp_with_an_int8_base_is_refused_before_anything_is_read(tmp_path, capsys):
    """Quantizing a large base takes minutes: the refusal comes first, as one CLI line naming both flags."""
    from llama_adapter.cli import main

    absent = str(tmp_path / "absent")
    argv = [
        "finetune",
        "--model",
        absent,
        "--data",
        absent,
        "--out",
        str(tmp_path / "out"),
        "--fsdp",
        "--quantize",
        "int8",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("llama-adapter: error: FSDP cannot shard an int8 base (--fsdp with --quantize int8)"), err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_resume_refuses_a_base_quantized_otherwise_than_the_checkpoints(tmp_path):
    """The base's format is part of the run: resuming an nf4 run on a full or int8 base would silently continue
    another run (its loss curve is not the checkpoint's)."""
    from train_helpers import WordTokenizer, make_examples

    from llama_adapter.data import InstructionDataset
    from llama_adapter.recipe import TrainConfig
    from llama_adapter.trainer import Trainer

    data = InstructionDataset(make_examples(8), WordTokenizer(), max_seq_len=64)

    def cfg(**kw):
        return TrainConfig(
            out_dir=str(tmp_path),
            epochs=1,
            warmup_epochs=0.5,
            global_batch_size=4,
            micro_batch_size=4,
            progress=False,
            **kw,
        )

    Trainer(quantize_model(tiny_model(), "nf4"), data, None, cfg(max_steps=1)).fit()
    for model in (tiny_model(), quantize_model(tiny_model(), "int8")):
        with pytest.raises(ValueError, match=r"differs in quantize: checkpoint 'nf4' vs now"):
            Trainer(model, data, None, cfg(resume=True)).fit()
    history = Trainer(quantize_model(tiny_model(), "nf4"), data, None, cfg(resume=True)).fit()
    assert [r["step"] for r in history] == [1, 2]


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_a_dtype_the_formats_cannot_hold_is_refused_before_any_weight_is_converted(fmt, tmp_path, monkeypatch):
    """float64 (asked for, or the checkpoint's own dtype): one error naming quantize and dtype, not the first
    weight's after the loader has started converting."""
    import llama_adapter.quantize as quantize_module

    write_meta_checkpoint(tiny_model(dtype=torch.float64), tmp_path)
    converted = []
    monkeypatch.setattr(quantize_module, "quantize_weight", lambda *a, **k: converted.append(a) or a[0])
    for dtype in (torch.float64, None):
        with pytest.raises(
            ValueError,
            match=rf"quantize='{fmt}' needs dtype float32, bfloat16 or float16, got "
            r"dtype=torch.float64",
        ):
            LLaMA.from_pretrained(tmp_path, quantize=fmt, dtype=dtype)
    assert converted == []
