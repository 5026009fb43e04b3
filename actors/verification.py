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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from actors.sampling import SamplingParams, logits_to_probs, sample


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one sequence's draft."""

    num_accepted: int  # how many leading draft tokens were kept
    next_token: int  # the recovered token after a rejection, or the bonus token after full acceptance
    path: tuple[int, ...] | None = None  # a tree draft: the accepted nodes, root first; None: a chain's first num_accepted

    @property
    def accepted_nodes(self) -> list[int]:
        """Indices of the accepted draft tokens (a chain's are its first num_accepted)."""
        return list(range(self.num_accepted)) if self.path is None else list(self.path)

    def emitted(self, draft_tokens: list[int]) -> list[int]:
        """The tokens this round adds to the sequence."""
        return [draft_tokens[i] for i in self.accepted_nodes] + [self.next_token]


@dataclass(frozen=True)
class RowToVerify:
    """One sequence's draft and what judges it."""

    draft_tokens: list[int]  # x_1..x_k
    target_logits: torch.Tensor  # [k + 1, V]: row i scores the token after the i-th fed position (row k: the bonus)
    params: SamplingParams  # greedy rows compare argmaxes; sampled rows rejection-sample p shaped by these
    generator: torch.Generator  # the sequence's own random stream (sampled rows only)
    draft_probs: torch.Tensor | None = None  # [k, V]: the q the draft was sampled from; None: a point-mass drafter
    defer: torch.Tensor | None = None  # [k] bool: positions where a speculative cascade lets q stand (see cascades)


def verify_round(rows: Sequence[RowToVerify]) -> list[Verdict]:
    """Verify every row of a round in one call, greedy and sampled rows mixed (after vLLM's rejection sampler).

    Greedy rows: one argmax per row, every argmax moved to Python at once, the accepted
    prefix compared there (a handful of ids per row: cheaper than tensor ops on a CPU).
    Sampled rows are padded to their longest draft: one gather of p(x) and q(x), one
    acceptance prefix per row, one residual per row. Only the random draws stay per row,
    each from the row's own generator in the same order as for a row alone (k uniforms,
    then one sample), so a seeded sequence decodes the same whatever its batch mates.
    A cascade row verifies against pi = q where it defers and p elsewhere (greedy: the
    draft token where it defers), which is the same rule with p replaced by pi.
    """
    verdicts: list[Verdict | None] = [None] * len(rows)
    for greedy, verify in ((True, _verify_greedy_rows), (False, _verify_sampled_rows)):
        index = [i for i, r in enumerate(rows) if r.params.greedy == greedy]
        if index:
            for i, verdict in zip(index, verify([rows[i] for i in index])):
                verdicts[i] = verdict
    return verdicts  # type: ignore[return-value]


def _verify_greedy_rows(rows: list[RowToVerify]) -> list[Verdict]:
    """Keep draft tokens while they equal the target's argmax (the draft token itself where a cascade defers)."""
    argmaxes = torch.cat([r.target_logits.argmax(dim=-1) for r in rows]).tolist()  # sum of (k_i + 1) ids
    verdicts, offset = [], 0
    for row in rows:
        k = len(row.draft_tokens)
        targets = argmaxes[offset : offset + k + 1]
        offset += k + 1
        if row.defer is not None:
            targets[:k] = [d if f else t for d, t, f in zip(row.draft_tokens, targets, row.defer.tolist())]
        accepted = 0
        while accepted < k and row.draft_tokens[accepted] == targets[accepted]:
            accepted += 1
        verdicts.append(Verdict(accepted, targets[accepted]))
    return verdicts


