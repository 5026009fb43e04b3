"""The gRPC front door: validates requests, picks a target replica, streams its tokens back.

Each request becomes one sequence on one target actor, which runs the
speculation loop with its paired drafter. The router owns only tokenizers and
handles: no model runs here. When the client cancels or its deadline passes,
the sequence is cancelled on the actor, which frees it on both models.
"""

import itertools
import uuid
from dataclasses import dataclass

import grpc
from ray.exceptions import RayActorError

from actors.engine import SequenceUpdate
from actors.errors import InvalidRequest
from actors.loading import load_tokenizer
from actors.sampling import SamplingParams
from cluster.placement import Fleet
from cluster.requests import ModelLimits, prompt_ids, sampling_params, speculation_overrides
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc

FINISH_REASONS = {"stop": pb.STOP, "length": pb.LENGTH}


@dataclass(frozen=True)
class _Admitted:
    """A validated request, bound to the replica that serves it."""

    handle: object
    seq_id: str
    tokenizer: object
    prompt: list[int]
    params: SamplingParams
    speculation: dict  # per-sequence overrides: k, exit_layer


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.server_config = fleet.config.server
        self.tokenizers = {name: load_tokenizer(t.path) for name, t in fleet.config.targets.items()}
        self.limits = {name: ModelLimits(info[0]["vocab_size"], info[0]["max_context"])
                       for name, info in fleet.infos.items() if name in fleet.targets}
        self._replica = {name: itertools.cycle(handles) for name, handles in fleet.targets.items()}
        self._in_flight = 0

    async def Generate(self, request, context):
        admitted = await self._admit(request, context)
        tokens, last = [], None
        async for update in self._updates(admitted, context):
            tokens.extend(update.new_tokens)
            last = update
        return pb.GenerateResponse(
            model=request.model, text=admitted.tokenizer.decode(tokens), token_ids=tokens,
            finish_reason=FINISH_REASONS[last.finish_reason], usage=_usage(admitted.prompt, tokens),
            speculation=self._stats(admitted, request.model, last),
        )

    async def GenerateStream(self, request, context):
        admitted = await self._admit(request, context)
        tokens, sent = [], 0  # sent: characters of text already streamed
        async for update in self._updates(admitted, context):
            tokens.extend(update.new_tokens)
            text = admitted.tokenizer.decode(tokens)
            done = update.finish_reason is not None
            ready = len(text) if done or not text.endswith("\ufffd") else sent  # hold back half a character
            message = pb.GenerateStreamResponse(text=text[sent:ready], token_ids=update.new_tokens)
            sent = max(sent, ready)
            if done:
                message.finish_reason = FINISH_REASONS[update.finish_reason]
                message.usage.CopyFrom(_usage(admitted.prompt, tokens))
                message.speculation.CopyFrom(self._stats(admitted, request.model, update))
            yield message

    async def ListModels(self, request, context):
        config = self.fleet.config
        models = [
            pb.ModelInfo(name=name, role="drafter", max_context=self.fleet.infos[name][0]["max_context"],
                         replicas=d.replicas, exit_layers=self.fleet.infos[name][0]["exit_layers"])
            for name, d in config.drafters.items()
        ]
        models += [
            pb.ModelInfo(name=name, role="target", max_context=self.limits[name].max_context, replicas=t.replicas,
                         drafter=t.drafter or "", exit_layer=t.exit_layer or 0, k=t.k if t.drafter else 0)
            for name, t in config.targets.items()
        ]
        return pb.ListModelsResponse(models=models)

    async def _admit(self, request, context) -> "_Admitted":
        """Validate a request and pick its replica, or abort the call with the right status."""
        if request.model not in self.fleet.targets:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}; known: {sorted(self.fleet.targets)}")
        limits, tokenizer = self.limits[request.model], self.tokenizers[request.model]
        try:
            prompt = prompt_ids(request, tokenizer, limits)
            params = sampling_params(request, self.server_config.default_max_tokens, len(prompt), limits)
            speculation = speculation_overrides(request.speculation, self.fleet.config.targets[request.model])
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if self._in_flight >= self.server_config.max_concurrent_requests:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests in flight; retry later")
        return _Admitted(next(self._replica[request.model]), uuid.uuid4().hex, tokenizer, prompt, params, speculation)

    async def _updates(self, admitted: "_Admitted", context):
        """Yield the sequence's updates from its target actor; free it there unless it finished."""
        self._in_flight += 1
        finished = False
        try:
            stream = admitted.handle.generate.options(num_returns="streaming").remote(
                admitted.seq_id, admitted.prompt, admitted.params, **admitted.speculation
            )
            async for ref in stream:
                update: SequenceUpdate = await ref
                finished = update.finish_reason is not None
                yield update
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except RayActorError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"target replica failed: {type(err).__name__}")
        finally:
            self._in_flight -= 1
            if not finished:  # client cancelled, deadline passed, or an error: free the sequence on the actors
                admitted.handle.cancel.remote(admitted.seq_id)

    def _stats(self, admitted: "_Admitted", model: str, update: SequenceUpdate) -> pb.SpeculationStats:
        """The request's counters, and the speculation it asked for (its overrides, else the target's plan)."""
        target, s = self.fleet.config.targets[model], update.stats
        stats = pb.SpeculationStats(
            drafted=s.drafted, accepted=s.accepted, target_forwards=s.target_forwards,
            mean_accepted_length=s.mean_accepted_length, acceptance_rate=s.acceptance_rate,
        )
        k = admitted.speculation.get("k", target.k) if target.drafter else 0
        if k:
            deepest = max(self.fleet.infos[target.drafter][0]["exit_layers"])
            stats.drafter, stats.k = target.drafter, k
            stats.exit_layer = admitted.speculation.get("exit_layer") or target.exit_layer or deepest
        return stats


def _usage(prompt: list[int], tokens: list[int]) -> pb.Usage:
    return pb.Usage(prompt_tokens=len(prompt), completion_tokens=len(tokens), total_tokens=len(prompt) + len(tokens))
