"""Helpers shared by the zoo tests (a unique module name: top-level tests have their own conftest)."""

import argparse

from cluster.zoo.cli import add_zoo_commands


def run_cli(argv: list[str]) -> int:
    """Parse argv as the main CLI would after `add_zoo_commands`, then run the chosen command."""
    parser = argparse.ArgumentParser()
    add_zoo_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
