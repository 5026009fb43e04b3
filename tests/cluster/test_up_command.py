"""`specfleet up` as a user runs it: a process serving gRPC, called by `specfleet generate --server`."""

import json
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "cluster.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, target_path, drafter_path):
    config = tmp_path_factory.mktemp("up") / "cluster.yaml"
    config.write_text(f"""
pools:
  draft: {{resources: {{draft: 1}}, num_cpus: 0.5}}
  target: {{resources: {{target: 1}}, num_cpus: 0.5}}
drafters:
  sorted: {{path: {drafter_path}, pool: draft}}
targets:
  small: {{path: {target_path}, pool: target, drafter: sorted, k: 3}}
server: {{grpc_port: 0, http_port: {free_port()}}}
controller: {{adaptive: false}}
""")
    process = subprocess.Popen([*CLI, "up", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        found = re.search(r"serving gRPC on ([\d.]+:\d+)", line)
        if found:
            break
    else:
        pytest.fail(f"specfleet up exited with {process.wait()}: {process.stderr.read()[-2000:]}")
    yield process, found.group(1)
    if process.poll() is None:
        process.kill()


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_generate_through_the_server_matches_local_plain_decoding(server, target_path):
    _, address = server
    remote = run("generate", "--server", address, "--model", "small", "--max-tokens", 12, "--json", "def f(x):")
    local = run("generate", "--target", target_path, "--no-spec", "--max-tokens", 12, "--json", "def f(x):")
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
    remote_report, local_report = json.loads(remote.stdout), json.loads(local.stdout)
    assert remote_report["token_ids"] == local_report["token_ids"] and len(local_report["token_ids"]) == 12
    assert remote_report["text"] == local_report["text"]
    assert remote_report["drafter"] == "sorted" and remote_report["k"] == 3


def test_server_errors_reach_the_user_as_one_line(server):
    _, address = server
    unknown = run("generate", "--server", address, "--model", "nope", "hi")
    assert unknown.returncode == 2 and "NOT_FOUND: unknown model 'nope'" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_status_shows_the_plan_and_the_arms_used(server):
    _, address = server
    assert run("generate", "--server", address, "--model", "small", "--max-tokens", 12, "def g(y):").returncode == 0
    time.sleep(2.5)  # a control step collects the rounds
    status = run("status", "--server", address, "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["plans"] == [{"target": "small", "drafter": "sorted", "exit_layer": 0, "k": 3, "replicas": 1, "reason": "configured"}]
    arm = next(p for p in report["pairs"] if p["drafter"] == "sorted")
    assert int(arm["rounds"]) > 0 and int(arm["drafted"]) >= int(arm["accepted"])
    assert "acceptance per arm" in run("status", "--server", address).stdout


def test_interrupt_shuts_down_cleanly(server):
    process, _ = server
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0
