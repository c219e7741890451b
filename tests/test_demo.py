"""The demo's pieces at a small size, and `llama-adapter finetune` end to end on a tiny Meta checkpoint."""

import json
import shlex

import pytest
import torch
from train_helpers import single_thread

from llama_adapter import LLaMA, ModelArgs, demo
from llama_adapter.attention import get_attention_backend, set_attention_backend
from llama_adapter.cli import build_parser, main
from llama_adapter.data import DataError, load_examples
from llama_adapter.prompts import alpaca_prompt
from llama_adapter.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures(single_thread.__name__)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, single_thread):
    """A SentencePiece tokenizer and a briefly pretrained 2-layer base, saved as a Meta checkpoint dir."""
    previous = get_attention_backend()
    set_attention_backend("reference")  # conftest's per-test fixture does not cover module fixtures
    root = tmp_path_factory.mktemp("base")
    paragraphs = (demo.DATA_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()[:40]
    records = load_examples(demo.DATA_DIR / "instructions.json")[:40]
    texts = paragraphs + [r["instruction"] + " " + r["input"] + " " + r["output"] for r in records]
    tokenizer = Tokenizer(demo.train_tokenizer(texts, root / "tok" / "tokenizer.model", vocab_size=400))
    torch.manual_seed(0)
    model = LLaMA(
        ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tokenizer.n_words, multiple_of=32, max_seq_len=256)
    )
    stream = demo.corpus_stream(tokenizer, paragraphs)
    losses = demo.pretrain(model, stream, steps=8, batch=4, seq_len=32, lr=1e-2, log=lambda *a: None)
    demo.save_base(model, root / "tok" / "tokenizer.model", root / "model")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    yield dict(root=root, tokenizer=tokenizer, model=model, losses=losses, data=data, stream=stream)
    set_attention_backend(previous)


