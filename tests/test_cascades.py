"""Speculative cascades: the deferral rules on hand-computed distributions, verification against
the mixture pi, and the engine's cascades (alpha = 0 is lossless, Chow at alpha = 1 is the drafter)."""

import pytest
import torch
from transformers import LlamaForCausalLM

from actors.cascades import (
    CascadeParams, CascadeVerdict, cascade_defer, cascade_verdict, defer_to_drafter, make_cascade_params,
)
from actors.drafters import Draft, ModelDrafter, NgramDrafter
from actors.errors import InvalidRequest
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import logits_to_probs, make_generator, make_sampling_params
from actors.verification import RowToVerify, verify_round
from actors.speculation import FOLLOW_PLAN, NO_SPECULATION, SpeculationSpec
from actors.trees import TreeShape
from cluster.config import InvalidConfig, TargetConfig, parse_config
from cluster.requests import speculation_spec
from specfleet.v1 import generation_pb2 as pb
from test_generator import chi_square_excess

EXITS = [1, 2, 4]  # the exits a sorted drafter was trained for

GREEDY = make_sampling_params(temperature=0, max_tokens=24, ignore_eos=True)


def verify_cascade(draft: Draft, target_logits: torch.Tensor, params, cascade: CascadeParams,
                   generator: torch.Generator) -> CascadeVerdict:
    """One cascade row verified alone, as the engine verifies it among others."""
    defer = cascade_defer(draft, target_logits, cascade)
    verdict = verify_round([RowToVerify(draft.tokens, target_logits, params, generator, draft.probs, defer)])[0]
    return cascade_verdict(verdict, draft.tokens, defer, cascade)

# Three positions' temperature-1 distributions (drafter q1, target p1), with
#   A: max q 0.6, max p 0.7, TV 0.6   B: max q 0.6, max p 0.7, TV 0.1   C: max q 0.7, max p 0.5, TV 0.2
Q1 = torch.tensor([[0.1, 0.6, 0.3], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1]])
P1 = torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])


@pytest.mark.parametrize(
    "rule, alpha, expected",
    [
        ("chow", 0.25, [False, False, False]),  # defers when max q >= 0.75
        ("chow", 0.35, [False, False, True]),  # >= 0.65: only C
        ("chow", 0.45, [True, True, True]),  # >= 0.55
        ("diff", 0.05, [False, False, True]),  # max q >= max p - 0.05: 0.6 < 0.65 for A and B
        ("diff", 0.15, [True, True, True]),  # 0.6 >= 0.55
        ("opt", 0.15, [False, False, True]),  # A: 0.6 < 0.7 - 0.09; B: 0.6 < 0.7 - 0.015
        ("opt", 0.5, [True, False, True]),  # A: 0.6 >= 0.7 - 0.3; B: 0.6 < 0.7 - 0.05: a far-off q defers sooner
        ("opt", 1.0, [True, True, True]),  # B: 0.6 >= 0.7 - 0.1
    ],
)
def test_deferral_rules_on_hand_computed_distributions(rule, alpha, expected):
    assert defer_to_drafter(CascadeParams(rule=rule, alpha=alpha), Q1, P1).tolist() == expected


@pytest.mark.parametrize("rule", ["chow", "diff", "opt"])
def test_alpha_zero_defers_nowhere_even_where_the_drafter_is_certain(rule):
    certain = torch.tensor([[1.0, 0.0, 0.0]])  # max q = 1 (a saturated softmax), more confident than any p
    assert not defer_to_drafter(CascadeParams(rule=rule, alpha=0.0), torch.cat([Q1, certain]), torch.cat([P1, P1[:1]])).any()


def test_chow_at_alpha_one_defers_everywhere():
    assert defer_to_drafter(CascadeParams(rule="chow", alpha=1.0), Q1, P1).all()


@pytest.mark.parametrize("values", [{"rule": "chow", "alpha": 1.5}, {"rule": "chow", "alpha": -0.1}, {"rule": "max", "alpha": 0.1}])
def test_bad_cascade_values_are_refused(values):
    with pytest.raises(InvalidRequest, match="invalid cascade"):
        make_cascade_params(**values)


def one_hot_logits(tokens: list[int], vocab: int = 6) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float() * 5.0


def confident_at(positions: list[bool], vocab: int = 6) -> torch.Tensor:
    """Drafter confidence rows: certain where True, flat elsewhere."""
    flat, certain = torch.full((vocab,), 1 / vocab), torch.nn.functional.one_hot(torch.tensor(0), vocab).float()
    return torch.stack([certain if c else flat for c in positions])


