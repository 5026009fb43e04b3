"""Drafting across vocabularies through real Ray actors: one drafter actor serves targets of two vocabularies at once."""

import pytest
import ray
from transformers import AutoTokenizer

from actors.drafters import ModelDrafter
from actors.foreign_drafter import pair_drafter
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from cluster.placement import start_fleet, stop_fleet
from cluster.simulated import simulated_cluster
from test_overlap_cluster import concurrent_streams, two_pool_config

GREEDY = make_sampling_params(temperature=0, max_tokens=24, ignore_eos=True)
STREAMS = 3


@pytest.fixture(scope="module")
def fleet(target_path, foreign_drafter_path):
    """`bridged` reads the zoo-like target vocabulary, `native` the drafter's own (the drafter model as a target)."""
    with simulated_cluster({"num_cpus": 1}, draft={"num_cpus": 4, "resources": {"draft": 8}},
                           target={"num_cpus": 4, "resources": {"target": 8}}):
        targets = {"bridged": {"path": str(target_path), "pool": "target", "drafter": "sorted", "exit_layer": 2, "k": 3},
                   "native": {"path": str(foreign_drafter_path), "pool": "target", "drafter": "sorted", "exit_layer": 1}}
        fleet = start_fleet(two_pool_config(foreign_drafter_path, targets))
        yield fleet
        stop_fleet(fleet)


def own_outputs(path, prompts, params) -> list[list[int]]:
    return [r.tokens for r in SpeculativeGenerator(ModelRunner.from_pretrained(path)).generate(prompts, params)]


def test_greedy_streams_of_both_vocabularies_at_once_are_each_targets_own_tokens(
        fleet, target_path, foreign_drafter_path, prompts):
    texts = ["def add(a, b):", "while True:\n    total", "import os\n"]
    prompt_sets = {"bridged": prompts[:STREAMS],
                   "native": [AutoTokenizer.from_pretrained(foreign_drafter_path).encode(t) for t in texts]}
    paths = {"bridged": target_path, "native": foreign_drafter_path}
    handles = {name: fleet.targets[name][0] for name in prompt_sets}
    for handle in handles.values():
        ray.get(handle.drain_telemetry.remote())
    refs = {name: concurrent_streams(handles[name], name, prompt_sets[name], [GREEDY] * STREAMS) for name in prompt_sets}
    for name, outputs in refs.items():
        assert outputs == own_outputs(paths[name], prompt_sets[name], GREEDY), name
        records = ray.get(handles[name].drain_telemetry.remote())
        assert sum(r.drafted for r in records) > 0, name  # counted in the target's tokens
    assert ray.get(fleet.drafters["sorted"][0].live_sequences.remote()) == 0


def test_a_seeded_sampled_stream_across_vocabularies_matches_the_in_process_one(
        fleet, target_path, foreign_drafter_path, prompts):
    """The in-process foreign drafter's sampled output follows the target's distribution (tests/test_foreign_vocabulary.py);
    the cluster, with the drafter in another actor, draws the same tokens for the same seeds."""
    params = [make_sampling_params(temperature=1.0, max_tokens=16, seed=s, ignore_eos=True) for s in range(STREAMS)]
    target = ModelRunner.from_pretrained(target_path)
    drafter = pair_drafter(ModelDrafter(ModelRunner.from_pretrained(foreign_drafter_path)),
                           AutoTokenizer.from_pretrained(target_path), AutoTokenizer.from_pretrained(foreign_drafter_path),
                           target.vocab_size)
    in_process = [r.tokens for r in SpeculativeGenerator(target, drafter, k=3, exit_layer=2)
                  .generate(prompts[:STREAMS], params)]
    assert concurrent_streams(fleet.targets["bridged"][0], "sampled", prompts[:STREAMS], params) == in_process

