"""`specfleet up`: run the Serve application on Ray (gRPC and HTTP) until interrupted."""

import argparse
import os
import signal
import threading
from pathlib import Path

import ray
from ray import serve

from cluster.config import ClusterConfig, default_config, load_config
from cluster.serve.app import build_app_from_config

APP_NAME = "specfleet"


def add_up_command(subparsers) -> None:
    parser = subparsers.add_parser("up", help="start drafters, targets and the controller on Ray; serve gRPC and HTTP")
    parser.add_argument("--config", type=Path, help="cluster config YAML (default: the zoo's drafter serving its three targets)")
    parser.add_argument("--address", help="join an existing Ray cluster (e.g. 'auto'); default: start a local one")
    parser.add_argument("--host", help="bind address for gRPC and HTTP (default: the config's)")
    parser.add_argument("--port", type=int, help="gRPC port, 0 for any free one (default: the config's)")
    parser.add_argument("--http-port", type=int, help="HTTP port (default: the config's)")
    parser.set_defaults(func=run_up)


def run_up(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else default_config()
    host = args.host or config.server.host
    http_port = args.http_port or config.server.http_port
    ray.init(address=args.address) if args.address else ray.init(address="local", **local_ray_resources(config))
    try:
        serve.start(http_options={"host": host, "port": http_port, "location": "HeadOnly"})
        ingress = serve.run(build_app_from_config(config, host, config.server.grpc_port if args.port is None else args.port),
                            name=APP_NAME, route_prefix="/")
        grpc_port = ingress.grpc_port.remote().result()
        print(f"specfleet: serving gRPC on {host}:{grpc_port} and HTTP on http://{host}:{http_port}/v1 "
              f"(targets: {', '.join(config.targets)}; drafters: {', '.join(config.drafters) or 'none'})", flush=True)
        _wait_for_interrupt()
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def local_ray_resources(config: ClusterConfig) -> dict:
    """A one-machine Ray cluster that carries every pool's resources for every replica it may scale to."""
    models = [*config.drafters.values(), *config.targets.values()]
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
