"""`specfleet generate`: one prompt through the in-process engine (`generate_local`) or a running server, with a
summary line. With `--server` it is a thin gRPC client: it imports neither torch nor transformers."""

import argparse
import json
import sys
import time
from pathlib import Path

from cluster.client import Credentials, add_credential_arguments, generate_remote
from specfleet.v1 import generation_pb2 as pb


def add_generate_command(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate a completion in-process (speculative by default)")
    parser.add_argument("prompt", help="the text to complete")
    parser.add_argument("--target", type=Path, default=None, help="target checkpoint folder (default: the zoo's largest target)")
    parser.add_argument("--server", help="call a running `specfleet up` at HOST:PORT instead of loading models here")
    parser.add_argument("--model", default="target-xl", help="with --server: the target model's name")
    parser.add_argument("--exit", type=int, default=None, help="with --server and --k: the drafter exit to use")
    parser.add_argument("--timeout", type=float, default=300.0, help="with --server: deadline of the call in seconds")
    add_credential_arguments(parser)
    drafting = parser.add_mutually_exclusive_group()
    drafting.add_argument("--drafter", default=None, help="drafter checkpoint folder, optionally PATH:EXIT (default: the zoo's drafter)")
    drafting.add_argument("--ngram", action="store_true", help="draft by prompt lookup (n-gram) instead of a model")
    drafting.add_argument("--no-spec", action="store_true", help="decode with the target alone")
    parser.add_argument("--k", type=int, default=None, help="draft tokens per round (default 4; with --server, the cluster's plan)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or float64")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text + summary")
    parser.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    if args.server:
        return _run_remote(args)
    from cluster.generate_local import run_local  # torch and the models: only when decoding here

    text, tokens, finish_reason, summary = run_local(args)
    _print(args, text, tokens, finish_reason, summary)
    return 0


def _run_remote(args: argparse.Namespace) -> int:
    """The request as the server validates it (its errors come back readable, as INVALID_ARGUMENT)."""
    request = pb.GenerateRequest(model=args.model, text=args.prompt, max_tokens=args.max_tokens,
                                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.seed is not None:
        request.seed = args.seed
    if args.no_spec:
        request.speculation.mode = pb.Speculation.OFF
    elif args.k is not None:
        request.speculation.CopyFrom(pb.Speculation(mode=pb.Speculation.FIXED, k=args.k, exit_layer=args.exit or 0))
    started = time.perf_counter()
    response = generate_remote(args.server, request, args.timeout, Credentials.from_args(args))
    spec = response.speculation
    summary = summary_fields(len(response.token_ids), spec.target_forwards, spec.mean_accepted_length, spec.acceptance_rate,
                       time.perf_counter() - started, spec.drafter or "none", spec.exit_layer or None, spec.k)
    finish = pb.FinishReason.Name(response.finish_reason).lower()
    _print(args, response.text, list(response.token_ids), finish, summary)
    return 0


def _print(args, text: str, tokens: list[int], finish_reason: str, summary: dict) -> None:
    if args.json:
        print(json.dumps({"text": text, "token_ids": tokens, "finish_reason": finish_reason, **summary}))
    else:
        print(text)
        print(" ".join(f"{key}={value}" for key, value in summary.items()), file=sys.stderr)


def summary_fields(tokens: int, forwards: int, mal: float, acceptance: float, elapsed_s: float, drafter: str,
             exit_layer: int | None, k: int) -> dict:
    return {
        "tokens": tokens,
        "target_forwards": forwards,
        "mean_accepted_length": round(mal, 3),
        "acceptance_rate": round(acceptance, 3),
        "tokens_per_s": round(tokens / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "drafter": drafter,
        "exit": exit_layer,
        "k": k,
    }
