"""The transport-neutral front door shared by the gRPC router and the HTTP app.

It validates a request (the wire contract's `GenerateRequest`, which the HTTP
app fills from OpenAI-style JSON), picks the least busy replica of the target,
and streams the sequence's updates from its target actor. Each transport only
maps these errors to its own status codes:

- `ModelNotFound`: NOT_FOUND / 404
- `InvalidRequest`: INVALID_ARGUMENT / 400
- `Overloaded`: RESOURCE_EXHAUSTED / 429 (too many requests in flight here, or a replica's KV slots and queue full)
- `ReplicaFailed`: UNAVAILABLE / 503

When the caller stops reading before the sequence finished (client gone,
deadline passed, error), the sequence is cancelled on its actor, which frees it
there and on the drafter.
"""

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray.exceptions import RayActorError

from actors.engine import SequenceUpdate
from actors.errors import CapacityExhausted, InvalidRequest, ModelNotFound, SpecfleetError
from actors.loading import load_tokenizer
from actors.sampling import SamplingParams
from actors.speculation import SpeculationSpec
from cluster.metrics import RequestObserver, RequestTimer
from cluster.placement import Fleet
from cluster.requests import ModelLimits, prompt_ids, sampling_params, speculation_spec
from specfleet.v1 import generation_pb2 as pb


class Overloaded(SpecfleetError):
    """Too many requests in flight."""


class ReplicaFailed(SpecfleetError):
    """The target replica serving a request died."""


@dataclass(frozen=True)
class Admitted:
    """A validated request, bound to the replica that serves it."""

    model: str
    handle: object
    seq_id: str
    tokenizer: object
    prompt: list[int]
    params: SamplingParams
    speculation: SpeculationSpec  # validated here, carried as is to the engine


class Frontend:
    def __init__(self, fleet: Fleet, observer: RequestObserver | None = None):
        """`observer` is told of every finished request (e.g. `SpecfleetMetrics`, or the controller's client)."""
        self.config = fleet.config
        self.observer = observer
        self.tokenizers = {name: load_tokenizer(t.path) for name, t in self.config.targets.items()}
        self.use_fleet(fleet)
        self._load: dict[int, int] = {}  # id(handle) -> requests in flight on that replica
        self._in_flight = 0
        self._stopped_early: dict[str, str] = {}  # seq_id -> the outcome its caller gave it

    def use_fleet(self, fleet: Fleet) -> None:
        """Route new requests to this fleet (the controller replaced or added replicas)."""
        self.fleet = fleet
        self.limits = {name: ModelLimits(fleet.infos[name][0]["vocab_size"], fleet.infos[name][0]["max_context"])
                       for name in fleet.targets}

    def admit(self, request: pb.GenerateRequest) -> Admitted:
        """Validate a request and bind it to a replica; raises the errors listed in the module docstring."""
        if request.model not in self.fleet.targets:
            raise ModelNotFound(f"unknown model {request.model!r}; known: {sorted(self.fleet.targets)}")
        limits, tokenizer = self.limits[request.model], self.tokenizers[request.model]
        prompt = prompt_ids(request, tokenizer, limits)
        params = sampling_params(request, self.config.server.default_max_tokens, len(prompt), limits)
        target = self.config.targets[request.model]
        max_exit = self.fleet.infos[target.drafter][0]["max_exit"] if target.drafter else None
        speculation = speculation_spec(request.speculation, target, max_exit)
        if self._in_flight >= self.config.server.max_concurrent_requests:
            raise Overloaded("too many requests in flight; retry later")
        handle = min(self.fleet.targets[request.model], key=lambda h: self._load.get(id(h), 0))
        return Admitted(request.model, handle, uuid.uuid4().hex, tokenizer, prompt, params, speculation)

    async def updates(self, admitted: Admitted) -> AsyncIterator[SequenceUpdate]:
        """The sequence's updates, one per round, the last with its finish reason."""
        self._enter(admitted, +1)
        timer, outcome = RequestTimer(self.observer, admitted.model) if self.observer else None, "cancelled"
        try:
            stream = admitted.handle.generate.options(num_returns="streaming").remote(
                admitted.seq_id, admitted.prompt, admitted.params, admitted.speculation
            )
            async for ref in stream:
                update: SequenceUpdate = await ref
                if timer is not None:
                    timer.tokens(len(update.new_tokens))
                outcome = update.finish_reason or outcome
                yield update
        except InvalidRequest:
            outcome = "invalid"
            raise
        except CapacityExhausted:
            outcome = "overloaded"
            raise Overloaded(f"every KV slot of {admitted.model} is taken and its queue is full; retry later") from None
        except RayActorError as err:
            outcome = "failed"
            raise ReplicaFailed(f"target replica failed: {type(err).__name__}") from None
        finally:
            self._enter(admitted, -1)
            if outcome not in ("stop", "length"):  # unfinished: free the sequence on the actors
                admitted.handle.cancel.remote(admitted.seq_id)
            if timer is not None:
                timer.finish(self._stopped_early.pop(admitted.seq_id, outcome))

    def stop_early(self, admitted: Admitted) -> None:
        """The caller ends the sequence on purpose (a stop string): count it as "stop", not as a cancellation."""
        self._stopped_early[admitted.seq_id] = "stop"

    def models(self) -> pb.ListModelsResponse:
        infos = self.fleet.infos
        models = [
            pb.ModelInfo(name=name, role="drafter", max_context=infos[name][0]["max_context"],
                         replicas=len(self.fleet.drafters[name]), exit_layers=infos[name][0]["exit_layers"])
            for name in self.fleet.drafters
        ]
        models += [
            pb.ModelInfo(name=name, role="target", max_context=self.limits[name].max_context,
                         replicas=len(self.fleet.targets[name]), drafter=t.drafter or "",
                         exit_layer=t.exit_layer or 0, k=t.k if t.drafter else 0, via=t.via)
            for name, t in self.config.targets.items()
        ]
        return pb.ListModelsResponse(models=models)

    def stats(self, admitted: Admitted, update: SequenceUpdate) -> pb.SpeculationStats:
        """The request's counters, and the speculation of its last round (the plan may change mid-request)."""
        target, s = self.config.targets[admitted.model], update.stats
        stats = pb.SpeculationStats(
            drafted=s.drafted, accepted=s.accepted, target_forwards=s.target_forwards,
            mean_accepted_length=s.mean_accepted_length, acceptance_rate=s.acceptance_rate, deferred=s.deferred,
        )
        exit_layer, k = update.arm
        if k:
            stats.drafter, stats.k = target.drafter, k
            stats.exit_layer = exit_layer or 0  # the engine resolved the deepest exit; 0: a drafter without exits
        return stats

    def _enter(self, admitted: Admitted, delta: int) -> None:
        self._in_flight += delta
        self._load[id(admitted.handle)] = self._load.get(id(admitted.handle), 0) + delta


def usage(prompt: list[int], tokens: list[int]) -> pb.Usage:
    return pb.Usage(prompt_tokens=len(prompt), completion_tokens=len(tokens), total_tokens=len(prompt) + len(tokens))
