"""Token trees (SpecInfer): a draft that branches, verified in one target forward.

A *tree draft* is a list of nodes in level order (parents before children),
each a token with the index of its parent node (-1: a child of the root, the
sequence's last emitted token). A chain of k tokens is the tree whose node i
has parent i - 1.

Two shapes, both drafted as `depth` levels of `width` nodes; every round of a
shape verifies the same number of nodes (`TreeShape.nodes`), so its forwards
keep their shapes:

- **static**: the nodes of each level are the `width` best children of the
  previous level's first node (level 1: of the root). Level by level the
  first nodes form the drafter's own greedy chain, and each level adds its
  `width - 1` runners-up beside it. Drafting costs what the chain costs: one
  token fed per level.
- **dynamic** (after EAGLE-2): each node of a level proposes its `width` most
  probable children, scored by the product of the drafter's probabilities
  along the path, and the `width` best-scored candidates form the next level
  (a beam). Drafting feeds a whole level (`width` tokens) per step, nearly
  free where a forward's cost is per-op overhead. The draft is the `budget`
  best-scored nodes of everything drafted (default `depth * width`): deep
  where the drafter is sure, wide where it is not.

Verification feeds `[pending] + nodes` with positions prefix + depth and an
ancestor-only attention mask (`visibility`), then keeps the longest path the
target accepts (`actors.tree_verification`); both models then move the path's
keys and values into place (`KVStore.move`) and drop the rest.
"""

from dataclasses import dataclass, field
from typing import Annotated

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from actors.buckets import MAX_WIDTH
from actors.sampling import SamplingParams, logits_to_probs

MAX_TREE_DEPTH = 16
MAX_TREE_WIDTH = 8
MAX_TREE_NODES = MAX_WIDTH - 1  # with the pending token, a tree is verified in one step of the runner


class TreeShape(BaseModel):
    """How a tree draft branches: `depth` levels of `width` nodes, of which `budget` are verified (dynamic)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    depth: int = Field(ge=1, le=MAX_TREE_DEPTH, description="Levels of the tree: the longest path it can accept.")
    width: int = Field(ge=1, le=MAX_TREE_WIDTH, description="Nodes per level (1 is a chain).")
    dynamic: bool = Field(
        False, description="Expand the most probable nodes of each level (EAGLE-2); False: only each level's first node."
    )
    budget: int | None = Field(
        None, ge=1, le=MAX_TREE_NODES,
        description="Dynamic trees: nodes verified, the best-scored of all drafted; None: depth * width.",
    )

    @model_validator(mode="after")
    def _fits_one_step(self) -> "TreeShape":
        problem = _shape_problem(self.depth, self.width, self.dynamic, self.budget)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def nodes(self) -> int:
        """Draft tokens verified per round: the verification budget less the pending token."""
        return self.budget or self.depth * self.width

    @property
    def label(self) -> str:
        budget = f":{self.budget}" if self.budget is not None else ""
        return f"{'dynamic' if self.dynamic else 'static'}-{self.depth}x{self.width}{budget}"

    @classmethod
    def parse(cls, label: str) -> "TreeShape":
        """The shape a label names: 'static-4x2', 'dynamic-4x3' or 'dynamic-8x2:16' (a budget of 16 nodes);
        a ValueError that names the rule otherwise."""
        kind, _, size = label.partition("-")
        size, colon, budget = size.partition(":")
        depth, _, width = size.partition("x")
        numbers = [depth, width] + ([budget] if colon else [])
        if kind not in ("static", "dynamic") or not all(n.isdigit() and len(n) < 4 for n in numbers):
            raise ValueError("a tree shape reads 'static-DEPTHxWIDTH' or 'dynamic-DEPTHxWIDTH[:BUDGET]', "
                             f"got {label[:32]!r}")
        shape = (int(depth), int(width), kind == "dynamic", int(budget) if colon else None)
        problem = _shape_problem(*shape)
        if problem:
            raise ValueError(f"{problem}; got {label[:32]!r}")
        return cls(depth=shape[0], width=shape[1], dynamic=shape[2], budget=shape[3])


def _shape_problem(depth: int, width: int, dynamic: bool, budget: int | None) -> str | None:
    """What is wrong with a tree shape, or None: the one place of its limits."""
    if not (1 <= depth <= MAX_TREE_DEPTH and 1 <= width <= MAX_TREE_WIDTH):
        return f"a tree has 1..{MAX_TREE_DEPTH} levels of 1..{MAX_TREE_WIDTH} nodes"
    if budget is not None and not dynamic:
        return "only a dynamic tree takes a budget (a static tree verifies every node it drafts)"
    drafted = width + (depth - 1) * width * width if dynamic else depth * width
    if not 1 <= (budget or depth * width) <= min(MAX_TREE_NODES, drafted):
        return f"a tree verifies at most {MAX_TREE_NODES} nodes, and no more than it drafts ({drafted})"
    return None


def _checked_label(label: str) -> str:
    TreeShape.parse(label)
    return label


TreeLabel = Annotated[str, AfterValidator(_checked_label)]  # a config's tree shape: a label that parses


def chain_parents(length: int) -> list[int]:
    """Parents of a chain of `length` nodes."""
    return list(range(-1, length - 1))


def depths_of(parents: list[int]) -> list[int]:
    """Each node's depth, 0 for a child of the root (parents come before their children)."""
    depths: list[int] = []
    for parent in parents:
        depths.append(0 if parent < 0 else depths[parent] + 1)
    return depths


