"""Token-tree speculation is lossless: greedy equals the target's own output, sampled follows its distribution."""

import pytest
import torch
from transformers import LlamaForCausalLM

from actors.drafters import DraftRequest, ModelDrafter
from actors.engine import SpeculationEngine
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import SamplingParams, make_generator, make_sampling_params
from actors.speculation import FOLLOW_PLAN, NO_SPECULATION, SpeculationSpec
from actors.tree_verification import TreeToVerify, verify_tree
from actors.trees import Candidate, TreeShape, children_of, sampled_children
from engine_runs import run_with_arms
from test_generator import chi_square_excess, first_two_token_distributions

GREEDY = make_sampling_params(temperature=0, max_tokens=24, ignore_eos=True)
SHAPES = [TreeShape(depth=d, width=w, dynamic=dynamic) for dynamic in (False, True) for d, w in ((1, 3), (3, 2), (4, 3))]
SHAPES.append(TreeShape.parse("dynamic-5x3:6"))  # a budget below depth x width: deep where the drafter is sure


@pytest.fixture
def plain_greedy(target, prompts) -> list[list[int]]:
    return [r.tokens for r in SpeculativeGenerator(target).generate(prompts, GREEDY)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label)
def test_greedy_tree_speculation_equals_the_targets_own_output(target, drafter_runner, prompts, plain_greedy, shape):
    for exit_layer in (1, 4):
        generator = SpeculativeGenerator(target, ModelDrafter(drafter_runner), exit_layer=exit_layer, tree=shape)
        assert [r.tokens for r in generator.generate(prompts, GREEDY)] == plain_greedy, f"batched, exit {exit_layer}"
        for prompt, expected in list(zip(prompts, plain_greedy))[::3]:
            assert generator.generate([prompt], GREEDY)[0].tokens == expected, f"alone, exit {exit_layer}"
        assert target.num_sequences == 0 and drafter_runner.num_sequences == 0


def test_a_drafter_that_is_the_target_has_every_static_tree_path_accepted(target_path, target, prompts, plain_greedy):
    """The drafter's compacted cache must be exact, or its drafts would stop matching the target's."""
    shape = TreeShape(depth=3, width=2)
    generator = SpeculativeGenerator(target, ModelDrafter(ModelRunner.from_pretrained(target_path)), tree=shape)
    results = generator.generate(prompts, make_sampling_params(temperature=0, max_tokens=24, ignore_eos=True))
    assert [r.stats.mean_accepted_length for r in results] == [shape.depth + 1] * len(prompts)


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_dynamic_trees_drafter_cache_after_a_commit_equals_a_fresh_one(drafter_path, prompts, dynamic):
    shape = TreeShape(depth=4, width=3, dynamic=dynamic)
    used = ModelDrafter(ModelRunner.from_pretrained(drafter_path))
    used.start("s", prompts[3], GREEDY)
    draft = used.propose([DraftRequest("s", shape.nodes, 2, tree=shape)])[0]
    children = children_of(draft.parents)
    path = [children[-1][-1]]  # the root's last child, then down its first children
    while children.get(path[-1]):
        path.append(children[path[-1]][0])
    emitted = [draft.tokens[n] for n in path] + [7]
    used.commit("s", emitted)
    assert_drafts_as_fresh(used, drafter_path, prompts[3] + emitted, shape)


def test_a_commit_ending_on_a_node_the_drafter_cached_still_drafts_as_a_fresh_drafter(drafter_path, prompts):
    """The target's next token may spell a beam node the draft left out: the drafter must still feed it."""
    shape = TreeShape(depth=3, width=2, dynamic=True)
    used = ModelDrafter(ModelRunner.from_pretrained(drafter_path))
    used.start("s", prompts[3], GREEDY)
    used.propose([DraftRequest("s", shape.nodes, 2, tree=shape)])
    region = used._states["s"].region  # the beam levels the drafter fed: levels 1 and 2
    child = region.parents.index(0)  # a level-2 node under the first level-1 node
    emitted = [region.tokens[0], region.tokens[child]]
    used.commit("s", emitted)
    assert_drafts_as_fresh(used, drafter_path, prompts[3] + emitted, shape)


def assert_drafts_as_fresh(used: ModelDrafter, drafter_path, context: list[int], shape: TreeShape) -> None:
    fresh = ModelDrafter(ModelRunner.from_pretrained(drafter_path))
    fresh.start("s", context, GREEDY)
    request = [DraftRequest("s", shape.nodes, 2, tree=shape)]
    again, expected = used.propose(request)[0], fresh.propose(request)[0]
    assert (again.tokens, again.parents) == (expected.tokens, expected.parents)


