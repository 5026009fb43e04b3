"""SpeculativeGenerator: lossless against the target's own decoding, greedy and sampled."""

import pytest
import torch
from transformers import LlamaForCausalLM

from actors.drafters import ModelDrafter, NgramDrafter
from actors.errors import IncompatibleModels, InvalidRequest
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params

GREEDY = make_sampling_params(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture
def plain_greedy(target, prompts) -> list[list[int]]:
    return [r.tokens for r in SpeculativeGenerator(target).generate(prompts, GREEDY)]


def test_plain_decoding_reproduces_huggingface_greedy(target, target_path, prompts, plain_greedy):
    """The reference is transformers' own forward, without any cache, argmax by argmax."""
    hf = LlamaForCausalLM.from_pretrained(target_path).eval()
    for prompt, ours in zip(prompts, plain_greedy):
        tokens = list(prompt)
        with torch.no_grad():
            for _ in range(24):
                tokens.append(int(hf(torch.tensor([tokens])).logits[0, -1].argmax()))
        assert tokens[len(prompt) :] == ours


@pytest.mark.parametrize("exit_layer", [1, 2, 4])
def test_greedy_speculation_is_lossless_for_every_k_and_exit(target, drafter_runner, prompts, plain_greedy, exit_layer):
    for k in range(1, 9):
        generator = SpeculativeGenerator(target, ModelDrafter(drafter_runner), k=k, exit_layer=exit_layer)
        batched = generator.generate(prompts, GREEDY)
        assert [r.tokens for r in batched] == plain_greedy, f"batched, k={k}"
        for prompt, expected in list(zip(prompts, plain_greedy))[::2]:  # lengths 1 to 23 among them
            assert generator.generate([prompt], GREEDY)[0].tokens == expected, f"alone, k={k}"
        assert target.num_sequences == 0 and drafter_runner.num_sequences == 0


def test_a_perfect_drafter_is_always_accepted_and_earns_the_bonus(target, target_path, prompts, plain_greedy):
    drafter = ModelDrafter(ModelRunner.from_pretrained(target_path))  # the target drafting for itself
    results = SpeculativeGenerator(target, drafter, k=3).generate(prompts, GREEDY)
    assert [r.tokens for r in results] == plain_greedy
    for r in results:
        assert r.stats.acceptance_rate == 1.0
        assert r.stats.mean_accepted_length == 4.0  # k accepted + the bonus token, 24 = 6 rounds x 4
        assert r.stats.target_forwards == 6


def test_ngram_drafting_is_lossless_and_drafts_on_repetitive_prompts(target, prompts, plain_greedy):
    repetitive = [p * 3 for p in prompts[:4]]
    expected = [r.tokens for r in SpeculativeGenerator(target).generate(repetitive, GREEDY)]
    results = SpeculativeGenerator(target, NgramDrafter(), k=4).generate(repetitive, GREEDY)
    assert [r.tokens for r in results] == expected
    assert sum(r.stats.drafted for r in results) > 0


def test_generation_stops_at_the_end_of_sequence_token(target, drafter_runner, prompts, plain_greedy):
    stop_token = plain_greedy[0][5]
    stop_at = plain_greedy[0].index(stop_token)
    target.eos_token_id = stop_token
    params = make_sampling_params(temperature=0, max_tokens=24)
    for drafter in (None, ModelDrafter(drafter_runner)):
        result = SpeculativeGenerator(target, drafter, k=4).generate([prompts[0]], params)[0]
        assert result.tokens == plain_greedy[0][:stop_at]
        assert result.finish_reason == "stop"


def first_two_token_distributions(model: LlamaForCausalLM, prompt: list[int], temperature: float):
    """Exact p(t1 | prompt) and the marginal p(t2 | prompt) = sum_t1 p(t1) p(t2 | prompt, t1)."""
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)  # [V]
        vocab = first.shape[0]
        extended = torch.cat([torch.tensor([prompt]).expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
        second = torch.softmax(model(extended).logits[:, -1] / temperature, -1)  # [V, V]
    return first, first @ second


def chi_square_excess(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square of counts against probs, in standard deviations above its mean.

    Bins expecting fewer than 5 samples are pooled. Under the null hypothesis the
    statistic has mean df and standard deviation sqrt(2 df), so a value beyond
    ~5 means the samples almost surely do not come from `probs`.
    """
    expected = probs * counts.sum()
    small = expected < 5
    pooled = slice(0, 1 if small.any() else 0)  # no pooled bin when none is small
    observed = torch.cat([counts[~small], counts[small].sum()[None][pooled]])
    expected = torch.cat([expected[~small], expected[small].sum()[None][pooled]])
    statistic = float(((observed - expected) ** 2 / expected).sum())
    df = observed.numel() - 1
    return (statistic - df) / (2 * df) ** 0.5


def test_sampled_speculation_follows_the_target_distribution(target, target_path, drafter_runner, prompts):
    """Thousands of seeded samples of the first two tokens against their exact distributions."""
    prompt, samples, temperature = prompts[0], 3000, 1.3
    hf = LlamaForCausalLM.from_pretrained(target_path).eval()
    exact = first_two_token_distributions(hf, prompt, temperature)
    drafter_hf = LlamaForCausalLM.from_pretrained(drafter_runner.name).eval()
    drafter_exact = first_two_token_distributions(drafter_hf, prompt, temperature)
    params = [make_sampling_params(temperature=temperature, max_tokens=2, seed=s, ignore_eos=True) for s in range(samples)]
    generator = SpeculativeGenerator(target, ModelDrafter(drafter_runner), k=2, exit_layer=4)
    results = generator.generate([prompt] * samples, params)
    assert sum(r.stats.accepted for r in results) > samples // 10  # both accept and reject paths ran
    tokens = torch.tensor([r.tokens for r in results])  # [samples, 2]
    for position in range(2):
        counts = torch.bincount(tokens[:, position], minlength=target.vocab_size).float()
        to_target = chi_square_excess(counts, exact[position])
        to_drafter = chi_square_excess(counts, drafter_exact[position])
        assert to_target < 5, f"position {position}: {to_target:.1f} sd from the target distribution"
        assert to_drafter > 20, f"position {position}: only {to_drafter:.1f} sd from the drafter's distribution"


def test_sampled_generation_is_reproducible_for_a_seed(target, drafter_runner, prompts):
    generator = SpeculativeGenerator(target, ModelDrafter(drafter_runner), k=4)
    run = lambda seed: generator.generate(prompts, make_sampling_params(temperature=1.0, seed=seed, max_tokens=16))
    assert [r.tokens for r in run(11)] == [r.tokens for r in run(11)]
    assert [r.tokens for r in run(11)] != [r.tokens for r in run(12)]


@pytest.mark.parametrize(
    "prompt, max_tokens, message",
    [
        ([], 8, "prompt is empty"),
        ([1, 10**6], 8, "token ids must be integers"),
        ([1, 2, 3], 254, "exceeds the target's context of 256"),
    ],
)
def test_bad_prompts_are_rejected_up_front(target, drafter_runner, prompt, max_tokens, message):
    generator = SpeculativeGenerator(target, ModelDrafter(drafter_runner), k=4)
    with pytest.raises(InvalidRequest, match=message):
        generator.generate([[5, 6], prompt], make_sampling_params(max_tokens=max_tokens))
    assert target.num_sequences == 0


@pytest.mark.parametrize("k", [0, -1, 65])
def test_k_out_of_range_is_rejected(target, drafter_runner, k):
    with pytest.raises(InvalidRequest, match="draft length k"):
        SpeculativeGenerator(target, ModelDrafter(drafter_runner), k=k)


def test_a_drafter_with_another_vocabulary_is_rejected(target, other_vocab_path):
    with pytest.raises(IncompatibleModels, match="vocabulary"):
        SpeculativeGenerator(target, ModelDrafter(ModelRunner.from_pretrained(other_vocab_path)))


def test_exits_are_checked_against_the_drafter(target, drafter_runner):
    with pytest.raises(InvalidRequest, match="exit 7 is outside"):
        SpeculativeGenerator(target, ModelDrafter(drafter_runner), exit_layer=7)
    with pytest.raises(InvalidRequest, match="no exits"):
        SpeculativeGenerator(target, NgramDrafter(), exit_layer=2)
