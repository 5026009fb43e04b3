"""Interleaved phases: the order rotates each repeat, and speedups pair phases of the same repeat."""

import pytest

from bench.interleave import paired_speedups, run_interleaved, spread


def test_every_repeat_runs_each_phase_once_starting_one_phase_later():
    order = []
    phases = {name: (lambda name=name: order.append(name) or {"phase": name}) for name in ("a", "b", "c")}
    results = run_interleaved(phases, repeats=4)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert {name: len(runs) for name, runs in results.items()} == {"a": 4, "b": 4, "c": 4}


def test_a_drift_between_repeats_cancels_in_paired_ratios():
    base = [100.0, 50.0, 80.0]  # the machine slows down and recovers
    fast = [b * 1.2 for b in base]
    summary = paired_speedups(fast, base)
    assert summary["median"] == pytest.approx(1.2) and summary["min"] == pytest.approx(1.2)
    assert summary["per_repeat"] == pytest.approx([1.2, 1.2, 1.2])
    with pytest.raises(ValueError):
        paired_speedups([1.0], [1.0, 2.0])


def test_a_summary_reads_as_median_and_range():
    assert spread(paired_speedups([0.9, 1.2, 1.0], [1.0, 1.0, 1.0]), "{:.0%}") == "100% (90% - 120%)"
