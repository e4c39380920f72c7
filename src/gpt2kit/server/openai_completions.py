"""Serving one /v1/completions request on the engine: prompts in, OpenAI-shaped choices out.

Checks the request against the model and the server's limits, submits it to the worker
(n rows per prompt; row r = i * n + j samples with seed + r, as `complete` does), turns
each row's events into text with `RowText` (`gpt2kit.generation.textstream`, the one
detokenizer: never splitting a UTF-8 character, holding back text that may be the start
of a stop string, the end-of-text policy) and builds either one CompletionResponse or a
stream of SSE chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from gpt2kit.errors import ConfigError, TokenizerError
from gpt2kit.generation.config import SamplingConfig, SamplingError
from gpt2kit.generation.engine import FinishEvent, PromptEvent, check_row
from gpt2kit.generation.textstream import RowText, decode_with_offsets
from gpt2kit.server.protocol import (
    APIError,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    wire_error,
)
from gpt2kit.server.worker import Failed, Worker, WorkerBusy
from gpt2kit.tokenizer.tokenizer import Tokenizer


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


@dataclass(frozen=True)
class Checked:
    """A request that passed every check: its prompts as token ids and its SamplingConfig."""

    prompts: list[list[int]]
    config: SamplingConfig


def check_request(req: CompletionRequest, ctx: Context) -> Checked:
    """Check the request against the model and the server's limits (the sampling rules are
    SamplingConfig's, reached once through `to_sampling_config`); APIError names the field."""
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
    config = req.to_sampling_config()
    cap = ctx.limits.max_tokens
    if cap is not None and config.max_new_tokens > cap:
        raise APIError(
            400,
            f"max_tokens is {config.max_new_tokens}; this server allows at most {cap}",
            param="max_tokens",
        )
    n_ctx = ctx.worker.n_ctx
    out = []
    for ids in _prompt_ids(req, ctx):
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
        if len(ids) + config.max_new_tokens > n_ctx:
            raise APIError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({config.max_new_tokens}) exceeds the context of "
                f"{n_ctx}; lower max_tokens, shorten the prompt or set truncate_prompt_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        # The engine's own rules (the vocabulary), here so that a bad row is a 400, not a failed step.
        try:
            check_row(ids, config, vocab_size=ctx.worker.model.config.vocab_size, max_len=n_ctx)
        except SamplingError as e:
            raise wire_error(e) from None
        except ConfigError as e:
            raise APIError(400, str(e), param="prompt") from None
        out.append(ids)
    return Checked(out, config)


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
    # An empty prompt starts from <|endoftext|>, as OpenAI's default prompt does.
    return [ids if ids else [ctx.worker.eos] for ids in prompts]


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    try:
        # <|endoftext|> in a prompt means the document separator, as in OpenAI's API.
        return tokenizer.encode(text, allowed_special="all")
    except TokenizerError as e:
        raise APIError(400, str(e), param="prompt") from None


class ChoiceText:
    """One choice: its row's text (`RowText`: the one detokenizer), the echoed prompt, and
    both in OpenAI's shape (logprobs with token strings and text offsets)."""

    def __init__(self, tokenizer: Tokenizer, config: SamplingConfig, *, index: int, logprobs: bool) -> None:
        self.tokenizer = tokenizer
        self.index = index
        self.want_logprobs = logprobs
        self.row = RowText(tokenizer, config)
        self.prefix = ""  # the echoed prompt
        self.prompt_logprobs = CompletionLogprobs()
        self.sent = 0  # characters of prefix + text already streamed
        self.sent_tokens = 0  # tokens whose logprobs were streamed
        self.sent_prompt = False
        self.finish_sent = False  # streaming: the chunk with finish_reason went out

    @property
    def completion_tokens(self) -> int:
        """Tokens the text came from: up to the one that completed a stop string, or the eos."""
        return len(self.row.token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.row.finish_reason

    @property
    def done(self) -> bool:
        return self.row.done

    def echo(self, ids: list[int], prompt: PromptEvent | None) -> None:
        """Put the prompt in front of the text (echo), with its logprobs when asked."""
        self.prefix, offsets = decode_with_offsets(self.tokenizer, ids)
        if self.want_logprobs and prompt is not None:
            for i, t in enumerate(ids):
                self._append(self.prompt_logprobs, t, prompt.logprobs[i], prompt.top[i], offsets[i])

    def full_text(self) -> str:
        return self.prefix + self.row.text

    def take_new(self) -> tuple[str, CompletionLogprobs | None]:
        """Text and logprobs not yet streamed (the text holds back a possible stop string)."""
        full = self.full_text()
        piece = full[self.sent :]
        self.sent = len(full)
        lp = None
        if self.want_logprobs:
            lp = self._logprobs(self.sent_tokens, with_prompt=not self.sent_prompt)
            self.sent_tokens, self.sent_prompt = len(self.row.token_ids), True
        return piece, lp

    def choice(self) -> CompletionChoice:
        return CompletionChoice(
            text=self.full_text(),
            index=self.index,
            logprobs=self._logprobs(0, with_prompt=True) if self.want_logprobs else None,
            finish_reason=self.finish_reason,  # type: ignore[arg-type]
        )

    def _logprobs(self, first: int, *, with_prompt: bool) -> CompletionLogprobs:
        """The logprobs of the prompt (echo) and of tokens `first`... of the text."""
        out = self.prompt_logprobs.model_copy(deep=True) if with_prompt else CompletionLogprobs()
        row, shift = self.row, len(self.prefix)
        for t in range(first, len(row.token_ids)):
            token, logprob, top = row.token_ids[t], row.logprobs[t], row.tops[t]
            if top is not None and all(i != token for i, _ in top):
                top = [*top, (token, logprob)]  # OpenAI lists the chosen token too
            self._append(out, token, logprob, top, shift + row.offsets[t])
        return out

    def _append(self, lp: CompletionLogprobs, token: int, logprob: float | None, top, offset: int) -> None:
        name = self.tokenizer.decode_tokens([token])[0]
        lp.tokens.append(name)
        lp.token_logprobs.append(logprob)
        lp.top_logprobs.append(
            None if top is None else {self.tokenizer.decode_tokens([i])[0]: v for i, v in top}
        )
        lp.text_offset.append(offset)


class CompletionRun:
    """One request's choices, filled from the worker's events; choice r is prompt r // n's sample r % n."""

    def __init__(self, req: CompletionRequest, ctx: Context, checked: Checked) -> None:
        self.req = req
        self.ctx = ctx
        self.prompts = prompts = checked.prompts
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.deadline = time.monotonic() + ctx.limits.request_timeout
        self.config = checked.config
        self.prompt_logprobs = req.echo and req.logprobs is not None
        count = len(prompts) * req.n
        self.choices = [
            ChoiceText(ctx.tokenizer, self.config, index=r, logprobs=req.logprobs is not None)
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
            else:
                if isinstance(event, FinishEvent):
                    open_rows -= 1
                # A stop string's cancel goes to the engine thread as a message (Worker).
                choice.row.take(event, cancel=self.request.cancel)
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
    completion = CompletionRun(req, ctx, check_request(req, ctx))

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
    completion = CompletionRun(req, ctx, check_request(req, ctx))
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
