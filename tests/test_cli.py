"""The command line's error contract: a bad flag is an argparse error naming the flag, a user error while a command
runs is one line `llama-adapter: error: ...` and exit 1, `--debug` / LLAMA_ADAPTER_DEBUG=1 shows the traceback."""

import argparse
import ast
from pathlib import Path

import pytest
import torch

from llama_adapter.cli import build_parser, main
from llama_adapter.validation import Number


def _numeric_actions():
    parser = build_parser()
    for command, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.type in (int, float) or isinstance(action.type, Number):
                yield command, action


def test_every_number_flag_is_checked_by_a_validation_rule():
    """No flag parses a bare int/float: each has a rule with its type and range (0, nan and inf are refused
    where they make no sense)."""
    actions = list(_numeric_actions())
    assert len(actions) > 30
    bare = [f"{command} {action.option_strings[0]}" for command, action in actions if action.type in (int, float)]
    assert bare == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["finetune", "--micro-batch-size", "0"], "argument --micro-batch-size: must be an int >= 1, got '0'"),
        (["finetune", "--global-batch-size", "0"], "argument --global-batch-size: must be an int >= 1, got '0'"),
        (["finetune", "--epochs", "nan"], "argument --epochs: must be a number > 0, got 'nan'"),
        (["finetune", "--blr", "inf"], "argument --blr: must be a number >= 0, got 'inf'"),
        (["finetune", "--val-fraction", "1"], "argument --val-fraction: must be a number in [0, 1), got '1'"),
        (["finetune", "--adapter-len", "2.5"], "argument --adapter-len: must be an int >= 1, got '2.5'"),
        (["generate", "--max-new-tokens", "0"], "argument --max-new-tokens: must be an int >= 1, got '0'"),
        (["generate", "--temperature", "-1"], "argument --temperature: must be a number >= 0, got '-1'"),
        (["generate", "--top-p", "0"], "argument --top-p: must be a number in (0, 1], got '0'"),
        (["demo", "--pretrain-steps", "0"], "argument --pretrain-steps: must be an int >= 1, got '0'"),
        (["extract-features", "--batch-size", "0"], "argument --batch-size: must be an int >= 1, got '0'"),
        (["eval-scienceqa", "--limit", "-3"], "argument --limit: must be an int >= 1, got '-3'"),
    ],
)
def test_bad_numbers_are_refused_naming_the_flag(argv, message, capsys):
    required = {
        "finetune": ["--model", "m", "--data", "d", "--out", "o"],
        "generate": ["--model", "m", "--instruction", "i"],
        "extract-features": ["--clip", "c", "--images", "i", "--out", "o"],
        "eval-scienceqa": ["--model", "m", "--adapter", "a", "--data", "d"],
        "demo": [],
    }
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *required[argv[0]]])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["generate", "--model", str(tmp_path / "absent"), "--instruction", "Hi", "--device", "cpu"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"llama-adapter: error: checkpoint directory not found: {tmp_path / 'absent'} (--debug shows where)\n"
    with pytest.raises(FileNotFoundError):
        main([*argv, "--debug"])
    monkeypatch.setenv("LLAMA_ADAPTER_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(argv)


def test_a_bad_data_line_is_a_one_line_error(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "b"}\n')
    argv = ["finetune", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "run")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.jsonl:2: field 'instruction' must be a string" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_asking_for_cuda_on_a_cpu_only_install_is_one_sentence_before_any_work(tmp_path, capsys, monkeypatch):
    absent = str(tmp_path / "absent")  # the device is checked before the model or data are looked at
    for argv in (
        ["generate", "--model", absent, "--instruction", "Hi", "--device", "cuda"],
        ["finetune", "--model", absent, "--data", absent, "--out", absent, "--device", "cuda:0"],
        ["eval-scienceqa", "--model", absent, "--adapter", absent, "--data", absent, "--device", "cuda"],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("llama-adapter: error: --device 'cuda") and "CPU-only build" in err, err
        assert err.count("\n") == 1
    monkeypatch.delenv("TRITON_INTERPRET")
    assert main(["generate", "--model", absent, "--instruction", "Hi", "--device", "cpu", "--backend", "triton"]) == 1
    err = capsys.readouterr().err
    assert "--backend triton needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)" in err


def test_help_lists_the_debug_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--debug" in capsys.readouterr().out
    assert isinstance(build_parser(), argparse.ArgumentParser)


def test_no_flag_anywhere_parses_a_bare_int_or_float():
    """The benchmarks and tools share the rules too: `add_argument(..., type=int|float)` appears nowhere."""
    root = Path(__file__).resolve().parents[1]
    bare = []
    for path in [*root.joinpath("llama_adapter").rglob("*.py"), *root.joinpath("benchmarks").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("add_argument"):
                for keyword in node.keywords:
                    if keyword.arg == "type" and ast.unparse(keyword.value) in ("int", "float"):
                        bare.append(f"{path.relative_to(root)}:{node.lineno}")
    assert bare == []


def test_command_line_code_lives_in_the_cli_package_only():
    """Library modules parse no arguments and register no command: `llama_adapter/cli/` holds all of that."""
    root = Path(__file__).resolve().parents[1] / "llama_adapter"
    # validation's rules are argparse types as well as argument checks; kernel_report is a developer tool of its
    # own (`python -m llama_adapter.kernel_report`), not a command of `llama-adapter`
    allowed = {root / "validation.py", root / "kernel_report.py"}
    found = []
    for path in root.rglob("*.py"):
        if path.parent == root / "cli" or path in allowed:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                imported = [node.module or ""]
            named = node.name if isinstance(node, ast.FunctionDef) else ""
            if "argparse" in imported or named == "register_cli":
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found == []
    assert {p.stem for p in (root / "cli").glob("*.py")} >= {"__init__", "generate", "finetune", "demo"}


def test_finetune_configs_are_built_from_the_arguments_by_field_name():
    from llama_adapter import AdapterConfig
    from llama_adapter.cli import config_from_args
    from llama_adapter.cli.finetune import finetune_args
    from llama_adapter.recipe import TrainConfig

    recipe = dict(epochs=2, warmup_epochs=0.5, global_batch_size=8, micro_batch_size=2, blr=0.1, weight_decay=0.5)
    steps = dict(seed=3, eval_every=4, save_every=5, max_steps=6, resume=True, fsdp=True)
    switches = dict(no_progress=True, no_pack=True, adapter_len=7, bias_tuning=True, early_fusion=1)
    args = finetune_args("m", "d", "o", **recipe, **steps, **switches)
    expected = TrainConfig(out_dir="o", **recipe, **steps, progress=False, pack=False)
    assert config_from_args(TrainConfig, args) == expected
    # every default is the config's own, packing ("auto") and progress on
    default = finetune_args("m", "d", "o", overwrite=True)
    assert config_from_args(TrainConfig, default) == TrainConfig(out_dir="o", overwrite=True)
    adapter = config_from_args(AdapterConfig, args, adapter_layers=2, visual_dim=12)
    assert adapter == AdapterConfig(adapter_len=7, adapter_layers=2, bias_tuning=True, early_fusion=1, visual_dim=12)
