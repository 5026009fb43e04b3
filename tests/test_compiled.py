"""The batch-native data plane: the compiled step equals the eager one, padding and slots change nothing.

Compiling is slow (seconds per graph), so the compiled runners are built once per
module and each test reuses the graphs the others compiled.
"""

import pytest
import torch

from actors.buckets import NARROW_WIDTH, ShapePolicy
from actors.drafters import ModelDrafter
from actors.engine import SpeculationEngine
from actors.errors import CapacityExhausted
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner, RunnerSettings
from actors.sampling import make_sampling_params
from draft_runs import draft_rounds
from tiny_models import build_llama

ATOL = 1e-4  # float32 rounding between differently fused kernels


@pytest.fixture(scope="module")
def compiled_target(target_path) -> ModelRunner:
    return ModelRunner.from_pretrained(target_path, compile_mode="compile")


@pytest.fixture(scope="module")
def compiled_drafter(drafter_path) -> ModelRunner:
    return ModelRunner.from_pretrained(drafter_path, compile_mode="compile")


def fresh_ids(runner: ModelRunner, prefix: str, count: int) -> list[str]:
    ids = [f"{prefix}{i}" for i in range(count)]
    for seq_id in ids:
        runner.add_sequence(seq_id)
    return ids


def run_script(runner: ModelRunner, prompts: list[list[int]], prefix: str) -> list[torch.Tensor]:
    """Prefill a batch, decode a step, verify a mixed-width draft, roll back, continue: every logit returned."""
    ids = fresh_ids(runner, prefix, len(prompts))
    out = runner.forward(ids, prompts)
    out += runner.forward(ids, [[3]] * len(ids))
    out += runner.forward(ids, [[5, 6, 7][: 1 + i % 3] for i in range(len(ids))])
    for seq_id, prompt in zip(ids, prompts):
        runner.rollback(seq_id, len(prompt) + 1)
    out += runner.forward(ids, [[9, 10]] * len(ids))
    out += runner.forward(ids[:1], [[11]])  # one row alone: a batch of 1 has graphs of its own
    ids += fresh_ids(runner, f"{prefix}long", 1)
    out += runner.forward(ids[-1:], [(sum(prompts, []) * 80)[:80]], last_only=True)  # wide chunks scored at the last token
    for seq_id in ids:
        runner.free(seq_id)
    return out


def test_the_compiled_step_equals_the_eager_one(target, compiled_target, prompts):
    eager = run_script(target, prompts, "e")
    compiled = run_script(compiled_target, prompts, "c")
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=ATOL, rtol=0)


def test_the_tuned_step_equals_the_eager_one_and_leaves_other_compiles_alone(target, target_path, prompts):
    """'compile-tuned' (frozen weights, timed GEMM kernels) scores as eager does; its options stay its own."""
    import torch._inductor.config as inductor_config

    tuned = ModelRunner.from_pretrained(target_path, compile_mode="compile-tuned")
    ids = fresh_ids(tuned, "t", 2) + fresh_ids(target, "te", 2)
    for rows, tokens in ((ids[:2], prompts[:2]), (ids[:1], [[3]]), (ids[:2], [[5, 6, 7], [8]])):
        reference = target.forward([f"te{r[1:]}" for r in rows], tokens)
        for got, want in zip(tuned.forward(rows, tokens), reference):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert not inductor_config.freezing and not inductor_config.max_autotune
    assert torch.backends.mkldnn.enabled  # oneDNN is off only while a tuned graph compiles


def test_a_tuned_graph_runs_its_own_weights_not_a_same_shaped_checkpoints(target_path, tiny_dir, tokenizer, prompts):
    """Inductor caches a frozen graph by its weights' shapes but keeps the weights it packed: two checkpoints of
    the same shapes, tuned in one process (the second may come from the first's cache entry), each score as
    their own eager forward."""
    sibling_path = build_llama(tiny_dir / "target-sibling", tokenizer, seed=11)
    for path in (target_path, sibling_path):
        tuned = ModelRunner.from_pretrained(path, compile_mode="compile-tuned")
        eager = ModelRunner.from_pretrained(path)
        for runner in (tuned, eager):
            runner.add_sequence("s")
        torch.testing.assert_close(tuned.forward(["s"], prompts[:1])[0], eager.forward(["s"], prompts[:1])[0],
                                   atol=ATOL, rtol=0)


def test_compiled_exits_equal_eager_exits(drafter_runner, compiled_drafter, prompts):
    exits = drafter_runner.exit_layers
    results = []
    for runner, prefix in ((drafter_runner, "e"), (compiled_drafter, "c")):
        ids = fresh_ids(runner, prefix, len(exits))
        first = runner.forward(ids, [prompts[0]] * len(exits), exits=exits, last_only=True)
        steps = [runner.forward(ids, [[t]] * len(exits), exits=exits, last_only=True) for t in (4, 8, 15)]
        results.append(torch.stack([torch.cat(r) for r in [first, *steps]]))
        for seq_id in ids:
            runner.free(seq_id)
    torch.testing.assert_close(results[1], results[0], atol=ATOL, rtol=0)


def test_compiled_greedy_speculation_equals_eager_plain_decoding(target, compiled_target, compiled_drafter, prompts):
    params = make_sampling_params(temperature=0, max_tokens=24, ignore_eos=True)
    plain = SpeculativeGenerator(target).generate(prompts, params)
    speculative = SpeculativeGenerator(compiled_target, ModelDrafter(compiled_drafter), k=3, exit_layer=2)
    assert [r.tokens for r in speculative.generate(prompts, params)] == [r.tokens for r in plain]


