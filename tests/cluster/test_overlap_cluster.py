"""Overlapped rounds through real Ray actors: a target actor drafting one group while verifying the other.

Two nodes besides the head, one carrying `draft` and one `target`. Two target
actors serve the same model from one drafter actor, one with `overlap_rounds`
and one without, so both paths are compared in the same cluster.
"""

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from actors.draft_channel import ChannelClient
from actors.drafters import DraftRequest
from actors.engine import SpeculationEngine
from actors.generator import SpeculativeGenerator
from actors.ray_actors import DrafterActor, RayCalls, RemoteDrafter, connect_drafter
from actors.runner import ModelRunner, RunnerSettings
from actors.sampling import make_sampling_params
from cluster.config import parse_config
from cluster.placement import start_fleet, stop_fleet
from cluster.simulated import simulated_cluster

GREEDY = make_sampling_params(temperature=0, max_tokens=32, ignore_eos=True)
STREAMS = 4


@pytest.fixture(scope="module")
def ray_cluster():
    with simulated_cluster({"num_cpus": 1}, draft={"num_cpus": 4, "resources": {"draft": 8}}, target={"num_cpus": 4, "resources": {"target": 8}}) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def fleet(ray_cluster, target_path, drafter_path):
    target = {"path": str(target_path), "pool": "target", "drafter": "sorted", "exit_layer": 2, "k": 3}
    fleet = start_fleet(two_pool_config(drafter_path, {"overlapped": {**target, "overlap_rounds": True},
                                                       "sequential": target}))
    yield fleet
    stop_fleet(fleet)


def two_pool_config(drafter_path, targets: dict):
    """The drafter `sorted` on the `draft` pool, these targets on the `target` pool."""
    return parse_config({
        "pools": {"draft": {"resources": {"draft": 1}}, "target": {"resources": {"target": 1}}},
        "drafters": {"sorted": {"path": str(drafter_path), "pool": "draft"}},
        "targets": targets,
        "server": {"drafter_timeout_s": 5},
    })


@pytest.fixture(scope="module")
def expected(target_path, prompts):
    return [r.tokens for r in SpeculativeGenerator(ModelRunner.from_pretrained(target_path)).generate(prompts[:STREAMS], GREEDY)]


def stream_tokens(handle, seq_id: str, prompt: list[int], params) -> list[int]:
    tokens = []
    for ref in handle.generate.options(num_returns="streaming").remote(seq_id, prompt, params):
        tokens += ray.get(ref).new_tokens
    return tokens


def concurrent_streams(handle, name: str, prompts, params) -> list[list[int]]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda job: stream_tokens(handle, f"{name}-{job[0]}", job[1], params[job[0]]),
                             enumerate(prompts)))


