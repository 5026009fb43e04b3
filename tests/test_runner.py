"""The runner against Hugging Face's own forward: batching, exits and rollback must be exact."""

import pytest
import torch
from transformers import LlamaForCausalLM

from actors.errors import InvalidRequest
from actors.runner import ModelRunner

ATOL = 1e-4  # float32 rounding between differently shaped matmuls


@pytest.fixture(scope="module")
def hf_target(target_path):
    return LlamaForCausalLM.from_pretrained(target_path).eval()


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]  # [T, V]


def hf_exit_logits(model, tokens: list[int], exit_layer: int) -> torch.Tensor:
    """Exit L computed by hand: the first L decoder layers, then the shared norm and head."""
    with torch.no_grad():
        out = model.model(torch.tensor([tokens]), output_hidden_states=True)
        hidden = out.hidden_states[exit_layer]
        if exit_layer == model.config.num_hidden_layers:
            return model.lm_head(out.last_hidden_state)[0]
        return model.lm_head(model.model.norm(hidden))[0]


def test_prefill_and_incremental_decoding_match_huggingface(target, hf_target, prompts):
    tokens = prompts[1] + prompts[7]
    reference = hf_logits(hf_target, tokens)
    target.add_sequence("whole")
    torch.testing.assert_close(target.forward(["whole"], [tokens])[0], reference, atol=ATOL, rtol=0)
    target.add_sequence("stepwise")
    steps = [target.forward(["stepwise"], [[t]])[0] for t in tokens]
    torch.testing.assert_close(torch.cat(steps), reference, atol=ATOL, rtol=0)


def test_a_mixed_length_batch_equals_each_sequence_alone(target, prompts):
    batch_ids = [f"b{i}" for i in range(len(prompts))]
    for seq_id in batch_ids:
        target.add_sequence(seq_id)
    batched = target.forward(batch_ids, prompts)
    continuation = [[3, 5, 7][: 1 + i % 3] for i in range(len(prompts))]  # 1 to 3 new tokens per row
    batched_next = target.forward(batch_ids, continuation)
    for i, prompt in enumerate(prompts):
        target.add_sequence(f"alone{i}")
        alone = target.forward([f"alone{i}"], [prompt])[0]
        alone_next = target.forward([f"alone{i}"], [continuation[i]])[0]
        torch.testing.assert_close(batched[i], alone, atol=ATOL, rtol=0)
        torch.testing.assert_close(batched_next[i], alone_next, atol=ATOL, rtol=0)
        assert torch.equal(batched_next[i].argmax(-1), alone_next.argmax(-1))


def test_prompt_chunks_scored_at_their_last_token_only_give_its_logits(target, prompts):
    """Chunks wider than `NARROW_WIDTH` with `last_only` run the head at each row's last token alone
    (`DecoderStep.forward_last`): two rows of different lengths, each over two chunks, ending at different places
    of the second."""
    long_prompts = [(prompts[7] * 5)[:100], (prompts[6] + prompts[7] * 4)[:74]]  # 64 + 36, 64 + 10 tokens
    whole_ids, last_ids = ["whole0", "whole1"], ["last0", "last1"]
    for seq_id in whole_ids:
        target.add_sequence(seq_id)
    whole = target.forward(whole_ids, long_prompts)
    for seq_id in whole_ids:
        target.free(seq_id)  # else the last-only rows would copy their prompts from these
    for seq_id in last_ids:
        target.add_sequence(seq_id)
    last = target.forward(last_ids, long_prompts, last_only=True)
    for row_whole, row_last in zip(whole, last):
        assert row_last.shape == (1, target.vocab_size)
        torch.testing.assert_close(row_last[0], row_whole[-1], atol=ATOL, rtol=0)
        assert int(row_last[0].argmax()) == int(row_whole[-1].argmax())
    assert [target.cached_length(s) for s in last_ids] == [100, 74]


