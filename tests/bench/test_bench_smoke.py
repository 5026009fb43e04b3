"""A real run of the harness's quick path on the tiny models: every specfleet path, HF, the profile, the report.

One run (module fixture, about a minute): specfleet in-process, specfleet's
cluster started with `specfleet up` and reached over gRPC and HTTP, HF
generate and assisted generation, and the round profile (in-process and with
a Ray drafter actor). The tests read its JSON and rendered report.
"""

import pytest

from bench.harness import run_benchmark, write_report
from bench.report import render
from bench.workloads import preset_config

MAX_TOKENS = 8
CONCURRENCY = [1, 3]
SYSTEM_MODES = [("specfleet", "plain"), ("specfleet", "speculative"), ("hf", "plain"), ("hf", "speculative"),
                ("specfleet-grpc", "plain"), ("specfleet-grpc", "speculative"),
                ("specfleet-http", "plain"), ("specfleet-http", "speculative")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, target_path, drafter_path, drafter_export_path, manifest_path):
    config = preset_config(
        "quick", systems=["specfleet", "hf", "specfleet-grpc", "specfleet-http"], categories=["code", "hex_literals"],
        prompts_per_category=2,
        prompt_tokens=16, long_prompt_tokens=40, max_tokens=MAX_TOKENS, concurrency=CONCURRENCY, min_requests=2,
        target=target_path, drafter=drafter_path, drafter_export=drafter_export_path, exit_layer=2, k=3,
        corpus_manifest=manifest_path, multi_target=False, keep_tokens=True, child_timeout_s=900,
        force=True,  # the test suite keeps the machine busy
    )
    out = tmp_path_factory.mktemp("bench")
    report = run_benchmark(config, "pytest", log_dir=out, echo=lambda line: None)
    write_report(report, out)
    render(report, out, out / "BENCHMARKS.md")
    return config, report, out


def test_every_system_ran(run):
    _, report, _ = run
    for name in ("specfleet", "hf", "specfleet-cluster"):
        entry = report["systems"][name]
        assert entry["status"] == "ok", entry
        assert not entry.get("mode_errors"), entry
    assert report["gpu"]["status"] == "not run" or report["machine"]["gpu"]


def test_every_cell_has_a_row_of_metrics(run):
    config, report, _ = run
    rows = report["rows"]
    assert not [r for r in rows if "error" in r]
    for system, mode in SYSTEM_MODES:
        for category in config.categories:
            for temperature in config.temperatures:
                for concurrency in CONCURRENCY if system != "hf" else [1]:
                    found = [r for r in rows if (r["system"], r["mode"], r["category"], r["temperature"], r["concurrency"])
                             == (system, mode, category, temperature, concurrency)]
                    assert len(found) == 1, (system, mode, category, temperature, concurrency)
                    r = found[0]
                    assert r["requests"] == max(config.min_requests, concurrency)
                    assert r["tokens"] == r["requests"] * MAX_TOKENS  # end-of-sequence ignored
                    assert r["tokens_per_s"] > 0 and r["ttft_ms_p50"] > 0 and r["itl_ms_p99"] >= r["itl_ms_p50"] > 0
                    if mode == "plain":
                        assert r["mal"] == 1.0 and r["drafted"] == 0
                    else:
                        assert r["drafted"] > 0 and 1.0 <= r["mal"] <= config.k + 1 and r["speedup"] > 0
        assert [r for r in rows if (r["system"], r["mode"], r["category"]) == (system, mode, "all")]


def greedy_completions(report, system, mode) -> dict:
    return {(r["category"], r["concurrency"]): r["completions"] for r in report["rows"]
            if (r["system"], r["mode"], r["temperature"]) == (system, mode, 0.0) and r["category"] != "all"}


def test_greedy_speculation_gives_the_target_alone_token_for_token(run):
    """In-process and through the cluster (gRPC and HTTP), greedy speculative output is the target's own."""
    _, report, _ = run
    plain = greedy_completions(report, "specfleet", "plain")
    assert plain and all(len(c) == MAX_TOKENS for cs in plain.values() for c in cs)
    for system, mode in [("specfleet", "speculative"), ("specfleet-grpc", "plain"), ("specfleet-grpc", "speculative"),
                         ("specfleet-http", "plain"), ("specfleet-http", "speculative")]:
        assert greedy_completions(report, system, mode) == plain, (system, mode)
    checked = [r for r in report["rows"] if r["system"] == "specfleet" and "greedy_compared" in r]
    assert checked and all(r["greedy_identical"] == r["greedy_compared"] > 0 for r in checked)


def test_the_round_profile_accounts_for_the_round(run):
    _, report, _ = run
    profile = report["profile"]
    assert profile["status"] == "ok", profile
    assert set(profile["engines"]) == {"plain", "in-process drafter", "remote drafter (Ray calls)",
                                       "remote drafter (loopback channel)"}
    for runs in profile["engines"].values():
        for p in runs:
            assert p["rounds"] > 0 and p["round_ms"] > 0
            assert sum(p["share"].values()) == pytest.approx(1.0, abs=0.02)
    for arm in ("remote drafter (Ray calls)", "remote drafter (loopback channel)"):
        remote = profile["engines"][arm][0]["ms_per_round"]
        assert remote["draft: drafter actor compute"] > 0 and remote["draft: transfer + calls"] >= 0


def test_peak_memory_covers_the_cluster_processes(run):
    _, report, _ = run
    cluster = report["systems"]["specfleet-cluster"]["processes"]
    names = [p["name"] for p in cluster]
    assert any(n.startswith("ray::") and "TargetActor" in n for n in names), names
    drafter_actor = report["settings"]["drafter_placement"] == "actor"  # embedded: the drafter is in the target actor
    assert any("DrafterActor" in n for n in names) == drafter_actor, names
    assert all(p["peak_rss_mib"] > 0 for p in cluster)
    assert report["systems"]["specfleet"]["processes"][0]["peak_rss_mib"] > 0


def test_the_report_is_rendered_from_the_json(run):
    _, report, out = run
    text = (out / "BENCHMARKS.md").read_text()
    for heading in ("## Headline", "## Goals", "## Setup", "## Single stream", "## Speedup by category",
                    "## Throughput against concurrency", "## Where a round's time goes", "## Peak memory per process", "## GPU"):
        assert heading in text
    for png in ("bench_speedup.png", "bench_throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "bench.json").is_file() and (out / "bench_cells.md").is_file()
