"""Fixtures of the benchmark tests: a small held-out corpus and a single-exit export of the tiny drafter."""

import hashlib

import pytest
from transformers import LlamaForCausalLM

from cluster.zoo.corpus import FileEntry, Manifest, save_manifest
from cluster.zoo.export import export_exit

SOURCE = '''
import os


def area(width, height):
    """Return the area of a rectangle."""
    product = width * height
    return product


class Box:
    def volume(self, depth):
        """Width times height times depth."""
        base = area(self.width, self.height)
        return base * depth
''' * 6


@pytest.fixture(scope="session")
def manifest_path(tmp_path_factory):
    """A held-out split of two files, written the way the zoo's manifest is."""
    root = tmp_path_factory.mktemp("corpus")
    entries = []
    for name in ("shapes.py", "boxes.py"):
        data = SOURCE.encode()
        (root / name).write_bytes(data)
        entries.append(FileEntry(path=name, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), split="test"))
    path = root / "manifest.json"
    save_manifest(Manifest(root=str(root), python="test", files=entries), path)
    return path


@pytest.fixture(scope="session")
def drafter_export_path(tiny_dir, tokenizer, drafter_path):
    """Exit 2 of the tiny multi-exit drafter as a plain checkpoint, for HF (and vLLM)."""
    folder = tiny_dir / "drafter-exit-2"
    export_exit(LlamaForCausalLM.from_pretrained(drafter_path), 2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
