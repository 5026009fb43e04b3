import importlib.metadata
from pathlib import Path

import pytest

from cluster.zoo.config import CorpusSettings, preset
from cluster.zoo.corpus import (
    build_manifest, list_python_files, load_manifest, read_split, save_manifest, site_packages, split_of,
)


def write_tree(root: Path) -> None:
    files = {
        "a.py": "x = 1\n",
        "pkg/b.py": "def f():\n    return 2\n",
        "pkg/tests/test_c.py": "assert True\n",
        "site-packages/third.py": "import numpy\n",
        "pkg/__pycache__/b.py": "stale\n",
        "empty.py": "\n  \n",
        "notes.txt": "not python\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    for i in range(40):
        (root / f"gen/m{i:02d}.py").parent.mkdir(exist_ok=True)
        (root / f"gen/m{i:02d}.py").write_text(f"VALUE = {i}\n")


def settings(root: Path) -> CorpusSettings:
    return CorpusSettings(root=root, valid_fraction=0.2, test_fraction=0.2)


def test_listing_skips_site_packages_caches_and_non_python(tmp_path: Path) -> None:
    write_tree(tmp_path)
    found = list_python_files(tmp_path)
    assert found == sorted(found)
    assert "pkg/tests/test_c.py" in found
    assert not any("site-packages" in p or "__pycache__" in p or p.endswith(".txt") for p in found)


def test_manifest_skips_non_utf8_and_blank_files(tmp_path: Path) -> None:
    write_tree(tmp_path)
    paths = {f.path for f in build_manifest(settings(tmp_path)).files}
    assert "latin1.py" not in paths and "empty.py" not in paths
    assert {"a.py", "pkg/b.py", "pkg/tests/test_c.py"} <= paths


def test_manifest_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    write_tree(tmp_path)
    first, second = build_manifest(settings(tmp_path)), build_manifest(settings(tmp_path))
    assert first == second and first.digest() == second.digest()
    save_manifest(first, tmp_path / "manifest.json")
    assert load_manifest(tmp_path / "manifest.json") == first


def test_splits_are_disjoint_whole_files_and_cover_the_corpus(tmp_path: Path) -> None:
    write_tree(tmp_path)
    manifest = build_manifest(settings(tmp_path))
    splits = {name: {f.path for f in manifest.split(name)} for name in ("train", "valid", "test")}
    assert all(splits.values())
    assert not (splits["train"] & splits["valid"] or splits["train"] & splits["test"] or splits["valid"] & splits["test"])
    assert set().union(*splits.values()) == {f.path for f in manifest.files}


def test_split_depends_only_on_the_path(tmp_path: Path) -> None:
    write_tree(tmp_path)
    before = {f.path: f.split for f in build_manifest(settings(tmp_path)).files}
    (tmp_path / "gen/m00.py").unlink()
    after = {f.path: f.split for f in build_manifest(settings(tmp_path)).files}
    assert all(before[path] == split for path, split in after.items())
    assert all(split == split_of(path, settings(tmp_path)) for path, split in after.items())


def test_read_split_refuses_changed_files(tmp_path: Path) -> None:
    write_tree(tmp_path)
    manifest = build_manifest(settings(tmp_path))
    entry = manifest.split("train")[0]
    assert read_split(manifest, "train")[0] == (tmp_path / entry.path).read_text()
    (tmp_path / entry.path).write_text("changed = True\n")
    with pytest.raises(ValueError, match="changed"):
        read_split(manifest, "train")


def test_standard_library_manifest_holds_out_files(tmp_path: Path) -> None:
    manifest = build_manifest(preset("full", tmp_path).corpus)
    paths = [f.path for f in manifest.files]
    assert len(paths) > 500 and any(p.startswith("test/") for p in paths)
    assert not any("site-packages" in p for p in paths)
    held_out = len(manifest.split("valid")) + len(manifest.split("test"))
    assert 0.02 < held_out / len(paths) < 0.1


def test_installed_packages_join_the_corpus_once_per_distinct_file(tmp_path: Path) -> None:
    write_tree(tmp_path)
    yaml_init = site_packages() / "yaml/__init__.py"
    (tmp_path / "copy_of_yaml_init.py").write_bytes(yaml_init.read_bytes())
    manifest = build_manifest(CorpusSettings(root=tmp_path, valid_fraction=0.2, test_fraction=0.2, packages=["pyyaml"]))
    packaged = {f.path for f in manifest.files if f.source == "site-packages"}
    assert "yaml/constructor.py" in packaged and "yaml/__init__.py" not in packaged  # same bytes as the root's copy
    assert len({f.sha256 for f in manifest.files}) == len(manifest.files)
    assert manifest.packages == {"pyyaml": importlib.metadata.version("pyyaml")}
    for split in ("train", "valid", "test"):
        entries, texts = manifest.split(split), read_split(manifest, split)
        assert [len(t.encode()) for t in texts] == [e.bytes for e in entries]
