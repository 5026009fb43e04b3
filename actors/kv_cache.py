"""Per-sequence key/value cache with an explicit, exact rollback rule.

Rollback rule: **crop by length**. A sequence's cache is a buffer indexed by
token position plus a length; `truncate(n)` only lowers the length, and the next
forward writes its keys and values at positions n, n+1, ... over whatever a
rejected draft left there. Nothing past the length is ever read (the attention
mask stops at it), so rollback costs O(1) and leaves the cache bit-identical to
one that never saw the rejected tokens.

A multi-exit drafter may run a sequence through only its first L layers. The
cache records that depth: layers at or past it are stale for this sequence.
"""

from dataclasses import dataclass, field

import torch


@dataclass
class SequenceCache:
    """Keys and values of every token a model has seen for one sequence."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    tokens: list[int] = field(default_factory=list)  # the tokens whose K/V are cached, in order
    depth: int = 0  # layers whose cache covers every token in `tokens`
    keys: torch.Tensor | None = None  # [layers, kv_heads, capacity, head_dim]
    values: torch.Tensor | None = None  # [layers, kv_heads, capacity, head_dim]

    def __len__(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> None:
        """Forget every token from position `length` on (the rollback)."""
        if not 0 <= length <= len(self.tokens):
            raise ValueError(f"cannot truncate a cache of {len(self.tokens)} tokens to {length}")
        del self.tokens[length:]

    def keep_common_prefix(self, tokens: list[int], start: int = 0) -> None:
        """Roll back to the longest prefix shared with `tokens`, the sequence's true context.

        Positions before `start` are known to agree. A cached token equal to the
        context token at its position is kept even if it was a draft: its keys
        depend only on the tokens up to it, so they are already right.
        """
        end = min(len(self.tokens), len(tokens))
        keep = start
        while keep < end and self.tokens[keep] == tokens[keep]:
            keep += 1
        self.truncate(keep)

    def reset(self, depth: int) -> None:
        """Forget everything, e.g. before re-prefilling deeper than the cache reaches."""
        self.tokens.clear()
        self.depth = depth

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached keys and values of one layer, each [kv_heads, len, head_dim]."""
        if self.keys is None:
            empty = torch.empty(self.num_kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
            return empty, empty
        return self.keys[layer, :, : len(self)], self.values[layer, :, : len(self)]

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store one layer's keys/values [kv_heads, n, head_dim] at positions start..start+n."""
        end = start + keys.shape[1]
        self._ensure_capacity(end)
        self.keys[layer, :, start:end] = keys
        self.values[layer, :, start:end] = values

    def extend(self, tokens: list[int], depth: int) -> None:
        """Record that `tokens` were written to layers [0, depth)."""
        self.tokens.extend(tokens)
        self.depth = depth

    def _ensure_capacity(self, needed: int) -> None:
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, 64)  # doubling keeps appends amortised O(1)
        shape = (self.num_layers, self.num_kv_heads, new_capacity, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.keys is not None:
            keys[:, :, :capacity] = self.keys
            values[:, :, :capacity] = self.values
        self.keys, self.values = keys, values
