"""The training corpus: Python files of the standard library, recorded in a sha256 manifest.

Splits are by whole file and decided by a hash of the relative path, so the same file lands
in the same split on every machine, and adding or removing other files moves nothing.
"""

import hashlib
import os
import sys
import sysconfig
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from cluster.zoo.config import CorpusSettings

Split = Literal["train", "valid", "test"]
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class FileEntry(BaseModel):
    path: str = Field(description="Path relative to the corpus root, '/'-separated.")
    sha256: str = Field(description="sha256 of the file's bytes.")
    bytes: int = Field(description="File size in bytes.")
    split: Split = Field(description="Which split the whole file belongs to.")


class Manifest(BaseModel):
    root: str = Field(description="Corpus root on the machine that built the manifest.")
    python: str = Field(description="sys.version of the interpreter whose standard library was read.")
    files: list[FileEntry] = Field(description="Files in sorted path order.")

    def split(self, name: Split) -> list[FileEntry]:
        return [f for f in self.files if f.split == name]

    def digest(self) -> str:
        """Identity of the corpus: a hash over paths, contents and splits (not over the root)."""
        lines = "".join(f"{f.path}\t{f.sha256}\t{f.split}\n" for f in self.files)
        return hashlib.sha256(lines.encode()).hexdigest()


def corpus_root(settings: CorpusSettings) -> Path:
    return settings.root or Path(sysconfig.get_paths()["stdlib"])


def list_python_files(root: Path) -> list[str]:
    """Relative paths of all *.py files under root, sorted, outside site-packages and caches."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        rel = Path(folder).relative_to(root)
        found += [(rel / name).as_posix() for name in files if name.endswith(".py")]
    return sorted(found)


def _unit_hash(salt: str, path: str) -> float:
    """A uniform number in [0, 1) fixed by (salt, path)."""
    digest = hashlib.sha256(f"{salt}:{path}".encode()).hexdigest()
    return int(digest[:16], 16) / 2**64


def split_of(path: str, settings: CorpusSettings) -> Split:
    u = _unit_hash("split", path)
    if u < settings.test_fraction:
        return "test"
    if u < settings.test_fraction + settings.valid_fraction:
        return "valid"
    return "train"


def _entry(root: Path, rel: str, settings: CorpusSettings) -> FileEntry | None:
    """The manifest entry of a file, or None when it is not UTF-8 or holds only whitespace."""
    data = (root / rel).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.strip():
        return None
    return FileEntry(path=rel, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), split=split_of(rel, settings))


def build_manifest(settings: CorpusSettings) -> Manifest:
    root = corpus_root(settings)
    files = [e for rel in list_python_files(root) if (e := _entry(root, rel, settings)) is not None]
    if settings.max_files is not None:
        # A pseudo-random subset, salted differently from the split so every split stays represented.
        subset = sorted(files, key=lambda e: _unit_hash("subset", e.path))[: settings.max_files]
        files = sorted(subset, key=lambda e: e.path)
    manifest = Manifest(root=str(root), python=sys.version, files=files)
    for name in ("train", "valid", "test"):
        if not manifest.split(name):
            raise ValueError(f"the {name} split is empty; use more files or larger fractions")
    return manifest


def read_split(manifest: Manifest, name: Split, root: Path | None = None) -> list[str]:
    """Texts of one split, each checked against its recorded hash so training stays reproducible."""
    base = root or Path(manifest.root)
    texts = []
    for entry in manifest.split(name):
        data = (base / entry.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ValueError(f"{entry.path} changed since the manifest was written")
        texts.append(data.decode("utf-8"))
    return texts


def save_manifest(manifest: Manifest, path: Path) -> None:
    path.write_text(manifest.model_dump_json(indent=1))


def load_manifest(path: Path) -> Manifest:
    return Manifest.model_validate_json(path.read_text())
