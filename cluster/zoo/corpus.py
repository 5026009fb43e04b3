"""The training corpus: Python files of the standard library and of installed packages, in a sha256 manifest.

Splits are by whole file and decided by a hash of the relative path, so the same file lands
in the same split on every machine, and adding or removing other files moves nothing. Files
with identical bytes are kept once (the first in path order), so no text is both trained on
and held out.
"""

import hashlib
import importlib.metadata
import os
import sys
import sysconfig
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from cluster.zoo.config import CorpusSettings

Split = Literal["train", "valid", "test"]
Source = Literal["root", "site-packages"]
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class FileEntry(BaseModel):
    path: str = Field(description="Path relative to its source directory, '/'-separated.")
    source: Source = Field("root", description="'root': the corpus root (the standard library by default); "
                           "'site-packages': this interpreter's site-packages, resolved where the file is read.")
    sha256: str = Field(description="sha256 of the file's bytes.")
    bytes: int = Field(description="File size in bytes.")
    split: Split = Field(description="Which split the whole file belongs to.")


class Manifest(BaseModel):
    root: str = Field(description="Corpus root on the machine that built the manifest.")
    python: str = Field(description="sys.version of the interpreter whose standard library was read.")
    packages: dict[str, str] = Field(default_factory=dict, description="Distribution name -> installed version read.")
    files: list[FileEntry] = Field(description="Files in sorted path order.")

    def split(self, name: Split) -> list[FileEntry]:
        return [f for f in self.files if f.split == name]

    def digest(self) -> str:
        """Identity of the corpus: a hash over paths, contents and splits (not over the root)."""
        lines = "".join(f"{f.source}:{f.path}\t{f.sha256}\t{f.split}\n" for f in self.files)
        return hashlib.sha256(lines.encode()).hexdigest()


def corpus_root(settings: CorpusSettings) -> Path:
    return settings.root or Path(sysconfig.get_paths()["stdlib"])


def site_packages() -> Path:
    """This interpreter's site-packages (pure-Python install directory)."""
    return Path(sysconfig.get_paths()["purelib"])


def package_python_files(name: str) -> list[str]:
    """Paths, relative to site-packages, of the *.py files distribution `name` installed there."""
    files = importlib.metadata.distribution(name).files or []
    paths = (f.as_posix() for f in files if f.suffix == ".py")
    return sorted(p for p in paths if not p.startswith("..") and "__pycache__" not in p)


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


def _entry(root: Path, rel: str, settings: CorpusSettings, source: Source) -> FileEntry | None:
    """The manifest entry of a file, or None when it is not UTF-8 or holds only whitespace."""
    data = (root / rel).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.strip():
        return None
    digest = hashlib.sha256(data).hexdigest()
    return FileEntry(path=rel, source=source, sha256=digest, bytes=len(data), split=split_of(rel, settings))


def _entries(settings: CorpusSettings) -> list[FileEntry]:
    """Every usable file of the root, then of each package, exact duplicates dropped (first kept)."""
    root = corpus_root(settings)
    found = [_entry(root, rel, settings, "root") for rel in list_python_files(root)]
    for name in settings.packages:
        found += [_entry(site_packages(), rel, settings, "site-packages") for rel in package_python_files(name)]
    seen: set[str] = set()
    unique = []
    for entry in found:
        if entry is not None and entry.sha256 not in seen:
            seen.add(entry.sha256)
            unique.append(entry)
    return unique


def build_manifest(settings: CorpusSettings) -> Manifest:
    files = _entries(settings)
    if settings.max_files is not None:
        # A pseudo-random subset, salted differently from the split so every split stays represented.
        subset = sorted(files, key=lambda e: _unit_hash("subset", e.path))[: settings.max_files]
        files = sorted(subset, key=lambda e: (e.source, e.path))
    versions = {name: importlib.metadata.version(name) for name in settings.packages}
    manifest = Manifest(root=str(corpus_root(settings)), python=sys.version, packages=versions, files=files)
    for name in ("train", "valid", "test"):
        if not manifest.split(name):
            raise ValueError(f"the {name} split is empty; use more files or larger fractions")
    return manifest


def read_split(manifest: Manifest, name: Split, root: Path | None = None) -> list[str]:
    """Texts of one split, each checked against its recorded hash so training stays reproducible.

    Root files are read under `root` (default: the manifest's), package files under this
    interpreter's site-packages.
    """
    bases = {"root": root or Path(manifest.root), "site-packages": site_packages()}
    texts = []
    for entry in manifest.split(name):
        data = (bases[entry.source] / entry.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ValueError(f"{entry.path} changed since the manifest was written")
        texts.append(data.decode("utf-8"))
    return texts


def save_manifest(manifest: Manifest, path: Path) -> None:
    path.write_text(manifest.model_dump_json(indent=1))


def load_manifest(path: Path) -> Manifest:
    return Manifest.model_validate_json(path.read_text())
