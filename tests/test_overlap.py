"""OverlappedEngine: drafting one group while verifying the other keeps every output exact.

The drafter here drafts slowly on a thread of its own, as one in another
process does, so proposals really are in flight while the target verifies.
"""

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from actors.cascades import CascadeParams
from actors.drafters import ModelDrafter
from actors.engine import SpeculationEngine
from actors.errors import DrafterUnavailable
from actors.generator import SpeculativeGenerator
from actors.overlap import OverlappedEngine
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from actors.speculation import SpeculationSpec
from actors.trees import TreeShape

from engine_runs import run_to_end

GREEDY = make_sampling_params(temperature=0, max_tokens=20, ignore_eos=True)


class BackgroundDrafter(ModelDrafter):
    """A model drafter that runs every call on one worker thread, in call order, drafting slowly.

    Like an actor reached through `RemoteDrafter`: `propose_async` returns at
    once, commits and finishes are sent without waiting. The `die_at`-th
    proposal fails while in flight, and so does every call after it; proposals
    from the `hold_from`-th on wait until `release` is set.
    """

    def __init__(self, runner: ModelRunner, delay_s: float = 0.01, die_at: int | None = None, hold_from: int | None = None):
        super().__init__(runner)
        self.delay_s, self.die_at, self.hold_from = delay_s, die_at, hold_from
        self.release = threading.Event()
        self.proposals, self.dead = 0, False
        self.drafting = threading.Event()  # set while a proposal is being drafted
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="background-drafter")
        self._sent: list[Future] = []

    def propose_async(self, requests) -> Future:
        self.proposals += 1
        held = self.hold_from is not None and self.proposals >= self.hold_from
        return self._worker.submit(self._draft_slowly, list(requests), self.proposals == self.die_at, held)

    def propose(self, requests):
        return self.propose_async(requests).result()

    def start(self, seq_id, prompt, params) -> None:
        self._worker.submit(self._alive, ModelDrafter.start, seq_id, prompt, params).result()

    def commit(self, seq_id, emitted) -> None:
        self._sent.append(self._worker.submit(self._alive, ModelDrafter.commit, seq_id, emitted))

    def finish(self, seq_id) -> None:
        self._sent.append(self._worker.submit(self._alive, ModelDrafter.finish, seq_id))

    def settle(self) -> None:
        """Wait until every call sent has run; raise the first one's error."""
        for sent in self._sent:
            sent.result()
        self._sent.clear()

    def _draft_slowly(self, requests, dies: bool, held: bool):
        self.drafting.set()
        try:
            if held:
                self.release.wait()
            time.sleep(self.delay_s)
            self.dead = self.dead or dies
            return self._alive(ModelDrafter.propose, requests)
        finally:
            self.drafting.clear()

    def _alive(self, method, *args):
        if self.dead:
            raise DrafterUnavailable("the drafter died")
        return method(self, *args)


def in_order(tokens: dict, count: int) -> list[list[int]]:
    return [tokens[i] for i in range(count)]


@pytest.fixture
def plain(target, prompts) -> list[list[int]]:
    return [r.tokens for r in SpeculativeGenerator(target).generate(prompts, GREEDY)]


def verifies_while_drafting(target, drafter: BackgroundDrafter) -> list[bool]:
    """Record, at the end of each target forward, whether the drafter was drafting meanwhile."""
    seen, forward = [], target.forward

    def watched(*args, **kwargs):
        logits = forward(*args, **kwargs)
        seen.append(drafter.drafting.is_set())
        return logits

    target.forward = watched
    return seen


def test_greedy_output_is_the_targets_with_joins_overrides_and_plan_changes(target, drafter_runner, prompts, plain):
    drafter = BackgroundDrafter(drafter_runner)
    overlapped = verifies_while_drafting(target, drafter)
    engine = OverlappedEngine(target, drafter, k=3, exit_layer=2)
    overrides = [{}, {"k": 0}, {"k": 5, "exit_layer": 4}, {}, {"exit_layer": 1}, {}, {"k": 2}, {}]  # SpeculationSpec fields
    tokens, waiting, steps = {}, list(enumerate(prompts)), 0
    while waiting or engine.num_live:
        if waiting and steps % 2 == 0:  # newcomers join while the others are mid-generation
            index, prompt = waiting.pop(0)
            engine.add(prompt, GREEDY, seq_id=index, spec=SpeculationSpec(**overrides[index]))
        if steps in (6, 14):
            engine.set_plan(*((0, None) if steps == 6 else (4, 4)))  # off, then on again, with drafts in flight
        for update in engine.step():
            tokens.setdefault(update.seq_id, []).extend(update.new_tokens)
        steps += 1
    assert in_order(tokens, len(prompts)) == plain
    drafter.settle()
    assert target.num_sequences == 0 and drafter_runner.num_sequences == 0
    assert any(overlapped), "the target never verified while the drafter drafted"
    assert sum(r.drafted for r in engine.drain_telemetry()) > 0


