"""StageActor: the middle model of a staged chain, served as a drafter.

It hosts a `StagedDrafter` (the middle model, speculating with the next model
down the chain through a `RemoteDrafter`) behind the remote interface of
`DrafterActor` (info, check_exit, start, propose(commits, requests), finish),
so the target above it reaches it with an unchanged `RemoteDrafter`, and
chains nest: a stage's inner drafter may itself be a stage. Concurrent calls
from several target replicas are merged by a `DraftBatcher`.
"""

from dataclasses import replace

from actors.draft_batcher import DraftBatcher
from actors.engine import SpeculationStats
from actors.ray_actors import DraftService, connect_drafter
from actors.runner import RunnerSettings
from actors.staged import StagedDrafter


class StageActor(DraftService):
    """A middle model drafting for the next model up its chain (wrapped with `ray.remote` at placement).

    Its exits are the innermost drafter's, which the chain's requests choose among.
    """

    def __init__(self, path: str, settings: RunnerSettings, inner_handle, inner_k: int, timeout_s: float,
                 direct_drafter: bool = False):
        """`direct_drafter`: reach an inner drafter on this machine through its loopback channel."""
        super().__init__()
        self.runner = self.load_runner(path, settings)
        inner = connect_drafter(inner_handle, timeout_s, direct_drafter)
        self.exit_layers, self.max_exit = inner.exit_layers, inner.max_exit
        self.batcher = DraftBatcher(StagedDrafter(self.runner, inner, inner_k))

    def stats(self) -> SpeculationStats:
        """The middle stage's own speculation: what the inner drafter drafted and the middle model accepted."""
        return replace(self.batcher.drafter.stats)
