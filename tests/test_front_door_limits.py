"""Limits at both front doors, checked before any work: body bytes, prompt characters, max_tokens.

A real gRPC server and the real FastAPI app over a fleet without actors: each
request here is refused before it would reach one.
"""

import time

import grpc
import pytest
from fastapi.testclient import TestClient

from cluster.serve.openai_api import create_api
from cluster.server import BackgroundServer
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc
from fake_fleet import Source, fleet_with

LIMITS = {"max_request_bytes": 1 << 20, "max_prompt_chars": 50_000, "max_tokens_limit": 32}


@pytest.fixture(scope="module")
def http(target_path):
    api = create_api(max_request_bytes=LIMITS["max_request_bytes"])
    api.state.source = Source(fleet_with(target_path, LIMITS))
    return TestClient(api)


@pytest.fixture(scope="module")
def stub(target_path):
    server = BackgroundServer(fleet_with(target_path, LIMITS))
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GenerationStub(channel)
    server.stop()


def test_a_50_mb_body_gets_413_before_it_is_read(http):
    started = time.monotonic()
    reply = http.post("/v1/completions", content=b"x" * (50 << 20), headers={"content-type": "application/json"})
    assert reply.status_code == 413 and time.monotonic() - started < 1.0
    assert reply.json()["error"]["message"] == "request body exceeds this server's limit of 1048576 bytes"
    assert reply.headers["connection"] == "close"  # the server stops the upload instead of reading it to drop it


def test_a_body_without_a_declared_length_is_cut_off_at_the_limit(http):
    chunks = (b" " * 65536 for _ in range(64))  # 4 MiB, sent chunked
    reply = http.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert reply.status_code == 413


def test_prompt_characters_and_max_tokens_are_checked_before_tokenizing(http, stub):
    long_text = "x" * (LIMITS["max_prompt_chars"] + 1)
    reply = http.post("/v1/completions", json={"model": "small", "prompt": long_text, "max_tokens": 4})
    assert reply.status_code == 400 and "exceeds this server's limit of 50000" in reply.json()["error"]["message"]
    reply = http.post("/v1/completions", json={"model": "small", "prompt": "def f():", "max_tokens": 33})
    assert reply.status_code == 400 and "max_tokens 33 exceeds this server's limit of 32" in reply.json()["error"]["message"]
    for request, message in ((pb.GenerateRequest(model="small", text=long_text), "characters exceeds"),
                             (pb.GenerateRequest(model="small", text="def f():", max_tokens=33), "max_tokens 33")):
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in refused.value.details()


def test_a_grpc_message_above_the_limit_is_refused(stub):
    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(pb.GenerateRequest(model="small", text="x" * (2 << 20)), timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
