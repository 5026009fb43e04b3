"""SpeculationEngine: continuous batching, cancellation, and falling back when the drafter dies."""

import pytest

from actors.drafters import ModelDrafter
from actors.engine import SpeculationEngine
from actors.errors import DrafterUnavailable, InvalidRequest
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from actors.speculation import NO_SPECULATION, SpeculationSpec

from engine_runs import run_to_end, run_with_arms

GREEDY = make_sampling_params(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture
def plain(target, prompts) -> list[list[int]]:
    return [r.tokens for r in SpeculativeGenerator(target).generate(prompts, GREEDY)]


def test_sequences_joining_mid_run_get_the_same_tokens(target, drafter_runner, prompts, plain):
    engine = SpeculationEngine(target, ModelDrafter(drafter_runner), k=3, exit_layer=2)
    tokens: dict = {}
    waiting = list(enumerate(prompts))
    while waiting or engine.num_live:
        if waiting:  # one newcomer per step, while the others are mid-generation
            index, prompt = waiting.pop(0)
            engine.add(prompt, GREEDY, seq_id=index)
        for update in engine.step():
            tokens.setdefault(update.seq_id, []).extend(update.new_tokens)
    assert [tokens[i] for i in range(len(prompts))] == plain


def test_cancel_frees_the_sequence_on_both_models(target, drafter_runner, prompts):
    engine = SpeculationEngine(target, ModelDrafter(drafter_runner), k=4)
    engine.add(prompts[0], GREEDY, seq_id="keep")
    engine.add(prompts[1], GREEDY, seq_id="drop")
    engine.step()
    assert target.has_sequence("drop") and drafter_runner.has_sequence("drop")
    assert engine.cancel("drop") and not engine.cancel("drop")
    assert not target.has_sequence("drop") and not drafter_runner.has_sequence("drop")
    assert run_to_end(engine)["keep"]
    assert target.num_sequences == 0 and drafter_runner.num_sequences == 0


class DyingDrafter(ModelDrafter):
    """A model drafter whose every call fails once `die_after` proposals were served."""

    def __init__(self, runner, die_after: int):
        super().__init__(runner)
        self.calls_left = die_after

    def propose(self, requests):
        if self.calls_left == 0:
            raise DrafterUnavailable("drafter actor died")
        self.calls_left -= 1
        return super().propose(requests)


def test_a_dying_drafter_falls_back_to_plain_decoding_without_losing_tokens(target, drafter_runner, prompts, plain):
    engine = SpeculationEngine(target, DyingDrafter(drafter_runner, die_after=3), k=4, exit_layer=4)
    for index, prompt in enumerate(prompts):
        engine.add(prompt, GREEDY, seq_id=index)
    tokens = run_to_end(engine)
    assert [tokens[i] for i in range(len(prompts))] == plain
    assert engine.drafter is None and engine.k == 0


def test_duplicate_ids_are_refused(target):
    engine = SpeculationEngine(target)
    engine.add([1, 2], GREEDY, seq_id="x")
    with pytest.raises(InvalidRequest, match="already being generated"):
        engine.add([1, 2], GREEDY, seq_id="x")
    engine.close()
    assert target.num_sequences == 0


def test_sequences_the_drafter_has_no_room_for_decode_plainly_and_exactly(target, drafter_path, prompts, plain):
    small_drafter = ModelRunner.from_pretrained(drafter_path, max_sequences=2)
    engine = SpeculationEngine(target, ModelDrafter(small_drafter), k=3, exit_layer=2)
    for index, prompt in enumerate(prompts):
        engine.add(prompt, GREEDY, seq_id=index)
    tokens, arms = run_with_arms(engine)
    assert [tokens[i] for i in range(len(prompts))] == plain
    assert arms[0] != {(None, 0)} and arms[len(prompts) - 1] == {(None, 0)}  # the first two draft, the rest cannot
    assert engine.drafter is not None and small_drafter.num_sequences == 0


def test_a_sequence_that_asked_for_no_speculation_leaves_the_drafter_slot_to_one_that_drafts(
    target, drafter_path, prompts, plain
):
    one_slot = ModelRunner.from_pretrained(drafter_path, max_sequences=1)
    engine = SpeculationEngine(target, ModelDrafter(one_slot), k=3, exit_layer=2)
    engine.add(prompts[0], GREEDY, seq_id="plain", spec=NO_SPECULATION)
    engine.add(prompts[1], GREEDY, seq_id="drafts")
    engine.set_plan(4)  # a plan never reaches a sequence that asked for none
    slot_holders = []
    tokens, arms = run_with_arms(engine, lambda: slot_holders.append(
        (one_slot.has_sequence("plain"), one_slot.has_sequence("drafts"))))
    assert slot_holders[0] == (False, True)  # after the first step both are live; only one holds the drafter slot
    assert [tokens["plain"], tokens["drafts"]] == plain[:2]
    assert arms["plain"] == {(None, 0)} and (None, 0) not in arms["drafts"]


def test_a_target_without_its_drafter_decodes_a_fixed_speculation_request_plainly(target, prompts, plain):
    engine = SpeculationEngine(target)  # e.g. its drafter died before the request came
    engine.add(prompts[0], GREEDY, seq_id="fixed", spec=SpeculationSpec(k=4, exit_layer=2))
    assert run_to_end(engine)["fixed"] == plain[0]


def test_the_deepest_exit_is_resolved_to_a_number_once(target, drafter_runner, prompts):
    engine = SpeculationEngine(target, ModelDrafter(drafter_runner), k=2)
    assert engine.exit_layer == max(drafter_runner.exit_layers)
    engine.set_plan(3, 1)
    assert engine.exit_layer == 1
    engine.set_plan(3, None)
    assert engine.exit_layer == max(drafter_runner.exit_layers)
    engine.add(prompts[0], GREEDY, seq_id="s")
    assert {u.arm for u in engine.step()} == {(max(drafter_runner.exit_layers), 3)}
    with pytest.raises(InvalidRequest, match="exit"):
        engine.add(prompts[1], GREEDY, spec=SpeculationSpec(exit_layer=99))
    engine.close()
