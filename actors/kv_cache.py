"""The KV store of one model replica, and each sequence's view of it, with an exact rollback rule.

Storage: **one preallocated store per model replica** (`KVStore`), keys and
values of every layer for a fixed number of *slots*, each slot a sequence's
positions 0..capacity. A sequence takes a slot when it is added and gives it
back when it is freed; a forward writes keys and values at their positions
(`index_put_`) and reads each row's slot in place of any per-sequence gather.
Nothing is allocated while serving, so a freed slot's next owner sees exactly
what a fresh replica would (it never reads a position it has not written).

Rollback rule: **crop by length**. A sequence's cache is its slot plus a
length (`SequenceCache`); `truncate(n)` only lowers the length, and the next
forward writes its keys and values at positions n, n+1, ... over whatever a
rejected draft left there. Nothing past the length is ever read (the causal
mask stops at each query's position), so rollback costs O(1) and leaves the
cache bit-identical to one that never saw the rejected tokens.

A multi-exit drafter may run a sequence through only its first L layers. The
cache records that depth: layers at or past it are stale for this sequence.
"""

from dataclasses import dataclass, field

import torch

from actors.errors import CapacityExhausted


class KVStore:
    """Keys and values for `num_slots` sequences of one model: per layer [slots + 1, positions, kv_heads, head_dim].

    One tensor per layer, not one for all: a compiled step then writes each in
    place, where a write into a view of one big tensor makes inductor copy all of it.

    The extra last slot is scratch: rows that only pad a batch up to its bucket
    write there. `positions` covers the context plus the widest padded query, so
    a padded token past a row's context still has somewhere to go.
    """

    def __init__(self, num_layers: int, num_slots: int, positions: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_slots + 1, positions, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.positions = num_slots, positions
        self.scratch_slot = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # popped from the end: lowest slot first

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def take(self) -> int:
        """A free slot for a new sequence, or `CapacityExhausted`."""
        if not self._free:
            raise CapacityExhausted(f"all {self.num_slots} sequence slots are in use: retry when one finishes")
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    def copy_prefix(self, source: int, destination: int, length: int, depth: int) -> None:
        """Copy positions [0, length) of the first `depth` layers' keys/values from one slot to another."""
        for cache in (*self.keys[:depth], *self.values[:depth]):
            cache[destination, :length] = cache[source, :length]

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store new keys/values [B, T, Hkv, D] at (slot, position): slots [B], positions [B, T] long."""
        index = (slots[:, None], positions)  # broadcast to [B, T]
        self.keys[layer].index_put_(index, keys)
        self.values[layer].index_put_(index, values)

    def write_and_read(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                       values: torch.Tensor, key_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values [B, T, Hkv, D] at (slot, position), then read each row's first `key_length` positions.

        slots [B], positions [B, T] long. Returns keys, values, each [B, Hkv, key_length, D].
        """
        self.write(layer, slots, positions, keys, values)
        rows = self.keys[layer][slots, :key_length], self.values[layer][slots, :key_length]  # each [B, K, Hkv, D]
        return rows[0].transpose(1, 2), rows[1].transpose(1, 2)

    def move(self, slot: int, sources: list[int], destinations: list[int]) -> None:
        """Copy one slot's keys/values from positions `sources` to `destinations`, every layer (tree compaction).

        One indexed copy per layer; the sources are read in full before any destination is written.
        """
        source, destination = torch.tensor(sources), torch.tensor(destinations)
        for cache in (*self.keys, *self.values):
            cache[slot, destination.to(cache.device)] = cache[slot, source.to(cache.device)]


@dataclass
class SequenceCache:
    """One sequence's place in a `KVStore`: its slot and the tokens whose keys/values it holds."""

    slot: int
    tokens: list[int] = field(default_factory=list)  # the tokens whose K/V are cached, in order
    depth: int = 0  # layers whose cache covers every token in `tokens`
    linear: int = 0  # leading tokens written as a chain, each at its own position (not a token tree's region)

    def __len__(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> None:
        """Forget every token from position `length` on (the rollback)."""
        if not 0 <= length <= len(self.tokens):
            raise ValueError(f"cannot truncate a cache of {len(self.tokens)} tokens to {length}")
        del self.tokens[length:]
        self.linear = min(self.linear, length)

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

    def keep_path(self, region_start: int, path: list[int]) -> list[tuple[int, int]]:
        """Keep the prefix before `region_start` and the region entries at offsets `path` (ascending), moved
        up to follow it; forget the rest. Returns the (from, to) positions whose keys/values must move."""
        region = len(self.tokens) - region_start
        if region < 0 or path != sorted(set(path)) or any(not 0 <= offset < region for offset in path):
            raise ValueError(f"path {path} does not lie in a region of {region} entries")
        moves = [(region_start + offset, region_start + i) for i, offset in enumerate(path) if offset != i]
        kept = [self.tokens[region_start + offset] for offset in path]
        self.tokens[region_start:] = kept
        if self.linear >= region_start:  # a path's tokens saw their ancestors at their depths: a chain's keys
            self.linear = len(self.tokens)
        return moves

    def reset(self, depth: int) -> None:
        """Forget everything, e.g. before re-prefilling deeper than the cache reaches."""
        self.tokens.clear()
        self.depth = depth
        self.linear = 0

    def extend(self, tokens: list[int], depth: int, chain: bool = True) -> None:
        """Record that `tokens` were written to layers [0, depth), as a chain or (not `chain`) as tree nodes."""
        if chain and self.linear == len(self.tokens):
            self.linear += len(tokens)
        self.tokens.extend(tokens)
        self.depth = depth

    def adopt(self, donor: "SequenceCache", length: int) -> None:
        """(An empty cache) hold the first `length` tokens of `donor`, whose keys/values were copied to this slot."""
        self.tokens = donor.tokens[:length]
        self.depth = donor.depth
        self.linear = length
