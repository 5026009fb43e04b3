"""The full path on a simulated multi-node Ray cluster: gRPC -> router -> target actor <-> drafter actor.

Three nodes on this machine: a head, a node carrying the `draft` resource and
one carrying `target`. One drafter serves three targets concurrently.
"""

import re
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from cluster.config import parse_config
from cluster.placement import start_fleet, stop_fleet
from cluster.server import BackgroundServer
from cluster.simulated import simulated_cluster
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc
from tiny_models import build_llama

TARGETS = ("small", "medium", "large")
INTERNAL_TEXT = re.compile(r"pid=|actor_id|ip=|Traceback|/site-packages/")  # never in what a client sees
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def target_paths(tiny_dir, tokenizer, target_path):
    return {
        "small": target_path,
        "medium": build_llama(tiny_dir / "medium", tokenizer, seed=11, layers=3),
        "large": build_llama(tiny_dir / "large", tokenizer, seed=12, layers=5),
    }


@pytest.fixture(scope="module")
def ray_cluster():
    with simulated_cluster({"num_cpus": 1}, draft={"num_cpus": 4, "resources": {"draft": 8}}, target={"num_cpus": 4, "resources": {"target": 8}}) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def fleet(ray_cluster, target_paths, drafter_path):
    config = parse_config({
        "pools": {"draft": {"resources": {"draft": 1}}, "target": {"resources": {"target": 1}}},
        "drafters": {"sorted": {"path": str(drafter_path), "pool": "draft"}},
        "targets": {name: {"path": str(path), "pool": "target", "drafter": "sorted", "exit_layer": 2, "k": 3}
                    for name, path in target_paths.items()},
        "server": {"grpc_port": 0, "drafter_timeout_s": 5},
    })
    fleet = start_fleet(config)
    yield fleet
    stop_fleet(fleet)


@pytest.fixture(scope="module")
def channel(fleet):
    server = BackgroundServer(fleet)
    with grpc.insecure_channel(server.address) as channel:
        yield channel
    server.stop()


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def expected(target_paths, prompts):
    """Each target's own greedy output, decoded alone in this process."""
    params = make_sampling_params(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return {
        name: [r.tokens for r in SpeculativeGenerator(ModelRunner.from_pretrained(path)).generate(prompts[:4], params)]
        for name, path in target_paths.items()
    }


def greedy_request(model: str, prompt: list[int], max_tokens: int = MAX_TOKENS) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, token_ids=pb.TokenIds(ids=prompt), max_tokens=max_tokens,
                              temperature=0.0, ignore_eos=True)


def test_health_and_model_list(channel, stub):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "specfleet.v1.Generation"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert set(models) == {"sorted", *TARGETS}
    assert models["sorted"].role == "drafter" and list(models["sorted"].exit_layers) == [1, 2, 4]
    assert models["large"].drafter == "sorted" and models["large"].k == 3


def test_actors_sit_on_their_pools_nodes(fleet, ray_cluster):
    assert {info["node_id"] for info in fleet.infos["sorted"]} == {ray_cluster["draft"]}
    for name in TARGETS:
        assert {info["node_id"] for info in fleet.infos[name]} == {ray_cluster["target"]}


def test_three_targets_served_concurrently_by_one_drafter_are_lossless(stub, fleet, prompts, expected):
    jobs = [(name, i, prompt) for name in TARGETS for i, prompt in enumerate(prompts[:4])]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: stub.Generate(greedy_request(job[0], job[2]), timeout=120), jobs))
    for (name, i, _), response in zip(jobs, responses):
        assert list(response.token_ids) == expected[name][i], f"{name}, prompt {i}"
        assert response.finish_reason == pb.LENGTH and response.usage.completion_tokens == MAX_TOKENS
        assert response.speculation.drafted > 0 and response.speculation.drafter == "sorted"
    merged = ray.get(fleet.drafters["sorted"][0].batched_forwards.remote())
    assert merged > 0


def test_streaming_delivers_the_same_tokens_and_text(stub, tokenizer, prompts, expected):
    messages = list(stub.GenerateStream(greedy_request("medium", prompts[1]), timeout=120))
    tokens = [t for m in messages for t in m.token_ids]
    assert tokens == expected["medium"][1]
    assert "".join(m.text for m in messages) == tokenizer.decode(tokens)
    assert messages[-1].finish_reason == pb.LENGTH and messages[-1].speculation.target_forwards < MAX_TOKENS + 1


