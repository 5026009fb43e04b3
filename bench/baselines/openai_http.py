"""The benchmark's HTTP client: one streamed `POST /v1/completions` (server-sent events), OpenAI style.

The prompt goes as token ids; specfleet's extensions ask for the completion's
token ids in every chunk (`return_token_ids`), to ignore end-of-sequence, and
for the speculation to use. The last chunk with a finish reason carries the
speculation counters.
"""

import json
import threading
import time

import requests

from bench.baselines.grpc_client import counts_of
from bench.metrics import RequestTrace

REQUEST_TIMEOUT_S = 600.0


def completion_body(model: str, prompt: list[int], max_tokens: int, temperature: float, seed: int,
                    speculation: dict | None) -> dict:
    """`speculation` None decodes plainly, else fixed {drafter, exit_layer, k}."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
            "stream": True, "ignore_eos": True, "return_token_ids": True,
            "speculation": {"mode": "off"} if speculation is None else {"mode": "fixed", **speculation}}


class Clients:
    """One `requests.Session` (keep-alive connection) per client thread."""

    def __init__(self):
        self._local = threading.local()
        self._all: list[requests.Session] = []

    def get(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            self._all.append(self._local.session)
        return self._local.session

    def close(self) -> None:
        for session in self._all:
            session.close()


def stream(session: requests.Session, base_url: str, body: dict) -> RequestTrace:
    """One streamed completion, each event timed as it arrives."""
    trace = RequestTrace(time.perf_counter())
    with session.post(f"{base_url}/completions", json=body, stream=True, timeout=REQUEST_TIMEOUT_S) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        for line in response.iter_lines(decode_unicode=True):
            chunk = _event(line)
            if chunk is None:
                continue
            for choice in chunk.get("choices", []):
                tokens = choice.get("token_ids") or []
                trace.record(time.perf_counter(), len(tokens), tokens)
            if chunk.get("speculation"):
                trace.counts = counts_of(chunk["speculation"])
    return trace


def _event(line: str) -> dict | None:
    """The JSON of a `data:` line; None for blank lines, comments and [DONE]; an error event raises."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return None
    chunk = json.loads(data)
    if "error" in chunk:
        raise RuntimeError(f"the stream ended with an error: {chunk['error']}")
    return chunk
