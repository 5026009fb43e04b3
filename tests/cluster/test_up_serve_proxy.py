"""`specfleet up --serve-proxy`: HTTP through Ray Serve's HTTP proxy and the ingress replica, as a Serve config
deployment (KubeRay) serves it. A module of its own: two clusters at once are too much for a two-core machine."""

import json
import subprocess

from up_server import CLI, greedy_http_tokens, http_url, serving_process_names, start_up, stop, tiny_cluster_config


def test_the_serve_proxy_flag_serves_http_through_ray_serves_proxy(tmp_path, target_path, drafter_path):
    log = tmp_path / "up.log"
    process, address = start_up(tiny_cluster_config(tmp_path, target_path, drafter_path), log, "--serve-proxy")
    try:
        names = serving_process_names(process)
        assert any("ProxyActor" in name for name in names) and any("HttpIngress" in name for name in names)
        grpc_reply = subprocess.run([*CLI, "generate", "--server", address, "--model", "small", "--max-tokens", "12", "--json",
                                     "def f(x):"], capture_output=True, text=True, timeout=300)
        assert greedy_http_tokens(http_url(log), "def f(x):", 12) == json.loads(grpc_reply.stdout)["token_ids"]
    finally:
        assert stop(process) == 0
