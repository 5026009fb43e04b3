"""A gRPC client not written in Python (Node's @grpc/grpc-js) against a real `specfleet up` server.

The Node packages are installed by this test's setup (`npm ci`, once, into
tests/clients/node/node_modules); the client loads the repository's .proto at
run time, so it sees exactly the wire contract Python clients see.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from actors.generator import SpeculativeGenerator
from actors.loading import load_tokenizer
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from up_server import start_up, stop, tiny_cluster_config

REPO = Path(__file__).resolve().parents[2]
NODE_CLIENT = Path(__file__).resolve().parent / "node"
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
    """`specfleet up` on the tiny fixture models; stopped at the end."""
    folder = tmp_path_factory.mktemp("node_client")
    process, address = start_up(tiny_cluster_config(folder, target_path, drafter_path), folder / "up.log")
    try:
        yield address
    finally:
        stop(process)


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
