"""The harness's metric math on synthetic timings: percentiles, latencies, throughput, MAL, speedups."""

import pytest

from bench.metrics import RequestTrace, SpeculationCounts, percentile, pooled, speedup, summarize


def test_percentile_interpolates_between_closest_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)  # rank 2.97 -> 3 + 0.97 * (4 - 3)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def trace(submitted: float, chunks: list[tuple[float, int]], counts: SpeculationCounts | None = None) -> RequestTrace:
    t = RequestTrace(submitted)
    for arrived, n in chunks:
        t.record(arrived, n, list(range(n)))
    t.counts = counts
    return t


def test_ttft_and_inter_token_gaps_spread_a_chunk_over_its_tokens():
    t = trace(10.0, [(10.5, 1), (10.9, 4), (11.0, 1)])
    assert t.ttft_s == pytest.approx(0.5)
    assert t.num_tokens == 6
    # 0.4 s for a chunk of 4 tokens counts as four gaps of 0.1 s; then one gap of 0.1 s.
    assert t.inter_token_gaps() == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1])
    assert t.finished_s == 11.0


def test_empty_chunks_are_not_tokens():
    t = trace(0.0, [(0.2, 0), (0.5, 2)])
    assert t.ttft_s == pytest.approx(0.5) and t.inter_token_gaps() == []


def test_summarize_throughput_latency_and_mal_with_the_bonus_token():
    # Two concurrent requests over 2 s of wall time, 10 tokens in all.
    a = trace(0.0, [(0.5, 3), (1.0, 2)], SpeculationCounts(drafted=8, accepted=3, target_forwards=2, emitted=5))
    b = trace(0.5, [(1.0, 1), (2.0, 4)], SpeculationCounts(drafted=8, accepted=3, target_forwards=2, emitted=5))
    row = summarize([a, b])
    assert row["requests"] == 2 and row["tokens"] == 10
    assert row["wall_s"] == pytest.approx(2.0)
    assert row["tokens_per_s"] == pytest.approx(5.0)
    assert row["ttft_ms_p50"] == pytest.approx(500.0)
    # gaps: a: 0.5/2 twice; b: 1.0/4 four times -> all 0.25 s
    assert row["itl_ms_p50"] == pytest.approx(250.0) and row["itl_ms_p99"] == pytest.approx(250.0)
    # 10 tokens from 4 target forwards: MAL 2.5 (each forward's own token counted); 6 of 16 drafts kept.
    assert row["mal"] == pytest.approx(2.5)
    assert row["acceptance_rate"] == pytest.approx(6 / 16)


def test_plain_decoding_has_mal_one_and_no_acceptance():
    counts = SpeculationCounts(0, 0, target_forwards=4, emitted=4)
    row = summarize([trace(0.0, [(0.1, 1), (0.2, 1), (0.3, 1), (0.4, 1)])], counts)
    assert row["mal"] == 1.0 and row["acceptance_rate"] is None


def test_run_wide_counts_override_missing_per_request_counters():
    counts = SpeculationCounts(drafted=4, accepted=2, target_forwards=2, emitted=4)
    row = summarize([trace(0.0, [(0.1, 3), (0.2, 1)])], counts)
    assert row["mal"] == 2.0 and row["acceptance_rate"] == 0.5
    assert summarize([trace(0.0, [(0.1, 1)])])["mal"] is None  # nothing reported, nothing invented


def test_speedup_is_a_throughput_ratio():
    assert speedup(30.0, 20.0) == pytest.approx(1.5)
    assert speedup(None, 20.0) is None and speedup(30.0, 0.0) is None


def test_pooled_cells_add_their_tokens_and_walls():
    first = [trace(0.0, [(1.0, 4)], SpeculationCounts(4, 3, 1, 4))]
    second = [trace(5.0, [(8.0, 2)], SpeculationCounts(4, 1, 1, 2))]
    cells = [summarize(first), summarize(second)]
    row = pooled(cells, first + second)
    # 6 tokens in 1 s + 3 s of measured time; the 4 s between the cells do not count.
    assert row["tokens"] == 6 and row["wall_s"] == pytest.approx(4.0)
    assert row["tokens_per_s"] == pytest.approx(1.5)
    assert row["mal"] == pytest.approx(3.0) and row["acceptance_rate"] == pytest.approx(0.5)
    assert row["ttft_ms_p50"] == pytest.approx(2000.0)  # TTFTs 1 s and 3 s
    assert row["requests"] == 2
