"""The cluster half of bench/trees.py: the same pair as Ray actors on two simulated nodes behind gRPC.

Each arm is a FIXED speculation per request (a chain's k or a tree's shape, and
the exit), OFF for the target alone; one stream at a time, every arm in turn
per prompt (interleaved). The target is configured with the first tree so that
both actors compile their tree steps at start-up, like a served fleet that may
draft trees.
"""

import statistics
import time
from argparse import Namespace

import grpc

from bench.machine import load_average
from cluster.config import parse_config
from cluster.placement import start_fleet, stop_fleet
from cluster.server import BackgroundServer
from cluster.simulated import simulated_cluster
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc

TARGET = "target"
CLUSTER_CHAINS = (4, 8)
CLUSTER_TREES = ("static-4x2", "dynamic-6x3:8", "dynamic-8x3:12")


def cluster_arms(exits: list[int]) -> list[tuple[str, int | None, str, pb.Speculation]]:
    """(name, exit, family, speculation) of every arm measured through the cluster."""
    arms = [("target alone", None, "plain", pb.Speculation(mode=pb.Speculation.OFF))]
    for exit_layer in exits:
        arms += [(f"exit {exit_layer} chain k={k}", exit_layer, "chain",
                  pb.Speculation(mode=pb.Speculation.FIXED, exit_layer=exit_layer, k=k)) for k in CLUSTER_CHAINS]
        arms += [(f"exit {exit_layer} {label}", exit_layer, f"{label.split('-')[0]} tree",
                  pb.Speculation(mode=pb.Speculation.FIXED, exit_layer=exit_layer, tree=label)) for label in CLUSTER_TREES]
    return arms


def measure_cluster(args: Namespace, prompts: list[list[int]]) -> dict:
    config = parse_config({
        "pools": {"draft": {"resources": {"draft": 1}, "num_cpus": 0}, "target": {"resources": {"target": 1}, "num_cpus": 0}},
        "drafters": {"drafter": {"path": args.drafter, "pool": "draft", "compile": args.drafter_compile}},
        "targets": {TARGET: {"path": args.target, "pool": "target", "drafter": "drafter", "compile": args.compile,
                             "tree": CLUSTER_TREES[0]}},
        "server": {"grpc_port": 0},
    })
    arms = cluster_arms([int(e) for e in args.exits.split(",")])
    with simulated_cluster({"num_cpus": 1}, draft={"num_cpus": 4, "resources": {"draft": 8}},
                           target={"num_cpus": 4, "resources": {"target": 8}}):
        fleet = start_fleet(config)
        server = BackgroundServer(fleet)
        channel = grpc.insecure_channel(server.address)
        try:
            measured = _interleaved(pb_grpc.GenerationStub(channel), arms, prompts, args)
        finally:
            channel.close()
            server.stop()
            stop_fleet(fleet)
    return {"load_average_at_end": load_average(), "arms": measured}


def _interleaved(stub, arms, prompts, args: Namespace) -> list[dict]:
    def run(prompt, speculation) -> tuple[float, list[int], int]:
        request = pb.GenerateRequest(model=TARGET, token_ids=pb.TokenIds(ids=prompt), max_tokens=args.max_tokens,
                                     temperature=0.0, ignore_eos=True, speculation=speculation)
        started = time.perf_counter()
        response = stub.Generate(request, timeout=600)
        return time.perf_counter() - started, list(response.token_ids), response.speculation.target_forwards

    for *_, speculation in arms:  # warm-up: first calls pay for connections and any graph left to compile
        run(prompts[0], speculation)
    speeds = {name: [] for name, *_ in arms}
    emitted, forwards = {name: 0 for name, *_ in arms}, {name: 0 for name, *_ in arms}
    outputs = {name: [] for name, *_ in arms}
    for _ in range(args.repeats):
        for prompt in prompts:
            for name, _, _, speculation in arms:
                seconds, tokens, target_forwards = run(prompt, speculation)
                speeds[name].append(len(tokens) / seconds)
                emitted[name] += len(tokens)
                forwards[name] += target_forwards
                outputs[name].append(tokens)
    return [{"name": name, "exit": exit_layer, "family": family,
             "median_tokens_per_s": statistics.median(speeds[name]),
             "mal": emitted[name] / forwards[name] if forwards[name] else 1.0,
             "greedy_identical": outputs[name] == outputs["target alone"]}
            for name, exit_layer, family, _ in arms]
