"""The HTTP app: OpenAI-compatible completions, the Explorer page and its JSON endpoints.

>>> app = create_app(model, tokenizer, model_name="gpt2")  # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP

Every error, whatever raised it, is answered as `{"error": {"message", "type", "param",
"code"}}`: validation problems are 400 (not FastAPI's 422) naming the field.

Health: `/health` answers 200 while the engine thread serves. Once it has failed (see
server/worker.py), `/health` and every request that needs the model answer 503 at once,
naming the failure, and requests in flight end with a 500; `on_engine_failure` (what
`gpt2kit serve --exit-on-engine-failure` uses) is called with the reason.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from gpt2kit.errors import TokenizerError
from gpt2kit.generation.engine import DecodeStep
from gpt2kit.generation.prompts import eos_id
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.server.explorer_routes import explorer_router
from gpt2kit.server.openai_completions import Context, Limits, run_completion, start_stream
from gpt2kit.server.protocol import (
    APIError,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
)
from gpt2kit.server.stepbuild import StepStatus
from gpt2kit.server.worker import Worker, WorkerBusy, WorkerUnavailable
from gpt2kit.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# Paths that need the API key when one is set: all but /health, the page and the API docs.
PROTECTED = ("/v1/", "/api/", "/tokenize", "/detokenize", "/tokenizer_info")
# An over-limit body is read and thrown away up to this many bytes before the 413 is sent,
# so a client that sends its whole body before reading still gets the answer (closing on
# unread data makes the kernel send a reset that destroys the unread response).
DRAIN_BYTES = 32 * 2**20
ERRORS = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in [
        (400, "invalid request (the error names the field)"),
        (401, "missing or wrong API key"),
        (413, "request body too large"),
        (429, "too many requests in flight (with a Retry-After header)"),
    ]
}
# The routes that run the model also answer 503 once the engine thread has failed.
MODEL_ERRORS = {
    **ERRORS,
    503: {"model": ErrorResponse, "description": "the engine thread has failed (the message says why)"},
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
    max_explorer_jobs: int = 16,
    on_engine_failure: Callable[[str], None] | None = None,
    deterministic: bool = False,
    step_status: StepStatus | None = None,
) -> FastAPI:
    """A FastAPI app serving `model`; its engine thread starts now and stops at shutdown.

    `max_pending` caps the requests queued or running (429 beyond), `max_batch_size` the
    rows decoded together (the engine's cache slots), `max_body_bytes` the request body (413
    beyond), `step` the decode step (eager by default; `gpt2kit.model.compiled` builds compiled ones),
    `max_explorer_jobs` the Explorer requests waiting for the engine thread (429 beyond).
    `on_engine_failure(reason)` is called (on the engine thread) if that thread fails.
    `deterministic` the engine's (a request's tokens don't depend on the requests beside it).
    `step_status`: what /health and /v1/models say of the decode step (`server/stepbuild.py`,
    whose `BackgroundBuild` swaps a compiled step in later); None: `step`, for good.
    """
    worker = Worker(
        model,
        eos_token_id=eos_id(model, tokenizer),
        batching=batching,
        slots=max_batch_size,
        max_pending=max_pending,
        step=step,
        max_jobs=max_explorer_jobs,
        on_failure=on_engine_failure,
        deterministic=deterministic,
    )
    app = _base_app(worker, api_key=api_key, max_body_bytes=max_body_bytes)
    # Declares the bearer scheme in the OpenAPI document; Guard enforces it.
    bearer = [Security(HTTPBearer(auto_error=False))] if api_key else []
    status = step_status or StepStatus.of(step)
    app.state.step_status = status
    app.include_router(_health_router(worker, model_name, status, auth_required=api_key is not None))
    ctx = Context(worker, tokenizer, model_name, limits or Limits())
    for router, errors in (
        (_openai_router(ctx, status), MODEL_ERRORS),
        (explorer_router(model, tokenizer, worker), MODEL_ERRORS),
        (_tokenizer_router(model, tokenizer, model_name), ERRORS),
    ):
        app.include_router(router, dependencies=bearer, responses=errors)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _openapi_without_422(app)
    return app


def _base_app(worker: Worker, *, api_key: str | None, max_body_bytes: int) -> FastAPI:
    """The app with no routes yet: its lifespan (which stops `worker`), the Guard and the error handlers."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.stop()
        # Here, not after uvicorn returns: on SIGTERM it re-raises the signal once shut down.
        for stop in app.state.on_shutdown:
            stop()

    app = FastAPI(
        title="gpt2kit",
        summary="OpenAI-compatible completions and the GPT-2 Explorer",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.worker = worker
    app.state.on_shutdown = []  # more to stop with the server (serve's background build)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    _error_handlers(app)
    return app


def _health_router(worker: Worker, model_name: str, status: StepStatus, *, auth_required: bool) -> APIRouter:
    router = APIRouter(tags=["server"])

    @router.get(
        "/health",
        response_model=Health,
        responses={503: {"model": ErrorResponse, "description": "the engine thread has failed"}},
    )
    def health() -> Health:
        """Liveness and load: 200 while the engine serves, 503 naming the failure once it has
        failed (requests then get 503 too); never needs the API key. `decode_step` says
        which step decodes (eager or compiled) and where a compiled one stands."""
        failure = worker.failure
        if failure is not None:
            raise _unavailable(failure)
        return Health(
            model=model_name,
            requests_in_flight=worker.load,
            auth_required=auth_required,
            decode_step=status.info(),
        )

    return router


def _openai_router(ctx: Context, status: StepStatus) -> APIRouter:
    """GET /v1/models and POST /v1/completions."""
    router = APIRouter(tags=["openai"])
    created = int(time.time())

    @router.get("/v1/models", response_model=ModelList)
    def models() -> ModelList:
        """The one model this server serves (`decode_step`: as in /health)."""
        return ModelList(data=[ModelCard(id=ctx.model_name, created=created, decode_step=status.info())])

    @router.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={
            200: {
                "description": "a completion, or with stream=true server-sent events of the same shape "
                "followed by `data: [DONE]`",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            404: {"model": ErrorResponse, "description": "unknown model"},
            504: {"model": ErrorResponse, "description": "request timed out"},
        },
    )
    async def completions(body: CompletionRequest, request: Request):
        """Complete prompts like OpenAI's legacy completions API (also scoring: echo + max_tokens 0)."""
        if body.stream:
            return StreamingResponse(
                start_stream(body, ctx),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await run_completion(body, ctx, request.is_disconnected)

    return router


def _tokenizer_router(model: GPT2, tokenizer: Tokenizer, model_name: str) -> APIRouter:
    """GET /tokenizer_info, POST /tokenize and /detokenize, as vLLM serves them."""
    router = APIRouter(tags=["tokenizer"])

    @router.get("/tokenizer_info", response_model=TokenizerInfoResponse)
    def tokenizer_info() -> JSONResponse:
        """The tokenizer's configuration, as vLLM serves it (lm-eval's tokenizer_backend=remote)."""
        info = _tokenizer_info(tokenizer, model)
        # chat_template is left out rather than null: clients test for its presence.
        return JSONResponse(
            info.model_dump(exclude={"chat_template"} if info.chat_template is None else None)
        )

    @router.post("/tokenize", response_model=TokenizeResponse)
    def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """Text -> token ids, as vLLM's /tokenize; `<|endoftext|>` in the text is the special token."""
        _check_model(body.model, model_name)
        try:
            ids = tokenizer.encode(body.prompt, allowed_special="all")
        except TokenizerError as e:
            raise APIError(400, str(e), param="prompt") from None
        return TokenizeResponse(
            count=len(ids),
            max_model_len=model.config.n_positions,
            tokens=ids,
            token_strs=tokenizer.decode_tokens(ids) if body.return_token_strs else None,
        )

    @router.post("/detokenize", response_model=DetokenizeResponse)
    def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        """Token ids -> text, as vLLM's /detokenize (a cut UTF-8 character becomes U+FFFD)."""
        _check_model(body.model, model_name)
        n = tokenizer.n_vocab
        bad = next((i for i in body.tokens if not 0 <= i < n), None)
        if bad is not None:
            raise APIError(
                400, f"token id {bad} in tokens is outside the vocabulary [0, {n})", param="tokens"
            )
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))

    return router


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
    from gpt2kit._version import __version__

    return __version__


