"""Round telemetry: what each speculation round cost and produced, and its totals per arm.

`SpeculationEngine.step` writes one `RoundRecord` per arm per round into a
`RoundBuffer`; whoever watches the engine (the target actor, a benchmark)
drains it. Sequences of one round may speculate differently (per-request
overrides), so a round yields one record for each *arm*, an (exit, k) pair,
and all records of a round share its draft and verify time.

`PairTotals` sums records per (target, drafter, exit, k), the shape of the
`PairStats` message of the GetStats RPC. Counts follow the project's
vocabulary: *rounds* here are sequence-rounds (one row of a target forward;
vLLM's "drafts"), so MAL = emitted / rounds counts the bonus token and plain
decoding gives 1.0; goodput is emitted tokens per second of round time.
"""

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

PLAIN = ""  # drafter name of plain decoding rounds (k = 0)


@dataclass
class RoundTimes:
    """Where one engine round's time went (seconds of the engine's clock); the engine's round hook receives it.

    draft: the drafter call (with a remote drafter: transfer and its compute);
    forward: the target's verify forward; verification: accepting or rejecting
    every row; bookkeeping: the rest (rollback, commits, stops, telemetry).
    Prefill of sequences that joined this round is apart from them.
    """

    rows: int = 0  # sequences in the round
    emitted: int = 0  # tokens the round emitted
    prefill_s: float = 0.0
    draft_s: float = 0.0
    forward_s: float = 0.0
    verification_s: float = 0.0
    total_s: float = 0.0  # the whole round, prefill included

    @property
    def bookkeeping_s(self) -> float:
        return max(0.0, self.total_s - self.prefill_s - self.draft_s - self.forward_s - self.verification_s)


@dataclass(frozen=True)
class RoundRecord:
    """One arm's share of one round of a `SpeculationEngine`."""

    exit_layer: int | None  # drafter exit drafted from (the engine resolves the deepest); None: no exits, or k = 0
    k: int  # draft length the arm asks for (0: plain decoding); a round may draft fewer near max_tokens
    sequences: int  # this arm's sequences in the round
    round_sequences: int  # all sequences in the round, every arm together
    drafted: int  # draft tokens proposed, summed over this arm's sequences
    accepted_lengths: tuple[int, ...]  # draft tokens accepted, one entry per sequence of this arm
    emitted: int  # tokens emitted (accepted + recovered/bonus), before truncation at a stop
    draft_s: float  # wall time of the round's drafter call (0 when nobody drafted)
    verify_s: float  # wall time of the round's target forward, verification and rollback
    deferred: int = 0  # speculative cascades: judged draft positions that stood on the drafter's q
    target: str = ""  # target model name, when the engine was given one
    drafter: str = PLAIN  # drafter model name; PLAIN for k = 0
    tree: str = ""  # the tree shape's label when the arm drafts token trees (k: its nodes); "" a chain

    @property
    def accepted(self) -> int:
        return sum(self.accepted_lengths)

    @property
    def whole_round(self) -> bool:
        """True when every sequence of the round used this arm, so its time belongs to this arm alone."""
        return self.sequences == self.round_sequences

    @property
    def round_s(self) -> float:
        return self.draft_s + self.verify_s

    @property
    def share_s(self) -> float:
        """This arm's share of the round's time, split by sequence count."""
        return self.round_s * self.sequences / self.round_sequences

    @property
    def goodput(self) -> float:
        """Emitted tokens per second of this arm's share of the round."""
        return self.emitted / self.share_s if self.share_s > 0 else 0.0


class RoundBuffer:
    """A thread-safe, bounded queue of records: the engine appends, a watcher drains.

    When nobody drains, the oldest records are dropped (and counted) so an
    unwatched engine never grows without bound.
    """

    def __init__(self, capacity: int = 10_000):
        self._records: deque[RoundRecord] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.dropped = 0  # records lost to the capacity since creation

    def append(self, record: RoundRecord) -> None:
        with self._lock:
            if len(self._records) == self._records.maxlen:
                self.dropped += 1
            self._records.append(record)

    def drain(self) -> list[RoundRecord]:
        """Every record appended since the last drain, oldest first."""
        with self._lock:
            records = list(self._records)
            self._records.clear()
        return records


PairKey = tuple[str, str, int, int, str]  # (target, drafter, exit_layer or 0 for none, k, tree label or "")


@dataclass
class PairTotals:
    """Running totals of one (target, drafter, exit, k) arm; field names follow `PairStats`."""

    target: str
    drafter: str
    exit_layer: int  # 0: a drafter without exits, or plain decoding
    k: int
    tree: str = ""  # tree shape label; "" a chain
    rounds: int = 0  # sequence-rounds: target forward rows
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    deferred: int = 0
    engine_rounds: int = 0  # rounds of the engine this arm took part in
    time_s: float = 0.0  # this arm's share of round time
    draft_s: float = 0.0  # summed draft time of the rounds it took part in
    verify_s: float = 0.0  # summed verify time of the rounds it took part in

    def add(self, record: RoundRecord) -> None:
        self.rounds += record.sequences
        self.drafted += record.drafted
        self.accepted += record.accepted
        self.emitted += record.emitted
        self.deferred += record.deferred
        self.engine_rounds += 1
        self.time_s += record.share_s
        self.draft_s += record.draft_s
        self.verify_s += record.verify_s

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per sequence-round, bonus included (plain decoding: 1.0)."""
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def goodput_tokens_per_s(self) -> float:
        return self.emitted / self.time_s if self.time_s > 0 else 0.0

    @property
    def mean_draft_ms(self) -> float:
        return 1000 * self.draft_s / self.engine_rounds if self.engine_rounds else 0.0

    @property
    def mean_verify_ms(self) -> float:
        return 1000 * self.verify_s / self.engine_rounds if self.engine_rounds else 0.0

    def as_pair_stats(self) -> dict:
        """The fields of the `PairStats` proto message, e.g. `pb.PairStats(**totals.as_pair_stats())`."""
        names = ("target", "drafter", "exit_layer", "k", "tree", "rounds", "drafted", "accepted", "emitted",
                 "acceptance_rate", "mean_accepted_length", "goodput_tokens_per_s", "mean_draft_ms", "mean_verify_ms",
                 "deferred")
        return {name: getattr(self, name) for name in names}


def pair_key(record: RoundRecord) -> PairKey:
    return record.target, record.drafter, record.exit_layer or 0, record.k, record.tree


class TelemetryAggregator:
    """Totals per (target, drafter, exit, k, tree) over every record it was given."""

    def __init__(self):
        self._pairs: dict[PairKey, PairTotals] = {}

    def add(self, records: Iterable[RoundRecord]) -> None:
        for record in records:
            key = pair_key(record)
            if key not in self._pairs:
                self._pairs[key] = PairTotals(*key)
            self._pairs[key].add(record)

    def pairs(self) -> list[PairTotals]:
        """Totals of every arm seen, sorted by target, drafter, exit and k."""
        return [self._pairs[key] for key in sorted(self._pairs)]
