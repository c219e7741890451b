"""Image-conditioned prompts: per-sample prompts through the model equal a one-by-one loop (float64 reference
and the kernel under the interpreter), the projector's shapes, feature files and their errors, and
extract-features with a tiny random CLIP saved to a temporary directory."""

import json

import numpy as np
import pytest
import torch

from llama_adapter import AdapterConfig, LLaMA, ModelArgs
from llama_adapter.adapter import VisualProjector
from llama_adapter.attention import set_attention_backend
from llama_adapter.multimodal import (
    FeatureError,
    ImageFeatures,
    attach_image_features,
    default_layers,
    extract_features,
)


def tiny_llama(dtype=torch.float64, **adapter):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16, max_seq_len=32)
    model = LLaMA(args, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=2, **adapter))
    with torch.no_grad():
        for layer in model.layers:
            if layer.attention.adapter_gate is not None:
                layer.attention.adapter_gate.uniform_(0.3, 0.8)  # open gates: the prompts matter
    return model


def test_per_sample_prompts_equal_a_one_by_one_loop():
    model = tiny_llama()
    tokens = torch.randint(0, 61, (3, 7))
    offset = torch.randn(3, 3, 64, dtype=torch.float64)
    batched = model(tokens, prompt_offset=offset)
    for b in range(3):
        alone = model(tokens[b : b + 1], prompt_offset=offset[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], alone, rtol=0, atol=1e-12)
    assert (batched - model(tokens)).abs().max() > 1e-3  # the offset does change the output


def test_per_sample_prompts_through_the_kernel_under_the_interpreter():
    model = tiny_llama(dtype=torch.float32)
    tokens = torch.randint(0, 61, (2, 5))
    offset = torch.randn(2, 1, 64)  # one vector per sample, broadcast over the K prompt tokens
    set_attention_backend("triton")
    try:
        batched = model(tokens, prompt_offset=offset)
        loop = torch.cat([model(tokens[b : b + 1], prompt_offset=offset[b : b + 1]) for b in range(2)])
    except ImportError as err:  # pragma: no cover - kernels not importable yet
        pytest.skip(f"llama_adapter.ops unavailable: {err}")
    set_attention_backend("reference")
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched, model(tokens, prompt_offset=offset), rtol=1e-4, atol=1e-4)


def test_projector_repeats_the_projected_features_k_times():
    proj = VisualProjector(in_dim=6, dim=8, adapter_len=4, hidden=5).double()
    feats = torch.randn(2, 3, 2, dtype=torch.float64)  # M = 3 scales of C = 2
    out = proj(feats)
    assert out.shape == (2, 4, 8)
    want = proj.fc2(torch.nn.functional.gelu(proj.fc1(feats.flatten(1))))
    for k in range(4):
        torch.testing.assert_close(out[:, k], want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="expects 6"):
        proj(torch.randn(2, 5))


def test_feature_files_pt_npy_and_per_image_directory(tmp_path):
    feats = torch.randn(3, 2, 4)
    torch.save({"features": feats, "ids": ["a", "b", "c"]}, tmp_path / "set.pt")
    np.save(tmp_path / "set.npy", feats.numpy())
    (tmp_path / "set.npy.ids.json").write_text(json.dumps(["a", "b", "c"]))
    torch.save(feats, tmp_path / "plain.pt")
    per_image = tmp_path / "per_image"
    per_image.mkdir()
    for name, row in zip("abc", feats):
        np.save(per_image / f"{name}.npy", row.numpy()) if name == "b" else torch.save(
            row.clone(), per_image / f"{name}.pt"
        )
    for path in ("set.pt", "set.npy", "per_image"):
        store = ImageFeatures(tmp_path / path, expected_dim=8)
        assert store.dim == 8 and store.shape == (2, 4) and len(store) == 3
        torch.testing.assert_close(store.stack(["c", "a"]), feats[[2, 0]].flatten(1))
    assert ImageFeatures(tmp_path / "plain.pt").ids == ["0", "1", "2"]

    examples = [{"instruction": "x", "output": "y", "image": "b"}, {"instruction": "x", "output": "y"}]
    assert attach_image_features(examples, tmp_path / "set.pt") == 8
    torch.testing.assert_close(examples[0]["image_features"], feats[1].flatten())
    assert examples[1]["image_features"].abs().sum() == 0


