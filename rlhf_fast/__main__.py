"""Command line: ``python -m rlhf_fast info`` (also installed as ``rlhf-fast``)."""

from __future__ import annotations

import argparse
import sys

from .info import print_info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description="Fused RLHF losses: tools and training.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions and, for each backend, whether it is usable here and why not")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        print_info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
