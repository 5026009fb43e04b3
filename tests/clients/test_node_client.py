"""A gRPC client not written in Python (Node's @grpc/grpc-js) against a real `specfleet up` server.

The Node packages are installed by this test's setup (`npm ci`, once, into
tests/clients/node/node_modules); the client loads the repository's .proto at
run time, so it sees exactly the wire contract Python clients see.
"""

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.generator import SpeculativeGenerator
from actors.loading import load_tokenizer
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params

REPO = Path(__file__).resolve().parents[2]
NODE_CLIENT = Path(__file__).resolve().parent / "node"
CLI = [sys.executable, "-m", "cluster.cli"]
PROMPT, MAX_TOKENS = "def f(x):", 12


def _require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.fail(f"{tool} is not on PATH: this test needs Node.js (>= 18) and npm to run the Node gRPC client")
    return found


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the client's packages installed from package-lock.json."""
    node_binary = _require("node")
    if not (NODE_CLIENT / "node_modules" / ".package-lock.json").is_file():  # npm writes it when an install completes
        install = subprocess.run(
            [_require("npm"), "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, capture_output=True, text=True, timeout=600
        )
        assert install.returncode == 0, f"npm ci failed in {NODE_CLIENT}:\n{install.stderr[-3000:]}"
    return node_binary


@pytest.fixture(scope="module")
def server_address(tmp_path_factory, target_path, drafter_path):
    """`specfleet up` on the tiny fixture models, on a free port; killed at the end."""
    workdir = tmp_path_factory.mktemp("node_client")
    config, server_log = workdir / "cluster.yaml", workdir / "up.stderr"
    config.write_text(f"""
pools:
  draft: {{resources: {{draft: 1}}, num_cpus: 0.5}}
  target: {{resources: {{target: 1}}, num_cpus: 0.5}}
drafters:
  sorted: {{path: {drafter_path}, pool: draft}}
targets:
  small: {{path: {target_path}, pool: target, drafter: sorted, k: 3}}
server: {{grpc_port: 0}}
""")
    with server_log.open("w") as log:  # a file, not a pipe: the server's output must never block it
        process = subprocess.Popen([*CLI, "up", "--config", str(config), "--http-port", str(_free_port())],
                                   stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        yield _wait_for_address(process, server_log)
    finally:
        _stop(process)


def _free_port() -> int:
    """A port free now, for the server's HTTP side (this test speaks gRPC, on the port the server picks)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_address(process: subprocess.Popen, log: Path, timeout_s: float = 300.0) -> str:
    """The host:port `specfleet up` prints once it serves."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(r"serving gRPC on ([\d.]+:\d+)", log.read_text())
        if found:
            return found.group(1)
        if process.poll() is not None:
            pytest.fail(f"specfleet up exited with {process.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    pytest.fail(f"specfleet up did not serve within {timeout_s:.0f} s: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C, so the server shuts its Ray cluster down; kill it if that takes too long."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def report(node, server_address) -> dict:
    """What the Node client saw: Generate, GenerateStream, health Check and an unknown model."""
    result = subprocess.run(
        [node, "client.js", server_address, str(REPO / "protos"), "small", PROMPT, str(MAX_TOKENS)],
        cwd=NODE_CLIENT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def plain_greedy(target_path) -> dict:
    """The target's own greedy decoding of the same prompt, in this process: the reference output."""
    tokenizer = load_tokenizer(target_path)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    generator = SpeculativeGenerator(ModelRunner.from_pretrained(target_path), drafter=None)
    [result] = generator.generate([prompt], make_sampling_params(temperature=0, max_tokens=MAX_TOKENS))
    return {"tokens": list(result.tokens), "text": tokenizer.decode(result.tokens)}


def test_generate_from_node_equals_plain_greedy_decoding(report, plain_greedy):
    assert len(plain_greedy["tokens"]) == MAX_TOKENS
    assert report["generate"]["token_ids"] == plain_greedy["tokens"]
    assert report["generate"]["text"] == plain_greedy["text"]
    assert report["generate"]["finish_reason"] == "LENGTH"


def test_stream_from_node_adds_up_to_the_unary_result(report):
    messages = report["stream"]
    streamed_tokens = [token for message in messages for token in message["token_ids"]]
    assert streamed_tokens == report["generate"]["token_ids"]
    assert "".join(message["text"] for message in messages) == report["generate"]["text"]
    assert [m["finish_reason"] for m in messages[:-1]] == ["FINISH_REASON_UNSPECIFIED"] * (len(messages) - 1)
    assert messages[-1]["finish_reason"] == "LENGTH"


def test_health_check_from_node_says_serving(report):
    assert report["health"] == "SERVING"


def test_unknown_model_reaches_node_as_not_found(report):
    unknown = report["unknownModel"]
    assert unknown.get("name") == "NOT_FOUND", unknown
    assert "no-such-model" in unknown["details"]
