"""One smoke zoo per test session, trained and evaluated through the CLI (a few seconds on CPU)."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cluster.zoo.pipeline import torch_threads

from zoo_helpers import run_cli


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and leave the other core to concurrent work."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def smoke_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zoo")
    assert run_cli(["zoo", "train", "--preset", "smoke", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def smoke_report(smoke_zoo: Path) -> dict:
    assert run_cli(["zoo", "eval", "--out", str(smoke_zoo), "--threads", "1"]) == 0
    return json.loads((smoke_zoo / "eval.json").read_text())


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    """A random 4-layer Llama with exits [1, 2, 4]; init scaled up so logits are far from flat."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norm gains away from 1, as after training, so a twice-applied norm shows
        model.model.norm.weight.uniform_(0.5, 2.0)
    model.config.exit_layers = [1, 2, 4]
    return model
