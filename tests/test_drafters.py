"""ModelDrafter's drafts: greedy rows by argmax, q rows only when sampled, confidences only when asked for."""

import torch

from actors.drafters import DraftRequest, ModelDrafter
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


def test_fused_greedy_drafts_equal_one_step_at_a_time(drafter_runner, drafter_path, prompts):
    """Fused calls (several steps each) draft and cache exactly what single steps do, for any k and exit."""
    stepped = ModelRunner.from_pretrained(drafter_path)
    stepped.fused_draft_steps = ()
    fused_calls = []
    draft_greedy = drafter_runner.draft_greedy
    drafter_runner.draft_greedy = lambda *args: fused_calls.append(args[3]) or draft_greedy(*args)
    ks = [4, 4, 6, 3, 2, 1, 5, 4]
    fused = draft_rounds(ModelDrafter(drafter_runner), prompts[:4], [1, 2, 4], ks)
    assert fused == draft_rounds(ModelDrafter(stepped), prompts[:4], [1, 2, 4], ks)
    assert set(fused_calls) == {4, 2}
