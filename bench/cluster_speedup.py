"""Speedup of the cluster path against the in-process engine, and of a shared drafter against dedicated ones.

Run: python -m bench.cluster_speedup [--prompts N] [--max-tokens N] [--exit L] [--k K]

Everything is measured in one run on one machine, greedy, on the zoo:
1. in-process: target-l alone vs target-l + drafter exit (SpeculativeGenerator);
2. cluster: the same pair as Ray actors on two simulated nodes behind gRPC,
   speculation OFF vs AUTO per request;
3. multi-target: three targets streaming at once, first sharing one drafter
   actor, then each with a dedicated drafter actor.
Writes bench/reports/cluster_speedup.{json,md}.
"""

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from actors.drafters import ModelDrafter
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
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


def in_process(prompts, max_tokens: int, exit_layer: int, k: int) -> dict:
    zoo = models_dir()
    target = ModelRunner.from_pretrained(zoo / "target-l")
    drafter = ModelDrafter(ModelRunner.from_pretrained(zoo / "drafter"))
    params = make_sampling_params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    plain = _timed(lambda p: _counts(SpeculativeGenerator(target).generate([p], params)[0]), prompts)
    spec = _timed(lambda p: _counts(SpeculativeGenerator(target, drafter, k, exit_layer).generate([p], params)[0]), prompts)
    return _compare(plain, spec)


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


def _compare(plain: dict, spec: dict) -> dict:
    return {"plain": plain, "speculative": spec, "speedup": spec["tokens_per_s"] / plain["tokens_per_s"]}


def cluster_config(drafters: dict, pairing: dict, exit_layer: int, k: int):
    zoo = models_dir()
    return parse_config({
        "pools": {"draft": {"resources": {"draft": 1}, "num_cpus": 0}, "target": {"resources": {"target": 1}, "num_cpus": 0}},
        "drafters": {name: {"path": str(zoo / "drafter"), "pool": "draft"} for name in drafters},
        "targets": {t: {"path": str(zoo / t), "pool": "target", "drafter": d, "exit_layer": exit_layer, "k": k}
                    for t, d in pairing.items()},
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


def cluster_single(prompts, max_tokens: int, exit_layer: int, k: int) -> dict:
    served = _Served(cluster_config(["drafter"], {"target-l": "drafter"}, exit_layer, k))
    try:
        plain = _timed_remote(served.stub, "target-l", prompts, max_tokens, speculate=False)
        spec = _timed_remote(served.stub, "target-l", prompts, max_tokens, speculate=True)
    finally:
        served.close()
    return _compare(plain, spec)


def multi_target(prompts, max_tokens: int, exit_layer: int, k: int, shared: bool) -> dict:
    """Per-target speedup while all three targets stream at once (plain phase, then speculative phase)."""
    drafters = ["drafter"] if shared else [f"drafter-for-{t}" for t in TARGETS]
    pairing = {t: "drafter" if shared else f"drafter-for-{t}" for t in TARGETS}
    served = _Served(cluster_config(drafters, pairing, exit_layer, k))
    try:
        phases = {}
        for speculate in (False, True):
            with ThreadPoolExecutor(len(TARGETS)) as pool:
                runs = pool.map(lambda t: _timed_remote(served.stub, t, prompts, max_tokens, speculate), TARGETS)
                phases[speculate] = dict(zip(TARGETS, runs))
    finally:
        served.close()
    return {t: _compare(phases[False][t], phases[True][t]) for t in TARGETS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--exit", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    prompts = heldout_code_prompts(args.prompts, args.prompt_tokens)
    report = {"settings": vars(args), "in_process": in_process(prompts, args.max_tokens, args.exit, args.k)}
    with simulated_cluster({"num_cpus": 1}, draft={"num_cpus": 4, "resources": {"draft": 8}},
                           target={"num_cpus": 4, "resources": {"target": 8}}):
        report["cluster"] = cluster_single(prompts, args.max_tokens, args.exit, args.k)
        report["shared_drafter"] = multi_target(prompts, args.max_tokens, args.exit, args.k, shared=True)
        report["dedicated_drafters"] = multi_target(prompts, args.max_tokens, args.exit, args.k, shared=False)
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "cluster_speedup.json").write_text(json.dumps(report, indent=1))
    (REPORTS / "cluster_speedup.md").write_text(to_markdown(report))
    print(to_markdown(report))


def to_markdown(report: dict) -> str:
    inproc, cluster = report["in_process"]["speedup"], report["cluster"]["speedup"]
    lines = [
        "# Cluster speedup (greedy, zoo, CPU)",
        "",
        f"Settings: {json.dumps(report['settings'])}. Command: `python -m bench.cluster_speedup`.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU; every actor and the "
        "client share these cores, so the multi-target rows measure contention as much as drafting.",
        "",
        "| path | plain tok/s | speculative tok/s | MAL | speedup |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("in_process", "cluster"):
        r = report[name]
        lines.append(f"| {name} | {r['plain']['tokens_per_s']:.1f} | {r['speculative']['tokens_per_s']:.1f} | "
                     f"{r['speculative']['mal']:.2f} | {r['speedup']:.2f}x |")
    lines += ["", f"Cluster keeps {cluster / inproc:.0%} of the in-process speedup (goal: at least 85%).", "",
              "| target | shared drafter speedup | dedicated drafter speedup | shared / dedicated |", "|---|---:|---:|---:|"]
    for t in TARGETS:
        shared, dedicated = report["shared_drafter"][t]["speedup"], report["dedicated_drafters"][t]["speedup"]
        lines.append(f"| {t} | {shared:.2f}x | {dedicated:.2f}x | {shared / dedicated:.0%} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
