"""The HTTP ingress creates its one Frontend once, however many requests arrive before it exists."""

import asyncio

import pytest

from cluster.serve.app import HttpIngress


class CountingController:
    """Stands in for `ControllerClient`: each `frontend()` would start loops polling the controller."""

    def __init__(self, fail_first: bool = False):
        self.created, self.fail_first = 0, fail_first

    async def frontend(self):
        self.created += 1
        await asyncio.sleep(0.01)
        if self.fail_first and self.created == 1:
            raise ConnectionError("controller restarting")
        return object()


def ingress(controller: CountingController):
    replica = HttpIngress.func_or_class.__new__(HttpIngress.func_or_class)
    replica.controller, replica._frontend = controller, None
    return replica


def test_a_burst_of_first_requests_creates_one_frontend():
    controller = CountingController()
    replica = ingress(controller)

    async def burst():
        return await asyncio.gather(*(replica.frontend() for _ in range(16)))

    frontends = asyncio.run(burst())
    assert controller.created == 1 and all(f is frontends[0] for f in frontends)


def test_a_failed_creation_is_retried_by_the_next_request():
    controller = CountingController(fail_first=True)
    replica = ingress(controller)

    async def twice():
        with pytest.raises(ConnectionError):
            await replica.frontend()
        return await replica.frontend()

    assert asyncio.run(twice()) is not None and controller.created == 2
