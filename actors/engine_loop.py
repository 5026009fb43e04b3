"""EngineLoop: a `SpeculationEngine` stepping on its own thread, fed by many callers.

Callers `submit` a sequence and read its updates from a queue as rounds
complete; `cancel` stops it. Only the loop thread touches the engine: submits
and cancels wait in an inbox that the loop drains before each round, so new
sequences join the running batch between rounds (continuous batching).

Updates go out on feeds (`Feed`): a feed is a queue of messages, each message
the merged updates of any number of sequences. `TargetActor.generate` gives
each sequence a feed of its own; a front door has one feed per target replica
for all its sequences (`TargetActor.feed`), so that a round costs one Ray object
and one wake-up of the door whatever the number of streams (per-sequence
streams cost each stream an object and a wake-up of both processes per update:
at 16 greedy streams of target-xl through gRPC, 0.5 ms of the target actor's
time per update). A sequence's first update goes out at once (time to first
token), with whatever else its feed holds; later rounds are merged on the loop
thread and a feed sends once per interval (`StreamPacing`); a sequence's last
update goes out at once. Merging here, not in the reader, matters: a reader
woken by every round takes the interpreter lock from the loop thread each time,
which cost about 15% of a small model's plain decoding on this project's CPU.
After a round that sent updates the loop yields the lock once (`time.sleep(0)`):
the model step does not release it, so a reader would otherwise wait for the
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


FeedMessage = list[tuple[SeqId, "SequenceUpdate | BaseException"]]  # updates, or the error that ended a sequence


class Feed:
    """Where the updates of one or more sequences go (`output`, one `FeedMessage` per get), and the merged
    updates waiting to go there. Only the loop thread holds and sends."""

    def __init__(self):
        self.output: queue.Queue[FeedMessage] = queue.Queue()
        self._held: dict[SeqId, SequenceUpdate] = {}
        self._urgent = False  # a held update must go out now (a sequence's first or last)
        self._due = 0.0  # monotonic time from which held updates may go out

    def hold(self, update: SequenceUpdate, urgent: bool) -> None:
        held = self._held.get(update.seq_id)
        if held is not None:
            update = replace(update, new_tokens=held.new_tokens + update.new_tokens)
        self._held[update.seq_id] = update
        self._urgent |= urgent

    def flush(self, now: float, interval_s: float) -> bool:
        """Send what is held if it is urgent or due; True if a message went."""
        if self._urgent or self._due <= now:
            return self.send(now, interval_s)
        return False

    def send(self, now: float, interval_s: float) -> bool:
        """Send what is held, if anything; True if a message went."""
        if not self._held:
            return False
        self.output.put(list(self._held.items()))
        self._held, self._urgent, self._due = {}, False, now + interval_s
        return True

    def fail(self, seq_id: SeqId, err: BaseException) -> None:
        """End a sequence with an error, after what is held (callers send first)."""
        self.output.put([(seq_id, err)])


@dataclass
class _Stream:
    """A live sequence's feed, and whether its first update went out."""

    feed: Feed
    started: bool = False


@dataclass(frozen=True)
class StreamPacing:
    """How often each feed's merged message goes out.

    Every message is a Ray object and a wake-up of its reader, which takes the
    interpreter lock from the loop: at 16 greedy streams of target-l through
    gRPC, each on its own feed, a message every 10 ms per stream gave 841
    tokens/s and every 50 ms 1,493 (in process: about 2,100). So the loop spends
    a budget of messages per second over all its feeds: with few feeds each gets
    `interval_s`, with many the interval grows with their number.
    """

    interval_s: float = 0.0  # the shortest time between two messages of one feed (0: every round)
    max_updates_per_s: float | None = None  # messages over all feeds of the loop; None: no budget

    def interval(self, feeds: int) -> float:
        """Seconds between two messages of one feed while `feeds` feeds have live sequences."""
        if self.max_updates_per_s is None:
            return self.interval_s
        return max(self.interval_s, feeds / self.max_updates_per_s)


class EngineLoop:
    def __init__(self, engine: SpeculationEngine, pacing: StreamPacing = StreamPacing()):
        """`pacing`: how long a sequence's rounds are merged into one update after the first."""
        self.engine = engine
        self.pacing = pacing
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[SeqId, _Stream] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, seq_id: SeqId, prompt: list[int], params: SamplingParams,
               spec: SpeculationSpec = FOLLOW_PLAN, feed: Feed | None = None) -> Feed:
        """Queue a sequence; its updates (or the error that refused it) go out on `feed` (a new one if None),
        which is returned."""
        feed = feed or Feed()
        self._inbox.put(lambda: self._admit(seq_id, prompt, params, spec, feed))
        return feed

    def cancel(self, seq_id: SeqId) -> None:
        """Stop a sequence; its feed then gets a last update with finish reason "cancelled"."""
        self._inbox.put(lambda: self._drop(seq_id))

    def cancel_feed(self, feed: Feed) -> None:
        """Stop every sequence whose updates go out on `feed` (its reader is gone)."""
        self._inbox.put(lambda: [self._drop(seq_id) for seq_id, s in list(self._streams.items()) if s.feed is feed])

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

    def _admit(self, seq_id, prompt, params, spec: SpeculationSpec, feed: Feed) -> None:
        try:
            self.engine.add(prompt, params, seq_id=seq_id, spec=spec)
        except Exception as err:  # the reader re-raises it; the loop goes on
            feed.fail(seq_id, err)
            return
        self._streams[seq_id] = _Stream(feed)

    def _drop(self, seq_id: SeqId) -> None:
        if self.engine.cancel(seq_id):
            feed = self._streams.pop(seq_id).feed
            feed.hold(SequenceUpdate(seq_id, [], "cancelled", SpeculationStats()), urgent=True)
            feed.send(time.monotonic(), self.pacing.interval_s)

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
            for seq_id, stream in list(self._streams.items()):
                self.engine.cancel(seq_id)
                stream.feed.send(now, self.pacing.interval_s)  # the tokens it had, then the error
                stream.feed.fail(seq_id, err)
            self._streams.clear()
            return
        feeds = {id(stream.feed): stream.feed for stream in self._streams.values()}
        now, interval = time.monotonic(), self.pacing.interval(len(feeds))
        for update in updates:
            stream = self._streams[update.seq_id]
            last = update.finish_reason is not None
            stream.feed.hold(update, urgent=last or not stream.started)
            stream.started = True
            if last:
                del self._streams[update.seq_id]
        sent = False
        for feed in feeds.values():
            sent |= feed.flush(now, interval)
        if sent:
            time.sleep(0)  # let the readers take the interpreter lock now, not at the next forced switch