@pytest.mark.parametrize(
    "alpha, confident, expected",
    [
        (0.0, [True, True, True], CascadeVerdict(1, 5, accepted=1, deferred=0)),  # lossless: the target's 5 replaces 2
        (0.5, [False, True, False], CascadeVerdict(2, 3, accepted=3, deferred=1)),  # 2 stands; no bonus after x_3
        (0.5, [False, False, False], CascadeVerdict(1, 5, accepted=1, deferred=0)),
        (0.5, [True, False, True], CascadeVerdict(1, 5, accepted=1, deferred=1)),  # C never judged
        (1.0, [False, False, False], CascadeVerdict(2, 3, accepted=3, deferred=3)),  # Chow at 1 defers even when unsure
    ],
)
def test_greedy_cascade_table(alpha, confident, expected):
    draft = Draft([1, 2, 3], None, confident_at(confident))
    target_logits = one_hot_logits([1, 5, 3, 4])  # the target's argmax: 1, 5, 3, then the bonus 4
    verdict = verify_cascade(draft, target_logits, GREEDY, CascadeParams(rule="chow", alpha=alpha), make_generator(0))
    assert verdict == expected


def test_a_fully_accepted_lossless_round_keeps_its_bonus():
    draft = Draft([1, 5, 3], None, confident_at([True, True, True]))
    verdict = verify_cascade(draft, one_hot_logits([1, 5, 3, 4]), GREEDY, CascadeParams(rule="diff", alpha=0.0), make_generator(0))
    assert verdict == CascadeVerdict(3, 4, accepted=3, deferred=0)


def emitted_histograms(p: torch.Tensor, q: torch.Tensor, cascade: CascadeParams, trials: int, seed: int):
    """Counts of the first and second emitted token of rounds whose positions have their own p and q.

    p: [2, V] target rows (also the temperature-1 confidence), q: [2, V] drafter rows.
    """
    params = make_sampling_params(temperature=1.0)
    generator = make_generator(seed)
    target_logits = torch.cat([p, p[-1:]]).log()  # [3, V]: the bonus row repeats position 2
    counts = torch.zeros(2, p.shape[-1])
    for _ in range(trials):
        tokens = [int(torch.multinomial(q[i], 1, generator=generator)) for i in range(2)]
        verdict = verify_cascade(Draft(tokens, q, q), target_logits, params, cascade, generator)
        for position, token in enumerate(verdict.emitted(tokens)[:2]):
            counts[position, token] += 1
    return counts


def test_sampled_cascade_tokens_follow_the_mixture_position_by_position():
    """Position 1 defers (pi = q), position 2 does not (pi = p): each emitted token follows its own pi."""
    q = torch.tensor([[0.8, 0.1, 0.05, 0.03, 0.01, 0.01], [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]])
    p = torch.tensor([[0.2, 0.3, 0.2, 0.1, 0.1, 0.1], [0.1, 0.1, 0.6, 0.1, 0.05, 0.05]])
    cascade = CascadeParams(rule="diff", alpha=0.2)
    assert defer_to_drafter(cascade, q, p).tolist() == [True, False]
    counts = emitted_histograms(p, q, cascade, trials=2000, seed=3)
    assert chi_square_sd(counts[0], q[0]) < 5 and chi_square_sd(counts[0], p[0]) > 20
    assert chi_square_sd(counts[1], p[1]) < 5 and chi_square_sd(counts[1], q[1]) > 20


