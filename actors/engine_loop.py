"""EngineLoop: a `SpeculationEngine` stepping on its own thread, fed by many callers.

Callers `submit` a sequence and read its updates from its feed as rounds
complete; `cancel` stops it. Only the loop thread touches the engine: submits
and cancels wait in an inbox that the loop drains before each round, so new
sequences join the running batch between rounds (continuous batching).

Updates go out on feeds (`Feed`): a feed is a queue of messages, each message
the merged updates of any number of sequences. `TargetActor.generate` gives
each sequence a feed of its own; a front door has one feed per target replica
for all its sequences (`TargetActor.feed`), so that a round costs one Ray
object and one wake-up of the door whatever the number of streams
(per-sequence streams cost each stream an object and a wake-up of both
processes per update: at 16 greedy streams of target-xl through gRPC, 0.5 ms
of the target actor's time per update). A sequence's first update goes out at
once (time to first token); later rounds are merged on the loop thread into
one update per interval (`StreamPacing`), and the last goes out at once; the
updates due in a round go to each feed as one message. Merging here, not in
the reader, matters: a reader woken by every round takes the interpreter lock
from the loop thread each time, which cost about 15% of a small model's plain
decoding on this project's CPU. After a round that sent updates the loop
yields the lock once (`time.sleep(0)`): the model step does not release it,
so a reader would otherwise wait for the interpreter's forced switch (5 ms)
before it can pass its update on (cluster plain decoding of target-l, 2 x 15 s
each, same fleet build: 565-571 tokens/s against 521-528 without the yield).
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


def take_update(item: "SequenceUpdate | BaseException") -> SequenceUpdate:
    """A sequence's item of a feed message: its update, or raise the error that ended it."""
    if isinstance(item, BaseException):
        raise item
    return item


class Feed:
    """Where the updates of one or more sequences go: `output` gives one `FeedMessage` per get. Only the loop
    thread adds and sends."""

    def __init__(self):
        self.output: queue.Queue[FeedMessage] = queue.Queue()
        self._outgoing: FeedMessage = []

    def add(self, update: SequenceUpdate) -> None:
        self._outgoing.append((update.seq_id, update))

    def send(self) -> bool:
        """Send what was added since the last message as one message, if anything; True if one went."""
        if not self._outgoing:
            return False
        self.output.put(self._outgoing)
        self._outgoing = []
        return True

    def fail(self, seq_id: SeqId, err: BaseException) -> None:
        """End a sequence with an error (after what was sent: callers send first)."""
        self.output.put([(seq_id, err)])


@dataclass
class _Stream:
    """A live sequence's feed, and the merged update waiting to go there."""

    feed: Feed
    held: SequenceUpdate | None = None
    due: float = 0.0  # monotonic time from which the held update may go out (0: the first goes out at once)

    def hold(self, update: SequenceUpdate) -> None:
        if self.held is not None:
            update = replace(update, new_tokens=self.held.new_tokens + update.new_tokens)
        self.held = update

    def release(self, now: float, interval_s: float) -> None:
        """Add the held update, if any, to the feed's next message."""
        if self.held is not None:
            self.feed.add(self.held)
            self.held, self.due = None, now + interval_s


@dataclass(frozen=True)
class StreamPacing:
    """How often each sequence's merged update goes out.

    Every update is a message through the front door (and, on HTTP, a chunk
    through Serve's proxy); with each stream on its own feed, also a Ray object
    and a wake-up of its reader, which takes the interpreter lock from the
    loop: at 16 greedy streams of target-l through gRPC, updates every 10 ms
    per stream gave 841 tokens/s and every 50 ms 1,493 (in process: about
    2,100). So the loop spends a budget of updates per second over all its
    streams: with few streams each gets `interval_s`, with many the interval
    grows with their number. Updates that fall due in one round go to each
    feed as one message.
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
            stream = self._streams.pop(seq_id)
            stream.hold(SequenceUpdate(seq_id, [], "cancelled", SpeculationStats()))
            stream.release(time.monotonic(), self.pacing.interval_s)
            stream.feed.send()

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
                stream.release(now, self.pacing.interval_s)  # the tokens it had, then the error
                stream.feed.send()
                stream.feed.fail(seq_id, err)
            self._streams.clear()
            return
        now, interval = time.monotonic(), self.pacing.interval(len(self._streams))
        feeds = {id(stream.feed): stream.feed for stream in self._streams.values()}
        for update in updates:
            stream = self._streams[update.seq_id]
            stream.hold(update)
            if update.finish_reason is not None:
                stream.release(now, interval)
                del self._streams[update.seq_id]
        for stream in self._streams.values():
            if stream.due <= now:
                stream.release(now, interval)
        sent = False
        for feed in feeds.values():
            sent |= feed.send()
        if sent:
            time.sleep(0)  # let the readers take the interpreter lock now, not at the next forced switch
