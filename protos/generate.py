"""Regenerate the Python modules of the wire contract from the .proto files.

Run from anywhere: `python protos/generate.py`. The output is committed, so
clients need no protoc; tests/test_protos.py checks it is up to date.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent


def generate(out_dir: Path = PROTO_ROOT) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("specfleet/**/*.proto"))
    args = [f"-I{PROTO_ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(["protoc", *args]) != 0:
        sys.exit("protoc failed")


if __name__ == "__main__":
    generate()
