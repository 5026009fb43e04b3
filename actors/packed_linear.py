"""Weights stored packed in float16 for a CPU's few-row matmuls (`kernels/packed_linear.cpp`).

A decode step or a verify of a small model multiplies a few rows by each weight
matrix: on a CPU it is bound by reading the weights, and MKL's few-row kernels
read them slowly (on the project's AMD EPYC, target-xl's matmuls for 5 rows:
4.6 ms in MKL against 1.1 ms packed; for 1 row 2.4 against 0.8, for 64 rows 18
against 7.8, each with cold caches). Packing is lossless or not done: a matrix
is packed only where float16 holds every weight exactly (the zoo ships float16
checkpoints), so the arithmetic is float32 on the same values, summed in a fixed
order that does not depend on the batch.

The kernel is compiled for the machine it runs on at first use (g++, ~30 s,
then kept in ~/.cache/specfleet, keyed by source, torch and CPU) and is used
only where the CPU has AVX-512.
"""

import functools
import hashlib
import logging
import os

import torch

log = logging.getLogger(__name__)

TILE = 32  # output columns per packed tile (the kernel's TILE)
SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "packed_linear.cpp")
BUILD_FLAGS = ["-O3", "-march=native"]  # built for the machine that runs it


@functools.cache
def available() -> bool:
    """Whether this process can run the kernel: a CPU with AVX-512, and the kernel built and loaded."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    try:
        _load_kernel()
    except (OSError, RuntimeError) as error:  # no compiler, or a build that failed: the model runs on MKL
        log.warning("packed float16 matmul kernel unavailable, using MKL: %s", error)
        return False
    torch.library.register_fake("specfleet::packed_linear")(_packed_linear_shape)
    return True


def _load_kernel() -> None:
    """Load the kernel built for this source, torch and CPU, building it first where it is not.

    Only a build takes torch's build lock: a process killed while holding it leaves the lock behind and every
    later build waits on it, so a replica that restarts must not need it (its library is already there).
    """
    name = f"specfleet_packed_linear_{_build_key()}"
    directory = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "specfleet", name)
    library = os.path.join(directory, f"{name}.so")
    if os.path.exists(library):
        torch.ops.load_library(library)
        return
    import ninja  # a dependency: torch's build runs `ninja` from PATH, which a venv not activated lacks
    from torch.utils.cpp_extension import load

    os.makedirs(directory, exist_ok=True)
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
    try:
        load(name, [SOURCE], extra_cflags=BUILD_FLAGS, build_directory=directory, is_python_module=False)
    finally:
        os.environ["PATH"] = path


def _build_key() -> str:
    """A digest of what the built library depends on: the source, the flags, torch, and this CPU (`-march=native`)."""
    digest = hashlib.sha256()
    with open(SOURCE, "rb") as source:
        digest.update(source.read())
    digest.update(" ".join([*BUILD_FLAGS, torch.__version__]).encode())
    try:
        with open("/proc/cpuinfo", "rb") as cpuinfo:
            digest.update(next((line for line in cpuinfo if line.startswith(b"flags")), b""))
    except OSError:
        pass
    return digest.hexdigest()[:16]


def _packed_linear_shape(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0] * TILE)


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
