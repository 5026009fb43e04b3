"""`specfleet zoo train`, `zoo eval` and `zoo cards`, registered on the main CLI's subparsers."""

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_OUT = Path("models")
# Each command imports the zoo's modules (torch, transformers) when it runs: building the CLI's parser must
# stay light, so that `specfleet generate --server` and `specfleet status` start without them.


def add_zoo_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `zoo train`, `zoo eval` and `zoo cards`; each sets `func`, which returns an exit code."""
    zoo = subparsers.add_parser("zoo", help="train and evaluate the model zoo (targets and a sorted drafter)")
    commands = zoo.add_subparsers(dest="zoo_command", required=True)

    train = commands.add_parser("train", help="build the corpus manifest, tokenizer, targets and drafter")
    train.add_argument("--preset", default="full", help="settings preset: smoke, cpu or full (default: full)")
    train.add_argument("--config", type=Path, help="a ZooConfig JSON, e.g. an edited zoo_config.json; replaces --preset")
    train.add_argument("--out", type=Path, help=f"output directory (default: the config's, {DEFAULT_OUT} for presets)")
    train.add_argument("--models", help="comma-separated subset to train, e.g. target-s,drafter (default: all)")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: the config's)")
    train.set_defaults(func=run_train)

    evaluate = commands.add_parser("eval", help="held-out loss and the exit x target acceptance matrix")
    evaluate.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the zoo directory (default: {DEFAULT_OUT})")
    evaluate.add_argument("--eval-tokens", type=int, help="test tokens to score (default: the zoo config's eval_tokens)")
    evaluate.add_argument("--json", type=Path, help="report path (default: <out>/eval.json)")
    evaluate.add_argument("--markdown", type=Path, help="table path (default: <out>/eval.md)")
    evaluate.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    evaluate.add_argument("--manifest", type=Path, help="score this manifest's test split (default: the zoo's own)")
    evaluate.add_argument("--context", type=int, help="window length in tokens (default: the zoo's training context)")
    evaluate.set_defaults(func=run_eval)

    cards = commands.add_parser("cards", help="render the model cards of a trained zoo again (weights are only read)")
    cards.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the zoo directory (default: {DEFAULT_OUT})")
    cards.set_defaults(func=run_cards)


def _config(args: argparse.Namespace):
    from cluster.zoo.config import PRESETS, ZooConfig, preset

    if not args.config and args.preset not in PRESETS:
        raise SystemExit(f"specfleet zoo train: unknown preset {args.preset!r}; known: {', '.join(sorted(PRESETS))}")
    config = ZooConfig.model_validate_json(args.config.read_text()) if args.config else preset(args.preset, DEFAULT_OUT)
    updates = {"out_dir": args.out, "threads": args.threads}
    return config.model_copy(update={k: v for k, v in updates.items() if v is not None})


def run_train(args: argparse.Namespace) -> int:
    from cluster.zoo.pipeline import model_names, train_zoo

    _log_to_stderr()
    config = _config(args)
    only = args.models.split(",") if args.models else None
    sizes = train_zoo(config, only)
    for name, size in sizes.items():
        print(f"{name}: {size / 2**20:.2f} MiB")
    print(f"total weights: {sum(sizes.values()) / 2**20:.2f} MiB of {config.budget_mib} MiB; models: {', '.join(model_names(config))}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from cluster.zoo.evaluate import evaluate_zoo, to_markdown
    from cluster.zoo.pipeline import torch_threads

    _log_to_stderr()
    with torch_threads(args.threads):
        report = evaluate_zoo(args.out, args.eval_tokens, args.manifest, args.context)
    markdown = to_markdown(report)
    (args.json or args.out / "eval.json").write_text(report.model_dump_json(indent=1))
    (args.markdown or args.out / "eval.md").write_text(markdown)
    print(markdown)
    return 0


def run_cards(args: argparse.Namespace) -> int:
    from cluster.zoo.config import ZooConfig
    from cluster.zoo.pipeline import CONFIG_FILE, write_cards

    config = ZooConfig.model_validate_json((args.out / CONFIG_FILE).read_text()).model_copy(update={"out_dir": args.out})
    for name in write_cards(config):
        print(f"{name}: {args.out / name / 'README.md'}")
    return 0


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m cluster.zoo.cli zoo train ...`) until the main CLI registers these."""
    parser = argparse.ArgumentParser(prog="specfleet")
    add_zoo_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
