"""Starting a one-machine Ray cluster whose actors run at the priority of everything else.

Ray starts its worker processes at nice 15 (`RAY_worker_niceness`), below the raylet,
the GCS and any client on the machine. In specfleet the actors are the workload:
a target actor at nice 15 on a machine with few cores yields its core to the client
and to Ray's own processes whenever they wake (measured: the default niceness here
is 15). So the clusters specfleet starts itself run their workers at nice 0, unless
the operator set the variable. Images for KubeRay set it too (Dockerfile).
"""

import os

import ray

WORKER_NICENESS = "RAY_worker_niceness"


def start_local_ray(**init_args) -> None:
    """`ray.init(address="local", ...)` with workers at normal priority (read by the raylet at start)."""
    os.environ.setdefault(WORKER_NICENESS, "0")
    ray.init(address="local", **init_args)
