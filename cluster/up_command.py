"""`specfleet up`: start the actors of a cluster config on Ray and serve gRPC until interrupted."""

import argparse
import asyncio
import os
import signal
from pathlib import Path

import ray

from cluster.config import ClusterConfig, default_config, load_config
from cluster.placement import start_fleet, stop_fleet
from cluster.server import start_server, stop_server


def add_up_command(subparsers) -> None:
    parser = subparsers.add_parser("up", help="start drafters and targets on Ray and serve gRPC")
    parser.add_argument("--config", type=Path, help="cluster config YAML (default: the zoo's drafter serving its three targets)")
    parser.add_argument("--address", help="join an existing Ray cluster (e.g. 'auto'); default: start a local one")
    parser.add_argument("--host", help="gRPC bind address (default: the config's)")
    parser.add_argument("--port", type=int, help="gRPC port, 0 for any free one (default: the config's)")
    parser.set_defaults(func=run_up)


def run_up(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else default_config()
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(**local_ray_resources(config))
    try:
        fleet = start_fleet(config)
        asyncio.run(_serve(fleet, args.host, args.port))
        stop_fleet(fleet)
    finally:
        ray.shutdown()
    return 0


def local_ray_resources(config: ClusterConfig) -> dict:
    """A one-machine Ray cluster that carries every pool's resources for every replica."""
    models = [*config.drafters.values(), *config.targets.values()]
    resources: dict[str, float] = {}
    for model in models:
        for name, amount in config.pools[model.pool].resources.items():
            resources[name] = resources.get(name, 0.0) + amount * model.replicas
    cpus = sum(config.pools[m.pool].num_cpus * m.replicas for m in models)
    return {"num_cpus": max(os.cpu_count() or 1, int(cpus + 0.999)), "resources": resources}


async def _serve(fleet, host, port) -> None:
    server, bound = await start_server(fleet, host, port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    print(f"specfleet: serving gRPC on {host or fleet.config.server.host}:{bound} "
          f"(targets: {', '.join(fleet.targets)}; drafters: {', '.join(fleet.drafters) or 'none'})", flush=True)
    await stopping.wait()
    await stop_server(server)
