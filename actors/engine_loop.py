"""EngineLoop: a `SpeculationEngine` stepping on its own thread, fed by many callers.

Callers `submit` a sequence and read its updates from a queue as rounds
complete; `cancel` stops it. Only the loop thread touches the engine: submits
and cancels wait in an inbox that the loop drains before each round, so new
sequences join the running batch between rounds (continuous batching).

A sequence's first update goes out at once (time to first token); later rounds
are merged on the loop thread and go out once per interval (`StreamPacing`),
and the last at once. Merging here, not in the reader, matters: a reader woken by every
round takes the interpreter lock from the loop thread each time, which cost
about 15% of a small model's plain decoding on this project's CPU. After a
round that sent updates the loop yields the lock once (`time.sleep(0)`): the
model step does not release it, so a reader would otherwise wait for the
interpreter's forced switch (5 ms) before it can pass its update on (cluster
plain decoding of target-l, 2 x 15 s each, same fleet build: 565-571 tokens/s
against 521-528 without the yield).
"""

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace

from actors.engine import SequenceUpdate, SpeculationEngine, SpeculationStats
from actors.runner import SeqId
from actors.sampling import SamplingParams
from actors.speculation import FOLLOW_PLAN, SpeculationSpec

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    """Where one sequence's updates go, and the merged update waiting to go there."""

    output: queue.Queue
    held: SequenceUpdate | None = None
    due: float = 0.0  # monotonic time from which the held update may go out (0: the first goes out at once)

    def hold(self, update: SequenceUpdate) -> None:
        if self.held is not None:
            update = replace(update, new_tokens=self.held.new_tokens + update.new_tokens)
        self.held = update

    def send(self, now: float, interval_s: float) -> bool:
        """Put the held update on the output queue, if any; True if one went."""
        if self.held is None:
            return False
        self.output.put(self.held)
        self.held, self.due = None, now + interval_s
        return True


@dataclass(frozen=True)
class StreamPacing:
    """How often each sequence's merged update goes out.

    Every update is a Ray object and a message through the front door, and its
    reader takes the interpreter lock from the loop: at 16 greedy streams of
    target-l through gRPC, updates every 10 ms per stream gave 841 tokens/s and
    every 50 ms 1,493 (in process: about 2,100). So the loop spends a budget of
    updates per second over all its streams: with few streams each gets
    `interval_s`, with many the interval grows with their number.
    """

    interval_s: float = 0.0  # the shortest time between two updates of one stream (0: every round)
    max_updates_per_s: float | None = None  # over all streams of the loop; None: no budget

    def interval(self, streams: int) -> float:
        """Seconds between two updates of one stream while `streams` streams are open."""
        if self.max_updates_per_s is None:
            return self.interval_s
        return max(self.interval_s, streams / self.max_updates_per_s)


class EngineLoop:
    def __init__(self, engine: SpeculationEngine, pacing: StreamPacing = StreamPacing()):
        """`pacing`: how long a sequence's rounds are merged into one update after the first."""
        self.engine = engine
        self.pacing = pacing
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._outputs: dict[SeqId, _Stream] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, seq_id: SeqId, prompt: list[int], params: SamplingParams,
               spec: SpeculationSpec = FOLLOW_PLAN) -> queue.Queue:
        """Queue a sequence; its updates (or the error that refused it) arrive on the returned queue."""
        output: queue.Queue = queue.Queue()
        self._inbox.put(lambda: self._admit(seq_id, prompt, params, spec, output))
        return output

    def cancel(self, seq_id: SeqId) -> None:
        """Stop a sequence; its queue then receives a last update with finish reason "cancelled"."""
        self._inbox.put(lambda: self._drop(seq_id))

    def call(self, function: Callable[[SpeculationEngine], object]) -> object:
        """Run `function(engine)` on the loop thread between two rounds; return its result or raise its error."""
        done: Future = Future()

        def run() -> None:
            try:
                done.set_result(function(self.engine))
            except Exception as err:  # the caller re-raises it; the loop goes on
                done.set_exception(err)

        self._inbox.put(run)
        return done.result()

    def _admit(self, seq_id, prompt, params, spec: SpeculationSpec, output: queue.Queue) -> None:
        try:
            self.engine.add(prompt, params, seq_id=seq_id, spec=spec)
        except Exception as err:  # the caller re-raises it; the loop goes on
            output.put(err)
            return
        self._outputs[seq_id] = _Stream(output)

    def _drop(self, seq_id: SeqId) -> None:
        if self.engine.cancel(seq_id):
            stream = self._outputs.pop(seq_id)
            stream.hold(SequenceUpdate(seq_id, [], "cancelled", SpeculationStats()))
            stream.send(time.monotonic(), self.pacing.interval_s)

    def _run(self) -> None:
        while True:
            if not self.engine.num_live:
                self._inbox.get()()  # idle: block until work arrives
            while not self._inbox.empty():
                self._inbox.get()()
            if self.engine.num_live:
                self._step()

    def _step(self) -> None:
        try:
            updates = self.engine.step()
        except Exception as err:  # a failed round fails its sequences, not the loop
            log.exception("round failed")
            now = time.monotonic()
            for seq_id, stream in list(self._outputs.items()):
                self.engine.cancel(seq_id)
                stream.send(now, self.pacing.interval_s)  # the tokens it had, then the error
                stream.output.put(err)
            self._outputs.clear()
            return
        now, interval = time.monotonic(), self.pacing.interval(len(self._outputs))
        sent = False
        for update in updates:
            stream = self._outputs[update.seq_id]
            stream.hold(update)
            if update.finish_reason is not None:
                sent |= stream.send(now, interval)
                del self._outputs[update.seq_id]
        for stream in self._outputs.values():
            if stream.due <= now:
                sent |= stream.send(now, interval)
        if sent:
            time.sleep(0)  # let the readers take the interpreter lock now, not at the next forced switch
