"""Prometheus metrics of a specfleet cluster, in their own registry.

Names mirror vLLM's speculative decoding metrics under our prefix, with the
pair labels that let one dashboard compare arms: acceptance rate =
accepted / draft tokens, mean accepted length (bonus included) =
emitted / rounds, where a round counts one sequence's target forward (vLLM's
"drafts"). Rounds and tokens come from the engines' `RoundRecord`s; request
latencies from whoever serves the request (`RequestTimer`).
"""

import time
from collections.abc import Iterable, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from actors.telemetry import RoundRecord

PAIR_LABELS = ("target", "drafter", "exit", "k", "tree")  # tree: a tree shape label, "" for chains
ACCEPTED_LENGTH_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)  # draft tokens; k is at most 64
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)  # seconds
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)  # seconds


class SpecfleetMetrics:
    """Counters and histograms of rounds and requests; `render()` is the scrape body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        counter = lambda name, doc, labels=PAIR_LABELS: Counter(name, doc, labels, registry=self.registry)  # noqa: E731
        self.draft_tokens = counter("specfleet_draft_tokens", "Draft tokens proposed.")
        self.accepted_tokens = counter("specfleet_accepted_tokens", "Draft tokens the verifier kept.")
        self.emitted_tokens = counter("specfleet_emitted_tokens", "Tokens emitted by rounds (accepted + recovered/bonus).")
        self.rounds = counter("specfleet_rounds", "Sequence-rounds: one row of a target forward.")
        self.requests = counter("specfleet_requests", "Finished requests by outcome.", ("target", "outcome"))
        self.accepted_length = Histogram(
            "specfleet_accepted_length_per_round", "Draft tokens accepted per sequence per round (bonus excluded).",
            PAIR_LABELS, buckets=ACCEPTED_LENGTH_BUCKETS, registry=self.registry)
        self.time_to_first_token = self._latency("specfleet_time_to_first_token_seconds", "Request start to first token.")
        self.inter_token_latency = Histogram(
            "specfleet_inter_token_latency_seconds", "Time per output token after the first, per streamed update.",
            ("target",), buckets=TOKEN_GAP_BUCKETS, registry=self.registry)
        self.request_latency = self._latency("specfleet_request_latency_seconds", "Request start to its last token.")
        self.live_sequences = Gauge(
            "specfleet_live_sequences", "Sequences holding state on each actor at the controller's last ping.",
            ("model", "role", "replica"), registry=self.registry)
        self.actor_up = Gauge(
            "specfleet_actor_up", "1 if the actor answered the controller's last ping, else 0.",
            ("model", "role", "replica"), registry=self.registry)

    def _latency(self, name: str, doc: str) -> Histogram:
        return Histogram(name, doc, ("target",), buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe_round(self, record: RoundRecord) -> None:
        labels = (record.target, record.drafter, str(record.exit_layer or 0), str(record.k), record.tree)
        self.draft_tokens.labels(*labels).inc(record.drafted)
        self.accepted_tokens.labels(*labels).inc(record.accepted)
        self.emitted_tokens.labels(*labels).inc(record.emitted)
        self.rounds.labels(*labels).inc(record.sequences)
        for accepted in record.accepted_lengths:
            self.accepted_length.labels(*labels).observe(accepted)

    def observe_request(
        self, target: str, outcome: str, latency_s: float, first_token_s: float | None, token_gaps_s: Sequence[float]
    ) -> None:
        """One finished request: `outcome` is its finish reason ("stop", "length") or status ("cancelled", "error")."""
        self.requests.labels(target, outcome).inc()
        self.request_latency.labels(target).observe(latency_s)
        if first_token_s is not None:
            self.time_to_first_token.labels(target).observe(first_token_s)
        for gap in token_gaps_s:
            self.inter_token_latency.labels(target).observe(gap)

    def set_replicas(self, replicas: Iterable) -> None:
        """The actors as the last control step found them (`ReplicaStats`); actors gone since are dropped."""
        self.live_sequences.clear()
        self.actor_up.clear()
        for r in replicas:
            labels = (r.model, r.role, str(r.replica))
            self.live_sequences.labels(*labels).set(r.live_sequences)
            self.actor_up.labels(*labels).set(int(r.answered))

    def request(self, target: str) -> "RequestTimer":
        """Start timing a request now."""
        return RequestTimer(self, target)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format (serve with `content_type`)."""
        return generate_latest(self.registry)


class RequestObserver(Protocol):
    """Whoever records finished requests: `SpecfleetMetrics`, or a client forwarding them to the controller's."""

    def observe_request(
        self, target: str, outcome: str, latency_s: float, first_token_s: float | None, token_gaps_s: Sequence[float]
    ) -> None: ...


class RequestTimer:
    """Times one request as its updates stream out; `finish` records it once.

    A speculative round delivers several tokens at once: an update of n tokens
    arriving d seconds after the previous one counts n inter-token gaps of d / n
    (tokens that came with the first one count 0), so the gaps of a request sum
    to its last token's time minus its first's: their mean is the time per
    output token after the first.
    """

    def __init__(self, observer: RequestObserver, target: str, clock=time.perf_counter):
        self.observer, self.target, self.clock = observer, target, clock
        self.started = self._last = clock()
        self.first_token_s: float | None = None
        self.token_gaps_s: list[float] = []
        self.finished = False

    def tokens(self, count: int) -> None:
        """An update carrying `count` new tokens arrived now."""
        if count <= 0:
            return
        now = self.clock()
        if self.first_token_s is None:
            self.first_token_s = now - self.started
            self.token_gaps_s += [0.0] * (count - 1)  # tokens that came with the first one
        else:
            self.token_gaps_s += [(now - self._last) / count] * count
        self._last = now

    def finish(self, outcome: str) -> None:
        if not self.finished:
            self.finished = True
            self.observer.observe_request(self.target, outcome, self.clock() - self.started, self.first_token_s,
                                         self.token_gaps_s)
