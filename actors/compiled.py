"""How a model step runs: eagerly, or compiled by `torch.compile` (inductor).

On a CPU a small model's forward is bound by per-op dispatch, not arithmetic
(../shared/PERF-NOTES.md: some 85% of target-l's step); inductor fuses the
step's small ops into a few C++ kernels. The runner pads every call to a shape
bucket (`actors.buckets`), and `warm_up` compiles the buckets at start-up, so no
request waits for a compile. "compile" lets shapes be dynamic (one graph per
depth and mode, whatever the bucket); "compile-static" specialises each bucket
(what CUDA graphs need on a GPU).
"""

import logging
import os
import time
from collections.abc import Callable
from typing import Literal

import torch

log = logging.getLogger(__name__)

CompileMode = Literal["eager", "compile", "compile-static"]
StepFunction = Callable[..., torch.Tensor]


def compile_step(step: torch.nn.Module, mode: CompileMode) -> StepFunction:
    """The function the runner calls for one padded step of `step` (a `LlamaStep`)."""
    if mode == "eager":
        return step
    import torch._inductor.config as inductor_config

    inductor_config.cpp_wrapper = os.environ.get("SF_CPPW","1")=="1"
    inductor_config.freezing = os.environ.get("SF_FREEZE","1")=="1"  # C++ calls the kernels: no Python between ops
    return torch.compile(step.forward, dynamic=(mode == "compile"), fullgraph=True)
