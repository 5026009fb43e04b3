"""Weights stored packed in float16 for a CPU's few-row matmuls (`kernels/packed_linear.cpp`).

A decode step or a verify of a small model multiplies a few rows by each weight
matrix: on a CPU it is bound by reading the weights, and MKL's few-row kernels
read them slowly (on the project's AMD EPYC, target-xl's matmuls for 5 rows:
4.6 ms in MKL against 1.1 ms packed; for 1 row 2.4 against 0.8, for 64 rows 18
against 7.8, each with cold caches). Packing is lossless or not done: a matrix
is packed only where float16 holds every weight exactly (the zoo ships float16
checkpoints), so the arithmetic is float32 on the same values, summed in a fixed
order that does not depend on the batch.

The kernel is one of `actors.cpu_kernels`: built for the machine at first use,
used only where the CPU has AVX-512 or AVX2.
"""

import torch

TILE = 32  # output columns per packed tile (the kernel's TILE)


def packable(weight: torch.Tensor) -> bool:
    """Whether a [K, N] weight can be packed without changing a value: float32 on a CPU, N a multiple of the
    tile, every entry held exactly by float16."""
    return weight.dim() == 2 and weight.shape[1] % TILE == 0 and _float16_holds(weight)


def _float16_holds(tensor: torch.Tensor) -> bool:
    """A float32 CPU tensor every entry of which float16 holds exactly (what packing may store)."""
    return tensor.dtype == torch.float32 and tensor.device.type == "cpu" and torch.equal(tensor.half().float(), tensor)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[K, N] float32 -> [N / TILE, K, TILE] float16: each tile of output columns contiguous."""
    k, n = weight.shape
    return weight.view(k, n // TILE, TILE).permute(1, 0, 2).contiguous().half()


def is_packed(weight: torch.Tensor) -> bool:
    return weight.dim() == 3


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., K] float32 @ a packed weight -> [..., N] float32."""
    return torch.ops.specfleet.packed_linear(x, packed)
