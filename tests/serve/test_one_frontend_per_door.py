"""A front door's controller client creates its one Frontend once, however many requests arrive before it exists."""

import asyncio

import pytest

from cluster.controller.client import ControllerClient


class CountingClient(ControllerClient):
    """A controller client whose each Frontend creation (which would start loops polling the controller) is counted."""

    def __init__(self, fail_first: bool = False):
        super().__init__(handle=None)
        self.created, self.fail_first = 0, fail_first

    async def _new_frontend(self):
        self.created += 1
        await asyncio.sleep(0.01)
        if self.fail_first and self.created == 1:
            raise ConnectionError("controller restarting")
        return object()


def test_a_burst_of_first_requests_creates_one_frontend():
    client = CountingClient()

    async def burst():
        return await asyncio.gather(*(client.frontend() for _ in range(16)))

    frontends = asyncio.run(burst())
    assert client.created == 1 and all(f is frontends[0] for f in frontends)


def test_a_failed_creation_is_retried_by_the_next_request():
    client = CountingClient(fail_first=True)

    async def twice():
        with pytest.raises(ConnectionError):
            await client.frontend()
        return await client.frontend()

    assert asyncio.run(twice()) is not None and client.created == 2
