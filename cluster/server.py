"""The gRPC server: Generation service, standard health checking and reflection."""

import asyncio
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.controller.client import ControllerClient
from cluster.frontend import Frontend
from cluster.placement import Fleet
from cluster.router import GenerationService
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "specfleet.v1.Generation"
SHUTDOWN_GRACE_S = 5.0


async def start_server(
    fleet: Fleet, host: str | None = None, port: int | None = None, controller: "ControllerClient | None" = None
) -> tuple[grpc.aio.Server, int]:
    """Start serving on host:port (the config's by default); returns the server and its bound port.

    With a `controller`, requests follow its fleet as it changes, report their
    metrics to it, and GetStats answers from it.
    """
    server = grpc.aio.server()
    if controller is None:
        service = GenerationService(Frontend(fleet))
    else:
        service = GenerationService(await controller.frontend(), controller.stats)
    pb_grpc.add_GenerationServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    config = fleet.config.server
    bound = server.add_insecure_port(f"{host or config.host}:{config.grpc_port if port is None else port}")
    await server.start()
    for service_name in ("", SERVICE_NAME):
        await health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


async def stop_server(server: grpc.aio.Server) -> None:
    await server.stop(SHUTDOWN_GRACE_S)


class BackgroundServer:
    """The asyncio gRPC server on its own thread, for callers that are not async (tests, benchmarks)."""

    def __init__(self, fleet: Fleet, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 120.0,
                 controller: "ControllerClient | None" = None):
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self.server, self.port = self._loop.run_until_complete(start_server(fleet, host, port, controller))
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=serve, name="grpc-server", daemon=True).start()
        if not ready.wait(start_timeout_s):
            raise TimeoutError("the gRPC server did not start")
        self.address = f"{host}:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(stop_server(self.server), self._loop).result(30)
        asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)


async def _cancel_other_tasks() -> None:
    """Cancel what still runs on the loop (e.g. a controller watch) and wait until it has ended."""
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
