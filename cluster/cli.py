"""The `specfleet` command."""

import argparse
import sys

from actors.errors import SpecfleetError
from cluster.bench_command import add_bench_command
from cluster.generate_command import add_generate_command
from cluster.health_command import add_health_command
from cluster.status_command import add_status_command
from cluster.up_command import add_up_command
from cluster.zoo.cli import add_zoo_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specfleet", description="Speculative decoding, one drafter for many targets.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_command(subparsers)
    add_up_command(subparsers)
    add_status_command(subparsers)
    add_health_command(subparsers)
    add_zoo_commands(subparsers)
    add_bench_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecfleetError as err:
        print(f"specfleet: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
