"""Prompt prefixes reused across the sequences of one replica: keys and values taken, not recomputed.

Requests often share the start of their prompt (a system prompt, a file's header, the same prompt
sent again by many clients). A fresh sequence whose prompt begins with tokens another cache of the
replica already holds takes their keys and values instead of computing them:

- from a freed slot that still holds them (`RetainedPrefixes`): the sequence adopts that slot and
  gives its own back, with nothing copied;
- from a live sequence: one indexed copy per layer (`KVStore.copy_prefix`), a few milliseconds for
  hundreds of tokens where computing them costs a forward of that width.

Several fresh sequences in one forward that share a prefix: the first computes it and the others
then take it from that one (`ModelRunner.forward`).

What may be taken, so that the reuse is exact: only a cache's linear prefix (`SequenceCache.linear`:
not a token tree's region), only when its depth covers the row's exit, and at most all but the row's
last new token, whose logits the forward returns. Keys and values depend only on the tokens up to
them, so taken ones equal recomputed ones up to float rounding, as any other batching of the rows.
"""

from actors.kv_cache import SequenceCache

MIN_SHARED_PREFIX = 16  # tokens: shorter prefixes cost about as much to look up and copy as to compute


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (binary search on slices, compared in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def reusable_length(donor: SequenceCache, tokens: list[int], exit_layer: int) -> int:
    """How many of `tokens` (a fresh row's new tokens) `donor` can give: 0 below `MIN_SHARED_PREFIX`."""
    if donor.depth < exit_layer or donor.linear < MIN_SHARED_PREFIX:
        return 0
    if donor.tokens[:MIN_SHARED_PREFIX] != tokens[:MIN_SHARED_PREFIX]:
        return 0  # the common case, decided without a search
    length = min(common_prefix(donor.tokens[: donor.linear], tokens), len(tokens) - 1)
    return length if length >= MIN_SHARED_PREFIX else 0


class RetainedPrefixes:
    """What each freed slot still holds, until the slot is taken again (at most one entry per slot)."""

    def __init__(self) -> None:
        self._by_slot: dict[int, SequenceCache] = {}

    def keep(self, cache: SequenceCache) -> None:
        """Remember a freed sequence's cache (its slot was just given back to the store)."""
        if cache.linear >= MIN_SHARED_PREFIX:
            self._by_slot[cache.slot] = cache

    def forget(self, slot: int) -> None:
        """The slot has a new owner: what it held is about to be overwritten."""
        self._by_slot.pop(slot, None)

    def caches(self) -> list[SequenceCache]:
        return list(self._by_slot.values())

    def __contains__(self, slot: int) -> bool:
        return slot in self._by_slot
