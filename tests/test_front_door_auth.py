"""API keys and TLS at both front doors: a real gRPC server and the real FastAPI app, with real clients.

The fleet here has no actors (only what ListModels and /v1/models read): every
check happens before a request reaches one. Generation through keys and TLS end
to end is in tests/serve/test_serve_app.py.
"""

import asyncio
import ssl
import threading

import grpc
import httpx2
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.auth import ApiKeys, check_exposure
from cluster.cli import main
from cluster.client import Credentials, ServerError, stats_remote
from cluster.config import TlsConfig
from cluster.serve.http_door import HttpBinding, serve_http
from cluster.serve.openai_api import create_api
from cluster.server import BackgroundServer
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc
from fake_fleet import Source, fleet_with
from tls_certs import make_certs

KEYS_ENV = "SPECFLEET_TEST_API_KEYS"
KEYS = ("first-key", "second-key")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def keys_in_env(monkeypatch):
    monkeypatch.setenv(KEYS_ENV, ",".join(KEYS))


def tls_server(target_path, certs, client_ca: bool = False) -> BackgroundServer:
    tls = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key),
           "client_ca_file": str(certs.ca) if client_ca else None}
    return BackgroundServer(fleet_with(target_path, {"api_keys_env": KEYS_ENV, "tls": tls}))


def test_grpc_over_tls_needs_a_key_for_generation_calls_but_not_for_health(target_path, certs, keys_in_env):
    server = tls_server(target_path, certs)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
        with grpc.secure_channel(server.address, credentials) as channel:
            stub = pb_grpc.GenerationStub(channel)
            for key in KEYS:
                assert stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", f"Bearer {key}")], timeout=30)
            assert stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", KEYS[0])], timeout=30)
            for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", f"Bearer {KEYS[0]}x")]):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert refused.value.details() == "missing or invalid API key"
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.GenerateStream(pb.GenerateRequest(model="small", text="x"), timeout=30))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(ServerError, match="UNAUTHENTICATED"):  # the CLI's client, with its credentials
            stats_remote(server.address, 30, Credentials("wrong", certs.ca))
        with pytest.raises(ServerError, match="UNIMPLEMENTED"):  # past the key check: this server has no controller
            stats_remote(server.address, 30, Credentials(KEYS[1], certs.ca))
        with grpc.insecure_channel(server.address) as plaintext:
            with pytest.raises(grpc.RpcError) as failed:
                pb_grpc.GenerationStub(plaintext).ListModels(pb.ListModelsRequest(), timeout=5)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(target_path, certs, keys_in_env):
    server = tls_server(target_path, certs, client_ca=True)
    metadata = [("authorization", f"Bearer {KEYS[0]}")]
    try:
        with_certificate = grpc.ssl_channel_credentials(certs.ca.read_bytes(), certs.client_key.read_bytes(),
                                                        certs.client_cert.read_bytes())
        with grpc.secure_channel(server.address, with_certificate) as channel:
            assert pb_grpc.GenerationStub(channel).ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30)
        without = grpc.ssl_channel_credentials(certs.ca.read_bytes())
        with grpc.secure_channel(server.address, without) as channel:
            with pytest.raises(grpc.RpcError) as failed:
                pb_grpc.GenerationStub(channel).ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


@pytest.mark.parametrize("protect_metrics", [False, True])
def test_http_routes_need_a_bearer_key_except_health(target_path, protect_metrics):
    api = create_api(ApiKeys(KEYS), protect_metrics)
    api.state.source = Source(fleet_with(target_path, {}))
    client = TestClient(api)
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEYS[1]}"}).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS[0][:-1]}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            reply = client.request(method, path, headers=headers, json={"model": "small", "prompt": "x"})
            assert reply.status_code == 401, (method, path, headers)
            assert reply.json()["error"]["code"] == "invalid_api_key"
            assert reply.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == (401 if protect_metrics else 200)


def test_keys_come_from_a_file_and_an_environment_variable(tmp_path, target_path, keys_in_env):
    key_file = tmp_path / "keys"
    key_file.write_text("# operators' keys\nfile-key\n\n  spaced-key  \n")
    server = fleet_with(target_path, {"api_keys_file": str(key_file), "api_keys_env": KEYS_ENV}).config.server
    keys = ApiKeys.from_config(server)
    assert all(keys.allows(f"Bearer {key}") for key in ("file-key", "spaced-key", *KEYS))
    assert not keys.allows("Bearer # operators' keys") and not keys.allows("") and not keys.allows(None)
    assert ApiKeys.from_config(fleet_with(target_path, {}).config.server) is None
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="none was found"):
        ApiKeys.from_config(fleet_with(target_path, {"api_keys_file": str(empty)}).config.server)


