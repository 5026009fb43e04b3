"""Losslessness of verification, checked three ways (after vLLM's rejection-sampler tests):
exact greedy tables, seeded determinism, and sampled histograms that converge to
the target distribution far better than to reference distributions."""

import pytest
import torch

from actors.cascades import CascadeParams, cascade_defer, cascade_verdict
from actors.drafters import Draft
from actors.sampling import SamplingParams, make_generator, make_sampling_params
from actors.verification import RowToVerify, Verdict, verify_round

GREEDY = make_sampling_params(temperature=0.0)
SAMPLED = make_sampling_params(temperature=1.0)


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """One greedy row alone."""
    return verify_round([RowToVerify(draft_tokens.tolist(), target_logits, GREEDY, make_generator(0))])[0]


def verify_sampled(draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                   generator: torch.Generator) -> Verdict:
    """One sampled row alone, its target given as probabilities (temperature 1 turns their log back into them)."""
    row = RowToVerify(draft_tokens.tolist(), target_probs.log(), SAMPLED, generator, draft_probs)
    return verify_round([row])[0]


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


def random_row(rng: torch.Generator, k: int, params: SamplingParams, seed: int, vocab: int = 12,
               with_q: bool = True) -> RowToVerify:
    """A row whose draft agrees with the target often enough that every outcome occurs."""
    target = torch.randn(k + 1, vocab, generator=rng) * 2  # [k + 1, V]
    q = torch.softmax(target[:k] + torch.randn(k, vocab, generator=rng), -1)  # [k, V]
    tokens = [int(torch.multinomial(q[i], 1, generator=rng)) for i in range(k)]
    return RowToVerify(tokens, target, params, make_generator(seed), q if with_q else None)


def test_a_round_gives_every_row_what_it_gets_alone() -> None:
    """Greedy, sampled (top-k, top-p, point-mass drafter), cascade and empty drafts, k from 0 to 5, in one call:
    each row's verdict, random draws included, is the one it gets verified alone with the same seed."""
    rng = torch.Generator().manual_seed(7)
    kinds = [GREEDY, SAMPLED, make_sampling_params(temperature=0.7, top_k=5), make_sampling_params(temperature=1.3, top_p=0.8)]
    cascade = CascadeParams(rule="diff", alpha=0.3)
    for trial in range(40):
        rows, cascades = [], []
        for i in range(6):
            row = random_row(rng, k=(trial + i) % 6, params=kinds[(trial * 3 + i) % 4], seed=100 * trial + i, with_q=i % 3 != 2)
            is_cascade = i == 4 and row.draft_probs is not None
            defer = cascade_defer(Draft(row.draft_tokens, row.draft_probs, row.draft_probs), row.target_logits, cascade)
            rows.append(RowToVerify(row.draft_tokens, row.target_logits, row.params, row.generator, row.draft_probs,
                                    defer if is_cascade else None))
            cascades.append(is_cascade)
        alone = [verify_round([RowToVerify(r.draft_tokens, r.target_logits, r.params,
                                           make_generator(100 * trial + i), r.draft_probs, r.defer)])[0]
                 for i, r in enumerate(rows)]
        together = verify_round(rows)
        assert together == alone
        for row, verdict, is_cascade in zip(rows, together, cascades):
            assert 0 <= verdict.num_accepted <= len(row.draft_tokens)
            if is_cascade:
                counted = cascade_verdict(verdict, row.draft_tokens, row.defer, cascade)
                assert counted.accepted >= counted.num_accepted


def test_greedy_rows_of_a_round_follow_the_table_whatever_their_lengths() -> None:
    rows = [RowToVerify([1, 2, 3], one_hot_logits([1, 5, 3, 4]), GREEDY, make_generator(0)),
            RowToVerify([], one_hot_logits([4]), GREEDY, make_generator(0)),
            RowToVerify([2], one_hot_logits([2, 3]), GREEDY, make_generator(0))]
    assert verify_round(rows) == [Verdict(1, 5), Verdict(0, 4), Verdict(1, 3)]
