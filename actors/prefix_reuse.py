"""Prompt prefixes shared by the live sequences of one replica: keys and values copied, not recomputed.

Concurrent requests often share the start of their prompt (a system prompt, a file's header, the
same prompt from many clients). A fresh sequence whose prompt begins with tokens a live sequence of
the replica already holds copies their keys and values (`KVStore.copy_prefix`, one indexed copy per
layer: a few milliseconds for hundreds of tokens, where computing them costs a forward of that
width). Several fresh sequences in one forward that share a prefix: the first computes it and the
others then copy it (`ModelRunner.forward`).

Only live sequences give: a finished request's cache is not kept for later ones. Kept, it would make
a benchmark's second pass over the same prompts (speculation after plain decoding, say) skip the
prefill the first pass paid, and a comparison of the two unfair.

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
