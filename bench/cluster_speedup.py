"""Speedup of the cluster path against the in-process engine, and of a shared drafter against dedicated ones.

Run: python -m bench.cluster_speedup [--prompts N] [--max-tokens N] [--exit L] [--k K] [--repeats R]

Everything is measured in one run on one machine, greedy, on the zoo, with
interleaved phases (`bench.interleave`): each repeat runs every phase once, in
a rotating order, and a speedup is the ratio of two phases of the same repeat.
1. in-process: target-l alone vs target-l + drafter exit (SpeculativeGenerator);
2. cluster: the same pair as Ray actors on two simulated nodes behind gRPC,
   speculation OFF vs AUTO per request;
3. multi-target: three targets streaming at once, each its prompts one after
   another. One fleet holds three replicas of the drafter, one paired with each
   target; the "shared" phase re-pairs all three targets with replica 0
   (`TargetActor.set_drafter`), the "dedicated" phase gives each its own back,
   so the two layouts share every process and differ only in the pairing.
Writes bench/reports/cluster_speedup.{json,md}.
"""

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import ray

from actors.drafters import ModelDrafter
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from bench.interleave import paired_speedups, run_interleaved, spread
from bench.prompts import heldout_code_prompts
from cluster.config import parse_config
from cluster.defaults import models_dir
from cluster.placement import start_fleet, stop_fleet
from cluster.server import BackgroundServer
from cluster.simulated import simulated_cluster
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc

REPORTS = Path(__file__).resolve().parent / "reports"
TARGETS = ("target-s", "target-m", "target-l")
LAYOUTS = ("shared", "dedicated")


def in_process(prompts, max_tokens: int, exit_layer: int, k: int, repeats: int) -> dict:
    zoo = models_dir()
    target = ModelRunner.from_pretrained(zoo / "target-l")
    drafter = ModelDrafter(ModelRunner.from_pretrained(zoo / "drafter"))
    params = make_sampling_params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    plain = SpeculativeGenerator(target)
    spec = SpeculativeGenerator(target, drafter, k, exit_layer)

    def run(generator):
        return lambda: _timed(lambda p: _counts(generator.generate([p], params)[0]), prompts)

    run(spec)()  # warm-up, not counted
    return _compare(run_interleaved({"plain": run(plain), "speculative": run(spec)}, repeats))


def _counts(result) -> tuple[int, int]:
    """(tokens, target forwards) of an in-process `GenerationResult`."""
    return len(result.tokens), result.stats.target_forwards


def _timed(run_one, prompts) -> dict:
    """Run `run_one(prompt) -> (tokens, target forwards)` over the prompts in turn; throughput and MAL."""
    started, tokens, forwards = time.perf_counter(), 0, 0
    for prompt in prompts:
        produced, rounds = run_one(prompt)
        tokens += produced
        forwards += rounds
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "mal": tokens / forwards}


def _compare(results: dict[str, list[dict]]) -> dict:
    """Plain and speculative runs per repeat, and the speculative over plain speedup of each repeat."""
    return {**results, "speedup": _speedup(results["speculative"], results["plain"])}


def _speedup(fast: list[dict], base: list[dict]) -> dict:
    return paired_speedups([r["tokens_per_s"] for r in fast], [r["tokens_per_s"] for r in base])


def cluster_config(drafter_replicas: int, targets, exit_layer: int, k: int):
    """Every target paired with the zoo's drafter, which runs `drafter_replicas` replicas."""
    zoo = models_dir()
    return parse_config({
        "pools": {"draft": {"resources": {"draft": 1}, "num_cpus": 0}, "target": {"resources": {"target": 1}, "num_cpus": 0}},
        "drafters": {"drafter": {"path": str(zoo / "drafter"), "pool": "draft", "replicas": drafter_replicas}},
        "targets": {t: {"path": str(zoo / t), "pool": "target", "drafter": "drafter", "exit_layer": exit_layer, "k": k}
                    for t in targets},
        "server": {"grpc_port": 0},
    })


class _Served:
    """A fleet behind a gRPC server, with a client stub."""

    def __init__(self, config):
        self.fleet = start_fleet(config)
        self.server = BackgroundServer(self.fleet)
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = pb_grpc.GenerationStub(self.channel)

    def close(self):
        self.channel.close()
        self.server.stop()
        stop_fleet(self.fleet)


def _request(model: str, prompt: list[int], max_tokens: int, speculate: bool) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=model, token_ids=pb.TokenIds(ids=prompt), max_tokens=max_tokens,
                                 temperature=0.0, ignore_eos=True)
    if not speculate:
        request.speculation.mode = pb.Speculation.OFF
    return request


def _timed_remote(stub, model: str, prompts, max_tokens: int, speculate: bool) -> dict:
    def run_one(prompt):
        response = stub.Generate(_request(model, prompt, max_tokens, speculate), timeout=600)
        return len(response.token_ids), response.speculation.target_forwards

    return _timed(run_one, prompts)


def cluster_single(prompts, max_tokens: int, exit_layer: int, k: int, repeats: int) -> dict:
    served = _Served(cluster_config(1, ["target-l"], exit_layer, k))
    try:
        def run(speculate: bool):
            return lambda: _timed_remote(served.stub, "target-l", prompts, max_tokens, speculate)

        run(True)()  # warm-up, not counted
        return _compare(run_interleaved({"plain": run(False), "speculative": run(True)}, repeats))
    finally:
        served.close()


