"""README.md as a tested contract: every ```python block and every `llama-adapter` / `torchrun` command in it runs.

Blocks run with `exec`, in README order, one namespace per section, in a directory holding tiny random stand-ins
for the checkpoints README names (the fixture mapping README states under *Python*):

    llama-2-7b/                 Meta dir: params.json, consolidated.00.pth, SentencePiece tokenizer.model
    llama-2-70b/                the same dir (a link)
    Llama-3.1-8B-hf/            the same weights as a Hugging Face dir (config.json, model.safetensors)
    meta-llama/Llama-2-7b-hf    the same again (transformers reads a local dir of that name)
    Llama-3.1-8B-Instruct/      Meta dir with a LLaMA-3 tiktoken tokenizer.model
    peft_adaption_prompt_dir/, peft_dir    written by PEFT's own AdaptionPrompt (K=10, L=30) for those weights
    llama_adapter_len10_layer30_release.pth   the official v1 layout (adapter_query + per-head gates)
    adapters/poet               our adapter dir (default AdapterConfig)
    alpaca_data.json            a few demo instruction records; chat.jsonl: README's one conversation

The weights have 32 layers (as 7B) at width 64, so README's `adapter_layers=30` applies as written. A block whose
first line is `# GPU only` is skipped without CUDA, with that reason. Commands: `DIR` and `/path/to/...` become
`llama-2-7b/`; every command must parse; the cheap ones (generate) also run, on the CPU without CUDA.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA
from helpers import random_hf_model, tiny_hf_config, write_meta_dir
from tokenizer_files import write_llama3_ranks

from llama_adapter import demo
from llama_adapter.cli import build_parser, main
from llama_adapter.data import load_examples

README = Path(__file__).resolve().parent.parent / "README.md"
N_LAYERS, VOCAB = 32, 400
GPU_ONLY = "# GPU only"


def readme_sections() -> list[tuple[str, list[str], list[str]]]:
    """(heading, python blocks, commands) per section of README, in order; a command's continuation lines joined."""
    sections, title, blocks, commands = [], "(top)", [], []
    lines = README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            sections.append((title, blocks, commands))
            title, blocks, commands = line.lstrip("#").strip(), [], []
        elif line.startswith("```python"):
            j = lines.index("```", i + 1)
            blocks.append("\n".join(lines[i + 1 : j]))
            i = j
        elif re.match(r"    (llama-adapter|torchrun) ", line):
            command = line.strip()
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            commands.append(command.split("  #")[0].strip())
        i += 1
    sections.append((title, blocks, commands))
    return [s for s in sections if s[1] or s[2]]


