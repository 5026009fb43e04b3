"""Re-pairing target replicas with drafter replicas by drafting load."""

import pytest

from cluster.controller.pairing import DraftLoad, best_move, drafter_loads


def test_drafter_loads_sum_their_target_replicas():
    pairing = {"a": 0, "b": 1, "c": 0}
    assert drafter_loads(pairing, {"a": 10.0, "b": 3.0, "c": 5.0}, 3) == [15.0, 3.0, 0.0]


def test_the_move_brings_the_busiest_and_idlest_closest_to_even():
    pairing = {"a": 0, "b": 0, "c": 0, "d": 1}
    loads = {"a": 30.0, "b": 12.0, "c": 50.0, "d": 10.0}  # 92 vs 10: gap 82, half 41; moving c leaves 42 vs 60
    assert best_move(pairing, loads, 2, margin=0.25) == ("c", 1)


def test_an_idle_new_replica_takes_load():
    assert best_move({"a": 0, "b": 0}, {"a": 20.0, "b": 20.0}, 2, margin=0.25) == ("a", 1)


@pytest.mark.parametrize("pairing, loads, replicas", [
    ({"a": 0, "b": 1}, {"a": 20.0, "b": 18.0}, 2),  # within the margin
    ({"a": 0}, {"a": 20.0}, 2),  # one busy target: moving it would only swap which replica is busy
    ({"a": 0, "b": 0}, {"a": 20.0, "b": 20.0}, 1),  # nowhere to move
    ({"a": 0, "b": 1}, {}, 2),  # nothing measured
])
def test_no_move_when_it_would_not_narrow_a_clear_gap(pairing, loads, replicas):
    assert best_move(pairing, loads, replicas, margin=0.25) is None


def test_moves_settle_instead_of_oscillating():
    pairing, loads = {"a": 0, "b": 0, "c": 0, "d": 0}, {"a": 9.0, "b": 7.0, "c": 5.0, "d": 3.0}
    for _ in range(10):
        move = best_move(pairing, loads, 2, margin=0.25)
        if move is None:
            break
        pairing[move[0]] = move[1]
    else:
        pytest.fail("moves did not settle")
    assert drafter_loads(pairing, loads, 2) == [12.0, 12.0]


def test_draft_load_smooths_rates_and_ignores_empty_periods():
    load = DraftLoad(smoothing=0.5)
    load.observe("a", drafted=100, seconds=1.0)
    load.observe("a", drafted=0, seconds=0.0)  # no time passed: no evidence
    assert load.of("a") == 100.0
    load.observe("a", drafted=300, seconds=1.0)
    assert load.of("a") == 200.0
    load.forget("a")
    assert load.of("a") == 0.0 and load.of("never seen") == 0.0
