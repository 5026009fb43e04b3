"""A UCB bandit whose arms forget, for choosing speculation settings online.

After BanditSpec (Hou et al., ICML 2025; its UCBSpec picks the speculative
decoding configuration by UCB on measured throughput), with two changes for
serving, where rewards are tokens per second and traffic shifts:

- **Scale-free rewards.** Means and noise are measured relative to the best
  arm's mean, so the same exploration constant fits 50 tok/s on a CPU and
  5,000 tok/s on a GPU. The bonus of arm i is
  `exploration * noise * sqrt(2 ln t / n_i)`, with `noise` the pooled standard
  deviation of rewards around their arm's mean (floored at `min_noise`): a
  quiet machine explores little, a noisy one more.
- **Per-arm sliding windows with change detection.** Each arm keeps only its
  last `window` rewards, and when its newest `change_window` rewards differ
  from the older ones by more than `change_threshold` standard errors, the
  rewards before the likeliest change point are dropped at once: after a
  shift the arm being played shows its new mean within a few pulls, and a
  stale arm is corrected by a few pulls too. An idle arm that *improves* is
  found again by UCB's slowly growing bonus. In a stationary stream the test
  almost never fires, so regret stays UCB's logarithmic one.
"""

import math
from collections import deque
from collections.abc import Hashable, Sequence

from pydantic import BaseModel, ConfigDict, Field


class BanditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: int = Field(64, ge=2, description="Rewards kept per arm; older ones are forgotten so estimates follow a shifting workload.")
    exploration: float = Field(1.0, ge=0, description="Width of the confidence bonus, in noise standard deviations (UCB's c).")
    min_noise: float = Field(0.02, gt=0, description="Floor of the noise estimate, relative to the best mean, so exploration never stops entirely.")
    change_window: int = Field(8, ge=2, description="Newest rewards of an arm compared with its older ones to detect a change.")
    change_threshold: float = Field(4.0, gt=0, description="Difference of means, in standard errors, taken as a change (older rewards dropped).")


class SlidingWindowUCB:
    """UCB over a fixed set of arms on each arm's last `window` rewards."""

    def __init__(self, arms: Sequence[Hashable], config: BanditConfig | None = None):
        if not arms:
            raise ValueError("a bandit needs at least one arm")
        if len(set(arms)) != len(arms):
            raise ValueError(f"arms must be distinct, got {list(arms)}")
        self.arms = list(arms)
        self.config = config or BanditConfig()
        self._rewards = {arm: deque(maxlen=self.config.window) for arm in self.arms}
        self.pulls = 0  # rewards received over the bandit's life: the t of UCB's ln t

    def update(self, arm: Hashable, reward: float) -> None:
        if arm not in self._rewards:
            raise ValueError(f"unknown arm {arm!r}; arms are {self.arms}")
        if not math.isfinite(reward) or reward < 0:
            raise ValueError(f"rewards must be finite and >= 0, got {reward}")
        self._rewards[arm].append(reward)
        self.pulls += 1
        self._forget_before_change(arm)

    def select(self) -> Hashable:
        """The arm to play next: every arm once in order, then the highest upper confidence bound."""
        untried = [arm for arm in self.arms if not self._rewards[arm]]
        if untried:
            return untried[0]
        indices = self.indices()
        return max(self.arms, key=lambda arm: indices[arm])

    def means(self) -> dict[Hashable, float]:
        """Mean reward over each tried arm's window, in the rewards' own units."""
        return {arm: sum(r) / len(r) for arm, r in self._rewards.items() if r}

    def counts(self) -> dict[Hashable, int]:
        """Rewards each arm holds in its window."""
        return {arm: len(r) for arm, r in self._rewards.items()}

    def indices(self) -> dict[Hashable, float]:
        """Upper confidence bound of each tried arm, relative to the best mean (best mean = 1)."""
        means = self.means()
        scale = max(means.values())
        if scale <= 0:  # nothing has produced any reward yet: every tried arm ties
            return {arm: 0.0 for arm in means}
        noise = max(self._pooled_std(means) / scale, self.config.min_noise)
        log_t = math.log(max(self.pulls, 2))
        return {
            arm: mean / scale + self.config.exploration * noise * math.sqrt(2 * log_t / len(self._rewards[arm]))
            for arm, mean in means.items()
        }

    def _forget_before_change(self, arm: Hashable) -> None:
        """Drop an arm's older rewards when its newest ones tell another story (a two-sample z-test)."""
        rewards, recent = list(self._rewards[arm]), self.config.change_window
        if len(rewards) < 2 * recent:
            return
        older, newer = rewards[:-recent], rewards[-recent:]
        means = self.means()
        noise = max(self._pooled_std(means), self.config.min_noise * max(means.values()))
        gap = abs(sum(newer) / len(newer) - sum(older) / len(older))
        if gap > self.config.change_threshold * noise * math.sqrt(1 / len(older) + 1 / len(newer)):
            start = max(range(len(older), len(rewards)), key=lambda split: _split_score(rewards, split))
            self._rewards[arm] = deque(rewards[start:], maxlen=self.config.window)

    def _pooled_std(self, means: dict[Hashable, float]) -> float:
        """Standard deviation of rewards around their own arm's mean, all windows pooled."""
        squares = sum((r - means[arm]) ** 2 for arm in means for r in self._rewards[arm])
        degrees = sum(len(self._rewards[arm]) - 1 for arm in means)
        return math.sqrt(squares / degrees) if degrees > 0 else 0.0


def _split_score(rewards: list[float], split: int) -> float:
    """How well `split` separates two means (the CUSUM statistic): |mean after - mean before| * sqrt(n_a n_b / n)."""
    before, after = rewards[:split], rewards[split:]
    gap = abs(sum(after) / len(after) - sum(before) / len(before))
    return gap * math.sqrt(len(before) * len(after) / len(rewards))
