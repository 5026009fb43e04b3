"""From children's results to rows, speedups, greedy agreement and goals, on synthetic results."""

import pytest

from bench.goals import evaluate_goals
from bench.results import add_greedy_agreement, add_speedups, collect_rows, drop_completions


def row(mode: str, tokens_per_s: float, category: str = "code", concurrency: int = 1, temperature: float = 0.0, **extra):
    return {"category": category, "temperature": temperature, "concurrency": concurrency, "mode": mode,
            "tokens_per_s": tokens_per_s, **extra}


def test_cluster_modes_become_one_system_per_transport():
    rows = collect_rows({
        "specfleet-cluster": {"cells": [row("grpc/plain", 10.0), row("http/speculative", 12.0)]},
        "vllm-draft_model": {"cells": [row("speculative", 30.0)]},
        "specfleet": {"cells": [row("plain", 20.0)]},
    })
    assert [(r["system"], r["mode"]) for r in rows] == [
        ("specfleet-grpc", "plain"), ("specfleet-http", "speculative"), ("vllm", "speculative"), ("specfleet", "plain")]


def test_speedup_is_over_the_same_system_and_cell():
    rows = collect_rows({
        "specfleet": {"cells": [row("plain", 20.0), row("speculative", 30.0), row("plain", 50.0, concurrency=4),
                                row("speculative", 40.0, concurrency=4)]},
        "vllm-autoregressive": {"cells": [row("plain", 60.0)]},
        "vllm-draft_model": {"cells": [row("speculative", 90.0), row("speculative", 10.0, category="docstring")]},
    })
    add_speedups(rows)
    spec = {(r["system"], r["category"], r["concurrency"]): r.get("speedup") for r in rows if r["mode"] == "speculative"}
    assert spec[("specfleet", "code", 1)] == pytest.approx(1.5)
    assert spec[("specfleet", "code", 4)] == pytest.approx(0.8)
    assert spec[("vllm", "code", 1)] == pytest.approx(1.5)
    assert spec[("vllm", "docstring", 1)] is None  # no plain row for that cell: no speedup invented


def test_greedy_rows_are_compared_with_the_target_alone_request_by_request():
    reference = [[1, 2, 3], [4, 5, 6]]
    rows = collect_rows({
        "specfleet": {"cells": [row("plain", 1.0, completions=reference),
                                row("speculative", 1.0, concurrency=4, completions=reference * 2),
                                row("speculative", 1.0, temperature=1.0, completions=[[9, 9, 9], [9, 9, 9]])]},
        "hf": {"cells": [row("speculative", 1.0, completions=[[1, 2, 3], [4, 5, 7]])]},
    })
    assert add_greedy_agreement(rows, {"code": 2}) is not None
    by = {(r["system"], r["mode"], r["concurrency"], r["temperature"]): r for r in rows}
    assert (by[("specfleet", "speculative", 4, 0.0)]["greedy_identical"], by[("specfleet", "speculative", 4, 0.0)]["greedy_compared"]) == (4, 4)
    assert (by[("hf", "speculative", 1, 0.0)]["greedy_identical"], by[("hf", "speculative", 1, 0.0)]["greedy_compared"]) == (1, 2)
    assert "greedy_compared" not in by[("specfleet", "speculative", 1, 1.0)]  # sampled rows are not compared
    drop_completions(rows)
    assert not any("completions" in r for r in rows)


def test_no_reference_no_comparison():
    rows = collect_rows({"hf": {"cells": [row("plain", 1.0, completions=[[1]])]}})
    assert add_greedy_agreement(rows, {"code": 1}) is None
    assert "greedy_compared" not in rows[0]


def pooled_row(system, mode, tokens_per_s, concurrency=1, speedup=None):
    return {"system": system, "mode": mode, "category": "all", "temperature": 0.0, "concurrency": concurrency,
            "tokens_per_s": tokens_per_s, "speedup": speedup}


def test_goals_met_not_met_and_not_measured():
    report = {
        "systems": {"specfleet-cluster": {"status": "ok"}, "specfleet": {"status": "ok"},
                    "vllm-draft_model": {"status": "not run", "reason": "no vLLM interpreter given"},
                    "vllm-autoregressive": {"status": "not run", "reason": "no vLLM interpreter given"}},
        "rows": [pooled_row("specfleet-grpc", "speculative", 50.0, speedup=1.2),
                 pooled_row("specfleet-grpc", "plain", 45.0),
                 pooled_row("specfleet", "speculative", 60.0, speedup=2.0),
                 pooled_row("specfleet", "plain", 50.0)],
        "multi_target": {"ratio": {"target-s": {"median": 0.95}, "target-m": {"median": 0.91}, "target-l": {"median": 0.97}}},
    }
    goals = evaluate_goals(report)
    goal = lambda words: next(g for g in goals if words in g["goal"])
    in_process = goal("in-process speedup")
    assert (in_process["status"], in_process["value"], in_process["target"]) == ("met", 2.0, ">= 1.5x")
    cluster = goal("cluster over gRPC")
    assert (cluster["status"], cluster["value"]) == ("not met", 1.2)
    versus_vllm = goal("vLLM draft_model")
    assert versus_vllm["status"] == "not measured" and "no vLLM interpreter given" in versus_vllm["detail"]
    plain = goal("plain decoding against in-process")
    assert (plain["status"], plain["value"], plain["target"]) == ("met", 0.9, ">= 85%")
    hf = goal("Hugging Face generate")
    assert hf["status"] == "not measured" and "hf: not among the measured systems" in hf["detail"]
    assert goal("three targets sharing one drafter")["status"] == "met"


def test_the_notes_say_which_cells_failed_and_that_pooled_rows_lack_them():
    from bench.report_sections import notes_section

    failed = row("plain", 0.0, concurrency=64, temperature=1.0, error="EngineDeadError: engine core died\ntraceback")
    report = {"rows": [{**failed, "system": "vllm"}, {**row("plain", 10.0), "system": "vllm"}]}
    (note,) = [line for line in notes_section(report) if line.startswith("- ")]
    assert "failed its code cell at temperature 1, 64 streams: EngineDeadError: engine core died (" in note
    assert "traceback" not in note and "covers only the categories that ran" in note
