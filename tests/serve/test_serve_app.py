"""The Serve application deployed from deploy/serve/specfleet.yaml, reached by real clients.

The official `openai` client (completions and chat, streaming and not), the
gRPC front door of the same app, 32 concurrent HTTP streams, and the memory
of every actor after them. The app serves the embedded zoo, over TLS (a CA made
by the test) and with API keys on both doors.
"""

import asyncio
import importlib
import os
import socket
import ssl
from pathlib import Path

import grpc
import httpx2
import openai
import pytest
import ray
import yaml
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from actors.generator import SpeculativeGenerator
from actors.loading import load_tokenizer
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from cluster.config import TlsConfig, load_config
from cluster.up_run import https_options, local_ray_resources
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc
from tls_certs import make_certs

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "deploy" / "serve" / "specfleet.yaml"
PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef main(", "class Stack:\n    def push(self,", "for key, value in"]
MAX_TOKENS = 16
KEYS_ENV, API_KEY = "SPECFLEET_TEST_API_KEYS", "serve-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def app(certs, tmp_path_factory):
    """Deploy the Serve config's application as `serve deploy` would, on free ports, with its cluster config
    plus TLS on both doors and API keys from an environment variable (set before Ray starts its workers)."""
    os.chdir(REPO)  # the config's relative paths resolve against the working directory
    entry = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]
    config = load_config(entry["args"]["config"])
    tls = TlsConfig(cert_file=certs.server_cert, key_file=certs.server_key)
    config_path = tmp_path_factory.mktemp("config") / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config.model_copy(update={"server": config.server.model_copy(
        update={"tls": tls})}).model_dump(mode="json")))
    args = {**entry["args"], "config": str(config_path), "grpc_host": "127.0.0.1", "grpc_port": 0, "api_keys_env": KEYS_ENV}
    http_port = free_port()
    os.environ[KEYS_ENV] = f"{API_KEY},another-key"
    ray.init(address="local", **local_ray_resources(config))  # never join a `ray start` cluster
    serve.start(http_options={"host": "127.0.0.1", "port": http_port, "location": "HeadOnly", **https_options(tls)})
    module, builder = entry["import_path"].split(":")
    ingress = serve.run(getattr(importlib.import_module(module), builder)(args), name=entry["name"],
                        route_prefix=entry["route_prefix"])
    yield {"http": f"https://127.0.0.1:{http_port}/v1", "grpc": f"127.0.0.1:{ingress.grpc_port.remote().result()}",
           "config": config, "ca": certs.ca}
    serve.shutdown()
    ray.shutdown()
    del os.environ[KEYS_ENV]


@pytest.fixture(scope="module")
def expected_text(app):
    """target-l's own plain greedy completion of each prompt, in this process."""
    path = app["config"].targets["target-l"].path
    tokenizer = load_tokenizer(path)
    params = make_sampling_params(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    results = SpeculativeGenerator(ModelRunner.from_pretrained(path)).generate(prompts, params)
    return {prompt: tokenizer.decode(r.tokens) for prompt, r in zip(PROMPTS, results)}


@pytest.fixture(scope="module")
def client(app):
    return openai_client(app, API_KEY)


def openai_client(app, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=app["http"], api_key=api_key, max_retries=0, timeout=300,
                         http_client=httpx2.Client(verify=ssl.create_default_context(cafile=app["ca"])))


def grpc_channel(app) -> grpc.Channel:
    return grpc.secure_channel(app["grpc"], grpc.ssl_channel_credentials(app["ca"].read_bytes()))


def complete(client, prompt: str, **extra):
    return client.completions.create(model="target-l", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True}, **extra)


def test_completions_equal_the_targets_own_greedy_output(client, expected_text):
    for prompt in PROMPTS[:2]:
        response = complete(client, prompt)
        assert response.choices[0].text == expected_text[prompt]
        assert response.usage.completion_tokens == MAX_TOKENS


def test_streamed_completion_concatenates_to_the_same_text(client, expected_text):
    chunks = list(complete(client, PROMPTS[2], stream=True))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text[PROMPTS[2]]


