"""Drafters: whatever proposes the k tokens a target then verifies.

One small interface in the spirit of HF's candidate generators, made batched:
`start` a sequence, `propose` drafts for many sequences at once, `commit` what
the verifier emitted (the drafter rolls back its state to match), `finish`.
A model drafter returns q, the exact distribution each token was sampled
from; the model-free n-gram drafter returns none (a point mass).
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from actors.compiled import FUSED_DRAFT_FEED
from actors.errors import InvalidRequest
from actors.runner import ModelRunner, SeqId
from actors.sampling import SamplingParams, logits_to_probs, make_generator, sample
from actors.trees import TreeDraftRow, TreeShape, path_of

DRAFT_SEED_OFFSET = 0x5EED  # the drafter's random stream is seeded apart from the verifier's
GREEDY_CUTOFF = 0.0  # ModelDrafter's default: whole greedy chains (bench/reports/draft_cutoff.md)
# ModelDrafter's default: the prompt tokens a drafter reads, the last ones. On the zoo's 640-token long_context
# prompts (10, greedy, k = 4, exit 4, one Xeon core) the drafter agreed with the target as well from the last 128-256
# (MAL 3.08-3.17) as from all (3.02), and the round got cheaper: its prefill, its attention and its cache's share of
# the CPU's caches, which the target's verify then misses (5-token verify at 700 keys after a draft: 4.1 ms
# against 4.4 from a 700-token drafter cache): 1.08x over the target alone against 0.97x.
PROMPT_WINDOW = 256


@dataclass(frozen=True)
class DraftRequest:
    seq_id: SeqId
    k: int  # how many tokens to propose; 0 asks for none this round
    exit_layer: int | None = None  # for a multi-exit drafter: which nested sub-model drafts
    confidence: bool = False  # also return the drafter's temperature-1 softmax (a cascade's deferral rule reads it)
    tree: TreeShape | None = None  # draft a token tree of this shape, where the drafter can; None: a chain of k


@dataclass(frozen=True)
class Draft:
    tokens: list[int]  # may be shorter than k, e.g. when an n-gram finds no match
    probs: torch.Tensor | None  # [len(tokens), V] q rows, or None for a point mass (greedy, n-gram)
    confidence: torch.Tensor | None = None  # [len(tokens), V] the drafter's temperature-1 softmax when asked for; None: not asked, or model-free
    parents: list[int] | None = None  # a tree draft: each token's parent (-1: the root), level order; None: a chain


class PendingDrafts(Protocol):
    """A proposal under way (a `concurrent.futures.Future` is one)."""

    def result(self) -> list[Draft]: ...


@dataclass(frozen=True)
class ReadyDrafts:
    """Drafts already computed: what `Drafter.propose_async` returns for a drafter in this process."""

    drafts: list[Draft]

    def result(self) -> list[Draft]:
        return self.drafts


class Drafter(ABC):
    """Proposes draft tokens for many sequences."""

    vocab_size: int | None = None  # None: the drafter emits any id the context holds
    default_exit: int | None = None  # the exit drafted from when none is asked for (the deepest); None: no exits

    def check_exit(self, exit_layer: int) -> None:
        """Reject an exit this drafter cannot draft from."""
        raise InvalidRequest(f"{type(self).__name__} has no exits to choose from (asked for exit {exit_layer})")

    def check_drafts(self, tree: bool, cascade: bool) -> None:
        """Reject a sequence that would ask this drafter for token trees or a cascade's confidences it cannot give."""

    @abstractmethod
    def start(self, seq_id: SeqId, prompt: list[int], params: SamplingParams) -> None: ...

    @abstractmethod
    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]: ...

    def propose_async(self, requests: Sequence[DraftRequest]) -> PendingDrafts:
        """Start drafting; return a handle whose `result()` gives what `propose` would.

        A drafter in another process returns while it drafts, so its caller can
        verify other sequences meanwhile. The default drafts at once: in one
        process there is nothing to overlap. The caller proposes once at a time
        (it resolves or abandons the last handle first) and commits to a
        sequence only once its draft is resolved; it may finish one whose draft
        is still in flight (a cancelled stream), which the drafter makes safe.
        """
        return ReadyDrafts(self.propose(requests))

    @abstractmethod
    def commit(self, seq_id: SeqId, emitted: list[int], rewind: int = 0) -> None:
        """Append the tokens the verifier emitted this round (accepted + recovered/bonus), after dropping the
        context's last `rewind` ids (a foreign-vocabulary bridge re-tokenising a word split across rounds)."""

    @abstractmethod
    def finish(self, seq_id: SeqId) -> None: ...


