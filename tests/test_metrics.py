"""Prometheus metrics, read back through prometheus_client's own text-format parser."""

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from actors.drafters import ModelDrafter
from actors.engine import SpeculationEngine
from actors.sampling import make_sampling_params
from actors.telemetry import PLAIN, RoundRecord
from cluster.metrics import RequestTimer, SpecfleetMetrics


def scrape(metrics: SpecfleetMetrics) -> dict:
    """{(sample name, frozen labels): value} of everything the registry renders."""
    families = text_string_to_metric_families(metrics.render().decode())
    return {(s.name, frozenset(s.labels.items())): s.value for family in families for s in family.samples}


def labels(**values) -> frozenset:
    return frozenset(values.items())


PAIR = labels(target="t", drafter="d", exit="2", k="3", tree="")


def record(accepted=(3, 1), emitted=6, k=3, exit_layer=2, drafter="d", tree="") -> RoundRecord:
    return RoundRecord(exit_layer, k, len(accepted), len(accepted), drafted=k * len(accepted), accepted_lengths=accepted,
                       emitted=emitted, draft_s=0.01, verify_s=0.02, target="t", drafter=drafter, tree=tree)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rounds_feed_counters_and_the_accepted_length_histogram():
    metrics = SpecfleetMetrics()
    metrics.observe_round(record(accepted=(3, 1), emitted=6))
    metrics.observe_round(record(accepted=(0,), emitted=1))
    metrics.observe_round(record(accepted=(0,), emitted=1, k=0, exit_layer=None, drafter=PLAIN))
    metrics.observe_round(record(accepted=(2,), emitted=3, k=8, tree="dynamic-4x2"))
    samples = scrape(metrics)
    assert samples[("specfleet_rounds_total", labels(target="t", drafter="d", exit="2", k="8", tree="dynamic-4x2"))] == 1
    assert samples[("specfleet_draft_tokens_total", PAIR)] == 9
    assert samples[("specfleet_accepted_tokens_total", PAIR)] == 4
    assert samples[("specfleet_emitted_tokens_total", PAIR)] == 7
    assert samples[("specfleet_rounds_total", PAIR)] == 3
    assert samples[("specfleet_rounds_total", labels(target="t", drafter="", exit="0", k="0", tree=""))] == 1
    assert samples[("specfleet_accepted_length_per_round_count", PAIR)] == 3
    assert samples[("specfleet_accepted_length_per_round_sum", PAIR)] == 4
    assert samples[("specfleet_accepted_length_per_round_bucket", PAIR | {("le", "0.0")})] == 1
    assert samples[("specfleet_accepted_length_per_round_bucket", PAIR | {("le", "1.0")})] == 2
    assert samples[("specfleet_accepted_length_per_round_bucket", PAIR | {("le", "+Inf")})] == 3


def test_a_real_engine_s_rounds_add_up_in_the_scrape(target, drafter_runner, prompts):
    metrics = SpecfleetMetrics()
    engine = SpeculationEngine(target, ModelDrafter(drafter_runner), k=2, exit_layer=1, target_name="t", drafter_name="d")
    engine.add(prompts[0], make_sampling_params(temperature=0, max_tokens=12, ignore_eos=True))
    final = None
    while engine.num_live:
        final = engine.step()[0]
        for r in engine.drain_telemetry():
            metrics.observe_round(r)
    pair = labels(target="t", drafter="d", exit="1", k="2", tree="")
    samples = scrape(metrics)
    assert samples[("specfleet_rounds_total", pair)] == final.stats.target_forwards
    assert samples[("specfleet_accepted_tokens_total", pair)] == final.stats.accepted
    assert samples[("specfleet_emitted_tokens_total", pair)] == final.stats.emitted


def test_a_timed_request_records_latency_first_token_and_token_gaps():
    metrics, clock = SpecfleetMetrics(), Clock()
    timer = RequestTimer(metrics, "t", clock)
    clock.now += 0.5
    timer.tokens(3)  # first update: time to first token 0.5 s, two tokens came with it
    clock.now += 0.3
    timer.tokens(2)  # 0.3 s later: two gaps of 0.15 s
    clock.now += 0.1
    timer.tokens(0)  # an empty update changes nothing
    timer.finish("length")
    timer.finish("error")  # recorded once only
    samples = scrape(metrics)
    target = labels(target="t")
    assert samples[("specfleet_requests_total", labels(target="t", outcome="length"))] == 1
    assert ("specfleet_requests_total", labels(target="t", outcome="error")) not in samples
    assert samples[("specfleet_time_to_first_token_seconds_sum", target)] == pytest.approx(0.5)
    assert samples[("specfleet_request_latency_seconds_sum", target)] == pytest.approx(0.9)
    assert samples[("specfleet_inter_token_latency_seconds_count", target)] == 4
    assert samples[("specfleet_inter_token_latency_seconds_sum", target)] == pytest.approx(0.3)  # last - first token


def test_a_request_without_tokens_has_no_time_to_first_token():
    metrics = SpecfleetMetrics()
    metrics.request("t").finish("cancelled")
    samples = scrape(metrics)
    assert samples[("specfleet_requests_total", labels(target="t", outcome="cancelled"))] == 1
    assert samples[("specfleet_request_latency_seconds_count", labels(target="t"))] == 1
    assert ("specfleet_time_to_first_token_seconds_count", labels(target="t")) not in samples


def test_the_registry_is_private_and_the_body_is_text_exposition():
    first, second = SpecfleetMetrics(), SpecfleetMetrics()  # two instances do not collide
    first.observe_round(record())
    assert ("specfleet_rounds_total", PAIR) not in scrape(second)
    assert REGISTRY.get_sample_value("specfleet_rounds_total", dict(PAIR)) is None
    assert first.content_type.startswith("text/plain")
    assert b"# TYPE specfleet_accepted_length_per_round histogram" in first.render()