def test_warm_up_compiles_every_graph_before_serving(target_path, prompts):
    """After `serving` warmed it up, decoding and verifying compile nothing new."""
    runner = ModelRunner.serving(str(target_path), RunnerSettings(compile="compile", max_sequences=4))
    assert runner.compile_mode == "compile" and runner.warm_up_s > 0
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_script(runner, prompts[:3], "w")


@pytest.mark.parametrize("weights", ["exact", "int8"])
def test_compiled_fused_drafts_equal_eager_single_steps_and_compile_nothing_after_warm_up(drafter_path, prompts,
                                                                                         weights):
    """A drafter replica compiles its fused greedy drafts at start-up; they draft and cache what eager steps do."""
    settings = RunnerSettings(compile="compile", max_sequences=4, drafter_weights=weights)
    compiled = ModelRunner.serving(str(drafter_path), settings, drafts=True)
    eager = ModelRunner.from_pretrained(drafter_path, drafts=True, int8_weights=weights == "int8")
    eager.fused_draft_steps = ()
    ks = [4, 4, 6, 2, 3]
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        fused = draft_rounds(ModelDrafter(compiled), prompts[:3], compiled.exit_layers, ks)
    assert fused == draft_rounds(ModelDrafter(eager), prompts[:3], eager.exit_layers, ks)


def test_padding_to_buckets_gives_each_row_what_it_gives_alone(target_path, prompts):
    padded = ModelRunner.from_pretrained(target_path)
    padded.shapes = ShapePolicy(bucketed=True)  # batches of 5 run as 8, widths of 3 as 4, keys in blocks of 64
    exact = ModelRunner.from_pretrained(target_path)
    for a, b in zip(run_script(padded, prompts[:5], "p"), run_script(exact, prompts[:5], "x")):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_a_freed_slot_decodes_as_in_a_fresh_replica(target_path, prompts):
    reused = ModelRunner.from_pretrained(target_path, max_sequences=1)
    reused.add_sequence("first")
    reused.forward(["first"], [prompts[7] + prompts[6]])  # leaves keys in positions the next owner will not write
    reused.free("first")
    fresh = ModelRunner.from_pretrained(target_path, max_sequences=1)
    for runner in (reused, fresh):
        runner.add_sequence("second")
    for tokens in (prompts[1], [4], [5, 6]):
        torch.testing.assert_close(reused.forward(["second"], [tokens])[0], fresh.forward(["second"], [tokens])[0],
                                   atol=0, rtol=0)


def test_sequences_beyond_the_slots_wait_and_decode_exactly(target_path, prompts):
    params = make_sampling_params(temperature=0, max_tokens=6, ignore_eos=True)
    roomy = SpeculativeGenerator(ModelRunner.from_pretrained(target_path)).generate(prompts, params)
    tight_runner = ModelRunner.from_pretrained(target_path, max_sequences=2)
    tight = SpeculativeGenerator(tight_runner).generate(prompts, params)
    assert [r.tokens for r in tight] == [r.tokens for r in roomy]
    assert tight_runner.store.free_slots == 2


def test_a_full_queue_refuses_with_capacity_exhausted(target_path, prompts):
    engine = SpeculationEngine(ModelRunner.from_pretrained(target_path, max_sequences=1), max_waiting=1)
    params = make_sampling_params(temperature=0, max_tokens=4)
    engine.add(prompts[0], params)
    engine.step()  # the first takes the slot
    engine.add(prompts[1], params)  # the second waits
    with pytest.raises(CapacityExhausted, match="retry later"):
        engine.add(prompts[2], params)
    assert engine.num_live == 2


def test_auto_tunes_a_verifying_model_on_mkl_and_compiles_a_drafter_or_packed_model_on_a_cpu(monkeypatch):
    from actors.compiled import AUTO_ENV, resolve_mode

    monkeypatch.delenv(AUTO_ENV, raising=False)
    assert resolve_mode("auto", "cpu") == "compile-tuned"
    assert resolve_mode("auto", "cpu", packed=True) == "compile"  # nothing left to tune
    assert resolve_mode("auto", "cpu", drafts=True) == "compile"
    assert resolve_mode("auto", "cuda") == "eager"
    assert resolve_mode("compile-static", "cpu", drafts=True) == "compile-static"
    monkeypatch.setenv(AUTO_ENV, "eager")
    assert resolve_mode("auto", "cpu") == "eager"


def test_a_compiled_tree_step_scores_as_the_eager_one(target, compiled_target, prompts):
    """Tree steps narrow and wide (attention as reductions up to `NARROW_WIDTH` tokens, SDPA past it) score
    every node as eager does, two rows at once."""
    parents = {width: [-1] + [(i - 1) // 2 for i in range(1, width)] for width in (7, NARROW_WIDTH + 3)}  # binary trees
    for width, region_parents in parents.items():
        scored = []
        for runner, prefix in ((target, "te"), (compiled_target, "tc")):
            ids = fresh_ids(runner, f"{prefix}{width}-", 2)
            runner.forward(ids, [prompts[0], prompts[4]])
            starts = [runner.cached_length(seq_id) for seq_id in ids]
            tokens = [[(11 * i + row) % 50 + 3 for i in range(width)] for row in range(2)]
            scored.append(runner.forward_tree(ids, tokens, starts, [region_parents] * 2))
        for eager, compiled in zip(*scored):
            torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=0)
