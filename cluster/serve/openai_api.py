"""The OpenAI-compatible HTTP API over the shared `Frontend` (docs/http.md documents it).

`create_api()` returns the FastAPI app. Its handlers find their backend at
`app.state.source`, an object with

- `async def frontend(self) -> Frontend`,
- `async def metrics(self) -> tuple[bytes, str]` (Prometheus text and its content type),
- `async def ready(self) -> bool`,

so the same app runs inside a Ray Serve deployment and in tests over a fleet.
Requests become the wire contract's `GenerateRequest` (openai_models.py), so
HTTP and gRPC share one generation path; this module only shapes OpenAI's
responses and chunks and maps the frontend's errors to HTTP statuses.
"""

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.auth import AUTHORIZATION, ApiKeys
from cluster.frontend import Admitted
from cluster.serve.completion import Piece, completion_pieces
from cluster.config import ServerConfig
from cluster.serve.errors import (BodyLimit, ClientDisconnected, error_event, install_error_handlers, not_ready,
                                  unauthenticated)
from cluster.serve.openai_models import ChatCompletionBody, CompletionBody, GenerationBody
from specfleet.v1 import generation_pb2 as pb

router = APIRouter()


def create_api(api_keys: ApiKeys | None = None, protect_metrics: bool = False,
               max_request_bytes: int = ServerConfig.model_fields["max_request_bytes"].default) -> FastAPI:
    """With `api_keys`, every /v1 route (and /metrics when `protect_metrics`) needs `Authorization: Bearer <key>`;
    a body above `max_request_bytes` gets 413."""
    app = FastAPI(title="specfleet", summary="OpenAI-compatible completions over a speculative decoding cluster")
    app.state.created = int(time.time())
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    if api_keys is not None:
        protected = ("/v1/", "/metrics") if protect_metrics else ("/v1/",)
        app.middleware("http")(_require_key(api_keys, protected))
    return app


def _require_key(api_keys: ApiKeys, protected: tuple[str, ...]):
    async def check(request: Request, call_next):
        if request.url.path.startswith(protected) and not api_keys.allows(request.headers.get(AUTHORIZATION)):
            return unauthenticated()
        return await call_next(request)

    return check


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request) -> Response:
    return await _generate(request, body, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionBody, request: Request) -> Response:
    return await _generate(request, body, chat=True)


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    frontend = await request.app.state.source.frontend()
    targets = [m for m in frontend.models().models if m.role == "target"]
    return {"object": "list", "data": [_model_card(m, request.app.state.created) for m in targets]}


@router.get("/health")
async def health(request: Request) -> Response:
    if await request.app.state.source.ready():
        return JSONResponse({"status": "ok"})
    return not_ready()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = await request.app.state.source.metrics()
    return Response(body, media_type=content_type)


@dataclass(frozen=True)
class Reply:
    """What every chunk of one response shares, and how its choices look."""

    body: GenerationBody
    admitted: Admitted
    chat: bool
    created: int

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.admitted.seq_id}"

    def envelope(self, stream: bool) -> dict:
        kind = {(False, False): "text_completion", (False, True): "text_completion",
                (True, False): "chat.completion", (True, True): "chat.completion.chunk"}[(self.chat, stream)]
        return {"id": self.id, "object": kind, "created": self.created, "model": self.admitted.model}

    def whole(self, text: str, tokens: list[int], last: Piece) -> dict:
        content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": last.finish_reason}
        if self.body.return_token_ids:
            choice |= {"prompt_token_ids": self.admitted.prompt, "token_ids": tokens}
        return {**self.envelope(stream=False), "choices": [choice], "usage": _fields(last.usage),
                "speculation": _fields(last.speculation)}

    def chunk(self, piece: Piece) -> dict:
        content = {"delta": {"content": piece.text} if piece.text else {}} if self.chat else {"text": piece.text}
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": piece.finish_reason}
        if self.body.return_token_ids:
            choice["token_ids"] = piece.token_ids
            if piece.finish_reason:
                choice["prompt_token_ids"] = self.admitted.prompt
        chunk = {**self.envelope(stream=True), "choices": [choice]}
        if piece.finish_reason:
            chunk["speculation"] = _fields(piece.speculation)
        return self._with_usage(chunk, None)

    def role_chunk(self) -> dict:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._with_usage({**self.envelope(stream=True), "choices": [choice]}, None)

    def usage_chunk(self, last: Piece) -> dict:
        return self._with_usage({**self.envelope(stream=True), "choices": []}, _fields(last.usage))

    def _with_usage(self, chunk: dict, usage: dict | None) -> dict:
        """With stream_options.include_usage every chunk has a usage field, null but in the last."""
        return chunk | {"usage": usage} if self.body.include_usage else chunk


async def _generate(request: Request, body: GenerationBody, chat: bool) -> Response:
    frontend = await request.app.state.source.frontend()
    admitted = await frontend.admit(body.generate_request(), request.headers.get(AUTHORIZATION))
    reply = Reply(body, admitted, chat, int(time.time()))
    pieces = completion_pieces(frontend, admitted, body.stop_strings)
    if not body.stream:
        return JSONResponse(await _until_disconnected(request, _whole(reply, pieces)))
    try:  # the first piece before the headers: errors the actor raises at admission still get their status
        first = await _until_disconnected(request, anext(pieces))
    except BaseException:
        await pieces.aclose()
        raise
    return EventStream(_events(reply, first, pieces), media_type="text/event-stream")


async def _whole(reply: Reply, pieces: AsyncIterator[Piece]) -> dict:
    texts, tokens = [], []
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            texts.append(piece.text)
            tokens.extend(piece.token_ids)
    return reply.whole("".join(texts), tokens, piece)


async def _events(reply: Reply, first: Piece, pieces: AsyncIterator[Piece]) -> AsyncIterator[str]:
    """The SSE stream: chunks, the usage chunk if asked for, then [DONE]; an error event ends it early."""
    async with contextlib.aclosing(pieces):
        try:
            if reply.chat:
                yield _sse(reply.role_chunk())
            last = first
            yield _sse(reply.chunk(first))
            async for last in pieces:
                yield _sse(reply.chunk(last))
            if reply.body.include_usage:
                yield _sse(reply.usage_chunk(last))
            yield "data: [DONE]\n\n"
        except Exception as err:  # the status is sent already: report in the stream, then end it
            yield error_event(err)


class EventStream(StreamingResponse):
    """A streaming response that closes its body iterator however the stream ends.

    Closing it closes the frontend's iterator, which cancels the sequence:
    a client that goes away mid-stream frees its sequence on the actors.
    """

    async def stream_response(self, send) -> None:
        async with contextlib.aclosing(self.body_iterator):
            await super().stream_response(send)


async def _until_disconnected(request: Request, work: Awaitable):
    """Await `work`, cancelling it if the client disconnects first (raises ClientDisconnected)."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        task.cancel()
        await asyncio.wait({task})  # let a cancelled generation clean up (cancel its sequence)
    if task in done:
        return task.result()
    raise ClientDisconnected()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(chunk: dict) -> str:
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"


def _fields(message) -> dict:
    """A proto message's fields as a dict of plain values (json_format would write 64-bit ints as strings)."""
    return {field.name: getattr(message, field.name) for field in message.DESCRIPTOR.fields}


def _model_card(model: pb.ModelInfo, created: int) -> dict:
    plan = {"drafter": model.drafter or None, "exit_layer": model.exit_layer or None, "k": model.k}
    return {"id": model.name, "object": "model", "created": created, "owned_by": "specfleet",
            "max_model_len": model.max_context, "replicas": model.replicas, "speculation": plan}
