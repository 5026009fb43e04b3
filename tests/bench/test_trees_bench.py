"""bench/trees.py on the shipped zoo, eagerly and briefly: every arm decodes the target's tokens; goals and plot."""

from argparse import Namespace

from bench.trees import goals, measure, plot, prompts_of, render, speed_goal
from bench.trees_cluster import measure_cluster
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
    assert "| exit 1 static-4x2 | 9 |" in report and "best tree" in report
    plot(result, tmp_path / "trees.png")
    assert (tmp_path / "trees.png").stat().st_size > 0


def test_the_cluster_arms_decode_the_targets_tokens_through_grpc():
    zoo = models_dir()
    args = Namespace(target=str(zoo / "target-s"), drafter=str(zoo / "drafter"), zoo=str(zoo), exits="1",
                     compile="eager", drafter_compile="eager", prompts=1, prompt_tokens=32, repeats=1, max_tokens=8)
    measured = measure_cluster(args, prompts_of(args))["arms"]
    assert [a["family"] for a in measured] == ["plain", "chain", "chain", "static tree", "dynamic tree", "dynamic tree"]
    assert all(a["greedy_identical"] and a["median_tokens_per_s"] > 0 for a in measured)
    assert speed_goal(measured)[1] in ("exit 1 chain k=4", "exit 1 chain k=8")
