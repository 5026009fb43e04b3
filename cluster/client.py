"""A small gRPC client of the Generation service, for `specfleet generate --server`, `status` and `health`."""

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actors.errors import SpecfleetError
from cluster.auth import AUTHORIZATION
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc


class ServerError(SpecfleetError):
    """The server refused or failed a call; the message carries the gRPC status."""


API_KEY_ENV = "SPECFLEET_API_KEY"


@dataclass(frozen=True)
class Credentials:
    """How a client proves itself and checks the server: an API key, and a CA for a server on TLS."""

    api_key: str | None = None
    tls_ca: Path | None = None  # None: plaintext
    tls_server_name: str | None = None  # the name the server's certificate must carry, if not the address's host

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Credentials":
        return cls(getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None, args.tls_ca, args.tls_server_name)


def add_credential_arguments(parser: argparse.ArgumentParser, api_key: bool = True) -> None:
    if api_key:
        parser.add_argument("--api-key", help=f"API key of the server (default: ${API_KEY_ENV})")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA of a server that serves TLS (default: plaintext)")
    parser.add_argument("--tls-server-name", help="name the server's certificate carries, when the address is not it "
                        "(e.g. a probe inside the pod connecting to 127.0.0.1)")


def generate_remote(address: str, request: pb.GenerateRequest, timeout_s: float,
                    credentials: Credentials = Credentials()) -> pb.GenerateResponse:
    return _call(address, "Generate", request, timeout_s, credentials)


def stats_remote(address: str, timeout_s: float, credentials: Credentials = Credentials()) -> pb.GetStatsResponse:
    return _call(address, "GetStats", pb.GetStatsRequest(), timeout_s, credentials)


def health_remote(address: str, timeout_s: float, credentials: Credentials = Credentials()) -> str:
    """The server's standard gRPC health status ("SERVING", "NOT_SERVING", ...); health needs no API key."""
    reply = _call(address, "Check", health_pb2.HealthCheckRequest(), timeout_s, credentials, health_pb2_grpc.HealthStub)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _call(address: str, method: str, request, timeout_s: float, credentials: Credentials,
          stub=pb_grpc.GenerationStub):
    metadata = [(AUTHORIZATION, f"Bearer {credentials.api_key}")] if credentials.api_key else None
    with _channel(address, credentials) as channel:
        try:
            return getattr(stub(channel), method)(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as err:
            raise ServerError(f"{err.code().name}: {err.details()}") from None


def _channel(address: str, credentials: Credentials) -> grpc.Channel:
    if credentials.tls_ca is None:
        return grpc.insecure_channel(address)
    options = [("grpc.ssl_target_name_override", credentials.tls_server_name)] if credentials.tls_server_name else None
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(credentials.tls_ca.read_bytes()), options=options)