def multi_target(prompts, max_tokens: int, exit_layer: int, k: int, repeats: int) -> dict:
    """Per-target speedups while all three targets stream at once, sharing one drafter replica or each with its own."""
    served = _Served(cluster_config(len(TARGETS), TARGETS, exit_layer, k))
    try:
        if len({served.fleet.pairing[(t, 0)] for t in TARGETS}) != len(TARGETS):
            raise RuntimeError(f"placement did not give each target a drafter replica of its own: {served.fleet.pairing}")
        phases = {"plain": _all_targets(served, prompts, max_tokens, speculate=False)}
        for layout in LAYOUTS:
            phases[layout] = _paired_then(served, layout, exit_layer, k, _all_targets(served, prompts, max_tokens, True))
            phases[layout]()  # warm-up, not counted
        results = run_interleaved(phases, repeats)
    finally:
        served.close()
    return {t: _per_target(t, results) for t in TARGETS}


def _per_target(target: str, results: dict[str, list[dict]]) -> dict:
    runs = {phase: [r[target] for r in repeats] for phase, repeats in results.items()}
    return {**runs, **{f"{layout}_speedup": _speedup(runs[layout], runs["plain"]) for layout in LAYOUTS},
            "shared_over_dedicated": _speedup(runs["shared"], runs["dedicated"])}


def _all_targets(served: _Served, prompts, max_tokens: int, speculate: bool):
    """A phase: every target streams its prompts one after another, all targets at once."""

    def run() -> dict[str, dict]:
        with ThreadPoolExecutor(len(TARGETS)) as pool:
            runs = pool.map(lambda t: _timed_remote(served.stub, t, prompts, max_tokens, speculate), TARGETS)
            return dict(zip(TARGETS, runs))

    return run


def _paired_then(served: _Served, layout: str, exit_layer: int, k: int, phase):
    """`phase`, run after pairing the targets as `layout` says (shared: all with drafter replica 0)."""
    fleet = served.fleet

    def run() -> dict[str, dict]:
        for target in TARGETS:
            replica = 0 if layout == "shared" else fleet.pairing[(target, 0)]
            ray.get(fleet.targets[target][0].set_drafter.remote(fleet.drafters["drafter"][replica], k, exit_layer))
        return phase()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--exit", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of every phase")
    args = parser.parse_args()
    prompts = heldout_code_prompts(args.prompts, args.prompt_tokens)
    shape = (args.max_tokens, args.exit, args.k, args.repeats)
    report = {"settings": vars(args), "load_average_at_start": os.getloadavg(), "in_process": in_process(prompts, *shape)}
    with simulated_cluster({"num_cpus": 1}, draft={"num_cpus": 4, "resources": {"draft": 8}},
                           target={"num_cpus": 4, "resources": {"target": 8}}):
        report["cluster"] = cluster_single(prompts, *shape)
        report["multi_target"] = multi_target(prompts, *shape)
    report["load_average_at_end"] = os.getloadavg()
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "cluster_speedup.json").write_text(json.dumps(report, indent=1))
    (REPORTS / "cluster_speedup.md").write_text(to_markdown(report))
    print(to_markdown(report))


def to_markdown(report: dict) -> str:
    inproc, cluster = report["in_process"]["speedup"]["median"], report["cluster"]["speedup"]["median"]
    lines = [
        "# Cluster speedup (greedy, zoo, CPU)",
        "",
        f"Settings: {json.dumps(report['settings'])}. Command: `python -m bench.cluster_speedup`.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU, load average "
        f"{_load(report['load_average_at_start'])} at the start, {_load(report['load_average_at_end'])} at the end; "
        "every actor and the client share these cores, so the multi-target rows measure contention as much as drafting.",
        "",
        "Phases are interleaved: each repeat runs every phase once, in a rotating order; a speedup is the ratio of "
        "two phases of the same repeat, given as the median over repeats (smallest - largest).",
        "",
        "| path | plain tok/s (median) | speculative tok/s (median) | MAL | speedup |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("in_process", "cluster"):
        r = report[name]
        lines.append(f"| {name} | {_median_tps(r['plain']):.1f} | {_median_tps(r['speculative']):.1f} | "
                     f"{r['speculative'][0]['mal']:.2f} | {spread(r['speedup'], '{:.2f}x')} |")
    lines += ["", f"Cluster keeps {cluster / inproc:.0%} of the in-process speedup (goal: at least 85%).", "",
              "| target | shared drafter speedup | dedicated drafter speedup | shared / dedicated |", "|---|---:|---:|---:|"]
    for t in TARGETS:
        r = report["multi_target"][t]
        lines.append(f"| {t} | {spread(r['shared_speedup'], '{:.2f}x')} | "
                     f"{spread(r['dedicated_speedup'], '{:.2f}x')} | {spread(r['shared_over_dedicated'], '{:.0%}')} |")
    lines.append("")
    return "\n".join(lines)


def _median_tps(runs: list[dict]) -> float:
    return statistics.median(r["tokens_per_s"] for r in runs)


def _load(averages) -> str:
    return "/".join(f"{a:.1f}" for a in averages)


if __name__ == "__main__":
    main()
