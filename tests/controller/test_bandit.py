"""SlidingWindowUCB on synthetic reward streams, stationary and shifting, seeded."""

import random
import statistics

import pytest

from cluster.controller.bandit import BanditConfig, SlidingWindowUCB

# Goodput-like arms (tokens/s) as the zoo measures them: plain decoding, three
# k=1..2 arms within 25% of each other, and slow deep/long ones.
BEFORE = {"off": 300.0, "e1k1": 390.0, "e2k1": 410.0, "e2k2": 360.0, "e4k1": 320.0, "e4k4": 200.0}
# After the shift drafts are mostly rejected: every speculating arm falls below plain decoding.
AFTER = {"off": 300.0, "e1k1": 250.0, "e2k1": 230.0, "e2k2": 200.0, "e4k1": 200.0, "e4k4": 140.0}
NOISE = 0.1  # standard deviation of a reward, relative to its arm's mean


def play(rounds: int, seed: int, shift_at: int | None = None, scale: float = 1.0, config: BanditConfig | None = None,
         after: dict = AFTER):
    """Play a seeded stream; returns (arms chosen, regret of each pull against the best arm of that moment)."""
    rng, bandit = random.Random(seed), SlidingWindowUCB(list(BEFORE), config)
    chosen, regrets = [], []
    for t in range(rounds):
        means = after if shift_at is not None and t >= shift_at else BEFORE
        arm = bandit.select()
        bandit.update(arm, scale * max(0.0, rng.gauss(means[arm], NOISE * means[arm])))
        chosen.append(arm)
        regrets.append(max(means.values()) - means[arm])
    return chosen, regrets


@pytest.mark.parametrize("seed", range(4))
def test_a_stationary_stream_converges_to_the_best_arm(seed):
    chosen, _ = play(3000, seed)
    assert chosen[: len(BEFORE)] == list(BEFORE)  # every arm once, in order, first
    assert chosen[-500:].count("e2k1") / 500 > 0.9


def test_regret_grows_sublinearly():
    """Mean regret over 5 seeds at T and 4T: linear growth would give a ratio of 4, logarithmic well under 2."""
    regret = lambda rounds: statistics.mean(sum(play(rounds, seed)[1]) for seed in range(5))  # noqa: E731
    short, long = regret(750), regret(3000)
    assert long / short < 2.0, f"regret {short:.0f} at T, {long:.0f} at 4T"


@pytest.mark.parametrize("seed", range(4))
def test_after_a_shift_it_moves_to_the_new_best_arm_within_200_rounds(seed):
    chosen, _ = play(2500, seed, shift_at=1500)
    assert chosen[1400:1500].count("e2k1") > 90  # settled before the shift
    assert chosen[1700:].count("off") / len(chosen[1700:]) > 0.9  # and on plain decoding 200 rounds after it


@pytest.mark.parametrize("seed", range(4))
def test_a_shift_that_also_triples_every_reward_is_followed_too(seed):
    """E.g. four times the batch: every arm earns more tokens per second, and plain decoding most."""
    chosen, _ = play(2000, seed, shift_at=1500, after={arm: 3 * mean for arm, mean in AFTER.items()})
    assert chosen[1700:].count("off") / len(chosen[1700:]) > 0.9


def test_regret_after_a_shift_is_sublinear_too():
    """Regret accrued after the shift, over 1000 vs 4000 rounds (each seeded stream shifts at round 1000)."""
    after = lambda rounds: statistics.mean(sum(play(1000 + rounds, s, shift_at=1000)[1][1000:]) for s in range(5))  # noqa: E731
    assert after(4000) / after(1000) < 2.0


def test_the_choice_does_not_depend_on_the_reward_unit():
    """Rewards are measured relative to the best arm: tok/s or tok/ms gives the same plays."""
    assert play(600, seed=3)[0] == play(600, seed=3, scale=1e-3)[0]


def test_a_bandit_without_exploration_can_lock_onto_a_worse_arm():
    """The exploration bonus is what finds the best arm: without it the first lucky estimate wins."""
    greedy = BanditConfig(exploration=0.0, min_noise=1e-9)
    locked = sum(play(1000, seed, config=greedy)[0][-300:].count("e2k1") < 150 for seed in range(12))
    explored = sum(play(1000, seed)[0][-300:].count("e2k1") < 150 for seed in range(12))
    assert locked >= 2 and explored == 0  # seeded: 3 of 12 streams lock in without the bonus


def test_means_and_counts_follow_the_window():
    bandit = SlidingWindowUCB(["a", "b"], BanditConfig(window=3))
    for reward in (1.0, 2.0, 3.0, 4.0):
        bandit.update("a", reward)
    assert bandit.means() == {"a": 3.0} and bandit.counts() == {"a": 3, "b": 0}
    assert bandit.select() == "b" and bandit.pulls == 4


@pytest.mark.parametrize("arms, message", [([], "at least one arm"), (["a", "a"], "distinct")])
def test_bad_arm_sets_are_refused(arms, message):
    with pytest.raises(ValueError, match=message):
        SlidingWindowUCB(arms)


@pytest.mark.parametrize("arm, reward, message", [("z", 1.0, "unknown arm"), ("a", -1.0, ">= 0"), ("a", float("nan"), "finite")])
def test_bad_updates_are_refused(arm, reward, message):
    with pytest.raises(ValueError, match=message):
        SlidingWindowUCB(["a"]).update(arm, reward)


def test_a_change_in_an_arm_drops_every_older_reward():
    bandit = SlidingWindowUCB(["a", "b"], BanditConfig(window=64, change_window=8))
    rng = random.Random(0)
    for _ in range(40):
        bandit.update("a", rng.gauss(100, 5))
        bandit.update("b", rng.gauss(80, 5))
    assert bandit.counts() == {"a": 40, "b": 40}  # noise alone triggers nothing
    for _ in range(12):
        bandit.update("a", rng.gauss(50, 5))
    assert bandit.counts()["a"] <= 12  # dropped within a few pulls, from the change point on:
    assert bandit.means()["a"] == pytest.approx(50, abs=3)  # one old reward left would add 4
    assert bandit.counts()["b"] == 0 and bandit.restarts == 1  # b's rewards all predate the change
    assert bandit.select() == "b"  # so b is measured again


def test_many_empty_windows_upset_nothing():
    """After a restart most arms may hold no reward while the played one is tested for changes."""
    bandit = SlidingWindowUCB(list("abcdefghij"))
    for reward in (100, 101, 102) * 3:
        bandit.update("a", reward)
    assert bandit.select() == "b" and bandit.restarts == 0