def test_rollback_after_a_draft_matches_a_fresh_prefill(target, prompts):
    context, draft, correction = prompts[2], [11, 12, 13, 14], [42, 43]
    target.add_sequence("speculating")
    target.forward(["speculating"], [context])
    target.forward(["speculating"], [draft])
    target.rollback("speculating", len(context) + 1)  # keep the first draft token only
    after_rollback = target.forward(["speculating"], [correction])[0]
    target.add_sequence("fresh")
    fresh = target.forward(["fresh"], [context + draft[:1] + correction])[0][-len(correction) :]
    torch.testing.assert_close(after_rollback, fresh, atol=ATOL, rtol=0)
    assert target.cached_length("speculating") == len(context) + 1 + len(correction)


def test_each_exit_matches_the_nested_sub_model(drafter_runner, drafter_path, prompts):
    hf_drafter = LlamaForCausalLM.from_pretrained(drafter_path).eval()
    tokens = prompts[0]
    ids = [f"exit{e}" for e in drafter_runner.exit_layers]
    for seq_id in ids:
        drafter_runner.add_sequence(seq_id)
    mixed = drafter_runner.forward(ids, [tokens] * len(ids), exits=drafter_runner.exit_layers)  # one forward, 3 exits
    for exit_layer, logits in zip(drafter_runner.exit_layers, mixed):
        torch.testing.assert_close(logits, hf_exit_logits(hf_drafter, tokens, exit_layer), atol=ATOL, rtol=0)


def test_switching_to_a_deeper_exit_recomputes_the_missing_layers(drafter_runner, drafter_path, prompts):
    hf_drafter = LlamaForCausalLM.from_pretrained(drafter_path).eval()
    tokens = prompts[3]
    drafter_runner.add_sequence("shallow_then_deep")
    drafter_runner.forward(["shallow_then_deep"], [tokens[:-1]], exits=[1])
    deep = drafter_runner.forward(["shallow_then_deep"], [tokens[-1:]], exits=[4])[0]
    torch.testing.assert_close(deep, hf_logits(hf_drafter, tokens)[-1:], atol=ATOL, rtol=0)


def test_freeing_drops_the_cache(target):
    target.add_sequence("short_lived")
    target.forward(["short_lived"], [[1, 2, 3]])
    target.free("short_lived")
    assert not target.has_sequence("short_lived") and target.num_sequences == 0


@pytest.mark.parametrize(
    "tokens, exits, message",
    [
        ([[]], None, "at least one new token"),
        ([[10**6]], None, "token ids must lie"),
        ([[-1]], None, "token ids must lie"),
        ([[1]], [0], "exit 0 is outside"),
        ([[1]], [5], "exit 5 is outside"),
        ([[1] * 300], None, "exceed the context of 256"),
    ],
)
def test_bad_forward_input_is_rejected_before_any_tensor_work(target, tokens, exits, message):
    target.add_sequence("bad")
    with pytest.raises(InvalidRequest, match=message):
        target.forward(["bad"], tokens, exits)
    assert target.cached_length("bad") == 0


def test_unknown_sequences_and_duplicate_ids_are_clear_errors(target):
    with pytest.raises(InvalidRequest, match="unknown sequence"):
        target.forward(["ghost"], [[1]])
    target.add_sequence("twice")
    with pytest.raises(InvalidRequest, match="already exists"):
        target.add_sequence("twice")


def test_runs_in_bfloat16(target_path, prompts):
    runner = ModelRunner.from_pretrained(target_path, dtype="bfloat16")
    runner.add_sequence("half")
    logits = runner.forward(["half"], [prompts[0]])[0]
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_an_exit_the_model_does_not_declare_still_reads_its_own_layer(drafter_runner, drafter_path, prompts):
    """Exits 1, 2 and 4 are declared; exit 3, alone and batched with exit 1, is the first three layers."""
    hf_drafter = LlamaForCausalLM.from_pretrained(drafter_path).eval()
    tokens = prompts[0]
    drafter_runner.add_sequence("three")
    drafter_runner.add_sequence("one")
    three, one = drafter_runner.forward(["three", "one"], [tokens, tokens], exits=[3, 1])
    torch.testing.assert_close(three, hf_exit_logits(hf_drafter, tokens, 3), atol=ATOL, rtol=0)
    torch.testing.assert_close(one, hf_exit_logits(hf_drafter, tokens, 1), atol=ATOL, rtol=0)
