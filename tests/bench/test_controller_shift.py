"""A small real run of bench.controller_shift on the zoo: every lane exact, and the report's numbers follow from its sweep."""

import json

import pytest

from bench import controller_shift


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("shift")
    controller_shift.main([
        "--requests", "2", "--prompt-tokens", "32", "--max-tokens", "8", "--noise-requests", "6",
        "--noise-prompt-tokens", "32", "--noise-max-tokens", "4", "--off-requests", "4", "--out", str(out),
    ])
    assert (out / "controller_shift.md").read_text().startswith("# Adaptive speculation")
    assert (out / "controller_shift.png").stat().st_size > 0
    return json.loads((out / "controller_shift.json").read_text())


def test_every_lane_decodes_exactly_what_plain_decoding_does(report):
    assert report["shift"]["greedy_output_exact"] is True
    assert report["off"]["greedy_output_exact"] is True


def test_the_oracle_is_the_best_swept_arm_and_the_ratios_divide_by_it(report):
    shift = report["shift"]
    assert len(shift["sweep"]) == 10  # off + 3 exits x 3 draft lengths
    for phase in ("goodput", "goodput_before", "goodput_after"):
        best = max(arm[phase] for arm in shift["sweep"].values())
        assert shift["oracle"][phase] == best == shift["sweep"][shift["oracle_arm"][phase]][phase]
        assert shift["controller_vs_oracle"][phase] == pytest.approx(shift["controller"][phase] / best)
    assert shift["goal_run_within_10pct"] == (shift["controller_vs_oracle"]["goodput"] >= 0.9)


def test_every_lane_served_the_same_rounds_of_work(report):
    """Plain decoding emits one token per sequence per round; speculating arms need no more rounds than it."""
    sweep = report["shift"]["sweep"]
    # The first code request decodes alone (8 rounds); the shift starts when the noise requests join the second.
    assert sweep["off"]["rounds_before"] == 8
    assert all(arm["rounds"] <= sweep["off"]["rounds"] for arm in sweep.values())
