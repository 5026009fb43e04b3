"""StagedDrafter: a chain drafter -> middle -> last is lossless with respect to the last model."""

import pytest
import torch
from transformers import LlamaForCausalLM

from actors.drafters import DraftRequest, ModelDrafter
from actors.errors import IncompatibleModels, InvalidRequest
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from actors.staged import StagedDrafter
from cluster.config import InvalidConfig, parse_config
from test_engine import DyingDrafter
from test_generator import chi_square_excess, first_two_token_distributions
from tiny_models import build_llama

GREEDY = make_sampling_params(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def middle_path(tiny_dir, tokenizer):
    return build_llama(tiny_dir / "staged_middle", tokenizer, seed=21, layers=3)


@pytest.fixture
def middle(middle_path) -> ModelRunner:
    return ModelRunner.from_pretrained(middle_path)


@pytest.fixture
def plain_greedy(target, prompts) -> list[list[int]]:
    return [r.tokens for r in SpeculativeGenerator(target).generate(prompts, GREEDY)]


def test_staged_drafts_are_the_middle_models_own_greedy_tokens(middle, middle_path, drafter_runner, prompts):
    own = SpeculativeGenerator(ModelRunner.from_pretrained(middle_path)).generate(prompts, GREEDY)
    staged = StagedDrafter(middle, ModelDrafter(drafter_runner), inner_k=3)
    for index, prompt in enumerate(prompts):
        staged.start(index, prompt, GREEDY)
    drafts = staged.propose([DraftRequest(i, 7, exit_layer=2, confidence=i == 0) for i in range(len(prompts))])
    assert [d.tokens for d in drafts] == [r.tokens[:7] for r in own]
    assert all(d.probs is None for d in drafts)
    assert drafts[0].confidence.shape == (7, middle.vocab_size)  # asked for: a cascade's rule reads it
    assert all(d.confidence is None for d in drafts[1:])  # not asked for: not computed, not sent
    assert staged.stats.emitted == 7 * len(prompts) and staged.stats.drafted > 0  # the inner drafter took part


@pytest.mark.parametrize("k, inner_k, exit_layer", [(4, 2, 1), (3, 5, 4)])
def test_greedy_chain_is_lossless_batched_and_alone(target, middle, drafter_runner, prompts, plain_greedy, k, inner_k, exit_layer):
    staged = StagedDrafter(middle, ModelDrafter(drafter_runner), inner_k)
    generator = SpeculativeGenerator(target, staged, k=k, exit_layer=exit_layer)
    results = generator.generate(prompts, GREEDY)
    assert [r.tokens for r in results] == plain_greedy
    assert sum(r.stats.accepted for r in results) > 0
    for prompt, expected in list(zip(prompts, plain_greedy))[::4]:
        assert generator.generate([prompt], GREEDY)[0].tokens == expected
    assert target.num_sequences == middle.num_sequences == drafter_runner.num_sequences == 0  # restarts freed too


def test_a_middle_model_equal_to_the_last_is_always_accepted(target, target_path, drafter_runner, prompts, plain_greedy):
    staged = StagedDrafter(ModelRunner.from_pretrained(target_path), ModelDrafter(drafter_runner), inner_k=2)
    results = SpeculativeGenerator(target, staged, k=3).generate(prompts, GREEDY)
    assert [r.tokens for r in results] == plain_greedy
    assert all(r.stats.acceptance_rate == 1.0 for r in results)


def test_the_chain_survives_its_inner_drafter_dying(target, middle, drafter_runner, prompts, plain_greedy):
    staged = StagedDrafter(middle, DyingDrafter(drafter_runner, die_after=2), inner_k=3)
    results = SpeculativeGenerator(target, staged, k=4).generate(prompts, GREEDY)
    assert [r.tokens for r in results] == plain_greedy
    assert staged.inner is None and sum(r.stats.accepted for r in results) > 0


def test_sampled_chain_follows_the_last_models_distribution(target, target_path, middle, middle_path, drafter_runner, prompts):
    prompt, samples, temperature = prompts[0], 2000, 1.3
    exact = first_two_token_distributions(LlamaForCausalLM.from_pretrained(target_path).eval(), prompt, temperature)
    middle_exact = first_two_token_distributions(LlamaForCausalLM.from_pretrained(middle_path).eval(), prompt, temperature)
    params = [make_sampling_params(temperature=temperature, max_tokens=2, seed=s, ignore_eos=True) for s in range(samples)]
    staged = StagedDrafter(middle, ModelDrafter(drafter_runner), inner_k=2)
    results = SpeculativeGenerator(target, staged, k=2).generate([prompt] * samples, params)
    assert sum(r.stats.accepted for r in results) > samples // 10
    tokens = torch.tensor([r.tokens for r in results])  # [samples, 2]
    for position in range(2):
        counts = torch.bincount(tokens[:, position], minlength=target.vocab_size).float()
        assert chi_square_excess(counts, exact[position]) < 5, f"position {position}"
        assert chi_square_excess(counts, middle_exact[position]) > 20, f"position {position}: looks like the middle model"


def test_mismatched_vocabularies_and_exits_are_refused(middle, drafter_runner, other_vocab_path):
    with pytest.raises(IncompatibleModels, match="vocabulary"):
        StagedDrafter(middle, ModelDrafter(ModelRunner.from_pretrained(other_vocab_path)))
    with pytest.raises(InvalidRequest, match="exit 7 is outside"):
        StagedDrafter(middle, ModelDrafter(drafter_runner)).check_exit(7)


# -- chains in the cluster config ------------------------------------------------------


def chain_config(**target_l) -> dict:
    return {
        "pools": {"p": {}},
        "drafters": {"d": {"path": "x", "pool": "p"}},
        "targets": {"s": {"path": "s", "pool": "p", "drafter": "d"}, "l": {"path": "l", "pool": "p", **target_l}},
    }


def test_a_chain_is_declared_with_via():
    config = parse_config(chain_config(drafter="d", via=["s"]))
    assert config.targets["l"].via == ["s"] and config.targets["s"].via == []


@pytest.mark.parametrize(
    "target_l, message",
    [
        ({"drafter": "d", "via": ["m"]}, "via 'm', which is not among"),
        ({"via": ["s"]}, "needs a drafter"),
        ({"drafter": "d", "via": ["l"]}, "cannot pass through itself"),
        ({"drafter": "d", "via": ["s", "s"]}, "more than once"),
    ],
)
def test_bad_chains_are_refused(target_l, message):
    with pytest.raises(InvalidConfig, match=message):
        parse_config(chain_config(**target_l))


def test_a_rewinding_commit_leaves_a_staged_drafter_as_a_fresh_one_on_the_same_context(middle_path, drafter_path, prompts):
    def staged() -> StagedDrafter:
        return StagedDrafter(ModelRunner.from_pretrained(middle_path), ModelDrafter(ModelRunner.from_pretrained(drafter_path)),
                             inner_k=2)

    used, prompt = staged(), prompts[0]
    used.start("s", prompt, GREEDY)
    used.propose([DraftRequest("s", 4)])
    used.commit("s", [5, 6, 7])
    used.commit("s", [8], rewind=2)  # the context is now prompt + [5, 8]
    fresh = staged()
    fresh.start("s", prompt + [5, 8], GREEDY)
    assert used.propose([DraftRequest("s", 4)])[0].tokens == fresh.propose([DraftRequest("s", 4)])[0].tokens
