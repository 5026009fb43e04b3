"""The zoo's drafter-8k drafting for target-xl across vocabularies through real Ray actors, on held-out code."""

import ray

from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from bench.prompts import heldout_code_prompts
from cluster.defaults import models_dir
from cluster.placement import start_fleet, stop_fleet
from cluster.simulated import simulated_cluster
from test_overlap_cluster import concurrent_streams, two_pool_config


def test_the_zoos_drafter_8k_drafts_for_target_xl_through_the_cluster_on_held_out_code():
    """Held-out code prompts (the benchmark's), target-xl and drafter-8k in two actors on two simulated nodes."""
    prompts = heldout_code_prompts(3, 64)
    params = make_sampling_params(temperature=0, max_tokens=16, ignore_eos=True)
    with simulated_cluster({"num_cpus": 1}, draft={"num_cpus": 4, "resources": {"draft": 8}},
                           target={"num_cpus": 4, "resources": {"target": 8}}):
        target = {"path": str(models_dir() / "target-xl"), "pool": "target", "drafter": "sorted", "exit_layer": 4}
        fleet = start_fleet(two_pool_config(models_dir() / "drafter-8k", {"target-xl": target}))
        try:
            handle = fleet.targets["target-xl"][0]
            streams = concurrent_streams(handle, "held-out", prompts, [params] * len(prompts))
            drafted = sum(r.drafted for r in ray.get(handle.drain_telemetry.remote()))
        finally:
            stop_fleet(fleet)
    own = SpeculativeGenerator(ModelRunner.from_pretrained(models_dir() / "target-xl")).generate(prompts, params)
    assert streams == [r.tokens for r in own] and drafted > 0
