"""Several Ray nodes with different resources on one machine (`ray.cluster_utils.Cluster`), for tests and benchmarks.

Pools map to Ray resources, so placement across "nodes" is exercised for real:
each simulated node runs its own raylet, and actor calls between them cross
processes as they would across machines.
"""

from contextlib import contextmanager

import ray
from ray.cluster_utils import Cluster


@contextmanager
def simulated_cluster(head: dict, **nodes: dict):
    """Start a head node and named worker nodes (each given Ray node args, e.g. num_cpus and resources),
    connect this process to them, and yield every node's id by name ("head" for the head); shut all down on exit."""
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        ids = {"head": cluster.head_node.node_id}
        ids |= {name: cluster.add_node(**args).node_id for name, args in nodes.items()}
        ray.init(address=cluster.address)
        try:
            yield ids
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()
