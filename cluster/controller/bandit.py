"""A UCB bandit whose arms forget, for choosing speculation settings online.

After BanditSpec (Hou et al., ICML 2025; its UCBSpec picks the speculative
decoding configuration by UCB on measured throughput), with two changes for
serving, where rewards are tokens per second and traffic shifts:

- **Scale-free rewards.** Means and noise are measured relative to the best
  arm's mean, so the same exploration constant fits 50 tok/s on a CPU and
  5,000 tok/s on a GPU. The bonus of arm i is
  `exploration * noise * sqrt(2 ln t / n_i)`, with `noise` the standard
  deviation of rewards estimated from successive differences within each
  arm's window (floored at `min_noise`), which a level shift barely inflates:
  a quiet machine explores little, a noisy one more.
- **Sliding windows and restarts at detected changes.** Each arm keeps only
  its last `window` rewards. When an arm's rewards split into older ones and
  at least `change_window` newer ones whose means differ by more than
  `change_threshold` standard errors, the workload (or the machine) has
  changed: every reward older than the likeliest change point is dropped,
  from every arm, since they all served the same traffic on the same
  hardware. Arms left without rewards are tried
  again, and the bandit settles on the new best arm within a few dozen pulls
  instead of waiting for stale means to age out. A change that raises or
  lowers every arm alike (a bigger batch, a busier machine) is handled the
  same way. In a stationary stream the test almost never fires, so regret
  stays UCB's logarithmic one.
"""

import math
from collections import deque
from collections.abc import Hashable, Sequence

from pydantic import BaseModel, ConfigDict, Field


class BanditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: int = Field(
        64, ge=2, description="Rewards kept per arm; older ones are forgotten so estimates follow a shifting workload.")
    exploration: float = Field(
        1.0, ge=0, description="Width of the confidence bonus, in noise standard deviations (UCB's c).")
    min_noise: float = Field(
        0.02, gt=0, description="Floor of the noise estimate, relative to the best mean, so exploration never stops.")
    change_window: int = Field(
        8, ge=2, description="Fewest newest rewards of an arm that can reveal a change against its older ones.")
    change_threshold: float = Field(
        5.0, gt=0, description="Difference of means, in standard errors, taken as a change (older rewards dropped).")


class SlidingWindowUCB:
    """UCB over a fixed set of arms on each arm's last `window` rewards."""

    def __init__(self, arms: Sequence[Hashable], config: BanditConfig | None = None):
        if not arms:
            raise ValueError("a bandit needs at least one arm")
        if len(set(arms)) != len(arms):
            raise ValueError(f"arms must be distinct, got {list(arms)}")
        self.arms = list(arms)
        self.config = config or BanditConfig()
        self._window: dict[Hashable, deque[tuple[int, float]]] = {arm: self._deque() for arm in self.arms}  # (pull, reward)
        self.pulls = 0  # rewards received over the bandit's life: the t of UCB's ln t
        self.restarts = 0  # changes detected

    def update(self, arm: Hashable, reward: float) -> None:
        if arm not in self._window:
            raise ValueError(f"unknown arm {arm!r}; arms are {self.arms}")
        if not math.isfinite(reward) or reward < 0:
            raise ValueError(f"rewards must be finite and >= 0, got {reward}")
        self._window[arm].append((self.pulls, reward))
        self.pulls += 1
        self._restart_at_change(arm)

    def select(self) -> Hashable:
        """The arm to play next: every arm once in order, then the highest upper confidence bound."""
        untried = [arm for arm in self.arms if not self._window[arm]]
        if untried:
            return untried[0]
        indices = self.indices()
        return max(self.arms, key=lambda arm: indices[arm])

    def means(self) -> dict[Hashable, float]:
        """Mean reward over each tried arm's window, in the rewards' own units."""
        return {arm: sum(r for _, r in w) / len(w) for arm, w in self._window.items() if w}

    def counts(self) -> dict[Hashable, int]:
        """Rewards each arm holds in its window."""
        return {arm: len(w) for arm, w in self._window.items()}

    def indices(self) -> dict[Hashable, float]:
        """Upper confidence bound of each tried arm, relative to the best mean (best mean = 1)."""
        means = self.means()
        scale = max(means.values())
        if scale <= 0:  # nothing has produced any reward yet: every tried arm ties
            return {arm: 0.0 for arm in means}
        noise = max(self._noise() / scale, self.config.min_noise)
        log_t = math.log(max(self.pulls, 2))
        return {
            arm: mean / scale + self.config.exploration * noise * math.sqrt(2 * log_t / len(self._window[arm]))
            for arm, mean in means.items()
        }

    def _deque(self, items=()) -> deque:
        return deque(items, maxlen=self.config.window)

    def _restart_at_change(self, arm: Hashable) -> None:
        """If the arm's rewards split into an older and a newer part (at least `change_window` long)
        whose means differ by more than `change_threshold` standard errors, forget every arm's
        rewards from before the likeliest change point."""
        window, recent = self._window[arm], self.config.change_window
        if len(window) <= recent:
            return
        rewards = [r for _, r in window]
        noise = max(self._noise(), self.config.min_noise * max(self.means().values()))
        confident = range(1, len(rewards) - recent + 1)  # splits leaving `recent` newer rewards
        if max(_split_score(rewards, split) for split in confident) <= self.config.change_threshold * noise:
            return
        # The change may be younger than `recent` rewards: place it among all splits leaving two or more.
        split = max(range(1, len(rewards) - 1), key=lambda split: _split_score(rewards, split))
        changed_at = window[split][0]
        for each in self.arms:
            self._window[each] = self._deque((t, r) for t, r in self._window[each] if t >= changed_at)
        self.restarts += 1

    def _noise(self) -> float:
        """Standard deviation of one reward, from successive differences within each arm's window.

        sqrt(mean((r_i - r_(i-1))^2) / 2) estimates the noise of a stationary stream, and a
        change point adds only one large difference, where deviations from the mean would
        all grow with the size of the change.
        """
        squares, count = 0.0, 0
        for window in self._window.values():
            rewards = [r for _, r in window]
            squares += sum((b - a) ** 2 for a, b in zip(rewards, rewards[1:]))
            count += max(len(rewards) - 1, 0)
        return math.sqrt(squares / (2 * count)) if count else 0.0


def _split_score(rewards: list[float], split: int) -> float:
    """|mean after - mean before| / sqrt(1 / n_before + 1 / n_after): the two-sample z statistic times the noise."""
    before, after = rewards[:split], rewards[split:]
    gap = abs(sum(after) / len(after) - sum(before) / len(before))
    return gap / math.sqrt(1 / len(before) + 1 / len(after))
