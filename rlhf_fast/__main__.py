"""Command line: ``python -m rlhf_fast info|bench|sft|rm|rl|demo|demo-data`` (also installed as ``rlhf-fast``)."""

from __future__ import annotations

import argparse
import sys

from .info import print_info


def build_parser() -> argparse.ArgumentParser:
    from .train.cli import add_commands
    from .train.rl_cli import add_rl_commands

    parser = argparse.ArgumentParser(prog="rlhf-fast", description="Fused RLHF losses: tools and training.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions and, for each backend, whether it is usable here and why not")
    commands.add_parser("bench", add_help=False, help="the benchmark suite (rlhf-fast bench --help)")
    add_commands(commands)
    add_rl_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the suite parses its own options
        from .bench.suite import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        print_info()
        return 0
    from .train.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
