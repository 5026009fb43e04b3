"""The OpenAI-compatible HTTP API served by the front-door replica itself, beside its gRPC server.

Through Ray Serve's HTTP proxy a streamed completion crosses three Ray hops
besides the generation's own: the proxy hands the request to the ingress
replica, the replica fetches the body back from the proxy, and every chunk goes
back to the proxy as a Ray object. On a two-core machine that was about 30 ms
per request when idle (a one-token completion 60-80 ms against gRPC's 32) and,
under load, a Ray object per chunk on the control CPU (HTTP's time to first
token 2.2x gRPC's at 16 streams). Served here, on the front door's own event
loop over the same `Frontend` as gRPC, a one-token completion took 35-39 ms.

Serve's proxy stays the HTTP path of a Serve config deployment (KubeRay), where
its per-node proxies and KubeRay's readiness checks need it (`HttpIngress`).
"""

import asyncio
import socket
import ssl

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from cluster.config import TlsConfig

STARTUP_TIMEOUT_S = 30.0
_serving: set[asyncio.Task] = set()  # the servers' tasks, kept referenced: the loop holds its tasks only weakly


class HttpBinding(BaseModel):
    """Where and how the front door serves HTTP."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(description="Address the HTTP door binds.")
    port: int = Field(ge=0, le=65535, description="HTTP port; 0 picks a free one (`serve_http` returns which).")
    access_log: bool = Field(False, description="Log one line per HTTP request.")


async def serve_http(app: FastAPI, binding: HttpBinding, tls: TlsConfig | None) -> tuple[uvicorn.Server, int]:
    """Serve `app` on the running event loop; returns the server (set `should_exit` to stop it) and its bound port.

    The socket is bound here, so a port already taken raises OSError in the caller
    instead of ending the process as uvicorn's own binding would.
    """
    family = socket.AF_INET6 if ":" in binding.host else socket.AF_INET
    listener = socket.create_server((binding.host, binding.port), family=family, backlog=2048)
    config = uvicorn.Config(app, log_config=None, access_log=binding.access_log, lifespan="off", **_ssl_options(tls))
    server = uvicorn.Server(config)
    serving = asyncio.get_running_loop().create_task(server.serve(sockets=[listener]))
    _serving.add(serving)
    serving.add_done_callback(_serving.discard)
    async with asyncio.timeout(STARTUP_TIMEOUT_S):
        while not server.started:
            if serving.done():
                serving.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
    return server, listener.getsockname()[1]


def _ssl_options(tls: TlsConfig | None) -> dict:
    """uvicorn's TLS settings; with a client CA, clients must present a certificate it signed (mutual TLS)."""
    if tls is None:
        return {}
    options = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
    if tls.client_ca_file is not None:
        options |= {"ssl_ca_certs": str(tls.client_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options
