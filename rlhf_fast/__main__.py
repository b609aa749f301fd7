"""Command line: ``python -m rlhf_fast info|bench|sft|rm|rl|demo|demo-data`` (also installed as ``rlhf-fast``)."""

from __future__ import annotations

import argparse
import sys

from .extras import MissingExtra, missing, require
from .info import print_info

TRAIN_COMMANDS = ("sft", "rm", "demo-data", "rl", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description="Fused RLHF losses: tools and training.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions and, for each backend, whether it is usable here and why not")
    commands.add_parser("bench", add_help=False, help="the benchmark suite (rlhf-fast bench --help)")
    if missing("train"):  # still listed; running one says what to install (main)
        for name in TRAIN_COMMANDS:
            commands.add_parser(name, help="needs the [train] extra: python -m pip install 'rlhf_fast[train]'")
        return parser
    from .train.cli import add_commands
    from .train.rl.cli import add_rl_commands

    add_commands(commands)
    add_rl_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    try:
        if command == "bench":  # the suite parses its own options
            from .bench.suite import main as bench_main

            return bench_main(argv[1:])
        if command in TRAIN_COMMANDS:
            require("train", f"rlhf-fast {command}")
    except MissingExtra as error:
        print(f"rlhf-fast: {error}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if args.command == "info":
        print_info()
        return 0
    from .train.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
