"""A fleet under a FleetController (a plain Ray actor with a long period: tests call `step()`), behind gRPC."""

import time
from contextlib import contextmanager

import grpc
import ray

from cluster.config import ClusterConfig
from cluster.controller.actor import FleetController
from cluster.controller.client import ControllerClient
from cluster.server import BackgroundServer
from specfleet.v1 import generation_pb2_grpc as pb_grpc


@contextmanager
def controlled_fleet(config: ClusterConfig):
    """Yields (the controller's handle, a gRPC stub of a server over its fleet); stops both on exit."""
    handle = ray.remote(FleetController).options(max_concurrency=16).remote(config)
    _, fleet = ray.get(handle.snapshot.remote())
    server = BackgroundServer(fleet, controller=ControllerClient(handle))
    try:
        with grpc.insecure_channel(server.address) as channel:
            yield handle, pb_grpc.GenerationStub(channel)
    finally:
        server.stop()
        ray.get(handle.shutdown.remote())


def step_until(controller, condition, what: str, timeout_s: float = 180.0):
    """Take control steps until `condition(fleet)` holds for the controller's fleet (a replacement is installed at
    the step after it loaded); returns that fleet."""
    deadline = time.monotonic() + timeout_s
    while True:
        ray.get(controller.step.remote())
        _, fleet = ray.get(controller.snapshot.remote())
        if condition(fleet):
            return fleet
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.5)
