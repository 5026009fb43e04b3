"""The shipped zoo (models/): loads as plain Hugging Face checkpoints, and specfleet is exact on it."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.drafters import ModelDrafter
from actors.foreign_drafter import pair_drafter
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from cluster.defaults import models_dir

ZOO = models_dir()
SHIPPED = sorted(p.parent.name for p in ZOO.glob("*/model.safetensors"))
PROMPTS = ["def fibonacci(n):\n", "import os\n\nclass Config:\n    def __init__(self"]
GREEDY = make_sampling_params(temperature=0, max_tokens=16, ignore_eos=True)


def test_the_zoo_is_complete_and_within_budget():
    assert {"target-s", "target-m", "target-l", "target-xl", "drafter"} <= set(SHIPPED)
    assert len([name for name in SHIPPED if name.startswith("drafter-exit-")]) >= 3
    total = sum((ZOO / name / "model.safetensors").stat().st_size for name in SHIPPED)
    assert total <= 64 * 2**20
    assert all((ZOO / name / "README.md").is_file() for name in SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_model_loads_in_transformers_and_specfleet_reproduces_its_greedy_output(name):
    tokenizer = AutoTokenizer.from_pretrained(ZOO / name)
    model = AutoModelForCausalLM.from_pretrained(ZOO / name, dtype=torch.float32).eval()
    runner = ModelRunner.from_pretrained(ZOO / name)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    ours = [r.tokens for r in SpeculativeGenerator(runner).generate(prompts, GREEDY)]
    for prompt, tokens in zip(prompts, ours):
        reference = list(prompt)
        with torch.no_grad():
            for _ in range(GREEDY.max_tokens):
                reference.append(int(model(torch.tensor([reference])).logits[0, -1].argmax()))
        assert tokens == reference[len(prompt) :]
        assert tokenizer.decode(tokens)  # generates text, not just ids


def test_speculation_on_the_zoo_is_lossless_for_every_exit_and_k():
    tokenizer = AutoTokenizer.from_pretrained(ZOO / "target-s")
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    target = ModelRunner.from_pretrained(ZOO / "target-s")
    drafter = ModelDrafter(ModelRunner.from_pretrained(ZOO / "drafter"))
    expected = [r.tokens for r in SpeculativeGenerator(target).generate(prompts, GREEDY)]
    for exit_layer in drafter.runner.exit_layers:
        for k in range(1, 9):
            results = SpeculativeGenerator(target, drafter, k=k, exit_layer=exit_layer).generate(prompts, GREEDY)
            assert [r.tokens for r in results] == expected, f"exit {exit_layer}, k {k}"
            assert sum(r.stats.accepted for r in results) > 0  # trained models agree sometimes


def test_the_evaluation_shipped_with_the_zoo_ranks_sizes_and_exits():
    """models/eval.json is `specfleet zoo eval` on held-out files: bigger targets and deeper exits are better."""
    report = json.loads((ZOO / "eval.json").read_text())
    loss = {m["name"]: m["loss"] for m in report["models"]}
    assert loss["target-s"] > loss["target-m"] > loss["target-l"] > loss["target-xl"]
    exits = sorted((int(n.rsplit("-", 1)[1]), v) for n, v in loss.items() if n.startswith("drafter-exit-"))
    assert [v for _, v in exits] == sorted((v for _, v in exits), reverse=True) and len(exits) >= 3


def test_the_zoos_foreign_vocabulary_drafter_drafts_for_target_xl_losslessly():
    """drafter-8k (its own 8,192-token vocabulary) drafting for target-xl, greedy and sampled."""
    target_tokenizer, foreign_tokenizer = (AutoTokenizer.from_pretrained(ZOO / n) for n in ("target-xl", "drafter-8k"))
    assert len(foreign_tokenizer) == 8192 != len(target_tokenizer)
    prompts = [target_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    target = ModelRunner.from_pretrained(ZOO / "target-xl")
    drafter = pair_drafter(ModelDrafter(ModelRunner.from_pretrained(ZOO / "drafter-8k")), target_tokenizer,
                           foreign_tokenizer, target.vocab_size)
    expected = [r.tokens for r in SpeculativeGenerator(target).generate(prompts, GREEDY)]
    for exit_layer in (1, 4):
        results = SpeculativeGenerator(target, drafter, k=4, exit_layer=exit_layer).generate(prompts, GREEDY)
        assert [r.tokens for r in results] == expected, f"exit {exit_layer}"
        assert sum(r.stats.accepted for r in results) > 0  # weak (bench/reports/foreign_vocabulary.md), not blind
    sampled = make_sampling_params(temperature=1.0, seed=0, max_tokens=16, ignore_eos=True)
    results = SpeculativeGenerator(target, drafter, k=4, exit_layer=4).generate(prompts, sampled)
    assert sum(r.stats.accepted for r in results) > 0 and all(len(r.tokens) == 16 for r in results)