def test_tokenizer_is_llama_style(tiny_base):
    tok = tiny_base["tokenizer"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (1, 2, -1, 400)
    ids = tok.encode("The capital of France is Paris.", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids[1:-1]) == "The capital of France is Paris."


def test_pretraining_lowers_the_loss(tiny_base):
    losses = tiny_base["losses"]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5


def test_saved_base_reloads_through_the_meta_loader(tiny_base):
    model, tokens = tiny_base["model"], tiny_base["stream"][:40].view(2, 20)
    loaded = LLaMA.from_pretrained(tiny_base["root"] / "model")
    assert loaded.adapter_config is None and loaded.params.max_seq_len == 256
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert Tokenizer.from_dir(tiny_base["root"] / "model").n_words == 400


def test_finetune_cli_resumes_saves_and_reloads(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "finetune",
        "--model",
        str(tiny_base["root"] / "model"),
        "--data",
        str(tiny_base["data"]),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--global-batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--max-seq-len",
        "256",
        "--blr",
        "2.0",
        "--val-fraction",
        "0.1",
        "--no-progress",
        "--adapter-layers",
        "30",
        "--adapter-len",
        "3",
    ]
    assert main([*argv, "--max-steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "adapting all 2" in printed and "lr 0.0625" in printed and "4 steps/epoch, 8 steps" in printed
    assert "train: 36 examples" in printed and "0 dropped" in printed
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]

    assert main([*argv, "--resume"]) == 0  # 36 training examples // 8 = 4 steps per epoch -> 8 steps
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(isinstance(r["sample"], str) for r in records if "val_loss" in r)
    assert (out / "loss.png").stat().st_size > 0

    adapter_files = sorted(p.name for p in (out / "adapter").iterdir())
    assert adapter_files == ["adapter_config.json", "adapter_model.safetensors"]
    tuned = LLaMA.from_pretrained(tiny_base["root"] / "model")
    tuned.load_adapter(out / "adapter")
    assert tuned.adapter_config.adapter_len == 3 and tuned.adapter_config.adapter_layers == 2
    assert (tuned.layers[1].attention.adapter_gate != 0).all()


def test_finetune_reports_bad_data_before_loading_a_model(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', encoding="utf-8")
    argv = ["finetune", "--model", str(tmp_path / "no-such-model"), "--data", str(bad), "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("llama-adapter: error: ") and err.count("\n") == 1
    assert "bad.jsonl:2: missing field 'output'" in err
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'output'"):
        main([*argv, "--debug"])
    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        main(
            [
                "--debug",
                "finetune",
                "--model",
                str(tmp_path / "no-such-model"),
                "--data",
                str(empty),
                "--out",
                str(tmp_path),
            ]
        )


def test_finetune_defaults_fit_a_small_model_and_a_small_data_set(tiny_base, tmp_path, capsys):
    """README's plain line on the demo-sized base (2 layers, 256-token context) and 3 examples: it runs, saying
    what it chose; an explicit --max-seq-len beyond the context is refused before the weights load."""
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in load_examples(tiny_base["data"])[:3]), encoding="utf-8")
    argv = [
        "finetune",
        "--model",
        str(tiny_base["root"] / "model"),
        "--data",
        str(data),
        "--no-progress",
        "--epochs",
        "1",
        "--val-fraction",
        "0",
    ]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert (
        "defaults for this model (2 layers, 256-token context): --max-seq-len 256 (the model's context), "
        "--adapter-layers 2 (all the model's layers)"
    ) in printed
    note = "note: 3 training examples are fewer than one global batch (64); using --global-batch-size 3 --micro-"
    assert note + "batch-size 3" in printed
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert main([*argv, "--out", str(tmp_path / "run2"), "--max-seq-len", "512"]) == 1
    assert "--max-seq-len 512 exceeds the model's max_seq_len 256" in capsys.readouterr().err


def test_finetune_into_an_existing_run_is_refused_before_loading_a_model(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "finetune",
        "--model",
        str(tiny_base["root"] / "model"),
        "--data",
        str(tiny_base["data"]),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--global-batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--max-seq-len",
        "256",
        "--no-progress",
        "--adapter-len",
        "2",
        "--max-steps",
        "1",
    ]
    assert main(argv) == 0
    checkpoint = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    missing_model = [a if a != str(tiny_base["root"] / "model") else str(tmp_path / "none") for a in argv]
    assert main(missing_model) == 1  # the run directory is checked first
    err = capsys.readouterr().err
    assert "already holds a run (checkpoint.pt, metrics.jsonl, adapter, loss.png)" in err
    assert "--resume" in err and "--overwrite" in err and err.count("\n") == 1
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    assert main([*argv, "--overwrite", "--seed", "1"]) == 0
    assert (out / "checkpoint.pt").read_bytes() != checkpoint
    with pytest.raises(SystemExit):
        main([*argv, "--overwrite", "--resume"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_generate_clamps_the_default_max_new_tokens_to_the_context(tiny_base, capsys):
    model_dir = tiny_base["root"] / "model"
    argv = [
        "generate",
        "--model",
        str(model_dir),
        "--instruction",
        "Name a colour.",
        "--backend",
        "reference",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0  # default --max-new-tokens 256 > what the 256-token context leaves after the prompt
    err = capsys.readouterr().err
    prompt_len = len(tiny_base["tokenizer"].encode(alpaca_prompt("Name a colour."), bos=True, eos=False))
    room = 256 - prompt_len
    assert f"note: --max-new-tokens 256 > the {room} tokens left in the model's 256-token context" in err
    assert main([*argv, "--max-new-tokens", "3"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_generate_explains_an_empty_answer(tiny_base, capsys, monkeypatch):
    from llama_adapter import generation

    eos = tiny_base["tokenizer"].eos_id  # a model whose first token ends the answer, as the demo adapter did
    monkeypatch.setattr(generation, "sample", lambda logits, *a: torch.full(logits.shape[:1], eos))
    argv = [
        "generate",
        "--model",
        str(tiny_base["root"] / "model"),
        "--instruction",
        "Name a colour.",
        "--input",
        "Paint",
        "--device",
        "cpu",
        "--max-new-tokens",
        "4",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "[0 tokens in" in err
    assert "note: the model stopped at once" in err and "without --input" in err and "--adapter" in err


def test_bundled_demo_data_is_small_and_held_out():
    total = sum(p.stat().st_size for p in demo.DATA_DIR.iterdir() if p.is_file())
    assert total < 300_000
    train = load_examples(demo.DATA_DIR / "instructions.json")
    heldout = load_examples(demo.DATA_DIR / "heldout.json")
    corpus = (demo.DATA_DIR / "corpus.txt").read_text(encoding="utf-8")
    train_answers = {r["output"] for r in train}
    assert len(heldout) >= 30
    for r in heldout:
        assert r["output"] not in train_answers  # never in fine-tuning...
        assert f"Question: {r['instruction']} Answer: {r['output']}" in corpus  # ...but known to the base


def test_demo_runs_end_to_end_at_a_tiny_size(tmp_path, capsys, monkeypatch):
    ran_with = []
    from llama_adapter.cli import demo as demo_command

    real_finetune = demo_command.finetune
    monkeypatch.setattr(demo_command, "finetune", lambda args: (ran_with.append(args), real_finetune(args))[1])
    argv = [
        "demo",
        "--out",
        str(tmp_path),
        "--dim",
        "64",
        "--layers",
        "1",
        "--pretrain-steps",
        "3",
        "--epochs",
        "1",
        "--vocab-size",
        "400",
        "--show",
        "2",
    ]
    main(argv)  # too small to learn anything: only the plumbing is checked here
    printed = capsys.readouterr().out
    for section in ("[tokenizer]", "[pretrain]", "[before]", "[finetune]", "[reload]", "[after]", "[done]"):
        assert section in printed
    assert "logits identical" in printed
    # the printed finetune command parses, through the CLI's own parser, to exactly the arguments the demo ran
    line = next(x for x in printed.splitlines() if x.startswith("[finetune] llama-adapter finetune"))
    pasted = vars(build_parser().parse_args(shlex.split(line)[2:]))
    ran = vars(ran_with[0])
    assert {k: v for k, v in pasted.items() if k not in ("func", "debug", "command")} == {
        k: v for k, v in ran.items() if k not in ("func", "debug", "command")
    }
    assert (tmp_path / "finetune" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "base" / "consolidated.00.pth").exists()
    assert (tmp_path / demo.DEMO_MARKER).is_file()
    assert main(argv) == 0  # `make demo` twice in a row: the second run rebuilds the first one's directory


def test_demo_refuses_an_out_that_holds_files_no_demo_wrote(tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "tokenizer.model").write_text("the user's")
    assert main(["demo", "--out", str(theirs), "--pretrain-steps", "1"]) == 1  # refused before any work
    err = capsys.readouterr().err
    assert f"--out {theirs} holds files that no demo wrote" in err and err.count("\n") == 1
    assert sorted(p.name for p in theirs.iterdir()) == ["tokenizer.model"]
    assert (theirs / "tokenizer.model").read_text() == "the user's"
    (tmp_path / "a_file").write_text("")
    with pytest.raises(demo.RunDirectoryError, match="--out .*a_file exists and is not a directory"):
        demo.claim_out_dir(tmp_path / "a_file")

    empty = tmp_path / "empty"
    empty.mkdir()
    demo.claim_out_dir(empty)
    demo.claim_out_dir(tmp_path / "new" / "out")
    assert (empty / demo.DEMO_MARKER).is_file() and (tmp_path / "new" / "out" / demo.DEMO_MARKER).is_file()
    (empty / "tokenizer.model").write_text("a previous demo's")
    demo.claim_out_dir(empty)  # a previous demo's directory is the demo's to rebuild
