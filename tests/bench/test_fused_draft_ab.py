"""bench/fused_draft_ab.py on the real zoo, eagerly and briefly: three arms, the same greedy tokens, a report."""

from argparse import Namespace

from bench.fused_draft_ab import ARMS, measure, render


def test_the_three_arms_decode_the_same_tokens_and_render():
    result = measure(Namespace(prompts=2, repeats=1, max_tokens=8, exit=2, k=4, compile="eager"))
    assert result["greedy_identical"] is True
    assert set(result["median_tokens_per_s"]) == set(ARMS) and all(v > 0 for v in result["median_tokens_per_s"].values())
    report = render(result | {"machine": {"cpu": "a CPU", "load_average_at_start": [0.1], "git_commit": "abc"}})
    assert "| speculative, fused drafts |" in report and "Greedy output identical across the three arms: True." in report