def test_drafting_sequences_take_turns_in_two_even_groups(target, drafter_runner, prompts):
    engine = OverlappedEngine(target, BackgroundDrafter(drafter_runner), k=3)
    for index, prompt in enumerate(prompts[:4]):
        engine.add(prompt, GREEDY, seq_id=index)
    groups = [sorted(u.seq_id for u in engine.step()) for _ in range(6)]
    assert groups[0] == [0, 1]  # the first half drafted at once; the second half went ahead
    assert groups[1:] == [[2, 3], [0, 1]] * 2 + [[2, 3]]
    engine.close()


def test_a_lone_sequence_is_not_split(target, drafter_runner, prompts, plain):
    engine = OverlappedEngine(target, BackgroundDrafter(drafter_runner), k=3)
    engine.add(prompts[2], GREEDY, seq_id="alone")
    tokens = []
    while engine.num_live:
        updates = engine.step()
        assert len(updates) == 1 and updates[0].stats.drafted > 0  # verified, with a draft, every step
        tokens += updates[0].new_tokens
    assert tokens == plain[2]


def test_sampled_output_is_the_same_draws_as_without_overlap(target, drafter_runner, prompts):
    """Same seeds, same tokens: each sequence makes the very random draws of the plain speculative engine."""
    params = [make_sampling_params(temperature=1.2, top_k=50, seed=s, max_tokens=16, ignore_eos=True) for s in range(len(prompts))]
    cascade = CascadeParams(rule="diff", alpha=0.2)
    outputs = []
    for engine_class in (SpeculationEngine, OverlappedEngine):
        engine = engine_class(target, BackgroundDrafter(drafter_runner), k=3, exit_layer=4)
        for index, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add(prompt, p, seq_id=index, spec=SpeculationSpec(cascade=cascade if index % 3 == 0 else None))
        outputs.append(in_order(run_to_end(engine), len(prompts)))
    assert outputs[0] == outputs[1]
    assert len({tuple(t) for t in outputs[0]}) == len(prompts)


def test_cancelling_a_sequence_with_its_draft_in_flight_frees_it_on_both_models(target, drafter_runner, prompts, plain):
    drafter = BackgroundDrafter(drafter_runner, hold_from=2)
    engine = OverlappedEngine(target, drafter, k=3)
    for index, prompt in enumerate(prompts[:4]):
        engine.add(prompt, GREEDY, seq_id=index)
    first = {u.seq_id: u.new_tokens for u in engine.step()}
    assert sorted(first) == [0, 1]  # 2 and 3 were sent ahead: their proposal is held
    assert drafter.proposals == 2 and engine.cancel(2)
    assert not target.has_sequence(2)
    drafter.release.set()
    drafter.settle()  # the finish ran after the proposal naming 2, which did not fail
    assert not drafter_runner.has_sequence(2) and drafter_runner.has_sequence(3)
    tokens = run_to_end(engine)
    assert 2 not in tokens and [first.get(i, []) + tokens[i] for i in (0, 1, 3)] == [plain[i] for i in (0, 1, 3)]
    drafter.settle()
    assert target.num_sequences == 0 and drafter_runner.num_sequences == 0


def test_a_drafter_dying_with_a_draft_in_flight_loses_no_token(target, drafter_runner, prompts, plain):
    drafter = BackgroundDrafter(drafter_runner, die_at=4)
    engine = OverlappedEngine(target, drafter, k=4, exit_layer=4)
    for index, prompt in enumerate(prompts):
        engine.add(prompt, GREEDY, seq_id=index)
    tokens = run_to_end(engine)
    assert in_order(tokens, len(prompts)) == plain
    assert engine.drafter is None and engine.k == 0 and drafter.dead
    assert target.num_sequences == 0


def test_replacing_the_drafter_with_a_draft_in_flight_stays_exact(target, drafter_runner, drafter_path, prompts, plain):
    old, new_runner = BackgroundDrafter(drafter_runner), ModelRunner.from_pretrained(drafter_path)
    new = BackgroundDrafter(new_runner)
    engine = OverlappedEngine(target, old, k=3, exit_layer=2)
    for index, prompt in enumerate(prompts):
        engine.add(prompt, GREEDY, seq_id=index)
    tokens = {}
    for _ in range(3):
        for update in engine.step():
            tokens.setdefault(update.seq_id, []).extend(update.new_tokens)
    engine.replace_drafter(new, k=4, exit_layer=4)
    old.settle()
    assert drafter_runner.num_sequences == 0  # the old drafter forgot every sequence, in flight or not
    for seq_id, more in run_to_end(engine).items():
        tokens.setdefault(seq_id, []).extend(more)
    assert in_order(tokens, len(prompts)) == plain
    new.settle()
    assert new.proposals > 0 and new_runner.num_sequences == 0 and target.num_sequences == 0


def test_overlapped_rounds_of_token_trees_are_exact(target, drafter_runner, prompts, plain):
    engine = OverlappedEngine(target, BackgroundDrafter(drafter_runner), k=3, tree=TreeShape.parse("dynamic-3x2:5"))
    for index, prompt in enumerate(prompts):
        engine.add(prompt, GREEDY, seq_id=index)
    tokens = run_to_end(engine)
    assert [tokens[i] for i in range(len(prompts))] == plain
    assert {r.tree for r in engine.drain_telemetry() if r.drafted} == {"dynamic-3x2:5"}
