"""A staged chain across nodes, behind gRPC: drafter (draft node) -> stage actor hosting the middle
model (head node, `mid` pool) -> the last model (target node); and cascades asked for over the wire.

The middle model here has the last model's weights, so every staged draft must be accepted: proof
that drafts travel the whole chain. `tests/test_staged.py` checks chains of three different models."""

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray

from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner, RunnerSettings
from actors.sampling import make_sampling_params
from cluster.config import parse_config
from cluster.placement import start_fleet, stop_fleet
from cluster.server import BackgroundServer
from cluster.simulated import simulated_cluster
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc

from controlled_fleet import controlled_fleet, step_until

MAX_TOKENS = 20


@pytest.fixture(scope="module")
def ray_cluster():
    with simulated_cluster({"num_cpus": 1, "resources": {"mid": 8}}, draft={"num_cpus": 1, "resources": {"draft": 4}},
                           target={"num_cpus": 1, "resources": {"target": 4}}) as nodes:
        yield nodes | {"mid": nodes["head"]}


def chain_config(target_path, drafter_path) -> dict:
    return {
        "pools": {pool: {"resources": {pool: 1}, "num_cpus": 0} for pool in ("draft", "mid", "target")},
        "drafters": {"sorted": {"path": str(drafter_path), "pool": "draft"}},
        "targets": {
            "middle": {"path": str(target_path), "pool": "mid", "drafter": "sorted", "k": 3},
            "chained": {"path": str(target_path), "pool": "target", "drafter": "sorted", "via": ["middle"],
                        "exit_layer": 2, "k": 4},
        },
        "server": {"grpc_port": 0, "drafter_timeout_s": 30},
    }


@pytest.fixture(scope="module")
def fleet(ray_cluster, target_path, drafter_path):
    fleet = start_fleet(parse_config(chain_config(target_path, drafter_path)))
    yield fleet
    stop_fleet(fleet)


@pytest.fixture(scope="module")
def stub(fleet):
    server = BackgroundServer(fleet)
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GenerationStub(channel)
    server.stop()


def own_greedy(path, prompts, drafter: bool = False) -> list[list[int]]:
    """The model's own greedy output; a `drafter` as the cluster serves one (its weights as
    `RunnerSettings.drafter_weights` says by default)."""
    params = make_sampling_params(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    int8 = drafter and RunnerSettings().drafter_weights == "int8"
    runner = ModelRunner.from_pretrained(path, drafts=drafter, int8_weights=int8)
    return [r.tokens for r in SpeculativeGenerator(runner).generate(prompts, params)]


def greedy_request(model: str, prompt: list[int], cascade: pb.Cascade | None = None) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=model, token_ids=pb.TokenIds(ids=prompt), max_tokens=MAX_TOKENS,
                                 temperature=0.0, ignore_eos=True)
    if cascade is not None:
        request.speculation.cascade.CopyFrom(cascade)
    return request


def test_each_stage_of_the_chain_lives_on_its_pools_node(fleet, ray_cluster):
    [stage] = fleet.stages["chained"]
    assert ray.get(stage.info.remote())["node_id"] == ray_cluster["mid"]
    assert {i["node_id"] for i in fleet.infos["sorted"]} == {ray_cluster["draft"]}
    assert {i["node_id"] for i in fleet.infos["chained"]} == {ray_cluster["target"]}


def test_the_chains_greedy_output_is_the_last_models_own(stub, fleet, target_path, prompts):
    expected = own_greedy(target_path, prompts[:4])
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda p: stub.Generate(greedy_request("chained", p), timeout=180), prompts[:4]))
    for i, response in enumerate(responses):
        assert list(response.token_ids) == expected[i], f"prompt {i}"
        assert response.speculation.acceptance_rate == 1.0 and response.speculation.drafter == "sorted"
    [stage] = fleet.stages["chained"]
    assert ray.get(stage.batched_forwards.remote()) > 0  # the stage drafted,
    assert ray.get(stage.stats.remote()).drafted > 0  # speculating with the drafter
    assert ray.get(fleet.drafters["sorted"][0].batched_forwards.remote()) > 0


def test_cascades_over_the_wire_span_the_target_and_the_drafter(stub, target_path, drafter_path, prompts):
    lossless = stub.Generate(greedy_request("middle", prompts[1], pb.Cascade(rule=pb.Cascade.OPT, alpha=0.0)), timeout=180)
    assert list(lossless.token_ids) == own_greedy(target_path, prompts[1:2])[0]
    assert lossless.speculation.deferred == 0
    drafter_like = stub.Generate(greedy_request("middle", prompts[1], pb.Cascade(rule=pb.Cascade.CHOW, alpha=1.0)), timeout=180)
    assert list(drafter_like.token_ids) == own_greedy(drafter_path, prompts[1:2], drafter=True)[0]  # its deepest exit
    assert drafter_like.speculation.deferred == drafter_like.speculation.drafted > 0


@pytest.mark.parametrize(
    "cascade, message",
    [
        (pb.Cascade(rule=pb.Cascade.DIFF, alpha=1.5), "invalid cascade: alpha"),
        (pb.Cascade(alpha=0.2), "needs a rule and an alpha"),
    ],
)
def test_bad_cascades_get_invalid_argument(stub, prompts, cascade, message):
    with pytest.raises(grpc.RpcError) as failure:
        stub.Generate(greedy_request("middle", prompts[0], cascade), timeout=60)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in failure.value.details()


def test_list_models_shows_the_chain(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert list(models["chained"].via) == ["middle"] and models["chained"].drafter == "sorted"
    assert list(models["middle"].via) == []


@pytest.fixture(scope="module")
def controlled(ray_cluster, target_path, drafter_path):
    """The same chain under a fleet controller (stepped by the tests), behind its own gRPC server."""
    config = parse_config({**chain_config(target_path, drafter_path), "controller": {"period_s": 3600, "adaptive": False}})
    with controlled_fleet(config) as controller_and_stub:
        yield controller_and_stub


@pytest.mark.parametrize("victim", ["stage", "drafter"])
def test_the_controller_rebuilds_a_chain_that_lost_a_stage_or_its_drafter(controlled, target_path, prompts, victim):
    controller, stub = controlled
    _, fleet = ray.get(controller.snapshot.remote())
    [stage] = fleet.stages["chained"]
    ray.kill(stage if victim == "stage" else fleet.drafters["sorted"][0])
    expected = own_greedy(target_path, prompts[:2])
    meanwhile = stub.Generate(greedy_request("chained", prompts[0]), timeout=180)
    assert list(meanwhile.token_ids) == expected[0]  # served exactly while the chain is broken
    healed = step_until(controller, lambda fleet: fleet.stages["chained"][0] != stage, "the chain is rebuilt")
    [new_stage] = healed.stages["chained"]
    response = stub.Generate(greedy_request("chained", prompts[1]), timeout=180)
    assert list(response.token_ids) == expected[1]
    assert response.speculation.drafted > 0 and response.speculation.acceptance_rate == 1.0
    assert ray.get(new_stage.stats.remote()).drafted > 0  # the rebuilt stage speculates with a live drafter
