"""SpeculationPolicy: round records in, plans out; on synthetic records and on a real engine."""

import random

import pytest
from pydantic import ValidationError

from actors.drafters import ModelDrafter
from actors.engine import SpeculationEngine
from actors.generator import SpeculativeGenerator
from actors.sampling import make_sampling_params
from actors.telemetry import RoundRecord
from actors.trees import TreeShape
from cluster.controller.policy import OFF, PolicyConfig, SpeculationPolicy, batch_bucket

GREEDY = make_sampling_params(temperature=0, max_tokens=20, ignore_eos=True)


def rounds(arm, goodput: float, count: int = 1, sequences: int = 2, round_sequences: int = 2) -> list[RoundRecord]:
    """Records of `count` rounds of an arm that emitted `goodput` tokens per second of round time."""
    exit_layer, draft = arm
    k, tree = (draft.nodes, draft.label) if isinstance(draft, TreeShape) else (draft, "")
    return [RoundRecord(exit_layer, k, sequences, round_sequences, drafted=k * sequences, accepted_lengths=(0,) * sequences,
                        emitted=int(goodput / 10), draft_s=0.05, verify_s=0.05, tree=tree) for _ in range(count)]


def test_the_arms_are_off_and_every_exit_k_pair():
    policy = SpeculationPolicy(PolicyConfig(exits=[1, 4], ks=[2, 3]))
    assert policy.arms == [OFF, (1, 2), (1, 3), (4, 2), (4, 3)]


def test_tree_shapes_are_arms_beside_the_chains_and_win_when_they_pay():
    tree = TreeShape.parse("dynamic-4x2")
    policy = SpeculationPolicy(PolicyConfig(exits=[2], ks=[4], trees=["dynamic-4x2"]))
    assert policy.arms == [OFF, (2, 4), (2, tree)]
    goodput = {OFF: 300, (2, 4): 330, (2, tree): 420}
    rng = random.Random(1)
    for _ in range(200):
        plan = policy.plan()
        policy.observe(rounds(plan.arm, rng.gauss(goodput[plan.arm], 20)))
    plan = policy.plan()
    assert (plan.arm, plan.tree, plan.k) == ((2, tree), tree, 8)
    assert plan.reason.startswith("exit 2 tree dynamic-4x2: 4")
    # a round of the same nodes drafted as a chain is another arm
    assert policy.observe(rounds((2, 8), 900)) == 0


@pytest.mark.parametrize("field, value", [("trees", ["bushy"]), ("exits", []), ("ks", [0, 2]), ("exits", [2, 2]), ("bandit", {"window": 1})])
def test_bad_configs_are_refused(field, value):
    with pytest.raises(ValidationError):
        PolicyConfig(**{field: value})


def test_only_whole_rounds_of_known_arms_become_rewards():
    policy = SpeculationPolicy(PolicyConfig(exits=[2], ks=[1]))
    used = policy.observe(rounds((2, 1), 400) + rounds(OFF, 300)  # two whole rounds: rewards
                          + rounds((2, 1), 400, sequences=1)  # shared with another arm: unattributable
                          + rounds((2, 6), 900)  # an arm outside the policy (e.g. a FIXED request)
                          + rounds((None, 3), 900))  # the drafter's default exit
    assert used == 2
    assert policy.batch_bucket == 2 and policy.bandit().counts() == {OFF: 1, (2, 1): 1}
    assert policy.bandit().means()[(2, 1)] == pytest.approx(400)


def test_it_explores_then_plans_the_best_arm_with_a_reason():
    policy = SpeculationPolicy(PolicyConfig(exits=[1, 2], ks=[1, 4]))
    goodput = {OFF: 300, (1, 1): 390, (1, 4): 230, (2, 1): 410, (2, 4): 250}
    rng = random.Random(0)
    plans = []
    for _ in range(400):
        plan = policy.plan()
        plans.append(plan)
        policy.observe(rounds(plan.arm, rng.gauss(goodput[plan.arm], 20)))
    assert [p.arm for p in plans[:5]] == policy.arms  # each arm measured once first
    assert plans[0].reason == "exploring: off not measured yet at batch 1"
    assert sum(p.arm == (2, 1) for p in plans[-100:]) > 80
    assert policy.plan().reason.startswith("exit 2 k 1: 4")  # ~410 tok/s over its window, seeded


