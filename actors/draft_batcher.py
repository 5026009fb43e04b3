"""DraftBatcher: one drafter forward call per draft step (or fused steps) for many concurrent callers.

Targets call their shared drafter concurrently (one thread each in the drafter's
actor). Instead of one forward per caller, the first caller to arrive starts a
*leader* on the batcher's forward thread. Before every forward call the leader
takes the proposals queued since the last one and lets them join those under
way, then advances all of them in one call (rows may use different exits and
be at different steps; greedy rows may run several fused steps, see
`ModelDrafter`); a caller gets its drafts as soon as its own proposal is
complete. So a target whose call arrives while another target's proposal
drafts waits at most one call (a few steps at most), not the other's whole
proposal (continuous batching, at the granularity of forward calls). The leader stops
when nothing is under way or queued. All access to the drafter's state goes
through one lock, taken per call, so start/commit/finish from other threads
run between calls, never inside a forward.

Why the forwards run on one thread of their own, never on a caller's: memory.
A Ray actor serves calls on a pool of up to `max_concurrency` (256) threads,
and any of them may be the caller. Every thread that runs a forward keeps
memory of its own after it: a glibc malloc arena holding the freed
activations, and MKL's per-thread buffers. With the leader on caller threads,
each wave of streams reached threads that had never run a forward, and the
drafter actor's private memory grew by 1-2 MiB per such thread (424 / 503 /
531 MiB after three waves of 32 streams) until all 256 had; on one thread it is
paid once (316 / 331 / 334 MiB). start/commit/finish stay on the callers'
threads: they are bookkeeping (lists, a dict, a `torch.Generator`), not forwards.
"""

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from actors.drafters import Draft, DraftJob, DraftRequest, SteppedDrafter
from actors.runner import SeqId
from actors.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Ticket:
    requests: Sequence[DraftRequest]
    done: threading.Event = field(default_factory=threading.Event)
    drafts: list[Draft] | None = None
    error: BaseException | None = None


class DraftBatcher:
    """Thread-safe front of a `SteppedDrafter` that merges concurrent proposals call by call."""

    def __init__(self, drafter: SteppedDrafter):
        self.drafter = drafter
        self.forwards = 0  # batched forward calls run (each advances every proposal under way)
        self._state_lock = threading.Lock()  # guards the drafter's caches and states
        self._queue_lock = threading.Lock()  # guards _queue and _leading
        self._queue: list[_Ticket] = []
        self._leading = False
        # one worker, kept while the batcher lives (it exits when the executor is collected)
        self._forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-forward")

    def start(self, seq_id: SeqId, prompt: list[int], params: SamplingParams) -> None:
        """Start a sequence, and queue its prompt's forward (`prefill`) on the forward thread without waiting for
        it: a target calls `start` just before it prefills the same prompt in its own process, so the drafter's
        prefill runs meanwhile instead of inside the first proposal (target-xl's 640-token prompt: ~150 ms, the
        drafter's at exit 4: ~28 ms, on one core each)."""
        with self._state_lock:
            self.drafter.start(seq_id, prompt, params)
        self._forward_thread.submit(self._prefill, seq_id)

    def _prefill(self, seq_id: SeqId) -> None:
        """An optimisation only: if it fails, the first proposal prefills and reports the error to its caller."""
        try:
            with self._state_lock:
                self.drafter.prefill(seq_id)
        except Exception:
            log.warning("prefilling a started sequence failed; its first proposal prefills it", exc_info=True)

    def commit(self, seq_id: SeqId, emitted: list[int], rewind: int = 0) -> None:
        with self._state_lock:
            self.drafter.commit(seq_id, emitted, rewind)

    def finish(self, seq_id: SeqId) -> None:
        with self._state_lock:
            self.drafter.finish(seq_id)

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        ticket = _Ticket(requests)
        with self._queue_lock:
            self._queue.append(ticket)
            lead = not self._leading
            self._leading = True
        if lead:
            self._forward_thread.submit(self._lead)
        ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error
        return ticket.drafts

    def _lead(self) -> None:
        under_way: list[tuple[_Ticket, DraftJob]] = []
        while True:
            with self._queue_lock:
                arrived, self._queue = self._queue, []
                if not arrived and not under_way:
                    self._leading = False
                    return
            with self._state_lock:
                under_way += self._begin(arrived)
                under_way = self._step(under_way)

    def _begin(self, tickets: list[_Ticket]) -> list[tuple[_Ticket, DraftJob]]:
        """Set up each ticket's proposals; a ticket with a bad request fails alone."""
        begun = []
        for ticket in tickets:
            try:
                begun.append((ticket, self.drafter.begin(ticket.requests)))
            except BaseException as err:
                _fail(ticket, err)
        return begun

    def _step(self, under_way: list[tuple[_Ticket, DraftJob]]) -> list[tuple[_Ticket, DraftJob]]:
        """One forward for every proposal under way; hand out the complete ones, return the rest."""
        drafting = [job for _, job in under_way if not job.done]
        if drafting:
            try:
                self.drafter.advance(drafting)
                self.forwards += 1
            except BaseException as err:  # each waiting caller gets the error, not a hang
                for ticket, _ in under_way:
                    _fail(ticket, err)
                return []
        still = []
        for ticket, job in under_way:
            if job.done:
                ticket.drafts = job.drafts()
                ticket.done.set()
            else:
                still.append((ticket, job))
        return still


def _fail(ticket: _Ticket, err: BaseException) -> None:
    ticket.error = err
    ticket.done.set()
