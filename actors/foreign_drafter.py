"""A drafter with another vocabulary than its target's, drafting for it losslessly (issue 20).

The target's engine sees an ordinary `Drafter` that speaks target ids; behind it the
drafter (a model in this process, or a remote drafter actor serving targets of any
vocabulary at once) speaks its own. Each sequence's committed text is kept as the
drafter's ids (`BridgedContext`), and each draft comes back as target ids, by one of two
schemes of Timor et al. 2025 ("Accelerating LLM Inference with Lossless Speculative
Decoding Algorithms for Heterogeneous Vocabularies"):

- **greedy rows: String-Level Exact Match.** The drafter drafts freely; the drafted text is
  re-tokenised into target ids, cut to k. Greedy verification keeps a token only where it
  equals the target's own argmax and emits the argmax where it does not, so the output is
  the target's greedy output whatever the proposal.
- **sampled rows: Token-Level Intersection.** The drafter samples only among the ids whose
  bytes are exactly one target token (its q masked to that set and renormalised:
  `SamplingParams.allowed_token_ids`). Each drafted token is then one target token, and
  q, scattered onto target ids, is a distribution over the target's vocabulary that the
  tokens were truly drawn from; accepting with min(1, p/q) and otherwise sampling
  norm(max(0, p - q)) is then exactly speculative sampling (Leviathan et al. 2023), so
  the output follows p. Only the draft's reach shrinks: tokens outside the intersection
  are never proposed, though the target may emit them.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from actors.drafters import Draft, DraftRequest, Drafter, PendingDrafts
from actors.errors import IncompatibleModels, InvalidRequest
from actors.runner import SeqId
from actors.sampling import SamplingParams
from actors.vocabulary_bridge import BridgedContext, Vocabulary, VocabularyBridge

CHAINS_ONLY = "a drafter of another vocabulary drafts chains only (no token trees, no cascades)"


@dataclass
class _Sequence:
    context: BridgedContext
    greedy: bool


class ForeignVocabularyDrafter(Drafter):
    """Drafts for a target of another vocabulary with `inner`, which speaks the drafter's ids."""

    def __init__(self, inner: Drafter, bridge: VocabularyBridge, target_vocab_size: int):
        if bridge.target.size > target_vocab_size:
            raise IncompatibleModels(f"the target's tokenizer has {bridge.target.size} ids, its model {target_vocab_size}")
        self.inner, self.bridge = inner, bridge
        self.vocab_size = target_vocab_size
        self.default_exit = inner.default_exit
        self._sequences: dict[SeqId, _Sequence] = {}

    def check_exit(self, exit_layer: int) -> None:
        self.inner.check_exit(exit_layer)

    def check_drafts(self, tree: bool, cascade: bool) -> None:
        if tree or cascade:
            raise InvalidRequest(CHAINS_ONLY)

    def start(self, seq_id: SeqId, prompt: list[int], params: SamplingParams) -> None:
        context = BridgedContext(self.bridge)
        _, ids = context.append(prompt)
        if not params.greedy:
            params = params.model_copy(update={"allowed_token_ids": self.bridge.shared_drafter_ids})
        self.inner.start(seq_id, ids, params)
        self._sequences[seq_id] = _Sequence(context, params.greedy)

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        return self.propose_async(requests).result()

    def propose_async(self, requests: Sequence[DraftRequest]) -> "_TranslatedDrafts":
        for request in requests:
            if request.tree is not None or request.confidence:
                raise InvalidRequest(CHAINS_ONLY)
        sequences = [self._sequence(r.seq_id) for r in requests]
        return _TranslatedDrafts(self, self.inner.propose_async(requests), requests, sequences)

    def translate(self, draft: Draft, k: int, sequence: _Sequence) -> Draft:
        """A draft in drafter ids -> the same draft in target ids (at most k of them)."""
        if not draft.tokens:
            return Draft([], None)
        if sequence.greedy:
            return Draft(self.bridge.retokenize(draft.tokens, sequence.context.carried)[:k], None)
        tokens = [self.bridge.to_target[token] for token in draft.tokens]  # each in the intersection: see start()
        probs = self.bridge.target_probs(draft.probs)  # [m, V_target]
        return Draft(tokens, probs)

    def commit(self, seq_id: SeqId, emitted: list[int], rewind: int = 0) -> None:
        if rewind:  # only a bridge rewinds, and bridges are not stacked
            raise InvalidRequest("a foreign-vocabulary drafter takes commits in target ids, without a rewind")
        rewind, ids = self._sequence(seq_id).context.append(emitted)
        self.inner.commit(seq_id, ids, rewind)

    def finish(self, seq_id: SeqId) -> None:
        self._sequences.pop(seq_id, None)
        self.inner.finish(seq_id)

    def _sequence(self, seq_id: SeqId) -> _Sequence:
        try:
            return self._sequences[seq_id]
        except KeyError:
            raise InvalidRequest(f"the drafter has no sequence {seq_id!r}") from None


class _TranslatedDrafts:
    """Drafts under way in the drafter's ids; `result()` gives them in the target's."""

    def __init__(self, drafter: ForeignVocabularyDrafter, pending: PendingDrafts, requests: Sequence[DraftRequest],
                 sequences: list[_Sequence]):
        self._drafter, self._pending, self._requests, self._sequences = drafter, pending, requests, sequences

    def result(self) -> list[Draft]:
        return [self._drafter.translate(draft, request.k, sequence)
                for draft, request, sequence in zip(self._pending.result(), self._requests, self._sequences)]


def pair_drafter(drafter: Drafter, target_tokenizer: PreTrainedTokenizerBase,
                 drafter_tokenizer: PreTrainedTokenizerBase, target_vocab_size: int) -> Drafter:
    """The drafter as its target's engine takes it: itself where both read ids alike, else drafting across
    the vocabularies (`IncompatibleModels` where no bridge can be built)."""
    if target_tokenizer.get_vocab() == drafter_tokenizer.get_vocab():
        return drafter
    return ForeignVocabularyDrafter(drafter, bridge_of(target_tokenizer, drafter_tokenizer), target_vocab_size)


def bridge_of(target_tokenizer: PreTrainedTokenizerBase, drafter_tokenizer: PreTrainedTokenizerBase) -> VocabularyBridge:
    return VocabularyBridge(Vocabulary(target_tokenizer), Vocabulary(drafter_tokenizer))
