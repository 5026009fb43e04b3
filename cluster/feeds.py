"""One update feed per target replica for all of a front door's sequences there.

A front door submits each sequence with `TargetActor.submit` and reads the
updates of all its sequences on a replica from one streaming call,
`TargetActor.feed`, opened at the door's first sequence there: a round then
costs the door and the target one Ray object, not one per stream (see
`actors.engine_loop`). A task per feed hands each message's updates to the
queues of their sequences. When the replica dies, every sequence reading
from it gets the `RayActorError`, so the front door resumes it elsewhere.
"""

import asyncio
import logging
import uuid

from ray.exceptions import RayActorError

from actors.ray_actors import STREAM_BACKPRESSURE, actor_id

log = logging.getLogger(__name__)


class _Feed:
    """A replica's feed as this door reads it: the queue of each sequence it carries, and the reading task."""

    def __init__(self):
        self.queues: dict[str, asyncio.Queue] = {}
        self.task: asyncio.Task | None = None


class DoorFeeds:
    def __init__(self):
        self.door = uuid.uuid4().hex  # how target replicas tell this door's feed from other doors'
        self._feeds: dict[str, _Feed] = {}  # actor id -> its feed

    def open(self, handle, seq_id: str) -> asyncio.Queue:
        """The queue that will receive `seq_id`'s updates (or the error that ends it) from replica `handle`;
        call before submitting the sequence there."""
        key = actor_id(handle)
        feed = self._feeds.get(key)
        if feed is None:
            feed = self._feeds[key] = _Feed()
            feed.task = asyncio.get_running_loop().create_task(self._read(key, handle, feed))
        feed.queues[seq_id] = queue = asyncio.Queue()
        return queue

    def close(self, handle, seq_id: str) -> None:
        """Stop handing `seq_id`'s updates on (it finished, or its reader left)."""
        feed = self._feeds.get(actor_id(handle))
        if feed is not None:
            feed.queues.pop(seq_id, None)

    async def _read(self, key: str, handle, feed: _Feed) -> None:
        error: BaseException = RayActorError()  # a feed never ends by itself: its end means the replica's
        try:
            messages = handle.feed.options(num_returns="streaming",
                                           _generator_backpressure_num_objects=STREAM_BACKPRESSURE).remote(self.door)
            async for ref in messages:
                for seq_id, item in await ref:
                    queue = feed.queues.get(seq_id)
                    if queue is not None:
                        queue.put_nowait(item)
        except RayActorError as err:
            error = err
        except Exception:  # noqa: BLE001 - it ends the feed's sequences as a replica failure, not the door
            log.exception("update feed of a target replica failed")
        finally:
            if self._feeds.get(key) is feed:
                del self._feeds[key]
            for queue in feed.queues.values():
                queue.put_nowait(error)