def test_an_exploring_plan_says_so():
    policy = SpeculationPolicy(PolicyConfig(exits=[1], ks=[1]))
    for goodput in (280, 320, 290, 310, 300, 300, 320, 280, 300, 300):  # noise of about 6%
        policy.observe(rounds(OFF, goodput))
    policy.observe(rounds((1, 1), 280))  # measured once: its bonus outweighs a 7% gap
    plan = policy.plan()
    assert plan.arm == (1, 1)
    assert plan.reason == ("exit 1 k 1: 280 tok/s over its last 1 periods at batch 2-3 "
                           "(exploring; best measured off at 300 tok/s)")


@pytest.mark.parametrize("sequences, bucket", [(1, 1), (2, 2), (3, 2), (4, 4), (7, 4), (8, 8), (100, 64)])
def test_batch_buckets_are_powers_of_two(sequences, bucket):
    assert batch_bucket(sequences) == bucket


def test_each_batch_bucket_learns_its_own_best_arm():
    """Speculation pays for one sequence per round and not for eight: the plan follows the traffic."""
    policy = SpeculationPolicy(PolicyConfig(exits=[1], ks=[2]))
    goodput = {(1, OFF): 100, (1, (1, 2)): 150, (8, OFF): 600, (8, (1, 2)): 400}
    rng = random.Random(2)
    for batch in (1, 8, 1):
        for _ in range(40):
            arm = policy.plan().arm
            policy.observe(rounds(arm, rng.gauss(goodput[batch, arm], 10), sequences=batch, round_sequences=batch))
        assert policy.plan().arm == ((1, 2) if batch == 1 else OFF)
    assert set(policy.bandits) == {1, 8} and policy.plan().reason.endswith("at batch 1")


def test_it_turns_speculation_off_when_no_arm_beats_plain_decoding():
    policy = SpeculationPolicy(PolicyConfig(exits=[1, 2, 4], ks=[1, 2, 4]))
    rng = random.Random(1)
    for _ in range(300):
        arm = policy.plan().arm
        policy.observe(rounds(arm, rng.gauss(500 if arm == OFF else 350, 25)))
    plan = policy.plan()
    assert (plan.k, plan.exit_layer) == (0, None)
    assert plan.reason.startswith("off: 5")


def test_the_policy_steers_a_real_engine_round_by_round_without_changing_its_output(target, drafter_runner, prompts):
    expected = [r.tokens for r in SpeculativeGenerator(target).generate(prompts, GREEDY)]
    engine = SpeculationEngine(target, ModelDrafter(drafter_runner), k=1)
    policy = SpeculationPolicy(PolicyConfig(exits=[1, 4], ks=[1, 3]))
    for index, prompt in enumerate(prompts):
        engine.add(prompt, GREEDY, seq_id=index)
    tokens, steps, used, arms_at_batch_8 = {}, 0, 0, set()
    while engine.num_live:
        plan = policy.plan()
        engine.set_plan(plan.k, plan.exit_layer)
        for update in engine.step():
            tokens.setdefault(update.seq_id, []).extend(update.new_tokens)
        records = engine.drain_telemetry()
        arms_at_batch_8 |= {(r.exit_layer, r.k) if r.k else OFF for r in records if r.round_sequences == 8}
        used += policy.observe(records)
        steps += 1
    assert [tokens[i] for i in range(len(prompts))] == expected
    assert used == steps == sum(b.pulls for b in policy.bandits.values())  # every round taught it something
    # All 8 sequences share the first rounds, so that bucket's bandit tries every arm. (Not its counts at
    # the end: a timing stall on a loaded machine can look like a change and restart its windows.)
    assert arms_at_batch_8 == set(policy.arms)