def visibility(parents: list[int]) -> torch.Tensor:
    """[N, N] bool: node i may attend to node j iff j is i or one of its ancestors."""
    visible = torch.eye(len(parents), dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            visible[node] |= visible[parent]
    return visible


def children_of(parents: list[int]) -> dict[int, list[int]]:
    """Node -> its children in draft order; the root is -1."""
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(parents):
        children.setdefault(parent, []).append(node)
    return children


def path_of(tokens: list[int], parents: list[int], emitted: list[int]) -> list[int]:
    """The nodes that spell the longest prefix of `emitted`, root first (a node per matched token)."""
    children, path, node = children_of(parents), [], -1
    for token in emitted:
        node = next((c for c in children.get(node, []) if tokens[c] == token), None)
        if node is None:
            break
        path.append(node)
    return path


@dataclass(frozen=True)
class Candidate:
    """A node being drafted: its token, its parent, what it was drawn from and its path score."""

    token: int
    parent: int  # index of the parent node, -1 for the root
    q: torch.Tensor | None  # [V] the distribution the token was drawn from; None: chosen, not drawn (a point mass)
    score: float  # product of the drafter's temperature-1 probabilities along its path


def best_children(logits: torch.Tensor, parents: list[int], parent_scores: list[float], width: int) -> list[Candidate]:
    """The `width` most probable children of each of several nodes, from their logits [n, V], as point masses:
    one softmax and one top-k for all of them."""
    top = torch.topk(torch.softmax(logits.float(), dim=-1), width)  # values, indices: each [n, width]
    return [Candidate(token, parent, None, score * prob)
            for parent, score, probs, tokens in zip(parents, parent_scores, top.values.tolist(), top.indices.tolist())
            for prob, token in zip(probs, tokens)]


def sampled_children(logits: torch.Tensor, parent: int, width: int, params: SamplingParams,
                     generator: torch.Generator) -> list[Candidate]:
    """Up to `width` children drawn without replacement from q (the request's sampling of the logits [V]).

    Child i is drawn from q with children 1..i-1 removed and renormalised, and carries that
    distribution: the recursive rejection rule of `actors.tree_verification` needs it.
    """
    q = logits_to_probs(logits[None], params)[0]  # [V]
    children = []
    for _ in range(width):
        total = q.sum()
        if total <= 0:
            break
        q = q / total
        token = int(torch.multinomial(q, 1, generator=generator))
        children.append(Candidate(token, parent, q, 0.0))
        q = q.clone()
        q[token] = 0.0
    return children


def next_level(candidates: list[Candidate], width: int) -> tuple[list[Candidate], list[Candidate]]:
    """The `width` best-scored candidates in score order (a dynamic tree's next level), and the rest."""
    ranked = sorted(candidates, key=lambda c: -c.score)
    return ranked[:width], ranked[width:]


@dataclass
class TreeDraftRow:
    """One sequence's tree being drafted, a level per drafter forward (`ModelDrafter`).

    The first forward feeds the sequence's uncached context as a chain and gives the
    root's children. After it, a static tree feeds its last level's first node (a chain
    step), a dynamic one its whole last level as tree tokens against the levels already
    cached, which form the cache's *region* from `region_start` on (node i at offset i).

    A dynamic tree's levels are a beam (EAGLE-2): each holds the `width` best-scored
    children of the level before; the candidates left out of it are kept (`spare`), and
    the draft is the shape's `nodes` best-scored of all (`draft_nodes`).
    """

    seq_id: object
    shape: TreeShape
    exit_layer: int
    depth: int  # levels to draft: the shape's, cut to what the context allows; lowered to stop early
    levels: list[list[Candidate]] = field(default_factory=list)
    region_start: int | None = None  # a dynamic tree's first cached level: where its region begins
    spare: list[tuple[int, Candidate]] = field(default_factory=list)  # (level, candidate) left out of a dynamic beam

    @property
    def drafting(self) -> bool:
        return len(self.levels) < self.depth and (not self.levels or bool(self.levels[-1]))

    def stop(self) -> None:
        """End the proposal with the levels drafted so far."""
        self.depth = len(self.levels)

    @property
    def nodes(self) -> list[Candidate]:
        return [node for level in self.levels for node in level]

    @property
    def feeds_tree(self) -> bool:
        """The next forward feeds tree tokens (a dynamic tree past its first level)."""
        return self.shape.dynamic and bool(self.levels)

    def chain_feed(self) -> list[int]:
        """A static tree's next chain token: its last level's first node."""
        return [self.levels[-1][0].token]

    def tree_feed(self) -> tuple[list[int], list[int]]:
        """A dynamic tree's next tokens (its last level) and the parents of its whole region so far."""
        nodes = self.nodes
        return [node.token for node in self.levels[-1]], [node.parent for node in nodes]

    def grow(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> None:
        """Add the next level from the logits [n, V] of the tokens just fed (a chain feed: its last row)."""
        width = self.shape.width
        if not self.levels:
            self.levels.append(self._children(logits[-1], -1, 1.0, params, generator))
        elif not self.shape.dynamic:
            parent = len(self.nodes) - len(self.levels[-1])  # index of the last level's first node
            self.levels.append(self._children(logits[-1], parent, 1.0, params, generator))
        else:
            first = len(self.nodes) - len(self.levels[-1])
            level = self.levels[-1]
            candidates = best_children(logits[: len(level)], list(range(first, first + len(level))),
                                       [node.score for node in level], width)
            beam, left_out = next_level(candidates, width)
            self.spare += [(len(self.levels), c) for c in left_out]
            self.levels.append(beam)

    def draft_nodes(self) -> list[Candidate]:
        """The draft, level order, each parent the index of a node before it (-1: the root).

        Static: every node drafted. Dynamic: the shape's `nodes` best-scored of the beam and its
        spare candidates. A child never outscores its parent (a score is a product of
        probabilities) and ties go to the shallower node, so every chosen node's parent is chosen.
        """
        nodes = self.nodes
        if not self.shape.dynamic:
            return nodes
        depths = [level for level, nodes_ in enumerate(self.levels) for _ in nodes_]
        pool = [(depths[i], i, node) for i, node in enumerate(nodes)]  # beam nodes keep their index i
        pool += [(level, None, node) for level, node in self.spare]
        chosen = sorted(pool, key=lambda entry: (-entry[2].score, entry[0]))[: self.shape.nodes]
        chosen.sort(key=lambda entry: entry[0])  # level order; stable, so parents stay before children
        renumbered = {i: new for new, (_, i, _) in enumerate(chosen) if i is not None}
        return [Candidate(node.token, -1 if node.parent < 0 else renumbered[node.parent], node.q, node.score)
                for _, _, node in chosen]

    def _children(self, logits: torch.Tensor, parent: int, score: float, params: SamplingParams,
                  generator: torch.Generator) -> list[Candidate]:
        """A static tree's sampled rows draw their children (carrying q); every other row chooses the best."""
        if params.greedy or self.shape.dynamic:
            return best_children(logits[None], [parent], [score], self.shape.width)
        return sampled_children(logits, parent, self.shape.width, params, generator)