def commit_to(context: list[int], emitted: list[int], rewind: int) -> int:
    """Drop the context's last `rewind` ids, then append `emitted`; returns how many ids were kept before them."""
    if not 0 <= rewind <= len(context):
        raise InvalidRequest(f"cannot rewind {rewind} of a context of {len(context)} tokens")
    kept = len(context) - rewind
    context[kept:] = emitted
    return kept


class DraftJob(Protocol):
    """Proposals under way in a `SteppedDrafter`, a step at a time."""

    @property
    def done(self) -> bool: ...

    def drafts(self) -> list[Draft]:
        """One draft per request, in request order (valid once done)."""


class SteppedDrafter(Drafter):
    """A drafter whose proposals advance one forward call at a time (a draft step, or a few fused greedy ones).

    `DraftBatcher` advances every job under way in one call, so a proposal
    that arrives while others draft joins them at their next call instead of
    waiting for them to finish (continuous batching, as a serving engine does
    with decode steps). `propose` is the same thing for one caller.
    """

    @abstractmethod
    def begin(self, requests: Sequence[DraftRequest]) -> DraftJob:
        """Validate the requests and set up their proposals; no forward yet."""

    @abstractmethod
    def advance(self, jobs: Sequence[DraftJob]) -> None:
        """Advance every unfinished proposal of these jobs (begun here) by one forward call, all rows in it.

        A proposal whose sequence was finished meanwhile stops where it is.
        """

    def prefill(self, seq_id: SeqId) -> None:
        """Do ahead of a started sequence's first proposal what that proposal would begin with (nothing here)."""

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        job = self.begin(requests)
        while not job.done:
            self.advance([job])
        return job.drafts()


@dataclass
class _CachedRegion:
    """The tree nodes a dynamic tree draft left in the drafter's cache, from `start` on (node i at offset i)."""

    start: int
    tokens: list[int]
    parents: list[int]


@dataclass
class _ModelDraftState:
    context: list[int]  # the prompt (its last `prompt_window` tokens) + every committed token
    params: SamplingParams
    generator: torch.Generator
    region: _CachedRegion | None = None  # the last dynamic tree's cached nodes, compacted at the next commit


@dataclass
class _DraftRow:
    """One request's proposal under way in a `ModelDrafter`."""

    seq_id: SeqId
    length: int  # tokens to draft (k, cut to the context window)
    exit_layer: int
    wants_confidence: bool
    cutoff: float = 0.0  # a greedy chain stops before the token that takes `reach` below this
    reach: float = 1.0  # the product of the drafted greedy tokens' probabilities under the drafter
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)  # q rows [V] of sampled tokens (greedy: none)
    confidences: list[torch.Tensor] = field(default_factory=list)  # temperature-1 rows [V], when asked for

    @property
    def drafting(self) -> bool:
        return len(self.tokens) < self.length

    def stop(self) -> None:
        """End the proposal with the tokens drafted so far."""
        self.length = len(self.tokens)

    def extend_greedy(self, tokens: list[int], probabilities: list[float]) -> None:
        """Add greedy tokens up to the first that takes the draft's reach below the cut-off (then stop), at most length."""
        for token, probability in zip(tokens[: self.length - len(self.tokens)], probabilities):
            if self.reach * probability < self.cutoff:
                self.stop()
                return
            self.reach *= probability
            self.tokens.append(token)

    def draft(self) -> Draft:
        """Greedy drafts travel as point masses (probs None): one-hot rows would only grow the payload."""
        if not self.tokens:
            return Draft([], None)
        return Draft(list(self.tokens), torch.stack(self.probs) if self.probs else None,
                     torch.stack(self.confidences) if self.confidences else None)


