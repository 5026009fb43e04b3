"""Token trees against chains at the same verification budget, in one process, side by side.

Run: python -m bench.trees [--target PATH] [--drafter PATH] [--zoo DIR] [--exit L] [--compile MODE]
                           [--prompts N] [--repeats N] [--max-tokens N]

The budget of an arm is the tokens one target forward scores per sequence: k + 1
for a chain of k, nodes + 1 for a tree. Each repeat decodes every held-out code
prompt greedily, one stream at a time, with every arm in turn (interleaved, so
load from elsewhere falls on all arms alike): the target alone, chains, and
static and dynamic trees of matching budgets. Reports per arm the median
tokens/s of a request, the pooled MAL (tokens per target forward, bonus
included) and whether its output equals the target's own; plots MAL and
tokens/s against budget. Writes bench/reports/trees.{json,md,png}.
"""

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from actors.drafters import ModelDrafter
from actors.engine import SpeculationStats
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner, RunnerSettings
from actors.sampling import make_sampling_params
from actors.trees import TreeShape
from bench.machine import describe_machine
from bench.prompts import heldout_code_prompts
from cluster.defaults import models_dir

REPORTS = Path(__file__).parent / "reports"
PLAIN = "target alone"
CHAINS = (4, 6, 8, 12)  # budgets 5, 7, 9, 13
TREES = ("2x2", "3x2", "4x2", "4x3")  # the same budgets
MAL_GOAL, SPEED_GOAL = 1.25, 1.15  # tree over chain at the same budget; best tree over best chain


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # "plain", "chain", "static tree" or "dynamic tree"
    budget: int  # tokens a target forward scores per sequence
    generator: SpeculativeGenerator


