"""Where a speculation round's time goes: draft, transfer, verify, sampling/verification, Python overhead.

The engine is timed from outside by wrapping the methods a round calls, on
the instances only (nothing in actors/ changes):

- prefill: the target's forward over new prompts;
- draft: the drafter's `propose` (in-process: its forwards are also timed
  apart; with a remote drafter it is the whole remote call, split into the
  drafter actor's own compute and the rest: transfer, (de)serialisation, Ray);
- verify: the target's forward over [pending, drafts], of which the gathering
  of cached keys/values into a padded batch (a Python loop per row) is timed
  apart;
- verification: acceptance / rejection sampling of each row;
- rollback: both models' cache rollback and the drafter's commit;
- other Python: the rest of the round (engine bookkeeping, building lists).

Three engines run the same greedy requests: the target alone (plain), the
target with an in-process drafter, and (on CPU) the target with the drafter
in a Ray actor reached through `RemoteDrafter`, as the cluster's target actor
does.
"""

import os
import time
from collections import defaultdict

import torch

from actors.drafters import ModelDrafter
from actors.engine import SpeculationEngine
from actors.ray_actors import DrafterActor, RemoteDrafter
from actors.runner import ModelRunner
from bench.baselines.specfleet_engine import run_closed_loop
from bench.memory import process_tree_peaks

REMOTE_TIMEOUT_S = 120.0


class Stopwatch:
    """Seconds spent per named part, accumulated by wrappers.

    On a GPU each timed call ends with a synchronisation, so a part's time is
    its kernels' time and not just their launch (which makes the round a
    little slower than unprofiled).
    """

    def __init__(self, device: str = "cpu"):
        self.seconds: dict[str, float] = defaultdict(float)
        self._sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self._wrapped: list[tuple[object, str, object]] = []  # (owner, attribute, its own attribute before, if any)

    def wrap(self, owner, attribute: str, name: str, name_of=None) -> None:
        """Time every call of owner.attribute under `name` (or under name_of(args, kwargs))."""
        original = getattr(owner, attribute)
        self._wrapped.append((owner, attribute, vars(owner).get(attribute)))

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[name_of(args, kwargs) if name_of else name] += time.perf_counter() - started

        setattr(owner, attribute, timed)

    def restore(self) -> None:
        """Undo every wrap, last first, so shared models can be timed again by another stopwatch."""
        for owner, attribute, before in reversed(self._wrapped):
            if before is None:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, before)
        self._wrapped.clear()


class TimedDrafterActor(DrafterActor):
    """The cluster's drafter actor, also counting the seconds its `propose` computes."""

    def __init__(self, path: str, threads: int):
        torch.set_num_threads(threads)
        super().__init__(path)
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


def instrument(engine: SpeculationEngine, device: str) -> tuple[Stopwatch, list[int]]:
    """Wrap the engine's parts; returns the stopwatch and a one-item list counting rounds."""
    watch, rounds = Stopwatch(device), [0]
    target = engine.target
    watch.wrap(target, "forward", "verify", lambda args, kwargs: "prefill" if kwargs.get("last_only") else "verify")
    watch.wrap(target, "_gather_past", "verify: KV gather")
    watch.wrap(target, "rollback", "rollback")
    watch.wrap(engine, "_verify", "verification")
    if engine.drafter is not None:
        watch.wrap(engine.drafter, "propose", "draft")
        watch.wrap(engine.drafter, "commit", "rollback")
        if isinstance(engine.drafter, ModelDrafter):
            watch.wrap(engine.drafter.runner, "forward", "draft: forwards")
    watch.wrap(engine, "step", "round")
    timed_step = engine.step

    def counted_step():
        updates = timed_step()
        rounds[0] += bool(updates)
        return updates

    engine.step = counted_step  # the engine is thrown away after one profile, so this wrap is never undone
    return watch, rounds


TOP_LEVEL = ("prefill", "draft", "verify", "verification", "rollback")


