"""ModelDrafter's drafts: greedy rows by argmax, q rows only when sampled, confidences only when asked for."""

import pytest
import torch

from actors.drafters import DraftRequest, ModelDrafter, NgramDrafter, _DraftRow
from actors.errors import InvalidRequest
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from draft_runs import draft_rounds

GREEDY = make_sampling_params(temperature=0, max_tokens=16)
SAMPLED = make_sampling_params(temperature=0.8, seed=3, max_tokens=16)


def own_greedy_steps(runner: ModelRunner, prompt: list[int], exit_layer: int, k: int) -> tuple[list[int], list[torch.Tensor]]:
    """The exit's own greedy tokens, one forward per step, and each step's logits [V]."""
    runner.add_sequence("own")
    tokens, logits, feed = [], [], prompt
    for _ in range(k):
        row = runner.forward(["own"], [feed], [exit_layer], last_only=True)[0][0]  # [V]
        logits.append(row)
        tokens.append(int(row.argmax()))
        feed = tokens[-1:]
    runner.free("own")
    return tokens, logits


def test_greedy_drafts_are_the_exits_argmax_and_carry_confidence_only_when_asked(drafter_runner, prompts):
    drafter = ModelDrafter(drafter_runner)
    for index, prompt in enumerate(prompts[:2]):
        drafter.start(index, prompt, GREEDY)
    drafts = drafter.propose([DraftRequest(0, 4, 2, confidence=True), DraftRequest(1, 4, 2)])
    for index, draft in enumerate(drafts):
        tokens, logits = own_greedy_steps(drafter_runner, prompts[index], 2, 4)
        assert draft.tokens == tokens and draft.probs is None
        if index == 0:
            torch.testing.assert_close(draft.confidence, torch.softmax(torch.stack(logits), dim=-1))
        else:
            assert draft.confidence is None


def test_sampled_drafts_carry_the_rows_they_were_sampled_from(drafter_runner, prompts):
    drafter = ModelDrafter(drafter_runner)
    drafter.start(0, prompts[0], SAMPLED)
    (draft,) = drafter.propose([DraftRequest(0, 3, 1)])
    assert draft.probs.shape == (3, drafter_runner.vocab_size) and draft.confidence is None
    torch.testing.assert_close(draft.probs.sum(dim=-1), torch.ones(3))
    assert all(draft.probs[i, token] > 0 for i, token in enumerate(draft.tokens))


@pytest.mark.parametrize("cutoff", [0.0, 0.05])
def test_fused_greedy_drafts_equal_one_step_at_a_time(drafter_runner, drafter_path, prompts, cutoff):
    """Fused calls (several steps each) draft and cache exactly what single steps do, for any k and exit, and
    cut greedy chains where single steps do (the fused call reports each token's probability)."""
    stepped = ModelRunner.from_pretrained(drafter_path)
    stepped.fused_draft_steps = ()
    fused_calls = []
    draft_greedy = drafter_runner.draft_greedy
    drafter_runner.draft_greedy = lambda *args: fused_calls.append(args[3]) or draft_greedy(*args)
    ks = [4, 4, 6, 3, 2, 1, 5, 4]
    fused = draft_rounds(ModelDrafter(drafter_runner, cutoff), prompts[:4], [1, 2, 4], ks)
    assert fused == draft_rounds(ModelDrafter(stepped, cutoff), prompts[:4], [1, 2, 4], ks)
    cut = any(len(draft) < k for (drafts, _), k in zip(fused, ks) for draft in drafts)
    assert set(fused_calls) == {4, 2} and cut == (cutoff > 0)


def test_a_greedy_chain_stops_before_the_token_that_takes_its_reach_below_the_cutoff():
    row = _DraftRow("s", length=4, exit_layer=1, wants_confidence=False, cutoff=0.3)
    row.extend_greedy([7, 8, 9], [0.9, 0.5, 0.9])  # reach 0.9, 0.45, 0.405
    assert row.tokens == [7, 8, 9] and row.drafting
    row.extend_greedy([10], [0.5])  # 0.2025 < 0.3
    assert row.tokens == [7, 8, 9] and not row.drafting
    uncut = _DraftRow("s", length=2, exit_layer=1, wants_confidence=False)
    uncut.extend_greedy([1, 2, 3], [0.01, 0.01, 0.01])
    assert uncut.tokens == [1, 2] and not uncut.drafting  # no cut-off: k tokens, however unlikely


@pytest.mark.parametrize("cutoff", [0.2, 0.6])
def test_a_cut_off_drafts_fewer_tokens_and_speculation_stays_exact(target, drafter_runner, prompts, cutoff):
    plain = [r.tokens for r in SpeculativeGenerator(target).generate(prompts, GREEDY)]
    full = SpeculativeGenerator(target, ModelDrafter(drafter_runner), k=4, exit_layer=2).generate(prompts, GREEDY)
    cut = SpeculativeGenerator(target, ModelDrafter(drafter_runner, greedy_cutoff=cutoff), k=4, exit_layer=2).generate(
        prompts, GREEDY)
    assert [r.tokens for r in cut] == [r.tokens for r in full] == plain
    assert sum(r.stats.drafted for r in cut) < sum(r.stats.drafted for r in full)


def test_a_rewinding_commit_replaces_the_contexts_tail_and_is_bounded(drafter_runner, drafter_path, prompts):
    used = ModelDrafter(drafter_runner)
    used.start("s", prompts[0], GREEDY)
    used.propose([DraftRequest("s", 4)])
    used.commit("s", [5, 6, 7])
    used.commit("s", [8], rewind=2)
    fresh = ModelDrafter(ModelRunner.from_pretrained(drafter_path))
    fresh.start("s", prompts[0] + [5, 8], GREEDY)
    assert used.propose([DraftRequest("s", 4)])[0].tokens == fresh.propose([DraftRequest("s", 4)])[0].tokens
    with pytest.raises(InvalidRequest, match="cannot rewind"):
        used.commit("s", [1], rewind=10**6)
    ngram = NgramDrafter()
    ngram.start("n", [1, 2, 3, 1, 2], GREEDY)
    ngram.commit("n", [9], rewind=1)
    assert ngram.propose([DraftRequest("n", 2)])[0].tokens == []  # context [1, 2, 3, 1, 9]: no earlier 9


def test_a_drafter_reads_only_the_last_tokens_of_a_long_prompt(drafter_runner, drafter_path, prompts):
    windowed = ModelDrafter(drafter_runner, prompt_window=6)
    windowed.start("w", prompts[-1], GREEDY)  # 23 tokens
    fresh = ModelDrafter(ModelRunner.from_pretrained(drafter_path), prompt_window=None)
    fresh.start("w", prompts[-1][-6:], GREEDY)
    assert windowed.propose([DraftRequest("w", 4)])[0].tokens == fresh.propose([DraftRequest("w", 4)])[0].tokens
    assert drafter_runner.cached_length("w") == 6 + 3  # the window and the draft but its last token
    windowed.finish("w")
    with pytest.raises(InvalidRequest, match="prompt window"):
        ModelDrafter(drafter_runner, prompt_window=0)


def test_greedy_speculation_with_a_windowed_drafter_equals_the_targets_own_output(target, drafter_runner, prompts):
    plain = [r.tokens for r in SpeculativeGenerator(target).generate(prompts, GREEDY)]
    for window in (1, 3, None):
        windowed = ModelDrafter(drafter_runner, prompt_window=window)
        speculative = SpeculativeGenerator(target, windowed, k=4, exit_layer=2).generate(prompts, GREEDY)
        assert [r.tokens for r in speculative] == plain
