"""SpeculationEngine.set_plan: plans change mid-sequence and outputs stay exact."""

import itertools

import pytest
import ray
import torch
from transformers import LlamaForCausalLM

from actors.drafters import ModelDrafter
from actors.engine import SpeculationEngine
from actors.engine_loop import EngineLoop
from actors.errors import InvalidRequest
from actors.generator import SpeculativeGenerator
from actors.ray_actors import DrafterActor, RemoteDrafter
from actors.runner import ModelRunner, RunnerSettings
from actors.sampling import make_sampling_params
from actors.speculation import SpeculationSpec
from test_generator import chi_square_excess, first_two_token_distributions

GREEDY = make_sampling_params(temperature=0, max_tokens=24, ignore_eos=True)
# (k, exit): on, off twice, on at another depth, on shallow, off, on at the deepest exit by default
PLANS = [(3, 2), (0, None), (0, None), (2, 4), (1, 1), (0, None), (4, None)]


@pytest.fixture(scope="module")
def plain(target_path, prompts) -> list[list[int]]:
    """The target's own greedy tokens, computed once for the module's tests."""
    target = ModelRunner.from_pretrained(target_path)
    return [r.tokens for r in SpeculativeGenerator(target).generate(prompts, GREEDY)]


def run_switching_plans(engine: SpeculationEngine, prompts) -> list[list[int]]:
    """Admit one prompt per step and apply the next plan of PLANS (cycling) before every step."""
    tokens: dict = {}
    waiting, plans = list(enumerate(prompts)), itertools.cycle(PLANS)
    while waiting or engine.num_live:
        if waiting:
            index, prompt = waiting.pop(0)
            engine.add(prompt, GREEDY, seq_id=index)
        engine.set_plan(*next(plans))
        for update in engine.step():
            tokens.setdefault(update.seq_id, []).extend(update.new_tokens)
    return [tokens[i] for i in range(len(prompts))]


class CountingDrafter(ModelDrafter):
    def __init__(self, runner):
        super().__init__(runner)
        self.proposals = 0

    def propose(self, requests):
        self.proposals += 1
        return super().propose(requests)


class InProcessHandle:
    """Stands in for a Ray actor handle: `handle.method.remote(...)` runs the method at once.

    Its "refs" are the values themselves, so the test makes ray.get return them and ray.wait find them ready.
    """

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name):
        method = getattr(self.actor, name)
        return type("Method", (), {"remote": staticmethod(method)})


def test_switching_speculation_on_and_off_mid_sequence_keeps_greedy_output_exact(target, drafter_runner, prompts, plain):
    engine = SpeculationEngine(target, CountingDrafter(drafter_runner), k=4)
    assert run_switching_plans(engine, prompts) == plain
    assert engine.drafter.proposals < sum(len(t) for t in plain)  # it did draft, and it skipped rounds
    assert target.num_sequences == 0 and drafter_runner.num_sequences == 0


def test_a_remote_drafter_catches_up_on_commits_buffered_while_off(target, drafter_path, prompts, plain, monkeypatch):
    """RemoteDrafter's real buffering, against a real DrafterActor called in process instead of through Ray."""
    monkeypatch.setattr("actors.ray_actors.ray.get", lambda value, timeout=None: value)
    monkeypatch.setattr("actors.ray_actors.ray.wait", lambda values, num_returns=1, timeout=None: (list(values), []))
    actor = DrafterActor(str(drafter_path), RunnerSettings())
    remote = RemoteDrafter(InProcessHandle(actor), {"vocab_size": target.vocab_size, "path": drafter_path, "exit_layers": [1, 2, 4],
                                                    "max_exit": 4}, 5.0)
    engine = SpeculationEngine(target, remote, k=3, exit_layer=2)
    assert run_switching_plans(engine, prompts[:4]) == plain[:4]

    engine.add(prompts[3], GREEDY, seq_id="late")
    engine.set_plan(0)
    for _ in range(5):
        engine.step()
    drafter_runner = actor.batcher.drafter.runner
    actor.batcher._forward_thread.submit(lambda: None).result(timeout=60)  # the prefill `start` queued has run
    assert len(remote._commits) == 5  # nothing reached it while off: it holds its prompt, prefilled at start, alone
    assert drafter_runner.cached_length("late") == len(prompts[3]) - 1
    engine.set_plan(2, 1)
    engine.step()
    assert len(remote._commits) == 1  # the 5 rode along with the proposal; this round's waits for the next
    assert drafter_runner.cached_length("late") >= len(prompts[3]) + 5  # it drafted from the whole true context
    engine.close()
    assert not ray.is_initialized()  # a ray call on a stand-in value would have started Ray for every later test


