"""Prompt sets for benchmarks, cut from the zoo's held-out files (never seen in training)."""

from pathlib import Path

from cluster.zoo.tokenizer import load_tokenizer
from cluster.defaults import models_dir
from cluster.zoo.corpus import load_manifest, read_split


def heldout_code_prompts(count: int, length: int, zoo: Path | None = None) -> list[list[int]]:
    """`count` prompts of `length` tokens: the middle of each test-split file, as code completion."""
    zoo = zoo or models_dir()
    tokenizer = load_tokenizer(zoo / "tokenizer")  # every model of a zoo shares it
    prompts = []
    for text in read_split(load_manifest(zoo / "corpus_manifest.json"), "test"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= 2 * length:
            middle = len(ids) // 2
            prompts.append(ids[middle : middle + length])
        if len(prompts) == count:
            break
    return prompts