def test_feature_file_errors_name_the_file_and_image(tmp_path):
    torch.save({"features": torch.randn(2, 5), "ids": ["a", "b"]}, tmp_path / "f.pt")
    with pytest.raises(FeatureError, match=r"f\.pt.*5 values per image.*expects 8"):
        ImageFeatures(tmp_path / "f.pt", expected_dim=8)
    with pytest.raises(FeatureError, match=r"no features for image 'zebra' in .*f\.pt"):
        ImageFeatures(tmp_path / "f.pt")["zebra"]
    with pytest.raises(FeatureError, match="record 0 names image 'zebra'"):
        attach_image_features([{"instruction": "x", "output": "y", "image": "zebra"}], tmp_path / "f.pt")
    torch.save({"features": torch.randn(3, 5), "ids": ["a", "b"]}, tmp_path / "rows.pt")
    with pytest.raises(FeatureError, match="3 feature rows but 2 image ids"):
        ImageFeatures(tmp_path / "rows.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ImageFeatures(tmp_path / "missing.pt")
    d = tmp_path / "dir"
    d.mkdir()
    torch.save(torch.randn(4), d / "a.pt")
    torch.save(torch.randn(5), d / "b.pt")
    with pytest.raises(FeatureError, match=r"b\.pt: features of shape \(5,\), the other images' are \(4,\)"):
        ImageFeatures(d)["b"]
    with pytest.raises(FeatureError, match=r"expected c\.pt or c\.npy"):
        ImageFeatures(d)["c"]


def _tiny_clip_dir(path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        projection_dim=16,
    )
    model = CLIPVisionModel(cfg).eval()
    model.save_pretrained(path)
    return model


def test_extract_features_with_a_tiny_random_clip(tmp_path):
    from PIL import Image

    clip = _tiny_clip_dir(tmp_path / "clip")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        size = (20 + 3 * i, 17)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    out = tmp_path / "feats.pt"
    from llama_adapter.cli import main

    assert (
        main(
            [
                "extract-features",
                "--clip",
                str(tmp_path / "clip"),
                "--images",
                str(images),
                "--out",
                str(out),
                "--batch-size",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    store = ImageFeatures(out)
    assert store.ids == ["img0", "img1", "img2"] and store.shape == (3, 32)  # M = 3 layers (1, 2, 3), C = 32
    saved = torch.load(out)
    assert saved["layers"] == default_layers(3) == [1, 2, 3]

    # the last scale is CLIP's own pooled output (post-layernormed [CLS] of the last layer)
    from llama_adapter.multimodal import ClipFeatureExtractor

    with Image.open(images / "img1.png") as im:
        pixels = ClipFeatureExtractor(tmp_path / "clip").processor(images=[im.convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        pooled = clip(pixel_values=pixels["pixel_values"]).pooler_output[0]
    torch.testing.assert_close(store["img1"].view(3, 32)[2], pooled, rtol=1e-5, atol=1e-5)

    npy = extract_features(tmp_path / "clip", [images / "img2.png"], tmp_path / "one.npy", layers=[3], progress=False)
    assert npy.shape == (1, 1, 32) and ImageFeatures(tmp_path / "one.npy").ids == ["img2"]
    with pytest.raises(FileNotFoundError, match="nope.png"):
        extract_features(tmp_path / "clip", [images / "nope.png"], tmp_path / "x.pt", progress=False)
    with pytest.raises(ValueError, match=r"layers must be in 1\.\.3"):
        extract_features(tmp_path / "clip", [images], tmp_path / "x.pt", layers=[4], progress=False)


def test_trainer_feeds_image_features_to_the_projector(tmp_path):
    """The batch's image features reach the projector through the ordinary Trainer (data.image_inputs hook)."""
    from train_helpers import WordTokenizer, make_examples, tiny_model

    from llama_adapter.data import InstructionDataset
    from llama_adapter.recipe import TrainConfig
    from llama_adapter.trainer import Trainer

    examples = make_examples(4)
    for i, ex in enumerate(examples):
        ex["image_features"] = torch.randn(6) * (i + 1)
    train_set = InstructionDataset(examples, WordTokenizer(), max_seq_len=64)
    assert train_set.image_features is not None
    model = tiny_model()
    model.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=1, visual_dim=6, visual_hidden=8))
    bias0 = model.visual_proj.fc2.bias.detach().clone()  # no weight decay on 1-D params: moves only with a gradient
    cfg = TrainConfig(
        out_dir=str(tmp_path),
        epochs=2,
        warmup_epochs=0.5,
        global_batch_size=2,
        micro_batch_size=1,
        blr=64.0,
        progress=False,
    )
    Trainer(model, train_set, None, cfg).fit()
    assert (model.visual_proj.fc2.bias - bias0).abs().max() > 1e-4

    with pytest.raises(ValueError, match="some examples have image features"):
        InstructionDataset(examples + make_examples(1), WordTokenizer(), max_seq_len=64)
