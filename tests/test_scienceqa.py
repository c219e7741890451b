"""ScienceQA-style data: loading (official dict and list formats), the prompt format, accuracy tables against a
hand count, likelihood scoring against a one-by-one oracle, and fine-tune -> evaluate through the CLI with image
features."""

import json

import pytest
import torch
from train_helpers import WordTokenizer, single_thread

from llama_adapter import AdapterConfig, LLaMA, ModelArgs
from llama_adapter.data import DataError
from llama_adapter.multimodal import ImageFeatures
from llama_adapter.prompts import alpaca_prompt
from llama_adapter.scienceqa import accuracy_report, format_report, load_problems, predict, to_record

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

# Five hand-made problems (official problems.json layout); predictions below: 1, 3, 4 right; 2, 5 wrong.
FIVE = {
    "101": dict(
        question="Which is a mammal?",
        choices=["whale", "shark", "trout"],
        answer=0,
        hint="",
        image="image.png",
        subject="natural science",
        grade="grade2",
        split="test",
    ),
    "102": dict(
        question="What melts ice?",
        choices=["cold", "heat"],
        answer=1,
        hint="Think about summer.",
        image=None,
        subject="natural science",
        grade="grade8",
        split="test",
    ),
    "103": dict(
        question="Which city is a capital?",
        choices=["Lyon", "Nice", "Paris"],
        answer=2,
        hint="",
        image="image.png",
        subject="social science",
        grade="grade5",
        split="test",
    ),
    "104": dict(
        question="Which word is a noun?",
        choices=["dog", "run"],
        answer=0,
        hint="",
        image=None,
        subject="language science",
        grade="grade10",
        split="test",
    ),
    "105": dict(
        question="Which is a continent?",
        choices=["Peru", "Asia"],
        answer=1,
        hint="",
        image="image.png",
        subject="social science",
        grade="grade3",
        split="train",
    ),
}
PREDICTIONS = [0, 0, 2, 0, 0]


@pytest.fixture
def five(tmp_path):
    path = tmp_path / "problems.json"
    path.write_text(json.dumps(FIVE))
    return load_problems(path)


def test_accuracy_tables_equal_a_hand_count(five):
    report = accuracy_report(five, PREDICTIONS)
    acc = {
        group: {k: (e["correct"], e["n"]) for k, e in report[group].items()} for group in report if group != "overall"
    }
    assert (report["overall"]["correct"], report["overall"]["n"]) == (3, 5)
    assert report["overall"]["accuracy"] == pytest.approx(60.0)
    assert acc["by_subject"] == {"natural science": (1, 2), "social science": (1, 2), "language science": (1, 1)}
    assert acc["by_image"] == {"with image": (2, 3), "without image": (1, 2)}
    assert acc["by_answer"] == {"A": (2, 2), "B": (0, 2), "C": (1, 1)}
    assert acc["by_grade"] == {"G1-6": (2, 3), "G7-12": (1, 2)}
    assert report["by_image"]["with image"]["accuracy"] == pytest.approx(200 / 3)
    table = format_report(report)
    assert "overall  all" in table and "60.00%" in table and "66.67%" in table
    with pytest.raises(ValueError, match="4 predictions for 5 problems"):
        accuracy_report(five, PREDICTIONS[:4])


def test_loading_formats_splits_and_prompt(tmp_path, five):
    assert [p.image for p in five] == ["101", None, "103", None, "105"]  # official: the image id is the qid
    assert five[1].context == "Think about summer."
    assert len(load_problems(tmp_path / "problems.json", split="test")) == 4
    record = to_record(five[2])
    assert record == {
        "instruction": "Which city is a capital?\nOptions: (A) Lyon (B) Nice (C) Paris",
        "input": "",
        "output": "The answer is C.",
        "image": "103",
    }
    assert to_record(five[2], choice=0)["output"] == "The answer is A."

    listed = tmp_path / "list.jsonl"
    listed.write_text(json.dumps(dict(question="q", choices=["a", "b"], answer=1, image="pics/cat.png", id="x")) + "\n")
    (p,) = load_problems(listed)
    assert (p.qid, p.image, p.answer, p.context) == ("x", "cat", 1, "")
    for bad, match in (
        (dict(question="q", choices=["a"], answer=0), "choices"),
        (dict(question="q", choices=["a", "b"], answer=2), "answer"),
        (dict(question="q", answer=0), "missing field 'choices'"),
    ):
        listed.write_text(json.dumps([bad]))
        with pytest.raises(DataError, match=f"record 0.*{match}"):
            load_problems(listed)
    listed.write_text(json.dumps([dict(question="q", choices=["a", "b"], answer=0)]))
    with pytest.raises(DataError, match="no 'split'"):
        load_problems(listed, split="test")


