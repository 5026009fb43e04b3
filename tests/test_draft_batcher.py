"""DraftBatcher: concurrent callers share forwards, join proposals under way, and each gets exactly its own drafts."""

import threading
import time

import pytest

from actors.draft_batcher import DraftBatcher
from actors.drafters import DraftRequest, ModelDrafter
from actors.errors import InvalidRequest
from actors.sampling import make_sampling_params

GREEDY = make_sampling_params(temperature=0, max_tokens=8)


class HookedDrafter(ModelDrafter):
    """A ModelDrafter that runs `hooks[n]` (under the batcher's lock) just before its n-th forward call."""

    def __init__(self, runner, hooks: dict):
        super().__init__(runner)
        self.hooks, self.calls = hooks, 0

    def advance(self, jobs) -> None:
        self.calls += 1
        if self.calls in self.hooks:
            self.hooks[self.calls]()
        super().advance(jobs)


def reference_drafts(runner, prompts: dict, k: int, exit_layer: int = 1) -> dict:
    """Each sequence's draft from a drafter of its own."""
    drafter = ModelDrafter(runner)
    for seq_id, prompt in prompts.items():
        drafter.start(f"ref-{seq_id}", prompt, GREEDY)
    return {s: drafter.propose([DraftRequest(f"ref-{s}", k, exit_layer)])[0].tokens for s in prompts}


def in_background(call) -> tuple[threading.Thread, dict]:
    """Run `call` on a thread; its result or error lands in the returned dict."""
    outcome = {}

    def run():
        try:
            outcome["result"] = call()
        except BaseException as err:
            outcome["error"] = err
        outcome["finished_at"] = time.perf_counter()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_until_queued(batcher: DraftBatcher) -> None:
    deadline = time.monotonic() + 30
    while not batcher._queue:
        assert time.monotonic() < deadline, "the second caller never reached the batcher"
        time.sleep(0.001)


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
    assert batcher.forwards < 3 * len(prompts)  # some steps served several callers


def test_a_late_proposal_joins_the_next_call_of_one_under_way(drafter_runner, prompts):
    """B arrives during A's first call (k 10) and, with k 3, is done after the 3rd call, before A is: 5 calls.

    Both prompts are prefilled at `start`, so every call drafts. A alone: fused calls of 4, 4 and 2 steps.
    Joined: A's 4; A's and B's 2; one step each (B done); A's 2; A's last step.
    """
    hooks = {}
    batcher = DraftBatcher(HookedDrafter(drafter_runner, hooks))
    batcher.start("a", prompts[0], GREEDY)
    batcher.start("b", prompts[1], GREEDY)
    late = {}

    def send_b():
        late["thread"], late["outcome"] = in_background(lambda: batcher.propose([DraftRequest("b", 3, 1)]))
        wait_until_queued(batcher)

    def note_whether_b_was_served():
        """Runs before the 4th call, holding the leader: B must already have its drafts in hand."""
        deadline = time.monotonic() + 30
        while "result" not in late["outcome"] and time.monotonic() < deadline:
            time.sleep(0.001)
        late["served_before_call_4"] = "result" in late["outcome"]

    hooks[1], hooks[4] = send_b, note_whether_b_was_served
    a_thread, a = in_background(lambda: batcher.propose([DraftRequest("a", 10, 1)]))
    a_thread.join(60)
    late["thread"].join(60)
    b = late["outcome"]
    expected = reference_drafts(drafter_runner, {"a": prompts[0]}, 10) | reference_drafts(drafter_runner, {"b": prompts[1]}, 3)
    assert a["result"][0].tokens == expected["a"] and b["result"][0].tokens == expected["b"]
    assert batcher.forwards == 5
    assert late["served_before_call_4"]  # B got its drafts without waiting for the rest of A's


