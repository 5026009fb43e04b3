import inspect
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cluster.zoo.config import EOS_TOKEN, TokenizerSettings
from cluster.zoo.tokenizer import encode_documents, train_tokenizer

SAMPLES = [
    "def f(x):\n\treturn {'a': [x ** 2 for x in range(3)]}  # tab\n",
    "class Café:\n    \"\"\"Ünïcode, emoji 🐍 and CJK 数据.\"\"\"\r\n    pass\r\n",
    "    \n\n        if not x:  \n            raise ValueError('bad')\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    texts = [inspect.getsource(json), inspect.getsource(inspect)]
    return train_tokenizer(texts, TokenizerSettings(vocab_size=600))


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_on_python_code(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_bpe_learned_merges_for_code(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "    def __init__(self):\n        return None\n"
    assert len(tokenizer(text)["input_ids"]) < len(text.encode()) / 2
    assert len(tokenizer) == 600


def test_saved_tokenizer_loads_with_auto_tokenizer(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token == EOS_TOKEN and loaded.eos_token_id == tokenizer.eos_token_id
    for text in SAMPLES:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_documents_are_separated_by_eos_only(tokenizer: PreTrainedTokenizerFast) -> None:
    docs = ["x = 1\n", f"s = '{EOS_TOKEN}'\n", "y = 2\n"]
    stream = encode_documents(tokenizer, docs).tolist()
    eos = tokenizer.eos_token_id
    assert stream.count(eos) == len(docs) and stream[-1] == eos
    pieces, current = [], []
    for token in stream:
        if token == eos:
            pieces.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    assert pieces == docs
    assert tokenizer(EOS_TOKEN)["input_ids"] == [eos]  # ordinary encoding is left unchanged


def test_training_is_deterministic() -> None:
    texts = [inspect.getsource(json)] * 2
    first = train_tokenizer(texts, TokenizerSettings(vocab_size=400))
    second = train_tokenizer(texts, TokenizerSettings(vocab_size=400))
    assert first.get_vocab() == second.get_vocab()
