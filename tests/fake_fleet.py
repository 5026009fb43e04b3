"""A fleet without actors, for tests of what a front door checks before a request reaches one."""

from pathlib import Path

from cluster.config import parse_config
from cluster.frontend import Frontend
from cluster.placement import Fleet


def fleet_with(target_path: Path, server: dict) -> Fleet:
    """One target, "small", whose replica is a placeholder never called: such tests' requests are refused (or
    only list models) before any actor call."""
    config = parse_config({"pools": {"cpu": {}}, "targets": {"small": {"path": str(target_path), "pool": "cpu"}},
                           "server": {"grpc_port": 0, **server}})
    fleet = Fleet(config)
    fleet.targets["small"] = [object()]
    fleet.infos["small"] = [{"vocab_size": 1 << 20, "max_context": 256}]
    return fleet


class Source:
    """What the HTTP app reads its backend from (see cluster/serve/openai_api.py)."""

    def __init__(self, fleet: Fleet):
        self._frontend = Frontend(fleet)

    async def frontend(self) -> Frontend:
        return self._frontend

    async def metrics(self) -> tuple[bytes, str]:
        return b"specfleet_up 1\n", "text/plain"

    async def ready(self) -> bool:
        return True
