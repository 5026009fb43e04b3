"""One completion as pieces of text: the frontend's updates, detokenized and cut at stop strings.

Both routes and both response styles (whole and streamed) read the same
pieces, so streamed chunks concatenate to exactly the text of a whole response.
"""

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cluster.detokenize import TextStream
from cluster.frontend import Admitted, Frontend, ReplicaFailed, usage
from specfleet.v1 import generation_pb2 as pb


@dataclass(frozen=True)
class Piece:
    text: str  # the new text since the previous piece
    token_ids: list[int]  # the new tokens since the previous piece
    finish_reason: str | None = None  # "stop" or "length" on the last piece only
    usage: pb.Usage | None = None  # last piece only
    speculation: pb.SpeculationStats | None = None  # last piece only


class StopMatcher:
    """Finds the first stop string in text that arrives in pieces.

    Text that may be the start of a stop string is held back until the next
    piece tells, so nothing emitted is ever taken back. A match can only start
    in held text or later, so searching the held text plus the new text is enough.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text now safe to emit, and whether a stop string ended the completion (the text stops before it)."""
        text, self._held = self._held + text, ""
        found = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
        if found:
            return text[:min(found)], True
        keep = self._partial_stop_length(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The text held back, once no more text will come."""
        held, self._held = self._held, ""
        return held

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of `text` that begins a stop string."""
        lengths = (n for stop in self.stops for n in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:n]))
        return max(lengths, default=0)


async def completion_pieces(frontend: Frontend, admitted: Admitted, stops: list[str]) -> AsyncIterator[Piece]:
    """The completion's pieces, the last with finish reason, usage and speculation stats.

    A stop string ends the completion early: leaving the loop closes the
    frontend's iterator, which cancels the sequence on its actors.
    """
    text, matcher = TextStream(admitted.tokenizer), StopMatcher(stops)
    async with contextlib.aclosing(frontend.updates(admitted)) as updates:
        async for update in updates:
            if update.finish_reason == "cancelled":
                raise ReplicaFailed("the server cancelled this sequence before it finished")
            done = update.finish_reason is not None
            new_text, stopped = matcher.feed(text.add(update.new_tokens, final=done))
            if not (stopped or done):
                yield Piece(new_text, update.new_tokens)
                continue
            if stopped:
                frontend.stop_early(admitted)
            yield Piece(new_text if stopped else new_text + matcher.flush(), update.new_tokens,
                        "stop" if stopped else update.finish_reason,
                        usage(admitted.prompt, text.tokens), frontend.stats(admitted, update))
            return
    raise ReplicaFailed("the target replica ended the stream before the sequence finished")
