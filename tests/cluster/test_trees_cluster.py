"""Token trees through real Ray actors: the drafter actor drafts trees for a target actor on another node."""

import pytest
import ray

from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from actors.speculation import SpeculationSpec
from actors.trees import TreeShape
from cluster.placement import start_fleet, stop_fleet
from cluster.simulated import simulated_cluster
from test_overlap_cluster import concurrent_streams, two_pool_config

GREEDY = make_sampling_params(temperature=0, max_tokens=32, ignore_eos=True)
STREAMS = 4


@pytest.fixture(scope="module")
def fleet(target_path, drafter_path):
    with simulated_cluster({"num_cpus": 1}, draft={"num_cpus": 4, "resources": {"draft": 8}},
                           target={"num_cpus": 4, "resources": {"target": 8}}):
        target = {"path": str(target_path), "pool": "target", "drafter": "sorted", "exit_layer": 2}
        fleet = start_fleet(two_pool_config(drafter_path, {"static": {**target, "tree": "static-3x2"},
                                                           "dynamic": {**target, "tree": "dynamic-3x2"}}))
        yield fleet
        stop_fleet(fleet)


@pytest.fixture(scope="module")
def expected(target_path, prompts):
    return [r.tokens for r in SpeculativeGenerator(ModelRunner.from_pretrained(target_path)).generate(prompts[:STREAMS], GREEDY)]


@pytest.mark.parametrize("name", ["static", "dynamic"])
def test_greedy_tree_streams_through_the_cluster_are_the_targets_own_tokens(fleet, prompts, expected, name):
    handle = fleet.targets[name][0]
    ray.get(handle.drain_telemetry.remote())
    alone = concurrent_streams(handle, f"{name}-alone", prompts[:1], [GREEDY])
    batched = concurrent_streams(handle, f"{name}-batched", prompts[:STREAMS], [GREEDY] * STREAMS)
    assert alone == expected[:1] and batched == expected
    records = ray.get(handle.drain_telemetry.remote())
    trees = [r for r in records if r.tree]
    assert {r.tree for r in trees} == {f"{name}-3x2"} and sum(r.drafted for r in trees) > 0
    assert ray.get(fleet.drafters["sorted"][0].live_sequences.remote()) == 0


def test_a_request_may_ask_for_its_own_tree_shape(fleet, prompts, expected):
    handle = fleet.targets["static"][0]
    ray.get(handle.drain_telemetry.remote())
    spec = SpeculationSpec(tree=TreeShape(depth=2, width=3, dynamic=True))
    tokens = []
    for ref in handle.generate.options(num_returns="streaming").remote("own-shape", prompts[0], GREEDY, spec):
        tokens += ray.get(ref).new_tokens
    assert tokens == expected[0]
    assert {r.tree for r in ray.get(handle.drain_telemetry.remote()) if r.drafted} == {"dynamic-2x3"}
