"""Verification of a tree draft: the longest path the target accepts, lossless for greedy and sampled rows.

Greedy: from the root, move to the child whose token is the target's argmax
there, while one is; the argmax where none is becomes the next token.

Sampled: SpecInfer's multi-candidate speculative sampling, in the recursive
form that also holds for children drawn *without* replacement (Jeon et al.
2024, recursive rejection sampling). At a node with target distribution p,
its children x_1..x_m are tried in draft order, child i against q_i, the
distribution it was drawn from (the drafter's q with x_1..x_{i-1} removed and
renormalised; a point mass for a chosen, not drawn, child): accept x_i with
probability min(1, p(x_i) / q_i(x_i)) and descend into it; else replace p by
norm(max(0, p - q_i)) and try the next child. With no child left, the next
token is drawn from what p has become.

Why the output follows the target exactly: one trial is the classic
speculative-sampling step, whose result follows p whatever q is (accept, or
draw the residual). A rejection of x_i implies p(x_i) < q_i(x_i), so the
residual gives x_i no mass, and the following trials, whose q's leave x_i out,
only redistribute the residual: by induction over the children, the token
chosen at a node follows p, and the same holds at every node down the path
(each child's subtree was drafted from its own context). Chosen children
(point masses) are the special case q_i = 1 at x_i: accept with probability
p(x_i), else zero it in p.
"""

from dataclasses import dataclass

import torch

from actors.sampling import SamplingParams, logits_to_probs, sample
from actors.trees import children_of
from actors.verification import Verdict, residual


@dataclass(frozen=True)
class TreeToVerify:
    """One sequence's tree draft and what judges it."""

    tokens: list[int]  # the nodes' tokens, level order
    parents: list[int]  # each node's parent, -1 for the root
    target_logits: torch.Tensor  # [N + 1, V]: row 0 scores the root's children, row i + 1 node i's
    params: SamplingParams
    generator: torch.Generator  # the sequence's own random stream (sampled rows only)
    draft_probs: torch.Tensor | None = None  # [N, V]: the q each node was drawn from; None: chosen nodes (point masses)


def verify_tree(row: TreeToVerify) -> Verdict:
    return _verify_greedy(row) if row.params.greedy else _verify_sampled(row)


def _verify_greedy(row: TreeToVerify) -> Verdict:
    argmaxes = row.target_logits.argmax(dim=-1).tolist()  # [N + 1]
    children, path, node = children_of(row.parents), [], -1
    while True:
        wanted = argmaxes[node + 1]
        child = next((c for c in children.get(node, []) if row.tokens[c] == wanted), None)
        if child is None:
            return Verdict(len(path), wanted, tuple(path))
        path.append(child)
        node = child


def _verify_sampled(row: TreeToVerify) -> Verdict:
    children, path, node = children_of(row.parents), [], -1
    p_all = logits_to_probs(row.target_logits, row.params)  # [N + 1, V]
    while True:
        p = p_all[node + 1]  # [V]
        for child in children.get(node, []):
            token = row.tokens[child]
            q = _point_mass(token, p) if row.draft_probs is None else row.draft_probs[child].to(p)  # [V]
            uniform = float(torch.rand((), generator=row.generator))
            if uniform * float(q[token]) < float(p[token]):  # u < min(1, p/q) without dividing by q
                path.append(child)
                node = child
                break
            p = residual(p[None], q[None])[0]
        else:
            return Verdict(len(path), int(sample(p[None], row.generator)), tuple(path))


def _point_mass(token: int, like: torch.Tensor) -> torch.Tensor:
    q = torch.zeros_like(like)
    q[token] = 1.0
    return q