def arms(target: ModelRunner, drafter: ModelRunner, exit_layer: int) -> list[Arm]:
    made = [Arm(PLAIN, "plain", 1, SpeculativeGenerator(target))]
    for k in CHAINS:
        made.append(Arm(f"chain k={k}", "chain", k + 1,
                        SpeculativeGenerator(target, ModelDrafter(drafter), k=k, exit_layer=exit_layer)))
    for dynamic in (False, True):
        for size in TREES:
            shape = TreeShape.parse(f"{'dynamic' if dynamic else 'static'}-{size}")
            made.append(Arm(shape.label, f"{'dynamic' if dynamic else 'static'} tree", shape.nodes + 1,
                            SpeculativeGenerator(target, ModelDrafter(drafter), exit_layer=exit_layer, tree=shape)))
    return made


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    target = ModelRunner.serving(args.target, RunnerSettings(compile=args.compile), trees=True)
    drafter = ModelRunner.serving(args.drafter, RunnerSettings(compile=args.drafter_compile), drafts=True, trees=True)
    prompts = heldout_code_prompts(args.prompts, args.prompt_tokens, Path(args.zoo))
    params = make_sampling_params(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    all_arms = arms(target, drafter, args.exit)
    for arm in all_arms:  # a first pass compiles what warm-up left (other widths) and is not timed
        arm.generator.generate(prompts[:1], params)
    speeds = {arm.name: [] for arm in all_arms}
    stats = {arm.name: SpeculationStats() for arm in all_arms}
    outputs = {arm.name: [] for arm in all_arms}
    for _ in range(args.repeats):
        for prompt in prompts:
            for arm in all_arms:
                started = time.perf_counter()
                result = arm.generator.generate([prompt], params)[0]
                speeds[arm.name].append(len(result.tokens) / (time.perf_counter() - started))
                stats[arm.name].add(result.stats)
                outputs[arm.name].append(result.tokens)
    return {
        "target": args.target, "drafter": args.drafter, "exit": args.exit, "compile": target.compile_mode,
        "drafter_compile": drafter.compile_mode, "threads": args.threads, "prompts": len(prompts),
        "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "max_tokens": args.max_tokens,
        "arms": [{"name": a.name, "kind": a.kind, "budget": a.budget,
                  "median_tokens_per_s": statistics.median(speeds[a.name]),
                  "mal": stats[a.name].mean_accepted_length if a.kind != "plain" else 1.0,
                  "greedy_identical": outputs[a.name] == outputs[PLAIN]} for a in all_arms],
    }


def goals(result: dict) -> dict:
    """Tree MAL over the chain's at each budget both have, and the best tree's tokens/s over the best chain's."""
    by_kind: dict[str, dict[int, dict]] = {}
    for arm in result["arms"]:
        by_kind.setdefault(arm["kind"], {})[arm["budget"]] = arm
    chains = by_kind["chain"]
    trees = [a for kind, arms_ in by_kind.items() if kind.endswith("tree") for a in arms_.values()]
    best = lambda arms_: max(arms_, key=lambda a: a["median_tokens_per_s"])
    best_tree, best_chain = best(trees), best(chains.values())
    return {
        "mal_ratio_at_budget": {f"{t['name']} / chain k={t['budget'] - 1}": t["mal"] / chains[t["budget"]]["mal"]
                                for t in trees if t["budget"] in chains},
        "best_tree": best_tree["name"], "best_chain": best_chain["name"],
        "speed_ratio": best_tree["median_tokens_per_s"] / best_chain["median_tokens_per_s"],
    }


def render(result: dict) -> str:
    plain = next(a for a in result["arms"] if a["kind"] == "plain")["median_tokens_per_s"]
    rows = [f"| {a['name']} | {a['budget']} | {a['mal']:.2f} | {a['median_tokens_per_s']:.0f} | "
            f"{a['median_tokens_per_s'] / plain:.2f}x | {a['greedy_identical']} |" for a in result["arms"]]
    met = result["goals"]
    mal_rows = [f"| {name} | {ratio:.2f} | {'met' if ratio >= MAL_GOAL else 'not met'} |"
                for name, ratio in met["mal_ratio_at_budget"].items()]
    machine = result["machine"]
    return "\n".join([
        "# Token trees against chains at the same verification budget (in process)", "",
        f"`python -m bench.trees` on {machine['cpu']} (load average at start {machine['load_average_at_start']}), "
        f"commit {machine['git_commit']}. Target `{result['target']}` ({result['compile']}), drafter "
        f"`{result['drafter']}` exit {result['exit']} ({result['drafter_compile']}), {result['threads']} thread(s); "
        f"{result['prompts']} held-out code prompts of {result['prompt_tokens']} tokens x {result['repeats']} "
        f"interleaved repeats, {result['max_tokens']} greedy tokens each, one stream. Budget: tokens a target "
        "forward scores per sequence. MAL: tokens per target forward, bonus included.", "",
        "| arm | budget | MAL | tokens/s (median) | over the target alone | output = target's |",
        "| --- | ---: | ---: | ---: | ---: | --- |", *rows, "",
        f"## Goals (#18): tree MAL >= {MAL_GOAL}x the chain's at the same budget; best tree >= {SPEED_GOAL}x the "
        "best chain's tokens/s", "",
        "| tree / chain at the same budget | MAL ratio | goal |", "| --- | ---: | --- |", *mal_rows, "",
        f"Best tree {met['best_tree']} against best chain {met['best_chain']}: {met['speed_ratio']:.2f}x tokens/s "
        f"({'met' if met['speed_ratio'] >= SPEED_GOAL else 'not met'}).", "",
        "![MAL and tokens/s against budget](trees.png)", ""])


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (mal_axis, speed_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, marker in (("chain", "o"), ("static tree", "s"), ("dynamic tree", "^")):
        arms_ = sorted((a for a in result["arms"] if a["kind"] == kind), key=lambda a: a["budget"])
        budgets = [a["budget"] for a in arms_]
        mal_axis.plot(budgets, [a["mal"] for a in arms_], marker=marker, label=kind)
        speed_axis.plot(budgets, [a["median_tokens_per_s"] for a in arms_], marker=marker, label=kind)
    plain = next(a for a in result["arms"] if a["kind"] == "plain")["median_tokens_per_s"]
    speed_axis.axhline(plain, color="grey", linestyle="--", label="target alone")
    for axis, label in ((mal_axis, "MAL (tokens per target forward)"), (speed_axis, "tokens/s (median request)")):
        axis.set_xlabel("verification budget (tokens scored per forward)")
        axis.set_ylabel(label)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=str(models_dir() / "target-l"))
    parser.add_argument("--drafter", default=str(models_dir() / "drafter"))
    parser.add_argument("--zoo", default=str(models_dir()), help="zoo folder whose held-out files give the prompts")
    parser.add_argument("--exit", type=int, default=2)
    parser.add_argument("--compile", default="auto", help="RunnerSettings.compile of the target")
    parser.add_argument("--drafter-compile", default="auto", help="RunnerSettings.compile of the drafter")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    machine = describe_machine()
    result = measure(args) | {"machine": machine}
    result["goals"] = goals(result)
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "trees.json").write_text(json.dumps(result, indent=1))
    (REPORTS / "trees.md").write_text(render(result))
    plot(result, REPORTS / "trees.png")
    print(render(result))


if __name__ == "__main__":
    main()
