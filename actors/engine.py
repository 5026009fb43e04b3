"""SpeculationEngine: continuous batching of speculative decoding for one target.

Sequences join with `add` and leave when they finish or are cancelled; each
`step` runs one round for every live sequence:

1. sequences added since the last step are prefilled together;
2. the drafter proposes up to k tokens per sequence (one batched call);
3. the target scores `[pending, x_1..x_k]` per sequence in one batched forward;
4. each row is verified, both models roll back to what was emitted, and the
   new tokens are returned.

The target's cache holds every emitted token but the last, the *pending* one;
the next round feeds it first, so one forward both extends the cache and
judges the draft. With no drafter the same loop is plain autoregressive
decoding (k = 0), the baseline every speedup is measured against.

If the drafter fails (`DrafterUnavailable`, e.g. its actor died), the engine
drops it and goes on decoding plainly: slower, never a wrong or lost token. A
sequence the drafter has no room for (`CapacityExhausted` at its start) decodes
plainly too, and so does every sequence of a target without (or that lost) its drafter.
"""

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from actors.cascades import accepted_and_deferred, cascade_defer, cascade_verdict
from actors.drafters import Draft, DraftRequest, Drafter
from actors.errors import CapacityExhausted, DrafterUnavailable, IncompatibleModels, InvalidRequest
from actors.runner import ModelRunner, SeqId
from actors.sampling import SamplingParams, make_generator
from actors.speculation import FOLLOW_PLAN, MAX_DRAFT_LENGTH, SpeculationSpec
from actors.telemetry import PLAIN, RoundBuffer, RoundRecord, RoundTimes
from actors.tree_verification import TreeToVerify, verify_tree
from actors.trees import TreeShape, chain_parents
from actors.verification import RowToVerify, Verdict, verify_round

log = logging.getLogger(__name__)