def wait_until(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_concurrent_greedy_streams_are_the_targets_own_tokens(fleet, prompts, expected):
    handle = fleet.targets["overlapped"][0]
    ray.get(handle.drain_telemetry.remote())
    assert concurrent_streams(handle, "greedy", prompts[:STREAMS], [GREEDY] * STREAMS) == expected
    records = ray.get(handle.drain_telemetry.remote())
    assert sum(r.drafted for r in records) > 0
    # four drafting streams take turns in two groups (a stream drafting nothing at its last token joins both)
    assert statistics.median(r.round_sequences for r in records) <= STREAMS // 2


def test_sampled_streams_make_the_same_draws_as_without_overlap(fleet, prompts):
    params = [make_sampling_params(temperature=1.1, seed=100 + i, max_tokens=24, ignore_eos=True) for i in range(STREAMS)]
    outputs = {name: concurrent_streams(fleet.targets[name][0], f"sampled-{name}", prompts[:STREAMS], params)
               for name in ("overlapped", "sequential")}
    assert outputs["overlapped"] == outputs["sequential"]
    assert len({tuple(t) for t in outputs["overlapped"]}) == STREAMS


def connected(handle, direct: bool) -> RemoteDrafter:
    """A RemoteDrafter through Ray calls, or through the drafter's loopback channel (this test runs on its machine)."""
    drafter = connect_drafter(handle, timeout_s=10, direct=direct)
    assert isinstance(drafter.calls, ChannelClient if direct else RayCalls)
    return drafter


@pytest.mark.parametrize("direct", [False, True], ids=["ray", "channel"])
def test_finishing_a_sequence_waits_for_its_proposal_in_flight(fleet, prompts, direct):
    """The drafter actor is threaded: a finish sent at once could overtake the proposal naming the sequence
    (through Ray; a channel serves a target's calls in order)."""
    handle = fleet.drafters["sorted"][0]
    drafter = connected(handle, direct)
    for seq_id, prompt in (("in-flight-a", prompts[0]), ("in-flight-b", prompts[1])):
        drafter.start(seq_id, prompt, GREEDY)
    pending = drafter.propose_async([DraftRequest("in-flight-a", 4), DraftRequest("in-flight-b", 4)])
    drafter.finish("in-flight-a")
    assert pending.reply.done()  # the proposal had run when the finish was sent
    assert [len(d.tokens) for d in pending.result()] == [4, 4]
    drafter.finish("in-flight-b")
    assert wait_until(lambda: ray.get(handle.live_sequences.remote()) == 0)


class SlowFinishDrafter(DrafterActor):
    """A drafter actor whose finish takes a second, as a finish queued behind other calls might."""

    def finish(self, seq_ids) -> None:
        time.sleep(1.0)
        super().finish(seq_ids)


@pytest.mark.parametrize("direct", [False, True], ids=["ray", "channel"])
def test_a_sequence_id_reused_right_after_its_finish_starts_afresh(ray_cluster, drafter_path, prompts, direct):
    """Without waiting, the start would run beside the slow finish (a threaded actor): 'already exists', or freed later."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor class lives in this test module
    handle = ray.remote(SlowFinishDrafter).options(max_concurrency=8, resources={"draft": 1}).remote(str(drafter_path), RunnerSettings())
    try:
        drafter = connected(handle, direct)
        drafter.start("reused", prompts[0], GREEDY)
        drafter.finish("reused")
        drafter.start("reused", prompts[1], GREEDY)
        (draft,) = drafter.propose([DraftRequest("reused", 3, 1)])
        fresh = connected(handle, direct)
        fresh.start("fresh", prompts[1], GREEDY)
        assert draft.tokens == fresh.propose([DraftRequest("fresh", 3, 1)])[0].tokens
        time.sleep(1.5)  # no late finish frees the new sequence
        assert ray.get(handle.live_sequences.remote()) == 2
    finally:
        ray.kill(handle)


def test_cancelled_streams_free_their_state_on_both_actors(fleet, prompts):
    target, drafter = fleet.targets["overlapped"][0], fleet.drafters["sorted"][0]
    long = make_sampling_params(temperature=0, max_tokens=220, ignore_eos=True)
    streams = [target.generate.options(num_returns="streaming").remote(f"cancel-{i}", p, long)
               for i, p in enumerate(prompts[:3])]
    for stream in streams:
        ray.get(next(stream))  # every stream is mid-generation, one group's drafts in flight
    for i in range(3):
        target.cancel.remote(f"cancel-{i}")
    assert wait_until(lambda: ray.get(target.live_sequences.remote()) == 0)
    assert wait_until(lambda: ray.get(drafter.live_sequences.remote()) == 0)
    assert [ray.get(list(stream)[-1]).finish_reason for stream in streams] == ["cancelled"] * 3


def test_killing_the_drafter_with_drafts_in_flight_loses_no_token(fleet, prompts, expected):
    """Last in this module: the drafter stays dead."""
    handle = fleet.targets["overlapped"][0]
    streams = [handle.generate.options(num_returns="streaming").remote(f"kill-{i}", p, GREEDY)
               for i, p in enumerate(prompts[:STREAMS])]
    firsts = [ray.get(next(stream)).new_tokens for stream in streams]
    ray.kill(fleet.drafters["sorted"][0])
    for first, stream, tokens in zip(firsts, streams, expected):
        assert first + [t for ref in stream for t in ray.get(ref).new_tokens] == tokens
    assert not ray.get(handle.has_drafter.remote())


def test_a_drafter_actor_without_a_free_slot_leaves_the_sequence_to_plain_decoding(ray_cluster, target_path, drafter_path,
                                                                                   prompts):
    """A full drafter refuses through Ray as a local one does (CapacityExhausted); the engine then decodes that
    sequence plainly and exactly, while the one the drafter holds keeps drafting."""
    handle = ray.remote(DrafterActor).options(max_concurrency=8, resources={"draft": 1}).remote(
        str(drafter_path), RunnerSettings(max_sequences=1))
    try:
        target = ModelRunner.from_pretrained(target_path)
        engine = SpeculationEngine(target, RemoteDrafter(handle, ray.get(handle.info.remote()), timeout_s=30), k=3)
        engine.add(prompts[0], GREEDY, seq_id="drafted")
        engine.add(prompts[1], GREEDY, seq_id="plain")
        tokens, arms = {}, {}
        while engine.num_live:
            for update in engine.step():
                tokens.setdefault(update.seq_id, []).extend(update.new_tokens)
                arms.setdefault(update.seq_id, set()).add(update.arm)
        alone = SpeculativeGenerator(ModelRunner.from_pretrained(target_path)).generate(prompts[:2], GREEDY)
        assert [tokens["drafted"], tokens["plain"]] == [r.tokens for r in alone]
        assert arms["plain"] == {(None, 0)} and (None, 0) not in arms["drafted"]
        assert engine.drafter is not None
    finally:
        ray.kill(handle)
