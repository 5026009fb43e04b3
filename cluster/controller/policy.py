"""SpeculationPolicy: per target, round telemetry in, the next speculation plan out.

Once per period the controller hands a target's new `RoundRecord`s to its
policy (`observe`) and pushes the plan it answers (`plan`, then
`engine.set_plan(plan.k, plan.exit_layer)`). Each arm seen in the period
yields one bandit reward: its goodput over the period, emitted tokens per
second of draft + verify time (summed before dividing, so one round that the
OS happened to stall weighs by its time, not as a tenth of the evidence).
Rounds shared by several arms (per-request overrides) cannot be split fairly
and teach nothing; records of arms outside the policy's set (e.g. a FIXED
request's exotic k) are left out too, while a FIXED request that happens to
use one of the arms counts.

The best arm depends on how many sequences share a round: verifying k + 1
tokens per row is nearly free for one sequence and costs real compute for
many (vLLM's `speculative_disable_by_batch_size` encodes the same fact as a
fixed threshold). So the policy keeps one bandit per batch bucket (1, 2-3,
4-7, 8-15, ... sequences per round): rewards of different batch sizes are
never compared, and when traffic moves to another bucket the plan comes from
what was learnt there, or from fresh exploration.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.telemetry import RoundRecord
from actors.trees import TreeLabel, TreeShape
from cluster.controller.bandit import BanditConfig, SlidingWindowUCB

Arm = tuple[int | None, int | TreeShape]  # (drafter exit, k) or (drafter exit, tree shape); OFF for plain decoding
OFF: Arm = (None, 0)


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exits: list[int] = Field([1, 2, 4], min_length=1, description="Drafter exits the policy may draft from.")
    ks: list[int] = Field(
        [1, 2, 4], min_length=1, description="Draft lengths the policy may use (each >= 1; 'off' is always an arm).")
    trees: list[TreeLabel] = Field(
        default_factory=list, description="Token-tree shapes the policy may use beside the chains (with every exit).")
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
    k: int  # 0: speculation off, plain decoding; a tree's nodes
    reason: str  # why, for humans (`specfleet status`)
    tree: TreeShape | None = None  # draft token trees of this shape; None: chains of k

    @property
    def arm(self) -> Arm:
        if not self.k:
            return OFF
        return (self.exit_layer, self.tree if self.tree is not None else self.k)

    @classmethod
    def of(cls, arm: Arm, reason: str) -> "Plan":
        exit_layer, draft = arm
        if isinstance(draft, TreeShape):
            return cls(exit_layer, draft.nodes, reason, draft)
        return cls(exit_layer, draft, reason)


class SpeculationPolicy:
    """Chooses (exit, k) or off for one target by sliding-window UCB bandits on goodput, one per batch bucket."""

    def __init__(self, config: PolicyConfig | None = None):
        self.config = config or PolicyConfig()
        trees = [TreeShape.parse(label) for label in self.config.trees]
        self.arms: list[Arm] = [OFF] + [(e, d) for e in self.config.exits for d in [*self.config.ks, *trees]]
        self.bandits: dict[int, SlidingWindowUCB] = {}  # batch bucket -> its bandit
        self.batch_bucket = 1  # of the latest round observed: the traffic the next plan is for
        self._known = set(self.arms)

    def bandit(self, bucket: int | None = None) -> SlidingWindowUCB:
        """The bandit of a batch bucket (default: the current one), created on first use."""
        bucket = self.batch_bucket if bucket is None else bucket
        if bucket not in self.bandits:
            self.bandits[bucket] = SlidingWindowUCB(self.arms, self.config.bandit)
        return self.bandits[bucket]

    def observe(self, records: Iterable[RoundRecord]) -> int:
        """One period's rounds: one reward per (batch bucket, arm) they used; returns how many records counted."""
        totals: dict[tuple[int, Arm], list] = {}  # (bucket, arm) -> [emitted, seconds, records]
        for record in records:
            self.batch_bucket = batch_bucket(record.round_sequences)
            arm = _arm_of(record)
            if record.whole_round and record.round_s > 0 and arm in self._known:
                total = totals.setdefault((self.batch_bucket, arm), [0, 0.0, 0])
                total[0] += record.emitted
                total[1] += record.round_s
                total[2] += 1
        for (bucket, arm), (emitted, seconds, _) in totals.items():
            self.bandit(bucket).update(arm, emitted / seconds)
        return sum(count for _, _, count in totals.values())

    def plan(self) -> Plan:
        """The plan for the next period (for the latest batch size seen), with the evidence behind it."""
        arm = self.bandit().select()
        return Plan.of(arm, self._reason(arm))

    def _reason(self, arm: Arm) -> str:
        bandit, batch = self.bandit(), _bucket_name(self.batch_bucket)
        counts = bandit.counts()
        if counts[arm] == 0:
            return f"exploring: {self._name(arm)} not measured yet at {batch}"
        means = bandit.means()
        best = max(means, key=means.get)
        text = f"{self._name(arm)}: {means[arm]:.0f} tok/s over its last {counts[arm]} periods at {batch}"
        if arm != best:
            text += f" (exploring; best measured {self._name(best)} at {means[best]:.0f} tok/s)"
        return text

    @staticmethod
    def _name(arm: Arm) -> str:
        if arm == OFF:
            return "off"
        exit_layer, draft = arm
        return f"exit {exit_layer} tree {draft.label}" if isinstance(draft, TreeShape) else f"exit {exit_layer} k {draft}"


def _arm_of(record: RoundRecord) -> Arm:
    if not record.k:
        return OFF
    return (record.exit_layer, TreeShape.parse(record.tree) if record.tree else record.k)


def batch_bucket(sequences: int) -> int:
    """The power of two at or below `sequences`: 1, 2-3 -> 2, 4-7 -> 4, ..."""
    return 1 << (max(sequences, 1).bit_length() - 1)


def _bucket_name(bucket: int) -> str:
    return "batch 1" if bucket == 1 else f"batch {bucket}-{2 * bucket - 1}"
