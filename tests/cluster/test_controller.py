"""The fleet controller on a simulated multi-node Ray cluster: plans, healing, scaling, stats.

The controller runs as a plain Ray actor with a long period; tests call
`step()` to take a control step when they need one.
"""

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from cluster.admission import LOAD_REPORT_TTL_S, LOAD_SYNC_S, DoorLoad
from cluster.config import parse_config
from cluster.controller.client import FLEET_REFRESH_S
from cluster.simulated import simulated_cluster
from specfleet.v1 import generation_pb2 as pb

from controlled_fleet import controlled_fleet, step_until

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def ray_cluster():
    with simulated_cluster({"num_cpus": 2}, draft={"num_cpus": 4, "resources": {"draft": 8}}, target={"num_cpus": 4, "resources": {"target": 8}}) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def controlled(ray_cluster, target_path, drafter_path):
    config = parse_config({
        "pools": {"draft": {"resources": {"draft": 1}, "num_cpus": 0.5}, "target": {"resources": {"target": 1}, "num_cpus": 0.5}},
        "drafters": {"sorted": {"path": str(drafter_path), "pool": "draft"}},
        "targets": {"small": {"path": str(target_path), "pool": "target", "drafter": "sorted", "k": 3,
                              "autoscale": {"min_replicas": 1, "max_replicas": 2, "sequences_per_replica": 2}}},
        "server": {"grpc_port": 0, "drafter_timeout_s": 5},
        "controller": {"period_s": 3600, "adaptive": False},
    })
    with controlled_fleet(config) as controller_and_stub:
        yield controller_and_stub


@pytest.fixture(scope="module")
def controller(controlled):
    return controlled[0]


@pytest.fixture(scope="module")
def stub(controlled):
    return controlled[1]


@pytest.fixture(scope="module")
def expected(target_path, prompts):
    params = make_sampling_params(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [r.tokens for r in SpeculativeGenerator(ModelRunner.from_pretrained(target_path)).generate(prompts[:4], params)]


def request(prompt: list[int]) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="small", token_ids=pb.TokenIds(ids=prompt), max_tokens=MAX_TOKENS,
                              temperature=0.0, ignore_eos=True)


def wait_until_dead(handle, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError("the killed actor still answers")


def stream_tokens(stub, prompt, on_first=None) -> list[int]:
    tokens = []
    for message in stub.GenerateStream(request(prompt), timeout=300):
        if on_first is not None and not tokens:
            on_first()
        tokens.extend(message.token_ids)
    return tokens


def test_plan_change_reaches_targets_mid_stream_without_breaking_exactness(controller, stub, prompts, expected):
    plans = iter([(1, 1), (0, None), (5, 4), (3, 2)])

    def change_plan():
        k, exit_layer = next(plans, (3, 2))
        ray.get(controller.pin_plan.remote("small", k, exit_layer))

    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda p: stream_tokens(stub, p, on_first=change_plan), prompts[:4]))
    assert outputs == expected
    ray.get(controller.step.remote())  # collect the rounds' telemetry
    arms = {(p.k, p.exit_layer) for p in ray.get(controller.stats.remote()).pairs if p.target == "small"}
    assert len(arms) >= 3, f"the plans should have been used by rounds: {arms}"


def test_dead_drafter_is_replaced_and_speculation_resumes(controller, stub, prompts, expected):
    ray.get(controller.pin_plan.remote("small", 3, 2))
    version, fleet = ray.get(controller.snapshot.remote())
    dead = fleet.drafters["sorted"][0]
    kill = lambda: ray.kill(dead)  # noqa: E731 - kill as soon as the first stream has tokens
    with ThreadPoolExecutor(3) as pool:
        outputs = list(pool.map(lambda i: stream_tokens(stub, prompts[i], kill if i == 0 else None), range(3)))
    assert outputs == expected[:3]  # plain decoding took over, exactly
    step_until(controller, lambda fleet: fleet.drafters["sorted"][0] != dead, "the replacement drafter is installed")
    assert ray.get(controller.snapshot.remote())[0] > version
    response = stub.Generate(request(prompts[3]), timeout=300)
    assert list(response.token_ids) == expected[3]
    assert response.speculation.drafted > 0, "the replacement drafter should draft again"


