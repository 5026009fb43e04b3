"""Concurrency limits of the front doors (cluster/admission.py): counts, per key, and shared between doors."""

import pytest

from cluster.admission import LOAD_REPORT_TTL_S, ConcurrencyLimits, DoorLoad, FleetLoad, Overloaded
from cluster.auth import ApiKeys


def test_the_fleet_limit_counts_this_door_and_the_others():
    limits = ConcurrencyLimits(max_total=3, max_per_key=None)
    limits.acquire(None)
    limits.others = DoorLoad(total=2)
    with pytest.raises(Overloaded, match="on this fleet"):
        limits.acquire(None)
    limits.release(None)
    limits.acquire(None)
    assert limits.own() == DoorLoad(1, {})


def test_the_key_limit_counts_each_key_apart_and_names_no_key():
    limits = ConcurrencyLimits(max_total=100, max_per_key=2)
    limits.acquire("fingerprint-a")
    limits.others = DoorLoad(total=1, per_key={"fingerprint-a": 1})
    with pytest.raises(Overloaded) as refused:
        limits.check("fingerprint-a")
    assert "2 requests in flight" in str(refused.value) and "fingerprint" not in str(refused.value)
    limits.acquire("fingerprint-b")
    limits.acquire(None)  # no key: only the fleet's limit
    assert limits.own() == DoorLoad(3, {"fingerprint-a": 1, "fingerprint-b": 1})
    limits.release("fingerprint-a")
    assert limits.own() == DoorLoad(2, {"fingerprint-b": 1})


def test_the_controller_sums_the_other_live_doors():
    now = [0.0]
    load = FleetLoad(clock=lambda: now[0])
    assert load.report("a", DoorLoad(2, {"k": 2})) == DoorLoad(0, {})
    assert load.report("b", DoorLoad(1, {"k": 1, "j": 1})) == DoorLoad(2, {"k": 2})
    assert load.report("c", DoorLoad()) == DoorLoad(3, {"k": 3, "j": 1})
    now[0] = LOAD_REPORT_TTL_S + 1  # "a" and "b" stopped reporting: they no longer count
    assert load.report("c", DoorLoad()) == DoorLoad(0, {})


def test_a_key_fingerprint_is_stable_and_is_not_the_key():
    keys = ApiKeys(["first-key", "second-key"])
    first = keys.fingerprint("Bearer first-key")
    assert first == keys.fingerprint("first-key") != keys.fingerprint("Bearer second-key")
    assert "first" not in first and keys.fingerprint("Bearer wrong") is None and keys.fingerprint(None) is None