def random_tree(rng: torch.Generator, vocab: int, p: torch.Tensor, q: torch.Tensor, drawn: bool, seed: int) -> TreeToVerify:
    """Depth 2, three children of the root and two under each; the same p and q at every node."""
    generator = make_generator(seed)
    params = SamplingParams(temperature=1.0)
    logits_q = q.log()
    tokens, parents, probs = [], [], []

    def children(parent: int, width: int) -> None:
        if drawn:
            made = sampled_children(logits_q, parent, width, params, generator)
        else:  # chosen (point masses), here uniformly at random: any choice the target's draws do not see is exact
            made = [Candidate(int(t), parent, None, 0.0) for t in torch.randperm(vocab, generator=rng)[:width]]
        for child in made:
            tokens.append(child.token), parents.append(parent), probs.append(child.q)

    children(-1, 3)
    for node in range(3):
        children(node, 2)
    logits = p.log().expand(len(tokens) + 1, vocab)
    return TreeToVerify(tokens, parents, logits, params, generator, torch.stack(probs) if drawn else None)


@pytest.mark.parametrize("drawn", [True, False], ids=["drawn-without-replacement", "chosen"])
def test_every_token_a_tree_emits_follows_the_target_distribution(drawn):
    rng = torch.Generator().manual_seed(7)
    vocab, trials = 8, 6000
    p = torch.softmax(torch.randn(vocab, generator=rng) * 1.5, -1)
    q = torch.softmax(torch.randn(vocab, generator=rng) * 1.5, -1)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    accepted = 0
    for seed in range(trials):
        tree = random_tree(rng, vocab, p, q, drawn, seed)
        verdict = verify_tree(tree)
        emitted = verdict.emitted(tree.tokens)
        accepted += verdict.num_accepted
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    assert accepted > trials // 4  # the accept paths ran, at both depths
    for counts in (first, second):
        assert chi_square_excess(counts, p) < 5
        assert chi_square_excess(counts, q) > 20


def sampled_first_two_tokens(target, drafter: ModelRunner, prompt, temperature, tree: TreeShape, samples: int):
    params = [make_sampling_params(temperature=temperature, max_tokens=2, seed=s, ignore_eos=True) for s in range(samples)]
    results = SpeculativeGenerator(target, ModelDrafter(drafter), exit_layer=4, tree=tree).generate([prompt] * samples, params)
    assert sum(r.stats.accepted for r in results) > samples // 10  # both accept and reject paths ran
    return torch.tensor([r.tokens for r in results])  # [samples, 2]


def test_sampled_static_tree_speculation_follows_the_target_distribution(target, target_path, drafter_runner, prompts):
    """Seeded samples of the first two tokens against their exact distributions, as for chains: children drawn
    without replacement from q."""
    prompt, temperature = prompts[0], 1.3
    exact = first_two_token_distributions(LlamaForCausalLM.from_pretrained(target_path).eval(), prompt, temperature)
    drafter_exact = first_two_token_distributions(LlamaForCausalLM.from_pretrained(drafter_runner.name).eval(), prompt,
                                                  temperature)
    tokens = sampled_first_two_tokens(target, drafter_runner, prompt, temperature, TreeShape(depth=2, width=3), 3000)
    for position in range(2):
        counts = torch.bincount(tokens[:, position], minlength=target.vocab_size).float()
        assert chi_square_excess(counts, exact[position]) < 5, f"position {position}"
        assert chi_square_excess(counts, drafter_exact[position]) > 20, f"position {position}"


def test_sampled_dynamic_tree_speculation_follows_the_target_distribution(target, target_path, prompts):
    """Chosen children (the drafter's most probable, point masses) must not pull the output towards them. The
    tiny drafter's choices hardly ever match the tiny target's samples, so the target drafts for itself here; the
    wrong answer to tell apart is then a distribution too peaked on its likeliest tokens."""
    prompt, temperature = prompts[0], 0.7
    hf = LlamaForCausalLM.from_pretrained(target_path).eval()
    exact, peaked = (first_two_token_distributions(hf, prompt, t) for t in (temperature, temperature * 0.7))
    tree = TreeShape(depth=2, width=3, dynamic=True)
    tokens = sampled_first_two_tokens(target, ModelRunner.from_pretrained(target_path), prompt, temperature, tree, 3000)
    for position in range(2):
        counts = torch.bincount(tokens[:, position], minlength=target.vocab_size).float()
        assert chi_square_excess(counts, exact[position]) < 5, f"position {position}"
        assert chi_square_excess(counts, peaked[position]) > 20, f"position {position}"


def test_chains_and_trees_of_several_shapes_share_rounds_exactly(target, drafter_runner, prompts, plain_greedy):
    """Sequences of one engine asking for different drafts: one drafter batch and one target forward per round."""
    engine = SpeculationEngine(target, ModelDrafter(drafter_runner), k=3, exit_layer=2,
                               tree=TreeShape.parse("dynamic-3x2"))
    specs = [FOLLOW_PLAN, SpeculationSpec(k=2), SpeculationSpec(tree=TreeShape.parse("static-2x3")),
             SpeculationSpec(tree=TreeShape.parse("dynamic-4x3:5"), exit_layer=1), NO_SPECULATION]
    ids = [engine.add(prompt, GREEDY, spec=specs[i % len(specs)]) for i, prompt in enumerate(prompts)]
    tokens, arms = run_with_arms(engine)
    assert [tokens[i] for i in ids] == plain_greedy
    assert {arm for i in ids[:5] for arm in arms[i]} >= {(2, 6), (2, 2), (1, 5), (None, 0)}  # trees: k is their nodes
