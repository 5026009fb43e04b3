"""StagedDrafter: a middle model that drafts for the last model by speculating itself.

Staged speculative decoding (Spector & Re 2023): in a chain drafter -> middle ->
last, the middle model generates the last model's draft, and is itself sped up
by the drafter. Each `propose` runs inner rounds until the middle model has
produced k tokens: the inner drafter proposes j tokens, the middle model scores
`[pending, y_1..y_j]` in one forward and verifies them (greedy or rejection
sampling, exactly as the engine does), so its output follows its own
distribution. Those k tokens, with the middle model's q row for each, are the
draft the last model verifies: lossless with respect to the last model.

Inner rounds draft at most `remaining - 1` tokens, so a round (which emits at
most j + 1) never overshoots k. The middle model keeps the pending-token
invariant of the engine: its cache holds context + staged tokens but the last.

Syncing: the inner drafter's context runs ahead of the true context while
staging (it is told the middle model's tokens as they come). When the last
model keeps them all, `commit` just appends its extra token. When it rejects
some, the inner drafter cannot un-commit (the `Drafter` interface only
appends), so the sequence restarts on the inner drafter under a new id from
the true context; the middle model only crops its cache to the common prefix.
If the inner drafter fails (`DrafterUnavailable`), the middle model goes on
alone: slower, never a wrong token.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from actors.cascades import confidence
from actors.drafters import Draft, DraftRequest, Drafter, SteppedDrafter, commit_to
from actors.engine import SpeculationStats
from actors.errors import DrafterUnavailable, IncompatibleModels, InvalidRequest
from actors.runner import ModelRunner, SeqId
from actors.sampling import SamplingParams, logits_to_probs, make_generator
from actors.verification import RowToVerify, verify_round

log = logging.getLogger(__name__)

STAGE_SEED_OFFSET = 0x57A6ED  # the middle model's stream, apart from the verifier's and the inner drafter's
EPOCH_SEED_STRIDE = 0x9E3779B1  # a restarted inner sequence gets a fresh stream, not a replay of the last one


@dataclass
class _StagedState:
    context: list[int]  # prompt + every token the last model emitted
    params: SamplingParams
    generator: torch.Generator  # the middle model's verification stream
    inner_id: tuple  # the inner drafter's id for this sequence; changes at each restart
    inner_context: list[int]  # what the inner drafter has been told (prompt + commits)
    staged: list[int] = field(default_factory=list)  # tokens of the current proposal


@dataclass
class _Proposal:
    """What one sequence has staged so far in a proposal under way."""

    state: _StagedState
    k: int
    exit_layer: int | None
    wants_confidence: bool  # the caller's cascade rule reads the middle model's temperature-1 softmax
    probs: list[torch.Tensor] = field(default_factory=list)  # q rows of staged tokens, each [V]
    confidences: list[torch.Tensor] = field(default_factory=list)  # temperature-1 rows, each [V]
    stopped: bool = False  # the sequence was finished while this proposal was under way

    @property
    def staging(self) -> bool:
        return not self.stopped and len(self.state.staged) < self.k

    def draft(self) -> Draft:
        """The staged tokens as a draft: q rows for sampled verification (greedy: point masses)."""
        if not self.state.staged:
            return Draft([], None)
        probs = None if self.state.params.greedy else torch.stack(self.probs)  # [k, V]
        confidences = torch.stack(self.confidences) if self.wants_confidence else None  # [k, V]
        return Draft(list(self.state.staged), probs, confidences)


@dataclass
class _StagedJob:
    proposals: list[tuple[SeqId, _Proposal]]  # in request order

    @property
    def done(self) -> bool:
        return not any(proposal.staging for _, proposal in self.proposals)

    def drafts(self) -> list[Draft]:
        return [proposal.draft() for _, proposal in self.proposals]


class StagedDrafter(SteppedDrafter):
    """A middle model that drafts k tokens per request by speculating with an inner drafter."""

    def __init__(self, middle: ModelRunner, inner: Drafter | None, inner_k: int = 4):
        if inner is not None and inner.vocab_size is not None and inner.vocab_size != middle.vocab_size:
            raise IncompatibleModels(
                f"inner drafter vocabulary ({inner.vocab_size} ids) differs from {middle.name}'s ({middle.vocab_size} ids)"
            )
        if inner_k < 1:
            raise InvalidRequest(f"the inner draft length must be >= 1, got {inner_k}")
        self.middle, self.inner, self.inner_k = middle, inner, inner_k
        self.vocab_size = middle.vocab_size
        self.stats = SpeculationStats()  # the inner stage's rounds: drafted/accepted by the middle model, its forwards
        self._states: dict[SeqId, _StagedState] = {}

    @property
    def default_exit(self) -> int | None:
        return None if self.inner is None else self.inner.default_exit

    def check_exit(self, exit_layer: int) -> None:
        """Exits name the innermost drafter's layers; the middle model always runs whole."""
        if self.inner is None:
            super().check_exit(exit_layer)
        else:
            self.inner.check_exit(exit_layer)

    def start(self, seq_id: SeqId, prompt: list[int], params: SamplingParams) -> None:
        self.middle.add_sequence(seq_id)
        seed = None if params.seed is None else params.seed + STAGE_SEED_OFFSET
        state = _StagedState(list(prompt), params, make_generator(seed), (seq_id, 0), list(prompt))
        self._states[seq_id] = state
        self._call_inner(lambda d: d.start(state.inner_id, list(prompt), params))

    def begin(self, requests: Sequence[DraftRequest]) -> _StagedJob:
        job = _StagedJob([(r.seq_id, _Proposal(self._state(r.seq_id), self._affordable_k(r), r.exit_layer, r.confidence))
                          for r in requests])
        for _, proposal in job.proposals:
            self._drop_uncommitted(proposal.state)
        return job

    def advance(self, jobs: Sequence[_StagedJob]) -> None:
        """One inner round for every sequence still staging."""
        staging = {seq_id: p for job in jobs for seq_id, p in job.proposals if p.staging}
        for seq_id, proposal in staging.items():
            proposal.stopped = seq_id not in self._states
        rows = [seq_id for seq_id, proposal in staging.items() if not proposal.stopped]
        if rows:
            self._inner_round(rows, staging)

    def commit(self, seq_id: SeqId, emitted: list[int], rewind: int = 0) -> None:
        state = self._state(seq_id)
        committed = commit_to(state.context, emitted, rewind)
        state.staged = []
        self.middle.keep_common_prefix(seq_id, state.context, start=min(committed, self.middle.cached_length(seq_id)))
        self._sync_inner(state)

    def finish(self, seq_id: SeqId) -> None:
        state = self._states.pop(seq_id, None)
        self.middle.free(seq_id)
        if state is not None:
            self._call_inner(lambda d: d.finish(state.inner_id))

    # -- one inner round -----------------------------------------------------------

    def _inner_round(self, rows: list[SeqId], proposals: dict[SeqId, _Proposal]) -> None:
        """Every row drafts with the inner drafter, the middle model verifies all rows in one forward."""
        states = [self._state(s) for s in rows]
        requests = [DraftRequest(st.inner_id, min(self.inner_k, proposals[s].k - len(st.staged) - 1), proposals[s].exit_layer)
                    for s, st in zip(rows, states)]
        drafts = self._inner_drafts(requests)
        feeds = [self._uncached(s, st) for s, st in zip(rows, states)]
        logits = self.middle.forward(rows, [f + d.tokens for f, d in zip(feeds, drafts)])  # per row [n_i, V]
        windows = [row[-(len(d.tokens) + 1) :] for row, d in zip(logits, drafts)]  # [j + 1, V]: y_1..y_j, then the bonus
        verdicts = verify_round([RowToVerify(d.tokens, w, st.params, st.generator, d.probs)
                                 for st, d, w in zip(states, drafts, windows)])
        for seq_id, state, feed, draft, window, verdict in zip(rows, states, feeds, drafts, windows, verdicts):
            emitted = verdict.emitted(draft.tokens)
            cached_before = self.middle.cached_length(seq_id) - len(feed) - len(draft.tokens)
            self.middle.rollback(seq_id, cached_before + len(feed) + verdict.num_accepted)
            self._stage(state, proposals[seq_id], emitted, window[: len(emitted)])
            self.stats.add(SpeculationStats(len(draft.tokens), verdict.num_accepted, 1, len(emitted)))

    def _inner_drafts(self, requests: list[DraftRequest]) -> list[Draft]:
        no_drafts = [Draft([], None) for _ in requests]
        if self.inner is None or not any(r.k for r in requests):
            return no_drafts
        drafts = self._call_inner(lambda d: d.propose(requests))
        return no_drafts if drafts is None else drafts

    def _uncached(self, seq_id: SeqId, state: _StagedState) -> list[int]:
        """Context + staged tokens the middle model's cache lacks: at least the last one (the pending token)."""
        tokens = state.context + state.staged
        if self.middle.cached_length(seq_id) >= len(tokens):
            self.middle.rollback(seq_id, len(tokens) - 1)
        return tokens[self.middle.cached_length(seq_id) :]

    def _stage(self, state: _StagedState, proposal: _Proposal, emitted: list[int], rows: torch.Tensor) -> None:
        """Append a round's tokens and their middle-model rows; the inner drafter learns them too."""
        state.staged.extend(emitted)
        if proposal.wants_confidence:
            proposal.confidences.extend(confidence(rows))
        if not state.params.greedy:
            proposal.probs.extend(logits_to_probs(rows, state.params))
        state.inner_context.extend(emitted)
        self._call_inner(lambda d: d.commit(state.inner_id, emitted))

    # -- keeping the inner drafter in step -----------------------------------------------

    def _sync_inner(self, state: _StagedState) -> None:
        """Bring the inner drafter to the true context: append when it is behind, restart when it ran ahead."""
        told = state.inner_context
        if state.context[: len(told)] == told:
            missing = state.context[len(told) :]
            told.extend(missing)
            self._call_inner(lambda d: d.commit(state.inner_id, missing))
            return
        old_id, (seq_id, epoch) = state.inner_id, state.inner_id
        state.inner_id, state.inner_context = (seq_id, epoch + 1), list(state.context)
        params = state.params
        if params.seed is not None:
            params = params.model_copy(update={"seed": (params.seed + (epoch + 1) * EPOCH_SEED_STRIDE) % 2**63})
        self._call_inner(lambda d: d.finish(old_id))
        self._call_inner(lambda d: d.start(state.inner_id, list(state.context), params))

    def _drop_uncommitted(self, state: _StagedState) -> None:
        """Forget a proposal that was never committed (its round failed): the next one starts from the context."""
        if state.staged:
            state.staged = []
            self._sync_inner(state)

    def _call_inner(self, call):
        """Run an inner-drafter call; when the inner drafter is gone, the middle model decodes alone."""
        if self.inner is None:
            return None
        try:
            return call(self.inner)
        except DrafterUnavailable as err:
            log.warning("inner drafter unavailable, the middle model decodes alone: %s", err)
            self.inner = None
            return None

    def _state(self, seq_id: SeqId) -> _StagedState:
        try:
            return self._states[seq_id]
        except KeyError:
            raise InvalidRequest(f"the staged drafter has no sequence {seq_id!r}") from None

    def _affordable_k(self, request: DraftRequest) -> int:
        """k, cut so the middle model's cache (context + k - 1 staged tokens) fits its context window."""
        if request.k < 0:
            raise InvalidRequest(f"draft length must be >= 0, got {request.k}")
        room = self.middle.max_context - len(self._state(request.seq_id).context) + 1
        return max(0, min(request.k, room))