def test_speculation_off_and_fixed_per_request(stub, prompts, expected):
    off = greedy_request("small", prompts[0])
    off.speculation.mode = pb.Speculation.OFF
    response = stub.Generate(off, timeout=120)
    assert list(response.token_ids) == expected["small"][0] and response.speculation.drafted == 0
    assert response.speculation.drafter == "" and response.speculation.k == 0
    fixed = greedy_request("small", prompts[0])
    fixed.speculation.CopyFrom(pb.Speculation(mode=pb.Speculation.FIXED, k=5, exit_layer=4))
    response = stub.Generate(fixed, timeout=120)
    assert list(response.token_ids) == expected["small"][0]
    assert (response.speculation.drafter, response.speculation.k, response.speculation.exit_layer) == ("sorted", 5, 4)


@pytest.mark.parametrize(
    "mutate, code, message",
    [
        (lambda r: setattr(r, "model", "nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
        (lambda r: r.token_ids.ClearField("ids"), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        (lambda r: r.ClearField("token_ids"), grpc.StatusCode.INVALID_ARGUMENT, "no prompt"),
        (lambda r: r.token_ids.ids.append(-4), grpc.StatusCode.INVALID_ARGUMENT, "token ids must lie in"),
        (lambda r: setattr(r, "max_tokens", 400), grpc.StatusCode.INVALID_ARGUMENT, "exceeds the model's context"),
        (lambda r: setattr(r, "temperature", -1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (lambda r: setattr(r, "top_p", 1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (lambda r: r.token_ids.ids.extend([1] * 300), grpc.StatusCode.INVALID_ARGUMENT, "leaves no room"),
        (lambda r: r.speculation.CopyFrom(pb.Speculation(mode=pb.Speculation.FIXED, k=2, exit_layer=9)),
         grpc.StatusCode.INVALID_ARGUMENT, "exit 9 is not one of the exits the drafter was trained for: [1, 2, 4]"),
        (lambda r: r.speculation.CopyFrom(pb.Speculation(mode=pb.Speculation.FIXED, k=2, exit_layer=3)),
         grpc.StatusCode.INVALID_ARGUMENT, "exit 3 is not one of the exits"),
        (lambda r: r.speculation.CopyFrom(pb.Speculation(mode=7, k=2)), grpc.StatusCode.INVALID_ARGUMENT,
         "unknown speculation mode 7"),
        (lambda r: r.speculation.CopyFrom(pb.Speculation(mode=pb.Speculation.FIXED, k=1000)),
         grpc.StatusCode.INVALID_ARGUMENT, "needs 1 <= k <= 64, got 1000"),
    ],
)
def test_bad_requests_get_the_right_status_and_the_server_keeps_serving(stub, prompts, expected, mutate, code, message):
    request = greedy_request("small", prompts[0])
    mutate(request)
    with pytest.raises(grpc.RpcError) as failure:
        stub.Generate(request, timeout=60)
    assert failure.value.code() == code and message in failure.value.details()
    assert not INTERNAL_TEXT.search(failure.value.details())
    assert list(stub.Generate(greedy_request("small", prompts[0]), timeout=120).token_ids) == expected["small"][0]


def wait_until(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_a_cancelled_stream_frees_its_state_on_both_actors(stub, fleet, prompts):
    target, drafter = fleet.targets["large"][0], fleet.drafters["sorted"][0]
    stream = stub.GenerateStream(greedy_request("large", prompts[2], max_tokens=200), timeout=120)
    next(stream)
    assert ray.get(target.live_sequences.remote()) == 1 and ray.get(drafter.live_sequences.remote()) == 1
    stream.cancel()
    assert wait_until(lambda: ray.get(target.live_sequences.remote()) == 0)
    assert wait_until(lambda: ray.get(drafter.live_sequences.remote()) == 0)


def test_a_passed_deadline_ends_the_call_and_frees_its_state(stub, fleet, prompts):
    target = fleet.targets["medium"][0]
    with pytest.raises(grpc.RpcError) as failure:
        stub.Generate(greedy_request("medium", prompts[2], max_tokens=230), timeout=0.3)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: ray.get(target.live_sequences.remote()) == 0)


def test_killing_the_drafter_mid_stream_loses_no_token(stub, fleet, prompts, expected):
    """Last in this module: the drafter stays dead, and every later stream decodes plainly."""
    streams = [(name, i, stub.GenerateStream(greedy_request(name, prompt), timeout=120))
               for name in TARGETS for i, prompt in enumerate(prompts[:2])]
    firsts = [next(stream) for _, _, stream in streams]  # every stream is mid-generation
    ray.kill(fleet.drafters["sorted"][0])
    for (name, i, stream), first in zip(streams, firsts):
        tokens = list(first.token_ids) + [t for m in stream for t in m.token_ids]
        assert tokens == expected[name][i], f"{name}, prompt {i}"
    after = stub.Generate(greedy_request("large", prompts[3]), timeout=120)
    assert list(after.token_ids) == expected["large"][3] and after.speculation.drafted == 0
