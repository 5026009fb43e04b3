import math
import shutil
from pathlib import Path

import pytest
import torch

from cluster.zoo.checkpoint import WEIGHTS_FILE
from cluster.zoo.evaluate import EvalReport, acceptance_sums, expected_accepted_length, to_markdown
from cluster.zoo.measured import mal_from_rates, per_position_acceptance

from zoo_helpers import run_cli


def test_expected_accepted_length_formula() -> None:
    assert expected_accepted_length(0.0, 4) == 1.0
    assert expected_accepted_length(1.0, 4) == 5.0
    assert expected_accepted_length(0.5, 4) == pytest.approx(1 + 0.5 + 0.25 + 0.125 + 0.0625)


def test_acceptance_sums_bounds() -> None:
    logits = torch.randn(2, 5, 11)
    assert acceptance_sums(logits, logits) == pytest.approx((10.0, 10.0))
    one_hot = torch.full((1, 1, 3), -1e9)
    one_hot[0, 0, 0] = 0.0
    other = torch.full((1, 1, 3), -1e9)
    other[0, 0, 2] = 0.0
    assert acceptance_sums(one_hot, other) == pytest.approx((0.0, 0.0))
    q, p = torch.tensor([[[0.0, 0.0]]]), torch.log(torch.tensor([[[0.8, 0.2]]]))
    assert acceptance_sums(q, p)[1] == pytest.approx(0.5 + 0.2)


def test_report_has_every_model_with_finite_heldout_loss(smoke_report: dict) -> None:
    report = EvalReport.model_validate(smoke_report)
    names = [m.name for m in report.models]
    assert names == ["target-s", "target-m", "target-l", "drafter-exit-1", "drafter-exit-2", "drafter-exit-3"]
    for model in report.models:
        assert math.isfinite(model.loss) and 0 < model.loss < math.log(400)
        assert model.perplexity == pytest.approx(math.exp(model.loss))
    params = [m.parameters for m in report.models]
    assert params[0] < params[1] < params[2] and params[3] < params[4] < params[5]
    assert report.tokens == 1024 and report.test_files > 0


def test_acceptance_matrix_is_complete_and_in_range(smoke_report: dict) -> None:
    report = EvalReport.model_validate(smoke_report)
    cells = {(p.exit_layer, p.target): p for p in report.matrix}
    assert set(cells) == {(e, t) for e in (1, 2, 3) for t in ("target-s", "target-m", "target-l")}
    for pair in report.matrix:
        assert 0 <= pair.greedy_agreement <= 1 and 0 < pair.alpha <= 1
        assert 1 <= pair.mal <= report.k + 1 and 1 <= pair.mal_greedy <= report.k + 1
        assert pair.mal == pytest.approx(expected_accepted_length(pair.alpha, report.k))
        assert pair.mal_greedy == pytest.approx(expected_accepted_length(pair.greedy_agreement, report.k))


def test_markdown_tables(smoke_report: dict) -> None:
    markdown = to_markdown(EvalReport.model_validate(smoke_report))
    assert "| exit \\ target | target-s | target-m | target-l |" in markdown
    assert markdown.count("| exit 2 |") == 6 and "| drafter-exit-3 |" in markdown
    assert "**Measured greedy speculation with `target-l`, k = 4**" in markdown and "| target-l | 5 |" in markdown
    assert "(1 - a^(k+1)) / (1 - a)" in markdown


def test_per_position_acceptance_and_its_mal_match_the_mean_accepted_length() -> None:
    lengths = [0, 1, 4, 4]  # accepted draft tokens of four rounds with k = 4
    rates = per_position_acceptance(lengths, 4)
    assert rates == pytest.approx([3 / 4, 2 / 3, 1.0, 1.0])
    assert mal_from_rates(rates) == pytest.approx(1 + sum(lengths) / len(lengths))
    assert per_position_acceptance([], 2) == [0.0, 0.0] and mal_from_rates([0.0, 0.0]) == 1.0


def test_measured_speculation_and_step_costs_cover_every_exit_and_target(smoke_report: dict) -> None:
    measured = EvalReport.model_validate(smoke_report).measured
    assert measured.target == "target-l" and measured.k == 4
    assert [a.exit_layer for a in measured.acceptance] == [1, 2, 3]
    for exit_acceptance in measured.acceptance:
        assert exit_acceptance.rounds > 0 and all(0 <= r <= 1 for r in exit_acceptance.per_position)
        assert exit_acceptance.mal == pytest.approx(mal_from_rates(exit_acceptance.per_position))
    costs = {c.model: c for c in measured.costs}
    assert set(costs) == {"drafter-exit-1", "drafter-exit-2", "drafter-exit-3", "target-s", "target-m", "target-l"}
    assert all(c.median_ms > 0 for c in costs.values())
    assert costs["target-l"].tokens == 5 and costs["drafter-exit-1"].tokens == 1


def test_forward_bound_speedup_follows_from_the_measured_tables(smoke_report: dict) -> None:
    measured = EvalReport.model_validate(smoke_report).measured
    assert {c.tokens for c in measured.costs if c.model == "target-l"} == {1, 2, 3, 4, 5}
    rates = measured.acceptance[1].per_position
    expected = (1 + rates[0] + rates[0] * rates[1]) * measured.cost("target-l", 1) / (
        measured.cost("target-l", 3) + 2 * measured.cost("drafter-exit-2", 1))
    assert measured.forward_bound_speedup(2, 2) == pytest.approx(expected)
    assert "**Forward-bound speedup over `target-l` alone**" in to_markdown(EvalReport.model_validate(smoke_report))


def test_eval_can_score_another_manifest_in_shorter_windows(smoke_zoo, tmp_path) -> None:
    """Two zoos compare like with like: the same held-out files, the same window length."""
    report_path = tmp_path / "eval.json"
    args = ["zoo", "eval", "--out", str(smoke_zoo), "--threads", "1", "--context", "32", "--eval-tokens", "512",
            "--manifest", str(smoke_zoo / "corpus_manifest.json"), "--json", str(report_path),
            "--markdown", str(tmp_path / "eval.md")]
    assert run_cli(args) == 0
    report = EvalReport.model_validate_json(report_path.read_text())
    assert report.context == 32 and report.tokens == 512


def test_a_zoo_still_training_is_scored_without_its_untrained_targets(smoke_zoo: Path, tmp_path: Path) -> None:
    partial = tmp_path / "zoo"
    shutil.copytree(smoke_zoo, partial)
    (partial / "target-m" / WEIGHTS_FILE).unlink()  # as the pipeline leaves a target it has not reached
    assert run_cli(["zoo", "eval", "--out", str(partial), "--threads", "1"]) == 0
    report = EvalReport.model_validate_json((partial / "eval.json").read_text())
    assert report.untrained == ["target-m"]
    assert "target-m" not in {m.name for m in report.models} | {p.target for p in report.matrix}
    assert "Not trained yet, so left out: target-m." in (partial / "eval.md").read_text()
