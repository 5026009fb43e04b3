"""A closed-loop load generator for systems reached over the network.

`concurrency` client threads share the cell's requests: each sends one,
waits for its last token, then sends the next, so exactly `concurrency`
requests are in flight until the queue runs dry.
"""

import queue
import threading
from collections.abc import Callable

from bench.metrics import RequestTrace

SendRequest = Callable[[int, list[int]], RequestTrace]  # (request index, prompt ids) -> its trace


def run_closed_loop(prompts: list[list[int]], concurrency: int, send: SendRequest) -> list[RequestTrace]:
    """Every prompt sent once; traces in prompt order. The first error of any client is raised."""
    waiting: queue.Queue[int] = queue.Queue()
    for index in range(len(prompts)):
        waiting.put(index)
    traces: list[RequestTrace | None] = [None] * len(prompts)
    errors: list[BaseException] = []

    def client() -> None:
        while not errors:
            try:
                index = waiting.get_nowait()
            except queue.Empty:
                return
            try:
                traces[index] = send(index, prompts[index])
            except BaseException as err:  # reported to the caller, and the other clients stop
                errors.append(err)

    threads = [threading.Thread(target=client, name=f"bench-client-{i}") for i in range(max(1, concurrency))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return traces
