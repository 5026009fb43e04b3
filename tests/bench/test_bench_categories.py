"""Prompt sets by category: exact lengths, and the docstring cut, from a small held-out corpus."""

import pytest

from actors.errors import InvalidRequest
from bench.categories import CATEGORIES, build_prompts, heldout_texts

@pytest.mark.parametrize("category", CATEGORIES)
def test_every_category_gives_prompts_of_the_exact_length(category, tokenizer, manifest_path):
    prompts = build_prompts(category, tokenizer, heldout_texts(manifest_path), count=2, length=24)
    assert len(prompts) == 2
    assert all(len(p) == 24 for p in prompts)
    assert all(0 <= t < len(tokenizer) for p in prompts for t in p)


def test_docstring_prompts_end_where_the_body_begins(tokenizer, manifest_path):
    for prompt in build_prompts("docstring", tokenizer, heldout_texts(manifest_path), count=3, length=16):
        assert tokenizer.decode(prompt).endswith('."""\n')


def test_hex_prompts_are_seeded(tokenizer, manifest_path):
    texts = heldout_texts(manifest_path)
    assert build_prompts("hex_literals", tokenizer, texts, 2, 20, seed=1) == build_prompts("hex_literals", tokenizer, texts, 2, 20, seed=1)
    assert build_prompts("hex_literals", tokenizer, texts, 2, 20, seed=1) != build_prompts("hex_literals", tokenizer, texts, 2, 20, seed=2)


def test_too_few_prompts_and_unknown_categories_are_refused(tokenizer, manifest_path):
    texts = heldout_texts(manifest_path)
    with pytest.raises(InvalidRequest, match="only"):
        build_prompts("code", tokenizer, texts, count=5, length=24)
    with pytest.raises(InvalidRequest, match="unknown category"):
        build_prompts("poetry", tokenizer, texts, count=1, length=8)
