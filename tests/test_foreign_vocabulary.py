"""Drafting across vocabularies: the byte bridge, and lossless speculation with a drafter of another tokenizer."""

import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from actors.cascades import CascadeParams
from actors.drafters import DraftRequest, ModelDrafter
from actors.engine import SpeculationEngine
from actors.errors import IncompatibleModels, InvalidRequest
from actors.foreign_drafter import ForeignVocabularyDrafter
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from actors.speculation import SpeculationSpec
from actors.trees import TreeShape
from actors.vocabulary_bridge import BridgedContext, Vocabulary, VocabularyBridge
from cluster.defaults import models_dir

from test_generator import GREEDY, chi_square_excess, first_two_token_distributions

CODE = "def add(a, b):\n    return a + b\n\nwhile True:\n    total += step  # é ✓\n"


@pytest.fixture(scope="module")
def bridge(target_path, foreign_drafter_path) -> VocabularyBridge:
    return VocabularyBridge(Vocabulary(AutoTokenizer.from_pretrained(target_path)),
                            Vocabulary(AutoTokenizer.from_pretrained(foreign_drafter_path)))


@pytest.fixture
def foreign_runner(foreign_drafter_path) -> ModelRunner:
    return ModelRunner.from_pretrained(foreign_drafter_path)


def foreign(runner: ModelRunner, bridge: VocabularyBridge, target: ModelRunner) -> ForeignVocabularyDrafter:
    return ForeignVocabularyDrafter(ModelDrafter(runner), bridge, target.vocab_size)


@pytest.fixture
def plain_greedy(target, prompts) -> list[list[int]]:
    return [r.tokens for r in SpeculativeGenerator(target).generate(prompts, GREEDY)]


def test_every_id_is_spelled_as_the_tokenizer_decodes_it(bridge, target_path):
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    ids = bridge.target.encode(CODE)
    assert bridge.target.spell(ids) == CODE.encode()
    assert all(bridge.target.spell([i]).decode("utf-8", "replace") == tokenizer.decode([i])
               for i in range(1, bridge.target.size) if bridge.target.bytes_of[i].isascii())


def test_the_intersection_pairs_ids_of_the_same_bytes_and_the_end_of_sequence_by_name(bridge):
    assert all(bridge.drafter.bytes_of[d] == bridge.target.bytes_of[t] for d, t in bridge.to_target.items() if t != 0)
    assert bridge.to_target[bridge.drafter.eos_id] == bridge.target.eos_id
    only_drafter = set(range(bridge.drafter.size)) - set(bridge.to_target)
    assert len(only_drafter) > 10  # the vocabularies overlap only in part: the test of each scheme depends on it
    assert len(bridge.to_target) > 256  # every byte, and merges both learnt


def test_drafted_text_is_retokenised_into_target_ids(bridge):
    drafted = bridge.drafter.encode("    return a + b\n")
    assert bridge.retokenize(drafted) == bridge.target.encode("    return a + b\n")
    assert bridge.retokenize(drafted + [bridge.drafter.eos_id, *drafted]) == \
        bridge.target.encode("    return a + b\n") + [bridge.target.eos_id]  # a drafted end of sequence ends the text
    half = "é".encode()[:1]  # the target emitted half a character: the draft must begin with it
    assert bridge.retokenize(bridge.drafter.encode("é x"), carried=half) == \
        [bridge.target.byte_ids["é".encode()[1]]] + bridge.target.encode(" x")
    assert bridge.retokenize(bridge.drafter.encode("x"), carried=half) == []


def test_the_drafter_context_is_the_committed_text_tokenised_whole(bridge):
    """However rounds split the text, the drafter reads it as its tokenizer reads the whole text."""
    target_ids = bridge.target.encode(CODE)
    rng = random.Random(0)
    for _ in range(20):
        context, drafter_ids, at = BridgedContext(bridge), [], 0
        while at < len(target_ids):
            step = rng.randint(1, 4)
            rewind, added = context.append(target_ids[at : at + step])
            del drafter_ids[len(drafter_ids) - rewind :]
            drafter_ids += added
            at += step
            assert bridge.drafter.spell(drafter_ids) + context.carried == bridge.target.spell(target_ids[:at])
        assert drafter_ids == context.ids == bridge.drafter.encode(CODE)