def _verify_sampled_rows(rows: list[RowToVerify]) -> list[Verdict]:
    """Lossless rejection sampling: accept x with min(1, p(x) / q(x)), else sample norm(max(0, p - q))."""
    k_max = max(len(r.draft_tokens) for r in rows)
    logits = pad_sequence([r.target_logits.float() for r in rows], batch_first=True)  # [S, K + 1, V]
    drafts = torch.tensor([r.draft_tokens + [0] * (k_max - len(r.draft_tokens)) for r in rows],
                          dtype=torch.long, device=logits.device).view(len(rows), k_max)  # [S, K], padded with 0
    lengths = torch.tensor([len(r.draft_tokens) for r in rows], device=logits.device)  # [S]
    valid = torch.arange(k_max, device=logits.device) < lengths[:, None]  # [S, K]
    defer = _padded_defer(rows, k_max, logits.device)  # [S, K]
    p = _target_probs(rows, logits)  # [S, K + 1, V]
    q = _draft_probs(rows, drafts, p.shape[-1])  # [S, K, V]
    p[:, :k_max] = torch.where(defer[..., None], q, p[:, :k_max])  # a cascade's pi
    p_of_draft = p[:, :k_max].gather(-1, drafts[..., None]).squeeze(-1)  # [S, K]
    q_of_draft = q.gather(-1, drafts[..., None]).squeeze(-1)  # [S, K]
    uniforms = torch.stack([_uniforms(r, k_max) for r in rows]).to(p.device)  # [S, K]
    # u < min(1, p/q), written as u * q < p so that q == 0 cannot divide by zero.
    num_accepted = torch.cumprod(((uniforms * q_of_draft < p_of_draft) & valid).long(), dim=1).sum(dim=1)  # [S]
    p_next = p.gather(1, num_accepted[:, None, None].expand(-1, 1, p.shape[-1])).squeeze(1)  # [S, V]
    q_next = torch.cat([q, q.new_zeros(q.shape[0], 1, q.shape[2])], dim=1)  # [S, K + 1, V]: no q at the bonus position
    q_next = q_next.gather(1, num_accepted[:, None, None].expand(-1, 1, p.shape[-1])).squeeze(1)  # [S, V]
    final = torch.where((num_accepted == lengths)[:, None], p_next, residual(p_next, q_next))  # [S, V]
    return [Verdict(int(n), int(sample(final[j : j + 1], row.generator)))
            for j, (n, row) in enumerate(zip(num_accepted.tolist(), rows))]


def _padded_defer(rows: Sequence[RowToVerify], k_max: int, device) -> torch.Tensor:
    """[S, K] bool: cascade deferrals, False for lossless rows and padding."""
    defer = torch.zeros(len(rows), k_max, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        if row.defer is not None and len(row.draft_tokens):
            defer[i, : len(row.draft_tokens)] = row.defer.to(device)
    return defer


def _target_probs(rows: list[RowToVerify], logits: torch.Tensor) -> torch.Tensor:
    """p [S, K + 1, V], each row shaped by its own sampling parameters (one transform per distinct set)."""
    probs = torch.empty_like(logits)
    groups: dict[SamplingParams, list[int]] = {}
    for j, row in enumerate(rows):
        groups.setdefault(row.params, []).append(j)
    for params, members in groups.items():
        at = torch.tensor(members, device=logits.device)
        probs[at] = logits_to_probs(logits[at], params)
    return probs


def _draft_probs(rows: list[RowToVerify], drafts: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """q [S, K, V]: each row's drafter distributions, point masses on its tokens where it gave none."""
    q = torch.nn.functional.one_hot(drafts, vocab_size).float()  # [S, K, V]
    for j, row in enumerate(rows):
        if row.draft_probs is not None and len(row.draft_tokens):
            q[j, : len(row.draft_tokens)] = row.draft_probs.to(q.device, torch.float32)
    return q


def _uniforms(row: RowToVerify, k_max: int) -> torch.Tensor:
    """The row's k acceptance draws from its own generator, padded to [K] (padding is masked out)."""
    k = len(row.draft_tokens)
    return torch.cat([torch.rand(k, generator=row.generator), torch.zeros(k_max - k)])


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) per row, [S, V].

    A rejection can only happen where some p(x) < q(x), so the residual has mass
    unless p == q up to rounding; then p itself is the right distribution.
    """
    residual = torch.clamp(p - q, min=0.0)  # [S, V]
    total = residual.sum(dim=-1, keepdim=True)  # [S, 1]
    return torch.where(total > 0, residual / total.clamp(min=torch.finfo(p.dtype).tiny), p)
