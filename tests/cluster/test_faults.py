"""The fault suite: the Serve application on a simulated multi-node cluster, with a process killed under it.

Each fault strikes with greedy streams in flight, and every stream that must
survive is checked token for token against the target's own greedy output:

- the controller's replica killed: no stream fails; Serve's replacement adopts
  the running actors (no new ones) and steers them;
- the only target replica killed: every stream resumes on the replacement, exactly,
  and the dead replica's sequences are freed on the drafter;
- the drafter killed: new requests during the outage decode plainly and exactly;
- bursts of 300 concurrent requests: each actor's memory after the last is
  within 10% of its memory after the first;
- the gRPC front door's replica killed: its streams end, and no sequence stays
  live on any actor 10 s later, long before they would have finished.

The models are tiny, with a long context so that a stream can run long.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import ray
from ray import serve

from actors.generator import SpeculativeGenerator
from bench.memory import private_rss_mib
from bench.soak_traffic import serve_replica
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from cluster.config import parse_config
from cluster.placement import NAMESPACE
from cluster.serve.app import build_app_from_config
from cluster.simulated import simulated_cluster
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc
from tiny_models import build_llama
from up_server import free_port

APP = "specfleet"
MAX_TOKENS = 48
LONG_CONTEXT = 4096
FAULT_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def paths(tiny_dir, tokenizer) -> dict[str, Path]:
    return {"target": build_llama(tiny_dir / "long_target", tokenizer, seed=21, max_context=LONG_CONTEXT),
            "drafter": build_llama(tiny_dir / "long_drafter", tokenizer, seed=22, max_context=LONG_CONTEXT,
                                   exit_layers=[1, 2, 4])}


@pytest.fixture(scope="module")
def app(paths):
    config = parse_config({
        "pools": {"draft": {"resources": {"draft": 1}, "num_cpus": 0.5}, "target": {"resources": {"target": 1}, "num_cpus": 0.5}},
        "drafters": {"sorted": {"path": str(paths["drafter"]), "pool": "draft"}},
        "targets": {"small": {"path": str(paths["target"]), "pool": "target", "drafter": "sorted", "exit_layer": 2, "k": 3}},
        "server": {"grpc_port": 0, "drafter_timeout_s": 5},
        "controller": {"period_s": 1.0, "adaptive": False},
    })
    with simulated_cluster({"num_cpus": 2}, draft={"num_cpus": 2, "resources": {"draft": 4}},
                           target={"num_cpus": 2, "resources": {"target": 4}}):
        serve.start(http_options={"host": "127.0.0.1", "port": free_port(), "location": "HeadOnly"})
        ingress = serve.run(build_app_from_config(config, "127.0.0.1", 0), name=APP, route_prefix="/")
        yield {"grpc": f"127.0.0.1:{ingress.grpc_port.remote().result()}",
               "controller": serve.get_deployment_handle("FleetController", app_name=APP)}
        serve.shutdown()


@pytest.fixture(scope="module")
def stub(app):
    with grpc.insecure_channel(app["grpc"]) as channel:
        yield pb_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def expected(paths, prompts) -> list[list[int]]:
    params = make_sampling_params(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [r.tokens for r in SpeculativeGenerator(ModelRunner.from_pretrained(paths["target"])).generate(prompts, params)]


def request(prompt: list[int], max_tokens: int = MAX_TOKENS) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="small", token_ids=pb.TokenIds(ids=prompt), max_tokens=max_tokens, temperature=0.0,
                              ignore_eos=True)


def streams_with_a_fault(stub, prompts: list[list[int]], fault) -> list[list[int]]:
    """Stream every prompt at once; `fault()` runs once every stream has its first tokens."""
    started = threading.Barrier(len(prompts) + 1)

    def stream(prompt: list[int]) -> list[int]:
        tokens = []
        for message in stub.GenerateStream(request(prompt), timeout=FAULT_TIMEOUT_S):
            if not tokens:
                started.wait()
            tokens.extend(message.token_ids)
        return tokens

    with ThreadPoolExecutor(len(prompts)) as pool:
        outputs = [pool.submit(stream, p) for p in prompts]
        started.wait(timeout=FAULT_TIMEOUT_S)
        fault()
        return [output.result() for output in outputs]


def fleet_actor_names() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}


def actor_ids(fleet) -> list[str]:
    return sorted(h._actor_id.hex() for h in fleet.all_handles())


def wait_for(condition, what: str, timeout_s: float = FAULT_TIMEOUT_S, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = condition()
            if result:
                return result
        except Exception:  # noqa: BLE001 - a dying or restarting process answers with errors for a while
            pass
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(poll_s)


def test_killing_the_controller_mid_stream_fails_no_stream_and_its_successor_adopts_the_fleet(app, stub, prompts, expected):
    controller = app["controller"]
    version, fleet = controller.snapshot.remote().result()
    names = fleet_actor_names()
    outputs = streams_with_a_fault(stub, prompts, lambda: ray.kill(serve_replica(APP, "FleetController"), no_restart=True))
    assert outputs == expected

    new_version, adopted = wait_for(lambda: _new_snapshot(controller, version), "Serve's new controller replica answers")
    assert actor_ids(adopted) == actor_ids(fleet), "the successor should adopt the running actors"
    assert fleet_actor_names() == names, "and start none"
    controller.pin_plan.remote("small", 2, 1).result()  # the successor steers the adopted targets
    response = stub.Generate(request(prompts[0]), timeout=FAULT_TIMEOUT_S)
    assert list(response.token_ids) == expected[0]
    assert (response.speculation.k, response.speculation.exit_layer) == (2, 1)


def _new_snapshot(controller, old_version: int):
    version, fleet = controller.snapshot.remote().result(timeout_s=10)
    return (version, fleet) if version != old_version else None


def test_killing_the_only_target_replica_mid_stream_resumes_every_stream_exactly(app, stub, prompts, expected):
    controller = app["controller"]
    _, fleet = controller.snapshot.remote().result()
    [target] = fleet.targets["small"]
    outputs = streams_with_a_fault(stub, prompts, lambda: ray.kill(target))
    assert outputs == expected
    wait_for(lambda: {(r.role, r.answered) for r in controller.stats.remote().result().replicas
                      if r.model == "small"} == {("target", True)}, "the controller's ping finds the replacement")
    wait_for(lambda: all(r.live_sequences == 0 for r in controller.stats.remote().result().replicas),
             "the dead target's sequences are freed on the drafter too", timeout_s=10)


def test_new_requests_while_the_drafter_is_dead_decode_plainly_and_exactly(app, stub, prompts, expected):
    _, fleet = app["controller"].snapshot.remote().result()
    ray.kill(fleet.drafters["sorted"][0])
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda p: stub.Generate(request(p), timeout=FAULT_TIMEOUT_S), prompts[:4]))
    assert [list(r.token_ids) for r in responses] == expected[:4]


BURSTS, BURST_REQUESTS = 5, 300


def _actor_rss(fleet) -> dict[str, float]:
    """Private resident memory (RssAnon, MiB) of every drafter and target actor process."""
    return {f"{name}/{replica}": private_rss_mib(info["pid"])
            for name, infos in fleet.infos.items() for replica, info in enumerate(infos)}


def _settled_fleet(controller):
    """The fleet once every actor in it runs and answered the controller's last ping, else None."""
    _, fleet = controller.snapshot.remote().result()
    running = all(Path(f"/proc/{info['pid']}").exists() for infos in fleet.infos.values() for info in infos)
    answered = all(r.answered for r in controller.stats.remote().result().replicas)
    return fleet if running and answered else None


