"""One system's benchmark, run in a process of its own: `python -m bench.child JOB.json RESULT.json`.

A fresh process per system keeps each one's peak memory its own, lets vLLM
run from its separate environment, and keeps one system's crash out of the
others' results. The job names the system, its modes and the cells (with
their prompts as token ids); the result, rewritten after every cell so a
timeout still leaves what was measured, holds each cell's metrics, the
system's info, and the peak RSS of this process and every process it started
(read just before they are stopped).

Imports stay light (no torch) until the system's session is built, so this
module also runs under vLLM's interpreter.
"""

import importlib
import json
import os
import sys
import time
import traceback

from bench.memory import process_tree_peaks
from bench.metrics import pooled, summarize

SESSIONS = {
    "specfleet": "bench.baselines.specfleet_engine",
    "hf": "bench.baselines.hf_assisted",
    "vllm": "bench.baselines.vllm_engine",
    "specfleet-cluster": "bench.baselines.cluster_session",
    "profile": "bench.profile_round",
    "multi-target": "bench.baselines.multi_target",
}


def run_job(job: dict, result_path: str) -> dict:
    """Measure every cell in every mode; a module with `run_whole_job` (profile, multi-target) runs its own plan."""
    module = importlib.import_module(SESSIONS[job["system"]])
    if hasattr(module, "run_whole_job"):
        return {"system": job["system"], "status": "ok", **module.run_whole_job(job)}
    result = {"system": job["system"], "modes": job["modes"], "cells": [], "status": "ok"}
    session = module.Session(job["settings"], job["modes"])
    try:
        result["info"] = session.info()
        _write(result, result_path)
        modes = _warm_up(session, job, result)
        measured: dict[tuple, list] = {}  # (mode, temperature, concurrency) -> [(row, traces)] of its cells
        for cell in job["cells"]:
            for mode in modes:
                row, traces = _measure(session, mode, cell, job["settings"].get("keep_tokens", False))
                result["cells"].append(row)
                if traces:
                    measured.setdefault((mode, cell["temperature"], cell["concurrency"]), []).append((row, traces))
                _write(result, result_path)
        result["cells"] += [_pooled_row(key, parts) for key, parts in measured.items()]
        result["processes"] = process_tree_peaks(os.getpid())
    finally:
        session.close()
    return result


def _warm_up(session, job: dict, result: dict) -> list[str]:
    """One unmeasured request per mode (first forwards pay for lazy initialisation); the modes that work.

    A mode whose warm-up fails is reported once in `result["mode_errors"]` and skipped.
    """
    working = []
    for mode in job["modes"]:
        try:
            session.run(mode, job["warmup"])
            working.append(mode)
        except Exception as err:
            result.setdefault("mode_errors", {})[mode] = f"{type(err).__name__}: {err}"
    return working


def _measure(session, mode: str, cell: dict, keep_tokens: bool) -> tuple[dict, list]:
    """One cell in one mode: its row of metrics, and its traces (none when it failed)."""
    key = {name: cell[name] for name in ("category", "temperature", "concurrency")}
    try:
        traces, counts = session.run(mode, cell)
    except Exception as err:  # one failing cell is reported, the others still run
        return {**key, "mode": mode, "error": f"{type(err).__name__}: {err}"}, []
    row = {**key, "mode": mode, **summarize(traces, counts)}
    if keep_tokens or cell["temperature"] == 0:
        row["completions"] = [t.tokens for t in traces]  # greedy rows are compared across systems
    return row, traces


def _pooled_row(key: tuple, parts: list) -> dict:
    """All categories of one mode, temperature and concurrency as one row (category "all")."""
    mode, temperature, concurrency = key
    metrics = pooled([row for row, _ in parts], [t for _, traces in parts for t in traces])
    return {"category": "all", "temperature": temperature, "concurrency": concurrency, "mode": mode, **metrics}


def _write(result: dict, path: str) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        json.dump(result, file)
    os.replace(temporary, path)


def main(argv: list[str]) -> int:
    job_path, result_path = argv
    with open(job_path) as file:
        job = json.load(file)
    started = time.perf_counter()
    try:
        result = run_job(job, result_path)
    except Exception:
        traceback.print_exc()
        return 1
    result["elapsed_s"] = time.perf_counter() - started
    _write(result, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
