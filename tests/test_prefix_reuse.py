"""Prompt prefixes copied from live caches of a replica score as recomputed ones, and only valid ones are copied."""

import random

import pytest
import torch

from actors.drafters import ModelDrafter
from actors.errors import InvalidRequest
from actors.generator import SpeculativeGenerator
from actors.kv_cache import SequenceCache
from actors.prefix_reuse import MIN_SHARED_PREFIX, common_prefix, reusable_length
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params

ATOL = 1e-4  # float32 rounding of a differently batched computation


@pytest.fixture
def long_prompts(tokenizer) -> list[list[int]]:
    """Three prompts sharing their first 40 tokens, then differing."""
    rng = random.Random(7)
    shared = [rng.randrange(3, len(tokenizer)) for _ in range(40)]
    return [shared + [rng.randrange(3, len(tokenizer)) for _ in range(n)] for n in (5, 9, 1)]


def last_logits(runner: ModelRunner, seq_id: str, prompt: list[int], exit_layer: int | None = None) -> torch.Tensor:
    runner.add_sequence(seq_id)
    exits = None if exit_layer is None else [exit_layer]
    return runner.forward([seq_id], [prompt], exits, last_only=True)[0]


def alone(target_path, prompt: list[int]) -> torch.Tensor:
    return last_logits(ModelRunner.from_pretrained(target_path), "fresh", prompt)


def test_a_prefix_taken_from_a_live_sequence_scores_as_recomputed(target, target_path, long_prompts):
    last_logits(target, "a", long_prompts[0])
    taken = last_logits(target, "b", long_prompts[1])
    assert target.cached_tokens("b") == long_prompts[1]
    torch.testing.assert_close(taken, alone(target_path, long_prompts[1]), atol=ATOL, rtol=0)
    target.forward(["a"], [[5]])  # the donor goes on unaffected
    assert target.cached_tokens("a") == long_prompts[0] + [5]


def test_a_finished_sequence_gives_nothing_to_the_next(target, long_prompts):
    """A freed slot's next owner computes its prompt as in a fresh replica (a benchmark's second pass over the
    same prompts pays the prefill the first one paid)."""
    last_logits(target, "a", long_prompts[0])
    target.free("a")
    target.add_sequence("b")
    assert target._take_prefixes(["b"], [long_prompts[1]], [target.num_layers]) == ([long_prompts[1]], set())


def test_bad_input_is_refused_before_any_prefix_is_copied(target, long_prompts):
    last_logits(target, "a", long_prompts[0])
    target.add_sequence("b")
    with pytest.raises(InvalidRequest):
        target.forward(["b"], [long_prompts[1] + [10**6]], last_only=True)
    assert target.cached_length("b") == 0


def test_rows_of_one_call_share_a_prefix_the_first_computes(target, target_path, long_prompts):
    for seq_id in "xyz":
        target.add_sequence(seq_id)
    scored = target.forward(list("xyz"), long_prompts, last_only=True)
    for got, prompt in zip(scored, long_prompts):
        torch.testing.assert_close(got, alone(target_path, prompt), atol=ATOL, rtol=0)
    assert [target.cached_tokens(s) for s in "xyz"] == long_prompts


def test_a_row_that_asks_for_every_logit_computes_its_whole_prompt(target, long_prompts):
    last_logits(target, "a", long_prompts[0])
    target.add_sequence("b")
    assert target.forward(["b"], [long_prompts[1]])[0].shape[0] == len(long_prompts[1])


def test_a_shallow_drafter_cache_gives_nothing_to_a_deeper_exit(drafter_runner, drafter_path, long_prompts):
    last_logits(drafter_runner, "shallow", long_prompts[0], exit_layer=1)
    deep = last_logits(drafter_runner, "deep", long_prompts[1], exit_layer=4)
    fresh = last_logits(ModelRunner.from_pretrained(drafter_path), "fresh", long_prompts[1], exit_layer=4)
    torch.testing.assert_close(deep, fresh, atol=ATOL, rtol=0)
    assert reusable_length(drafter_runner._caches["shallow"], long_prompts[1], 4) == 0


def test_only_a_chain_prefix_is_given():
    """A token tree's region is not a prefix; after its path is compacted into place it is."""
    cache = SequenceCache(0)
    cache.extend(list(range(20)), depth=2)
    cache.extend([30, 31, 32], depth=2, chain=False)  # three tree nodes
    assert cache.linear == 20
    cache.keep_path(20, [0, 2])
    assert cache.tokens == list(range(20)) + [30, 32] and cache.linear == 22
    cache.truncate(18)
    assert cache.linear == 18
    tokens = list(range(18)) + [99, 98]
    assert reusable_length(cache, tokens, 2) == 18 and reusable_length(cache, tokens, 3) == 0
    assert reusable_length(cache, list(range(MIN_SHARED_PREFIX - 1)) + [99, 99], 2) == 0  # too short to pay


def test_common_prefix():
    assert common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([1, 2], [1, 2]) == 2


def test_greedy_speculation_over_shared_prompts_equals_the_target_alone(target_path, drafter_path, long_prompts):
    """Every prompt twice, all in flight at once: each prefix is computed once per model and copied by the rest."""
    prompts = long_prompts * 2
    params = make_sampling_params(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [SpeculativeGenerator(ModelRunner.from_pretrained(target_path)).generate([p], params)[0].tokens
                for p in prompts]
    generator = SpeculativeGenerator(ModelRunner.from_pretrained(target_path),
                                     ModelDrafter(ModelRunner.from_pretrained(drafter_path)), k=3, exit_layer=2)
    assert [r.tokens for r in generator.generate(prompts, params)] == expected
