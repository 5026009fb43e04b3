"""Which CPUs the model actors run on, and which the rest of a one-machine cluster uses.

On a CPU a target and its drafter alternate within a round (draft, then
verify), and the rest of the cluster (front doors, Serve's proxy, the
controller, Ray's daemons) works beside them. Measured on the project's
2-core VM (session 21, target-xl and the drafter at exit 4, k = 4):
- the two models ping-ponging through a pipe, each round a 4-step draft then
  a 5-token verify: on one core a round took 4.6-5.1 ms and the verify 2.5-2.9
  ms; on two cores 5.8-6.2 and 3.3-3.5 ms (the verify's own CPU time grows:
  each side's step starts on a core that went idle while the other worked);
- the cluster over gRPC, one greedy stream on code prompts: with every process
  free to run anywhere 249 tokens/s speculative and 263 plain; target and
  drafter on core 0 with the rest free 296 / 266; target and drafter on core 0
  and everything else on core 1 358 / 337. At 16 streams (all categories) that
  last layout gave 410 / 486 against 339 / 374.

So `specfleet up`, when it starts its own Ray on a machine of two or more
CPUs, keeps the last CPU for everything but the models (`plan_layout`): it
pins itself there before Ray starts, so Ray's daemons and workers inherit that
CPU, and tells the model actors (`MODEL_CPUS_ENV`) to move onto the others
once their model is loaded and compiled (`loading_then_model_cpus`).
"""

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

MODEL_CPUS_ENV = "SPECFLEET_MODEL_CPUS"  # comma-separated CPU ids the model actors of this machine run on


@dataclass(frozen=True)
class CpuLayout:
    model_cpus: frozenset[int]  # targets, drafters and chain stages
    control_cpus: frozenset[int]  # everything else: front doors, Serve, the controller, Ray's daemons, `specfleet up`


def plan_layout(available: Iterable[int]) -> CpuLayout | None:
    """The last of `available` CPUs for the control plane, the others for the models; None below two CPUs."""
    cpus = sorted(available)
    if len(cpus) < 2:
        return None
    return CpuLayout(frozenset(cpus[:-1]), frozenset(cpus[-1:]))


def apply_layout(layout: CpuLayout) -> None:
    """In the process about to start Ray: onto the control CPUs (inherited by what it starts), and the model CPUs
    named in the environment its model actors inherit."""
    os.environ[MODEL_CPUS_ENV] = ",".join(str(cpu) for cpu in sorted(layout.model_cpus))
    pin_process(layout.control_cpus)


@contextmanager
def loading_then_model_cpus() -> Iterator[None]:
    """In a model actor, around loading its model: every CPU of the layout while it loads and compiles (ten
    actors compiling on the one model CPU of a 2-core machine took 10 minutes to start), the model CPUs from
    then on; nothing changes when the cluster planned no layout."""
    value = os.environ.get(MODEL_CPUS_ENV)
    if not value:
        yield
        return
    model_cpus = {int(cpu) for cpu in value.split(",")}
    pin_process(model_cpus | os.sched_getaffinity(0))  # the control CPUs it inherited, and the model CPUs
    yield
    pin_process(model_cpus)


def pin_process(cpus: Iterable[int]) -> None:
    """Every thread of this process onto `cpus`; threads and processes it starts later inherit them."""
    cpus = set(cpus)
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
