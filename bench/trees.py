"""Token trees against chains at the same verification budget, in one process, side by side.

Run: python -m bench.trees [--target PATH] [--drafter PATH] [--zoo DIR] [--exits L,L] [--compile MODE]
                           [--prompts N] [--repeats N] [--max-tokens N] [--cluster]

The budget of an arm is the tokens one target forward scores per sequence: k + 1
for a chain of k, nodes + 1 for a tree. Each repeat decodes every held-out code
prompt greedily, one stream at a time, with every arm in turn (interleaved, so
load from elsewhere falls on all arms alike): the target alone, and for each
drafter exit chains and static and dynamic trees of matching budgets. Reports per arm the median
tokens/s of a request, the pooled MAL (tokens per target forward, bonus
included) and whether its output equals the target's own; plots MAL and
tokens/s against budget. With --cluster, a subset of the arms again through a
fleet behind gRPC (`bench.trees_cluster`). Writes bench/reports/trees.{json,md,png}.
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
from bench.trees_cluster import measure_cluster
from cluster.defaults import models_dir

REPORTS = Path(__file__).parent / "reports"
PLAIN = "target alone"
CHAINS = (4, 8, 12, 16)  # budgets 5, 9, 13, 17
STATIC_TREES = ("static-2x2", "static-4x2", "static-4x3", "static-8x2")  # the same budgets
DYNAMIC_TREES = ("dynamic-4x2:4", "dynamic-6x3:8", "dynamic-8x3:12", "dynamic-8x4:16")  # the same budgets
MAL_GOAL, SPEED_GOAL = 1.25, 1.15  # tree over chain at the same budget; best tree over best chain


@dataclass(frozen=True)
class Arm:
    name: str
    exit_layer: int | None  # None: the target alone
    family: str  # "plain", "chain", "static tree" or "dynamic tree"
    budget: int  # tokens a target forward scores per sequence
    generator: SpeculativeGenerator


def arms(target: ModelRunner, drafter: ModelRunner, exits: list[int]) -> list[Arm]:
    made = [Arm(PLAIN, None, "plain", 1, SpeculativeGenerator(target))]
    for exit_layer in exits:
        for k in CHAINS:
            made.append(Arm(f"exit {exit_layer} chain k={k}", exit_layer, "chain", k + 1,
                            SpeculativeGenerator(target, ModelDrafter(drafter), k=k, exit_layer=exit_layer)))
        for label in (*STATIC_TREES, *DYNAMIC_TREES):
            shape = TreeShape.parse(label)
            made.append(Arm(f"exit {exit_layer} {label}", exit_layer, f"{label.split('-')[0]} tree", shape.nodes + 1,
                            SpeculativeGenerator(target, ModelDrafter(drafter), exit_layer=exit_layer, tree=shape)))
    return made


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    target = ModelRunner.serving(args.target, RunnerSettings(compile=args.compile), trees=True)
    drafter = ModelRunner.serving(args.drafter, RunnerSettings(compile=args.drafter_compile), drafts=True, trees=True)
    prompts = prompts_of(args)
    params = make_sampling_params(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    all_arms = arms(target, drafter, [int(e) for e in args.exits.split(",")])
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
        "target": args.target, "drafter": args.drafter, "exits": args.exits, "compile": target.compile_mode,
        "drafter_compile": drafter.compile_mode, "threads": args.threads, "prompts": len(prompts),
        "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "max_tokens": args.max_tokens,
        "arms": [{"name": a.name, "exit": a.exit_layer, "family": a.family, "budget": a.budget,
                  "median_tokens_per_s": statistics.median(speeds[a.name]),
                  "mal": stats[a.name].mean_accepted_length if a.exit_layer is not None else 1.0,
                  "greedy_identical": outputs[a.name] == outputs[PLAIN]} for a in all_arms],
    }


def prompts_of(args: argparse.Namespace) -> list[list[int]]:
    return heldout_code_prompts(args.prompts, args.prompt_tokens, Path(args.zoo))


def speed_goal(arms_: list[dict]) -> tuple[str, str, float]:
    """(best tree, best chain, its tokens/s over the best chain's)."""
    best = lambda family: max((a for a in arms_ if family(a["family"])), key=lambda a: a["median_tokens_per_s"])
    tree, chain = best(lambda f: f.endswith("tree")), best(lambda f: f == "chain")
    return tree["name"], chain["name"], tree["median_tokens_per_s"] / chain["median_tokens_per_s"]


def goals(result: dict) -> dict:
    """Tree MAL over the chain's of the same exit and budget, and the best tree's tokens/s over the best chain's
    (any exit)."""
    chains = {(a["exit"], a["budget"]): a for a in result["arms"] if a["family"] == "chain"}
    trees = [a for a in result["arms"] if a["family"].endswith("tree")]
    chain_of = lambda tree: chains.get((tree["exit"], tree["budget"]))
    best_tree, best_chain, ratio = speed_goal(result["arms"])
    met = {"mal_ratio_at_budget": {f"{t['name']} / {chain_of(t)['name']}": t["mal"] / chain_of(t)["mal"]
                                   for t in trees if chain_of(t) is not None},
           "best_tree": best_tree, "best_chain": best_chain, "speed_ratio": ratio}
    if "cluster" in result:
        met["cluster_best_tree"], met["cluster_best_chain"], met["cluster_speed_ratio"] = speed_goal(
            result["cluster"]["arms"])
    return met


def render(result: dict) -> str:
    plain = next(a for a in result["arms"] if a["family"] == "plain")["median_tokens_per_s"]
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
        f"`{result['drafter']}` exits {result['exits']} ({result['drafter_compile']}), {result['threads']} thread(s); "
        f"{result['prompts']} held-out code prompts of {result['prompt_tokens']} tokens x {result['repeats']} "
        f"interleaved repeats, {result['max_tokens']} greedy tokens each, one stream. Budget: tokens a target "
        "forward scores per sequence. MAL: tokens per target forward, bonus included.", "",
        "| arm | budget | MAL | tokens/s (median) | over the target alone | output = target's |",
        "| --- | ---: | ---: | ---: | ---: | --- |", *rows, "",
        f"## Goals (#18): tree MAL >= {MAL_GOAL}x the chain's at the same budget; best tree >= {SPEED_GOAL}x the "
        "best chain's tokens/s", "",
        "| tree / chain at the same budget | MAL ratio | goal |", "| --- | ---: | --- |", *mal_rows, "",
        f"In process: best tree {met['best_tree']} against best chain {met['best_chain']}: "
        f"{met['speed_ratio']:.2f}x tokens/s ({'met' if met['speed_ratio'] >= SPEED_GOAL else 'not met'}).", "",
        *_cluster_section(result), "![MAL and tokens/s against budget](trees.png)", ""])


