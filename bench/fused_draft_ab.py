"""Does fused greedy drafting pay? In-process speculation with it on and off, against the target alone.

Run: python -m bench.fused_draft_ab [--prompts N] [--repeats N] [--max-tokens N] [--exit L] [--k K] [--compile MODE]

One process, one thread: the zoo's target-l and its sorted drafter, compiled as
served replicas are. Each repeat decodes every held-out code prompt greedily,
one stream at a time, three ways in turn (interleaved, so load from elsewhere
falls on all three): the target alone, speculation whose greedy rows draft up
to 4 steps per compiled call (the default), and the same drafter one step per
call (`fused_draft_steps` emptied). Writes bench/reports/fused_draft_ab.{json,md}.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from actors.drafters import ModelDrafter
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner, RunnerSettings
from actors.sampling import make_sampling_params
from bench.machine import describe_machine
from bench.prompts import heldout_code_prompts
from cluster.defaults import models_dir

ARMS = ("target alone", "speculative, fused drafts", "speculative, one step per call")
REPORTS = Path(__file__).parent / "reports"


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    settings = RunnerSettings(compile=args.compile)
    target = ModelRunner.serving(str(models_dir() / "target-l"), settings)
    drafter = ModelRunner.serving(str(models_dir() / "drafter"), settings, drafts=True)
    plain = SpeculativeGenerator(target)
    speculative = SpeculativeGenerator(target, ModelDrafter(drafter), k=args.k, exit_layer=args.exit)
    fused_steps = drafter.fused_draft_steps
    prompts = heldout_code_prompts(args.prompts, 48)
    params = make_sampling_params(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    tokens_per_s = {arm: [] for arm in ARMS}
    outputs = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm, generator in zip(ARMS, (plain, speculative, speculative)):
            drafter.fused_draft_steps = () if arm == ARMS[2] else fused_steps
            for prompt in prompts:
                started = time.perf_counter()
                result = generator.generate([prompt], params)[0]
                tokens_per_s[arm].append(len(result.tokens) / (time.perf_counter() - started))
                outputs[arm].append(result.tokens)
    return {"compile": target.compile_mode, "k": args.k, "exit": args.exit, "prompts": len(prompts),
            "repeats": args.repeats, "max_tokens": args.max_tokens,
            "median_tokens_per_s": {arm: statistics.median(v) for arm, v in tokens_per_s.items()},
            "greedy_identical": all(outputs[arm] == outputs[ARMS[0]] for arm in ARMS)}


def render(result: dict) -> str:
    base = result["median_tokens_per_s"][ARMS[0]]
    rows = [f"| {arm} | {tps:.0f} | {tps / base:.2f}x |" for arm, tps in result["median_tokens_per_s"].items()]
    return "\n".join([
        "# Fused greedy drafting: in-process speculation with and without it", "",
        f"`python -m bench.fused_draft_ab` on {result['machine']['cpu']} (load average at start "
        f"{result['machine']['load_average_at_start']}), commit {result['machine']['git_commit']}. Target-l with the zoo drafter's exit "
        f"{result['exit']}, k = {result['k']}, compile mode {result['compile']}, one thread; "
        f"{result['prompts']} held-out code prompts x {result['repeats']} interleaved repeats, "
        f"{result['max_tokens']} greedy tokens each. Median tokens/s per request.", "",
        "| arm | tokens/s | over the target alone |", "| --- | ---: | ---: |", *rows, "",
        f"Greedy output identical across the three arms: {result['greedy_identical']}.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--exit", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--compile", default="auto", help="RunnerSettings.compile of both models")
    args = parser.parse_args()
    machine = describe_machine()
    result = measure(args) | {"machine": machine}
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "fused_draft_ab.json").write_text(json.dumps(result, indent=1))
    (REPORTS / "fused_draft_ab.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