def test_half_a_character_waits_for_its_other_half(bridge):
    ids = [bridge.target.byte_ids[b] for b in "é".encode()]  # one single-byte token per byte
    context = BridgedContext(bridge)
    assert context.append(bridge.target.encode("x = ") + ids[:1]) == (0, bridge.drafter.encode("x = "))
    assert context.carried == "é".encode()[:1]
    rewind, added = context.append(ids[1:])
    assert context.carried == b"" and bridge.drafter.spell(context.ids) == "x = é".encode()


@pytest.mark.parametrize("exit_layer", [1, 4])
def test_greedy_speculation_with_a_foreign_drafter_equals_the_targets_own_output(
        target, foreign_runner, bridge, prompts, plain_greedy, exit_layer):
    """String-level exact match: every prompt (random ids too, whose bytes are not always UTF-8), every k."""
    for k in (1, 3, 6):
        generator = SpeculativeGenerator(target, foreign(foreign_runner, bridge, target), k=k, exit_layer=exit_layer)
        results = generator.generate(prompts, GREEDY)
        assert [r.tokens for r in results] == plain_greedy, f"batched, k={k}"
        assert sum(r.stats.drafted for r in results) > 0
        for prompt, expected in list(zip(prompts, plain_greedy))[::3]:
            assert generator.generate([prompt], GREEDY)[0].tokens == expected, f"alone, k={k}"
        assert target.num_sequences == 0 and foreign_runner.num_sequences == 0


def test_a_model_drafting_for_itself_across_the_bridge_is_mostly_accepted():
    """The bridge loses little: the zoo's target-s as its own drafter, its text carried over as bytes and
    re-tokenised (a trained model's output is mostly as its tokenizer would spell it; a random one's is not)."""
    path = models_dir() / "target-s"
    vocabulary = Vocabulary(AutoTokenizer.from_pretrained(path))
    target = ModelRunner.from_pretrained(path)
    drafter = ForeignVocabularyDrafter(ModelDrafter(ModelRunner.from_pretrained(path)),
                                       VocabularyBridge(vocabulary, vocabulary), target.vocab_size)
    prompts = [vocabulary.encode(text) for text in ("def fibonacci(n):\n", "import os\n\nclass Config:\n    def __init__(self")]
    expected = [r.tokens for r in SpeculativeGenerator(target).generate(prompts, GREEDY)]
    results = SpeculativeGenerator(target, drafter, k=3).generate(prompts, GREEDY)
    assert [r.tokens for r in results] == expected
    assert sum(r.stats.accepted for r in results) / sum(r.stats.drafted for r in results) > 0.8


def test_the_drafters_cache_after_rewinding_commits_equals_a_fresh_ones(target, foreign_runner, foreign_drafter_path, bridge,
                                                                          prompts):
    drafter = foreign(foreign_runner, bridge, target)
    SpeculativeGenerator(target, drafter, k=4).generate(prompts[:1], make_sampling_params(temperature=0, max_tokens=20,
                                                                                             ignore_eos=True))
    context = BridgedContext(bridge)
    context.append(prompts[0])
    drafter.start("s", prompts[0], GREEDY)
    drafter.commit("s", bridge.target.encode(" x = total"))
    drafter.commit("s", bridge.target.encode("s + 1"))  # "totals" spans both commits
    used = drafter.propose([DraftRequest("s", 5)])[0]
    fresh_context = BridgedContext(bridge)
    fresh_context.append(prompts[0] + bridge.target.encode(" x = total") + bridge.target.encode("s + 1"))
    fresh = ModelDrafter(ModelRunner.from_pretrained(foreign_drafter_path))
    fresh.start("s", fresh_context.ids, GREEDY)
    expected = fresh.propose([DraftRequest("s", 5)])[0]
    assert used.tokens == bridge.retokenize(expected.tokens)[:5]


