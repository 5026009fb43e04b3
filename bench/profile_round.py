"""Where a speculation round's time goes, read from the engine's round hook (`RoundTimes`).

Parts per round: prefill (prompts that joined), draft (the drafter call: with
a remote drafter it is split into the drafter actor's own compute and the
rest: transfer, (de)serialisation, the call itself), verify forward, verification
(acceptance / rejection sampling of every row), and bookkeeping (rollback,
commits, stops, telemetry: the Python the round spends outside models).

The engines run the same greedy requests on runners compiled as a served
replica's are: the target alone (plain), the target with an in-process
drafter, and (on CPU) the target with the drafter in a Ray actor, reached as
the cluster's target actor reaches it: by Ray calls, and by the drafter's
loopback channel (`actors.draft_channel`).
"""

import os
import time
from collections import defaultdict

import torch

from actors.cpu_affinity import apply_layout, pin_process, plan_layout
from actors.drafters import ModelDrafter
from actors.engine import SpeculationEngine
from actors.ray_actors import DrafterActor, connect_drafter
from actors.runner import ModelRunner, RunnerSettings
from actors.telemetry import RoundTimes
from bench.baselines.specfleet_engine import run_closed_loop
from bench.memory import process_tree_peaks

REMOTE_TIMEOUT_S = 120.0
PARTS = {"prefill": "prefill_s", "draft": "draft_s", "verify forward": "forward_s",
         "verification": "verification_s", "bookkeeping": "bookkeeping_s"}


class RoundProfile:
    """Sums the `RoundTimes` an engine's round hook receives."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.rounds = 0

    def __call__(self, times: RoundTimes) -> None:
        self.rounds += 1
        self.seconds["round"] += times.total_s
        for part, attribute in PARTS.items():
            self.seconds[part] += getattr(times, attribute)


class TimedDrafterActor(DrafterActor):
    """The cluster's drafter actor, also counting the seconds its `propose` computes."""

    def __init__(self, path: str, settings: RunnerSettings, threads: int):
        torch.set_num_threads(threads)
        super().__init__(path, settings)
        self.compute_s = 0.0

    def propose(self, commits, requests):
        started = time.perf_counter()
        try:
            return super().propose(commits, requests)
        finally:
            self.compute_s += time.perf_counter() - started

    def take_compute_s(self) -> float:
        value, self.compute_s = self.compute_s, 0.0
        return value


def breakdown(profile: RoundProfile, tokens: int, remote_compute_s: float | None) -> dict:
    """Mean milliseconds per round of each part, and its share of the round."""
    seconds, rounds, round_s = profile.seconds, profile.rounds, profile.seconds["round"]
    parts = {name: seconds[name] for name in PARTS}
    details = {}
    if remote_compute_s is not None:
        details["draft: drafter actor compute"] = remote_compute_s
        details["draft: transfer + calls"] = max(0.0, parts["draft"] - remote_compute_s)
    per_round = {name: 1000 * value / rounds for name, value in (parts | details).items()}
    return {"rounds": rounds, "tokens_per_round": tokens / rounds if rounds else None,
            "round_ms": 1000 * round_s / rounds if rounds else None,
            "tokens_per_s": tokens / round_s if round_s else None,
            "ms_per_round": per_round, "share": {name: value / round_s for name, value in parts.items()} if round_s else {}}


def profile_engine(engine: SpeculationEngine, cell: dict, settings: dict, remote_handle=None) -> dict:
    import ray

    profile = RoundProfile()
    engine.round_hook = profile
    if settings["device"].startswith("cuda"):  # a part's time is then its kernels' time, not their launch
        engine.clock = lambda: (torch.cuda.synchronize(), time.perf_counter())[1]
    traces = run_closed_loop(engine, cell, settings)
    compute = ray.get(remote_handle.take_compute_s.remote()) if remote_handle is not None else None
    return breakdown(profile, sum(t.num_tokens for t in traces), compute)


def run_whole_job(job: dict) -> dict:
    """Profile the plain and in-process engines at each concurrency, then (on CPU) the remote drafter."""
    settings = job["settings"]
    torch.set_num_threads(settings["threads"])
    target = ModelRunner.serving(settings["target"], RunnerSettings(device=settings["device"], compile=settings["compile"]))
    drafter_settings = RunnerSettings(device=settings["device"], compile=settings["drafter_compile"])
    drafter = ModelDrafter(ModelRunner.serving(settings["drafter"], drafter_settings, drafts=True))
    k, exit_layer = settings["k"], settings["exit_layer"]
    profiles = defaultdict(list)
    for cell in job["cells"]:
        for name, make in (("plain", lambda: SpeculationEngine(target)),
                           ("in-process drafter", lambda: SpeculationEngine(target, drafter, k, exit_layer))):
            run_closed_loop(make(), job["warmup"], settings)
            profiles[name].append({"concurrency": cell["concurrency"], **profile_engine(make(), cell, settings)})
    if settings["device"] == "cpu":  # the drafter actor is a CPU actor
        remote, processes = _profile_remote(target, job)
        profiles.update(remote)
    else:
        processes = process_tree_peaks(os.getpid())
    return {"category": job["cells"][0]["category"], "temperature": 0.0, "k": k, "exit_layer": exit_layer,
            "engines": dict(profiles), "processes": processes}


REMOTE_ARMS = {"remote drafter (Ray calls)": False, "remote drafter (loopback channel)": True}  # name: direct


def _profile_remote(target: ModelRunner, job: dict) -> tuple[dict[str, list[dict]], list[dict]]:
    """The target here, the drafter in a Ray actor reached as a target actor reaches it: through Ray calls, and
    through the drafter's loopback channel (`connect_drafter`), cell by cell in turn; both on the model CPUs
    `specfleet up` would give them, Ray's own processes on the rest."""
    import ray

    settings = job["settings"]
    k, exit_layer = settings["k"], settings["exit_layer"]
    layout = plan_layout(os.sched_getaffinity(0))
    if layout is not None:
        apply_layout(layout)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    if layout is not None:
        pin_process(layout.model_cpus)  # this process is the target's
    try:
        handle = ray.remote(TimedDrafterActor).options(
            num_cpus=0, max_concurrency=16, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(settings["threads"])}},
        ).remote(settings["drafter"], RunnerSettings(device="cpu", compile=settings["drafter_compile"]), settings["threads"])
        remotes = {name: connect_drafter(handle, REMOTE_TIMEOUT_S, direct) for name, direct in REMOTE_ARMS.items()}
        runs = defaultdict(list)
        for cell in job["cells"]:
            for name, remote in remotes.items():
                run_closed_loop(SpeculationEngine(target, remote, k, exit_layer), job["warmup"], settings)
                ray.get(handle.take_compute_s.remote())
                runs[name].append({"concurrency": cell["concurrency"],
                                   **profile_engine(SpeculationEngine(target, remote, k, exit_layer), cell, settings, handle)})
        return dict(runs), process_tree_peaks(os.getpid())
    finally:
        ray.shutdown()
