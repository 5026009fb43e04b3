"""Concurrency limits across the fleet's front doors: in flight in all, and per API key.

Each front door counts its own requests in flight (all of them and per key). Its
controller client reports those counts to the fleet controller every
`LOAD_SYNC_S` and gets back what the other front doors reported
(`FleetLoad`), so a door admits a request only while its own count plus the
others' stays under the limit. No request waits for a Ray call; the price is
staleness: within one sync period a burst that reaches several doors at once
may pass the limit by what the other doors admitted meanwhile. A door whose
reports stop (dead, or cut off) drops out of the totals after `LOAD_REPORT_TTL_S`;
a door that cannot reach the controller keeps the others' last totals.

Keys are counted by fingerprint (`cluster.auth.key_fingerprint`), never by
their text; requests without a key (authentication off) count only towards
the fleet total.
"""

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from actors.errors import SpecfleetError

LOAD_SYNC_S = 0.25  # how often a front door reports its counts and reads the others'
LOAD_REPORT_TTL_S = 3.0  # a front door silent this long no longer counts


class Overloaded(SpecfleetError):
    """Too many requests in flight (RESOURCE_EXHAUSTED / 429)."""


@dataclass(frozen=True)
class DoorLoad:
    """One front door's requests in flight: in all, and per key fingerprint."""

    total: int = 0
    per_key: dict[str, int] = field(default_factory=dict)


class ConcurrencyLimits:
    """A front door's admission counters, checked against the fleet's limits."""

    def __init__(self, max_total: int, max_per_key: int | None):
        self.max_total = max_total
        self.max_per_key = max_per_key
        self._total = 0
        self._per_key: Counter[str] = Counter()
        self.others = DoorLoad()  # what the other front doors last reported

    def check(self, key: str | None) -> None:
        """Raise `Overloaded` (saying which limit, never whose key) if one more request of `key` is too many."""
        if self._total + self.others.total >= self.max_total:
            raise Overloaded("too many requests in flight on this fleet; retry later")
        if key is not None and self.max_per_key is not None:
            if self._per_key[key] + self.others.per_key.get(key, 0) >= self.max_per_key:
                raise Overloaded(f"this API key has {self.max_per_key} requests in flight, its limit; retry later")

    def acquire(self, key: str | None) -> None:
        """Count one more request of `key`, or raise `Overloaded`; each acquire is matched by one `release`."""
        self.check(key)
        self._total += 1
        if key is not None:
            self._per_key[key] += 1

    def release(self, key: str | None) -> None:
        self._total -= 1
        if key is not None:
            self._per_key[key] -= 1
            if not self._per_key[key]:
                del self._per_key[key]

    def own(self) -> DoorLoad:
        return DoorLoad(self._total, dict(self._per_key))


class FleetLoad:
    """The controller's view of every front door's counts (kept by the controller, read by the doors)."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()  # doors report concurrently
        self._reports: dict[str, tuple[float, DoorLoad]] = {}

    def report(self, door: str, load: DoorLoad) -> DoorLoad:
        """Record `door`'s counts; return the sum of the other live doors' counts."""
        now = self._clock()
        with self._lock:
            self._reports[door] = (now, load)
            self._reports = {name: (at, seen) for name, (at, seen) in self._reports.items()
                             if now - at <= LOAD_REPORT_TTL_S}
            others = [seen for name, (_, seen) in self._reports.items() if name != door]
        per_key: Counter[str] = Counter()
        for seen in others:
            per_key.update(seen.per_key)
        return DoorLoad(sum(seen.total for seen in others), dict(per_key))
