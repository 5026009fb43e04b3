"""How the front doors talk to the fleet controller.

The handle is a Serve `DeploymentHandle` inside the Serve app, or a Ray actor
handle elsewhere; both return awaitables from `.method.remote(...)`.
"""

import asyncio
import logging
import uuid
from collections.abc import Sequence

from cluster.admission import LOAD_SYNC_S, ConcurrencyLimits
from cluster.frontend import Frontend
from cluster.placement import Fleet
from specfleet.v1 import generation_pb2 as pb

log = logging.getLogger(__name__)

FLEET_REFRESH_S = 1.0  # how often a front door checks whether the controller changed the fleet, and its readiness


class ControllerClient:
    def __init__(self, handle):
        self.handle = handle
        self._tasks: list[asyncio.Task] = []  # kept referenced: the loop holds its tasks only weakly
        self._frontend: asyncio.Task | None = None

    async def fleet(self) -> Fleet:
        _, fleet = await self.handle.snapshot.remote()
        return fleet

    async def frontend(self) -> Frontend:
        """This client's one `Frontend` over the controller's fleet, which follows its replacements and new
        replicas and shares its requests in flight with the other front doors' (both doors of one replica use it).

        Concurrent first calls share one creation: each creation starts its own loops polling the controller
        (fleet version, load), and a burst of 16 streams once left 16 pairs of them running, which took 0.2
        cores in the front door and as much in the controller, idle or not.
        """
        if self._frontend is None:
            self._frontend = asyncio.get_running_loop().create_task(self._new_frontend())
        creation = self._frontend
        try:
            return await asyncio.shield(creation)
        except Exception:
            if self._frontend is creation:
                self._frontend = None  # the controller was unreachable: the next call tries again
            raise

    async def _new_frontend(self) -> Frontend:
        version, fleet = await self.handle.snapshot.remote()
        frontend = Frontend(fleet, self, healing=True)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow(frontend, version)), loop.create_task(self._share_load(frontend.in_flight))]
        return frontend

    def observe_request(self, target: str, outcome: str, latency_s: float, first_token_s: float | None,
                        token_gaps_s: Sequence[float]) -> None:
        """Report a finished request (fire and forget: metrics must not slow requests down)."""
        self.handle.observe_request.remote(target, outcome, latency_s, first_token_s, list(token_gaps_s))

    async def stats(self) -> pb.GetStatsResponse:
        return await self.handle.stats.remote()

    async def metrics(self) -> tuple[bytes, str]:
        return await self.handle.metrics_text.remote()

    async def ready(self) -> bool:
        return await self.handle.ready.remote()

    async def _follow(self, frontend: Frontend, version: int) -> None:
        while True:
            await asyncio.sleep(FLEET_REFRESH_S)
            try:
                latest = await self.handle.version.remote()
                if latest != version:
                    version, fleet = await self.handle.snapshot.remote()
                    frontend.use_fleet(fleet)
            except Exception:  # the controller restarting must not end the watch
                log.warning("cannot reach the fleet controller; keeping the current fleet", exc_info=True)

    async def _share_load(self, in_flight: ConcurrencyLimits) -> None:
        """Report this door's requests in flight and take the other doors' (`cluster.admission`)."""
        door = uuid.uuid4().hex
        while True:
            try:
                in_flight.others = await self.handle.report_load.remote(door, in_flight.own())
            except Exception:  # noqa: BLE001 - keep the others' last counts while the controller restarts
                log.debug("cannot share the load with the fleet controller", exc_info=True)
            await asyncio.sleep(LOAD_SYNC_S)
