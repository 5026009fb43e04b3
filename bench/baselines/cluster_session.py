"""specfleet through the full cluster path: client -> front door -> target actor (drafter embedded, or its own actor).

Starts `specfleet up` (Ray Serve: gRPC front door and OpenAI-compatible HTTP
ingress over the same fleet) with one target paired with the drafter, and
streams every request over the transport its mode names: "grpc/plain",
"grpc/speculative", "http/plain", "http/speculative". Plain asks for
speculation OFF on the same server; speculative asks for FIXED speculation
with the configured drafter exit and k (not the controller's adaptive plan),
so every system speculates with the same pair. `concurrency` client threads
share one gRPC channel or one HTTP connection pool.
"""

import tempfile
from pathlib import Path

import grpc

from bench.baselines import grpc_client, openai_http
from bench.baselines.cluster_process import ClusterProcess, write_config
from bench.closed_loop import run_closed_loop
from bench.metrics import RequestTrace, SpeculationCounts
from specfleet.v1 import generation_pb2_grpc as pb_grpc

DRAFTER = "drafter"


class Session:
    def __init__(self, settings: dict, modes: list[str]):
        self.settings = settings
        self.folder = Path(tempfile.mkdtemp(prefix="specfleet-bench-cluster-"))
        self.model = Path(settings["target"]).name
        config = write_config(self.folder, {self.model: settings["target"]}, {DRAFTER: settings["drafter"]},
                              {self.model: DRAFTER}, settings["exit_layer"], settings["k"],
                              (settings["compile"], settings["drafter_compile"]), settings["drafter_placement"])
        self.cluster = ClusterProcess(config, settings["threads"], self.folder / "up.log")
        if any(m.startswith("http/") for m in modes) and self.cluster.http_url is None:
            self.cluster.stop()
            raise RuntimeError("specfleet up did not print an HTTP address")
        self.channel = grpc.insecure_channel(self.cluster.address)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.http = openai_http.Clients()

    def info(self) -> dict:
        return {"load_s": self.cluster.start_s, "grpc": self.cluster.address, "http": self.cluster.http_url,
                "model": self.model, "speculation": self.speculation(), "drafter_placement": self.settings["drafter_placement"]}

    def speculation(self) -> dict:
        return {"drafter": DRAFTER, "exit_layer": self.settings["exit_layer"], "k": self.settings["k"]}

    def run(self, mode: str, cell: dict) -> tuple[list[RequestTrace], SpeculationCounts | None]:
        transport, how = mode.split("/")
        speculation = self.speculation() if how == "speculative" else None

        def send(index: int, prompt: list[int]) -> RequestTrace:
            args = (self.model, prompt, self.settings["max_tokens"], cell["temperature"], cell["seed"] + index, speculation)
            if transport == "grpc":
                return grpc_client.stream(self.stub, grpc_client.stream_request(*args))
            return openai_http.stream(self.http.get(), self.cluster.http_url, openai_http.completion_body(*args))

        return run_closed_loop(cell["prompts"], cell["concurrency"], send), None

    def close(self) -> None:
        self.http.close()
        self.channel.close()
        self.cluster.stop()
