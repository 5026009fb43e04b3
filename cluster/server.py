"""The gRPC server: Generation service, standard health checking and reflection; TLS and API keys per the config."""

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.auth import AUTHORIZATION, UNAUTHENTICATED_MESSAGE, ApiKeys
from cluster.config import TlsConfig
from cluster.controller.client import FLEET_REFRESH_S, ControllerClient
from cluster.frontend import Frontend
from cluster.placement import Fleet
from cluster.router import GenerationService
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "specfleet.v1.Generation"
SHUTDOWN_GRACE_S = 5.0
HEALTH_NAMES = ("", SERVICE_NAME)  # the server as a whole, and the Generation service
_background: set[asyncio.Task] = set()  # tasks kept referenced until they end (the loop holds them only weakly)
log = logging.getLogger(__name__)


async def start_server(
    fleet: Fleet, host: str | None = None, port: int | None = None, controller: "ControllerClient | None" = None
) -> tuple[grpc.aio.Server, int]:
    """Start serving on host:port (the config's by default); returns the server and its bound port.

    With a `controller`, requests follow its fleet as it changes, report their
    metrics to it, and GetStats answers from it.
    """
    config = fleet.config.server
    api_keys = ApiKeys.from_config(config)
    server = grpc.aio.server(interceptors=[ApiKeyInterceptor(api_keys)] if api_keys else None,
                             options=[("grpc.max_receive_message_length", config.max_request_bytes)])
    if controller is None:
        service = GenerationService(Frontend(fleet))
    else:
        service = GenerationService(await controller.frontend(), controller.stats)
    pb_grpc.add_GenerationServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host or config.host}:{config.grpc_port if port is None else port}"
    bound = server.add_secure_port(address, tls_credentials(config.tls)) if config.tls else server.add_insecure_port(address)
    await server.start()
    if controller is None:
        for name in HEALTH_NAMES:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    else:
        await _report_readiness(health_servicer, controller.ready)  # the first answer before the port is handed out
        task = asyncio.get_running_loop().create_task(follow_readiness(health_servicer, controller.ready))
        _background.add(task)
        task.add_done_callback(_background.discard)
    return server, bound


def tls_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """The server's certificate; with a client CA, clients must present a certificate it signed."""
    ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Calls of the Generation service need an API key in their `authorization` metadata; health and
    reflection stay open (probes and tools carry no key)."""

    def __init__(self, api_keys: ApiKeys):
        self.api_keys = api_keys

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        if self.api_keys.allows(dict(details.invocation_metadata or ()).get(AUTHORIZATION)):
            return handler
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_deny_stream, handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(_deny, handler.request_deserializer, handler.response_serializer)


async def _deny(request, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


async def _deny_stream(request, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
    yield  # never reached: makes this an async generator, as a streaming handler must be


async def follow_readiness(servicer: health.aio.HealthServicer, ready: Callable[[], Awaitable[bool]]) -> None:
    """Keep grpc.health.v1 telling what the controller says: NOT_SERVING while no target replica can serve,
    so a load balancer or Kubernetes probe can act on it."""
    while True:
        await asyncio.sleep(FLEET_REFRESH_S)
        await _report_readiness(servicer, ready)


async def _report_readiness(servicer: health.aio.HealthServicer, ready: Callable[[], Awaitable[bool]]) -> None:
    try:
        serving = await ready()
    except Exception:  # a controller that cannot be reached cannot vouch for the fleet
        log.warning("cannot reach the fleet controller; reporting NOT_SERVING", exc_info=True)
        serving = False
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in HEALTH_NAMES:
        await servicer.set(name, status)


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
