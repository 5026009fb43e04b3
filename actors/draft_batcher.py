"""DraftBatcher: one drafter forward per draft step for many concurrent callers.

Targets call their shared drafter concurrently (one thread each in the drafter's
actor). Instead of one forward per caller, the first caller to arrive starts a
*leader* on the batcher's forward thread: it takes every request queued so far,
runs a single batched `propose` (rows may use different exits), hands each
caller its drafts, and repeats while requests keep arriving. Callers just wait
for their result. All access to the drafter's state goes through one lock, so
start/commit/finish from other threads never interleave with a forward.

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

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from actors.drafters import Draft, DraftRequest, ModelDrafter
from actors.runner import SeqId
from actors.sampling import SamplingParams


@dataclass
class _Ticket:
    requests: Sequence[DraftRequest]
    done: threading.Event = field(default_factory=threading.Event)
    drafts: list[Draft] | None = None
    error: BaseException | None = None


class DraftBatcher:
    """Thread-safe front of a `ModelDrafter` that merges concurrent proposals."""

    def __init__(self, drafter: ModelDrafter):
        self.drafter = drafter
        self.forwards = 0  # batched propose calls run (each one forward per draft step)
        self._state_lock = threading.Lock()  # guards the drafter's caches and states
        self._queue_lock = threading.Lock()  # guards _queue and _leading
        self._queue: list[_Ticket] = []
        self._leading = False
        # one worker, kept while the batcher lives (it exits when the executor is collected)
        self._forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-forward")

    def start(self, seq_id: SeqId, prompt: list[int], params: SamplingParams) -> None:
        with self._state_lock:
            self.drafter.start(seq_id, prompt, params)

    def commit(self, seq_id: SeqId, emitted: list[int]) -> None:
        with self._state_lock:
            self.drafter.commit(seq_id, emitted)

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
        while True:
            with self._queue_lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._leading = False
                    return
            self._run(batch)

    def _run(self, batch: list[_Ticket]) -> None:
        merged = [r for ticket in batch for r in ticket.requests]
        try:
            with self._state_lock:
                drafts = self.drafter.propose(merged)
                self.forwards += 1
        except BaseException as err:  # each waiting caller gets the error, not a hang
            for ticket in batch:
                ticket.error = err
                ticket.done.set()
            return
        start = 0
        for ticket in batch:
            ticket.drafts = drafts[start : start + len(ticket.requests)]
            start += len(ticket.requests)
            ticket.done.set()
