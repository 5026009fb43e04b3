"""`specfleet up` as a subprocess for tests: a tiny-model cluster config, start, wait for its address, stop."""

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from bench.baselines.cluster_process import HTTP
from bench.memory import process_tree_peaks

CLI = [sys.executable, "-m", "cluster.cli"]


def free_port() -> int:
    """A port free now (for the server's HTTP side; gRPC uses port 0 and prints what it got)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_cluster_config(folder: Path, target_path: Path, drafter_path: Path, extra: str = "") -> Path:
    """One sorted drafter serving one small target (k = 3), gRPC on any port, HTTP on a free one."""
    config = folder / "cluster.yaml"
    config.write_text(f"""
pools:
  draft: {{resources: {{draft: 1}}, num_cpus: 0.5}}
  target: {{resources: {{target: 1}}, num_cpus: 0.5}}
drafters:
  sorted: {{path: {drafter_path}, pool: draft}}
targets:
  small: {{path: {target_path}, pool: target, drafter: sorted, k: 3}}
server: {{grpc_port: 0, http_port: {free_port()}}}
{extra}
""")
    return config


def start_up(config: Path, log: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """Start `specfleet up --config` (and `flags`), its output to a file (a pipe could fill and block it); returns
    (process, host:port)."""
    with log.open("w") as output:
        process = subprocess.Popen([*CLI, "up", "--config", str(config), *flags], stdout=output, stderr=subprocess.STDOUT,
                                   text=True)
    return process, _wait_for_address(process, log)


def stop(process: subprocess.Popen) -> int:
    """Ctrl-C, so the server shuts its Ray cluster down; kill it if that takes too long. Returns its exit status."""
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def http_url(log: Path) -> str:
    """The OpenAI base URL a serving `specfleet up` printed."""
    return HTTP.search(log.read_text()).group(1)


def _wait_for_address(process: subprocess.Popen, log: Path, timeout_s: float = 300.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(r"serving gRPC on ([\d.]+:\d+)", log.read_text())
        if found:
            return found.group(1)
        if process.poll() is not None:
            pytest.fail(f"specfleet up exited with {process.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    process.kill()
    pytest.fail(f"specfleet up did not serve within {timeout_s:.0f} s: {log.read_text()[-2000:]}")


def greedy_http_tokens(base_url: str, prompt: str, max_tokens: int) -> list[int]:
    """The token ids of a plain greedy completion of the tiny config's target over HTTP."""
    body = {"model": "small", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    reply = requests.post(f"{base_url}/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["token_ids"]


def serving_process_names(process: subprocess.Popen) -> list[str]:
    """The names of `up`'s process and every process it started (Ray's daemons and workers)."""
    return [found["name"] for found in process_tree_peaks(process.pid)]
