"""The HTTP app: OpenAI-compatible completions, the Explorer page and its JSON endpoints.

>>> app = create_app(model, tokenizer, model_name="gpt2")  # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP

Every error, whatever raised it, is answered as `{"error": {"message", "type", "param",
"code"}}`: validation problems are 400 (not FastAPI's 422) naming the field.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from gpt2kit.engine import DecodeStep
from gpt2kit.model import GPT2
from gpt2kit.server.completions import Context, Limits, complete, start_stream
from gpt2kit.server.explorer_routes import explorer_router
from gpt2kit.server.protocol import (
    APIError,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)
from gpt2kit.server.worker import Worker
from gpt2kit.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PROTECTED = ("/v1/", "/api/")  # paths that need the API key when one is set
ERRORS = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in [
        (400, "invalid request (the error names the field)"),
        (401, "missing or wrong API key"),
        (413, "request body too large"),
        (429, "too many requests in flight"),
    ]
}


def create_app(
    model: GPT2,
    tokenizer: Tokenizer,
    *,
    model_name: str,
    api_key: str | None = None,
    limits: Limits | None = None,
    batching: bool = True,
    max_batch_size: int = 8,
    max_pending: int = 64,
    max_body_bytes: int = 1_000_000,
    step: DecodeStep | None = None,
) -> FastAPI:
    """A FastAPI app serving `model`; its engine thread starts now and stops at shutdown.

    `max_pending` caps the requests queued or running (429 beyond), `max_batch_size` the
    rows decoded together (the engine's cache slots), `max_body_bytes` the request body (413
    beyond), `step` the decode step (eager by default; `gpt2kit.compiled` builds compiled ones).
    """
    worker = Worker(
        model,
        eos_token_id=_eos(tokenizer, model),
        batching=batching,
        slots=max_batch_size,
        max_pending=max_pending,
        step=step,
    )
    ctx = Context(worker, tokenizer, model_name, limits or Limits())
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.stop()

    app = FastAPI(
        title="gpt2kit",
        summary="OpenAI-compatible completions and the GPT-2 Explorer",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.worker = worker
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    _error_handlers(app)
    # Declares the bearer scheme in the OpenAPI document; Guard enforces it.
    bearer = [Security(HTTPBearer(auto_error=False))] if api_key else []

    @app.get("/health", response_model=Health, tags=["server"])
    def health() -> Health:
        """Liveness and load; never needs the API key."""
        return Health(model=model_name, requests_in_flight=worker.load, auth_required=api_key is not None)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, dependencies=bearer, tags=["openai"])
    def models() -> ModelList:
        """The one model this server serves."""
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={
            **ERRORS,
            200: {
                "description": "a completion, or with stream=true server-sent events of the same shape "
                "followed by `data: [DONE]`",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            404: {"model": ErrorResponse, "description": "unknown model"},
            504: {"model": ErrorResponse, "description": "request timed out"},
        },
        dependencies=bearer,
        tags=["openai"],
    )
    async def completions(body: CompletionRequest, request: Request):
        """Complete prompts like OpenAI's legacy completions API (also scoring: echo + max_tokens 0)."""
        if body.stream:
            return StreamingResponse(
                start_stream(body, ctx),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await complete(body, ctx, request.is_disconnected)

    app.include_router(explorer_router(model, tokenizer), dependencies=bearer, responses=ERRORS)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _openapi_without_422(app)
    return app


def _openapi_without_422(app: FastAPI) -> None:
    """FastAPI documents a 422 on every route; this server answers validation errors with 400."""
    default = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = default()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _version() -> str:
    from gpt2kit import __version__

    return __version__


def _eos(tokenizer: Tokenizer, model: GPT2) -> int:
    return tokenizer.special_tokens.get("<|endoftext|>", model.config.eos_token_id)


# --- errors ------------------------------------------------------------------------------


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_error(_validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 400:  # FastAPI's "There was an error parsing the body"
            message = "request body could not be parsed; send a JSON object"
        elif exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}; see /docs"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs"
        return JSONResponse(
            APIError(exc.status_code, message).body(), status_code=exc.status_code, headers=exc.headers
        )


def _validation_error(errors: list[dict]) -> APIError:
    """The first problem, as one line naming the field (and the fix where we know it)."""
    if not errors:
        return APIError(400, "invalid request body")
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    kind = e.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"request body is not valid JSON ({e.get('msg', '')})", code="invalid_json")
    if not loc:
        return APIError(400, "request body must be a JSON object with the documented fields")
    field = loc[0]
    if kind == "extra_forbidden":
        return APIError(400, f"unknown field {field!r}; see /docs for the accepted fields", param=field)
    if kind == "missing":
        return APIError(400, f"{field} is required", param=field)
    msg = e.get("msg", "invalid value")
    if len(errors) > 1 and field == "prompt":
        msg = "must be a string, a list of strings, a list of token ids or a list of token-id lists"
    return APIError(400, f"{field}: {msg}", param=field)


def _json_error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class Guard:
    """ASGI middleware run before routing: API key, body size and UTF-8 checks.

    The body is read here (at most `max_body_bytes`) so an oversized request is refused
    without buffering it, and invalid UTF-8 gets a clear 400 instead of a parse error.
    """

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith(PROTECTED):
            given = headers.get(b"authorization", b"")
            expected = f"Bearer {self.api_key}".encode()
            if not hmac.compare_digest(given, expected):
                what = "missing" if not given else "wrong"
                err = APIError(
                    401,
                    f"API key {what}; send the header 'Authorization: Bearer <key>'",
                    type="invalid_request_error",
                    code="invalid_api_key",
                )
                await _json_error(err)(scope, receive, send)
                return
        too_big = APIError(
            413,
            f"request body exceeds {self.max_body_bytes} bytes; send a smaller request",
            code="request_too_large",
        )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _json_error(too_big)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                await _json_error(too_big)(scope, receive, send)
                return
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            err = APIError(400, f"request body is not valid UTF-8 (byte {e.start}); send UTF-8 JSON")
            await _json_error(err)(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the client to disconnect

        await self.app(scope, replay, send)