@dataclass
class SpeculationStats:
    """Counters of one sequence or of a whole run (MAL counts the bonus token)."""

    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept by the verifier
    target_forwards: int = 0  # decoding rounds: one target forward each (prefill excluded)
    emitted: int = 0  # tokens produced by the rounds, before truncation at a stop
    deferred: int = 0  # cascade: judged draft positions that stood on the drafter's q

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per target forward, bonus included; plain decoding gives 1.0."""
        return self.emitted / self.target_forwards if self.target_forwards else 0.0

    def add(self, other: "SpeculationStats") -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.target_forwards += other.target_forwards
        self.emitted += other.emitted
        self.deferred += other.deferred


@dataclass(frozen=True)
class SequenceUpdate:
    """What one step did for one sequence."""

    seq_id: SeqId
    new_tokens: list[int]  # tokens appended this step (the stopping end-of-sequence token excluded)
    finish_reason: str | None  # "stop" (end-of-sequence token), "length" (max_tokens) or None while live
    stats: SpeculationStats  # cumulative for the sequence
    arm: tuple[int | None, int] = (None, 0)  # (exit, k) of this step's round; (None, 0) decoded plainly; a tree's k: its nodes
    tree: str = ""  # the tree shape's label when the sequence drafts trees; "" a chain


@dataclass
class _Live:
    """A sequence being generated."""

    seq_id: SeqId
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    pending: int  # last emitted token, not yet in the target's cache
    spec: SpeculationSpec = FOLLOW_PLAN  # this sequence's overrides of the engine's plan, and its cascade
    drafting: bool = False  # the drafter holds this sequence; False: it decodes plainly
    prefilled: bool = False
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: SpeculationStats = field(default_factory=SpeculationStats)


class SpeculationEngine:
    """Generates for many sequences of one target, speculating with a drafter when one is given."""

    def __init__(
        self,
        target: ModelRunner,
        drafter: Drafter | None = None,
        k: int = 4,
        exit_layer: int | None = None,
        target_name: str = "",
        drafter_name: str = "",
        clock: Callable[[], float] = time.perf_counter,
        max_waiting: int | None = None,
        tree: TreeShape | None = None,
    ):
        """`target_name` and `drafter_name` only label the round telemetry (`drain_telemetry`);
        `clock` times its rounds: wall time by default, or e.g. `time.thread_time` for an
        in-process benchmark on a shared machine (CPU seconds of this thread only, so other
        processes' load does not count; wrong for a drafter in another process). Sequences beyond the
        target's KV slots wait for one; `max_waiting` bounds how many (None: no bound), beyond it `add`
        raises `CapacityExhausted`. With `tree`, sequences that follow the plan draft token trees of that
        shape instead of chains of k (`actors.trees`)."""
        if drafter is not None:
            check_pairing(target, drafter)
            if not 1 <= k <= MAX_DRAFT_LENGTH:
                raise InvalidRequest(f"draft length k must be in 1..{MAX_DRAFT_LENGTH}, got {k}")
        self.target, self.drafter = target, drafter
        self.k = k if drafter is not None else 0
        self.tree = tree if drafter is not None else None
        self.exit_layer = self._resolve_exit(exit_layer)
        self.target_name, self.drafter_name = target_name, drafter_name
        self.telemetry, self.clock = RoundBuffer(), clock
        self.round_hook: Callable[[RoundTimes], None] | None = None  # told where each round's time went
        self._times = RoundTimes()  # the round under way
        self._round_started = 0.0  # clock() when it began
        self.max_waiting = max_waiting
        self._live: dict[SeqId, _Live] = {}
        self._waiting: dict[SeqId, _Live] = {}  # admitted, waiting for a KV slot; in arrival order
        self._ids = itertools.count()

    @property
    def num_live(self) -> int:
        """Sequences being generated, those waiting for a slot included."""
        return len(self._live) + len(self._waiting)

    def add(
        self, prompt: Sequence[int], params: SamplingParams, seq_id: SeqId | None = None, spec: SpeculationSpec = FOLLOW_PLAN
    ) -> SeqId:
        """Validate a sequence; it takes a KV slot at the next step that finds one free, and is prefilled then.

        `spec` may override the engine's k and exit for this sequence (k = 0 decodes it
        plainly) and verify it against a speculative cascade (see `actors.cascades`).
        """
        self._check_prompt(prompt, params)
        if self.drafter is not None:
            if spec.exit_layer is not None:
                self.drafter.check_exit(spec.exit_layer)
            self.drafter.check_drafts(spec.tree is not None, spec.cascade is not None)
        seq_id = next(self._ids) if seq_id is None else seq_id
        if seq_id in self._live or seq_id in self._waiting:
            raise InvalidRequest(f"sequence {seq_id!r} is already being generated")
        if self.max_waiting is not None and len(self._waiting) >= self.max_waiting and not self.target.store.free_slots:
            raise CapacityExhausted(
                f"{self.target_name or 'the target'} is full ({self.target.store.num_slots} sequences decoding, "
                f"{len(self._waiting)} waiting): retry later"
            )
        self._waiting[seq_id] = _Live(seq_id, list(prompt), params, make_generator(params.seed), pending=prompt[-1],
                                      spec=spec)
        return seq_id

    def _admit_waiting(self) -> None:
        """Give waiting sequences the target's free slots, oldest first, and start them on the drafter."""
        while self._waiting and self.target.store.free_slots:
            seq_id = next(iter(self._waiting))
            seq = self._waiting.pop(seq_id)
            self.target.add_sequence(seq_id)
            seq.drafting = self._start_drafting(seq, seq.prompt)
            self._live[seq_id] = seq

    def _start_drafting(self, seq: _Live, context: list[int]) -> bool:
        """Start a sequence on the drafter; False when there is none or it has no room (the sequence decodes plainly).

        A sequence that asked for no speculation (k = 0) never drafts, whatever the plan: it takes no
        drafter slot and costs no drafter call at admission, per round or at its end.
        """
        if self.drafter is None or seq.spec.k == 0:
            return False
        try:
            self._call_drafter(lambda d: d.start(seq.seq_id, context, seq.params))
        except CapacityExhausted as err:
            log.info("drafter full, sequence %r decodes plainly: %s", seq.seq_id, err)
            return False
        return self.drafter is not None

    def cancel(self, seq_id: SeqId) -> bool:
        """Stop a sequence and free its state on both models; False if it was not live."""
        if self._waiting.pop(seq_id, None) is not None:
            return True
        seq = self._live.pop(seq_id, None)
        if seq is not None:
            self._release(seq)
        return seq is not None

    def step(self) -> list[SequenceUpdate]:
        """One round for every live sequence; finished sequences are released."""
        self._admit_waiting()
        running = list(self._live.values())
        if not running:
            return []
        self._begin_round()
        self._prefill([s for s in running if not s.prefilled])
        arms = [self._round_arm(s) for s in running]
        started = self.clock()
        drafts = self._propose(running)
        return self._verify_round(running, drafts, arms, self.clock() - started)

    def _begin_round(self) -> None:
        self._times, self._round_started = RoundTimes(), self.clock()

    def close(self) -> None:
        """Cancel every live sequence."""
        for seq_id in [*self._live, *self._waiting]:
            self.cancel(seq_id)

    def set_plan(self, k: int, exit_layer: int | None = None, tree: TreeShape | None = None) -> None:
        """Change how sequences without overrides speculate, from the next step on.

        k = 0 turns speculation off: while no live sequence drafts, the drafter
        is not called at all. Outputs stay exact under any sequence of plans:
        verification never depends on what was drafted, and a drafter that
        skipped rounds still receives every commit and catches up by common
        prefix at its next proposal. exit_layer None drafts from the deepest exit; a `tree`
        (with k > 0) drafts token trees of that shape in place of chains.
        """
        if not 0 <= k <= MAX_DRAFT_LENGTH:
            raise InvalidRequest(f"draft length k must be in 0..{MAX_DRAFT_LENGTH}, got {k}")
        if k and self.drafter is None:
            raise InvalidRequest("this target has no drafter (or lost it): only k = 0, plain decoding, is possible")
        self.k, self.exit_layer, self.tree = k, self._resolve_exit(exit_layer), tree if k else None

    def drain_telemetry(self) -> list[RoundRecord]:
        """The round records written since the last drain (thread-safe)."""
        return self.telemetry.drain()

    def replace_drafter(self, drafter: Drafter | None, k: int, exit_layer: int | None = None,
                        tree: TreeShape | None = None) -> None:
        """Draft with another drafter from the next round: a replacement for a dead one, or a re-pairing.

        Live sequences start on the new drafter with everything emitted so far,
        so it drafts from the true context; the old one forgets them. None (or
        a drafter that fails at once) decodes plainly.
        """
        if drafter is not None:
            check_pairing(self.target, drafter)
        old, self.drafter = self.drafter, drafter
        for seq in self._live.values():
            if old is not None and seq.drafting:
                _forget(old, seq.seq_id)
            seq.drafting = self._start_drafting(seq, seq.prompt + seq.tokens)
        self.k, self.exit_layer, self.tree = 0, None, None
        if self.drafter is not None:
            self.set_plan(k, exit_layer, tree)

    # -- validation --------------------------------------------------------------

    def _check_prompt(self, prompt: Sequence[int], params: SamplingParams) -> None:
        if len(prompt) == 0:
            raise InvalidRequest("prompt is empty: give at least one token")
        if not all(isinstance(t, int) and 0 <= t < self.target.vocab_size for t in prompt):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {self.target.vocab_size})")
        if len(prompt) + params.max_tokens > self.target.max_context:
            raise InvalidRequest(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the target's context of {self.target.max_context} tokens"
            )

    def _resolve_exit(self, exit_layer: int | None) -> int | None:
        """The exit drafted from: the one asked for (checked), else the drafter's deepest; None without exits."""
        if self.drafter is None:
            return None
        if exit_layer is None:
            return self.drafter.default_exit
        self.drafter.check_exit(exit_layer)
        return exit_layer

    # -- one round -------------------------------------------------------------------

    def _prefill(self, fresh: list[_Live]) -> None:
        """Cache every prompt token but the last, all fresh sequences in one forward."""
        rows = [s for s in fresh if len(s.prompt) > 1]
        if rows:
            started = self.clock()
            self.target.forward([s.seq_id for s in rows], [s.prompt[:-1] for s in rows], last_only=True)
            self._times.prefill_s += self.clock() - started
        for seq in fresh:
            seq.prefilled = True

    def _verify_round(self, rows: list[_Live], drafts: list[Draft], arms: list, draft_s: float) -> list[SequenceUpdate]:
        """One target forward judges every row's draft; record the round and release finished sequences.

        `arms` are the (exit, k, tree) each row's draft was planned with; `draft_s` the time the round spent drafting.
        """
        before = [replace(s.stats) for s in rows]
        started = self.clock()
        logits = self._score(rows, drafts)  # per row [k_i + 1, V]
        forwarded = self.clock()
        verdicts = _verify(rows, drafts, logits)
        verified = self.clock()
        updates = [self._advance(s, d, v) for s, d, v in zip(rows, drafts, verdicts)]
        self._record_round(rows, arms, before, draft_s, self.clock() - started)
        for update in updates:
            if update.finish_reason is not None:
                self._release(self._live.pop(update.seq_id))
        self._end_round(len(rows), sum(len(u.new_tokens) for u in updates), draft_s, forwarded - started,
                        verified - forwarded)
        return updates

    def _score(self, rows: list[_Live], drafts: list[Draft]) -> list[torch.Tensor]:
        """The target's logits [k_i + 1, V] over each row's `[pending] + draft`, every row in one forward: a tree
        forward when some draft is a tree (the chains ride along as trees without branches)."""
        ids, fed = [s.seq_id for s in rows], [[s.pending] + d.tokens for s, d in zip(rows, drafts)]
        if all(d.parents is None for d in drafts):
            return self.target.forward(ids, fed)
        parents = [[-1] + [p + 1 for p in (chain_parents(len(d.tokens)) if d.parents is None else d.parents)]
                   for d in drafts]  # region offsets: the pending token is entry 0
        return self.target.forward_tree(ids, fed, [self.target.cached_length(i) for i in ids], parents)

    def _end_round(self, rows: int, emitted: int, draft_s: float, forward_s: float, verification_s: float) -> None:
        times = self._times
        times.rows, times.emitted = rows, emitted
        times.draft_s, times.forward_s, times.verification_s = draft_s, forward_s, verification_s
        times.total_s = self.clock() - self._round_started
        if self.round_hook is not None:
            self.round_hook(times)

    def _propose(self, running: list[_Live]) -> list[Draft]:
        """One draft per row: the drafter's for the sequences it holds, empty for the others."""
        drafts = [Draft([], None) for _ in running]
        asking = [(i, self._request(s)) for i, s in enumerate(running) if s.drafting]
        if self.drafter is None or not any(r.k for _, r in asking):
            return drafts  # nobody drafts this round: skip the call (commits still reach the drafter)
        proposed = self._call_drafter(lambda d: d.propose([r for _, r in asking]))
        for (i, _), draft in zip(asking, proposed or []):
            drafts[i] = draft
        return drafts

    def _request(self, seq: _Live) -> DraftRequest:
        tree = self._affordable_tree(seq)
        if tree is not None:  # a drafter that drafts no trees (n-gram, a staged chain) drafts a chain of its depth
            return DraftRequest(seq.seq_id, tree.depth, self._arm(seq)[0], tree=tree)
        return DraftRequest(seq.seq_id, self._draft_length(seq), self._arm(seq)[0], confidence=seq.spec.cascade is not None)

    def _round_arm(self, seq: _Live) -> tuple[int | None, int, str]:
        """(exit, k, tree label or "") this sequence's round is planned with: how telemetry names its arm."""
        tree = self._tree(seq)
        return (*self._arm(seq), tree.label if tree is not None else "")

    def _tree(self, seq: _Live) -> TreeShape | None:
        """The tree shape this sequence drafts now: its own, else the plan's unless it asked for a chain."""
        if self.drafter is None or not seq.drafting:
            return None
        if seq.spec.tree is not None:
            return seq.spec.tree
        return self.tree if seq.spec.k is None else None

    def _affordable_tree(self, seq: _Live) -> TreeShape | None:
        """The sequence's tree, its depth cut so the round emits at most max_tokens and its nodes fit the target's
        context; None when it drafts a chain or no level fits."""
        tree = self._tree(seq)
        if tree is None:
            return None
        room = self.target.max_context - self.target.cached_length(seq.seq_id) - 1  # the pending token goes first
        depth = min(tree.depth, seq.params.max_tokens - len(seq.tokens) - 1, room // tree.width)
        if depth < 1:
            return None
        budget = None if tree.budget is None else min(tree.budget, room)
        return tree.model_copy(update={"depth": depth, "budget": budget})

    def _draft_length(self, seq: _Live) -> int:
        """k, cut so the round cannot emit past max_tokens (it emits at most k + 1; a deferring cascade, k)."""
        cascade = seq.spec.cascade
        bonus = 0 if cascade is not None and cascade.can_defer else 1
        return max(0, min(self._arm(seq)[1], seq.params.max_tokens - len(seq.tokens) - bonus))

    def _arm(self, seq: _Live) -> tuple[int | None, int]:
        """(exit, k) this sequence speculates with now; (None, 0) when it decodes plainly."""
        if self.drafter is None or not seq.drafting:
            return None, 0
        tree = self._tree(seq)
        k = tree.nodes if tree is not None else self.k if seq.spec.k is None else seq.spec.k
        exit_layer = self.exit_layer if seq.spec.exit_layer is None else seq.spec.exit_layer
        return (exit_layer, k) if k else (None, 0)

    def _record_round(
        self, running: list[_Live], arms: list, before: list[SpeculationStats], draft_s: float, verify_s: float
    ) -> None:
        """Write one `RoundRecord` per arm the round's sequences used (`before`: their stats before the round)."""
        groups: dict[tuple[int | None, int, str], list[tuple[SpeculationStats, SpeculationStats]]] = {}
        for seq, arm, old in zip(running, arms, before):
            groups.setdefault(arm, []).append((old, seq.stats))
        for (exit_layer, k, tree), stats in groups.items():
            self.telemetry.append(RoundRecord(
                exit_layer, k, len(stats), len(running),
                drafted=sum(new.drafted - old.drafted for old, new in stats),
                accepted_lengths=tuple(new.accepted - old.accepted for old, new in stats),
                emitted=sum(new.emitted - old.emitted for old, new in stats),
                draft_s=draft_s, verify_s=verify_s, deferred=sum(new.deferred - old.deferred for old, new in stats),
                target=self.target_name, drafter=self.drafter_name if k else PLAIN, tree=tree,
            ))

    def _advance(self, seq: _Live, draft: Draft, verdict: Verdict) -> SequenceUpdate:
        """Record the round, roll both models back to what was emitted, and check for a stop."""
        emitted = verdict.emitted(draft.tokens)
        accepted, deferred = accepted_and_deferred(verdict)
        seq.stats.add(SpeculationStats(len(draft.tokens), accepted, 1, len(emitted), deferred))
        cached_before = self.target.cached_length(seq.seq_id) - len(draft.tokens) - 1
        if verdict.path is None:
            self.target.rollback(seq.seq_id, cached_before + 1 + verdict.num_accepted)
        else:  # the pending token and the accepted nodes, moved into place
            self.target.keep_path(seq.seq_id, cached_before, [0] + [node + 1 for node in verdict.path])
        if self.drafter is not None and seq.drafting:
            self._call_drafter(lambda d: d.commit(seq.seq_id, emitted))
        seq.pending = emitted[-1]
        new_tokens = self._append(seq, emitted)
        exit_layer, k, tree = self._round_arm(seq)
        return SequenceUpdate(seq.seq_id, new_tokens, seq.finish_reason, replace(seq.stats), (exit_layer, k), tree)

    def _append(self, seq: _Live, emitted: list[int]) -> list[int]:
        eos = self.target.eos_token_id
        added = []
        for token in emitted:
            if token == eos and not seq.params.ignore_eos:
                seq.finish_reason = "stop"
                break
            added.append(token)
            if len(seq.tokens) + len(added) >= seq.params.max_tokens:
                seq.finish_reason = "length"
                break
        seq.tokens.extend(added)
        return added

    def _release(self, seq: _Live) -> None:
        self.target.free(seq.seq_id)
        if self.drafter is not None and seq.drafting:
            self._call_drafter(lambda d: d.finish(seq.seq_id))

    def _call_drafter(self, call):
        """Run a drafter call; on `DrafterUnavailable` drop the drafter and decode plainly from now on."""
        try:
            return call(self.drafter)
        except DrafterUnavailable as err:
            log.warning("drafter unavailable, falling back to plain decoding: %s", err)
            self.drafter, self.k = None, 0
            return None


def _verify(rows: list[_Live], drafts: list[Draft], logits: list[torch.Tensor]) -> list[Verdict]:
    """Every row's draft verified: the chains in one call, the trees one by one."""
    verdicts: list[Verdict | None] = [None] * len(rows)
    chains = [i for i, d in enumerate(drafts) if d.parents is None]
    if chains:
        pick = lambda values: [values[i] for i in chains]
        for i, verdict in zip(chains, _verify_chains(pick(rows), pick(drafts), pick(logits))):
            verdicts[i] = verdict
    for i in (i for i, d in enumerate(drafts) if d.parents is not None):
        seq, draft = rows[i], drafts[i]
        verdicts[i] = verify_tree(TreeToVerify(draft.tokens, draft.parents, logits[i], seq.params, seq.generator,
                                               draft.probs))
    return verdicts  # type: ignore[return-value]


def _verify_chains(rows: list[_Live], drafts: list[Draft], logits: list[torch.Tensor]) -> list[Verdict]:
    """Chain drafts verified in one call; a cascade row against its pi, then counted as a cascade."""
    cascades = [s.spec.cascade for s in rows]
    defers = [None if c is None else cascade_defer(d, l, c) for c, d, l in zip(cascades, drafts, logits)]
    verdicts = verify_round([RowToVerify(d.tokens, l, s.params, s.generator, d.probs, defer)
                             for s, d, l, defer in zip(rows, drafts, logits, defers)])
    return [v if c is None else cascade_verdict(v, d.tokens, defer, c)
            for c, d, v, defer in zip(cascades, drafts, verdicts, defers)]


def _forget(drafter: Drafter, seq_id: SeqId) -> None:
    """Free a sequence on a drafter that is being replaced; a dead one has nothing to free."""
    try:
        drafter.finish(seq_id)
    except DrafterUnavailable:
        pass


def check_pairing(target: ModelRunner, drafter: Drafter) -> None:
    """A drafter must score the same token ids as its target."""
    if drafter.vocab_size is not None and drafter.vocab_size != target.vocab_size:
        raise IncompatibleModels(
            f"drafter vocabulary ({drafter.vocab_size} ids) differs from the target's ({target.vocab_size} ids)"
        )
