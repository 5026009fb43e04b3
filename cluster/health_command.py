"""`specfleet health`: the gRPC front door's standard health status, for operators and Kubernetes exec probes.

An exec probe because Kubernetes' own gRPC probe speaks plaintext only, and the
manifests serve the gRPC door over TLS. It exits 0 only when the door answers
SERVING (a target replica answered the controller's last ping).
"""

import argparse

from cluster.client import Credentials, add_credential_arguments, health_remote


def add_health_command(subparsers) -> None:
    parser = subparsers.add_parser("health", help="check a running server's gRPC health (exit 0 when SERVING)")
    parser.add_argument("--server", default="127.0.0.1:50051", help="gRPC address of a running `specfleet up` or Serve app")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    add_credential_arguments(parser, api_key=False)
    parser.set_defaults(func=run_health)


def run_health(args: argparse.Namespace) -> int:
    status = health_remote(args.server, args.timeout, Credentials.from_args(args))
    print(status)
    return 0 if status == "SERVING" else 1
