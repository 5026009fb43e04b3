"""`specfleet up` as a user runs it: a subprocess serving gRPC and HTTP, stopped with Ctrl-C (SIGINT).

The benchmark talks to it only over the wire. `specfleet up` starts its own
local Ray cluster, so the Ray daemons and the actor processes are all
descendants of that subprocess: their peak memory is read from the process
tree, and any of them still alive after shutdown are ended by pid.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from bench.memory import process_name, process_tree_peaks

READY = re.compile(r"serving gRPC on (\S+):(\d+)")
HTTP = re.compile(r"HTTP on (https?://\S+)")
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 90.0


def write_config(folder: Path, targets: dict[str, str], drafters: dict[str, str], pairing: dict[str, str],
                 exit_layer: int, k: int, compiles: tuple[str, str] = ("auto", "auto"), placement: str = "actor") -> Path:
    """A cluster config: drafters on a `draft` pool, targets on a `target` pool, each target paired as given.

    Pools reserve no CPUs so that every actor fits on a small machine; the
    cores are shared, as they would be on one node. `compiles`: how the targets and the drafters run;
    `placement`: the drafters' (`DrafterConfig.placement`).
    """
    config = {
        "pools": {"draft": {"resources": {"draft": 1}, "num_cpus": 0}, "target": {"resources": {"target": 1}, "num_cpus": 0}},
        "drafters": {name: {"path": path, "pool": "draft", "compile": compiles[1], "placement": placement}
                     for name, path in drafters.items()},
        "targets": {name: {"path": path, "pool": "target", "drafter": pairing[name], "exit_layer": exit_layer, "k": k,
                           "compile": compiles[0]} for name, path in targets.items()},
        "server": {"grpc_port": 0, "max_concurrent_requests": 1024},
    }
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    """A TCP port nobody listens on right now (for `--http-port`, which takes no 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ClusterProcess:
    """A running `specfleet up`: `address` is its gRPC HOST:PORT, `http_url` its OpenAI base URL (None if not printed)."""

    def __init__(self, config_path: Path, threads: int, log_path: Path):
        # OMP_NUM_THREADS reaches the actor processes through Ray. RAY_ADDRESS=local makes `up` start a
        # Ray instance of its own even when another one (`ray start`) runs on this machine, which a
        # bare ray.init() would join.
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "RAY_ADDRESS": "local"}
        self.log = open(log_path, "w")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "up", "--config", str(config_path), "--port", "0",
             "--http-port", str(free_port())],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )
        self.address, self.http_url = self._wait_until_serving()
        self.start_s = time.perf_counter() - started
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _wait_until_serving(self) -> tuple[str, str | None]:
        found: list[tuple[str, str | None]] = []

        def read() -> None:
            for line in self.process.stdout:
                self.log.write(line)
                match = READY.search(line)
                if match:
                    http = HTTP.search(line)
                    found.append((f"{match.group(1)}:{match.group(2)}", http.group(1) if http else None))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        if not found:
            exited = self.process.poll()
            self.stop()
            why = f"exited with status {exited}" if exited is not None else f"did not serve within {START_TIMEOUT_S:.0f} s"
            raise RuntimeError(f"specfleet up {why} (log: {self.log.name})")
        return found[0]

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.log.write(line)

    def peaks(self) -> list[dict]:
        return process_tree_peaks(self.process.pid)

    def stop(self) -> None:
        """Ctrl-C, as a user stops it; whatever of its tree outlives that is killed by pid."""
        tree = [(p["pid"], p["name"]) for p in self.peaks()[1:]]
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid, name in tree:
            if process_name(pid) == name:  # still the process we started, not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if getattr(self, "_drainer", None) is not None:
            self._drainer.join(10)
        self.log.close()