SECTIONS = readme_sections()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    paragraphs = (demo.DATA_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()[:60]
    records = load_examples(demo.DATA_DIR / "instructions.json")[:4]
    texts = paragraphs + [f"{r['instruction']} {r['input']} {r['output']}" for r in records]
    sp_model = demo.train_tokenizer(texts, root / "sp" / "tokenizer.model", vocab_size=VOCAB)

    config = tiny_hf_config(num_hidden_layers=N_LAYERS, vocab_size=VOCAB, max_position_embeddings=256)
    hf_model = random_hf_model(config, dtype=torch.float32)
    write_meta_dir(hf_model, root / "llama-2-7b")
    (root / "llama-2-70b").symlink_to(root / "llama-2-7b")
    for hf_dir in ("Llama-3.1-8B-hf", "meta-llama/Llama-2-7b-hf"):
        hf_model.save_pretrained(root / hf_dir)
    for d in ("llama-2-7b", "Llama-3.1-8B-hf", "meta-llama/Llama-2-7b-hf"):
        shutil.copy(sp_model, root / d / "tokenizer.model")

    from peft import AdaptionPromptConfig, get_peft_model

    peft_config = AdaptionPromptConfig(adapter_len=10, adapter_layers=30, task_type="CAUSAL_LM")
    peft_model = get_peft_model(random_hf_model(config, dtype=torch.float32), peft_config)
    for peft_dir in ("peft_adaption_prompt_dir", "peft_dir"):
        peft_model.save_pretrained(root / peft_dir)

    gen = torch.Generator().manual_seed(0)
    official = {"adapter_query.weight": torch.randn(30 * 10, config.hidden_size, generator=gen)}
    heads = config.num_attention_heads
    official.update({f"layers.{i}.attention.gate": torch.randn(1, heads, 1, 1, generator=gen) for i in range(N_LAYERS)})
    torch.save(official, root / "llama_adapter_len10_layer30_release.pth")

    from llama_adapter import AdapterConfig, LLaMA

    LLaMA.from_pretrained(root / "llama-2-7b", adapter=AdapterConfig()).save_adapter(root / "adapters" / "poet")

    instruct = root / "Llama-3.1-8B-Instruct"
    n_words = len(Path(write_llama3_ranks(instruct / "tokenizer.model")).read_text().splitlines()) + 256
    write_meta_dir(
        random_hf_model(tiny_hf_config(num_hidden_layers=2, vocab_size=n_words), dtype=torch.float32), instruct
    )

    (root / "alpaca_data.json").write_text(json.dumps(records), encoding="utf-8")
    chat = {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    }
    (root / "chat.jsonl").write_text(json.dumps(chat) + "\n", encoding="utf-8")
    return root


def test_readme_has_blocks_and_commands():
    titles = [t for t, blocks, _ in SECTIONS if blocks]
    assert len(titles) >= 8, titles
    assert sum(len(c) for _, _, c in SECTIONS) >= 10


@pytest.mark.parametrize("title", [t for t, blocks, _ in SECTIONS if blocks])
def test_python_blocks_run(title, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    blocks = next(blocks for t, blocks, _ in SECTIONS if t == title)
    namespace: dict = {"__name__": "__readme__"}
    skipped = []
    for n, block in enumerate(blocks):
        if block.startswith(GPU_ONLY) and not HAS_CUDA:
            skipped.append(n)
            continue
        exec(compile(block, f"README.md [{title}] block {n}", "exec"), namespace)
    if skipped:
        pytest.skip(f"README [{title}] block(s) {skipped} marked '{GPU_ONLY}': no CUDA here (the others ran)")


SUBSTITUTIONS = [
    (r"(?<![\w/.-])(DIR|/path/to/llama-7b|/path/to/llama-2-70b|\./llama-7b|llama-2-70b/)(?![\w/.-])", "llama-2-7b/"),
    (r"--adapter PATH", "--adapter adapters/poet"),
]


def as_argv(command: str) -> list[str]:
    """The command's arguments after `llama-adapter` (or torchrun's `-m llama_adapter`), brackets dropped."""
    for pattern, repl in SUBSTITUTIONS:
        command = re.sub(pattern, repl, command)
    argv = shlex.split(command.replace("[", "").replace("]", ""))
    if argv[0] == "torchrun":
        argv = argv[argv.index("llama_adapter") + 1 :]
    else:
        argv = argv[1:]
    if not HAS_CUDA and "--device" in argv:
        argv[argv.index("--device") + 1] = "cpu"
    return argv


def runnable(argv: list[str]) -> list[str]:
    """A command as run here: 4 new tokens; off CUDA, the reference backend (conftest sets TRITON_INTERPRET=1,
    under which `auto` would run the kernels in the interpreter; a user's CPU run gets the reference anyway)."""
    argv = list(argv)
    if "--max-new-tokens" in argv:
        argv[argv.index("--max-new-tokens") + 1] = "4"
    else:
        argv += ["--max-new-tokens", "4"]
    if not HAS_CUDA:
        argv += ["--backend", "reference"]
    return argv


ALL_COMMANDS = [c for _, _, commands in SECTIONS for c in commands]


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_commands_parse(command, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    build_parser().parse_args(as_argv(command))  # argparse exits (a failure here) on anything it refuses


def is_cheap(command: str) -> bool:
    """Run here, not only parsed: generate and single-process finetune (torchrun and the ScienceQA pipeline,
    which needs CLIP and images, are parsed only)."""
    return (
        command.startswith(("llama-adapter generate", "llama-adapter finetune")) and "--image-features" not in command
    )


RUN = [(title, [c for c in commands if is_cheap(c)]) for title, _, commands in SECTIONS]
RUN = [(title, commands) for title, commands in RUN if commands]


@pytest.mark.parametrize("title", [title for title, _ in RUN])
def test_cheap_commands_run(title, workdir, tmp_path, monkeypatch, capsys):
    """A section's commands in order (a generate may use the adapter its finetune wrote), in a fresh directory
    that links the fixtures, so two sections writing runs/alpaca do not meet."""
    for entry in workdir.iterdir():
        (tmp_path / entry.name).symlink_to(entry)
    monkeypatch.chdir(tmp_path)
    for command in dict(RUN)[title]:
        argv = as_argv(command)
        if argv[0] == "generate":  # finetune takes the backend conftest set (reference) and runs as written
            argv = runnable(argv)
        assert main(argv) == 0, command
        out = capsys.readouterr()
        assert out.out.strip(), command


def test_trainable_parameter_figures_match_the_7b_model():
    """README's "1,229,760 || ... || trainable%: 0.0182" and "1.2M" are what a 7B with K=10, L=30 reports."""
    from llama_adapter import AdapterConfig, LLaMA, ModelArgs

    model = LLaMA(ModelArgs.from_name("7B"), AdapterConfig(adapter_len=10, adapter_layers=30), device="meta")
    summary = model.trainable_summary()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 1_229_760 and "trainable params: 1,229,760" in summary
    text = README.read_text(encoding="utf-8")
    percent = re.search(r"trainable params: 1,229,760 \|\| all params: \.\.\. \|\| trainable%: ([\d.]+)", text)
    assert percent and percent.group(1) in summary
    assert "1.2M trainable parameters for 7B (K=10, L=30)" in text


def test_demo_figures_match_the_demo():
    """The *make demo* paragraph's sizes: held-out count and the base's parameter count (the demo's defaults)."""
    from llama_adapter import LLaMA, ModelArgs

    text = README.read_text(encoding="utf-8")
    heldout = len(load_examples(demo.DATA_DIR / "heldout.json"))
    assert f"On {heldout} held-out instructions" in text
    shape = {**demo.TINY, "n_heads": demo.TINY["dim"] // 32}  # run_demo's shape at its default --dim/--layers
    args = build_parser().parse_args(["demo"])
    model = LLaMA(ModelArgs(vocab_size=args.vocab_size, **shape), device="meta")
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert f"pretrains a {millions:.1f}M-parameter LLaMA" in text, millions
