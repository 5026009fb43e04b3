"""How a model step runs: eagerly, or compiled by `torch.compile` (inductor), and its warm-up.

On a CPU a small model's forward is bound by per-op dispatch and by streaming
its weights, not by arithmetic (../shared/PERF-NOTES.md); inductor fuses the
step's small ops into a few C++ kernels called from C++ (`cpp_wrapper`).

- "compile": one graph with dynamic sizes per (depth, batch 1 or more, query
  width 1 or more), run on exact shapes (`ShapePolicy(bucketed=False)`):
  on a CPU padding costs arithmetic, and the dynamic graph ran as fast as
  per-shape ones once weights are pre-transposed (see docs/ARCHITECTURE.md).
- "compile-tuned": for one row (one stream) of at most `NARROW_WIDTH` tokens,
  "compile" with the weights frozen into the graph and each matmul's kernel
  picked at start-up by timing inductor's C++ micro-GEMM templates against
  MKL (`max_autotune`); several rows, and a prompt's wide chunks, run the
  "compile" graphs. On an AMD EPYC, where MKL's few-row GEMMs are slow, it
  cut target-xl's 1-token step from 4.1-4.8 to 2.1-2.4 ms and its
  5-token verify from 6.8-8.3 to 3.3-3.5 ms. Tuned for several rows the graph
  lost (16 rows of 5 tokens: 35 against 29 ms with MKL): a dynamic graph's
  kernels are picked at one size. oneDNN stays off while it compiles: its
  packed weights cannot be pickled, so inductor's on-disk cache skipped every
  such graph (~2 min at each start of target-xl), and oneDNN's linear was no
  faster. Frozen graphs are cached by the shapes of their weights, not their
  values, yet a cached graph keeps the weights it packed: the cache key
  carries a fingerprint of the weights (`weights_fingerprint`), or a second
  checkpoint of the same shapes would run with the first one's weights.
  The drafter's steps are dispatch-bound, not GEMM-bound: tuning them was
  slower (exit 4, 4 fused steps: 2.7 against 1.5 ms) and took ~10 min.
  With packed weights (`actors.packed_linear`) a narrow graph has no matmul
  left to tune, so 'auto' picks "compile" there; the tuned mode serves
  checkpoints whose weights float16 cannot hold, and CPUs without AVX-512 or AVX2.
- "compile-static": one graph per shape bucket (`ShapePolicy(bucketed=True)`),
  the shape discipline CUDA graphs need; each bucket compiles at first use.
- "eager": no compilation (tests, and a device where compiling has not been
  measured to pay).

A drafter also runs several greedy draft steps as one compiled call
(`DecoderStep.draft_greedy`, `FUSED_DRAFT_STEPS` of them at most), so a round's
k steps pay a compiled call's fixed cost once or twice instead of k times.

`warm_up` compiles every graph a "compile" runner needs at start-up, so no
request waits for a compile.
"""

import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import Literal

import torch

from actors.buckets import NARROW_WIDTH, ShapePolicy

log = logging.getLogger(__name__)

CompileMode = Literal["eager", "compile", "compile-tuned", "compile-static"]
CompileSetting = Literal["auto", "eager", "compile", "compile-tuned", "compile-static"]  # a mode, or 'auto' (resolve_mode)
StepFunction = Callable[..., torch.Tensor]
MAX_GRAPHS = 64  # dynamo's per-function graph limit (default 8) would silently fall back to eager past it
# Greedy draft steps one fused call may run, largest first: a draft of k tokens runs as calls of these
# sizes, then single steps. Each size is one more graph per exit and batch kind to compile at start-up
# (on this project's CPU, cold: ~7-34 s each for the zoo's drafter; warm from inductor's cache: ~1-3 s).
FUSED_DRAFT_STEPS = (4, 2)
# Tokens a fused draft's first step feeds: the round's new ones, one or two (after a fully accepted draft,
# its last token and the bonus), the one case padded by re-feeding the last cached token (same position,
# same keys): one graph for both, and a full acceptance costs one call, not three.
FUSED_DRAFT_FEED = 2
TUNED_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
DYNAMIC_MODES = ("compile", "compile-tuned")  # one graph per (depth, batch 1 or more, width 1 or more), warmed up


def compile_step(function: StepFunction, mode: CompileMode, fingerprint: str = "") -> StepFunction:
    """What the runner calls in place of `function`, a method of a `DecoderStep`; `fingerprint` names the
    weights a "compile-tuned" graph freezes (`weights_fingerprint`)."""
    if mode == "eager":
        return function
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.cpp_wrapper = True  # kernels called from C++: no Python between ops
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, MAX_GRAPHS)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, MAX_GRAPHS)
    compiled = torch.compile(function, dynamic=(mode in DYNAMIC_MODES), fullgraph=True)
    if mode != "compile-tuned":
        return compiled
    return TunedStep(compiled, torch.compile(_entry(function), dynamic=True, fullgraph=True), fingerprint)