def test_serving_beyond_loopback_needs_keys_or_an_explicit_insecure():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(host, None, insecure=False)
    with pytest.raises(ValueError, match="refusing to serve on 0.0.0.0 without API keys"):
        check_exposure("0.0.0.0", None, insecure=False)
    check_exposure("0.0.0.0", None, insecure=True)
    check_exposure("10.1.2.3", ApiKeys(["k"]), insecure=False)


def test_the_health_command_checks_a_tls_door_as_a_kubernetes_exec_probe_would(target_path, certs, keys_in_env, capsys):
    """`specfleet health` (the manifests' liveness probe) needs no key; the certificate's name can be given apart."""
    server = tls_server(target_path, certs)
    port = server.address.rsplit(":", 1)[1]
    try:
        probe = ["health", "--server", f"127.0.0.1:{port}", "--tls-ca", str(certs.ca)]
        assert main([*probe, "--tls-server-name", "localhost"]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        assert main([*probe, "--tls-server-name", "another-name", "--timeout", "3"]) == 2  # the name is checked
        assert "UNAVAILABLE" in capsys.readouterr().err
    finally:
        server.stop()


class HttpDoor:
    """The front door's HTTP server (uvicorn, as `specfleet up` runs it) on its own event-loop thread."""

    def __init__(self, app, tls: TlsConfig | None):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        serving = serve_http(app, HttpBinding(host="127.0.0.1", port=0), tls)
        self.server, self.port = asyncio.run_coroutine_threadsafe(serving, self.loop).result(30)

    def stop(self) -> None:
        self.server.should_exit = True
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.5), self.loop).result(10)  # uvicorn checks every 0.1 s
        self.loop.call_soon_threadsafe(self.loop.stop)


def http_door(target_path, certs, client_ca: bool) -> HttpDoor:
    api = create_api(ApiKeys(KEYS))
    api.state.source = Source(fleet_with(target_path, {}))
    return HttpDoor(api, TlsConfig(cert_file=certs.server_cert, key_file=certs.server_key,
                                   client_ca_file=certs.ca if client_ca else None))


def test_the_front_doors_http_server_speaks_tls_and_asks_for_keys(target_path, certs):
    door = http_door(target_path, certs, client_ca=False)
    url = f"https://127.0.0.1:{door.port}"
    try:
        with httpx2.Client(verify=ssl.create_default_context(cafile=certs.ca), timeout=30) as client:
            assert client.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()["data"]
            refused = client.post(f"{url}/v1/completions", json={"model": "small", "prompt": "x"})
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            assert client.get(f"{url}/health").status_code == 200
        with pytest.raises(httpx2.HTTPError):  # plaintext to the TLS port
            httpx2.get(f"http://127.0.0.1:{door.port}/health", timeout=10)
    finally:
        door.stop()


def test_the_front_doors_http_server_admits_only_clients_with_a_certificate_from_the_ca(target_path, certs):
    door = http_door(target_path, certs, client_ca=True)
    url, key = f"https://127.0.0.1:{door.port}/v1/models", {"Authorization": f"Bearer {KEYS[0]}"}
    try:
        with_certificate = ssl.create_default_context(cafile=certs.ca)
        with_certificate.load_cert_chain(certs.client_cert, certs.client_key)
        assert httpx2.get(url, headers=key, verify=with_certificate, timeout=30).status_code == 200
        with pytest.raises(httpx2.HTTPError):
            httpx2.get(url, headers=key, verify=ssl.create_default_context(cafile=certs.ca), timeout=10)
    finally:
        door.stop()


def test_a_taken_port_is_an_error_of_the_caller_not_the_end_of_the_process(target_path, certs):
    door = http_door(target_path, certs, client_ca=False)
    try:
        with pytest.raises(OSError):
            asyncio.run(serve_http(create_api(), HttpBinding(host="127.0.0.1", port=door.port), None))
    finally:
        door.stop()
