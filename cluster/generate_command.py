"""`specfleet generate`: one prompt through the in-process engine, with a summary line."""

import argparse
import json
import sys
import time
from pathlib import Path

from actors.drafters import Drafter, ModelDrafter, NgramDrafter
from actors.errors import InvalidRequest
from actors.generator import SpeculativeGenerator
from actors.loading import check_same_vocabulary, load_tokenizer
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from cluster.client import generate_remote
from cluster.defaults import default_drafter, default_target
from specfleet.v1 import generation_pb2 as pb


def add_generate_command(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate a completion in-process (speculative by default)")
    parser.add_argument("prompt", help="the text to complete")
    parser.add_argument("--target", type=Path, default=None, help="target checkpoint folder (default: the zoo's largest target)")
    parser.add_argument("--server", help="call a running `specfleet up` at HOST:PORT instead of loading models here")
    parser.add_argument("--model", default="target-l", help="with --server: the target model's name")
    parser.add_argument("--exit", type=int, default=None, help="with --server and --k: the drafter exit to use")
    parser.add_argument("--timeout", type=float, default=300.0, help="with --server: deadline of the call in seconds")
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
    params = make_sampling_params(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, max_tokens=args.max_tokens
    )
    if args.server:
        return _run_remote(args, params)
    target_path = args.target or default_target()
    tokenizer = load_tokenizer(target_path)
    prompt = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    if not prompt:
        raise InvalidRequest("prompt is empty: give some text to complete")
    target = ModelRunner.from_pretrained(target_path, args.dtype, args.device)
    drafter, exit_layer, drafter_name = _build_drafter(args, tokenizer)
    generator = SpeculativeGenerator(target, drafter, k=4 if args.k is None else args.k, exit_layer=exit_layer)
    result = generator.generate([prompt], params)[0]
    stats = result.stats
    summary = _summary(len(result.tokens), stats.target_forwards, stats.mean_accepted_length, stats.acceptance_rate,
                       generator.elapsed_s, drafter_name, exit_layer, generator.k)
    _print(args, tokenizer.decode(result.tokens), result.tokens, result.finish_reason, summary)
    return 0


def _run_remote(args: argparse.Namespace, params) -> int:
    request = pb.GenerateRequest(model=args.model, text=args.prompt, max_tokens=params.max_tokens,
                                 temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    if params.seed is not None:
        request.seed = params.seed
    if args.no_spec:
        request.speculation.mode = pb.Speculation.OFF
    elif args.k is not None:
        request.speculation.CopyFrom(pb.Speculation(mode=pb.Speculation.FIXED, k=args.k, exit_layer=args.exit or 0))
    started = time.perf_counter()
    response = generate_remote(args.server, request, args.timeout)
    spec = response.speculation
    summary = _summary(len(response.token_ids), spec.target_forwards, spec.mean_accepted_length, spec.acceptance_rate,
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


def _build_drafter(args, target_tokenizer) -> tuple[Drafter | None, int | None, str]:
    if args.no_spec:
        return None, None, "none"
    if args.ngram:
        return NgramDrafter(), None, "ngram"
    path, exit_layer = parse_drafter_spec(args.drafter) if args.drafter else (default_drafter(), None)
    check_same_vocabulary(target_tokenizer, load_tokenizer(path))
    drafter = ModelDrafter(ModelRunner.from_pretrained(path, args.dtype, args.device))
    return drafter, exit_layer or drafter.default_exit, str(path)


def parse_drafter_spec(spec: str) -> tuple[Path, int | None]:
    """'PATH' or 'PATH:EXIT' -> (path, exit layers or None)."""
    path, sep, exit_text = spec.rpartition(":")
    if not sep or not exit_text.isdigit():
        return Path(spec), None
    return Path(path), int(exit_text)


def _summary(tokens: int, forwards: int, mal: float, acceptance: float, elapsed_s: float, drafter: str,
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
