"""The transport-neutral front door shared by the gRPC router and the HTTP app.

It validates a request (the wire contract's `GenerateRequest`, which the HTTP
app fills from OpenAI-style JSON), picks the least busy replica of the target,
and streams the sequence's updates from its target actor (through this door's feed
from that replica, `cluster.feeds`). Each transport only
maps these errors to its own status codes:

- `ModelNotFound`: NOT_FOUND / 404
- `InvalidRequest`: INVALID_ARGUMENT / 400
- `Overloaded`: RESOURCE_EXHAUSTED / 429 (too many requests in flight on the fleet or for one API key
  (`cluster.admission`), or a replica's KV slots and queue full)
- `ReplicaFailed`: UNAVAILABLE / 503 (the target's replicas died under the request, and it could not resume)

When the caller stops reading before the sequence finished (client gone,
deadline passed, error), the sequence is cancelled on its actor, which frees it
there and on the drafter.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from ray.exceptions import RayActorError, RayTaskError

from actors.engine import SequenceUpdate
from actors.engine_loop import take_update
from actors.errors import CapacityExhausted, InvalidRequest, ModelNotFound, SpecfleetError
from actors.loading import load_tokenizer
from actors.ray_actors import actor_id
from actors.sampling import SamplingParams
from actors.speculation import SpeculationSpec
from cluster.admission import ConcurrencyLimits, Overloaded
from cluster.auth import ApiKeys
from cluster.feeds import DoorFeeds
from cluster.metrics import RequestObserver, RequestTimer
from cluster.placement import Fleet
from cluster.requests import ModelLimits, prompt_ids, sampling_params, speculation_spec
from specfleet.v1 import generation_pb2 as pb

RESUME_POLL_S = 0.2  # how often a stream to resume looks for a live replica in the fleet


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
    key: str | None = None  # the fingerprint of the API key it came with (None: authentication off)


class Frontend:
    def __init__(self, fleet: Fleet, observer: RequestObserver | None = None, healing: bool = False):
        """`observer` is told of every finished request (e.g. `SpecfleetMetrics`, or the controller's client);
        `healing`: a controller replaces dead replicas (and `use_fleet` brings them here), so a stream whose
        replica died may wait for the replacement."""
        self.config = fleet.config
        self.observer = observer
        self.healing = healing
        self.tokenizers = {name: load_tokenizer(t.path) for name, t in self.config.targets.items()}
        self.use_fleet(fleet)
        self._load: dict[str, int] = {}  # actor id -> requests in flight on that replica
        server = self.config.server
        self.api_keys = ApiKeys.from_config(server)
        self.in_flight = ConcurrencyLimits(server.max_concurrent_requests, server.max_concurrent_requests_per_key)
        self._stopped_early: dict[str, str] = {}  # seq_id -> the outcome its caller gave it
        self.feeds = DoorFeeds()

    def use_fleet(self, fleet: Fleet) -> None:
        """Route new requests to this fleet (the controller replaced or added replicas)."""
        self.fleet = fleet
        server = fleet.config.server
        self.limits = {name: ModelLimits(fleet.infos[name][0]["vocab_size"], fleet.infos[name][0]["max_context"],
                                         server.max_prompt_chars, server.max_tokens_limit)
                       for name in fleet.targets}

    async def admit(self, request: pb.GenerateRequest, authorization: str | None = None) -> Admitted:
        """Validate a request and bind it to a replica; raises the errors listed in the module docstring.

        `authorization`: what the client presented (the door has already checked it), so that the request
        counts towards its key's limit. Tokenizing runs on a worker thread, so a long prompt holds up no
        other request on the event loop. The request is counted in flight once its updates start.
        """
        key = self.api_keys.fingerprint(authorization) if self.api_keys is not None else None
        self.in_flight.check(key)
        return await asyncio.to_thread(self._admit, request, key)

    def _admit(self, request: pb.GenerateRequest, key: str | None) -> Admitted:
        if request.model not in self.fleet.targets:
            raise ModelNotFound(f"unknown model {request.model!r}; known: {sorted(self.fleet.targets)}")
        limits, tokenizer = self.limits[request.model], self.tokenizers[request.model]
        prompt = prompt_ids(request, tokenizer, limits)
        params = sampling_params(request, self.config.server.default_max_tokens, len(prompt), limits)
        target = self.config.targets[request.model]
        exits = self.fleet.infos[target.drafter][0]["exit_layers"] if target.drafter else None
        speculation = speculation_spec(request.speculation, target, exits, self.config.uses_trees(request.model))
        handle = self._least_busy(self.fleet.targets[request.model])
        return Admitted(request.model, handle, uuid.uuid4().hex, tokenizer, prompt, params, speculation, key)

    async def updates(self, admitted: Admitted) -> AsyncIterator[SequenceUpdate]:
        """The sequence's updates, one per round, the last with its finish reason.

        If its target replica dies, the sequence resumes on another live replica of the
        target (with a controller, its replacement once loaded) from the prompt and the
        tokens already sent, at most `resume_attempts` times: the caller sees a pause,
        not an error. Greedy output equals an uninterrupted run's; sampled output still
        follows the target's distribution, but a seeded request's draws after a resume
        differ from an uninterrupted run's. The last update's speculation counters cover
        the replica that finished the sequence.
        """
        self.in_flight.acquire(admitted.key)  # a burst may have passed admit's check together
        timer, outcome = RequestTimer(self.observer, admitted.model) if self.observer else None, "cancelled"
        sent: list[int] = []
        dead: list[object] = []  # replicas that died under this sequence
        handle, seq_id = admitted.handle, admitted.seq_id
        try:
            while True:
                try:
                    async with aclosing(self._replica_updates(handle, seq_id, admitted, sent)) as updates:
                        async for update in updates:
                            if timer is not None:
                                timer.tokens(len(update.new_tokens))
                            outcome = update.finish_reason or outcome
                            sent.extend(update.new_tokens)
                            yield update
                    return
                except RayActorError:
                    dead.append(handle)
                    handle = await self._replica_to_resume_on(admitted.model, dead)
                    seq_id = f"{admitted.seq_id}.{len(dead)}"
        except InvalidRequest as err:
            outcome = "invalid"
            raise InvalidRequest(own_message(err)) from None
        except CapacityExhausted:
            outcome = "overloaded"
            raise Overloaded(f"every KV slot of {admitted.model} is taken and its queue is full; retry later") from None
        except ReplicaFailed:
            outcome = "failed"
            raise
        finally:
            self.in_flight.release(admitted.key)
            if timer is not None:
                timer.finish(self._stopped_early.pop(admitted.seq_id, outcome))

    async def _replica_updates(self, handle, seq_id: str, admitted: Admitted,
                               sent: list[int]) -> AsyncIterator[SequenceUpdate]:
        """The sequence's updates from one replica, continuing after the tokens already `sent`; the sequence
        is cancelled there (and so freed on the drafter) if the caller stops reading before it finished."""
        params = admitted.params
        if sent:
            params = params.model_copy(update={"max_tokens": params.max_tokens - len(sent)})
        key, finished = actor_id(handle), False
        self._load[key] = self._load.get(key, 0) + 1
        updates = self.feeds.open(handle, seq_id)
        try:
            handle.submit.remote(self.feeds.door, seq_id, admitted.prompt + sent, params, admitted.speculation)
            while not finished:
                update = take_update(await updates.get())
                finished = update.finish_reason is not None
                yield update
        finally:
            self._load[key] -= 1
            self.feeds.close(handle, seq_id)
            if not finished:
                handle.cancel.remote(seq_id)

    async def _replica_to_resume_on(self, model: str, dead: list):
        """The least busy live replica of `model` other than those that died under the sequence; while none
        is in the fleet, wait for the controller's replacement (up to `resume_wait_s`). `ReplicaFailed` once
        the sequence used up its resume attempts, or nothing came."""
        server = self.config.server
        if len(dead) > server.resume_attempts:
            raise ReplicaFailed(f"the replicas of {model} serving this request failed; retry later")
        gone = {actor_id(h) for h in dead}
        waited_s = 0.0
        while True:
            live = [h for h in self.fleet.targets[model] if actor_id(h) not in gone]
            if live:
                return self._least_busy(live)
            if not self.healing or waited_s >= server.resume_wait_s:
                raise ReplicaFailed(f"no replica of {model} can serve this request now; retry later")
            await asyncio.sleep(RESUME_POLL_S)
            waited_s += RESUME_POLL_S

    def _least_busy(self, handles: list):
        """The replica with the fewest requests in flight from this front door."""
        return min(handles, key=lambda h: self._load.get(actor_id(h), 0))

    def stop_early(self, admitted: Admitted) -> None:
        """The caller ends the sequence on purpose (a stop string): count it as "stop", not as a cancellation."""
        self._stopped_early[admitted.seq_id] = "stop"

    def models(self) -> pb.ListModelsResponse:
        infos = self.fleet.infos
        models = [
            pb.ModelInfo(name=name, role="drafter", max_context=infos[name][0]["max_context"],
                         replicas=len(infos[name]), exit_layers=infos[name][0]["exit_layers"])
            for name in self.config.drafters if infos.get(name)
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
            stats.drafter, stats.k, stats.tree = target.drafter, k, update.tree
            stats.exit_layer = exit_layer or 0  # the engine resolved the deepest exit; 0: a drafter without exits
        return stats


def own_message(err: Exception) -> str:
    """The message of an error raised in an actor, without Ray's wrapping (task name, pid, IP, actor id, traceback)."""
    return str(err.cause) if isinstance(err, RayTaskError) else str(err)


def usage(prompt: list[int], tokens: list[int]) -> pb.Usage:
    return pb.Usage(prompt_tokens=len(prompt), completion_tokens=len(tokens), total_tokens=len(prompt) + len(tokens))
