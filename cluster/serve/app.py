"""The Ray Serve application: fleet controller, gRPC front door and OpenAI-compatible HTTP ingress.

Three deployments composed with `.bind`, so a Serve config file (import path
`cluster.serve.app:build_app` + args) deploys the whole cluster:

- `FleetController` (one replica): starts and owns the drafter/target actors,
  reads their telemetry, steers speculation, replaces dead actors. The actors
  outlive it: if its replica dies, Serve starts another, which adopts them.
- `FrontDoor` (one replica, on the head node so a Kubernetes Service can
  reach a fixed port): the `specfleet.v1.Generation` gRPC server with health
  and reflection and, where the app is built with an `HttpBinding` (`specfleet
  up`), the OpenAI-compatible HTTP API on its own port (cluster/serve/http_door.py).
- `HttpIngress`, where the app is built without one (the Serve config, KubeRay):
  the same HTTP API behind Ray Serve's HTTP proxy.

The HTTP API (cluster/serve/openai_api.py): `/v1/completions`,
`/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`. Both doors run the
same `Frontend` over the controller's fleet: there is one generation path,
whatever the transport.
"""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from cluster.auth import ApiKeys, check_exposure
from cluster.config import ClusterConfig, ServerConfig, TlsConfig, default_config, load_config
from cluster.controller.actor import FleetController
from cluster.controller.client import ControllerClient
from cluster.serve.http_door import HttpBinding, serve_http
from cluster.serve.openai_api import create_api
from cluster.server import start_server

HEAD_NODE = {"node:__internal_head__": 0.001}  # a resource only the Ray head node carries
CONTROLLER_CALLS_IN_FLIGHT = 64  # front doors' polls and finished-request reports; each call is short


class AppArgs(BaseModel):
    """The `args` of the Serve config entry that deploys specfleet."""

    model_config = ConfigDict(extra="forbid")

    config: Path | None = Field(None, description="Cluster config YAML; relative paths resolve against the working directory. None: the embedded zoo.")
    grpc_host: str = Field("0.0.0.0", description="Address the gRPC front door binds.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one (see FrontDoor.grpc_port).")
    api_keys_env: str | None = Field(
        None, description="Environment variable (set on every pod, e.g. from a Kubernetes Secret) holding the API keys, "
        "comma-separated; overrides the cluster config's server.api_keys_env.")
    insecure: bool = Field(
        False, description="Serve a non-loopback grpc_host without API keys: only on a network where every client is trusted.")
    grpc_tls: TlsConfig | None = Field(
        None, description="TLS of the gRPC front door (files on the node that hosts it, e.g. mounted from a Kubernetes "
        "Secret); overrides the cluster config's server.tls. Serve's HTTP proxy takes its TLS from http_options.")


class ServedFleetController(FleetController):
    """The controller as a Serve replica: when Serve stops it (the app deleted or redeployed), its fleet is
    removed with it; when its process dies, the fleet runs on for the replica Serve starts next to adopt."""

    def __del__(self):
        if hasattr(self, "fleet"):  # not if __init__ failed before starting a fleet
            self.shutdown()


class HttpSource:
    """What the HTTP API reads its backend from (cluster/serve/openai_api.py), over the fleet controller."""

    controller: ControllerClient
    server: ServerConfig

    def http_api(self):
        """The FastAPI app, its handlers reaching this instance as `app.state.source`."""
        api = create_api(ApiKeys.from_config(self.server), self.server.protect_metrics, self.server.max_request_bytes)
        api.state.source = self
        return api

    async def frontend(self):
        return await self.controller.frontend()

    async def metrics(self) -> tuple[bytes, str]:
        return await self.controller.metrics()

    async def ready(self) -> bool:
        return await self.controller.ready()


@serve.deployment(ray_actor_options={"resources": HEAD_NODE, "num_cpus": 0})
class FrontDoor(HttpSource):
    async def __init__(self, controller, host: str, port: int, server: ServerConfig, http: HttpBinding | None):
        self.controller, self.server = ControllerClient(controller), server
        fleet = await self.controller.fleet()
        self.grpc_server, self.port = await start_server(fleet, host, port, self.controller)
        if http is not None:
            await serve_http(self.http_api(), http, server.tls)

    async def grpc_port(self) -> int:
        """The bound gRPC port."""
        return self.port


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class HttpIngress(HttpSource):
    def __init__(self, controller, front_door, server: ServerConfig):
        self.controller, self.server = ControllerClient(controller), server
        self.front_door = front_door  # held so the app owns it; `grpc_port` asks it

    def __serve_build_asgi_app__(self):
        return self.http_api()

    async def grpc_port(self) -> int:
        return await self.front_door.grpc_port.remote()


def build_app(args: dict) -> serve.Application:
    """Serve's entry point: `import_path: cluster.serve.app:build_app`."""
    parsed = AppArgs.model_validate(args or {})
    config = load_config(parsed.config) if parsed.config else default_config()
    overrides = {"api_keys_env": parsed.api_keys_env, "tls": parsed.grpc_tls}
    overrides = {field: value for field, value in overrides.items() if value is not None}
    config = config.model_copy(update={"server": config.server.model_copy(update=overrides)})
    check_exposure(parsed.grpc_host, ApiKeys.from_config(config.server), parsed.insecure)
    return build_app_from_config(config, parsed.grpc_host, parsed.grpc_port)


def build_app_from_config(config: ClusterConfig, grpc_host: str = "0.0.0.0", grpc_port: int = 50051,
                          http: HttpBinding | None = None) -> serve.Application:
    """The app; with `http` the front door serves HTTP itself (start Serve with no proxy), else Serve's proxy does."""
    controller = serve.deployment(ServedFleetController, name="FleetController", ray_actor_options={"num_cpus": 0},
                                  max_ongoing_requests=CONTROLLER_CALLS_IN_FLIGHT).bind(config)
    front_door = FrontDoor.bind(controller, grpc_host, grpc_port, config.server, http)
    if http is not None:
        return front_door
    # Serve admits 5 requests per replica by default: every HTTP stream beyond them would wait in the proxy's
    # queue, while gRPC streams reach their front door directly. The front door's own limit is the one that counts.
    ingress = HttpIngress.options(max_ongoing_requests=config.server.max_concurrent_requests)
    return ingress.bind(controller, front_door, config.server)
