"""`specfleet up`: run the Serve application on Ray (gRPC and HTTP) until interrupted (`cluster.up_run`).

Only the arguments live here: building the CLI's parser must not import Ray or torch.
"""

import argparse
from pathlib import Path


def add_up_command(subparsers) -> None:
    parser = subparsers.add_parser("up", help="start drafters, targets and the controller on Ray; serve gRPC and HTTP")
    parser.add_argument("--config", type=Path, help="cluster config YAML (default: the zoo's drafter serving its three targets)")
    parser.add_argument("--address", help="join an existing Ray cluster (e.g. 'auto'); default: start a local one")
    parser.add_argument("--host", help="bind address for gRPC and HTTP (default: the config's)")
    parser.add_argument("--port", type=int, help="gRPC port, 0 for any free one (default: the config's)")
    parser.add_argument("--http-port", type=int, help="HTTP port (default: the config's)")
    parser.add_argument("--api-keys-file", type=Path, help="file of API keys, one per line (default: the config's)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate: serve gRPC and HTTP over TLS (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, help="PEM CA: both doors require client certificates it signed")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without API keys (only where every client is trusted)")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="Serve's and the replicas' log level on this terminal (default: WARNING)")
    parser.add_argument("--access-log", action="store_true",
                        help="log every HTTP request and every call Serve routes (off by default)")
    parser.add_argument("--serve-proxy", action="store_true",
                        help="serve HTTP through Ray Serve's HTTP proxy (as a Serve config deployment does) instead of "
                        "from the front door beside gRPC: three more Ray hops per request, about 30 ms on two cores")
    parser.set_defaults(func=_run_up)


def _run_up(args: argparse.Namespace) -> int:
    from cluster.up_run import run_up

    return run_up(args)