def test_an_off_plan_skips_the_drafter_unless_a_sequence_asks_for_drafts(target, drafter_runner, prompts):
    drafter = CountingDrafter(drafter_runner)
    engine = SpeculationEngine(target, drafter, k=2)
    engine.add(prompts[0], GREEDY)
    engine.set_plan(0)
    for _ in range(4):
        engine.step()
    assert drafter.proposals == 0
    assert {(r.k, r.drafted) for r in engine.drain_telemetry()} == {(0, 0)}
    engine.add(prompts[1], GREEDY, spec=SpeculationSpec(k=3))  # a per-request override still drafts
    engine.step()
    assert drafter.proposals == 1
    engine.close()


def test_switching_plans_keeps_sampled_output_on_the_target_distribution(target_path, drafter_path, prompts):
    """First token drafted at exit 1 (k = 1), then speculation off: both tokens follow p exactly."""
    prompt, samples, temperature = prompts[0], 3000, 1.3
    exact = first_two_token_distributions(LlamaForCausalLM.from_pretrained(target_path).eval(), prompt, temperature)
    # every sample decodes in the same two rounds, so each model needs a KV slot per sample
    target = ModelRunner.from_pretrained(target_path, max_sequences=samples)
    drafter = ModelRunner.from_pretrained(drafter_path, max_sequences=samples)
    engine = SpeculationEngine(target, ModelDrafter(drafter), k=1, exit_layer=1)
    for seed in range(samples):
        engine.add(prompt, make_sampling_params(temperature=temperature, max_tokens=2, seed=seed, ignore_eos=True), seq_id=seed)
    tokens: dict = {}
    for plan in ((1, 1), (0, None)):
        engine.set_plan(*plan)
        for update in engine.step():
            tokens.setdefault(update.seq_id, []).extend(update.new_tokens)
    records = engine.drain_telemetry()
    assert sum(r.accepted for r in records) > samples // 10  # accepted drafts, and...
    assert any(r.k == 0 for r in records)  # ...plain rounds both produced second tokens
    drawn = torch.tensor([tokens[s] for s in range(samples)])  # [samples, 2]
    for position in range(2):
        counts = torch.bincount(drawn[:, position], minlength=target.vocab_size).float()
        assert chi_square_excess(counts, exact[position]) < 5, f"position {position}"


@pytest.mark.parametrize("k, exit_layer, message", [(-1, None, "draft length k"), (65, None, "draft length k"),
                                                    (2, 7, "exit 7 is outside")])
def test_bad_plans_are_refused_and_leave_the_plan_alone(target, drafter_runner, k, exit_layer, message):
    engine = SpeculationEngine(target, ModelDrafter(drafter_runner), k=3, exit_layer=2)
    with pytest.raises(InvalidRequest, match=message):
        engine.set_plan(k, exit_layer)
    assert (engine.k, engine.exit_layer) == (3, 2)


def test_a_target_without_drafter_accepts_only_plain_decoding(target):
    engine = SpeculationEngine(target)
    engine.set_plan(0)
    with pytest.raises(InvalidRequest, match="no drafter"):
        engine.set_plan(2)


def test_a_plan_reaches_a_running_engine_loop_between_rounds(target, drafter_runner, prompts, plain):
    loop = EngineLoop(SpeculationEngine(target, ModelDrafter(drafter_runner), k=3, exit_layer=2))
    feed = loop.submit("s", prompts[0], GREEDY)
    [(_, first)] = feed.output.get()
    tokens = list(first.new_tokens)
    loop.call(lambda engine: engine.set_plan(0))
    with pytest.raises(InvalidRequest):
        loop.call(lambda engine: engine.set_plan(2, 9))
    loop.call(lambda engine: engine.set_plan(1, 1))
    while True:
        [(_, update)] = feed.output.get()
        tokens += update.new_tokens
        if update.finish_reason is not None:
            break
    assert tokens == plain[0]
    assert {r.k for r in loop.engine.drain_telemetry()} >= {3, 1}
