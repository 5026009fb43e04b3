"""SpeculativeGenerator: drafter + target in one process, the reference path.

Every round, for all live sequences at once: the drafter proposes up to k
tokens per sequence, the target scores `[pending, x_1..x_k]` per sequence in
one batched forward, each row is verified, and both models roll back to what
was emitted. With no drafter the same loop is plain autoregressive decoding of
the target (k = 0: the round feeds only the pending token), which is the
baseline every speedup is measured against.

The target's cache holds every emitted token but the last, the *pending* one;
the next round feeds it first, so one forward both extends the cache and
judges the draft. Prefill therefore covers the prompt minus its last token.
"""

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from actors.drafters import DraftRequest, Drafter, Draft
from actors.errors import IncompatibleModels, InvalidRequest
from actors.runner import ModelRunner
from actors.sampling import SamplingParams, logits_to_probs, make_generator
from actors.verification import Verdict, verify_greedy, verify_sampled

MAX_DRAFT_LENGTH = 64  # beyond this a round costs more than any drafter saves


@dataclass
class SpeculationStats:
    """Counters of one sequence or of a whole run (MAL counts the bonus token)."""

    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept by the verifier
    target_forwards: int = 0  # decoding rounds: one target forward each (prefill excluded)
    emitted: int = 0  # tokens produced by the rounds, before truncation at a stop

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


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]  # generated tokens, the stopping end-of-sequence token excluded
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (max_tokens reached)
    stats: SpeculationStats = field(default_factory=SpeculationStats)


@dataclass
class _Live:
    """A sequence being generated."""

    seq_id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    pending: int  # last emitted token, not yet in the target's cache
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: SpeculationStats = field(default_factory=SpeculationStats)


class SpeculativeGenerator:
    """Generates with a target, speculating with a drafter when one is given."""

    def __init__(self, target: ModelRunner, drafter: Drafter | None = None, k: int = 4, exit_layer: int | None = None):
        if drafter is not None:
            check_pairing(target, drafter)
            if not 1 <= k <= MAX_DRAFT_LENGTH:
                raise InvalidRequest(f"draft length k must be in 1..{MAX_DRAFT_LENGTH}, got {k}")
            if exit_layer is not None:
                drafter.check_exit(exit_layer)
        self.target, self.drafter = target, drafter
        self.k = k if drafter is not None else 0
        self.exit_layer = exit_layer
        self._ids = itertools.count()
        self.elapsed_s = 0.0  # wall time of the last `generate`

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[GenerationResult]:
        """Generate a continuation for each prompt, all sequences batched together."""
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise InvalidRequest(f"{len(prompts)} prompts but {len(params_list)} sampling parameter sets")
        for prompt, p in zip(prompts, params_list):
            self._check_prompt(prompt, p)
        started = time.perf_counter()
        live = [self._start(list(prompt), p) for prompt, p in zip(prompts, params_list)]
        try:
            self._prefill(live)
            running = list(live)
            while running:
                self._round(running)
                running = [s for s in running if s.finish_reason is None]
        finally:
            for seq in live:
                self._release(seq)
        self.elapsed_s = time.perf_counter() - started
        return [GenerationResult(s.prompt, s.tokens, s.finish_reason, s.stats) for s in live]

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

    # -- the loop ------------------------------------------------------------------

    def _start(self, prompt: list[int], params: SamplingParams) -> _Live:
        seq = _Live(next(self._ids), prompt, params, make_generator(params.seed), pending=prompt[-1])
        self.target.add_sequence(seq.seq_id)
        if self.drafter is not None:
            self.drafter.start(seq.seq_id, prompt, params)
        return seq

    def _prefill(self, live: list[_Live]) -> None:
        """Cache every prompt token but the last, in one batched forward."""
        rows = [s for s in live if len(s.prompt) > 1]
        if rows:
            self.target.forward([s.seq_id for s in rows], [s.prompt[:-1] for s in rows], last_only=True)

    def _round(self, running: list[_Live]) -> None:
        drafts = self._propose(running)
        logits = self.target.forward(
            [s.seq_id for s in running], [[s.pending] + d.tokens for s, d in zip(running, drafts)]
        )  # per row [k_i + 1, V]
        for seq, draft, row_logits in zip(running, drafts, logits):
            verdict = self._verify(seq, draft, row_logits)
            self._advance(seq, draft, verdict)

    def _propose(self, running: list[_Live]) -> list[Draft]:
        if self.drafter is None:
            return [Draft([], None) for _ in running]
        requests = [DraftRequest(s.seq_id, self._draft_length(s), self.exit_layer) for s in running]
        return self.drafter.propose(requests)

    def _draft_length(self, seq: _Live) -> int:
        """k, cut so the round cannot emit past max_tokens (it emits at most k + 1)."""
        return max(0, min(self.k, seq.params.max_tokens - len(seq.tokens) - 1))

    @staticmethod
    def _verify(seq: _Live, draft: Draft, target_logits: torch.Tensor) -> Verdict:
        draft_tokens = torch.tensor(draft.tokens, dtype=torch.long)
        if seq.params.greedy:
            return verify_greedy(draft_tokens, target_logits)
        target_probs = logits_to_probs(target_logits, seq.params)  # [k + 1, V]
        return verify_sampled(draft_tokens, draft.probs, target_probs, seq.generator)

    def _advance(self, seq: _Live, draft: Draft, verdict: Verdict) -> None:
        """Record the round, roll both models back to what was emitted, and check for a stop."""
        emitted = verdict.emitted(draft.tokens)
        seq.stats.add(SpeculationStats(len(draft.tokens), verdict.num_accepted, 1, len(emitted)))
        cached_before = self.target.cached_length(seq.seq_id) - len(draft.tokens) - 1
        self.target.rollback(seq.seq_id, cached_before + 1 + verdict.num_accepted)
        if self.drafter is not None:
            self.drafter.commit(seq.seq_id, emitted)
        seq.pending = emitted[-1]
        self._append(seq, emitted)

    def _append(self, seq: _Live, emitted: list[int]) -> None:
        eos = self.target.eos_token_id
        for token in emitted:
            if token == eos and not seq.params.ignore_eos:
                seq.finish_reason = "stop"
                return
            seq.tokens.append(token)
            if len(seq.tokens) >= seq.params.max_tokens:
                seq.finish_reason = "length"
                return

    def _release(self, seq: _Live) -> None:
        self.target.free(seq.seq_id)
        if self.drafter is not None:
            self.drafter.finish(seq.seq_id)


def check_pairing(target: ModelRunner, drafter: Drafter) -> None:
    """A drafter must score the same token ids as its target."""
    if drafter.vocab_size is not None and drafter.vocab_size != target.vocab_size:
        raise IncompatibleModels(
            f"drafter vocabulary ({drafter.vocab_size} ids) differs from the target's ({target.vocab_size} ids)"
        )
