"""OverlappedEngine: the drafter drafts one group of sequences while the target verifies the other.

With a drafter in another process, a plain round leaves each side idle while
the other works: the target waits for drafts, the drafter for verdicts. When
two or more sequences draft, this engine splits them into two groups that take
turns. Each `step` collects the drafts of the group sent to the drafter one
step earlier, sends the other group (verified one step earlier, its commits
riding along), and verifies the first group while the drafter drafts the
second.

Exactness is that of `SpeculationEngine`: every sequence still alternates
draft -> verify, and each draft is made from the sequence's true context, so
greedy output is the target's and sampled output follows its distribution
(verification never depends on what was drafted, only on q being the law the
draft was sampled from).

Who takes part: sequences that draft this round (k > 0 after overrides and
max_tokens). Plain ones are verified every step. The groups are kept about
even: new sequences, or an imbalance left by finished ones, are partly drafted
at once, waiting as a plain round does, and verified with the current group.

At most one proposal is in flight. Its drafts are dropped when the drafter
dies or is replaced meanwhile; those sequences are drafted again (or decode
plainly) — no token is lost, tokens come only from verification. A sequence
cancelled with a draft in flight is freed at once; its draft is ignored.
Telemetry: a round's `draft_s` is the time its step waited for drafts.
"""

from dataclasses import dataclass

from actors.drafters import Draft, Drafter, PendingDrafts
from actors.engine import SequenceUpdate, SpeculationEngine, _Live


@dataclass
class _InFlight:
    """A group whose drafts the drafter is making."""

    rows: list[_Live]
    arms: list[tuple[int | None, int, str]]  # (exit, k, tree label) each row was sent with
    handle: PendingDrafts  # `result()` gives one `Draft` per row
    drafter: Drafter  # who drafts them: drafts of a replaced (or dead) drafter are dropped


class OverlappedEngine(SpeculationEngine):
    """A `SpeculationEngine` whose drafter drafts one group while the target verifies the other."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._in_flight: _InFlight | None = None

    def step(self) -> list[SequenceUpdate]:
        """Verify the group drafted last step, with sequences drafted now; send the next group to the drafter."""
        self._admit_waiting()
        running = list(self._live.values())
        if not running:
            return []
        self._begin_round()
        started = self.clock()
        due, due_drafts, due_arms = self._collect()
        due_ids = {s.seq_id for s in due}
        waiting = [s for s in running if s.seq_id not in due_ids]
        ahead = self._ahead(len(due), [s for s in waiting if self._draft_length(s) > 0])
        ahead_ids = {s.seq_id for s in ahead}
        now = [s for s in waiting if s.seq_id not in ahead_ids]
        now_arms = [self._round_arm(s) for s in now]
        now_drafts = self._propose(now)
        draft_s = self.clock() - started
        self._launch(ahead)
        self._prefill([s for s in running if not s.prefilled])
        return self._verify_round(due + now, due_drafts + now_drafts, due_arms + now_arms, draft_s)

    def _collect(self) -> tuple[list[_Live], list[Draft], list]:
        """The live rows of the group in flight, their drafts and arms; nothing when none is (still) usable."""
        flight, self._in_flight = self._in_flight, None
        if flight is None or flight.drafter is not self.drafter:
            return [], [], []
        kept = [i for i, seq in enumerate(flight.rows) if self._live.get(seq.seq_id) is seq]
        if not kept:
            return [], [], []  # all cancelled: the drafter settles the call itself before the next one
        drafts = self._call_drafter(lambda d: flight.handle.result())
        if drafts is None:  # the drafter died with them: these rows decode plainly this round
            drafts = [Draft([], None) for _ in flight.rows]
        return [flight.rows[i] for i in kept], [drafts[i] for i in kept], [flight.arms[i] for i in kept]

    def _ahead(self, due: int, drafting: list[_Live]) -> list[_Live]:
        """Which drafting sequences to send ahead (verified next step); the others are drafted now.

        Sent ahead: enough that the next group is about as large as this step's (`due` + those drafted now).
        """
        if self.drafter is None or due + len(drafting) < 2:
            return []
        return drafting[max(0, (len(drafting) - due) // 2):]

    def _launch(self, rows: list[_Live]) -> None:
        if not rows:
            return
        arms, requests = [self._round_arm(s) for s in rows], [self._request(s) for s in rows]
        handle = self._call_drafter(lambda d: d.propose_async(requests))
        if handle is not None:
            self._in_flight = _InFlight(rows, arms, handle, self.drafter)