def test_chat_streaming_and_not_agree(client):
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    whole = client.chat.completions.create(model="target-m", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    chunks = client.chat.completions.create(model="target-m", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content and streamed == whole.choices[0].message.content


def test_models_and_errors(client):
    assert {m.id for m in client.models.list()} == {"target-s", "target-m", "target-l", "target-xl"}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="target-s", prompt="x", max_tokens=4, temperature=-1)


def test_grpc_front_door_of_the_same_app(app, expected_text):
    request = pb.GenerateRequest(model="target-l", text=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    with grpc_channel(app) as channel:
        stub = pb_grpc.GenerationStub(channel)
        response = stub.Generate(request, timeout=300, metadata=[("authorization", f"Bearer {API_KEY}")])
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(request, timeout=300)
    assert response.text == expected_text[PROMPTS[0]]
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_wrong_or_missing_key_gets_401_on_every_generation_route_and_health_stays_open(app):
    bad = openai_client(app, "wrong-key")
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="target-s", prompt="x", max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="target-s", messages=[{"role": "user", "content": "x"}], max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with httpx2.Client(verify=ssl.create_default_context(cafile=app["ca"]), timeout=30) as http:  # no key at all
        for path in ("/v1/completions", "/v1/chat/completions"):
            assert http.post(app["http"].removesuffix("/v1") + path, json={"model": "target-s"}).status_code == 401
        assert http.get(app["http"] + "/models").status_code == 401
        assert http.get(app["http"].removesuffix("/v1") + "/health").status_code == 200


async def _stream_wave(base_url: str, ca: Path, count: int) -> list[str]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=600,
                                http_client=httpx2.AsyncClient(verify=ssl.create_default_context(cafile=ca)))

    async def one(i: int) -> str:
        stream = await client.completions.create(model="target-l", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    try:
        return await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await client.close()


def _actor_memory(app) -> dict[str, int]:
    """Private resident memory (bytes) of every drafter and target actor process, and their live sequences."""
    controller = serve.get_deployment_handle("FleetController", app_name="specfleet")
    _, fleet = controller.snapshot.remote().result()
    memory, live = {}, 0
    for name, infos in fleet.infos.items():
        for i, info in enumerate(infos):
            memory[f"{name}/{i}"] = _rss(info["pid"])
    for handle in fleet.all_handles():
        live += ray.get(handle.live_sequences.remote())
    return memory | {"live_sequences": live}


def _rss(pid: int) -> int:
    """The process's own resident memory (RssAnon): Ray's shared-memory object store pages mapped in are left out."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) * 1024


@pytest.fixture(scope="module")
def waves(app, expected_text) -> list[tuple[list[str], dict]]:
    """Three waves of 32 concurrent streams: each wave's texts and the actors' memory after it."""
    return [(asyncio.run(_stream_wave(app["http"], app["ca"], 32)), _actor_memory(app)) for _ in range(3)]


def test_32_concurrent_streams_complete_correctly_and_free_every_sequence(waves, expected_text):
    expected = [expected_text[PROMPTS[i % len(PROMPTS)]] for i in range(32)]
    for texts, memory in waves:
        assert texts == expected
        assert memory["live_sequences"] == 0  # every sequence freed on every actor


def test_memory_stays_flat_after_a_warm_up_wave(waves):
    """The first wave warms allocators up; the third may add no more than noise to any actor.

    The drafter used to grow 60-100 MiB per wave (364 / 459 / 519 MiB): its forwards ran on whichever of
    the actor's 256 threads called, each keeping memory of its own (see `actors.draft_batcher`).
    """
    (_, _), (_, second), (_, third) = waves
    for actor, rss in third.items():
        if actor != "live_sequences":
            assert rss < second[actor] + 32 * 2**20, f"{actor}: {second[actor] >> 20} -> {rss >> 20} MiB"


def test_metrics_endpoint_counts_the_requests(app):
    asyncio.run(asyncio.sleep(2.5))  # at least one control step collects the rounds
    ca = ssl.create_default_context(cafile=app["ca"])
    text = httpx2.get(app["http"].removesuffix("/v1") + "/metrics", verify=ca, timeout=30).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    requests = sum(s.value for s in samples if s.name == "specfleet_requests_total")
    rounds = sum(s.value for s in samples if s.name == "specfleet_rounds_total" and s.labels.get("target") == "target-l")
    assert requests >= 64 and rounds > 0
