"""Pairing target replicas with drafter replicas by measured drafting load.

Each target replica drafts with one replica of its drafter model. Placement
pairs them round-robin; traffic then decides what each pairing costs: a
target serving many sequences at a large k asks its drafter for far more
tokens than an idle one. Every control period the controller measures each
target replica's drafted tokens per second (`DraftLoad`) and, per drafter
model, moves at most one target replica from the busiest drafter replica to
the idlest (`best_move`) when that narrows their gap. A move restarts the
replica's live sequences on the new drafter (they replay what they have
emitted), so moves wait for a clear imbalance rather than chase noise.
"""

from collections.abc import Hashable, Mapping

ReplicaKey = Hashable  # a target replica, e.g. (target name, replica index)


class DraftLoad:
    """Drafted tokens per second of each target replica, smoothed over control periods."""

    def __init__(self, smoothing: float):
        """`smoothing` in [0, 1): the weight kept by the previous estimate at each period."""
        self.smoothing = smoothing
        self._rates: dict[ReplicaKey, float] = {}

    def observe(self, key: ReplicaKey, drafted: int, seconds: float) -> None:
        """One period of a target replica: `drafted` draft tokens in `seconds`."""
        if seconds <= 0:
            return
        rate = drafted / seconds
        previous = self._rates.get(key)
        self._rates[key] = rate if previous is None else self.smoothing * previous + (1 - self.smoothing) * rate

    def of(self, key: ReplicaKey) -> float:
        return self._rates.get(key, 0.0)

    def forget(self, key: ReplicaKey) -> None:
        self._rates.pop(key, None)


def drafter_loads(pairing: Mapping[ReplicaKey, int], loads: Mapping[ReplicaKey, float], replicas: int) -> list[float]:
    """Summed load of the target replicas paired with each drafter replica."""
    totals = [0.0] * replicas
    for key, drafter in pairing.items():
        totals[drafter] += loads.get(key, 0.0)
    return totals


def best_move(pairing: Mapping[ReplicaKey, int], loads: Mapping[ReplicaKey, float], replicas: int,
              margin: float) -> tuple[ReplicaKey, int] | None:
    """The target replica to move to another drafter replica, and where; None when balanced enough.

    Only when the busiest drafter replica carries more than the idlest by over
    `margin` of the busiest's load. Moving load l between them lowers the pair's
    maximum exactly when 0 < l < their gap; the move picked brings the two
    closest to even (l nearest half the gap).
    """
    if replicas < 2:
        return None
    totals = drafter_loads(pairing, loads, replicas)
    busiest, idlest = totals.index(max(totals)), totals.index(min(totals))
    gap = totals[busiest] - totals[idlest]
    if gap <= 0 or gap <= margin * totals[busiest]:
        return None
    movable = [key for key, drafter in pairing.items() if drafter == busiest and 0 < loads.get(key, 0.0) < gap]
    if not movable:
        return None
    key = min(movable, key=lambda key: abs(loads[key] - gap / 2))
    return key, idlest