def tiny(visual_dim=None):
    torch.manual_seed(0)
    model = LLaMA(ModelArgs.from_name("tiny", max_seq_len=128), dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.attach_adapter(AdapterConfig(adapter_len=3, adapter_layers=2, visual_dim=visual_dim, visual_hidden=8))
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.adapter_gate.fill_(0.5)
    return model


def test_predict_picks_the_most_likely_answer_with_image_features(five):
    tok = WordTokenizer()
    model = tiny(visual_dim=4)
    feats = {p.image: torch.randn(4, dtype=torch.float64) for p in five if p.image}

    class Store(dict):
        dim = 4

    got = predict(model, tok, five, Store(feats))
    for p, pred in zip(five, got):  # oracle: each option's answer log-likelihood, one sequence at a time
        image = feats[p.image] if p.image else torch.zeros(4, dtype=torch.float64)
        scores = []
        for c in range(len(p.choices)):
            rec = to_record(p, c)
            prompt = tok.encode(alpaca_prompt(rec["instruction"], rec["input"]), bos=True, eos=False)
            answer = tok.encode(rec["output"], bos=False, eos=True)
            with torch.no_grad():
                logp = model(torch.tensor([prompt + answer]), image_features=image[None]).log_softmax(-1)[0]
            scores.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(answer)))
        assert pred == max(range(len(scores)), key=scores.__getitem__)
    with pytest.raises(ValueError, match="image features are required"):
        predict(model, tok, five, None)


def test_finetune_with_image_features_then_eval_through_the_cli(tmp_path, five):
    """prepare-scienceqa -> finetune --image-features (the same trainer, V2 switches on) -> eval-scienceqa."""
    from helpers import random_hf_model, tiny_hf_config, train_sentencepiece, write_meta_dir

    from llama_adapter.cli import main

    ckpt = write_meta_dir(
        random_hf_model(tiny_hf_config(vocab_size=100, max_position_embeddings=256)),
        tmp_path / "ckpt",
        dtype=torch.float32,
    )
    train_sentencepiece(tmp_path / "ckpt")
    torch.save({"features": torch.randn(5, 2, 3), "ids": list(FIVE)}, tmp_path / "feats.pt")
    (tmp_path / "problems.json").write_text(json.dumps(FIVE))
    assert (
        main(["prepare-scienceqa", "--data", str(tmp_path / "problems.json"), "--out", str(tmp_path / "t.jsonl")]) == 0
    )
    assert (
        main(
            [
                "finetune",
                "--model",
                ckpt,
                "--data",
                str(tmp_path / "t.jsonl"),
                "--out",
                str(tmp_path / "run"),
                "--image-features",
                str(tmp_path / "feats.pt"),
                "--bias-tuning",
                "--early-fusion",
                "1",
                "--adapter-len",
                "2",
                "--adapter-layers",
                "2",
                "--global-batch-size",
                "2",
                "--micro-batch-size",
                "1",
                "--epochs",
                "1",
                "--warmup-epochs",
                "0",
                "--val-fraction",
                "0",
                "--max-seq-len",
                "256",
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["adapter"]
    assert cfg["visual_dim"] == 6 and cfg["bias_tuning"] and cfg["early_fusion"] == 1
    out = tmp_path / "report.json"
    assert (
        main(
            [
                "eval-scienceqa",
                "--model",
                ckpt,
                "--adapter",
                str(tmp_path / "run" / "adapter"),
                "--data",
                str(tmp_path / "problems.json"),
                "--split",
                "test",
                "--image-features",
                str(tmp_path / "feats.pt"),
                "--out",
                str(out),
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["overall"]["n"] == 4 and set(report["predictions"]) == {"101", "102", "103", "104"}
    right = sum(v["predicted"] == v["answer"] for v in report["predictions"].values())
    assert report["overall"]["correct"] == right
    assert ImageFeatures(tmp_path / "feats.pt", expected_dim=6).dim == 6
