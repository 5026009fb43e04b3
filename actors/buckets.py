"""The shapes a model step runs in.

A compiled step is specialised to the shapes it sees. Two policies:

- **bucketed** (for `compile-static`, and CUDA graphs on a GPU): like the batch
  sizes vLLM and SGLang capture graphs for, batches and query widths are padded
  up to powers of two and key lengths up to a multiple of `KEY_BLOCK`, so a
  small fixed set of shapes is compiled once each at start-up;
- **exact** (eager and `compile`, whose graph takes any size): on a CPU a padded
  row or token costs as much arithmetic as a real one, so nothing is padded
  (measured on target-l: one row of 5 tokens 1.25 ms, the same padded to two
  rows 1.61 ms). Dynamic shapes specialise a size of 1, so one stream gets
  graphs of its own (`actors.compiled.warm_up` compiles both).

Padded rows write to the store's scratch slot; padded tokens past a row's end
write past its length, where the crop rule never reads.
"""

from dataclasses import dataclass

MAX_WIDTH = 64  # new tokens per row per step; longer inputs (prompts) run in chunks of this many
KEY_BLOCK = 64  # bucketed key lengths are multiples of this
# The widest "narrow" step a row: decoding, verifying a draft or a small tree. Compiled graphs split here
# (a narrow step's attention runs in the CPU kernel or as reductions, a tuned runner's one-row narrow steps run tuned graphs;
# wider ones, a prompt's chunks, run SDPA and MKL), so warm-up compiles a step on each side of it.
NARROW_WIDTH = 16


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class ShapePolicy:
    bucketed: bool  # pad to buckets (static shapes); False: exact shapes

    def batch(self, rows: int) -> int:
        """Rows a step of `rows` rows runs with."""
        return _power_of_two_at_least(rows) if self.bucketed else rows

    def width(self, tokens: int) -> int:
        """New tokens per row a step of at most `tokens` (<= MAX_WIDTH) runs with."""
        return _power_of_two_at_least(tokens) if self.bucketed else tokens

    def keys(self, positions: int, capacity: int) -> int:
        """Key positions read per row when the longest row reaches `positions`."""
        return min(-(-positions // KEY_BLOCK) * KEY_BLOCK, capacity) if self.bucketed else positions
