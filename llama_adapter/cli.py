"""`llama-adapter` command line: each subcommand lives beside the code it runs.

A module listed in SUBCOMMANDS exposes `register_cli(subparsers)`, which adds its parser(s) and sets
`func=callable(args) -> int` on them. Modules load only when the command line is built, so a broken optional
feature never hides the others: its import error is reported when that subcommand is asked for.
"""

import argparse
import sys
from importlib import import_module

SUBCOMMANDS = (
    "llama_adapter.generation",  # generate
    "llama_adapter.train",  # finetune
    "llama_adapter.demo",  # demo
    "llama_adapter.multimodal",  # extract-features, eval-scienceqa
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-adapter", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # feature not built yet
                continue
            raise
        module.register_cli(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
