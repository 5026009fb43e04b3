"""Verification of draft tokens against the target: the part that makes speculation lossless.

Vocabulary (used the same way everywhere in specfleet):

- *draft tokens*: the k tokens the drafter proposes in a round, x_1..x_k.
- *accepted tokens*: the prefix of the draft the verifier keeps.
- *recovered token*: at the first rejection, a token sampled from the residual
  norm(max(0, p - q)) in place of the rejected draft token.
- *bonus token*: when all k draft tokens are accepted, one more token sampled
  from the target's distribution after x_k, for free from the same forward.

Every round therefore emits `num_accepted + 1` tokens. With p the target's
distribution and q the drafter's at the same position, accepting x with
probability min(1, p(x) / q(x)) and otherwise sampling from norm(max(0, p - q))
yields tokens distributed exactly as p (Leviathan et al. 2023, Chen et al. 2023).
A model-free drafter has no q: it is a point mass on its token, so the rule
reduces to accepting with probability p(x).
"""

from dataclasses import dataclass

import torch

from actors.sampling import sample


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one sequence's draft."""

    num_accepted: int  # how many leading draft tokens were kept
    next_token: int  # the recovered token after a rejection, or the bonus token after full acceptance

    def emitted(self, draft_tokens: list[int]) -> list[int]:
        """The tokens this round adds to the sequence."""
        return list(draft_tokens[: self.num_accepted]) + [self.next_token]


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """Keep draft tokens while they equal the target's argmax.

    draft_tokens: [k] long; target_logits: [k + 1, V], row i scoring the token after
    the i-th fed position (row 0 judges x_1, row k proposes the bonus token).
    """
    k = draft_tokens.shape[0]
    target_tokens = target_logits.argmax(dim=-1)  # [k + 1]
    matches = draft_tokens == target_tokens[:k]  # [k]
    num_accepted = int(torch.cumprod(matches.int(), dim=0).sum())
    return Verdict(num_accepted, int(target_tokens[num_accepted]))


def verify_sampled(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> Verdict:
    """Lossless stochastic verification (rejection sampling).

    draft_tokens: [k] long; draft_probs: [k, V], the exact distributions the
    draft tokens were sampled from, or None for a point-mass drafter;
    target_probs: [k + 1, V], already shaped by the same temperature/top-k/top-p.
    """
    k = draft_tokens.shape[0]
    if k == 0:
        return Verdict(0, int(sample(target_probs[:1], generator)))
    positions = torch.arange(k)
    p_of_draft = target_probs[positions, draft_tokens]  # [k]
    q_of_draft = torch.ones(k) if draft_probs is None else draft_probs[positions, draft_tokens]  # [k]
    uniforms = torch.rand(k, generator=generator)  # [k]
    # u < min(1, p/q), written as u * q < p so that q == 0 cannot divide by zero.
    accepted = uniforms * q_of_draft < p_of_draft  # [k]
    num_accepted = int(torch.cumprod(accepted.int(), dim=0).sum())
    if num_accepted == k:
        return Verdict(k, int(sample(target_probs[k : k + 1], generator)))
    q_rejected = _draft_distribution(draft_tokens, draft_probs, num_accepted, target_probs.shape[-1])
    residual = _residual(target_probs[num_accepted], q_rejected)  # [V]
    return Verdict(num_accepted, int(sample(residual[None], generator)))


def _draft_distribution(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, position: int, vocab_size: int
) -> torch.Tensor:
    """q at one position, [V]; a point mass where the drafter gave no probabilities."""
    if draft_probs is not None:
        return draft_probs[position]
    return torch.nn.functional.one_hot(draft_tokens[position], vocab_size).float()


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)), [V].

    A rejection can only happen where some p(x) < q(x), so the residual has mass
    unless p == q up to rounding; then p itself is the right distribution.
    """
    residual = torch.clamp(p - q, min=0.0)
    total = residual.sum()
    return p if total <= 0 else residual / total