def breakdown(seconds: dict[str, float], rounds: int, tokens: int, remote_compute_s: float | None) -> dict:
    """Mean milliseconds per round of each part, and its share of the round."""
    round_s = seconds["round"]
    parts = {name: seconds.get(name, 0.0) for name in TOP_LEVEL}
    parts["other Python"] = max(0.0, round_s - sum(parts.values()))
    details = {name: seconds[name] for name in ("draft: forwards", "verify: KV gather") if name in seconds}
    if remote_compute_s is not None:
        details["draft: drafter actor compute"] = remote_compute_s
        details["draft: transfer + Ray"] = max(0.0, parts["draft"] - remote_compute_s)
    per_round = {name: 1000 * value / rounds for name, value in (parts | details).items()}
    return {"rounds": rounds, "tokens_per_round": tokens / rounds if rounds else None,
            "round_ms": 1000 * round_s / rounds if rounds else None,
            "tokens_per_s": tokens / round_s if round_s else None,
            "ms_per_round": per_round, "share": {name: value / round_s for name, value in parts.items()} if round_s else {}}


def profile_engine(engine: SpeculationEngine, cell: dict, settings: dict, remote_handle=None) -> dict:
    import ray

    watch, rounds = instrument(engine, settings["device"])
    try:
        traces = run_closed_loop(engine, cell, settings)
    finally:
        watch.restore()
    compute = ray.get(remote_handle.take_compute_s.remote()) if remote_handle is not None else None
    return breakdown(watch.seconds, rounds[0], sum(t.num_tokens for t in traces), compute)


def run_whole_job(job: dict) -> dict:
    """Profile the plain and in-process engines at each concurrency, then (on CPU) the remote drafter."""
    settings = job["settings"]
    torch.set_num_threads(settings["threads"])
    target = ModelRunner.from_pretrained(settings["target"], device=settings["device"])
    drafter = ModelDrafter(ModelRunner.from_pretrained(settings["drafter"], device=settings["device"]))
    k, exit_layer = settings["k"], settings["exit_layer"]
    profiles = defaultdict(list)
    for cell in job["cells"]:
        for name, make in (("plain", lambda: SpeculationEngine(target)),
                           ("in-process drafter", lambda: SpeculationEngine(target, drafter, k, exit_layer))):
            run_closed_loop(make(), job["warmup"], settings)
            profiles[name].append({"concurrency": cell["concurrency"], **profile_engine(make(), cell, settings)})
    if settings["device"] == "cpu":  # the drafter actor is a CPU actor
        profiles["remote drafter (Ray actor)"], processes = _profile_remote(target, job)
    else:
        processes = process_tree_peaks(os.getpid())
    return {"category": job["cells"][0]["category"], "temperature": 0.0, "k": k, "exit_layer": exit_layer,
            "engines": dict(profiles), "processes": processes}


def _profile_remote(target: ModelRunner, job: dict) -> tuple[list[dict], list[dict]]:
    """The target here, the drafter in a Ray actor reached through `RemoteDrafter`, as in a target actor."""
    import ray

    settings = job["settings"]
    k, exit_layer = settings["k"], settings["exit_layer"]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = ray.remote(TimedDrafterActor).options(
            num_cpus=0, max_concurrency=16, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(settings["threads"])}},
        ).remote(settings["drafter"], settings["threads"])
        remote = RemoteDrafter(handle, ray.get(handle.info.remote()), REMOTE_TIMEOUT_S)
        run_closed_loop(SpeculationEngine(target, remote, k, exit_layer), job["warmup"], settings)
        ray.get(handle.take_compute_s.remote())
        runs = [{"concurrency": cell["concurrency"],
                 **profile_engine(SpeculationEngine(target, remote, k, exit_layer), cell, settings, handle)}
                for cell in job["cells"]]
        return runs, process_tree_peaks(os.getpid())
    finally:
        ray.shutdown()
