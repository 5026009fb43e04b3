"""`specfleet up` as a user runs it: a process serving gRPC, called by `specfleet generate --server`."""

import json
import subprocess
import time

import pytest
from up_server import CLI, start_up, stop, tiny_cluster_config


@pytest.fixture(scope="module")
def server(tmp_path_factory, target_path, drafter_path):
    folder = tmp_path_factory.mktemp("up")
    config = tiny_cluster_config(folder, target_path, drafter_path, extra="controller: {adaptive: false}")
    process, address = start_up(config, folder / "up.log")
    yield process, address
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
    assert stop(process) == 0
