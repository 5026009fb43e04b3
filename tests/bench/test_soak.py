"""bench/soak.py's accounting: which tokens count as lost, and the report's failures per kill.

The soak itself runs the Serve application for half an hour (its report is
bench/reports/soak.md); the faults it injects are tested on a real cluster in
tests/cluster/test_faults.py.
"""

import threading

from bench.soak import render
from bench.soak_traffic import Client, Outcome, Workload, outcome_dicts

WORKLOAD = Workload(prompts=[[1, 2, 3]], expected={("target-s", 0): [5, 6, 7, 8]}, max_tokens=4)


def client() -> Client:
    return Client(0, "127.0.0.1:1", "http://127.0.0.1:1/v1", WORKLOAD, 0.0, threading.Event(), [])


def test_greedy_tokens_unlike_the_targets_own_and_missing_tokens_are_lost():
    lost = client()._lost_tokens
    assert lost("target-s", 0, 0.0, [5, 6, 7, 8]) == 0
    assert lost("target-s", 0, 0.0, [5, 9, 7, 8]) == 1
    assert lost("target-s", 0, 0.0, [5, 6]) == 2
    assert lost("target-s", 0, 1.0, [1, 1, 1, 1]) == 0, "sampled tokens are only counted"
    assert lost("target-s", 0, 1.0, [1]) == 3


def test_the_report_counts_lost_tokens_and_failures_after_each_kill():
    outcomes = [Outcome(1.0, 0.5, "grpc-stream", "target-s", 0.0, "OK", 4, 0),
                Outcome(9.0, 2.0, "grpc-stream", "target-s", 0.0, "UNAVAILABLE", 0, 0),
                Outcome(12.0, 1.0, "http-stream", "target-s", 1.0, "OK", 3, 1),
                Outcome(25.0, 0.1, "grpc-unary", "target-s", 0.0, "UNAVAILABLE", 0, 0)]
    result = {"machine": {"cpu": "a CPU", "usable_cpus": 2, "git_commit": "abc", "load_average_at_start": [0.1]},
              "minutes": 0.5, "kill_every_s": 10, "clients": 2, "max_tokens": 4, "targets": ["target-s"],
              "kills": [{"at_s": 10.0, "victim": "grpc front door"}, {"at_s": 20.0, "victim": "drafter", "skipped": "X"}],
              "memory": [], "outcomes": outcome_dicts(outcomes)}
    report = render(result, None)
    assert "requests: 4, served 2, failed 2" in report
    assert "**tokens lost** in served requests (missing, or unlike the target's own greedy tokens): **1**" in report
    assert "| 10.0 | grpc front door | 1 | not again |" in report  # gRPC streams served before, never after
    assert "| 20.0 | drafter | 1 | not again |" in report
    assert "| grpc-stream | UNAVAILABLE | 1 |" in report and "drafter (skipped: X)" in report
