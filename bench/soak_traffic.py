"""The soak's moving parts: clients that check every answer, a reaper that kills actors, a memory sampler.

Clients send greedy and sampled requests over gRPC (streaming and unary) and
HTTP (streaming completions) and record each request's outcome; a greedy
answer is compared token for token with the target's own greedy
output computed in this process, and every answer must have all its tokens
(requests ignore end-of-sequence), so tokens lost count what is missing or wrong.
HTTP answers carry their token ids (the `return_token_ids` extension).
"""

import json
import random
import threading
import time
from dataclasses import asdict, dataclass

import grpc
import ray
import requests

from bench.memory import private_rss_mib
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc

TRANSPORTS = ("grpc-stream", "grpc-unary", "http-stream")
VICTIMS = ("controller", "grpc front door", "http ingress", "drafter", "target")
SERVE_REPLICAS = {"controller": "FleetController", "grpc front door": "FrontDoor", "http ingress": "HttpIngress"}
REQUEST_TIMEOUT_S = 300.0
GREEDY_SHARE = 0.7


@dataclass
class Outcome:
    started_s: float  # since the soak began
    seconds: float
    transport: str
    target: str
    temperature: float
    code: str  # "OK", a gRPC status name, an HTTP status, or the client error's type
    tokens: int
    lost: int  # tokens missing or, for greedy requests, different from the target's own


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    expected: dict[tuple[str, int], list[int]]  # (target, prompt index) -> greedy tokens
    max_tokens: int


class Client(threading.Thread):
    """Sends requests one after another until `stop` is set; a failed one is recorded, then the next goes."""

    def __init__(self, seed: int, grpc_address: str, http_url: str, workload: Workload, began: float,
                 stop: threading.Event, outcomes: list[Outcome]):
        super().__init__(daemon=True)
        self.rng, self.workload, self.began, self.stop, self.outcomes = random.Random(seed), workload, began, stop, outcomes
        self.stub = pb_grpc.GenerationStub(grpc.insecure_channel(grpc_address))
        self.http_url = http_url

    def run(self) -> None:
        targets = sorted({target for target, _ in self.workload.expected})
        while not self.stop.is_set():
            transport, target = self.rng.choice(TRANSPORTS), self.rng.choice(targets)
            index = self.rng.randrange(len(self.workload.prompts))
            temperature = 0.0 if self.rng.random() < GREEDY_SHARE else 1.0
            started = time.monotonic()
            code, tokens, lost = self._send(transport, target, index, temperature)
            self.outcomes.append(Outcome(started - self.began, time.monotonic() - started, transport, target,
                                         temperature, code, tokens, lost))
            if code != "OK":
                time.sleep(1.0)  # a client backs off before it retries with its next request

    def _send(self, transport: str, target: str, index: int, temperature: float) -> tuple[str, int, int]:
        try:
            if transport == "http-stream":
                return self._http(target, index, temperature)
            return self._grpc(transport, target, index, temperature)
        except grpc.RpcError as err:
            return err.code().name, 0, 0
        except requests.RequestException as err:
            return type(err).__name__, 0, 0

    def _grpc(self, transport: str, target: str, index: int, temperature: float) -> tuple[str, int, int]:
        request = pb.GenerateRequest(model=target, token_ids=pb.TokenIds(ids=self.workload.prompts[index]),
                                     max_tokens=self.workload.max_tokens, temperature=temperature, ignore_eos=True)
        if transport == "grpc-unary":
            tokens = list(self.stub.Generate(request, timeout=REQUEST_TIMEOUT_S).token_ids)
        else:
            tokens = [t for m in self.stub.GenerateStream(request, timeout=REQUEST_TIMEOUT_S) for t in m.token_ids]
        return "OK", len(tokens), self._lost_tokens(target, index, temperature, tokens)

    def _http(self, target: str, index: int, temperature: float) -> tuple[str, int, int]:
        body = {"model": target, "prompt": self.workload.prompts[index], "max_tokens": self.workload.max_tokens,
                "temperature": temperature, "stream": True, "ignore_eos": True, "return_token_ids": True}
        tokens: list[int] = []
        with requests.post(f"{self.http_url}/completions", json=body, stream=True, timeout=REQUEST_TIMEOUT_S) as reply:
            if reply.status_code != 200:
                return f"HTTP {reply.status_code}", 0, 0
            for line in reply.iter_lines(decode_unicode=True):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    return "stream error event", 0, 0
                tokens += [t for choice in chunk.get("choices", []) for t in choice.get("token_ids") or []]
        return "OK", len(tokens), self._lost_tokens(target, index, temperature, tokens)

    def _lost_tokens(self, target: str, index: int, temperature: float, tokens: list[int]) -> int:
        missing = self.workload.max_tokens - len(tokens)
        if temperature != 0:
            return missing
        expected = self.workload.expected[(target, index)]
        return missing + sum(a != b for a, b in zip(tokens, expected))


class Reaper(threading.Thread):
    """Kills a random actor every `every_s` seconds: a Serve replica (controller, front doors) or a fleet actor."""

    def __init__(self, controller, app: str, every_s: float, seed: int, began: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.controller, self.app, self.every_s, self.began, self.stop = controller, app, every_s, began, stop
        self.rng = random.Random(seed)
        self.kills: list[dict] = []

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            victim = self.rng.choice(VICTIMS)
            try:
                self.kills.append({"at_s": round(time.monotonic() - self.began, 1), "victim": self._kill(victim)})
            except Exception as err:  # noqa: BLE001 - e.g. the controller is still restarting: try again next time
                self.kills.append({"at_s": round(time.monotonic() - self.began, 1), "victim": victim,
                                   "skipped": type(err).__name__})

    def _kill(self, victim: str) -> str:
        if victim in SERVE_REPLICAS:
            ray.kill(serve_replica(self.app, SERVE_REPLICAS[victim]), no_restart=True)
            return victim
        _, fleet = self.controller.snapshot.remote().result(timeout_s=30)
        models = fleet.drafters if victim == "drafter" else fleet.targets
        model = self.rng.choice(sorted(models))
        replica = self.rng.randrange(len(models[model]))
        ray.kill(models[model][replica])
        return f"{victim} {model}/{replica}"


def serve_replica(app: str, deployment: str):
    """The actor of a Serve deployment's only replica (LookupError unless exactly one runs)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")]
    if len(names) != 1:
        raise LookupError(f"expected one replica of {deployment}, found {names}")
    return ray.get_actor(names[0], namespace="serve")


class MemorySampler(threading.Thread):
    """Every `every_s`, the private resident memory (RssAnon) of each fleet actor, by model and replica."""

    def __init__(self, controller, every_s: float, began: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.controller, self.every_s, self.began, self.stop = controller, every_s, began, stop
        self.samples: list[dict] = []

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                _, fleet = self.controller.snapshot.remote().result(timeout_s=30)
            except Exception:  # noqa: BLE001 - the controller restarting: sample at the next tick
                continue
            rss = {f"{name}/{replica}": _rounded(private_rss_mib(info["pid"]))
                   for name, infos in fleet.infos.items() for replica, info in enumerate(infos)}
            self.samples.append({"at_s": round(time.monotonic() - self.began, 1), "rss_mib": rss})


def _rounded(mib: float | None) -> float | None:
    return None if mib is None else round(mib, 1)  # None: the process died since the snapshot


def outcome_dicts(outcomes: list[Outcome]) -> list[dict]:
    return [asdict(o) for o in outcomes]
