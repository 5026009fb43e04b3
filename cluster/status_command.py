"""`specfleet status`: the controller's current plan per target, the acceptance of each arm, and each actor's live sequences."""

import argparse
import json

from google.protobuf.json_format import MessageToDict

from cluster.client import Credentials, add_credential_arguments, stats_remote
from specfleet.v1 import generation_pb2 as pb


def add_status_command(subparsers) -> None:
    parser = subparsers.add_parser("status", help="show the controller's plans, acceptance per (target, drafter, exit, k) and each actor's live sequences")
    parser.add_argument("--server", default="127.0.0.1:50051", help="gRPC address of a running `specfleet up`")
    parser.add_argument("--json", action="store_true", help="print the GetStats response as JSON")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server")
    add_credential_arguments(parser)
    parser.set_defaults(func=run_status)


def run_status(args: argparse.Namespace) -> int:
    stats = stats_remote(args.server, args.timeout, Credentials.from_args(args))
    if args.json:
        print(json.dumps(MessageToDict(stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True), indent=2))
    else:
        print(format_status(stats))
    return 0


def _draft(plan_or_pair) -> str:
    """How an arm drafts: its tree shape, else k (0: plain)."""
    return plan_or_pair.tree or f"k {plan_or_pair.k}"


def format_status(stats: pb.GetStatsResponse) -> str:
    lines = ["plans", f"  {'target':<12} {'drafter':<10} {'exit':>4} {'draft':>11} {'replicas':>8}  reason"]
    for p in stats.plans:
        exit_text = str(p.exit_layer or "deep") if p.k else "-"
        lines.append(f"  {p.target:<12} {p.drafter or 'off':<10} {exit_text:>4} {_draft(p):>11} {p.replicas:>8}  {p.reason}")
    lines += ["", "acceptance per arm",
              f"  {'target':<12} {'drafter':<10} {'exit':>4} {'draft':>11} {'rounds':>8} {'accept':>7} {'MAL':>5} {'tok/s':>8}"]
    for p in stats.pairs:
        lines.append(f"  {p.target:<12} {p.drafter or 'plain':<10} {p.exit_layer or '-':>4} {_draft(p):>11} {p.rounds:>8} "
                     f"{p.acceptance_rate:>7.2f} {p.mean_accepted_length:>5.2f} {p.goodput_tokens_per_s:>8.1f}")
    lines += ["", "actors", f"  {'model':<12} {'role':<8} {'replica':>7} {'live':>5}  state"]
    for r in stats.replicas:
        lines.append(f"  {r.model:<12} {r.role:<8} {r.replica:>7} {r.live_sequences:>5}  {'up' if r.answered else 'no answer'}")
    return "\n".join(lines)
