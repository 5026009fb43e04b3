"""Does overlapping drafting with verification pay? The cluster path with `overlap_rounds` on and off.

Run: python -m bench.overlap_rounds [--streams 2 3 4] [--repeats N] [--max-tokens N] [--exit L] [--k K]

One Ray cluster on this machine, a `draft` node and a `target` node: one
drafter actor (the zoo's sorted drafter) serves two target-l actors, one
overlapping rounds and one not; each actor reserves one CPU, so its torch runs
one thread. For each stream count, both targets serve the same concurrent
greedy streams (straight to the actor, no front door), interleaved: each
repeat alternates which goes first, so load from elsewhere falls on both.
Throughput is generated tokens over the wall time of the whole batch.
Writes bench/reports/overlap_rounds.{json,md}.
"""

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from actors.sampling import make_sampling_params
from bench.prompts import heldout_code_prompts
from cluster.config import parse_config
from cluster.defaults import models_dir
from cluster.placement import start_fleet, stop_fleet
from cluster.simulated import simulated_cluster

REPORTS = Path(__file__).resolve().parent / "reports"
ARMS = ("overlapped", "sequential")


def fleet_config(exit_layer: int, k: int):
    zoo = models_dir()
    target = {"path": str(zoo / "target-l"), "pool": "target", "drafter": "drafter", "exit_layer": exit_layer, "k": k}
    return parse_config({
        "pools": {"draft": {"resources": {"draft": 1}}, "target": {"resources": {"target": 1}}},
        "drafters": {"drafter": {"path": str(zoo / "drafter"), "pool": "draft"}},
        "targets": {"overlapped": {**target, "overlap_rounds": True}, "sequential": target},
    })


def run_batch(handle, tag: str, prompts, max_tokens: int) -> dict:
    """Stream every prompt at once to one target actor: tokens, rounds, wall seconds, and from its round
    telemetry the seconds it waited for drafts and spent verifying (one record per round: a single arm)."""
    params = make_sampling_params(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def one(job):
        index, prompt = job
        last = None
        for ref in handle.generate.options(num_returns="streaming").remote(f"{tag}-{index}", prompt, params):
            last = ray.get(ref)
        return last.stats

    ray.get(handle.drain_telemetry.remote())
    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        stats = list(pool.map(one, enumerate(prompts)))
    seconds = time.perf_counter() - started
    records = ray.get(handle.drain_telemetry.remote())
    return {"seconds": seconds, "tokens": sum(s.emitted for s in stats), "rounds": sum(s.target_forwards for s in stats),
            "draft_wait_s": sum(r.draft_s for r in records), "verify_s": sum(r.verify_s for r in records)}


def measure(fleet, prompts, streams: int, repeats: int, max_tokens: int) -> dict:
    totals = {arm: {"seconds": 0.0, "tokens": 0, "rounds": 0, "draft_wait_s": 0.0, "verify_s": 0.0} for arm in ARMS}
    for repeat in range(repeats):
        batch = prompts[repeat * streams : (repeat + 1) * streams]
        for arm in ARMS if repeat % 2 == 0 else ARMS[::-1]:
            result = run_batch(fleet.targets[arm][0], f"{arm}-{streams}-{repeat}", batch, max_tokens)
            for key in result:
                totals[arm][key] += result[key]
    for total in totals.values():
        total["tokens_per_s"] = total["tokens"] / total["seconds"]
        total["mal"] = total["tokens"] / total["rounds"]
    return {**totals, "ratio": totals["overlapped"]["tokens_per_s"] / totals["sequential"]["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--exit", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    if min(args.streams) < 1 or args.repeats < 1:
        parser.error("--streams and --repeats must be at least 1")
    prompts = heldout_code_prompts(max(args.streams) * args.repeats, args.prompt_tokens)
    with simulated_cluster({"num_cpus": 0}, draft={"num_cpus": 1, "resources": {"draft": 1}},
                           target={"num_cpus": 2, "resources": {"target": 2}}):
        fleet = start_fleet(fleet_config(args.exit, args.k))
        try:
            run_batch(fleet.targets["overlapped"][0], "warm-o", prompts[:2], 8)
            run_batch(fleet.targets["sequential"][0], "warm-s", prompts[:2], 8)
            report = {"settings": vars(args),
                      "streams": {n: measure(fleet, prompts, n, args.repeats, args.max_tokens) for n in args.streams}}
        finally:
            stop_fleet(fleet)
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "overlap_rounds.json").write_text(json.dumps(report, indent=1))
    (REPORTS / "overlap_rounds.md").write_text(to_markdown(report))
    print(to_markdown(report))


def to_markdown(report: dict) -> str:
    lines = [
        "# Overlapped rounds on the cluster path (greedy, zoo, CPU)",
        "",
        f"Settings: {json.dumps(report['settings'])}. Command: `python -m bench.overlap_rounds`.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU, shared with other "
        "jobs; the drafter and target actors reserve one CPU each. Both arms ran interleaved in one run.",
        "",
        "| streams | sequential tok/s | overlapped tok/s | overlapped / sequential | MAL seq. / ovl. "
        "| waiting for drafts, s: seq. / ovl. | verifying, s: seq. / ovl. |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for streams, r in report["streams"].items():
        seq, ovl = r["sequential"], r["overlapped"]
        lines.append(f"| {streams} | {seq['tokens_per_s']:.1f} | {ovl['tokens_per_s']:.1f} | {r['ratio']:.2f}x | "
                     f"{seq['mal']:.2f} / {ovl['mal']:.2f} | {seq['draft_wait_s']:.1f} / {ovl['draft_wait_s']:.1f} | "
                     f"{seq['verify_s']:.1f} / {ovl['verify_s']:.1f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