def test_memory_after_bursts_of_300_concurrent_requests_returns_to_its_level(app, stub, prompts):
    controller = app["controller"]
    fleet = wait_for(lambda: _settled_fleet(controller), "the drafter killed before is replaced and every actor answers")
    after = []
    for _ in range(BURSTS):
        calls = [stub.Generate.future(request(prompts[i % len(prompts)], 16), timeout=FAULT_TIMEOUT_S)
                 for i in range(BURST_REQUESTS)]
        codes = [call.code() for call in calls]
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.OK) >= 256  # the front door's limit of requests in flight
        after.append(_actor_rss(fleet))
    for actor, first in after[0].items():
        assert after[-1][actor] <= 1.1 * first, f"{actor}: {[round(m[actor]) for m in after]} MiB"


def test_killing_the_grpc_front_door_cancels_its_sequences_on_every_actor(app, stub, prompts):
    """16 streams that would each run 4,000 tokens: 10 s after their front door died, none is live anywhere."""
    controller, long_tokens = app["controller"], LONG_CONTEXT - 64
    failed = []

    def stream(prompt: list[int]) -> None:
        try:
            for _ in stub.GenerateStream(request(prompt, long_tokens), timeout=FAULT_TIMEOUT_S):
                pass
        except grpc.RpcError as err:
            failed.append(err.code())

    threads = [threading.Thread(target=stream, args=(prompts[i % len(prompts)],)) for i in range(16)]
    for thread in threads:
        thread.start()
    wait_for(lambda: sum(r.live_sequences for r in controller.stats.remote().result().replicas
                         if r.role == "target") == 16, "all 16 sequences are live", poll_s=0.1)
    emitted_before = _emitted(controller)
    ray.kill(serve_replica(APP, "FrontDoor"), no_restart=True)
    killed_at = time.monotonic()
    for thread in threads:
        thread.join(FAULT_TIMEOUT_S)
    assert len(failed) == 16, "every stream of the dead front door ends"
    wait_for(lambda: all(r.live_sequences == 0 for r in controller.stats.remote().result().replicas),
             "no sequence is live on any actor", timeout_s=10 - (time.monotonic() - killed_at))
    decoded = _emitted(controller) - emitted_before
    assert decoded < 16 * long_tokens / 2, f"{decoded} tokens decoded after the kill: the sequences ran on"


def _emitted(controller) -> int:
    """Tokens the target's rounds emitted so far, as the controller collected them (it collects every second)."""
    time.sleep(1.5)
    return sum(p.emitted for p in controller.stats.remote().result().pairs if p.target == "small")
