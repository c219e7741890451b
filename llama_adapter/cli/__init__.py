"""`llama-adapter` command line: adapter fine-tuning, generation, demo and evaluation.

All command-line code lives in this package, one module per command; the library modules it calls parse no
arguments.

Errors: argparse reports a bad flag (every number flag is checked by a rule of llama_adapter.validation); a user
error (`user_errors`) while a command runs prints one line `llama-adapter: error: ...` and exits 1; Ctrl-C
exits 130. `--debug` or LLAMA_ADAPTER_DEBUG=1 shows the traceback instead.

A module listed in SUBCOMMANDS exposes `register(subparsers)`, which adds its parser(s) and sets
`func=callable(args) -> int` on them. Modules load only when the command line is built, so importing
`llama_adapter` does not import every command's dependencies. A config dataclass is built from the parsed
arguments by field name (`config_from_args`): a flag's dest is the field it sets.
"""

import argparse
import os
import sys
from dataclasses import fields
from importlib import import_module

SUBCOMMANDS = (
    "llama_adapter.cli.generate",  # generate
    "llama_adapter.cli.finetune",  # finetune
    "llama_adapter.cli.demo",  # demo
    "llama_adapter.cli.features",  # extract-features
    "llama_adapter.cli.scienceqa",  # eval-scienceqa, prepare-scienceqa
)


DEBUG_HELP = "show the traceback of an error (also: LLAMA_ADAPTER_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-adapter", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        import_module(name).register(subparsers)
    for sub in subparsers.choices.values():  # `llama-adapter finetune ... --debug` works too
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def config_from_args(cls, args: argparse.Namespace, **given):
    """`cls` (a dataclass) from the arguments named like its fields; `given` fields override them, and fields
    with no such argument keep their defaults."""
    from_args = {f.name: getattr(args, f.name) for f in fields(cls) if f.init and hasattr(args, f.name)}
    return cls(**{**from_args, **given})


def user_errors() -> tuple[type[BaseException], ...]:
    """What counts as a user error, reported in one line: a problem with the inputs (files, data, configs,
    flags, the device asked for) or the environment (disk, memory, a missing optional package). ValueError
    covers the project's CheckpointError, DataError, ConfigError and RunDirectoryError and every argument check;
    OSError missing, unreadable or full files and disks. Anything else is a bug and keeps its traceback."""
    import torch

    return (ValueError, OSError, ModuleNotFoundError, torch.OutOfMemoryError)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("LLAMA_ADAPTER_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except user_errors() as e:
        if debug:
            raise
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"llama-adapter: error: {message} (--debug shows where)", file=sys.stderr)
        return 1
