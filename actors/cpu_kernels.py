"""The project's own CPU kernels (`actors/kernels/*.cpp`): built for this machine, loaded as torch ops.

- `specfleet::packed_linear`: few-row matmuls by float16-packed or int8 weights (`actors.packed_linear`);
- `specfleet::cached_attention`: a step's causal attention over the keys and values in a KV
  store, read in place (`cached_attention`).

They are compiled with g++ for the machine they run on at first use (~30 s, then kept in
~/.cache/specfleet, keyed by the sources, torch and the CPU) and used only where the CPU has
AVX-512, or AVX2 with FMA and F16C (`kernels/simd.h`: one source, either vector width); elsewhere,
or where the build fails, the models run on torch's own kernels. Compiled graphs call them from
C++ (each has a fake implementation for tracing).
"""

import functools
import glob
import hashlib
import logging
import os

import torch

log = logging.getLogger(__name__)

KERNELS = os.path.join(os.path.dirname(__file__), "kernels")
SOURCES = sorted(glob.glob(os.path.join(KERNELS, "*.cpp")))
HEADERS = sorted(glob.glob(os.path.join(KERNELS, "*.h")))  # the vector vocabulary they are written in (simd.h)
VECTOR_CAPABILITIES = ("AVX512", "AVX2")  # what torch calls the CPUs simd.h is written for
BUILD_FLAGS = ["-O3", "-march=native"]  # built for the machine that runs it
ATTENTION_HEAD_DIMS = range(16, 257, 16)  # what cached_attention.cpp takes: whole registers, accumulators in registers


@functools.cache
def available() -> bool:
    """Whether this process can run the kernels: a CPU with AVX-512 or AVX2, and the library built and loaded."""
    if torch.backends.cpu.get_cpu_capability() not in VECTOR_CAPABILITIES:
        return False
    try:
        _load_library()
    except (OSError, RuntimeError) as error:  # no compiler, or a build that failed: the models use torch's kernels
        log.warning("specfleet's CPU kernels unavailable, using torch's: %s", error)
        return False
    torch.library.register_fake("specfleet::packed_linear")(_packed_linear_shape)
    torch.library.register_fake("specfleet::cached_attention")(_cached_attention_shape)
    return True


def cached_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                     positions: torch.Tensor, window: int | None, scale: float) -> torch.Tensor:
    """Causal attention of q [B, T, Hq, D] over one layer's store keys/values [S, P, Hkv, D] -> [B, T, Hq, D].

    Row b reads slot `slots[b]`; its query t at position `positions[b, t]` sees the keys at
    positions up to its own (written before the call), within the last `window` positions where
    one is given. Float32, head_dim a multiple of 16. No key length is passed: an int argument
    would make each key length a graph of its own.
    """
    return torch.ops.specfleet.cached_attention(q, keys, values, slots, positions, window or 0, scale)


def _load_library() -> None:
    """Load the library built for these sources, torch and CPU, building it first where it is not.

    Only a build takes torch's build lock: a process killed while holding it leaves the lock behind and every
    later build waits on it, so a replica that restarts must not need it (its library is already there).
    """
    name = f"specfleet_kernels_{_build_key()}"
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
        load(name, SOURCES, extra_cflags=BUILD_FLAGS, build_directory=directory, is_python_module=False)
    finally:
        os.environ["PATH"] = path


def _build_key() -> str:
    """A digest of what the built library depends on: the sources, the flags, torch, and this CPU (`-march=native`)."""
    digest = hashlib.sha256()
    for path in SOURCES + HEADERS:
        with open(path, "rb") as source:
            digest.update(source.read())
    digest.update(" ".join([*BUILD_FLAGS, torch.__version__]).encode())
    try:
        with open("/proc/cpuinfo", "rb") as cpuinfo:
            digest.update(next((line for line in cpuinfo if line.startswith(b"flags")), b""))
    except OSError:
        pass
    return digest.hexdigest()[:16]


def _packed_linear_shape(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0] * packed.shape[2])


def _cached_attention_shape(q, keys, values, slots, positions, window, scale) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
