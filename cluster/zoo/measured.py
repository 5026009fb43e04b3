"""What the zoo does when it serves: speculation's measured acceptance, and the cost of a step.

`zoo eval`'s teacher-forced tables compare distributions position by position on
the true text. Here the engine itself decodes greedily with each drafter exit and
the largest target, and the runner (compiled as a served replica is) times one
step of each model, so the figures are the ones speculation meets.
"""

import statistics
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from actors.drafters import ModelDrafter
from actors.engine import SpeculationEngine
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params

PROMPTS = 32  # held-out prompts decoded per exit
PROMPT_TOKENS = 256  # at most; a quarter of the context when that is less
GENERATED_TOKENS = 128  # at most; a quarter of the context when that is less


class ExitAcceptance(BaseModel):
    exit_layer: int = Field(description="Drafter exit (layers run).")
    rounds: int = Field(description="Sequence-rounds that drafted all k tokens, the ones counted.")
    per_position: list[float] = Field(description="a_j: P(draft token j accepted | tokens 1..j-1 accepted), j = 1..k.")
    mal: float = Field(description="Mean accepted length, bonus token included: 1 + a_1 + a_1 a_2 + ... + a_1..a_k.")


class StepCost(BaseModel):
    model: str = Field(description="Target name, or 'drafter-exit-L'.")
    tokens: int = Field(description="New tokens scored by the step (one row).")
    median_ms: float = Field(description="Median wall time of the step, milliseconds.")


class Measured(BaseModel):
    target: str = Field(description="The target speculation was measured against (the largest).")
    k: int = Field(description="Draft length.")
    prompts: int = Field(description="Held-out prompts decoded.")
    prompt_tokens: int = Field(description="Tokens per prompt.")
    max_tokens: int = Field(description="Tokens generated per prompt.")
    acceptance: list[ExitAcceptance] = Field(description="Greedy speculation of each exit with the target.")
    compile_mode: str = Field(description="How the runner ran the timed steps (after the first prompt, cached).")
    costs: list[StepCost] = Field(description="One step of each exit (1 token), each target (k + 1 tokens), and the "
                                  "largest target at every width 1..k + 1.")

    def cost(self, model: str, tokens: int) -> float:
        return next(c.median_ms for c in self.costs if c.model == model and c.tokens == tokens)

    def forward_bound_speedup(self, exit_layer: int, k: int) -> float:
        """Tokens/s of speculation with (exit, k) over the target alone, counting model steps only:
        MAL(k) x T(1) / (T(k + 1) + k x d(exit)), with MAL(k) from the measured per-position acceptance."""
        rates = next(a.per_position for a in self.acceptance if a.exit_layer == exit_layer)[:k]
        round_ms = self.cost(self.target, k + 1) + k * self.cost(f"drafter-exit-{exit_layer}", 1)
        return mal_from_rates(rates) * self.cost(self.target, 1) / round_ms


def per_position_acceptance(lengths: list[int], k: int) -> list[float]:
    """a_j for j = 1..k from accepted lengths of rounds that drafted k tokens each."""
    rates = []
    for j in range(1, k + 1):
        reached = sum(1 for n in lengths if n >= j - 1)
        rates.append(sum(1 for n in lengths if n >= j) / reached if reached else 0.0)
    return rates


def mal_from_rates(rates: list[float]) -> float:
    """1 + a_1 + a_1 a_2 + ...: expected tokens per round, the bonus (or recovered) token counted."""
    total, survive = 1.0, 1.0
    for rate in rates:
        survive *= rate
        total += survive
    return total


def measure_acceptance(drafter_path: Path, target_path: Path, prompts: list[list[int]], k: int,
                       max_tokens: int) -> list[ExitAcceptance]:
    """Greedy speculative decoding of every prompt with each exit; rounds cut short by max_tokens are left out."""
    target = ModelRunner.from_pretrained(str(target_path), max_sequences=len(prompts))
    drafter = ModelRunner.from_pretrained(str(drafter_path), max_sequences=len(prompts))
    params = make_sampling_params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    results = []
    for exit_layer in drafter.exit_layers:
        engine = SpeculationEngine(target, ModelDrafter(drafter), k=k, exit_layer=exit_layer)
        for prompt in prompts:
            engine.add(prompt, params)
        while engine.num_live:
            engine.step()
        lengths = [n for r in engine.drain_telemetry() if r.k == k and r.drafted == k * r.sequences
                   for n in r.accepted_lengths]
        rates = per_position_acceptance(lengths, k)
        results.append(ExitAcceptance(exit_layer=exit_layer, rounds=len(lengths), per_position=rates,
                                      mal=mal_from_rates(rates)))
    return results


def step_ms(runner: ModelRunner, context: list[int], tokens: int, exit_layer: int, repeats: int) -> float:
    """Median milliseconds of one forward of `tokens` new tokens after `context`, rolled back after each."""
    runner.add_sequence("timed")
    runner.forward(["timed"], [context], exits=[exit_layer], last_only=True)
    times = []
    for _ in range(repeats + 3):  # the first three warm caches and allocators
        started = time.perf_counter()
        runner.forward(["timed"], [context[:tokens]], exits=[exit_layer])
        times.append(time.perf_counter() - started)
        runner.rollback("timed", len(context))
    runner.free("timed")
    return 1e3 * statistics.median(times[3:])


def measure_costs(drafter_path: Path, targets: dict[str, Path], context: list[int], k: int,
                  repeats: int = 50) -> tuple[str, list[StepCost]]:
    """One step of each drafter exit (1 token) and each target (k + 1 tokens), compiled as served ('auto')."""
    drafter = ModelRunner.from_pretrained(str(drafter_path), max_sequences=1, compile_mode="auto", drafts=True)
    drafter.warm_up()
    costs = [StepCost(model=f"drafter-exit-{e}", tokens=1, median_ms=step_ms(drafter, context, 1, e, repeats))
             for e in drafter.exit_layers]
    largest, target_modes = list(targets)[-1], set()
    for name, path in targets.items():
        runner = ModelRunner.from_pretrained(str(path), max_sequences=1, compile_mode="auto")
        runner.warm_up()
        target_modes.add(runner.compile_mode)
        for width in range(1, k + 2) if name == largest else [k + 1]:
            costs.append(StepCost(model=name, tokens=width, median_ms=step_ms(runner, context, width, runner.num_layers,
                                                                                repeats)))
    return f"targets {', '.join(sorted(target_modes))}, drafter {drafter.compile_mode}", costs


@torch.inference_mode()
def measure(drafter_path: Path, targets: dict[str, Path], test_windows: torch.Tensor, k: int) -> Measured:
    """Acceptance against the last (largest) target on prompts cut from held-out windows [W, T+1],
    and the step costs of every model."""
    context = test_windows.shape[1] - 1
    length, max_tokens = min(PROMPT_TOKENS, context // 4), min(GENERATED_TOKENS, context // 4)
    prompts = test_windows[:PROMPTS, :length].tolist()
    largest = list(targets)[-1]
    acceptance = measure_acceptance(drafter_path, targets[largest], prompts, k, max_tokens)
    mode, costs = measure_costs(drafter_path, targets, prompts[0], k)
    return Measured(target=largest, k=k, prompts=len(prompts), prompt_tokens=len(prompts[0]), max_tokens=max_tokens,
                    acceptance=acceptance, compile_mode=mode, costs=costs)
