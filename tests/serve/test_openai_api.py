"""The OpenAI-compatible HTTP API against a real fleet on a local Ray instance (no Serve).

The app from `create_api()` runs in FastAPI's TestClient over a real `Frontend`;
outputs are checked against the target decoding alone in this process.
"""

import dataclasses
import http.client
import json
import re
import threading
import time

import openai
import pytest
import ray
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST

from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from cluster.auth import ApiKeys
from cluster.config import parse_config
from cluster.frontend import Frontend
from cluster.metrics import SpecfleetMetrics
from cluster.placement import start_fleet, stop_fleet
from cluster.serve.chat import ChatMessage, render_chat
from cluster.serve.openai_api import create_api

MAX_TOKENS = 24
PROMPT = "def add(a, b):"


class FleetSource:
    """What the Serve deployment gives the app: the frontend, Prometheus metrics and readiness."""

    def __init__(self, fleet):
        self.observed = SpecfleetMetrics()
        self._frontend = Frontend(fleet, self.observed)
        self.is_ready = True

    async def frontend(self) -> Frontend:
        return self._frontend

    async def metrics(self) -> tuple[bytes, str]:
        return self.observed.render(), self.observed.content_type

    async def ready(self) -> bool:
        return self.is_ready

    def cancelled_requests(self) -> float:
        """Requests the frontend saw end before their sequence finished."""
        registry = self.observed.registry
        return sum(registry.get_sample_value("specfleet_requests_total", {"target": model, "outcome": "cancelled"}) or 0
                   for model in ("small", "solo"))


@pytest.fixture(scope="module")
def fleet(target_path, drafter_path):
    ray.init(address="local", num_cpus=2, resources={"draft": 4, "target": 4}, include_dashboard=False)
    config = parse_config({
        "pools": {"draft": {"resources": {"draft": 1}, "num_cpus": 0.5},
                  "target": {"resources": {"target": 1}, "num_cpus": 0.5}},
        "drafters": {"sorted": {"path": str(drafter_path), "pool": "draft"}},
        "targets": {"small": {"path": str(target_path), "pool": "target", "drafter": "sorted", "exit_layer": 2, "k": 3},
                    "solo": {"path": str(target_path), "pool": "target"}},
        "server": {"drafter_timeout_s": 5},
        "controller": {"tree_choices": ["dynamic-3x2"]},  # its replicas serve token trees too
    })
    fleet = start_fleet(config)
    yield fleet
    stop_fleet(fleet)
    ray.shutdown()


@pytest.fixture(scope="module")
def source(fleet):
    return FleetSource(fleet)


@pytest.fixture(scope="module")
def client(source):
    app = create_api()
    app.state.source = source
    with TestClient(app) as client:
        yield client


def local_decode(target_path, prompt_ids: list[int], **sampling) -> list[int]:
    """The target alone, decoding in this process (no drafter, no Ray)."""
    params = make_sampling_params(max_tokens=MAX_TOKENS, ignore_eos=True, **{"temperature": 0.0, **sampling})
    return SpeculativeGenerator(ModelRunner.from_pretrained(target_path)).generate([prompt_ids], params)[0].tokens


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def expected(target_path, tokenizer) -> list[int]:
    return local_decode(target_path, ids(tokenizer, PROMPT))


def completion(**fields) -> dict:
    return {"model": "small", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **fields}


def chat(**fields) -> dict:
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
    return {"model": "small", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, **fields}


