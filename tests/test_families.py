"""Every supported family against Hugging Face's own forward: prefill, decode, a mixed batch, rollback, speculation.

Each model is randomly initialised from its family's own transformers config class, with what sets the family
apart switched on (tests/tiny_models.py: biases, q/k norms, sliding windows shorter than the prompts, Gemma's
scaled embeddings and offset norms, Gemma 2's soft-capping and sandwich norms, Phi-3's partial rotation).
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.drafters import ModelDrafter
from actors.errors import ModelNotFound
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from tiny_models import FAMILY_CONFIGS, build_family

ATOL = 1e-4  # float32 rounding between differently shaped matmuls
FAMILIES = sorted(FAMILY_CONFIGS)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, tokenizer):
    """(name, target folder, drafter folder with exits 1 and 2 of 3)."""
    folder = tmp_path_factory.mktemp(request.param)
    target = build_family(folder / "target", tokenizer, request.param, seed=11)
    drafter = build_family(folder / "drafter", tokenizer, request.param, seed=12, exit_layers=[1, 2, 3])
    return request.param, target, drafter


def hf_logits(path, tokens: list[int]) -> torch.Tensor:
    """Hugging Face's eager attention, its reference implementation (its SDPA path drops Gemma 2's soft-capping)."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]  # [T, V]


def test_prefill_and_decoding_match_huggingface(family, prompts):
    _, target_path, _ = family
    tokens = prompts[1] + prompts[7]  # longer than the sliding windows
    reference = hf_logits(target_path, tokens)
    runner = ModelRunner.from_pretrained(target_path)
    runner.add_sequence("whole")
    torch.testing.assert_close(runner.forward(["whole"], [tokens])[0], reference, atol=ATOL, rtol=0)
    runner.add_sequence("stepwise")
    half = len(tokens) // 2
    steps = [runner.forward(["stepwise"], [tokens[:half]])[0]] + [runner.forward(["stepwise"], [[t]])[0] for t in tokens[half:]]
    torch.testing.assert_close(torch.cat(steps), reference, atol=ATOL, rtol=0)


def test_a_mixed_batch_and_a_rollback_equal_huggingface(family, prompts):
    _, target_path, _ = family
    runner = ModelRunner.from_pretrained(target_path)
    ids = [f"row{i}" for i in range(len(prompts))]
    for seq_id in ids:
        runner.add_sequence(seq_id)
    runner.forward(ids, prompts)
    drafts = [[3, 5, 7, 9][: 1 + i % 4] for i in range(len(prompts))]
    runner.forward(ids, drafts)
    for seq_id, prompt in zip(ids, prompts):
        runner.rollback(seq_id, len(prompt) + 1)  # keep each row's first draft token
    corrections = [[42, 43][: 1 + i % 2] for i in range(len(prompts))]
    after = runner.forward(ids, corrections)
    for i, prompt in enumerate(prompts):
        tokens = prompt + drafts[i][:1] + corrections[i]
        expected = hf_logits(target_path, tokens)[-len(corrections[i]):]
        torch.testing.assert_close(after[i], expected, atol=ATOL, rtol=0)


def test_greedy_speculation_equals_plain_decoding_with_a_drafter_of_the_same_family(family, prompts):
    _, target_path, drafter_path = family
    params = make_sampling_params(temperature=0, max_tokens=24, ignore_eos=True)
    plain = SpeculativeGenerator(ModelRunner.from_pretrained(target_path)).generate(prompts[:4], params)
    drafter = ModelDrafter(ModelRunner.from_pretrained(drafter_path))
    for exit_layer in (1, 3):
        speculative = SpeculativeGenerator(ModelRunner.from_pretrained(target_path), drafter, k=3,
                                           exit_layer=exit_layer).generate(prompts[:4], params)
        assert [r.tokens for r in speculative] == [r.tokens for r in plain]


def test_an_unsupported_family_is_named_with_the_supported_ones(tmp_path, target_path):
    config = (target_path / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "gpt2"')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ModelNotFound, match="model_type 'gpt2' is not supported.*gemma2.*phi3"):
        ModelRunner.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["gemma2", "phi3"])  # written-out soft-capped attention; a partial rotation
def test_the_compiled_step_of_a_family_equals_the_eager_one(name, tmp_path, tokenizer, prompts):
    path = build_family(tmp_path / name, tokenizer, name, seed=13)
    eager, compiled = ModelRunner.from_pretrained(path), ModelRunner.from_pretrained(path, compile_mode="compile")
    for runner in (eager, compiled):
        for seq_id in ("a", "b"):
            runner.add_sequence(seq_id)
    rows = [prompts[1] + prompts[7], prompts[2]]
    outputs = [(runner.forward(["a", "b"], rows), runner.forward(["a", "b"], [[3, 4], [5]])) for runner in (eager, compiled)]
    for expected, got in zip(*outputs):
        for row_expected, row_got in zip(expected, got):
            torch.testing.assert_close(row_got, row_expected, atol=ATOL, rtol=0)


def test_a_rope_that_depends_on_the_sequence_length_is_refused(tmp_path, tokenizer):
    path = build_family(tmp_path / "phi3", tokenizer, "phi3", seed=14)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {**config.get("rope_parameters", {}), "rope_type": "longrope"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFound, match="rope type 'longrope' is not supported"):
        ModelRunner.from_pretrained(path)


def test_a_drafter_exit_equals_the_nested_sub_model(family, prompts):
    """Exit 2 of 3: Hugging Face's first two layers, then the final norm and head (and Gemma 2's logit cap)."""
    _, _, drafter_path = family
    tokens = prompts[1] + prompts[7]
    model = AutoModelForCausalLM.from_pretrained(drafter_path, attn_implementation="eager").eval()
    with torch.no_grad():
        hidden = model.model(torch.tensor([tokens]), output_hidden_states=True).hidden_states[2]
        expected = model.lm_head(model.model.norm(hidden))[0]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        expected = torch.tanh(expected / cap) * cap
    runner = ModelRunner.from_pretrained(drafter_path)
    runner.add_sequence("exit")
    torch.testing.assert_close(runner.forward(["exit"], [tokens], exits=[2])[0], expected, atol=ATOL, rtol=0)
