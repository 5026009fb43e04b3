"""EngineLoop: a `SpeculationEngine` stepping on its own thread, fed by many callers.

Callers `submit` a sequence and read its updates from a queue as rounds
complete; `cancel` stops it. Only the loop thread touches the engine: submits
and cancels wait in an inbox that the loop drains before each round, so new
sequences join the running batch between rounds (continuous batching).
"""

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from actors.engine import SequenceUpdate, SpeculationEngine, SpeculationStats
from actors.runner import SeqId
from actors.sampling import SamplingParams
from actors.speculation import FOLLOW_PLAN, SpeculationSpec

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: SpeculationEngine):
        self.engine = engine
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._outputs: dict[SeqId, queue.Queue] = {}
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
        self._outputs[seq_id] = output

    def _drop(self, seq_id: SeqId) -> None:
        if self.engine.cancel(seq_id):
            self._outputs.pop(seq_id).put(SequenceUpdate(seq_id, [], "cancelled", SpeculationStats()))

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
            for seq_id, output in list(self._outputs.items()):
                self.engine.cancel(seq_id)
                output.put(err)
            self._outputs.clear()
            return
        for update in updates:
            output = self._outputs[update.seq_id] if update.finish_reason is None else self._outputs.pop(update.seq_id)
            output.put(update)
