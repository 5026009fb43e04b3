"""The CPU layout of a one-machine cluster: which CPUs the models get, and pinning that really moves threads."""

import os
import subprocess
import sys

import pytest

from actors.cpu_affinity import MODEL_CPUS_ENV, CpuLayout, plan_layout

CPUS = sorted(os.sched_getaffinity(0))


def test_the_last_cpu_is_the_control_planes_and_the_others_the_models():
    assert plan_layout({0, 1}) == CpuLayout(frozenset({0}), frozenset({1}))
    assert plan_layout([5, 2, 3, 4]) == CpuLayout(frozenset({2, 3, 4}), frozenset({5}))


def test_one_cpu_is_left_alone():
    assert plan_layout({3}) is None
    assert plan_layout(set()) is None


def run_python(code: str, env: dict | None = None) -> str:
    """`code` in a fresh interpreter (pinning this test process would pin the rest of the suite)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env=os.environ | (env or {}))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(len(CPUS) < 2, reason="a layout needs two CPUs")
def test_apply_layout_pins_every_thread_and_what_starts_later_and_names_the_model_cpus():
    out = run_python("""
import os, threading, subprocess, sys
from actors.cpu_affinity import apply_layout, plan_layout
before = threading.Thread(target=threading.Event().wait, daemon=True); before.start()
layout = plan_layout(os.sched_getaffinity(0))
apply_layout(layout)
tasks = {c for t in os.listdir('/proc/self/task') for c in os.sched_getaffinity(int(t))}  # every thread's CPUs
child = subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)), os.environ["SPECFLEET_MODEL_CPUS"])'],
                       capture_output=True, text=True).stdout.strip()
print(sorted(tasks), child)
""")
    control, models = CPUS[-1], ",".join(map(str, CPUS[:-1]))
    assert out == f"[{control}] [{control}] {models}"


@pytest.mark.skipif(len(CPUS) < 2, reason="a layout needs two CPUs")
def test_a_model_actor_loads_on_every_cpu_and_then_serves_on_the_model_cpus_only_when_told():
    code = f"""
import os, threading
from actors.cpu_affinity import loading_then_model_cpus, pin_process
pin_process({{{CPUS[-1]}}})  # as a Ray worker of a laid-out cluster starts: on the control CPU
threading.Thread(target=threading.Event().wait, daemon=True).start()
cpus = lambda: sorted({{c for t in os.listdir('/proc/self/task') for c in os.sched_getaffinity(int(t))}})
with loading_then_model_cpus():
    loading = cpus()
print(loading, cpus())
"""
    models = ",".join(map(str, CPUS[:-1]))
    assert run_python(code, {MODEL_CPUS_ENV: models}) == f"{CPUS} {CPUS[:-1]}"
    assert run_python(code) == f"[{CPUS[-1]}] [{CPUS[-1]}]"
