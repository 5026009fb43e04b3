"""SpeculativeGenerator: drafter + target in one process, the reference path.

Runs a `SpeculationEngine` until every prompt is done: the path tests and
benchmarks use, and the baseline (no drafter) every speedup is measured against.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from actors.cascades import CascadeParams
from actors.drafters import Drafter
from actors.engine import SpeculationEngine, SpeculationStats
from actors.errors import InvalidRequest
from actors.runner import ModelRunner
from actors.sampling import SamplingParams
from actors.speculation import SpeculationSpec
from actors.trees import TreeShape


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]  # generated tokens, the stopping end-of-sequence token excluded
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (max_tokens reached)
    stats: SpeculationStats = field(default_factory=SpeculationStats)


class SpeculativeGenerator:
    """Generates with a target, speculating with a drafter when one is given."""

    def __init__(
        self,
        target: ModelRunner,
        drafter: Drafter | None = None,
        k: int = 4,
        exit_layer: int | None = None,
        cascade: CascadeParams | None = None,
        tree: TreeShape | None = None,
    ):
        """`cascade` verifies every sequence against a speculative cascade (None: lossless); `tree` drafts token
        trees of that shape in place of chains of k."""
        self.engine = SpeculationEngine(target, drafter, k, exit_layer, tree=tree)
        self.spec = SpeculationSpec(cascade=cascade)  # every sequence's
        self.elapsed_s = 0.0  # wall time of the last `generate`

    @property
    def k(self) -> int:
        return self.engine.k

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[GenerationResult]:
        """Generate a continuation for each prompt, all sequences batched together."""
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise InvalidRequest(f"{len(prompts)} prompts but {len(params_list)} sampling parameter sets")
        started = time.perf_counter()
        results: dict = {}
        try:
            for prompt, p in zip(prompts, params_list):
                seq_id = self.engine.add(prompt, p, spec=self.spec)
                results[seq_id] = GenerationResult(list(prompt), [], "")
            while self.engine.num_live:
                for update in self.engine.step():
                    result = results[update.seq_id]
                    result.tokens.extend(update.new_tokens)
                    result.finish_reason = update.finish_reason or ""
                    result.stats = update.stats
        finally:
            self.engine.close()
        self.elapsed_s = time.perf_counter() - started
        return list(results.values())
