"""A drafter embedded in its targets' actors (`DrafterConfig.placement: embedded`), under a fleet controller.

No drafter actor runs: each target replica loads the drafter into its own
process. Greedy output through gRPC must still equal each target's own; the
controller's plans reach the embedded drafter, its healing leaves it in place,
and a replaced target replica loads a drafter of its own.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from cluster.config import parse_config
from cluster.simulated import simulated_cluster
from specfleet.v1 import generation_pb2 as pb
from tiny_models import build_llama

from controlled_fleet import controlled_fleet, step_until

MAX_TOKENS = 24
TARGETS = ("small", "medium")


@pytest.fixture(scope="module")
def ray_cluster():
    with simulated_cluster({"num_cpus": 2}, target={"num_cpus": 4, "resources": {"target": 8}}) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def target_paths(tiny_dir, tokenizer, target_path):
    return {"small": target_path, "medium": build_llama(tiny_dir / "medium-embedding", tokenizer, seed=11, layers=3)}


@pytest.fixture(scope="module")
def controlled(ray_cluster, target_paths, drafter_path):
    config = parse_config({
        "pools": {"target": {"resources": {"target": 1}, "num_cpus": 0.5}},
        "drafters": {"inside": {"path": str(drafter_path), "pool": "target", "placement": "embedded"}},
        "targets": {name: {"path": str(path), "pool": "target", "drafter": "inside", "exit_layer": 2, "k": 3}
                    for name, path in target_paths.items()},
        "server": {"grpc_port": 0},
        "controller": {"period_s": 3600, "adaptive": False},
    })
    with controlled_fleet(config) as controller_and_stub:
        yield controller_and_stub


@pytest.fixture(scope="module")
def expected(target_paths, prompts):
    """Each target's own greedy output, decoded alone in this process."""
    params = make_sampling_params(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return {name: [r.tokens for r in SpeculativeGenerator(ModelRunner.from_pretrained(path)).generate(prompts[:4], params)]
            for name, path in target_paths.items()}


def greedy_request(model: str, prompt: list[int], speculation: pb.Speculation | None = None) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=model, token_ids=pb.TokenIds(ids=prompt), max_tokens=MAX_TOKENS,
                                 temperature=0.0, ignore_eos=True)
    if speculation is not None:
        request.speculation.CopyFrom(speculation)
    return request


def test_no_drafter_actor_runs_and_the_model_list_counts_the_embedded_copies(controlled):
    controller, stub = controlled
    _, fleet = ray.get(controller.snapshot.remote())
    assert fleet.drafters == {} and fleet.pairing == {}
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert models["inside"].role == "drafter" and list(models["inside"].exit_layers) == [1, 2, 4]
    assert models["inside"].replicas == len(TARGETS)  # one copy in each target replica
    pids = {info["pid"] for name in TARGETS for info in fleet.infos[name]}
    assert len(pids) == len(TARGETS)


@pytest.mark.parametrize("k, exit_layer", [(1, 1), (3, 2), (5, 4)])
def test_greedy_output_through_an_embedded_drafter_equals_each_targets_own(controlled, prompts, expected, k, exit_layer):
    _, stub = controlled
    speculation = pb.Speculation(mode=pb.Speculation.FIXED, k=k, exit_layer=exit_layer)
    jobs = [(name, i) for name in TARGETS for i in range(4)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(
            lambda job: stub.Generate(greedy_request(job[0], prompts[job[1]], speculation), timeout=120), jobs))
    for (name, i), response in zip(jobs, responses):
        assert list(response.token_ids) == expected[name][i], f"{name}, prompt {i}"
        assert response.speculation.drafter == "inside" and response.speculation.drafted > 0
        assert (response.speculation.k, response.speculation.exit_layer) == (k, exit_layer)


def test_plans_reach_the_embedded_drafter_and_healing_leaves_it_in_place(controlled, prompts, expected):
    controller, stub = controlled
    ray.get(controller.pin_plan.remote("small", 4, 1))
    for _ in range(2):  # healing finds the replica with its drafter and attaches nothing
        ray.get(controller.step.remote())
    _, fleet = ray.get(controller.snapshot.remote())
    assert ray.get(fleet.targets["small"][0].has_drafter.remote())
    response = stub.Generate(greedy_request("small", prompts[1]), timeout=120)
    assert list(response.token_ids) == expected["small"][1]
    assert (response.speculation.k, response.speculation.exit_layer) == (4, 1) and response.speculation.drafted > 0


def test_a_dead_target_replica_is_replaced_with_a_drafter_of_its_own(controlled, prompts, expected):
    """Last in this module: it kills a replica."""
    controller, stub = controlled
    _, fleet = ray.get(controller.snapshot.remote())
    dead = fleet.targets["medium"][0]
    ray.kill(dead)
    fleet = step_until(controller, lambda fleet: fleet.targets["medium"][0] != dead, "the replacement is installed")
    assert fleet.drafters == {} and len(fleet.infos["inside"]) == len(TARGETS)
    response = stub.Generate(greedy_request("medium", prompts[2]), timeout=120)
    assert list(response.token_ids) == expected["medium"][2]
    assert response.speculation.drafter == "inside" and response.speculation.drafted > 0
