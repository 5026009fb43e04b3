"""The gRPC server's health follows the fleet controller's readiness (a fake controller; the real one is in
tests/cluster/test_controller.py)."""

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2

import cluster.server as server_module
from cluster.server import HEALTH_NAMES, follow_readiness


class FakeController:
    """Answers readiness with `answer`: True/False, or raises it, as an unreachable controller does."""

    answer: bool | Exception = True

    async def ready(self) -> bool:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def statuses(servicer: health.aio.HealthServicer) -> set:
    replies = [await servicer.Check(health_pb2.HealthCheckRequest(service=name), None) for name in HEALTH_NAMES]
    return {reply.status for reply in replies}


def test_health_tracks_readiness_and_an_unreachable_controller_means_not_serving(monkeypatch):
    monkeypatch.setattr(server_module, "FLEET_REFRESH_S", 0.01)
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    async def scenario() -> list:
        servicer = health.aio.HealthServicer()
        controller = FakeController()
        task = asyncio.create_task(follow_readiness(servicer, controller.ready))
        seen = []
        for answer in (True, False, grpc.RpcError("controller gone"), True):
            controller.answer = answer
            await asyncio.sleep(0.05)
            seen.append(await statuses(servicer))
        task.cancel()
        return seen

    assert asyncio.run(scenario()) == [{SERVING}, {NOT_SERVING}, {NOT_SERVING}, {SERVING}]