def chi_square_sd(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square in standard deviations above its mean (every bin here expects >= 20 samples)."""
    expected = probs * counts.sum()
    df = counts.numel() - 1
    return (float(((counts - expected) ** 2 / expected).sum()) - df) / (2 * df) ** 0.5


# -- the engine ---------------------------------------------------------------------


@pytest.fixture
def plain_greedy(target, prompts) -> list[list[int]]:
    return [r.tokens for r in SpeculativeGenerator(target).generate(prompts, GREEDY)]


@pytest.mark.parametrize("rule", ["chow", "diff", "opt"])
def test_alpha_zero_is_the_lossless_greedy_output(target, drafter_runner, prompts, plain_greedy, rule):
    generator = SpeculativeGenerator(target, ModelDrafter(drafter_runner), 3, 2, CascadeParams(rule=rule, alpha=0.0))
    results = generator.generate(prompts, GREEDY)
    assert [r.tokens for r in results] == plain_greedy
    assert sum(r.stats.deferred for r in results) == 0 and sum(r.stats.drafted for r in results) > 0


def test_alpha_zero_samples_exactly_what_lossless_speculation_samples(target, drafter_runner, prompts):
    """Same seeds, same tokens: the cascade at alpha = 0 makes the lossless round's very random draws."""
    some = prompts[::2]
    params = [make_sampling_params(temperature=1.2, top_k=50, seed=s, max_tokens=16, ignore_eos=True) for s in range(len(some))]
    lossless = SpeculativeGenerator(target, ModelDrafter(drafter_runner), k=3).generate(some, params)
    cascade = SpeculativeGenerator(target, ModelDrafter(drafter_runner), k=3, cascade=CascadeParams(rule="opt", alpha=0.0))
    assert [r.tokens for r in cascade.generate(some, params)] == [r.tokens for r in lossless]


def test_chow_at_alpha_one_reproduces_the_drafters_own_greedy_output(target, drafter_runner, drafter_path, prompts):
    own = [r.tokens for r in SpeculativeGenerator(ModelRunner.from_pretrained(drafter_path)).generate(prompts, GREEDY)]
    generator = SpeculativeGenerator(target, ModelDrafter(drafter_runner), k=4, exit_layer=4,
                                     cascade=CascadeParams(rule="chow", alpha=1.0))
    results = generator.generate(prompts, GREEDY)
    assert [r.tokens for r in results] == own
    for r in results:  # every token was a draft token that stood on the drafter's q: no bonus, no target token
        assert r.stats.deferred == r.stats.accepted == r.stats.drafted == r.stats.emitted == len(r.tokens)


def test_intermediate_lenience_lands_between_the_target_and_the_drafter(target, drafter_runner, drafter_path, prompts, plain_greedy):
    own = [r.tokens for r in SpeculativeGenerator(ModelRunner.from_pretrained(drafter_path)).generate(prompts, GREEDY)]
    results = SpeculativeGenerator(target, ModelDrafter(drafter_runner), k=4, exit_layer=4,
                                   cascade=CascadeParams(rule="opt", alpha=0.5)).generate(prompts, GREEDY)
    deferred = sum(r.stats.deferred for r in results)
    assert 0 < deferred < sum(r.stats.drafted for r in results)
    assert [r.tokens for r in results] not in (plain_greedy, own)


def test_a_model_free_drafter_never_gets_a_deferral(target, prompts):
    repetitive = [p * 3 for p in prompts[:4]]
    expected = [r.tokens for r in SpeculativeGenerator(target).generate(repetitive, GREEDY)]
    results = SpeculativeGenerator(target, NgramDrafter(), k=4, cascade=CascadeParams(rule="chow", alpha=1.0)).generate(repetitive, GREEDY)
    assert [r.tokens for r in results] == expected
    assert sum(r.stats.deferred for r in results) == 0


def cascade_two_token_distribution(target_hf, drafter_hf, prompt, temperature, cascade) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact pi of the first token and the marginal pi of the second, the rule applied at each prefix."""
    params = make_sampling_params(temperature=temperature)
    with torch.no_grad():
        first_p, first_q = (m(torch.tensor([prompt])).logits[0, -1:] for m in (target_hf, drafter_hf))  # [1, V] each
        vocab = first_p.shape[-1]
        extended = torch.cat([torch.tensor([prompt]).expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
        second_p, second_q = (m(extended).logits[:, -1] for m in (target_hf, drafter_hf))  # [V, V] each

    def pi(p_logits, q_logits):
        defer = defer_to_drafter(cascade, torch.softmax(q_logits, -1), torch.softmax(p_logits, -1))  # [n]
        return torch.where(defer[:, None], logits_to_probs(q_logits, params), logits_to_probs(p_logits, params))

    first = pi(first_p, first_q)[0]  # [V]
    return first, first @ pi(second_p, second_q)


def test_sampled_cascade_follows_its_exact_mixture_distribution(target, target_path, drafter_runner, drafter_path, prompts):
    """Seeded generations of two tokens against pi computed exactly from both models."""
    prompt, samples, temperature = prompts[1], 2000, 1.3
    cascade = CascadeParams(rule="diff", alpha=0.1)
    target_hf, drafter_hf = (LlamaForCausalLM.from_pretrained(p).eval() for p in (target_path, drafter_path))
    exact = cascade_two_token_distribution(target_hf, drafter_hf, prompt, temperature, cascade)
    params = [make_sampling_params(temperature=temperature, max_tokens=2, seed=s, ignore_eos=True) for s in range(samples)]
    generator = SpeculativeGenerator(target, ModelDrafter(drafter_runner), k=2, exit_layer=4, cascade=cascade)
    results = generator.generate([prompt] * samples, params)
    assert 0 < sum(r.stats.deferred for r in results) < sum(r.stats.accepted for r in results)  # both kinds of position
    lossless = cascade_two_token_distribution(target_hf, drafter_hf, prompt, temperature, CascadeParams(rule="diff", alpha=0.0))
    tokens = torch.tensor([r.tokens for r in results])  # [samples, 2]
    for position in range(2):
        counts = torch.bincount(tokens[:, position], minlength=target.vocab_size).float()
        assert chi_square_excess(counts, exact[position]) < 5, f"position {position}"
    second = torch.bincount(tokens[:, 1], minlength=target.vocab_size).float()
    assert chi_square_excess(second, lossless[1]) > 20, "the cascade should differ from the target alone"


# -- the wire and the config ---------------------------------------------------------


def target_config(**values) -> TargetConfig:
    return TargetConfig(path="t", pool="p", drafter="d", **values)


def with_cascade(**cascade) -> pb.Speculation:
    speculation = pb.Speculation()
    speculation.cascade.CopyFrom(pb.Cascade(**cascade))
    return speculation


def test_a_requests_cascade_overrides_the_targets_default_field_by_field():
    target = target_config(cascade={"rule": "opt", "alpha": 0.3})
    assert speculation_spec(pb.Speculation(), target, EXITS) == SpeculationSpec(cascade=CascadeParams(rule="opt", alpha=0.3))
    assert speculation_spec(with_cascade(alpha=0.0), target, EXITS).cascade == CascadeParams(rule="opt", alpha=0.0)
    chow = speculation_spec(with_cascade(rule=pb.Cascade.CHOW), target, EXITS).cascade
    assert chow == CascadeParams(rule="chow", alpha=0.3)
    assert speculation_spec(pb.Speculation(mode=pb.Speculation.OFF), target, EXITS) == NO_SPECULATION  # plain decoding: no cascade
    assert speculation_spec(pb.Speculation(), target_config(), EXITS) == FOLLOW_PLAN  # no default: lossless


@pytest.mark.parametrize(
    "speculation, target, message",
    [
        (with_cascade(rule=pb.Cascade.DIFF, alpha=1.5), target_config(), "invalid cascade: alpha"),
        (with_cascade(rule=pb.Cascade.DIFF, alpha=float("nan")), target_config(), "invalid cascade: alpha"),
        (with_cascade(rule=pb.Cascade.DIFF), target_config(), "needs a rule and an alpha"),
        (with_cascade(alpha=0.1), target_config(), "needs a rule and an alpha"),
        (with_cascade(rule=pb.Cascade.CHOW, alpha=0.1), TargetConfig(path="t", pool="p"), "no drafter to cascade with"),
    ],
)
def test_bad_cascade_requests_are_refused(speculation, target, message):
    with pytest.raises(InvalidRequest, match=message):
        speculation_spec(speculation, target, EXITS)


def test_the_configured_default_is_validated():
    with pytest.raises(InvalidConfig, match="alpha"):
        parse_config({"pools": {"p": {}}, "targets": {"t": {"path": "t", "pool": "p", "cascade": {"rule": "chow", "alpha": 2}}}})


def test_a_fixed_speculation_is_checked_against_the_drafters_exits_at_the_front_door():
    fixed = pb.Speculation(mode=pb.Speculation.FIXED, k=3, exit_layer=2)
    assert speculation_spec(fixed, target_config(), EXITS) == SpeculationSpec(k=3, exit_layer=2)
    deepest = pb.Speculation(mode=pb.Speculation.FIXED, k=3)  # exit 0 on the wire: the plan's
    assert speculation_spec(deepest, target_config(), EXITS) == SpeculationSpec(k=3)
    for untrained in (3, 5):
        with pytest.raises(InvalidRequest, match=rf"exit {untrained} is not one of the exits the drafter was trained for: \[1, 2, 4\]"):
            speculation_spec(pb.Speculation(mode=pb.Speculation.FIXED, k=3, exit_layer=untrained), target_config(), EXITS)


def test_a_fixed_speculation_may_ask_for_a_tree_instead_of_k():
    fixed = pb.Speculation(mode=pb.Speculation.FIXED, tree="dynamic-4x2", exit_layer=2)
    assert speculation_spec(fixed, target_config(), EXITS, trees=True) == SpeculationSpec(
        tree=TreeShape.parse("dynamic-4x2"), exit_layer=2)
    for tree, problem in (("bushy", "a tree shape reads"), ("static-17x1", "1..16 levels"), ("static-8x8", "at most 63")):
        with pytest.raises(InvalidRequest, match=problem):
            speculation_spec(pb.Speculation(mode=pb.Speculation.FIXED, tree=tree), target_config(), EXITS, trees=True)
    with pytest.raises(InvalidRequest, match="k or a tree, not both"):
        speculation_spec(pb.Speculation(mode=pb.Speculation.FIXED, tree="static-2x2", k=2), target_config(), EXITS,
                         trees=True)
    with pytest.raises(InvalidRequest, match="does not serve token trees"):  # its replicas compiled no tree step
        speculation_spec(fixed, target_config(), EXITS, trees=False)


def test_enum_values_this_server_does_not_know_are_refused():
    with pytest.raises(InvalidRequest, match="unknown speculation mode 7"):
        speculation_spec(pb.Speculation(mode=7, k=3), target_config(), EXITS)
    with pytest.raises(InvalidRequest, match="unknown cascade rule 9"):
        speculation_spec(pb.Speculation(cascade=pb.Cascade(rule=9, alpha=0.1)), target_config(), EXITS)