def events(response) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event."""
    parsed = []
    for block in response.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        parsed.append((fields.get("event"), fields["data"]))
    return parsed


def chunks(response) -> list[dict]:
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    parsed = events(response)
    assert parsed[-1] == (None, "[DONE]")
    return [json.loads(data) for _, data in parsed[:-1]]


def wait_until(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_greedy_completion_equals_local_plain_decoding(client, tokenizer, expected):
    for prompt in (PROMPT, ids(tokenizer, PROMPT)):
        response = client.post("/v1/completions", json=completion(prompt=prompt))
        assert response.status_code == 200, response.text
        body = response.json()
        choice = body["choices"][0]
        assert choice["token_ids"] == expected and choice["prompt_token_ids"] == ids(tokenizer, PROMPT)
        assert choice["text"] == tokenizer.decode(expected) and choice["finish_reason"] == "length"
        assert body["object"] == "text_completion" and body["model"] == "small" and body["id"].startswith("cmpl-")
        prompt_tokens = len(ids(tokenizer, PROMPT))
        assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": MAX_TOKENS,
                                 "total_tokens": prompt_tokens + MAX_TOKENS}
        assert body["speculation"]["drafter"] == "sorted" and body["speculation"]["drafted"] > 0


def test_streamed_chunks_concatenate_to_the_whole_text(client, tokenizer, expected):
    whole = client.post("/v1/completions", json=completion()).json()["choices"][0]["text"]
    parts = chunks(client.post("/v1/completions", json=completion(stream=True, stream_options={"include_usage": True})))
    *text_chunks, usage_chunk = parts
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == whole == tokenizer.decode(expected)
    assert [t for c in text_chunks for t in c["choices"][0]["token_ids"]] == expected
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in text_chunks)
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == "length"
    assert text_chunks[-1]["speculation"]["drafter"] == "sorted" and text_chunks[-1]["speculation"]["drafted"] > 0
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == MAX_TOKENS
    assert len({c["id"] for c in parts}) == 1


def test_a_stream_without_include_usage_has_no_usage_chunk(client):
    parts = chunks(client.post("/v1/completions", json=completion(stream=True, max_tokens=4)))
    assert parts[-1]["choices"][0]["finish_reason"] == "length" and all("usage" not in c for c in parts)


def test_chat_completion_continues_the_templated_conversation(client, tokenizer, target_path):
    prompt = render_chat([ChatMessage(role="system", content="You write Python."),
                          ChatMessage(role="user", content="Add two numbers.")])
    assert prompt == "System: You write Python.\n\nUser: Add two numbers.\n\nAssistant:"
    reply = tokenizer.decode(local_decode(target_path, ids(tokenizer, prompt)))
    reply = reply[:reply.find("\nUser:")] if "\nUser:" in reply else reply
    body = client.post("/v1/chat/completions", json=chat()).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": reply}
    parts = chunks(client.post("/v1/chat/completions", json=chat(stream=True)))
    assert parts[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in parts) == reply
    assert all(c["object"] == "chat.completion.chunk" for c in parts)
    assert parts[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]


def test_chat_accepts_text_parts_and_max_completion_tokens(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Add "}, {"type": "text", "text": "two numbers."}]}]
    body = client.post("/v1/chat/completions", json=chat(messages=messages, max_tokens=None, max_completion_tokens=5)).json()
    as_string = chat(messages=[{"role": "user", "content": "Add two numbers."}], max_tokens=5)
    assert body["choices"][0]["message"] == client.post("/v1/chat/completions", json=as_string).json()["choices"][0]["message"]
    assert body["usage"]["completion_tokens"] <= 5


def test_a_stop_string_ends_the_completion_before_it_and_frees_the_sequence(client, tokenizer, expected, fleet):
    text = tokenizer.decode(expected)
    stop = text[10:13]
    cut = text[:text.find(stop)]
    whole = client.post("/v1/completions", json=completion(stop=[stop, "never appears"])).json()["choices"][0]
    assert whole["text"] == cut and whole["finish_reason"] == "stop"
    assert tokenizer.decode(whole["token_ids"]).startswith(cut + stop)
    parts = chunks(client.post("/v1/completions", json=completion(stop=stop, stream=True)))
    assert "".join(c["choices"][0]["text"] for c in parts) == cut and parts[-1]["choices"][0]["finish_reason"] == "stop"
    assert wait_until(lambda: ray.get(fleet.targets["small"][0].live_sequences.remote()) == 0)


def test_speculation_extension_turns_speculation_off_or_fixes_it(client, expected):
    off = client.post("/v1/completions", json=completion(speculation={"mode": "off"})).json()
    assert off["choices"][0]["token_ids"] == expected
    assert off["speculation"]["drafted"] == 0 and off["speculation"]["drafter"] == ""
    fixed = client.post("/v1/completions", json=completion(speculation={"mode": "fixed", "exit_layer": 4, "k": 5})).json()
    assert fixed["choices"][0]["token_ids"] == expected
    assert (fixed["speculation"]["drafter"], fixed["speculation"]["exit_layer"], fixed["speculation"]["k"]) == ("sorted", 4, 5)
    tree = client.post("/v1/completions", json=completion(speculation={"mode": "fixed", "tree": "dynamic-3x2"})).json()
    assert tree["choices"][0]["token_ids"] == expected
    assert (tree["speculation"]["tree"], tree["speculation"]["k"]) == ("dynamic-3x2", 6)


def test_temperature_defaults_to_one_as_openai(client, tokenizer, target_path, expected):
    """Unset temperature samples at 1.0: seeded plain decoding matches the local sampler drawing the same stream."""
    body = completion(speculation={"mode": "off"}, seed=7)
    del body["temperature"]
    tokens = client.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]
    assert tokens == local_decode(target_path, ids(tokenizer, PROMPT), temperature=1.0, seed=7)
    assert tokens != expected


def test_model_list_names_the_targets(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert set(cards) == {"small", "solo"} and all(card["object"] == "model" for card in cards.values())
    assert cards["small"]["max_model_len"] == 256
    assert cards["small"]["speculation"] == {"drafter": "sorted", "exit_layer": 2, "k": 3}
    assert cards["solo"]["speculation"] == {"drafter": None, "exit_layer": None, "k": 0}


def test_health_follows_readiness(client, source):
    assert client.get("/health").status_code == 200
    source.is_ready = False
    try:
        response = client.get("/health")
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
    finally:
        source.is_ready = True


def test_metrics_serve_the_sources_prometheus_text(client):
    client.post("/v1/completions", json=completion(max_tokens=2))
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"] == CONTENT_TYPE_LATEST
    assert 'specfleet_requests_total{outcome="length",target="small"}' in response.text


BAD_COMPLETIONS = [
    ({"prompt": ""}, 400, "prompt is empty", None),
    ({"prompt": []}, 400, "prompt is empty", None),
    ({"model": "nope"}, 404, "unknown model 'nope'", "model"),
    ({"max_tokens": 400}, 400, "exceeds the model's context", None),
    ({"max_tokens": 0}, 400, "greater than or equal to 1", "max_tokens"),
    ({"max_tokens": 2**40}, 400, "less than", "max_tokens"),
    ({"temperature": -1}, 400, "temperature", None),
    ({"top_p": 0}, 400, "top_p", None),
    ({"prompt": [1, "a"]}, 400, "list of token ids", "prompt"),
    ({"prompt": [1, 2.5]}, 400, "list of token ids", "prompt"),
    ({"prompt": [-4]}, 400, "token ids must lie in", None),
    ({"prompt": [2**64]}, 400, "list of token ids", "prompt"),
    ({"prompt": [[1, 2]]}, 400, "batches are not supported", "prompt"),
    ({"prompt": ["a", "b"]}, 400, "batches are not supported", "prompt"),
    ({"n": 2}, 400, "only n = 1", "n"),
    ({"max_tokens": "16"}, 400, "valid integer", "max_tokens"),
    ({"temperature": "hot"}, 400, "valid number", "temperature"),
    ({"stream": "yes"}, 400, "valid boolean", "stream"),
    ({"seed": -1}, 400, "greater than or equal to 0", "seed"),
    ({"echo": True}, 400, "does not support echo", "echo"),
    ({"logprobs": 2}, 400, "does not support logprobs", "logprobs"),
    ({"tools": []}, 400, "does not support this parameter", "tools"),
    ({"stop": ["a", ""]}, 400, "stop strings", "stop"),
    ({"stream_options": {"include_usage": True}}, 400, "only allowed with stream", None),
    ({"speculation": {"mode": "fixed", "k": 2, "exit_layer": 9}}, 400, "exit 9 is not one of the exits the drafter was trained for", None),
    ({"speculation": {"mode": "fixed", "k": 2, "exit_layer": 9}, "stream": True}, 400, "exit 9 is not one of the exits the drafter was trained for", None),
    ({"speculation": {"mode": "sideways"}}, 400, "speculation.mode", "speculation.mode"),
    ({"speculation": {"k": 2}}, 400, "only with mode 'fixed'", "speculation"),
    ({"speculation": {"mode": "fixed", "tree": "dynamic-9x9"}}, 400, "a tree has 1..16 levels", None),
    ({"speculation": {"mode": "fixed", "tree": "static-2x2", "k": 3}}, 400, "k or a tree, not both", None),
    ({"model": "solo", "speculation": {"mode": "fixed", "k": 2}}, 400, "no drafter", None),
]


@pytest.mark.parametrize("change, status, message, param", BAD_COMPLETIONS)
def test_bad_completions_get_openai_errors_and_the_app_keeps_serving(client, expected, change, status, message, param):
    response = client.post("/v1/completions", json=completion(**change))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param
    assert not re.search(r"pid=|actor_id|ip=|Traceback|/site-packages/", response.text)
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
    assert client.post("/v1/completions", json=completion()).json()["choices"][0]["token_ids"] == expected


@pytest.mark.parametrize(
    "change, message, param",
    [
        ({"messages": []}, "at least 1 item", "messages"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0.role", "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content", None),
        ({"max_completion_tokens": 4}, "not both", None),
        ({"model": "nope"}, "unknown model", "model"),
    ],
)
def test_bad_chat_requests_get_openai_errors(client, change, message, param):
    response = client.post("/v1/chat/completions", json=chat(**change))
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert param is None or error["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
def test_bodies_that_are_not_a_json_object_get_400(client, raw):
    response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_routes_get_openai_errors(client):
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["message"] == "Not Found"
    response = client.get("/v1/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_client_leaving_mid_stream_cancels_its_sequence(client, source, fleet):
    target, drafter = fleet.targets["small"][0], fleet.drafters["sorted"][0]
    cancelled = source.cancelled_requests()
    with client.stream("POST", "/v1/completions", json=completion(max_tokens=200, stream=True)) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert ray.get(target.live_sequences.remote()) == 1 and ray.get(drafter.live_sequences.remote()) == 1
    assert wait_until(lambda: source.cancelled_requests() == cancelled + 1)  # the frontend saw it end unfinished
    assert wait_until(lambda: ray.get(target.live_sequences.remote()) == 0)
    assert wait_until(lambda: ray.get(drafter.live_sequences.remote()) == 0)


@pytest.fixture(scope="module")
def http_port(source):
    """The app behind a real HTTP server, whose connections can really drop."""
    app = create_api()
    app.state.source = source
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    assert wait_until(lambda: server.started)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(30)


def test_the_openai_client_reads_completions_streams_and_errors(http_port, tokenizer, expected):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0)
    extra = {"ignore_eos": True, "speculation": {"mode": "fixed", "exit_layer": 2, "k": 4}}
    reply = client.completions.create(model="small", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra)
    assert reply.choices[0].text == tokenizer.decode(expected) and reply.usage.completion_tokens == MAX_TOKENS
    assert reply.model_extra["speculation"]["k"] == 4
    stream = client.completions.create(model="small", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True}, extra_body=extra)
    parts = list(stream)
    assert "".join(c.choices[0].text for c in parts if c.choices) == reply.choices[0].text
    assert parts[-1].usage.completion_tokens == MAX_TOKENS
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        client.completions.create(model="small", prompt="")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("stream", [False, True])
def test_a_dropped_connection_cancels_its_sequence(http_port, source, fleet, stream):
    target = fleet.targets["small"][0]
    cancelled = source.cancelled_requests()
    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(completion(max_tokens=240, stream=stream)),
                       {"content-type": "application/json"})
    assert wait_until(lambda: ray.get(target.live_sequences.remote()) == 1)
    connection.close()
    assert wait_until(lambda: source.cancelled_requests() == cancelled + 1)
    assert wait_until(lambda: ray.get(target.live_sequences.remote()) == 0)


def test_too_many_requests_in_flight_get_429(fleet, expected):
    server = fleet.config.server.model_copy(update={"max_concurrent_requests": 1})
    app = create_api()
    app.state.source = FleetSource(dataclasses.replace(fleet, config=fleet.config.model_copy(update={"server": server})))
    with TestClient(app) as client:
        with client.stream("POST", "/v1/completions", json=completion(max_tokens=200, stream=True)) as held:
            lines = held.iter_lines()  # kept: dropping the iterator would close the stream
            assert next(lines).startswith("data: ")
            response = client.post("/v1/completions", json=completion())
            assert response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_error"
        assert wait_until(lambda: client.post("/v1/completions", json=completion()).status_code == 200)


def test_each_api_key_has_its_own_limit_of_requests_in_flight(fleet, monkeypatch):
    monkeypatch.setenv("SPECFLEET_TEST_KEYS", "key-one,key-two")
    server = fleet.config.server.model_copy(update={"max_concurrent_requests_per_key": 1, "api_keys_env": "SPECFLEET_TEST_KEYS"})
    app = create_api(ApiKeys.from_config(server))
    app.state.source = FleetSource(dataclasses.replace(fleet, config=fleet.config.model_copy(update={"server": server})))
    one, two = ({"authorization": f"Bearer {key}"} for key in ("key-one", "key-two"))
    with TestClient(app) as client:
        with client.stream("POST", "/v1/completions", json=completion(max_tokens=200, stream=True), headers=one) as held:
            lines = held.iter_lines()  # kept: dropping the iterator would close the stream
            assert next(lines).startswith("data: ")
            refused = client.post("/v1/completions", json=completion(), headers=one)
            assert refused.status_code == 429 and "this API key has 1 requests in flight" in refused.json()["error"]["message"]
            assert "key-one" not in refused.text
            assert client.post("/v1/completions", json=completion(), headers=two).status_code == 200
        assert wait_until(lambda: client.post("/v1/completions", json=completion(), headers=one).status_code == 200)


def test_a_replica_dying_mid_stream_ends_the_stream_with_an_error_event(client, fleet, expected):
    """Last in this module: the 'solo' target stays dead."""
    with client.stream("POST", "/v1/completions", json=completion(model="solo", max_tokens=200, stream=True)) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        ray.kill(fleet.targets["solo"][0])
        rest = "\n".join(lines)
    name, data = rest.strip().split("\n\n")[-1].split("\n")
    assert name == "event: error" and "[DONE]" not in rest
    assert json.loads(data.removeprefix("data: "))["error"]["code"] == "replica_failed"
    response = client.post("/v1/completions", json=completion(model="solo"))
    assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"
    assert client.post("/v1/completions", json=completion()).json()["choices"][0]["token_ids"] == expected
