"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

The frontend's errors map as the gRPC router maps them (see cluster/frontend.py);
request bodies that fail validation get 400, not FastAPI's 422. Once a stream
has started its status is sent, so a later error travels as an SSE `error`
event with the same body, and the stream ends.
"""

import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from actors.errors import InvalidRequest, ModelNotFound, SpecfleetError
from cluster.admission import Overloaded
from cluster.auth import UNAUTHENTICATED_MESSAGE
from cluster.frontend import ReplicaFailed

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response; nobody reads it
RETRY_AFTER_S = 1  # what a 429 asks the client to wait before retrying

# error class -> (HTTP status, OpenAI error type, code)
ERRORS: dict[type[Exception], tuple[int, str, str | None]] = {
    ModelNotFound: (404, "invalid_request_error", "model_not_found"),
    InvalidRequest: (400, "invalid_request_error", None),
    Overloaded: (429, "rate_limit_error", "overloaded"),
    ReplicaFailed: (503, "server_error", "replica_failed"),
}
INTERNAL = (500, "server_error", None)


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def not_ready() -> JSONResponse:
    return error_response(503, "the cluster is not ready to serve", "server_error", code="not_ready")


def unauthenticated() -> JSONResponse:
    """401 as OpenAI answers a missing or wrong key."""
    response = error_response(401, UNAUTHENTICATED_MESSAGE, "invalid_request_error", code="invalid_api_key")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def error_event(err: Exception) -> str:
    """An error after the stream started, as one server-sent event (the openai client raises it as APIError)."""
    _, body = _describe(err)
    return f"event: error\ndata: {json.dumps(body)}\n\n"


def install_error_handlers(app: FastAPI) -> None:
    for kind in (*ERRORS, SpecfleetError, Exception):
        app.add_exception_handler(kind, _specfleet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnected, lambda request, err: Response(status_code=CLIENT_CLOSED_REQUEST))


def _describe(err: Exception) -> tuple[int, dict]:
    known = next((entry for kind, entry in ERRORS.items() if isinstance(err, kind)), None)
    if known is None:
        request_id = uuid.uuid4().hex[:12]
        log.error("request %s failed", request_id, exc_info=err)
        status, kind, code = INTERNAL
        return status, error_body(f"internal error (request id {request_id}); the server log has the details", kind, None, code)
    status, kind, code = known
    return status, error_body(str(err), kind, "model" if isinstance(err, ModelNotFound) else None, code)


async def _specfleet_error(request: Request, err: Exception) -> JSONResponse:
    status, body = _describe(err)
    return JSONResponse(body, status_code=status, headers={"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None)


def request_too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"request body exceeds this server's limit of {limit} bytes")


class BodyLimit:
    """ASGI middleware: a body above `limit` bytes gets 413, before it is read when it declares its length,
    else as soon as the bytes read pass the limit, so no oversized body is ever parsed or held whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = error_response(413, request_too_large(self.limit).detail, "invalid_request_error")
            # Closing the connection stops the upload; kept open, the server would read and drop the whole body
            # on its event loop (a 50 MB body held the front door's other requests up 0.5 s).
            response.headers["connection"] = "close"
            return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise request_too_large(self.limit)
            return message

        await self.app(scope, limited, send)


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = [_problem(e) for e in err.errors()]
    message = "; ".join(f"{where}: {what}" if where else what for where, what in problems)
    return error_response(400, message, "invalid_request_error", problems[0][0] or None)


def _problem(error: dict) -> tuple[str, str]:
    """(dotted parameter path, what is wrong) for one pydantic error."""
    where = ".".join(str(part) for part in error["loc"] if part != "body")
    if error["type"] == "json_invalid":
        return "", f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    if error["type"] == "missing" and not where:
        return "", "the request needs a JSON object body"
    if error["type"] == "extra_forbidden":
        return where, "this server does not support this parameter"
    return where, error["msg"].removeprefix("Value error, ")


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    kind = "invalid_request_error" if err.status_code < 500 else "server_error"
    return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code, headers=err.headers)
