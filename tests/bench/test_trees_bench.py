"""bench/trees.py on the shipped zoo, eagerly and briefly: every arm decodes the target's tokens; goals and plot."""

from argparse import Namespace

from bench.trees import goals, measure, plot, render
from cluster.defaults import models_dir


def test_every_arm_decodes_the_targets_tokens_and_the_report_compares_like_budgets(tmp_path):
    zoo = models_dir()
    result = measure(Namespace(target=str(zoo / "target-s"), drafter=str(zoo / "drafter"), zoo=str(zoo), exits="1",
                               compile="eager", drafter_compile="eager", threads=1, prompts=1, prompt_tokens=32,
                               repeats=1, max_tokens=8))
    assert all(arm["greedy_identical"] for arm in result["arms"])
    assert {arm["family"] for arm in result["arms"]} == {"plain", "chain", "static tree", "dynamic tree"}
    result["goals"] = goals(result)
    assert len(result["goals"]["mal_ratio_at_budget"]) == 8  # every tree has the chain of its exit and budget
    assert "exit 1 dynamic-6x3:8 / exit 1 chain k=8" in result["goals"]["mal_ratio_at_budget"]
    report = render(result | {"machine": {"cpu": "a CPU", "load_average_at_start": [0.1], "git_commit": "abc"}})
    assert "| exit 1 static-4x2 | 9 |" in report and "Best tree" in report
    plot(result, tmp_path / "trees.png")
    assert (tmp_path / "trees.png").stat().st_size > 0
