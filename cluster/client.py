"""A small gRPC client of the Generation service, for `specfleet generate --server`."""

import grpc

from actors.errors import SpecfleetError
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc


class ServerError(SpecfleetError):
    """The server refused or failed a call; the message carries the gRPC status."""


def generate_remote(address: str, request: pb.GenerateRequest, timeout_s: float) -> pb.GenerateResponse:
    return _call(address, "Generate", request, timeout_s)


def stats_remote(address: str, timeout_s: float) -> pb.GetStatsResponse:
    return _call(address, "GetStats", pb.GetStatsRequest(), timeout_s)


def _call(address: str, method: str, request, timeout_s: float):
    with grpc.insecure_channel(address) as channel:
        try:
            return getattr(pb_grpc.GenerationStub(channel), method)(request, timeout=timeout_s)
        except grpc.RpcError as err:
            raise ServerError(f"{err.code().name}: {err.details()}") from None
