"""bench.request_memory on the tiny models through real Ray actors: samples, growth and the report."""

import ray

from bench.request_memory import BASELINE_REQUESTS, markdown, measure


def test_the_memory_run_samples_the_target_actor_and_reports_growth(target_path, drafter_path):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = measure(target_path, drafter_path, requests=BASELINE_REQUESTS + 20, every=40, max_tokens=4)
    finally:
        ray.shutdown()
    assert [s["requests"] for s in report["samples"]] == [40, 80, 100, 120]
    assert all(s["rss_mib"] > 50 for s in report["samples"])  # a Python process with torch loaded
    assert report["growth_after_baseline_mib"] >= 0 and report["met"] == (report["growth_after_baseline_mib"] <= 16)
    assert "Growth of the target actor's resident set" in markdown(report)
