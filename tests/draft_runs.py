"""Driving a ModelDrafter through rounds as an engine would, in tests."""

from actors.drafters import DraftRequest, ModelDrafter
from actors.sampling import make_sampling_params

GREEDY = make_sampling_params(temperature=0, max_tokens=16)


def draft_rounds(drafter: ModelDrafter, prompts: list[list[int]], exits: list[int], ks: list[int]) -> list:
    """Rounds of greedy drafts for one sequence per prompt, committed as a verifier would: alternately
    the first draft token and one of the verifier's own (a rejection), and the whole draft plus a bonus
    token (a full acceptance, which leaves two tokens uncached); each sequence changes exit every round
    (a deeper one re-prefills). Returns each round's drafts and caches."""
    for index, prompt in enumerate(prompts):
        drafter.start(index, prompt, GREEDY)
    seen = []
    for round_index, k in enumerate(ks):
        drafts = drafter.propose([DraftRequest(i, k, exits[(i + round_index) % len(exits)]) for i in range(len(prompts))])
        for index, draft in enumerate(drafts):
            emitted = draft.tokens + [5] if round_index % 2 else draft.tokens[:1] + [7]
            drafter.commit(index, emitted)
        caches = [drafter.runner.cached_tokens(i) for i in range(len(prompts))]
        seen.append(([d.tokens for d in drafts], caches))
    return seen

