"""SpeculationPolicy: per target, round telemetry in, the next speculation plan out.

The controller feeds a target's `RoundRecord`s to its policy and, once per
period, asks for the plan to push (`engine.set_plan(plan.k, plan.exit_layer)`).
Each record of a round that one arm had to itself is one bandit reward: its
goodput, emitted tokens per second of draft + verify time. Rounds shared by
several arms (per-request overrides) cannot be split fairly and teach nothing;
records of arms outside the policy's set (e.g. a FIXED request's exotic k) are
left out too, while a FIXED request that happens to use one of the arms counts.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.telemetry import RoundRecord
from cluster.controller.bandit import BanditConfig, SlidingWindowUCB

Arm = tuple[int | None, int]  # (drafter exit, k); OFF for plain decoding
OFF: Arm = (None, 0)


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exits: list[int] = Field([1, 2, 4], min_length=1, description="Drafter exits the policy may draft from.")
    ks: list[int] = Field([1, 2, 4], min_length=1, description="Draft lengths the policy may use (each >= 1; 'off' is always an arm).")
    bandit: BanditConfig = Field(default_factory=BanditConfig, description="The bandit's window and exploration.")

    @field_validator("exits", "ks")
    @classmethod
    def _positive_and_distinct(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"must be distinct integers >= 1, got {values}")
        return values


@dataclass(frozen=True)
class Plan:
    """What a target's plan-following sequences should speculate with."""

    exit_layer: int | None  # None when off
    k: int  # 0: speculation off, plain decoding
    reason: str  # why, for humans (`specfleet status`)

    @property
    def arm(self) -> Arm:
        return (self.exit_layer, self.k) if self.k else OFF


class SpeculationPolicy:
    """Chooses (exit, k) or off for one target by a sliding-window UCB bandit on goodput."""

    def __init__(self, config: PolicyConfig | None = None):
        self.config = config or PolicyConfig()
        self.arms: list[Arm] = [OFF] + [(e, k) for e in self.config.exits for k in self.config.ks]
        self.bandit = SlidingWindowUCB(self.arms, self.config.bandit)
        self._known = set(self.arms)

    def observe(self, records: Iterable[RoundRecord]) -> int:
        """Turn rounds into rewards; returns how many were used."""
        used = 0
        for record in records:
            arm = (record.exit_layer, record.k) if record.k else OFF
            if record.whole_round and record.round_s > 0 and arm in self._known:
                self.bandit.update(arm, record.goodput)
                used += 1
        return used

    def plan(self) -> Plan:
        """The plan for the next period, with the evidence behind it."""
        exit_layer, k = arm = self.bandit.select()
        return Plan(exit_layer, k, self._reason(arm))

    def _reason(self, arm: Arm) -> str:
        counts = self.bandit.counts()
        if counts[arm] == 0:
            return f"exploring: {self._name(arm)} not measured yet"
        means = self.bandit.means()
        best = max(means, key=means.get)
        text = f"{self._name(arm)}: {means[arm]:.0f} tok/s over its last {counts[arm]} rounds"
        if arm != best:
            text += f" (exploring; best measured {self._name(best)} at {means[best]:.0f} tok/s)"
        return text

    @staticmethod
    def _name(arm: Arm) -> str:
        return "off" if arm == OFF else f"exit {arm[0]} k {arm[1]}"