def _check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise APIError(
            404,
            f"model {name!r} is not served here; use {served!r} or omit model (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def _tokenizer_info(tokenizer: Tokenizer, model: GPT2) -> TokenizerInfoResponse:
    """GPT-2's tokenizer_config.json keys: <|endoftext|> is its bos, eos and unk token; no pad."""
    eos_token_id = eos_id(model, tokenizer)
    eos = next((t for t, i in tokenizer.special_tokens.items() if i == eos_token_id), None)
    return TokenizerInfoResponse(
        tokenizer_class="GPT2Tokenizer",
        eos_token=eos,
        bos_token=eos,
        pad_token=None,
        unk_token=eos,
        model_max_length=model.config.n_positions,
    )


# --- errors ------------------------------------------------------------------------------


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(WorkerUnavailable)
    async def unavailable(request: Request, exc: WorkerUnavailable) -> JSONResponse:
        return _json_error(_unavailable(str(exc)))

    @app.exception_handler(WorkerBusy)
    async def busy(request: Request, exc: WorkerBusy) -> JSONResponse:
        return _json_error(
            APIError(
                429, f"server is busy ({exc}); retry later", type="server_busy", code="rate_limit_exceeded"
            )
        )

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


def _unavailable(reason: str) -> APIError:
    """The 503 for a server whose engine thread can't serve (`reason` says why)."""
    if reason == "the server is shutting down":
        return APIError(503, "the server is shutting down; retry on another server", type="server_error")
    return APIError(
        503,
        f"{reason}; this server can't generate until it is restarted",
        type="server_error",
        code="engine_failed",
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
    if len(errors) > 1 and field == "stop":  # the union's first error would be "not a string"
        msg = "must be a string or a list of at most 4 strings"
    return APIError(400, f"{field}: {msg}", param=field)


def _json_error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class Guard:
    """ASGI middleware run before routing: API key, body size and UTF-8 checks.

    The body is read here (at most `max_body_bytes`) so an oversized request is refused
    without buffering it, and invalid UTF-8 gets a clear 400 instead of a parse error.
    An oversized body is read on and thrown away, up to `max_drain_bytes` in all, before
    the 413 goes out with `Connection: close`: a client that writes its whole body before
    reading (most do) then reads the answer, and the connection ends with a normal close
    instead of a reset. A body declared or found larger than that gets the 413 at once.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        max_drain_bytes: int = DRAIN_BYTES,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.max_drain_bytes = max(max_drain_bytes, max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        err = await self._check_key(scope["path"], headers, declared, receive)
        body = None
        if err is None:
            read = await self._read_body(receive, declared)
            if read is None:
                return  # the client left
            err = read if isinstance(read, APIError) else _utf8_error(read)
            body = read
        if err is not None:
            await _json_error(err)(scope, receive, send)
            return
        assert isinstance(body, bytes)
        await self.app(scope, _replay(body, receive), send)

    async def _check_key(
        self, path: str, headers: dict[bytes, bytes], declared: int | None, receive: Receive
    ) -> APIError | None:
        """The 401 for a protected path without the right key (None: go on)."""
        if not self.api_key or not path.startswith(PROTECTED):
            return None
        given = headers.get(b"authorization", b"")
        if hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            return None
        # A body the key would have allowed is read first, for the reason above.
        if declared is None or declared <= self.max_body_bytes:
            await _drain(receive, limit=self.max_body_bytes)
        return APIError(
            401,
            f"API key {'missing' if not given else 'wrong'}; send the header 'Authorization: Bearer <key>'",
            type="invalid_request_error",
            code="invalid_api_key",
            headers={"Connection": "close"},
        )

    async def _read_body(self, receive: Receive, declared: int | None) -> bytes | APIError | None:
        """The whole body; or the 413, once the rest is drained; or None when the client left."""
        too_big = APIError(
            413,
            f"request body exceeds {self.max_body_bytes} bytes; send a smaller request",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        if declared is not None and declared > self.max_body_bytes:
            if declared <= self.max_drain_bytes:
                await _drain(receive, limit=self.max_drain_bytes)
            return too_big
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                if more:
                    await _drain(receive, limit=self.max_drain_bytes - size)
                return too_big
        return b"".join(chunks)


def _utf8_error(body: bytes) -> APIError | None:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return APIError(400, f"request body is not valid UTF-8 (byte {e.start}); send UTF-8 JSON")
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body already read, then waits on the client's."""
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the client to disconnect

    return replay  # type: ignore[return-value]


async def _drain(receive: Receive, *, limit: int) -> None:
    """Read and discard the rest of a request body, at most `limit` bytes of it."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))
