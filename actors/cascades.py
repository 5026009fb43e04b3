"""Speculative cascades (Narasimhan et al. 2024, "Faster Cascades via Speculative Decoding").

Lossless speculation verifies the drafter's tokens against the target's p. A
speculative cascade verifies them against a mixture chosen per position,

    pi = (1 - d) q + d p,

where a deferral rule sets d = 0 (*defer to the drafter*: its q stands) when the
drafter is confident enough and d = 1 (the target judges) otherwise. The usual
rejection sampler run against pi -- accept x with min(1, pi(x) / q(x)), else
sample norm(max(0, pi - q)) -- emits tokens distributed as pi, so a deferred
position is always accepted. Greedy: pi is a point mass on the drafter's token
where the position defers and on the target's argmax elsewhere.

The rules read the models' confidence, their temperature-1 softmax q1 and p1,
whatever temperature, top-k or top-p the request samples with:

    Chow: defer when max q1 >= 1 - alpha
    Diff: defer when max q1 >= max p1 - alpha
    OPT:  defer when max q1 >= max p1 - alpha * TV(q1, p1)

alpha in [0, 1] is the lenience, the cost/quality knob. Two decisions:

- **alpha = 0 defers nowhere, for every rule.** Diff and OPT as written would
  still defer at alpha = 0 wherever the drafter is more confident than the
  target (the paper's quality-optimal point, not the lossless one); specfleet
  keeps alpha = 0 for exactly the lossless result, so the wire's zero value
  never changes an output. For alpha > 0 the rules are the formulas above.
- **The position after a fully accepted draft.** The target's last row (the
  bonus position) has no q: the drafter never scored it, so no rule can judge
  it. Emitting the target's token there would force d = 1 at every round
  boundary and make the output depend on k. So when the rule can defer
  (alpha > 0) a fully accepted round ends at its last draft token, without a
  bonus: every emitted token is then distributed as the cascade's pi at its
  position, and Chow with alpha = 1 reproduces the drafter's own output. With
  alpha = 0 the bonus stays and the round is the lossless one, random draws
  included.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors.drafters import Draft
from actors.errors import InvalidRequest
from actors.verification import Verdict

CascadeRule = Literal["chow", "diff", "opt"]


class CascadeParams(BaseModel):
    """How a sequence cascades: a deferral rule and its lenience."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rule: CascadeRule = Field(
        description="Deferral rule: chow (max q >= 1 - alpha), diff (max q >= max p - alpha) "
        "or opt (max q >= max p - alpha * TV(q, p)), on the models' temperature-1 softmax."
    )
    alpha: float = Field(
        ge=0.0, le=1.0,
        description="Lenience in [0, 1]: 0 is lossless (never defers), larger defers to the drafter more often.",
    )

    @property
    def can_defer(self) -> bool:
        return self.alpha > 0.0


def make_cascade_params(**values) -> CascadeParams:
    """Validate user-supplied cascade values, raising `InvalidRequest` with a one-line reason."""
    try:
        return CascadeParams(**values)
    except ValidationError as err:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg'].lower()} (got {e.get('input')!r})" for e in err.errors()]
        raise InvalidRequest("invalid cascade: " + "; ".join(problems)) from None


@dataclass(frozen=True, kw_only=True)
class CascadeVerdict(Verdict):
    """A verdict that also counts what the cascade did.

    `accepted` exceeds `num_accepted` by one when a fully accepted round ends at
    its last draft token (that token is then the verdict's `next_token`).
    """

    accepted: int  # draft tokens kept
    deferred: int  # judged positions whose draft token stood on the drafter's q


def accepted_and_deferred(verdict: Verdict) -> tuple[int, int]:
    """(draft tokens kept, positions deferred) of any verdict."""
    if isinstance(verdict, CascadeVerdict):
        return verdict.accepted, verdict.deferred
    return verdict.num_accepted, 0


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """A model's own confidence: the temperature-1 softmax of its logits [..., V]."""
    return torch.softmax(logits.float(), dim=-1)


def defer_to_drafter(cascade: CascadeParams, q1: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
    """Which positions defer to the drafter: q1, p1 [n, V] temperature-1 distributions -> [n] bool."""
    if not cascade.can_defer:
        return torch.zeros(q1.shape[0], dtype=torch.bool, device=q1.device)
    max_q, max_p = q1.max(dim=-1).values, p1.max(dim=-1).values  # [n] each
    if cascade.rule == "chow":
        return max_q >= 1.0 - cascade.alpha
    if cascade.rule == "diff":
        return max_q >= max_p - cascade.alpha
    total_variation = 0.5 * (q1 - p1).abs().sum(dim=-1)  # [n]
    return max_q >= max_p - cascade.alpha * total_variation


def cascade_defer(draft: Draft, target_logits: torch.Tensor, cascade: CascadeParams) -> torch.Tensor:
    """Which draft positions defer to the drafter, [k] bool; target_logits [k + 1, V] as the round scored them.

    A drafter that reports no confidence (model-free) never gets a deferral. The row is then
    verified by `verify_round` with this `defer`, against pi instead of p.
    """
    k = len(draft.tokens)
    if draft.confidence is None or k == 0:
        return torch.zeros(k, dtype=torch.bool, device=target_logits.device)
    return defer_to_drafter(cascade, draft.confidence.to(target_logits.device), confidence(target_logits[:k]))


def cascade_verdict(verdict: Verdict, draft_tokens: list[int], defer: torch.Tensor, cascade: CascadeParams) -> CascadeVerdict:
    """Count deferrals among judged positions; drop the bonus when the rule could have deferred there."""
    k = len(draft_tokens)
    judged = min(verdict.num_accepted + 1, k)  # accepted positions and the first rejected one
    deferred = int(defer[:judged].sum())
    if k and verdict.num_accepted == k and cascade.can_defer:
        return CascadeVerdict(k - 1, draft_tokens[-1], accepted=k, deferred=deferred)
    return CascadeVerdict(verdict.num_accepted, verdict.next_token, accepted=verdict.num_accepted, deferred=deferred)
