"""The shapes a model step runs in: every call is padded up to a bucket.

Like the batch sizes vLLM and SGLang capture CUDA graphs for, a small fixed set
of (batch, width, key length) shapes lets a compiler specialise the step once
per shape at start-up instead of once per request: batches are padded with
rows that write to the store's scratch slot, queries with tokens past a row's
end, and keys are read up to a multiple of `KEY_BLOCK`.
"""

MAX_WIDTH = 64  # new tokens per row per step; longer inputs (prompts) run in chunks of this many
KEY_BLOCK = 64  # key lengths are read in multiples of this


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def batch_bucket(rows: int, num_slots: int) -> int:
    """The batch a step of `rows` rows runs as: the next power of two, at most the store's slots."""
    return min(_power_of_two_at_least(rows), num_slots)


def width_bucket(width: int) -> int:
    """The query width a step of at most `width` new tokens per row runs as (width <= MAX_WIDTH)."""
    return _power_of_two_at_least(width)


def key_bucket(keys: int, capacity: int) -> int:
    """The key length read for rows whose longest reaches `keys` positions."""
    return min(-(-keys // KEY_BLOCK) * KEY_BLOCK, capacity)


def batch_buckets(num_slots: int) -> list[int]:
    """Every batch bucket of a store with `num_slots` slots, for warm-up."""
    return sorted({batch_bucket(n, num_slots) for n in range(1, num_slots + 1)})


def width_buckets() -> list[int]:
    return sorted({width_bucket(n) for n in range(1, MAX_WIDTH + 1)})