def test_a_sequence_finished_mid_proposal_stops_and_the_others_go_on(drafter_runner, prompts):
    hooks = {}
    drafter = HookedDrafter(drafter_runner, hooks)
    batcher = DraftBatcher(drafter)
    batcher.start("a", prompts[0], GREEDY)
    batcher.start("b", prompts[1], GREEDY)
    hooks[2] = lambda: drafter.finish("a")  # as a cancel between the fused calls of 4 and 2 steps would
    drafts = batcher.propose([DraftRequest("a", 6, 1), DraftRequest("b", 6, 1)])
    expected = reference_drafts(drafter_runner, {"a": prompts[0], "b": prompts[1]}, 6)
    assert drafts[0].tokens == expected["a"][:4] and drafts[1].tokens == expected["b"]
    assert not drafter_runner.has_sequence("a")


def test_a_bad_request_fails_its_own_caller_only(drafter_runner, prompts):
    hooks = {}
    batcher = DraftBatcher(HookedDrafter(drafter_runner, hooks))
    batcher.start("good", prompts[0], GREEDY)
    bad = {}

    def send_bad():
        bad["thread"], bad["outcome"] = in_background(lambda: batcher.propose([DraftRequest("never-started", 2)]))
        wait_until_queued(batcher)

    hooks[1] = send_bad
    drafts = batcher.propose([DraftRequest("good", 4, 1)])
    bad["thread"].join(60)
    assert drafts[0].tokens == reference_drafts(drafter_runner, {"good": prompts[0]}, 4)["good"]
    assert isinstance(bad["outcome"]["error"], InvalidRequest) and "never-started" in str(bad["outcome"]["error"])


def test_a_failing_step_reaches_every_caller_under_way_and_the_batcher_goes_on(drafter_runner, prompts):
    hooks = {}
    batcher = DraftBatcher(HookedDrafter(drafter_runner, hooks))
    batcher.start("fine", prompts[0], GREEDY)

    def fail():
        raise RuntimeError("forward failed")

    hooks[1] = fail
    with pytest.raises(RuntimeError, match="forward failed"):
        batcher.propose([DraftRequest("fine", 2, 1)])
    with pytest.raises(InvalidRequest, match="no sequence 'never-started'"):
        batcher.propose([DraftRequest("never-started", 2)])
    assert len(batcher.propose([DraftRequest("fine", 2, 1)])[0].tokens) == 2  # the batcher still works


def run_queued_forwards(batcher: DraftBatcher) -> None:
    """Wait until the batcher's forward thread has run everything queued on it so far (it runs one at a time)."""
    batcher._forward_thread.submit(lambda: None).result(timeout=60)


def test_a_started_sequence_is_prefilled_ahead_of_its_first_proposal(drafter_runner, prompts):
    """`start` queues the prompt's forward: before any proposal the cache holds all but the prompt's last token at
    the deepest exit, and the first proposal drafts what a drafter that prefilled nothing ahead drafts."""
    batcher = DraftBatcher(ModelDrafter(drafter_runner))
    prompt = prompts[7]
    batcher.start("early", prompt, GREEDY)
    run_queued_forwards(batcher)
    assert drafter_runner.cached_length("early") == len(prompt) - 1
    assert drafter_runner.cached_depth("early") == max(drafter_runner.exit_layers)
    expected = reference_drafts(drafter_runner, {"early": prompt}, k=4)["early"]
    assert batcher.propose([DraftRequest("early", 4, 1)])[0].tokens == expected


def test_a_sequence_finished_before_its_prefill_runs_is_left_alone(drafter_runner, prompts):
    batcher = DraftBatcher(ModelDrafter(drafter_runner))
    release = threading.Event()
    batcher._forward_thread.submit(release.wait, 60)  # the forward thread is busy until released
    batcher.start("gone", prompts[7], GREEDY)
    batcher.finish("gone")
    release.set()
    run_queued_forwards(batcher)
    assert not drafter_runner.has_sequence("gone")
    batcher.start("next", prompts[6], GREEDY)  # and the batcher goes on
    run_queued_forwards(batcher)
    assert drafter_runner.cached_length("next") == len(prompts[6]) - 1
