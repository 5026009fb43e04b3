"""Speculative cascades and staged chains on the zoo: speedup against target-l alone, and what it costs in quality.

Run: python -m bench.cascades [--prompts N] [--prompt-tokens N] [--max-tokens N] [--exit L] [--k K] [--repeats R]

Everything runs in one process on one torch thread, greedy, one prompt at a
time, and every configuration is timed side by side with target-l decoding
alone (ratios only). Time is this process's CPU time (`time.process_time`): on
one thread with no waiting that is the wall time of an idle machine, and other
work on a shared machine does not distort it the way it distorts wall time
(which is recorded too). Runs are interleaved prompt by prompt, `repeats`
times, and each configuration keeps its fastest run of each prompt.

1. Cascades: drafter exit -> target-l for each deferral rule and alpha over a
   grid. Quality of the generated text, scored by target-l teacher-forced on
   prompt + text: its loss (mean negative log-likelihood per generated token,
   nats) and its agreement (the fraction of generated tokens that are target-l's
   greedy choice given the text before them; 1.0 for the lossless output).
2. Staged chains drafter exit -> middle -> target-l against the direct pair
   drafter exit -> target-l (and the middle model drafting alone). Lossless, so
   only speed differs; the outputs are checked against target-l's own.

Writes bench/reports/cascades.{json,md,png}.
"""

import argparse
import json
import os
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
import torch  # noqa: E402

from actors.cascades import CascadeParams  # noqa: E402
from actors.drafters import ModelDrafter  # noqa: E402
from actors.generator import SpeculativeGenerator  # noqa: E402
from actors.runner import ModelRunner  # noqa: E402
from actors.sampling import make_sampling_params  # noqa: E402
from actors.staged import StagedDrafter  # noqa: E402
from bench.prompts import heldout_code_prompts  # noqa: E402
from cluster.defaults import models_dir  # noqa: E402

REPORTS = Path(__file__).resolve().parent / "reports"
GRID = {  # alphas per rule, each from barely deferring to (nearly) always deferring on this zoo
    "chow": (0.3, 0.5, 0.7, 0.8, 0.9, 1.0),
    "diff": (0.005, 0.01, 0.02, 0.05, 0.1, 0.2),
    "opt": (0.02, 0.05, 0.1, 0.2, 0.3, 0.5),
}
STAGED = (  # (middle model, drafter exit, inner k, outer k)
    ("target-s", 1, 3, 4),
    ("target-s", 2, 3, 6),
    ("target-m", 2, 3, 6),
)


class Zoo:
    """The zoo's models, loaded once and shared by every configuration (each frees its sequences)."""

    def __init__(self):
        zoo = models_dir()
        self.large = ModelRunner.from_pretrained(zoo / "target-l")
        self.drafter = ModelRunner.from_pretrained(zoo / "drafter")
        self.middles = {name: ModelRunner.from_pretrained(zoo / name) for name in ("target-s", "target-m")}


def configurations(zoo: Zoo, exit_layer: int, k: int) -> dict[str, Callable[[], SpeculativeGenerator]]:
    """Name -> a fresh generator for that configuration."""
    drafter = ModelDrafter(zoo.drafter)
    configs = {
        "plain": lambda: SpeculativeGenerator(zoo.large),
        "lossless": lambda: SpeculativeGenerator(zoo.large, drafter, k, exit_layer),
    }
    for rule, alphas in GRID.items():
        for alpha in alphas:
            cascade = CascadeParams(rule=rule, alpha=alpha)
            configs[f"{rule}@{alpha}"] = lambda c=cascade: SpeculativeGenerator(zoo.large, drafter, k, exit_layer, c)
    configs[f"direct:exit1:k{k}"] = lambda: SpeculativeGenerator(zoo.large, drafter, k, 1)
    configs[f"alone:target-s:k{k}"] = lambda: SpeculativeGenerator(zoo.large, ModelDrafter(zoo.middles["target-s"]), k)
    for middle, inner_exit, inner_k, outer_k in STAGED:
        configs[f"staged:exit{inner_exit}->{middle}:k{inner_k}->k{outer_k}"] = (
            lambda m=middle, e=inner_exit, i=inner_k, o=outer_k: SpeculativeGenerator(
                zoo.large, StagedDrafter(zoo.middles[m], drafter, i), o, e))
    return configs


def timed_generation(generator: SpeculativeGenerator, prompt: list[int], params) -> tuple[float, float, object]:
    """(CPU seconds, wall seconds, result) of one prompt."""
    started, started_cpu = time.perf_counter(), time.process_time()
    result = generator.generate([prompt], params)[0]
    return time.process_time() - started_cpu, time.perf_counter() - started, result


