"""`specfleet up` as a user runs it: a process serving gRPC, called by `specfleet generate --server`."""

import json
import os
import subprocess
import time

import pytest
from up_server import CLI, greedy_http_tokens, http_url, serving_process_names, start_up, stop, tiny_cluster_config

from actors.cpu_affinity import plan_layout
from bench.memory import process_tree_peaks


@pytest.fixture(scope="module")
def server(tmp_path_factory, target_path, drafter_path):
    folder = tmp_path_factory.mktemp("up")
    config = tiny_cluster_config(folder, target_path, drafter_path, extra="controller: {adaptive: false}")
    process, address = start_up(config, folder / "up.log")
    yield process, address, folder / "up.log"
    if process.poll() is None:
        process.kill()


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_generate_through_the_server_matches_local_plain_decoding(server, target_path):
    _, address, _ = server
    remote = run("generate", "--server", address, "--model", "small", "--max-tokens", 12, "--json", "def f(x):")
    local = run("generate", "--target", target_path, "--no-spec", "--max-tokens", 12, "--json", "def f(x):")
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
    remote_report, local_report = json.loads(remote.stdout), json.loads(local.stdout)
    assert remote_report["token_ids"] == local_report["token_ids"] and len(local_report["token_ids"]) == 12
    assert remote_report["text"] == local_report["text"]
    assert remote_report["drafter"] == "sorted" and remote_report["k"] == 3


def test_http_is_served_by_the_front_door_beside_grpc(server):
    """No Serve HTTP proxy and no ingress replica: the front door answers HTTP with gRPC's tokens."""
    process, address, log = server
    grpc_reply = run("generate", "--server", address, "--model", "small", "--max-tokens", 12, "--json", "def f(x):")
    assert greedy_http_tokens(http_url(log), "def f(x):", 12) == json.loads(grpc_reply.stdout)["token_ids"]
    names = serving_process_names(process)
    assert any("FrontDoor" in name for name in names)
    assert not any("ProxyActor" in name or "HttpIngress" in name for name in names)


def test_server_errors_reach_the_user_as_one_line(server):
    _, address, _ = server
    unknown = run("generate", "--server", address, "--model", "nope", "hi")
    assert unknown.returncode == 2 and "NOT_FOUND: unknown model 'nope'" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_status_shows_the_plan_and_the_arms_used(server):
    _, address, _ = server
    assert run("generate", "--server", address, "--model", "small", "--max-tokens", 12, "def g(y):").returncode == 0
    time.sleep(2.5)  # a control step collects the rounds
    status = run("status", "--server", address, "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["plans"] == [{"target": "small", "drafter": "sorted", "exit_layer": 0, "k": 3, "replicas": 1, "reason": "configured",
                               "tree": ""}]
    arm = next(p for p in report["pairs"] if p["drafter"] == "sorted")
    assert int(arm["rounds"]) > 0 and int(arm["drafted"]) >= int(arm["accepted"])
    text = run("status", "--server", address).stdout
    assert "acceptance per arm" in text and "k 3" in text
    assert [r["role"] for r in report["replicas"]] == ["drafter", "target"]  # each actor's ping: live sequences, answered
    assert all(r["answered"] and int(r["live_sequences"]) == 0 for r in report["replicas"]) and "actors" in text


def test_the_terminal_stays_quiet_by_default(server):
    """No per-call access log lines from Serve (the front doors poll the controller every second)."""
    log = server[2].read_text()
    assert " CALL " not in log and "serving gRPC on" in log


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a CPU layout needs two CPUs")
def test_the_models_run_on_their_cpus_and_everything_else_on_the_last(server):
    """The default `cpu_layout: auto` on this machine: read back from the running processes."""
    process, _, _ = server
    layout = plan_layout(os.sched_getaffinity(0))
    workers = [(found["pid"], found["name"]) for found in process_tree_peaks(process.pid)]
    models = [pid for pid, name in workers if name.startswith(("ray::TargetActor", "ray::DrafterActor"))]
    others = [pid for pid, name in workers if name.startswith(("ray::ServeReplica", "ray::ProxyActor"))]
    assert len(models) == 2 and others
    assert all(os.sched_getaffinity(pid) == layout.model_cpus for pid in models)
    assert all(os.sched_getaffinity(pid) == layout.control_cpus for pid in [process.pid, *others])


def test_a_non_loopback_address_without_api_keys_is_refused(tmp_path, target_path, drafter_path):
    config = tiny_cluster_config(tmp_path, target_path, drafter_path)
    refused = run("up", "--config", config, "--host", "0.0.0.0")
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("specfleet up: refusing to serve on 0.0.0.0 without API keys: set "
                                      "server.api_keys_file or server.api_keys_env, or pass --insecure to serve it "
                                      "unauthenticated")


def test_interrupt_shuts_down_cleanly(server):
    process, _, _ = server
    assert stop(process) == 0