def _tree_draft(row: TreeDraftRow) -> Draft:
    """A tree's nodes in level order; q rows only when every node was drawn (a static tree of a sampled row)."""
    nodes = row.draft_nodes()
    probs = torch.stack([n.q for n in nodes]) if nodes and all(n.q is not None for n in nodes) else None
    return Draft([n.token for n in nodes], probs, parents=[n.parent for n in nodes])


@dataclass
class _ModelDraftJob:
    rows: list[_DraftRow | TreeDraftRow]

    @property
    def done(self) -> bool:
        return not any(row.drafting for row in self.rows)

    def drafts(self) -> list[Draft]:
        return [_tree_draft(row) if isinstance(row, TreeDraftRow) else row.draft() for row in self.rows]


class ModelDrafter(SteppedDrafter):
    """Drafts with any exit of a (multi-exit) model; rows with different exits share one forward."""

    def __init__(self, runner: ModelRunner, greedy_cutoff: float = GREEDY_CUTOFF,
                 prompt_window: int | None = PROMPT_WINDOW):
        """`greedy_cutoff`: a greedy chain (not a cascade's) stops before the token at which the product of its
        tokens' probabilities under the drafter, an estimate of how likely the target accepts the draft that far,
        falls below it: positions unlikely to be reached cost the target's forward a token each (0: draft all k).
        `prompt_window`: the drafter reads only the last this many tokens of a prompt (None: all of it). Lossless
        verification makes what it drafts from its own affair; a speculative cascade that defers emits tokens
        drafted from the window."""
        if not 0.0 <= greedy_cutoff < 1.0:
            raise InvalidRequest(f"the greedy cut-off must lie in [0, 1), got {greedy_cutoff}")
        if prompt_window is not None and prompt_window < 1:
            raise InvalidRequest(f"the drafter's prompt window must be at least 1 token, got {prompt_window}")
        self.runner, self.greedy_cutoff, self.prompt_window = runner, greedy_cutoff, prompt_window
        self.vocab_size = runner.vocab_size
        self._states: dict[SeqId, _ModelDraftState] = {}

    @property
    def default_exit(self) -> int:
        return max(self.runner.exit_layers)

    def check_exit(self, exit_layer: int) -> None:
        self.runner.check_exit(exit_layer)

    def start(self, seq_id: SeqId, prompt: list[int], params: SamplingParams) -> None:
        self.runner.add_sequence(seq_id)
        seed = None if params.seed is None else params.seed + DRAFT_SEED_OFFSET
        read = prompt[-self.prompt_window :] if self.prompt_window else prompt
        self._states[seq_id] = _ModelDraftState(list(read), params, make_generator(seed))

    def prefill(self, seq_id: SeqId) -> None:
        """Cache a started sequence's context but its last token, at the deepest exit (the exit its proposals will
        ask for is not known yet; a deeper cache serves every shallower exit). A sequence finished meanwhile, or
        one whose cache already holds that much, is left as it is."""
        state = self._states.get(seq_id)
        if state is None:
            return
        cached = self.runner.cached_length(seq_id)
        if cached < len(state.context) - 1:
            self.runner.forward([seq_id], [state.context[cached:-1]], [self.default_exit], last_only=True)

    def begin(self, requests: Sequence[DraftRequest]) -> _ModelDraftJob:
        return _ModelDraftJob([self._tree_row(r) if r.tree is not None else self._chain_row(r) for r in requests])

    def _chain_row(self, request: DraftRequest) -> _DraftRow:
        cut = not request.confidence and self._state(request.seq_id).params.greedy
        return _DraftRow(request.seq_id, self._affordable_k(request), request.exit_layer or self.default_exit,
                         request.confidence, self.greedy_cutoff if cut else 0.0)

    def advance(self, jobs: Sequence[_ModelDraftJob]) -> None:
        rows = [row for job in jobs for row in job.rows if row.drafting]
        for row in rows:
            if row.seq_id not in self._states:
                row.stop()  # finished (cancelled) while drafting: stop here
        rows = [row for row in rows if row.drafting]
        growing, stepping = [], []
        for row in rows:
            (growing if isinstance(row, TreeDraftRow) and row.feeds_tree else stepping).append(row)
        if growing:
            self._grow_trees(growing)
        if stepping:
            self._step_rows(stepping)

    def _step_rows(self, rows: list["_DraftRow | TreeDraftRow"]) -> None:
        """One chain step (or several fused greedy ones) for rows that feed a chain: chains, and trees' first levels."""
        steps = self._fused_steps(rows)
        if steps > 1:
            drafted, probabilities = self.runner.draft_greedy([r.seq_id for r in rows], [self._fused_feed(r) for r in rows],
                                                              [r.exit_layer for r in rows], steps)
            for row, tokens, row_probabilities in zip(rows, drafted, probabilities):
                row.extend_greedy(tokens, row_probabilities)
            return
        feeds = [self._chain_feed(row) for row in rows]
        logits = self.runner.forward([r.seq_id for r in rows], feeds, [r.exit_layer for r in rows], last_only=True)
        for row, row_logits in zip(rows, logits):  # row_logits [1, V]
            if isinstance(row, TreeDraftRow):
                state = self._state(row.seq_id)
                row.grow(row_logits, state.params, state.generator)
                continue
            if row.cutoff:
                row.extend_greedy([int(row_logits[0].argmax())], [float(torch.softmax(row_logits[0].float(), -1).max())])
                continue
            row.tokens.append(self._next_token(row.seq_id, row_logits, row.probs))
            if row.wants_confidence:
                row.confidences.append(torch.softmax(row_logits[0].float(), dim=-1))

    def _chain_feed(self, row: "_DraftRow | TreeDraftRow") -> list[int]:
        if isinstance(row, TreeDraftRow):
            return row.chain_feed() if row.levels else self._pending(row.seq_id)
        return row.tokens[-1:] if row.tokens else self._pending(row.seq_id)

    def _grow_trees(self, rows: list[TreeDraftRow]) -> None:
        """One tree forward that feeds every dynamic tree's last level against the levels it has cached."""
        for row in rows:
            if row.region_start is None:
                row.region_start = self.runner.cached_length(row.seq_id)
        feeds = [row.tree_feed() for row in rows]
        logits = self.runner.forward_tree([r.seq_id for r in rows], [tokens for tokens, _ in feeds],
                                          [r.region_start for r in rows], [parents for _, parents in feeds],
                                          [r.exit_layer for r in rows])  # per row [width, V]
        for row, row_logits in zip(rows, logits):
            state, cached = self._state(row.seq_id), row.nodes  # every node so far is now in the cache
            state.region = _CachedRegion(row.region_start, [n.token for n in cached], [n.parent for n in cached])
            row.grow(row_logits, state.params, state.generator)

    def _tree_row(self, request: DraftRequest) -> TreeDraftRow:
        """A tree proposal, its depth cut so that its cached nodes fit the context window."""
        shape = request.tree
        room = self.runner.max_context - len(self._state(request.seq_id).context)
        return TreeDraftRow(request.seq_id, shape, request.exit_layer or self.default_exit,
                            depth=max(0, min(shape.depth, room // shape.width)))

    def _fused_steps(self, rows: list["_DraftRow | TreeDraftRow"]) -> int:
        """Steps one call drafts for all these rows: several (`runner.draft_greedy`) when every row can fuse
        (`_fusable`: the usual round, also after a fully accepted draft); else one. A row's first step after
        its prompt runs alone, and the rest of its draft fuses."""
        if not all(self._fusable(row) for row in rows):
            return 1
        remaining = min(row.length - len(row.tokens) for row in rows)
        return next((steps for steps in self.runner.fused_draft_steps if steps <= remaining), 1)

    def _fusable(self, row: "_DraftRow | TreeDraftRow") -> bool:
        """A greedy chain that wants no confidence, whose cache reaches its exit and lacks at most the last
        `FUSED_DRAFT_FEED` tokens of its context and draft so far (a fused draft's feed)."""
        if isinstance(row, TreeDraftRow) or row.wants_confidence:
            return False
        state = self._state(row.seq_id)
        length = len(state.context) + len(row.tokens)
        return (state.params.greedy and self.runner.cached_depth(row.seq_id) >= row.exit_layer
                and FUSED_DRAFT_FEED <= length <= self.runner.cached_length(row.seq_id) + FUSED_DRAFT_FEED)

    def _fused_feed(self, row: _DraftRow) -> list[int]:
        """A fusable row's last `FUSED_DRAFT_FEED` tokens, its cache rolled back to just before them (a token
        it held already is written again at its position, with the same keys and values)."""
        context = self._state(row.seq_id).context
        self.runner.rollback(row.seq_id, len(context) + len(row.tokens) - FUSED_DRAFT_FEED)
        return (context[-FUSED_DRAFT_FEED:] + row.tokens)[-FUSED_DRAFT_FEED:]

    def _next_token(self, seq_id: SeqId, row_logits: torch.Tensor, probs: list[torch.Tensor]) -> int:
        """A greedy row takes the argmax (its q is a point mass, never sent); a sampled row samples q and keeps it."""
        state = self._state(seq_id)
        if state.params.greedy:
            return int(row_logits[0].argmax())
        q = logits_to_probs(row_logits, state.params)  # [1, V]
        probs.append(q[0])
        return int(sample(q, state.generator))

    def commit(self, seq_id: SeqId, emitted: list[int], rewind: int = 0) -> None:
        state = self._state(seq_id)
        committed = commit_to(state.context, emitted, rewind)
        if state.region is not None and not rewind:  # keep the tree nodes the target accepted, moved into place
            # never the last emitted token, even where a node left out of the draft spells it: the next
            # proposal feeds it, and reads its first draft token off that feed
            self.runner.keep_path(seq_id, state.region.start, path_of(state.region.tokens, state.region.parents, emitted[:-1]))
        state.region = None
        self.runner.keep_common_prefix(seq_id, state.context, start=min(committed, self.runner.cached_length(seq_id)))

    def finish(self, seq_id: SeqId) -> None:
        self._states.pop(seq_id, None)
        self.runner.free(seq_id)

    def _state(self, seq_id: SeqId) -> _ModelDraftState:
        try:
            return self._states[seq_id]
        except KeyError:
            raise InvalidRequest(f"the drafter has no sequence {seq_id!r}") from None

    def _affordable_k(self, request: DraftRequest) -> int:
        """k, cut so the drafter's cache (context + k - 1 drafts) fits its context window."""
        if request.k < 0:
            raise InvalidRequest(f"draft length must be >= 0, got {request.k}")
        room = self.runner.max_context - len(self._state(request.seq_id).context) + 1
        return max(0, min(request.k, room))

    def _pending(self, seq_id: SeqId) -> list[int]:
        """Context tokens the drafter's cache has not seen yet (the whole prompt at first), at least the last one.

        A commit may end on ids the cache holds already (a foreign-vocabulary bridge re-tokenising the
        text to what was drafted); the last is then fed again, for the logits the next draft starts from.
        """
        context = self._state(seq_id).context
        if self.runner.cached_length(seq_id) >= len(context):
            self.runner.rollback(seq_id, len(context) - 1)
        return context[self.runner.cached_length(seq_id) :]

class NgramDrafter(Drafter):
    """Prompt lookup: propose what followed the last earlier occurrence of the context's tail.

    Model-free, so it has no q: verification treats each token as a point mass.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidRequest(f"n-gram sizes need 1 <= min ({min_ngram}) <= max ({max_ngram})")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._contexts: dict[SeqId, list[int]] = {}

    def start(self, seq_id: SeqId, prompt: list[int], params: SamplingParams) -> None:
        self._contexts[seq_id] = list(prompt)

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        return [Draft(self._lookup(self._contexts[r.seq_id], r.k), None) for r in requests]

    def commit(self, seq_id: SeqId, emitted: list[int], rewind: int = 0) -> None:
        commit_to(self._contexts[seq_id], emitted, rewind)

    def finish(self, seq_id: SeqId) -> None:
        self._contexts.pop(seq_id, None)

    def _lookup(self, context: list[int], k: int) -> list[int]:
        """The k tokens after the most recent earlier match of the longest tail n-gram."""
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):
                if context[start : start + n] == tail:
                    return context[start + n : start + n + k]
        return []
