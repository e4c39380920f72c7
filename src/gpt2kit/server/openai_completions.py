"""Serving one /v1/completions request on the engine: prompts in, OpenAI-shaped choices out.

Checks the request against the model and the server's limits, submits it to the worker
(n rows per prompt; row r = i * n + j samples with seed + r, as `complete` does), turns
each row's tokens into text with `TextStream` (never splitting a UTF-8 character, holding
back text that may be the start of a stop string) and builds either one CompletionResponse
or a stream of SSE chunks.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from gpt2kit.errors import TokenizerError
from gpt2kit.generation.engine import FinishEvent, PromptEvent, TokenEvent
from gpt2kit.generation.textstream import TextStream
from gpt2kit.server.protocol import (
    APIError,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from gpt2kit.server.worker import Failed, Worker, WorkerBusy
from gpt2kit.tokenizer.tokenizer import Tokenizer

MAX_STOP = 4  # OpenAI's limit on stop strings


@dataclass(frozen=True)
class Limits:
    """The server's caps (set by `gpt2kit serve` flags)."""

    max_n: int = 16
    max_tokens: int | None = None  # None: whatever fits the context
    max_prompts: int = 64  # prompts per request
    request_timeout: float = 600.0  # seconds


@dataclass
class Context:
    """What a completion needs from the app: the worker, tokenizer, served name and limits."""

    worker: Worker
    tokenizer: Tokenizer
    model_name: str
    limits: Limits


def request_prompts(req: CompletionRequest, ctx: Context) -> list[list[int]]:
    """Check every field against the model and limits; return the prompts as token ids."""
    if req.model != ctx.model_name:
        raise APIError(
            404,
            f"model {req.model!r} is not served here; use {ctx.model_name!r} (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    if req.suffix:
        raise APIError(400, "suffix (insertion) is not supported by GPT-2; omit it", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of must equal n (no server-side ranking); omit it", param="best_of")
    if req.n > ctx.limits.max_n:
        raise APIError(400, f"n is {req.n}; this server allows at most {ctx.limits.max_n}", param="n")
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOP:
        raise APIError(400, f"stop has {len(req.stop)} strings; send at most {MAX_STOP}", param="stop")
    n_ctx = ctx.worker.n_ctx
    config = req.to_sampling_config()
    vocab = ctx.worker.model.config.vocab_size
    bad = next((t for t in config.logit_bias if t >= vocab), None)
    if bad is not None:
        raise APIError(
            400, f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})", param="logit_bias"
        )
    max_tokens = config.max_new_tokens
    cap = ctx.limits.max_tokens
    if cap is not None and max_tokens > cap:
        raise APIError(
            400, f"max_tokens is {max_tokens}; this server allows at most {cap}", param="max_tokens"
        )
    prompts = _prompt_ids(req, ctx)
    out = []
    for ids in prompts:
        if req.truncate_prompt_tokens is not None:
            ids = ids[-req.truncate_prompt_tokens :]
        if len(ids) > n_ctx:
            raise APIError(
                400,
                f"prompt has {len(ids)} tokens, more than the model's context of {n_ctx}; shorten it "
                "or set truncate_prompt_tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        if len(ids) + max_tokens > n_ctx:
            raise APIError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context of {n_ctx}; "
                "lower max_tokens, shorten the prompt or set truncate_prompt_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        out.append(ids)
    return out


def _prompt_ids(req: CompletionRequest, ctx: Context) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, list) and not p:
        raise APIError(
            400, "prompt is an empty list; send a string, token ids or a list of them", param="prompt"
        )
    if isinstance(p, str) or (isinstance(p, list) and isinstance(p[0], str)):
        texts = [p] if isinstance(p, str) else p
        prompts = [_encode(ctx.tokenizer, t) for t in texts]
    elif isinstance(p[0], int):
        prompts = [list(p)]
    else:
        prompts = [list(ids) for ids in p]
    if len(prompts) > ctx.limits.max_prompts:
        raise APIError(
            400, f"{len(prompts)} prompts; send at most {ctx.limits.max_prompts} per request", param="prompt"
        )
    vocab = ctx.worker.model.config.vocab_size
    for ids in prompts:
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise APIError(
                400, f"token id {bad} in prompt is outside the vocabulary [0, {vocab})", param="prompt"
            )
    # An empty prompt starts from <|endoftext|>, as OpenAI's default prompt does.
    return [ids if ids else [ctx.worker.eos] for ids in prompts]


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    try:
        # <|endoftext|> in a prompt means the document separator, as in OpenAI's API.
        return tokenizer.encode(text, allowed_special="all")
    except TokenizerError as e:
        raise APIError(400, str(e), param="prompt") from None


