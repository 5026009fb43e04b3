"""Weights stored packed in float16 (or int8) for a CPU's few-row matmuls (`kernels/packed_linear.cpp`).

A decode step or a verify of a small model multiplies a few rows by each weight
matrix: on a CPU it is bound by reading the weights, and MKL's few-row kernels
read them slowly (on the project's AMD EPYC, target-xl's matmuls for 5 rows:
4.6 ms in MKL against 1.1 ms packed; for 1 row 2.4 against 0.8, for 64 rows 18
against 7.8, each with cold caches). Packing is lossless or not done: a matrix
is packed only where float16 holds every weight exactly (the zoo ships float16
checkpoints), so the arithmetic is float32 on the same values, summed in a fixed
order that does not depend on the batch.

A drafter may store its weights in int8 instead (`quantize`): a scale per output
column, half the bytes of float16. Verification keeps the target's output exact
whatever a drafter proposes (a speculative cascade that defers emits the quantized
drafter's tokens: `RunnerSettings.drafter_weights` 'exact' keeps the checkpoint's), and
the zoo's drafter lost no acceptance to it (MAL 3.03 against 3.02 exact, greedy, k = 4,
held-out prompts of every category); its draft steps read half the bytes.

The kernel is one of `actors.cpu_kernels`: built for the machine at first use,
used only where the CPU has AVX-512 or AVX2.
"""

import torch

TILE = 32  # output columns per packed tile (the kernel's TILE)
SCALE_ROWS = 4  # an int8 tile's leading rows of TILE bytes: its columns' float32 scales (the kernel's SCALE_ROWS)
INT8_LEVELS = 127  # symmetric int8: values in -127..127


def quantizable(weight: torch.Tensor) -> bool:
    """Whether a [K, N] weight fits the kernel's tiles, as int8 or (where exact) float16: float32 on a CPU, N a
    multiple of the tile."""
    return (weight.dim() == 2 and weight.shape[1] % TILE == 0 and weight.dtype == torch.float32
            and weight.device.type == "cpu")


def packable(weight: torch.Tensor) -> bool:
    """Whether a [K, N] weight can be packed without changing a value: it fits tiles (`quantizable`) and float16
    holds every entry exactly."""
    return quantizable(weight) and torch.equal(weight.half().float(), weight)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[K, N] float32 -> [N / TILE, K, TILE] float16: each tile of output columns contiguous."""
    k, n = weight.shape
    return weight.view(k, n // TILE, TILE).permute(1, 0, 2).contiguous().half()


def quantize(weight: torch.Tensor) -> torch.Tensor:
    """[K, N] float32 -> [N / TILE, SCALE_ROWS + K, TILE] int8: each tile its columns' scales (float32, as bytes),
    then round(weight / scale), a column's scale its largest magnitude / 127."""
    k, n = weight.shape
    scales = (weight.abs().amax(dim=0) / INT8_LEVELS).clamp_min(torch.finfo(torch.float32).tiny)  # [N]
    values = (weight / scales).round().clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)  # [K, N]
    header = scales.view(n // TILE, TILE).view(torch.int8).view(n // TILE, SCALE_ROWS, TILE)  # the scales' bytes
    return torch.cat([header, values.view(k, n // TILE, TILE).permute(1, 0, 2)], dim=1).contiguous()


def is_packed(weight: torch.Tensor) -> bool:
    return weight.dim() == 3


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., K] float32 @ a packed (float16) or quantized (int8) weight -> [..., N] float32."""
    return torch.ops.specfleet.packed_linear(x, packed)