def test_stats_and_metrics_report_the_rounds(controller, stub, prompts):
    stub.Generate(request(prompts[0]), timeout=300)
    ray.get(controller.step.remote())
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=30)
    speculating = [p for p in stats.pairs if p.target == "small" and p.drafter == "sorted"]
    assert speculating and all(p.rounds > 0 and 0 <= p.acceptance_rate <= 1 for p in speculating)
    assert all(p.mean_accepted_length >= 1 for p in speculating)
    (plan,) = stats.plans
    assert (plan.target, plan.k, plan.exit_layer, plan.drafter) == ("small", 3, 2, "sorted")
    text, _ = ray.get(controller.metrics_text.remote())
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.labels.get("target") == "small" and sample.labels.get("drafter") == "sorted":
                totals[sample.name] = totals.get(sample.name, 0) + sample.value
    # the tiny drafter is a different random model, so few of its tokens are accepted; the counts must agree
    assert totals["specfleet_rounds_total"] == sum(p.rounds for p in speculating) > 0
    assert totals["specfleet_draft_tokens_total"] == sum(p.drafted for p in speculating) > 0
    assert totals["specfleet_accepted_tokens_total"] == sum(p.accepted for p in speculating)


def test_busy_target_scales_up_then_back_down(controller, stub, prompts):
    version, fleet = ray.get(controller.snapshot.remote())
    assert len(fleet.targets["small"]) == 1
    long_request = pb.GenerateRequest(model="small", token_ids=pb.TokenIds(ids=prompts[0]), max_tokens=200,
                                      temperature=0.0, ignore_eos=True)
    with ThreadPoolExecutor(6) as pool:
        calls = [pool.submit(stub.Generate, long_request, timeout=300) for _ in range(6)]
        deadline = time.time() + 60
        while time.time() < deadline and ray.get(fleet.targets["small"][0].live_sequences.remote()) < 5:
            time.sleep(0.1)
        ray.get(controller.step.remote())
        _, scaled = ray.get(controller.snapshot.remote())
        assert len(scaled.targets["small"]) == 2
        assert all(len(call.result().token_ids) == 200 for call in calls)
    ray.get(controller.step.remote())
    _, shrunk = ray.get(controller.snapshot.remote())
    assert len(shrunk.targets["small"]) == 1


def test_the_fleet_is_unready_while_no_target_replica_can_serve(controller, stub, prompts, expected):
    """Every replica of the only target killed: unready until a replacement answers; then it serves exactly."""
    assert ray.get(controller.ready.remote())
    _, fleet = ray.get(controller.snapshot.remote())
    for handle in fleet.targets["small"]:
        ray.kill(handle)
    ray.get(controller.step.remote())  # finds them dead and starts replacements
    assert not ray.get(controller.ready.remote())
    deadline = time.time() + 120
    while not ray.get(controller.ready.remote()):
        assert time.time() < deadline, "no replacement answered"
        ray.get(controller.step.remote())
    time.sleep(2 * FLEET_REFRESH_S)  # the front door picks up the new fleet at its next refresh
    assert list(stub.Generate(request(prompts[0]), timeout=300).token_ids) == expected[0]


def test_requests_in_flight_at_other_front_doors_count_towards_the_fleets_limit(controller, stub, prompts, expected):
    """Another door reporting the fleet's whole limit in flight: this door refuses; once it falls silent, serves."""
    busy = DoorLoad(total=fleet_limit(controller))
    deadline = time.monotonic() + 30
    while True:
        ray.get(controller.report_load.remote("another-door", busy))
        time.sleep(LOAD_SYNC_S * 2)  # this door reads the others' counts at its next sync
        try:
            stub.Generate(request(prompts[0]), timeout=300)
        except grpc.RpcError as refused:
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "on this fleet" in refused.details()
            break
        assert time.monotonic() < deadline, "the other door's requests never counted here"
    time.sleep(LOAD_REPORT_TTL_S + LOAD_SYNC_S * 2)  # the other door fell silent: it drops out of the totals
    assert list(stub.Generate(request(prompts[0]), timeout=300).token_ids) == expected[0]


