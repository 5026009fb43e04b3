"""Round telemetry: the records a real engine writes, the buffer, and the per-pair totals."""

import threading

import pytest

from actors.drafters import ModelDrafter
from actors.engine import SpeculationEngine
from actors.sampling import make_sampling_params
from actors.telemetry import PLAIN, RoundBuffer, RoundRecord, TelemetryAggregator
from actors.speculation import NO_SPECULATION
from specfleet.v1 import generation_pb2 as pb

GREEDY = make_sampling_params(temperature=0, max_tokens=16, ignore_eos=True)


def record(k=2, exit_layer=1, sequences=2, round_sequences=2, accepted=(1, 2), emitted=5, draft_s=0.01,
           verify_s=0.03, target="t", drafter="d") -> RoundRecord:
    return RoundRecord(exit_layer, k, sequences, round_sequences, drafted=k * sequences, accepted_lengths=accepted,
                       emitted=emitted, draft_s=draft_s, verify_s=verify_s, target=target, drafter=drafter)


def run_collecting(engine: SpeculationEngine) -> tuple[list, list]:
    """Step to the end; returns (final updates, records), draining after every step."""
    finals, records = [], []
    while engine.num_live:
        updates = engine.step()
        records.append(engine.drain_telemetry())
        finals += [u for u in updates if u.finish_reason is not None]
    return finals, records


def test_the_engine_writes_one_record_per_round_that_adds_up(target, drafter_runner, prompts):
    engine = SpeculationEngine(target, ModelDrafter(drafter_runner), k=3, exit_layer=2,
                               target_name="tiny-target", drafter_name="tiny-drafter")
    for prompt in prompts[:4]:
        engine.add(prompt, GREEDY)
    finals, rounds = run_collecting(engine)
    assert all(len(records) == 1 for records in rounds)  # every sequence followed the plan: one arm per round
    records = [r for records in rounds for r in records]
    assert {(r.target, r.drafter, r.exit_layer, r.k) for r in records} == {("tiny-target", "tiny-drafter", 2, 3)}
    assert all(r.whole_round and r.draft_s > 0 and r.verify_s > 0 for r in records)
    assert records[0].sequences == 4
    stats = [u.stats for u in finals]
    assert sum(r.drafted for r in records) == sum(s.drafted for s in stats)
    assert sum(r.accepted for r in records) == sum(s.accepted for s in stats)
    assert sum(r.emitted for r in records) == sum(s.emitted for s in stats)
    assert sum(r.sequences for r in records) == sum(s.target_forwards for s in stats)
    assert all(0 <= a <= 3 for r in records for a in r.accepted_lengths)


def test_a_round_shared_by_two_arms_writes_a_record_for_each(target, drafter_runner, prompts):
    engine = SpeculationEngine(target, ModelDrafter(drafter_runner), k=2, exit_layer=1, drafter_name="d")
    engine.add(prompts[0], GREEDY)  # follows the plan
    engine.add(prompts[1], GREEDY, spec=NO_SPECULATION)  # plain decoding by request
    engine.step()
    planned, plain = sorted(engine.drain_telemetry(), key=lambda r: -r.k)
    assert (planned.exit_layer, planned.k, planned.drafter, planned.drafted) == (1, 2, "d", 2)
    assert (plain.exit_layer, plain.k, plain.drafter, plain.drafted, plain.accepted) == (None, 0, PLAIN, 0, 0)
    assert plain.emitted == 1
    for r in (planned, plain):
        assert (r.sequences, r.round_sequences, r.whole_round) == (1, 2, False)
        assert r.share_s == pytest.approx(r.round_s / 2)
    assert planned.draft_s == plain.draft_s and planned.verify_s == plain.verify_s  # one round, one clock
    assert engine.drain_telemetry() == []  # drained


def test_plain_decoding_without_a_drafter_is_recorded_as_k_0(target, prompts):
    engine = SpeculationEngine(target, target_name="t")
    engine.add(prompts[0], GREEDY)
    _, rounds = run_collecting(engine)
    records = [r for records in rounds for r in records]
    assert len(records) == GREEDY.max_tokens
    assert all((r.k, r.drafter, r.emitted, r.drafted) == (0, PLAIN, 1, 0) for r in records)


def test_record_arithmetic():
    r = record(sequences=1, round_sequences=4, emitted=6, draft_s=0.02, verify_s=0.06)
    assert r.accepted == 3 and r.round_s == pytest.approx(0.08)
    assert r.share_s == pytest.approx(0.02)
    assert r.goodput == pytest.approx(300.0)
    assert record(draft_s=0, verify_s=0).goodput == 0.0


