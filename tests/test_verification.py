"""Losslessness of verification, checked three ways (after vLLM's rejection-sampler tests):
exact greedy tables, seeded determinism, and sampled histograms that converge to
the target distribution far better than to reference distributions."""

import pytest
import torch

from actors.sampling import make_generator
from actors.verification import Verdict, verify_greedy, verify_sampled


def one_hot_logits(tokens: list[int], vocab: int = 6) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float() * 5.0


@pytest.mark.parametrize(
    "draft, target, expected",
    [
        ([1, 2, 3], [1, 2, 3, 4], Verdict(3, 4)),  # all accepted, bonus 4
        ([1, 2, 3], [1, 5, 3, 4], Verdict(1, 5)),  # second rejected, recovered 5
        ([1, 2, 3], [0, 2, 3, 4], Verdict(0, 0)),  # first rejected
        ([1, 2, 3], [1, 2, 0, 4], Verdict(2, 0)),  # later matches after a rejection do not count
        ([], [4], Verdict(0, 4)),  # no draft: plain decoding
    ],
)
def test_greedy_table(draft, target, expected):
    verdict = verify_greedy(torch.tensor(draft, dtype=torch.long), one_hot_logits(target))
    assert verdict == expected
    assert verdict.emitted(draft) == draft[: expected.num_accepted] + [expected.next_token]


def test_point_mass_drafter_on_the_greedy_target_is_accepted_or_replaced_by_the_argmax():
    target_probs = torch.softmax(one_hot_logits([2, 2, 2]) * 10, -1)  # nearly one-hot on 2
    verdict = verify_sampled(torch.tensor([2, 3]), None, target_probs, make_generator(0))
    assert verdict == Verdict(1, 2)


def run_trials(target: torch.Tensor, draft: torch.Tensor | None, k: int, trials: int, seed: int) -> torch.Tensor:
    """Histogram of every emitted token when p is the same at each position.

    Draft tokens are sampled from `draft` (q), or picked uniformly when q is None
    (a point-mass drafter, whose choice is arbitrary). Every emitted token,
    accepted, recovered or bonus, must then be distributed as p.
    """
    vocab = target.shape[0]
    generator = make_generator(seed)
    counts = torch.zeros(vocab)
    target_probs = target.expand(k + 1, vocab)
    draft_probs = None if draft is None else draft.expand(k, vocab)
    for _ in range(trials):
        source = torch.full((vocab,), 1 / vocab) if draft is None else draft
        tokens = torch.multinomial(source, k, replacement=True, generator=generator)
        verdict = verify_sampled(tokens, draft_probs, target_probs, generator)
        for token in verdict.emitted(tokens.tolist()):
            counts[token] += 1
    return counts / counts.sum()


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


@pytest.mark.parametrize("drafter", ["model", "point_mass"])
def test_sampled_tokens_follow_the_target_distribution(drafter):
    rng = torch.Generator().manual_seed(1234)
    vocab = 8
    target = torch.softmax(torch.randn(vocab, generator=rng) * 1.5, -1)
    draft = torch.softmax(torch.randn(vocab, generator=rng) * 1.5, -1) if drafter == "model" else None
    empirical = run_trials(target, draft, k=3, trials=6000, seed=5)
    distance_to_target = total_variation(empirical, target)
    references = [torch.softmax(torch.randn(vocab, generator=rng) * 1.5, -1) for _ in range(20)]
    if draft is not None:
        references.append(draft)  # the likeliest wrong answer: q itself
    distance_to_references = min(total_variation(empirical, r) for r in references)
    assert distance_to_target < 0.03
    assert distance_to_target < distance_to_references / 4


def test_sampled_verification_is_deterministic_for_a_seed():
    rng = torch.Generator().manual_seed(0)
    target = torch.softmax(torch.randn(4, 50, generator=rng), -1)
    draft = torch.softmax(torch.randn(3, 50, generator=rng), -1)
    tokens = torch.tensor([3, 7, 11])
    verdicts = lambda seed: [verify_sampled(tokens, draft, target, g) for g in [make_generator(seed)] for _ in range(30)]
    assert verdicts(3) == verdicts(3)
    assert verdicts(3) != verdicts(4)


def test_a_token_the_target_rules_out_is_always_rejected():
    target = torch.tensor([[0.0, 0.5, 0.5], [0.3, 0.3, 0.4]])
    draft = torch.tensor([[1.0, 0.0, 0.0]])
    for seed in range(20):
        verdict = verify_sampled(torch.tensor([0]), draft, target, make_generator(seed))
        assert verdict.num_accepted == 0 and verdict.next_token in (1, 2)