def measure(configs: dict, prompts, params, repeats: int) -> dict[str, dict]:
    """Time every configuration on every prompt `repeats` times, interleaved prompt by prompt in shuffled orders.

    A configuration's time is the sum over prompts of its fastest run on each: on a shared machine the slower
    runs measure interference, and interleaving spreads what remains over all configurations alike.
    """
    generators = {name: make() for name, make in configs.items()}
    for name, generator in generators.items():  # warm-up: every model's first forwards
        generator.generate([prompts[0]], params)
    best = {name: [(float("inf"), float("inf"))] * len(prompts) for name in configs}
    results: dict[str, list] = {name: [None] * len(prompts) for name in configs}
    order = random.Random(0)
    for repeat in range(repeats):
        for index, prompt in enumerate(prompts):
            for name in order.sample(list(configs), len(configs)):
                cpu, wall, result = timed_generation(generators[name], prompt, params)
                best[name][index] = min(best[name][index], (cpu, wall))
                results[name][index] = results[name][index] or result
        print(f"pass {repeat + 1}/{repeats} done", flush=True)
    return {name: _totals(best[name], results[name], generators[name]) for name in configs}


def _totals(times: list[tuple[float, float]], results: list, generator: SpeculativeGenerator) -> dict:
    """A configuration's summed fastest times, outputs and speculation counters (from the first run of each prompt)."""
    counters = {name: sum(getattr(r.stats, name) for r in results)
                for name in ("drafted", "accepted", "deferred", "target_forwards", "emitted")}
    drafter = generator.engine.drafter
    middle = drafter.stats if isinstance(drafter, StagedDrafter) else None
    inner = {"middle_acceptance": middle.acceptance_rate, "middle_mal": middle.mean_accepted_length} if middle else {}
    return {"seconds": sum(t[0] for t in times), "wall_seconds": sum(t[1] for t in times),
            "outputs": [r.tokens for r in results], **counters, **inner}


@torch.inference_mode()
def quality(large: ModelRunner, prompts, outputs) -> dict:
    """target-l's loss (nats per generated token) and greedy agreement on prompt + output, teacher-forced."""
    losses, agreements = [], []
    for prompt, output in zip(prompts, outputs):
        large.add_sequence("score")
        try:
            logits = large.forward(["score"], [prompt + output[:-1]])[0][len(prompt) - 1 :]  # [len(output), V]
        finally:
            large.free("score")
        target = torch.tensor(output)
        losses.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
        agreements.append((logits.argmax(dim=-1) == target).float())
    return {"loss": float(torch.cat(losses).mean()), "agreement": float(torch.cat(agreements).mean())}


