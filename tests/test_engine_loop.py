"""EngineLoop: a sequence's rounds reach its reader merged per feed interval, the first and last at once."""

import pytest

from actors.engine import SpeculationEngine
from actors.engine_loop import EngineLoop, Feed, StreamPacing
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params

GREEDY = make_sampling_params(temperature=0, max_tokens=12, ignore_eos=True)


def read_all(loop: EngineLoop, prompt: list[int]) -> list:
    return read_feed(loop.submit("s", prompt, GREEDY))


def read_feed(feed: Feed) -> list:
    """The updates of a feed's one sequence until its last (each message carries one)."""
    updates = [only_update(feed.output.get())]
    while updates[-1].finish_reason is None:
        updates.append(only_update(feed.output.get()))
    return updates


def only_update(message):
    [(_, update)] = message
    return update


@pytest.fixture(scope="module")
def target(target_path) -> ModelRunner:
    return ModelRunner.from_pretrained(target_path)


@pytest.fixture(scope="module")
def plain(target, prompts) -> list[int]:
    return SpeculativeGenerator(target).generate(prompts[:1], GREEDY)[0].tokens


def test_without_an_interval_every_round_is_an_update(target, prompts, plain):
    updates = read_all(EngineLoop(SpeculationEngine(target)), prompts[0])
    assert [len(u.new_tokens) for u in updates] == [1] * GREEDY.max_tokens
    assert [t for u in updates for t in u.new_tokens] == plain


def test_within_an_interval_rounds_merge_into_one_update_after_the_first(target, prompts, plain):
    updates = read_all(EngineLoop(SpeculationEngine(target), StreamPacing(600.0)), prompts[0])
    assert [len(u.new_tokens) for u in updates] == [1, GREEDY.max_tokens - 1]  # the first at once, the rest with the last
    assert [t for u in updates for t in u.new_tokens] == plain
    assert updates[-1].finish_reason == "length" and updates[-1].stats.target_forwards == GREEDY.max_tokens


def test_a_cancelled_sequence_gets_its_held_tokens_with_the_cancellation(target, prompts, plain):
    loop = EngineLoop(SpeculationEngine(target), StreamPacing(600.0))
    feed = loop.submit("s", prompts[0], GREEDY)
    first = only_update(feed.output.get())
    for _ in range(2):  # the loop runs a round between two calls: its token is held
        loop.call(lambda engine: None)
    loop.cancel("s")
    last = only_update(feed.output.get())
    assert last.finish_reason == "cancelled"
    assert first.new_tokens + last.new_tokens == plain[: len(first.new_tokens) + len(last.new_tokens)]
    assert len(last.new_tokens) >= 1


def test_the_update_budget_lengthens_each_stream_s_interval_as_streams_grow():
    pacing = StreamPacing(interval_s=0.01, max_updates_per_s=400)
    assert pacing.interval(1) == 0.01 and pacing.interval(4) == 0.01  # within the budget: the floor
    assert pacing.interval(16) == pytest.approx(0.04) and pacing.interval(64) == pytest.approx(0.16)
    assert StreamPacing(interval_s=0.01).interval(64) == 0.01  # no budget


def test_many_streams_get_fewer_updates_each_under_a_budget(target, prompts, plain):
    """Two streams, a budget of one update per second: after the first, each stream's rounds merge."""
    loop = EngineLoop(SpeculationEngine(target), StreamPacing(0.0, max_updates_per_s=1.0))
    for feed in [loop.submit(f"s{i}", prompts[0], GREEDY) for i in range(2)]:
        updates = read_feed(feed)
        assert len(updates) <= 3  # the first at once, at most one due in between, the last
        assert [t for u in updates for t in u.new_tokens] == plain


def test_sequences_sharing_a_feed_get_their_updates_in_one_message_per_round_at_most(target, prompts, plain):
    """Two sequences on one feed, a long interval: their first updates go in one message (both start in the same
    round), their last in another (same prompt and length: same round), the rounds between merged into it; each
    reads exactly the plain tokens."""
    loop, feed = EngineLoop(SpeculationEngine(target), StreamPacing(600.0)), Feed()
    loop.call(lambda engine: [loop.submit(f"s{i}", prompts[0], GREEDY, feed=feed) for i in range(2)])
    messages = [feed.output.get(), feed.output.get()]
    assert [sorted(seq_id for seq_id, _ in m) for m in messages] == [["s0", "s1"], ["s0", "s1"]]
    for seq_id in ("s0", "s1"):
        updates = [u for m in messages for s, u in m if s == seq_id]
        assert [t for u in updates for t in u.new_tokens] == plain and updates[-1].finish_reason == "length"


def test_cancelling_a_feed_stops_all_its_sequences_and_no_other(target, prompts, plain):
    long = make_sampling_params(temperature=0, max_tokens=200, ignore_eos=True)
    loop, shared = EngineLoop(SpeculationEngine(target), StreamPacing(600.0)), Feed()
    loop.call(lambda engine: [loop.submit(f"s{i}", prompts[0], long, feed=shared) for i in range(2)])
    other = loop.submit("other", prompts[0], GREEDY)
    loop.cancel_feed(shared)
    reasons = {}
    while len(reasons) < 2:
        reasons |= {s: u.finish_reason for s, u in shared.output.get() if u.finish_reason}
    assert reasons == {"s0": "cancelled", "s1": "cancelled"}
    updates = read_feed(other)
    assert [t for u in updates for t in u.new_tokens] == plain and updates[-1].finish_reason == "length"