def _cluster_section(result: dict) -> list[str]:
    if "cluster" not in result:
        return []
    arms_, met = result["cluster"]["arms"], result["goals"]
    plain = next(a for a in arms_ if a["family"] == "plain")["median_tokens_per_s"]
    rows = [f"| {a['name']} | {a['mal']:.2f} | {a['median_tokens_per_s']:.0f} | {a['median_tokens_per_s'] / plain:.2f}x | "
            f"{a['greedy_identical']} |" for a in arms_]
    ratio = met["cluster_speed_ratio"]
    return ["## Through the cluster (gRPC, drafter and target actors on two simulated nodes)", "",
            f"Same prompts, FIXED speculation per request; load average at the end "
            f"{result['cluster']['load_average_at_end']}.", "",
            "| arm | MAL | tokens/s (median) | over the target alone | output = target's |",
            "| --- | ---: | ---: | ---: | --- |", *rows, "",
            f"Best tree {met['cluster_best_tree']} against best chain {met['cluster_best_chain']}: {ratio:.2f}x "
            f"tokens/s ({'met' if ratio >= SPEED_GOAL else 'not met'}).", ""]


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (mal_axis, speed_axis) = plt.subplots(1, 2, figsize=(10, 4))
    kinds = sorted({(a["exit"], a["family"]) for a in result["arms"] if a["exit"] is not None})
    for exit_layer, family in kinds:
        marker = {"chain": "o", "static tree": "s", "dynamic tree": "^"}[family]
        kind = f"exit {exit_layer} {family}"
        arms_ = sorted((a for a in result["arms"] if (a["exit"], a["family"]) == (exit_layer, family)),
                       key=lambda a: a["budget"])
        budgets = [a["budget"] for a in arms_]
        mal_axis.plot(budgets, [a["mal"] for a in arms_], marker=marker, label=kind)
        speed_axis.plot(budgets, [a["median_tokens_per_s"] for a in arms_], marker=marker, label=kind)
    plain = next(a for a in result["arms"] if a["family"] == "plain")["median_tokens_per_s"]
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
    parser.add_argument("--exits", default="1,2", help="drafter exits, comma-separated: each gets every chain and tree")
    parser.add_argument("--compile", default="auto", help="RunnerSettings.compile of the target")
    parser.add_argument("--drafter-compile", default="auto", help="RunnerSettings.compile of the drafter")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cluster", action="store_true", help="also measure a subset of the arms through a fleet")
    args = parser.parse_args()
    machine = describe_machine()
    result = measure(args) | {"machine": machine}
    if args.cluster:
        result["cluster"] = measure_cluster(args, prompts_of(args))
    result["goals"] = goals(result)
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "trees.json").write_text(json.dumps(result, indent=1))
    (REPORTS / "trees.md").write_text(render(result))
    plot(result, REPORTS / "trees.png")
    print(render(result))


if __name__ == "__main__":
    main()
