"""Shared fixtures: a tiny tokenizer and tiny seeded Llama checkpoints, built once per session."""

import os
import random
from pathlib import Path

import pytest

from actors.compiled import AUTO_ENV
from actors.runner import ModelRunner

# Fleets in tests run their models eagerly: compiling every graph of every replica at each fleet start would
# take minutes. The compiled step has tests of its own (tests/test_compiled.py) that ask for it explicitly.
os.environ.setdefault(AUTO_ENV, "eager")
from tiny_models import FOREIGN_TOKENIZER_TEXT, build_llama, build_tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return build_tokenizer(tiny_dir / "tokenizer")


@pytest.fixture(scope="session")
def target_path(tiny_dir, tokenizer) -> Path:
    return build_llama(tiny_dir / "target", tokenizer, seed=1)


@pytest.fixture(scope="session")
def drafter_path(tiny_dir, tokenizer) -> Path:
    """A different model with three exits (1, 2 and all 4 layers)."""
    return build_llama(tiny_dir / "drafter", tokenizer, seed=2, exit_layers=[1, 2, 4])


@pytest.fixture(scope="session")
def other_vocab_path(tiny_dir) -> Path:
    """A model whose tokenizer and vocabulary differ from the others'."""
    other_tokenizer = build_tokenizer(tiny_dir / "other_tokenizer", vocab_size=300)
    return build_llama(tiny_dir / "other_vocab", other_tokenizer, seed=3)


@pytest.fixture(scope="session")
def foreign_drafter_path(tiny_dir) -> Path:
    """A multi-exit drafter (exits 1, 2, 4) whose byte-level vocabulary overlaps the target's only in part."""
    foreign_tokenizer = build_tokenizer(tiny_dir / "foreign_tokenizer", vocab_size=340, texts=FOREIGN_TOKENIZER_TEXT)
    return build_llama(tiny_dir / "foreign_drafter", foreign_tokenizer, seed=5, exit_layers=[1, 2, 4])


@pytest.fixture
def target(target_path) -> ModelRunner:
    return ModelRunner.from_pretrained(target_path)


@pytest.fixture
def drafter_runner(drafter_path) -> ModelRunner:
    return ModelRunner.from_pretrained(drafter_path)


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    """Prompts of many lengths: real code and seeded random token ids."""
    texts = ["def add(a, b):", "for i in range(10):\n    ", "class Point:\n    def __init__(self", "import os"]
    rng = random.Random(0)
    random_ids = [[rng.randrange(len(tokenizer)) for _ in range(n)] for n in (1, 2, 7, 23)]
    return [tokenizer(t)["input_ids"] for t in texts] + random_ids
