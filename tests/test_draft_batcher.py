"""DraftBatcher: concurrent callers share forwards and each gets exactly its own drafts."""

import threading

import pytest

from actors.draft_batcher import DraftBatcher
from actors.drafters import DraftRequest, ModelDrafter
from actors.errors import InvalidRequest
from actors.sampling import make_sampling_params

GREEDY = make_sampling_params(temperature=0, max_tokens=8)


def test_concurrent_callers_get_their_own_drafts_from_fewer_forwards(drafter_runner, prompts):
    batcher = DraftBatcher(ModelDrafter(drafter_runner))
    reference = ModelDrafter(drafter_runner)
    for i, prompt in enumerate(prompts):
        batcher.start(f"b{i}", prompt, GREEDY)
        reference.start(f"r{i}", prompt, GREEDY)
    expected = [reference.propose([DraftRequest(f"r{i}", 3, 1 + i % 2)])[0].tokens for i in range(len(prompts))]
    results = [None] * len(prompts)
    go = threading.Barrier(len(prompts))

    def caller(i):
        go.wait()
        results[i] = batcher.propose([DraftRequest(f"b{i}", 3, 1 + i % 2)])[0].tokens

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == expected
    assert batcher.forwards < len(prompts)  # some calls were merged


def test_an_error_reaches_every_caller_of_the_batch(drafter_runner):
    batcher = DraftBatcher(ModelDrafter(drafter_runner))
    with pytest.raises(InvalidRequest, match="no sequence 'never-started'"):
        batcher.propose([DraftRequest("never-started", 2)])
    batcher.start("fine", [1, 2, 3], GREEDY)
    assert len(batcher.propose([DraftRequest("fine", 2)])[0].tokens) == 2  # the batcher still works