class ChoiceText:
    """One choice's text and logprobs, built token by token with `TextStream` (stop strings, UTF-8)."""

    def __init__(self, tokenizer: Tokenizer, *, index: int, stops: Sequence[str], logprobs: bool) -> None:
        self.tokenizer = tokenizer
        self.index = index
        self.want_logprobs = logprobs
        self.prefix = ""  # the echoed prompt
        self.stream = TextStream(stop=stops)
        self.sent = 0  # characters of prefix + text already streamed
        self.finish_reason: str | None = None
        self.finish_sent = False  # streaming: the chunk with finish_reason went out
        self.logprobs = CompletionLogprobs()
        self._pending = CompletionLogprobs()  # logprobs not yet streamed

    @property
    def completion_tokens(self) -> int:
        """Tokens the text came from: up to the one that completed a stop string (eos not counted)."""
        return self.stream.tokens

    def echo(self, ids: list[int], prompt: PromptEvent | None) -> None:
        """Put the prompt in front of the text (echo), with its logprobs when asked."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for i, t in enumerate(ids):
            offset = len(self.prefix)
            self.prefix += decoder.decode(self.tokenizer.decode_bytes([t]))
            if self.want_logprobs and prompt is not None:
                self._add_logprob(t, prompt.logprobs[i], prompt.top[i], offset)
        self.prefix += decoder.decode(b"", final=True)

    def add(self, event: TokenEvent) -> None:
        offset = len(self.prefix) + self.stream.decoded
        self.stream.push(self.tokenizer.decode_bytes([event.token]))
        if self.want_logprobs:
            top = event.top
            if top is not None and all(i != event.token for i, _ in top):
                top = [*top, (event.token, event.logprob)]  # OpenAI lists the chosen token too
            self._add_logprob(event.token, event.logprob, top, offset)
        if self.stream.stopped:
            self.finish_reason = "stop"

    def finish(self, reason: str) -> None:
        if self.finish_reason is not None:  # already ended by a stop string
            return
        self.stream.finish()
        self.finish_reason = reason

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _add_logprob(self, token: int, logprob: float | None, top, offset: int) -> None:
        name = self.tokenizer.decode_tokens([token])[0]
        top_dict = None if top is None else {self.tokenizer.decode_tokens([i])[0]: v for i, v in top}
        for lp in (self.logprobs, self._pending):
            lp.tokens.append(name)
            lp.token_logprobs.append(logprob)
            lp.top_logprobs.append(top_dict)
            lp.text_offset.append(offset)

    def full_text(self) -> str:
        return self.prefix + self.stream.text

    def take_new(self) -> tuple[str, CompletionLogprobs | None]:
        """Text and logprobs not yet streamed (the stream holds back a possible stop string)."""
        full = self.full_text()
        piece = full[self.sent :]
        self.sent = len(full)
        lp = None
        if self.want_logprobs:
            lp, self._pending = self._pending, CompletionLogprobs()
        return piece, lp

    def choice(self) -> CompletionChoice:
        return CompletionChoice(
            text=self.full_text(),
            index=self.index,
            logprobs=self._final_logprobs() if self.want_logprobs else None,
            finish_reason=self.finish_reason,  # type: ignore[arg-type]
        )

    def _final_logprobs(self) -> CompletionLogprobs:
        # Tokens that start past a stop string were generated but are not part of the text.
        end = len(self.full_text())
        keep = [i for i, off in enumerate(self.logprobs.text_offset) if off < end or i == 0]
        lp = self.logprobs
        return CompletionLogprobs(
            tokens=[lp.tokens[i] for i in keep],
            token_logprobs=[lp.token_logprobs[i] for i in keep],
            top_logprobs=[lp.top_logprobs[i] for i in keep],
            text_offset=[lp.text_offset[i] for i in keep],
        )


class CompletionRun:
    """One request's choices, filled from the worker's events; choice r is prompt r // n's sample r % n."""

    def __init__(self, req: CompletionRequest, ctx: Context, prompts: list[list[int]]) -> None:
        self.req = req
        self.ctx = ctx
        self.prompts = prompts
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.deadline = time.monotonic() + ctx.limits.request_timeout
        self.config = req.to_sampling_config()
        self.prompt_logprobs = req.echo and req.logprobs is not None
        count = len(prompts) * req.n
        self.choices = [
            ChoiceText(ctx.tokenizer, index=r, stops=self.config.stop, logprobs=req.logprobs is not None)
            for r in range(count)
        ]
        # Every event of the request arrives here, on this event loop.
        self._queue: asyncio.Queue = asyncio.Queue()
        try:
            self.request = ctx.worker.submit(
                prompts, self.config, sink=self._queue, prompt_logprobs=self.prompt_logprobs
            )
        except WorkerBusy as e:
            raise APIError(
                429, f"server is busy ({e}); retry later", type="server_busy", code="rate_limit_exceeded"
            ) from None
        self._echoed = [False] * count

    def cancel(self) -> None:
        self.request.cancel()

    async def events(self) -> AsyncIterator[int]:
        """Apply each event to its choice; yield the index of the choice that changed."""
        open_rows = len(self.choices)
        if self.req.echo and not self.prompt_logprobs:
            for r in range(len(self.choices)):
                self._echo(r, None)
                yield r
        while open_rows:
            timeout = self.deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(self._queue.get(), timeout=max(timeout, 0))
            except asyncio.TimeoutError:
                self.cancel()
                raise APIError(
                    504,
                    f"request took longer than the server's limit of {self.ctx.limits.request_timeout:g}s; "
                    "ask for fewer tokens",
                    type="timeout",
                    code="timeout",
                ) from None
            if isinstance(event, Failed):
                self.cancel()
                raise APIError(500, f"generation failed: {event.message}", type="server_error")
            r = event.row.tag
            choice = self.choices[r]
            if isinstance(event, PromptEvent):
                self._echo(r, event)
            elif isinstance(event, TokenEvent):
                if not choice.done and event.token != self.ctx.worker.eos:
                    choice.add(event)
                    if choice.done:  # a stop string: no need to compute further tokens
                        self.request.cancel(event.row)
            elif isinstance(event, FinishEvent):
                open_rows -= 1
                choice.finish("length" if event.reason == "length" else "stop")
            yield r

    def _echo(self, r: int, event: PromptEvent | None) -> None:
        if self.req.echo and not self._echoed[r]:
            self._echoed[r] = True
            self.choices[r].echo(self.prompts[r // self.req.n], event)

    def usage(self) -> Usage:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.completion_tokens for c in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def response(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.ctx.model_name, choices=choices, usage=usage
        )


async def run_completion(
    req: CompletionRequest, ctx: Context, disconnected: Callable[[], Awaitable[bool]]
) -> CompletionResponse:
    """Run a non-streamed completion; stop generating if the client goes away."""
    completion = CompletionRun(req, ctx, request_prompts(req, ctx))

    async def watch() -> None:
        while not await disconnected():
            await asyncio.sleep(0.5)
        completion.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        async for _ in completion.events():
            pass
    finally:
        watcher.cancel()
        completion.cancel()
    return completion.response([c.choice() for c in completion.choices], completion.usage())


def start_stream(req: CompletionRequest, ctx: Context) -> AsyncIterator[str]:
    """Check and submit the request now (so errors are plain 4xx), then stream its SSE chunks."""
    completion = CompletionRun(req, ctx, request_prompts(req, ctx))
    return _sse(completion)


async def _sse(completion: CompletionRun) -> AsyncIterator[str]:
    head = {"id": completion.id, "object": "text_completion", "created": completion.created}
    head["model"] = completion.ctx.model_name
    try:
        async for i in completion.events():
            choice = completion.choices[i]
            text, lp = choice.take_new()
            finishing = choice.done and not choice.finish_sent
            if not text and not (lp and lp.tokens) and not finishing:
                continue
            choice.finish_sent = choice.finish_sent or finishing
            # A plain dict, not pydantic models: this runs once per token per client.
            chunk = {
                "text": text,
                "index": choice.index,
                "logprobs": lp.model_dump() if lp is not None else None,
                "finish_reason": choice.finish_reason if finishing else None,
            }
            yield _data({**head, "choices": [chunk], "usage": None})
        options = completion.req.stream_options
        if options is not None and options.include_usage:
            yield _data(completion.response([], completion.usage()).model_dump())
    except APIError as e:
        yield _data(e.body())
    finally:
        completion.cancel()
    yield "data: [DONE]\n\n"


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
