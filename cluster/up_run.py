"""What `specfleet up` runs: the Serve application on a local (or joined) Ray cluster until interrupted."""

import argparse
import os
import signal
import sys
import threading

import ray
from ray import serve

from actors.cpu_affinity import apply_layout, plan_layout
from cluster.auth import ApiKeys, check_exposure
from cluster.config import ClusterConfig, TlsConfig, default_config, load_config
from cluster.serve.app import build_app_from_config
from cluster.serve.http_door import HttpBinding

APP_NAME = "specfleet"


def run_up(args: argparse.Namespace) -> int:
    config = with_flags(load_config(args.config) if args.config else default_config(), args)
    host = args.host or config.server.host
    http_port = args.http_port or config.server.http_port
    try:
        check_exposure(host, ApiKeys.from_config(config.server), args.insecure)
    except ValueError as err:
        print(f"specfleet up: {err}", file=sys.stderr)
        return 2
    if args.address:
        ray.init(address=args.address)
    else:
        start_local_ray(config)
    try:
        grpc_port = run_app(config, args, host, http_port).grpc_port.remote().result()
        scheme = "https" if config.server.tls else "http"
        print(f"specfleet: serving gRPC on {host}:{grpc_port} and HTTP on {scheme}://{host}:{http_port}/v1 "
              f"(targets: {', '.join(config.targets)}; drafters: {', '.join(config.drafters) or 'none'})", flush=True)
        _wait_for_interrupt()
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def run_app(config: ClusterConfig, args: argparse.Namespace, host: str, http_port: int):
    """Start Serve and run the app; returns its ingress handle. HTTP comes from the front door beside gRPC
    (cluster/serve/http_door.py), or with `--serve-proxy` through Serve's HTTP proxy as in a Serve config deployment."""
    logging_config = {"log_level": args.log_level, "enable_access_log": args.access_log}
    grpc_port = config.server.grpc_port if args.port is None else args.port
    if args.serve_proxy:
        serve.start(http_options={"host": host, "port": http_port, "location": "HeadOnly", **https_options(config.server.tls)},
                    logging_config=logging_config)
        app, route_prefix = build_app_from_config(config, host, grpc_port), "/"
    else:
        serve.start(proxy_location="Disabled", logging_config=logging_config)
        http = HttpBinding(host=host, port=http_port, access_log=args.access_log)
        app, route_prefix = build_app_from_config(config, host, grpc_port, http), None
    return serve.run(app, name=APP_NAME, route_prefix=route_prefix, logging_config=logging_config)


def with_flags(config: ClusterConfig, args: argparse.Namespace) -> ClusterConfig:
    """The config with the command line's API key file and TLS files in its server section."""
    server = config.server
    if args.api_keys_file:
        server = server.model_copy(update={"api_keys_file": args.api_keys_file})
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("specfleet up: --tls-cert and --tls-key go together")
        server = server.model_copy(update={"tls": TlsConfig(cert_file=args.tls_cert, key_file=args.tls_key,
                                                            client_ca_file=args.tls_client_ca)})
    return config.model_copy(update={"server": server})


def https_options(tls: TlsConfig | None) -> dict:
    """Serve's HTTP proxy options for TLS (Serve verifies no client certificates; the gRPC door does)."""
    if tls is None:
        return {}
    return {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}


def start_local_ray(config: ClusterConfig) -> None:
    """A Ray cluster of this machine's own, its CPUs laid out between models and the rest as the config says."""
    layout = plan_layout(os.sched_getaffinity(0)) if config.server.cpu_layout == "auto" else None
    if layout is not None:
        apply_layout(layout)  # before Ray starts: its daemons and workers inherit the control CPUs
    ray.init(address="local", **local_ray_resources(config))


def local_ray_resources(config: ClusterConfig) -> dict:
    """A one-machine Ray cluster that carries every pool's resources for every replica it may scale to (an embedded
    drafter has no actor, so it needs none)."""
    models = [*(d for d in config.drafters.values() if not d.embedded), *config.targets.values()]
    resources: dict[str, float] = {}
    for model in models:
        most = model.autoscale.max_replicas if model.autoscale else model.replicas
        for name, amount in config.pools[model.pool].resources.items():
            resources[name] = resources.get(name, 0.0) + amount * most
    cpus = sum(config.pools[m.pool].num_cpus * m.replicas for m in models)
    return {"num_cpus": max(os.cpu_count() or 1, int(cpus + 0.999)), "resources": resources}


def _wait_for_interrupt() -> None:
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