def test_the_buffer_drains_in_order_and_drops_the_oldest_when_full():
    buffer = RoundBuffer(capacity=3)
    records = [record(emitted=i) for i in range(5)]
    for r in records:
        buffer.append(r)
    assert buffer.drain() == records[2:] and buffer.dropped == 2
    assert buffer.drain() == []


def test_the_buffer_loses_nothing_under_concurrent_appends():
    buffer, drained = RoundBuffer(capacity=100_000), []
    writers = [threading.Thread(target=lambda: [buffer.append(record()) for _ in range(2000)]) for _ in range(4)]
    for w in writers:
        w.start()
    while any(w.is_alive() for w in writers):
        drained += buffer.drain()
    drained += buffer.drain()
    assert len(drained) == 8000 and buffer.dropped == 0


def test_totals_per_pair_follow_the_vocabulary():
    aggregator = TelemetryAggregator()
    aggregator.add([
        record(k=2, exit_layer=1, sequences=2, round_sequences=2, accepted=(2, 1), emitted=5, draft_s=0.01, verify_s=0.03),
        record(k=2, exit_layer=1, sequences=1, round_sequences=2, accepted=(0,), emitted=1, draft_s=0.02, verify_s=0.02),
        record(k=0, exit_layer=None, sequences=1, round_sequences=2, accepted=(), emitted=1, draft_s=0.02,
               verify_s=0.02, drafter=PLAIN),
        record(k=2, exit_layer=1, target="other"),
    ])
    other, plain, spec = aggregator.pairs()  # sorted by target, drafter, exit, k
    assert (other.target, plain.drafter, plain.k, plain.exit_layer, spec.k, spec.exit_layer) == ("other", "", 0, 0, 2, 1)
    assert (spec.rounds, spec.drafted, spec.accepted, spec.emitted, spec.engine_rounds) == (3, 6, 3, 6, 2)
    assert spec.acceptance_rate == pytest.approx(0.5)
    assert spec.mean_accepted_length == pytest.approx(2.0)  # 6 tokens in 3 sequence-rounds, bonus included
    assert spec.time_s == pytest.approx(0.04 + 0.02)  # a whole round, then half of a shared one
    assert spec.goodput_tokens_per_s == pytest.approx(100.0)
    assert spec.mean_draft_ms == pytest.approx(15.0) and spec.mean_verify_ms == pytest.approx(25.0)
    assert plain.mean_accepted_length == 1.0 and plain.acceptance_rate == 0.0


def test_totals_fill_the_pair_stats_message():
    aggregator = TelemetryAggregator()
    aggregator.add([record(k=4, exit_layer=2, emitted=7)])
    message = pb.PairStats(**aggregator.pairs()[0].as_pair_stats())
    assert (message.target, message.drafter, message.exit_layer, message.k) == ("t", "d", 2, 4)
    assert (message.rounds, message.drafted, message.accepted, message.emitted) == (2, 8, 3, 7)
    assert message.mean_accepted_length == pytest.approx(3.5)


def test_rounds_are_timed_with_the_engine_s_clock(target, prompts):
    """A benchmark may time rounds in CPU seconds; here a clock that ticks once per reading."""
    ticks = iter(range(1000))
    engine = SpeculationEngine(target, clock=lambda: float(next(ticks)))
    engine.add(prompts[0], GREEDY)
    engine.step()
    (record,) = engine.drain_telemetry()
    # readings: draft start/end; verify start, after the forward, after verification, end
    assert (record.draft_s, record.verify_s) == (1.0, 3.0)
    engine.close()


def test_the_round_hook_says_where_a_round_went(target, drafter_runner, prompts):
    """Every part of a round is one span of the engine's clock; together they make up the round."""
    ticks = iter(range(1000))
    engine = SpeculationEngine(target, ModelDrafter(drafter_runner), k=2, clock=lambda: float(next(ticks)))
    seen = []
    engine.round_hook = seen.append
    engine.add(prompts[1], GREEDY)
    engine.step()
    (times,) = seen
    assert (times.rows, times.prefill_s, times.draft_s, times.forward_s, times.verification_s) == (1, 1.0, 1.0, 1.0, 1.0)
    assert times.total_s > 4.0 and times.emitted >= 1
    assert times.bookkeeping_s == times.total_s - 4.0
    engine.close()
