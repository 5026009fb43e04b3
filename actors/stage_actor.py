"""StageActor: the middle model of a staged chain, served as a drafter.

It hosts a `StagedDrafter` (the middle model, speculating with the next model
down the chain through `RemoteDrafter`) behind the remote interface of
`DrafterActor` (info, check_exit, start, propose(commits, requests), finish),
so the target above it reaches it with an unchanged `RemoteDrafter`, and
chains nest: a stage's inner drafter may itself be a stage. Concurrent calls
from several target replicas are merged by a `DraftBatcher`.
"""

from collections.abc import Sequence
from dataclasses import replace

import ray

from actors.draft_batcher import DraftBatcher
from actors.drafters import Draft, DraftRequest
from actors.engine import SpeculationStats
from actors.ray_actors import RemoteDrafter
from actors.runner import ModelRunner, SeqId
from actors.sampling import SamplingParams
from actors.staged import StagedDrafter


class StageActor:
    """A middle model drafting for the next model up its chain (wrapped with `ray.remote` at placement)."""

    def __init__(self, path: str, dtype: str, device: str, inner_handle, inner_k: int, timeout_s: float):
        runner = ModelRunner.from_pretrained(path, dtype, device)
        self.inner_info = ray.get(inner_handle.info.remote())
        inner = RemoteDrafter(inner_handle, self.inner_info, timeout_s)
        self.batcher = DraftBatcher(StagedDrafter(runner, inner, inner_k))

    def info(self) -> dict:
        """As `DrafterActor.info`; the exits are the innermost drafter's, which the chain's requests choose among."""
        runner = self.batcher.drafter.middle
        return {"vocab_size": runner.vocab_size, "exit_layers": self.inner_info["exit_layers"],
                "max_context": runner.max_context, "node_id": ray.get_runtime_context().get_node_id()}

    def check_exit(self, exit_layer: int) -> None:
        self.batcher.drafter.check_exit(exit_layer)

    def start(self, seq_id: SeqId, prompt: list[int], params: SamplingParams) -> None:
        self.batcher.start(seq_id, prompt, params)

    def propose(self, commits: list[tuple[SeqId, list[int]]], requests: Sequence[DraftRequest]) -> list[Draft]:
        """Apply the caller's pending commits, then stage drafts (batched with other callers)."""
        for seq_id, emitted in commits:
            self.batcher.commit(seq_id, emitted)
        return self.batcher.propose(requests)

    def finish(self, seq_ids: list[SeqId]) -> None:
        for seq_id in seq_ids:
            self.batcher.finish(seq_id)

    def live_sequences(self) -> int:
        return self.batcher.drafter.middle.num_sequences

    def batched_forwards(self) -> int:
        return self.batcher.forwards

    def stats(self) -> SpeculationStats:
        """The middle stage's own speculation: what the inner drafter drafted and the middle model accepted."""
        return replace(self.batcher.drafter.stats)