def summarize(runs: dict[str, dict], zoo: Zoo, prompts) -> dict:
    plain = runs["plain"]
    summary = {}
    for name, run in runs.items():
        summary[name] = {
            "speedup": plain["seconds"] / run["seconds"],
            "wall_speedup": plain["wall_seconds"] / run["wall_seconds"],
            "cpu_seconds": run["seconds"],
            "wall_seconds": run["wall_seconds"],
            "tokens": sum(len(o) for o in run["outputs"]),
            "mal": run["emitted"] / run["target_forwards"],
            "acceptance_rate": run["accepted"] / run["drafted"] if run["drafted"] else 0.0,
            "deferred_share": run["deferred"] / run["drafted"] if run["drafted"] else 0.0,
            "same_as_plain": run["outputs"] == plain["outputs"],
            **{key: run[key] for key in ("middle_acceptance", "middle_mal") if key in run},
            **quality(zoo.large, prompts, run["outputs"]),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--exit", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    prompts = heldout_code_prompts(args.prompts, args.prompt_tokens)
    params = make_sampling_params(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    zoo = Zoo()
    runs = measure(configurations(zoo, args.exit, args.k), prompts, params, args.repeats)
    report = {"settings": vars(args), "machine": machine(), "configs": summarize(runs, zoo, prompts)}
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "cascades.json").write_text(json.dumps(report, indent=1))
    (REPORTS / "cascades.md").write_text(to_markdown(report))
    plot(report, REPORTS / "cascades.png")
    print(to_markdown(report))


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU, torch threads {torch.get_num_threads()}"


def to_markdown(report: dict) -> str:
    s, configs = report["settings"], report["configs"]
    lossless = configs["lossless"]
    lines = [
        "# Speculative cascades and staged chains (greedy, zoo, CPU)",
        "",
        f"Command: `python -m bench.cascades` with {json.dumps(s)}. Machine: {report['machine']}; shared with "
        "other work, so only ratios measured side by side in one run mean anything.",
        "Time is the benchmark's own CPU time on one torch thread (= wall time on an idle machine; other work on the "
        "shared machine inflates wall time, recorded in cascades.json, but not CPU time).",
        f"Speedup = time of target-l decoding alone / time of the configuration, over {s['prompts']} held-out prompts "
        f"of {s['prompt_tokens']} tokens, {s['max_tokens']} new tokens each, one prompt at a time, all configurations interleaved prompt by prompt in shuffled orders, each keeping "
        f"its fastest of {s['repeats']} runs per prompt. Cascades draft with drafter exit {s['exit']}, k = {s['k']}.",
        "Quality, scored by target-l on prompt + generated text: loss = mean NLL per generated token (nats; "
        "target-l's own greedy text scores "
        f"{configs['plain']['loss']:.3f}), agreement = share of generated tokens that are target-l's greedy "
        "choice given the text before them (1.0 = lossless).",
        "",
        "## Cascades (alpha = 0 is the lossless row)",
        "",
        f"With alpha > 0 a fully accepted round ends at its last draft token, without the bonus token (see "
        f"`actors/cascades.py`), so MAL is at most k = {s['k']}; deferred / drafted counts positions judged by the "
        "drafter's q.",
        "",
        "| rule | alpha | speedup | MAL | acceptance | deferred / drafted | loss | agreement |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        _row("lossless", 0.0, lossless),
    ]
    for rule, alphas in GRID.items():
        lines += [_row(rule, alpha, configs[f"{rule}@{alpha}"]) for alpha in alphas]
    lines += [
        "",
        "## Staged chains vs the direct pair (all lossless)",
        "",
        "| configuration | speedup | MAL (target-l) | acceptance | middle model's MAL / acceptance | output = target-l's |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in configs.items():
        if name.split(":")[0] in ("lossless", "direct", "alone", "staged"):
            middle = f"{r['middle_mal']:.2f} / {r['middle_acceptance']:.2f}" if "middle_mal" in r else "-"
            lines.append(f"| {name} | {r['speedup']:.2f}x | {r['mal']:.2f} | {r['acceptance_rate']:.2f} | {middle} | "
                         f"{r['same_as_plain']} |")
    lines += ["", f"Lossless pair (exit {s['exit']}, k {s['k']}): {lossless['speedup']:.2f}x, output = target-l's: "
              f"{lossless['same_as_plain']}.", "", *_findings(configs), ""]
    return "\n".join(lines)


def _findings(configs: dict) -> list[str]:
    """The trade-off in a few computed lines."""
    cascades = {n: r for n, r in configs.items() if "@" in n}
    lines = ["## In short", ""]
    for floor in (0.95, 0.75):
        kept = {n: r for n, r in cascades.items() if r["agreement"] >= floor}
        if kept:
            name = max(kept, key=lambda n: kept[n]["speedup"])
            lines.append(f"- Fastest cascade keeping agreement >= {floor}: {name}, {kept[name]['speedup']:.2f}x "
                         f"(loss {kept[name]['loss']:.3f}).")
    drafter = configs[f"chow@{GRID['chow'][-1]}"]
    lines.append(f"- The drafter's own output (Chow, alpha = 1): {drafter['speedup']:.2f}x, agreement "
                 f"{drafter['agreement']:.3f}, loss {drafter['loss']:.3f} (target-l's own: {configs['plain']['loss']:.3f}).")
    staged = {n: r for n, r in configs.items() if n.startswith("staged")}
    best = max(staged, key=lambda n: staged[n]["speedup"])
    lines.append(f"- Best staged chain: {best}, {staged[best]['speedup']:.2f}x, against {configs['lossless']['speedup']:.2f}x "
                 "for the direct pair.")
    return lines


def _row(rule: str, alpha: float, r: dict) -> str:
    return (f"| {rule} | {alpha:g} | {r['speedup']:.2f}x | {r['mal']:.2f} | {r['acceptance_rate']:.2f} | "
            f"{r['deferred_share']:.2f} | {r['loss']:.3f} | {r['agreement']:.3f} |")


def plot(report: dict, path: Path) -> None:
    configs = report["configs"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, metric, label in ((axes[0], "loss", "loss under target-l (nats/token, lower is better)"),
                                (axes[1], "agreement", "agreement with target-l's greedy choice")):
        for rule, alphas in GRID.items():
            points = [configs["lossless"]] + [configs[f"{rule}@{a}"] for a in alphas]
            axis.plot([p["speedup"] for p in points], [p[metric] for p in points], marker="o", label=rule)
            for alpha, point in zip((0.0, *alphas), points):
                axis.annotate(f"{alpha:g}", (point["speedup"], point[metric]), fontsize=6, alpha=0.7)
        staged = [r for n, r in configs.items() if n.startswith("staged")]
        axis.scatter([r["speedup"] for r in staged], [r[metric] for r in staged], marker="s", color="black", label="staged chains")
        axis.scatter([1.0], [configs["plain"][metric]], marker="*", s=120, color="red", label="target-l alone")
        axis.set_xlabel("speedup vs target-l alone")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Speculative cascades on the zoo (greedy; CPU time, one thread): alpha annotated")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
