"""The gRPC front door: `specfleet.v1.Generation` over the shared `Frontend`.

The frontend validates, picks a replica and streams updates; this module only
maps its errors to status codes and its updates to messages.
"""

import contextlib
import logging
import uuid

import grpc

from actors.errors import InvalidRequest, ModelNotFound
from cluster.detokenize import TextStream
from cluster.admission import Overloaded
from cluster.auth import AUTHORIZATION
from cluster.frontend import Frontend, ReplicaFailed, usage
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
FINISH_REASONS = {"stop": pb.STOP, "length": pb.LENGTH}
STATUS_CODES = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ReplicaFailed: grpc.StatusCode.UNAVAILABLE,
}


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, frontend: Frontend, stats_source=None):
        """`stats_source`: an async callable returning a `GetStatsResponse` (the controller's); None: GetStats unavailable."""
        self.frontend = frontend
        self.stats_source = stats_source

    async def Generate(self, request, context):
        async with _status_codes(context):
            admitted = await self.frontend.admit(request, _authorization(context))
            tokens, last = [], None
            async for update in self.frontend.updates(admitted):
                tokens.extend(update.new_tokens)
                last = update
        return pb.GenerateResponse(
            model=request.model, text=admitted.tokenizer.decode(tokens), token_ids=tokens,
            finish_reason=FINISH_REASONS[last.finish_reason], usage=usage(admitted.prompt, tokens),
            speculation=self.frontend.stats(admitted, last),
        )

    async def GenerateStream(self, request, context):
        async with _status_codes(context):
            admitted = await self.frontend.admit(request, _authorization(context))
            text = TextStream(admitted.tokenizer)
            async for update in self.frontend.updates(admitted):
                done = update.finish_reason is not None
                message = pb.GenerateStreamResponse(text=text.add(update.new_tokens, final=done), token_ids=update.new_tokens)
                if done:
                    message.finish_reason = FINISH_REASONS[update.finish_reason]
                    message.usage.CopyFrom(usage(admitted.prompt, text.tokens))
                    message.speculation.CopyFrom(self.frontend.stats(admitted, update))
                yield message

    async def ListModels(self, request, context):
        return self.frontend.models()

    async def GetStats(self, request, context):
        if self.stats_source is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server runs without a controller, so it keeps no stats")
        return await self.stats_source()


def _authorization(context) -> str | None:
    """The API key the call presented (already checked by the server's interceptor)."""
    return dict(context.invocation_metadata() or ()).get(AUTHORIZATION)


@contextlib.asynccontextmanager
async def _status_codes(context):
    """Turn the frontend's errors into the call's status and a readable message; anything else is INTERNAL
    with a request id that the server log carries beside the details (never shown to the client)."""
    try:
        yield
    except tuple(STATUS_CODES) as err:
        code = next(code for kind, code in STATUS_CODES.items() if isinstance(err, kind))
        await context.abort(code, str(err))
    except Exception as err:  # noqa: BLE001 - the client gets no internal text
        if isinstance(err, grpc.aio.AbortError):
            raise
        request_id = uuid.uuid4().hex[:12]
        log.error("request %s failed", request_id, exc_info=err)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); the server log has the details")