class TunedStep:
    """A "compile-tuned" step: one row of at most `NARROW_WIDTH` tokens runs the tuned graphs; several rows,
    or a prompt's chunk, the "compile" ones (module docstring): kernels picked for a few rows lost at 64 tokens
    (a 640-token prompt of target-xl took 500 against 250 ms).

    Until `settle` (the end of warm-up) the tuned options apply around each call, while its graphs compile;
    they leave other runners of the process as they are (torch.compile's own `options` do not reach the
    freezing pass, which reads the process-wide config). After it, calls skip the ~50 us of patching: a graph
    compiled then (an exit not warmed up) is an untuned one, as fast as "compile"."""

    def __init__(self, several_rows: StepFunction, one_row: StepFunction, fingerprint: str):
        self._several_rows, self._one_row, self._fingerprint = several_rows, one_row, fingerprint
        self._settled = False

    def settle(self) -> None:
        self._settled = True

    def __call__(self, store, ids: torch.Tensor, *rest) -> torch.Tensor:
        if ids.shape[0] > 1 or ids.shape[1] > NARROW_WIDTH:
            return self._several_rows(store, ids, *rest)
        if self._settled:
            return self._one_row(store, ids, *rest)
        import torch._inductor.config as inductor_config

        with (inductor_config.patch(TUNED_OPTIONS), torch.compiler.config.patch(cache_key_tag=self._fingerprint),
              torch.backends.mkldnn.flags(enabled=False)):
            return self._one_row(store, ids, *rest)


def weights_fingerprint(tensors: list[torch.Tensor]) -> str:
    """A digest of the tensors' values (a frozen graph's cache key): ~50 ms for target-xl's 45 MB."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _entry(function: StepFunction) -> StepFunction:
    """`function` behind a code object of its own, so that a second torch.compile of it keeps separate graphs."""

    def entry(*args) -> torch.Tensor:
        return function(*args)

    return entry


AUTO_ENV = "SPECFLEET_COMPILE"  # what 'auto' means on this machine when set (the test suite sets "eager")


def resolve_mode(mode: str, device: str, drafts: bool = False, packed: bool = False) -> CompileMode:
    """'auto': $SPECFLEET_COMPILE when set; else, on a CPU, "compile" for a model that drafts (dispatch-bound) or
    whose matmul weights are `packed` (`actors.packed_linear`: a tuned graph has no matmul left to tune, and on the
    project's EPYC ran no faster: target-xl 1 / 5 / 16 tokens 1.55-1.60 / 2.22-2.23 / 5.4-5.5 ms against
    1.66-1.74 / 2.32-2.39 / 5.7-6.0), and "compile-tuned" for one that verifies on MKL's matmuls (module
    docstring, BENCHMARKS.md); eager on any other device until a benchmark there says otherwise."""
    if mode != "auto":
        return mode
    if os.environ.get(AUTO_ENV):
        return os.environ[AUTO_ENV]
    if torch.device(device).type != "cpu":
        return "eager"
    return "compile" if drafts or packed else "compile-tuned"


def shape_policy(mode: CompileMode) -> ShapePolicy:
    return ShapePolicy(bucketed=(mode == "compile-static"))


def warm_up(run: Callable[..., object], depths: list[int],
            draft: Callable[[int, int, int, int], object] | None = None,
            tree: Callable[[int, int, int, int], object] | None = None) -> float:
    """Compile every graph a dynamic-shape runner uses; returns the seconds it took.

    `run(batch, width, start, depth, last_only=False)` runs one step on scratch rows (with `last_only`, scoring
    each row's last token only, as a prompt's chunk does); `draft(batch, steps,
    start, depth)`, given for a drafter, one fused greedy draft of `steps` steps; `tree(batch,
    width, region, depth)`, given where token trees are served, one tree step of `width` new
    tokens ending a region of `region` entries (a whole tree verified, or a drafter's level).
    Sizes of 1 get graphs of their own (one stream; one new token), and so do
    widths past `NARROW_WIDTH` (a prompt's chunks; a tree's widest steps); other sizes
    are chosen pairwise distinct (batch 2, width 3, keys past them) so that the
    compiler does not assume two sizes equal and recompile when they differ.
    """
    started = time.perf_counter()
    for depth in depths:
        for batch in (1, 2):
            run(batch, 1, 8, depth)  # decoding, drafting: one new token per row
            run(batch, 3, 8, depth)  # verifying a draft
            run(batch, NARROW_WIDTH + 1, 8, depth)  # wide steps: graphs split at NARROW_WIDTH
            run(batch, NARROW_WIDTH + 1, 8, depth, True)  # a prompt's chunk, scored at its last token only
            for steps in FUSED_DRAFT_STEPS if draft is not None else ():
                draft(batch, steps, 8, depth)
            for width, region in ((3, 3), (3, 7), (NARROW_WIDTH + 1, NARROW_WIDTH + 5)) if tree is not None else ():
                tree(batch, width, region, depth)
    seconds = time.perf_counter() - started
    log.info("compiled the model step for depths %s in %.1f s", depths, seconds)
    return seconds
