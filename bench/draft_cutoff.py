"""Greedy chains cut where the drafter's confidence runs out, against whole chains, in one process, side by side.

Run: python -m bench.draft_cutoff [--target PATH] [--drafter PATH] [--exits L,L] [--ks K,K] [--cutoffs C,C]
                                  [--compile MODE] [--prompts N] [--repeats N] [--max-tokens N]

`ModelDrafter(greedy_cutoff=c)` stops a greedy chain before the token at which the product of its
tokens' probabilities under the drafter falls below c. Each repeat decodes every held-out code prompt
greedily, one stream at a time, with every arm in turn (interleaved): the target alone, and per exit
and k, each cut-off. Reports per arm the median tokens/s of a request, draft tokens per round, MAL and
whether the output equals the target's own. Writes bench/reports/draft_cutoff.{json,md}.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from actors.drafters import ModelDrafter
from actors.engine import SpeculationStats
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner, RunnerSettings
from actors.sampling import make_sampling_params
from bench.machine import measure_and_report
from bench.prompts import heldout_code_prompts
from cluster.defaults import models_dir

REPORTS = Path(__file__).parent / "reports"
PLAIN = "target alone"


def arms(args, target: ModelRunner, drafter: ModelRunner) -> dict[str, tuple[dict, SpeculativeGenerator]]:
    made = {PLAIN: ({"exit": None, "k": 0, "cutoff": None}, SpeculativeGenerator(target))}
    for exit_layer in args.exit_list:
        for k in args.k_list:
            for cutoff in args.cutoff_list:
                generator = SpeculativeGenerator(target, ModelDrafter(drafter, greedy_cutoff=cutoff), k=k,
                                                 exit_layer=exit_layer)
                made[f"exit {exit_layer}, k={k}, cut-off {cutoff}"] = ({"exit": exit_layer, "k": k, "cutoff": cutoff},
                                                                         generator)
    return made


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    target = ModelRunner.serving(args.target, RunnerSettings(compile=args.compile))
    drafter = ModelRunner.serving(args.drafter, RunnerSettings(compile=args.drafter_compile), drafts=True)
    prompts = heldout_code_prompts(args.prompts, args.prompt_tokens, Path(args.zoo))
    params = make_sampling_params(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    all_arms = arms(args, target, drafter)
    for _, generator in all_arms.values():  # a first pass compiles what warm-up left and is not timed
        generator.generate(prompts[:1], params)
    speeds = {name: [] for name in all_arms}
    stats = {name: SpeculationStats() for name in all_arms}
    outputs = {name: [] for name in all_arms}
    for _ in range(args.repeats):
        for prompt in prompts:
            for name, (_, generator) in all_arms.items():
                started = time.perf_counter()
                result = generator.generate([prompt], params)[0]
                speeds[name].append(len(result.tokens) / (time.perf_counter() - started))
                stats[name].add(result.stats)
                outputs[name].append(result.tokens)
    rows = [{"name": name, **settings, "median_tokens_per_s": statistics.median(speeds[name]),
             "drafted_per_round": stats[name].drafted / max(1, stats[name].target_forwards),
             "mal": stats[name].mean_accepted_length if settings["exit"] is not None else 1.0,
             "greedy_identical": outputs[name] == outputs[PLAIN]} for name, (settings, _) in all_arms.items()]
    return {"target": args.target, "drafter": args.drafter, "compile": target.compile_mode,
            "drafter_compile": drafter.compile_mode, "threads": args.threads, "prompts": len(prompts),
            "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "max_tokens": args.max_tokens, "arms": rows}


def render(result: dict) -> str:
    machine = result["machine"]
    plain = next(a for a in result["arms"] if a["name"] == PLAIN)["median_tokens_per_s"]
    rows = [f"| {a['name']} | {a['drafted_per_round']:.2f} | {a['mal']:.2f} | {a['median_tokens_per_s']:.0f} | "
            f"{a['median_tokens_per_s'] / plain:.2f}x | {a['greedy_identical']} |" for a in result["arms"]]
    return "\n".join([
        "# Greedy chains cut where the drafter's confidence runs out (in process)", "",
        f"`python -m bench.draft_cutoff` on {machine['cpu']} (load average at start {machine['load_average_at_start']}, "
        f"at end {result['load_average_at_end']}), commit {machine['git_commit']}. Target `{result['target']}` "
        f"({result['compile']}), drafter `{result['drafter']}` ({result['drafter_compile']}), {result['threads']} "
        f"thread(s); {result['prompts']} held-out code prompts of {result['prompt_tokens']} tokens x {result['repeats']} "
        f"interleaved repeats, {result['max_tokens']} greedy tokens each, one stream. A cut-off c stops a chain before "
        "the token at which the product of its tokens' drafter probabilities falls below c (0: whole chains).", "",
        "| arm | draft tokens per round | MAL | tokens/s (median) | over the target alone | output = target's |",
        "| --- | ---: | ---: | ---: | ---: | --- |", *rows, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=str(models_dir() / "target-xl"))
    parser.add_argument("--drafter", default=str(models_dir() / "drafter"))
    parser.add_argument("--zoo", default=str(models_dir()), help="zoo folder whose held-out files give the prompts")
    parser.add_argument("--exits", default="2", help="drafter exits, comma-separated")
    parser.add_argument("--ks", default="4,8", help="draft lengths, comma-separated")
    parser.add_argument("--cutoffs", default="0,0.1,0.2,0.35", help="greedy cut-offs, comma-separated")
    parser.add_argument("--compile", default="auto", help="RunnerSettings.compile of the target")
    parser.add_argument("--drafter-compile", default="auto", help="RunnerSettings.compile of the drafter")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(REPORTS / "draft_cutoff"), help="report path without suffix")
    args = parser.parse_args()
    args.exit_list = [int(e) for e in args.exits.split(",")]
    args.k_list = [int(k) for k in args.ks.split(",")]
    args.cutoff_list = [float(c) for c in args.cutoffs.split(",")]
    measure_and_report(lambda: measure(args), render, Path(args.out))


if __name__ == "__main__":
    main()
