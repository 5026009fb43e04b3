"""Benchmark prompt sets by category, as token ids of the target's tokenizer.

Code categories are cut from the zoo's held-out test files (whole files the
models never saw in training, listed in models/corpus_manifest.json):

- code: the middle of a file, as plain code completion;
- docstring: a function's signature and docstring, the model writes the body;
- long_context: a long stretch of a file (most of the context window);
- hex_literals: a Python dict of random hex digests (seeded). Nothing in it is
  predictable, so the small drafter agrees with the target least here (measured
  by the benchmark: lowest acceptance of the four): the category the drafter is
  bad at, which shows what speculation costs when it does not pay.
"""

import ast
import random
from collections.abc import Callable
from pathlib import Path

from actors.errors import InvalidRequest
from cluster.zoo.corpus import load_manifest, read_split

CATEGORIES = ("code", "docstring", "long_context", "hex_literals")
DESCRIPTIONS = {
    "code": "held-out code completion: the middle of a held-out standard-library file",
    "docstring": "docstring -> body: a held-out function's signature and docstring; the model writes the body",
    "long_context": "long-context continuation: a long stretch of a held-out file, most of the context window",
    "hex_literals": "the drafter is bad at it: a dict of random hex digests (seeded), unpredictable by design",
}


def build_prompts(category: str, tokenizer, texts: list[str], count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of exactly `length` tokens for one category."""
    if category not in BUILDERS:
        raise InvalidRequest(f"bench: unknown category {category!r}; choose from {', '.join(CATEGORIES)}")
    prompts = BUILDERS[category](tokenizer, texts, count, length, seed)
    if len(prompts) < count:
        raise InvalidRequest(f"bench: only {len(prompts)} {category} prompts of {length} tokens found, {count} asked for")
    return prompts


def heldout_texts(manifest_path: Path) -> list[str]:
    """Texts of the zoo's test split (hash-checked against the manifest)."""
    return read_split(load_manifest(manifest_path), "test")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _file_slices(tokenizer, texts: list[str], count: int, length: int, where: float) -> list[list[int]]:
    """`length` tokens starting at fraction `where` of each long-enough file."""
    prompts = []
    for text in texts:
        ids = _encode(tokenizer, text)
        if len(ids) >= 2 * length:
            start = min(int(len(ids) * where), len(ids) - length)
            prompts.append(ids[start : start + length])
        if len(prompts) == count:
            break
    return prompts


def code_prompts(tokenizer, texts, count, length, seed) -> list[list[int]]:
    return _file_slices(tokenizer, texts, count, length, where=0.5)


def long_context_prompts(tokenizer, texts, count, length, seed) -> list[list[int]]:
    return _file_slices(tokenizer, texts, count, length, where=0.25)


def docstring_prompts(tokenizer, texts, count, length, seed) -> list[list[int]]:
    """Prompts ending right after a function's docstring (the body follows), one per file first."""
    candidates = [_docstring_cuts(text) for text in texts]
    prompts = []
    for round_index in range(max((len(c) for c in candidates), default=0)):
        for text, cuts in zip(texts, candidates):
            if round_index < len(cuts):
                ids = _encode(tokenizer, text[: cuts[round_index]])
                if len(ids) >= length:
                    prompts.append(ids[-length:])
            if len(prompts) == count:
                return prompts
    return prompts


def _docstring_cuts(text: str) -> list[int]:
    """Character offsets just past the docstring line of each function that has a body after it."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # e.g. a test file of deliberately broken syntax
        return []
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    cuts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node) and len(node.body) > 1:
            cuts.append(line_starts[node.body[0].end_lineno])  # start of the line after the docstring
    return sorted(cuts)


def hex_literal_prompts(tokenizer, texts, count, length, seed) -> list[list[int]]:
    """A `CHECKSUMS = {...}` dict of random sha256-like digests, cut to end mid-digest."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        lines = ["CHECKSUMS = {"]
        while len(_encode(tokenizer, "\n".join(lines))) < length + 8:
            digest = "".join(rng.choice("0123456789abcdef") for _ in range(64))
            lines.append(f'    "{rng.choice(("data", "blob", "img", "pkg"))}_{rng.randrange(10**4):04d}.bin": "{digest}",')
        prompts.append(_encode(tokenizer, "\n".join(lines))[:length])
    return prompts


BUILDERS: dict[str, Callable] = {
    "code": code_prompts,
    "docstring": docstring_prompts,
    "long_context": long_context_prompts,
    "hex_literals": hex_literal_prompts,
}
