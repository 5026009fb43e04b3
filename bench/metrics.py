"""Timing records of requests and the metrics computed from them.

Pure Python (no torch, no numpy) so that every benchmark child, including the
one running in vLLM's own environment, records requests the same way.

Definitions (also written in BENCHMARKS.md):

- tokens/s: completion tokens of all requests of a cell divided by the cell's
  wall time (first submission to last token), so it is total throughput at that
  concurrency.
- time to first token (TTFT): from a request's submission to the arrival of its
  first completion token.
- inter-token latency (ITL): for every chunk after the first, the gap since the
  previous chunk divided by the tokens in the chunk, counted once per token.
  A speculative round delivers several tokens at once; spreading the gap over
  them is what a reader of the stream sees on average per token.
- MAL: tokens emitted per target forward, bonus token included (plain decoding
  is 1.0); acceptance rate: accepted / drafted draft tokens.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; None when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must lie in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class SpeculationCounts:
    """Counters of speculation, summed over requests (all zero for plain decoding)."""

    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept
    target_forwards: int = 0  # verification rounds (one target forward each)
    emitted: int = 0  # tokens the rounds produced, bonus / recovered tokens included

    def add(self, other: "SpeculationCounts") -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.target_forwards += other.target_forwards
        self.emitted += other.emitted

    @property
    def mean_accepted_length(self) -> float | None:
        return self.emitted / self.target_forwards if self.target_forwards else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


@dataclass
class RequestTrace:
    """What one request did, as seen by its client."""

    submitted_s: float  # perf_counter when the request was sent
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival perf_counter, tokens in the chunk)
    tokens: list[int] = field(default_factory=list)  # completion token ids, when the client sees them
    counts: SpeculationCounts | None = None  # None when the system does not report per-request counters

    def record(self, arrived_s: float, new_tokens: int, token_ids: Iterable[int] = ()) -> None:
        if new_tokens > 0:
            self.chunks.append((arrived_s, new_tokens))
        self.tokens.extend(token_ids)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def finished_s(self) -> float:
        return self.chunks[-1][0] if self.chunks else self.submitted_s

    @property
    def ttft_s(self) -> float | None:
        return self.chunks[0][0] - self.submitted_s if self.chunks else None

    def inter_token_gaps(self) -> list[float]:
        """Per-token gaps after the first chunk: each chunk's gap spread over its tokens."""
        gaps = []
        for (before, _), (after, n) in zip(self.chunks, self.chunks[1:]):
            gaps += [(after - before) / n] * n
        return gaps


def summarize(traces: Sequence[RequestTrace], counts: SpeculationCounts | None = None) -> dict:
    """Metrics of one cell (one system, mode, category, temperature and concurrency).

    `counts` overrides the per-request counters for systems that only report
    run-wide counters (vLLM's Prometheus counters, hooks around HF's models).
    """
    if not traces:
        raise ValueError("a cell needs at least one request")
    tokens = sum(t.num_tokens for t in traces)
    wall_s = max(t.finished_s for t in traces) - min(t.submitted_s for t in traces)
    ttfts = [t.ttft_s for t in traces if t.ttft_s is not None]
    gaps = [g for t in traces for g in t.inter_token_gaps()]
    if counts is None:
        counts = SpeculationCounts()
        for trace in traces:
            if trace.counts is not None:
                counts.add(trace.counts)
    return {
        "requests": len(traces),
        "tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_ms_p50": _ms(percentile(ttfts, 50)),
        "ttft_ms_p99": _ms(percentile(ttfts, 99)),
        "itl_ms_p50": _ms(percentile(gaps, 50)),
        "itl_ms_p99": _ms(percentile(gaps, 99)),
        "mal": counts.mean_accepted_length,
        "acceptance_rate": counts.acceptance_rate,
        "drafted": counts.drafted,
        "accepted": counts.accepted,
        "target_forwards": counts.target_forwards,
        "emitted": counts.emitted,
    }


def speedup(speculative_tokens_per_s: float | None, plain_tokens_per_s: float | None) -> float | None:
    """Throughput ratio of speculative over plain decoding; None when either is missing."""
    if not speculative_tokens_per_s or not plain_tokens_per_s:
        return None
    return speculative_tokens_per_s / plain_tokens_per_s


def pooled(cells: Sequence[dict], traces: Sequence[RequestTrace]) -> dict:
    """Several cells (run one after another) as one: tokens and wall times add up, counters too;
    latency percentiles over all their requests."""
    tokens = sum(c["tokens"] for c in cells)
    wall_s = sum(c["wall_s"] for c in cells)
    counts = SpeculationCounts(*(sum(c[name] for c in cells) for name in ("drafted", "accepted", "target_forwards", "emitted")))
    latency = summarize(traces, counts)
    return latency | {"requests": sum(c["requests"] for c in cells), "tokens": tokens, "wall_s": wall_s,
                      "tokens_per_s": tokens / wall_s if wall_s > 0 else None}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