def fleet_limit(controller) -> int:
    _, fleet = ray.get(controller.snapshot.remote())
    return fleet.config.server.max_concurrent_requests


def test_new_requests_while_the_drafter_is_dead_decode_plainly_and_exactly(controller, stub, prompts, expected):
    """Admitted before the controller notices the death: plain decoding, exact, no error reaches the client."""
    ray.get(controller.pin_plan.remote("small", 3, 2))
    _, fleet = ray.get(controller.snapshot.remote())
    killed = fleet.drafters["sorted"][0]
    ray.kill(killed)
    wait_until_dead(killed)  # ray.kill returns before the process dies: a request admitted meanwhile would draft
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda p: stub.Generate(request(p), timeout=300), prompts[:2]))
    assert [list(r.token_ids) for r in responses] == expected[:2]
    assert all(r.speculation.drafted == 0 for r in responses)
    ray.get(controller.step.remote())  # a replacement, for whatever runs next


LONG_TOKENS = 200


@pytest.fixture(scope="module")
def shared_drafter_controller(ray_cluster, target_path, drafter_path):
    """Two replicas of one drafter shared by three single-replica targets: placement pairs a, b, c with 0, 1, 0."""
    targets = {name: {"path": str(target_path), "pool": "target", "drafter": "sorted", "k": 3} for name in "abc"}
    config = parse_config({
        "pools": {"draft": {"resources": {"draft": 1}, "num_cpus": 0.5}, "target": {"resources": {"target": 1}, "num_cpus": 0.5}},
        "drafters": {"sorted": {"path": str(drafter_path), "pool": "draft", "replicas": 2}},
        "targets": targets,
        "server": {"grpc_port": 0, "drafter_timeout_s": 5},
        "controller": {"period_s": 3600, "adaptive": False},
    })
    with controlled_fleet(config) as controller_and_stub:
        yield controller_and_stub


def test_a_target_moves_from_a_busy_drafter_replica_to_an_idle_one_mid_stream(shared_drafter_controller, target_path,
                                                                                 prompts):
    controller, stub = shared_drafter_controller
    _, fleet = ray.get(controller.snapshot.remote())
    assert fleet.pairing == {("a", 0): 0, ("b", 0): 1, ("c", 0): 0}
    params = make_sampling_params(temperature=0, max_tokens=LONG_TOKENS, ignore_eos=True)
    expected = [r.tokens for r in SpeculativeGenerator(ModelRunner.from_pretrained(target_path)).generate(prompts[:2], params)]
    idle_forwards = ray.get(fleet.drafters["sorted"][1].batched_forwards.remote())

    def stream(name, prompt):
        message = pb.GenerateRequest(model=name, token_ids=pb.TokenIds(ids=prompt), max_tokens=LONG_TOKENS,
                                     temperature=0.0, ignore_eos=True)
        return [t for update in stub.GenerateStream(message, timeout=300) for t in update.token_ids]

    with ThreadPoolExecutor(2) as pool:  # traffic on a and c only: drafter replica 0 drafts for both
        calls = [pool.submit(stream, name, prompt) for name, prompt in zip("ac", prompts[:2])]
        deadline = time.time() + 60
        while time.time() < deadline and not all(ray.get(fleet.targets[n][0].live_sequences.remote()) for n in "ac"):
            time.sleep(0.05)
        time.sleep(0.3)  # a few rounds of drafting to measure
        ray.get(controller.step.remote())
        _, moved = ray.get(controller.snapshot.remote())
        assert [call.result() for call in calls] == expected  # the moved stream replayed onto its new drafter exactly
    assert sorted(moved.pairing.values()) == [0, 1, 1] and moved.pairing[("b", 0)] == 1
    assert moved.pairing[("a", 0)] != moved.pairing[("c", 0)]
    assert ray.get(fleet.drafters["sorted"][1].batched_forwards.remote()) > idle_forwards  # the idle replica drafts now