def test_sampled_speculation_with_a_foreign_drafter_follows_the_target_distribution(
        target, target_path, foreign_runner, bridge, prompts):
    """Token-level intersection: seeded samples of the first two tokens against their exact distributions."""
    prompt, samples, temperature = prompts[0], 3000, 1.3
    exact = first_two_token_distributions(LlamaForCausalLM.from_pretrained(target_path).eval(), prompt, temperature)
    params = [make_sampling_params(temperature=temperature, max_tokens=2, seed=s, ignore_eos=True) for s in range(samples)]
    generator = SpeculativeGenerator(target, foreign(foreign_runner, bridge, target), k=2, exit_layer=4)
    results = generator.generate([prompt] * samples, params)
    assert sum(r.stats.accepted for r in results) > samples // 20  # both accept and reject paths ran
    tokens = torch.tensor([r.tokens for r in results])  # [samples, 2]
    first_q = _first_draft_distribution(foreign_runner, bridge, prompt, temperature)
    for position in range(2):
        counts = torch.bincount(tokens[:, position], minlength=target.vocab_size).float()
        assert chi_square_excess(counts, exact[position]) < 5, f"position {position}"
    assert chi_square_excess(torch.bincount(tokens[:, 0], minlength=target.vocab_size).float(), first_q) > 20


def _first_draft_distribution(runner: ModelRunner, bridge: VocabularyBridge, prompt: list[int], temperature: float):
    """The drafter's restricted q of the first draft token, over target ids (what the output must not follow)."""
    context = BridgedContext(bridge)
    context.append(prompt)
    model = LlamaForCausalLM.from_pretrained(runner.name).eval()
    with torch.no_grad():
        logits = model(torch.tensor([context.ids])).logits[0, -1] / temperature  # [V_drafter]
    allowed = torch.zeros_like(logits, dtype=torch.bool)
    allowed[list(bridge.shared_drafter_ids)] = True
    q = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    return bridge.target_probs(q[None])[0]


def test_a_foreign_drafter_samples_only_tokens_the_target_has(target, foreign_runner, bridge, prompts):
    drafter = foreign(foreign_runner, bridge, target)
    drafter.start("s", prompts[0], make_sampling_params(temperature=2.0, seed=1))
    draft = drafter.propose([DraftRequest("s", 8)])[0]
    assert len(draft.tokens) == 8 and draft.probs.shape == (8, target.vocab_size)
    assert torch.allclose(draft.probs.sum(-1), torch.ones(8), atol=1e-5)
    assert all(draft.probs[i, token] > 0 for i, token in enumerate(draft.tokens))


def test_trees_and_cascades_are_refused_across_vocabularies(target, foreign_runner, bridge, prompts):
    drafter = foreign(foreign_runner, bridge, target)
    drafter.start("s", prompts[0], GREEDY)
    for request in (DraftRequest("s", 0, tree=TreeShape(depth=2, width=2)), DraftRequest("s", 3, confidence=True)):
        with pytest.raises(InvalidRequest, match="chains only"):
            drafter.propose([request])


def test_a_tokenizer_that_is_not_byte_level_cannot_bridge():
    words = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(IncompatibleModels, match="byte-level"):
        Vocabulary(PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]"))


def test_a_cascade_or_tree_request_is_refused_at_admission(target, foreign_runner, bridge, prompts):
    engine = SpeculationEngine(target, foreign(foreign_runner, bridge, target), k=3)
    for spec in (SpeculationSpec(cascade=CascadeParams(rule="chow", alpha=0.5)), SpeculationSpec(tree=TreeShape(depth=2, width=2))):
        with pytest.raises(InvalidRequest, match="chains only"):
            engine.add(prompts[0], GREEDY, spec=spec)
    assert engine.num_live == 0
