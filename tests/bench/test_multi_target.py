"""The multi-target benchmark job for real: one `specfleet up` serving three targets twice, phases interleaved."""

import pytest

from bench.baselines.multi_target import run_whole_job

TARGETS = ("target-s", "target-m", "target-l")


def test_every_phase_is_measured_and_ratios_pair_phases_of_one_repeat(target_path, drafter_path, prompts):
    settings = {"multi_targets": {name: str(target_path) for name in TARGETS}, "drafter": str(drafter_path),
                "exit_layer": 1, "k": 3, "threads": 1, "max_tokens": 6, "multi_target_repeats": 2,
                "compile": "auto", "drafter_compile": "auto"}
    result = run_whole_job({"settings": settings, "cells": [{"prompts": prompts[:1]}]})
    assert result["processes"]["cluster"]  # the cluster's process tree was read
    for target in TARGETS:
        assert [run["drafted"] for run in result["plain_runs"][target]] == [0, 0]
        for layout in ("shared", "dedicated"):
            runs = result[layout][target]["runs"]
            assert len(runs) == 2 and all(run["drafted"] > 0 and run["tokens"] == 6 for run in runs)
        within_repeats = [s["tokens_per_s"] / d["tokens_per_s"]
                          for s, d in zip(result["shared"][target]["runs"], result["dedicated"][target]["runs"])]
        assert result["ratio"][target]["per_repeat"] == pytest.approx(within_repeats)
