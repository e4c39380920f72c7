"""The Explorer's JSON endpoints, as one APIRouter that app.py includes.

>>> app.include_router(explorer_router(model, tokenizer, worker), dependencies=bearer)  # doctest: +SKIP

Every endpoint takes the page's text, tokenises it as the page shows it (special tokens
allowed, '' = <|endoftext|>), checks it against the context and answers from
explorer.py / attribution.py: the numbers are the model's own.

The model runs on the worker's engine thread, never here: each endpoint checks its request
on the event loop, hands the forward pass (and every tensor operation after it) to
`Worker.call` as one job, and awaits its plain-Python result. Jobs wait their turn behind
decoding (server/timeshare.py), a full queue is a 429, a failed engine a 503, and no HTTP
thread ever starts an OpenMP team of its own (gpt2kit.openmp).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import TypeVar

import torch
from fastapi import APIRouter

from gpt2kit.generation.prompts import eos_id
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.server import explorer
from gpt2kit.server.attribution import direct_logit_attribution
from gpt2kit.server.explorer_protocol import (
    GRID_MAX_TOKENS,
    AttentionDetail,
    AttentionGridRequest,
    AttentionGridResponse,
    AttentionRequest,
    AttentionResponse,
    AttributionPart,
    AttributionRequest,
    AttributionResponse,
    Candidate,
    LensGridRequest,
    LensGridResponse,
    LensLayer,
    LensRequest,
    LensResponse,
    NextCandidate,
    NextRequest,
    NextResponse,
    SurpriseRequest,
    SurpriseResponse,
    SurpriseToken,
    TokenInfo,
)
from gpt2kit.server.protocol import APIError
from gpt2kit.server.worker import Worker, WorkerBusy, WorkerUnavailable
from gpt2kit.tokenizer.tokenizer import Tokenizer

T = TypeVar("T")


def explorer_router(model: GPT2, tokenizer: Tokenizer, worker: Worker) -> APIRouter:
    """POST /api/next, /api/surprise, /api/attention(/grid), /api/lens(/grid), /api/attribution."""
    ex = _Explorer(model, tokenizer, worker)
    router = APIRouter(prefix="/api", tags=["explorer"])
    router.post("/next", response_model=NextResponse)(ex.next_token)
    router.post("/surprise", response_model=SurpriseResponse)(ex.surprise)
    router.post("/attention", response_model=AttentionResponse)(ex.attention)
    router.post("/attention/grid", response_model=AttentionGridResponse)(ex.attention_grid)
    router.post("/lens", response_model=LensResponse)(ex.lens)
    router.post("/lens/grid", response_model=LensGridResponse)(ex.lens_grid)
    router.post("/attribution", response_model=AttributionResponse)(ex.attribution)
    return router


class _Explorer:
    """The endpoints' bodies, over one model and tokenizer; each method is one endpoint."""

    def __init__(self, model: GPT2, tokenizer: Tokenizer, worker: Worker) -> None:
        self.model = model
        self.worker = worker
        self.cfg = model.config
        self.bos = eos_id(model, tokenizer)
        self.names = _Names(tokenizer)
        self.tokenizer = tokenizer

    # --- the checks every endpoint shares ----------------------------------------------------

    def prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, allowed_special="all") if text else [self.bos]
        n_ctx = self.cfg.n_positions
        if len(ids) > n_ctx:
            raise APIError(400, f"text has {len(ids)} tokens, more than the context of {n_ctx}", param="text")
        return ids

    def check_layer_head(self, layer: int, head: int | None = None) -> None:
        if layer >= self.cfg.n_layer:
            raise APIError(400, f"layer must be < {self.cfg.n_layer} (the model's n_layer)", param="layer")
        if head is not None and head >= self.cfg.n_head:
            raise APIError(400, f"head must be < {self.cfg.n_head} (the model's n_head)", param="head")

    @staticmethod
    def check_position(position: int, ids: list[int]) -> None:
        if position >= len(ids):
            raise APIError(
                400, f"position must be < {len(ids)} (the text's tokens, counted from 0)", param="position"
            )

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on the engine thread, between decode steps (WorkerBusy: 429, WorkerUnavailable: 503)."""
        try:
            return await asyncio.wrap_future(self.worker.call(fn))
        except (APIError, WorkerBusy, WorkerUnavailable):
            raise  # answered by the app's handlers
        except Exception as e:  # this analysis failed; the engine and other requests are fine
            raise APIError(500, f"the Explorer failed: {type(e).__name__}: {e}", type="server_error") from e

    # --- the endpoints -----------------------------------------------------------------------

    async def next_token(self, body: NextRequest) -> NextResponse:
        """The k most likely next tokens, before and after top-k / top-p, and optionally a seeded draw."""
        ids = self.prompt_ids(body.text)
        view = await self.run(
            lambda: explorer.sampling_view(
                self.model,
                ids,
                k=body.k,
                temperature=body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                seed=body.seed,
            )
        )
        choices = view.candidates + ([view.sampled] if view.sampled else [])
        labels = self.names([c.id for c in choices])
        tokens = [
            NextCandidate(id=c.id, token=t, prob=c.prob, kept_prob=c.kept_prob)
            for c, t in zip(choices, labels, strict=True)
        ]
        return NextResponse(
            prompt_tokens=self.names.infos(ids),
            tokens=tokens[: len(view.candidates)],
            kept=view.kept,
            sampled=tokens[-1] if view.sampled else None,
        )

    async def surprise(self, body: SurpriseRequest) -> SurpriseResponse:
        """Every token's log-probability and rank (scored after <|endoftext|>), total bits, bits per byte."""
        ids = self.prompt_ids(body.text)  # not '': the schema asks for one character at least
        scored = await self.run(lambda: explorer.surprise(self.model, ids, bos=self.bos))
        total_bits = -sum(scored.logprobs) / math.log(2)
        n_bytes = len(body.text.encode("utf-8"))
        return SurpriseResponse(
            tokens=[
                SurpriseToken(id=i.id, token=i.token, logprob=lp, rank=r)
                for i, lp, r in zip(self.names.infos(ids), scored.logprobs, scored.ranks, strict=True)
            ],
            total_bits=total_bits,
            bits_per_byte=total_bits / n_bytes,
            n_bytes=n_bytes,
        )

    async def attention(self, body: AttentionRequest) -> AttentionResponse:
        """One head's attention weights (T x T, row i over tokens 0..i); with `position`, that query worked through."""
        self.check_layer_head(body.layer, body.head)
        ids = self.prompt_ids(body.text)
        if body.position is not None:
            self.check_position(body.position, ids)

        def compute() -> tuple[list[list[float]], AttentionDetail | None]:
            detail = None
            if body.position is not None:
                step = explorer.attention_step(
                    self.model, ids, layer=body.layer, head=body.head, position=body.position
                )
                detail = AttentionDetail(
                    position=step.position,
                    scale=step.scale,
                    query=step.query.tolist(),
                    keys=step.keys.tolist(),
                    dots=step.dots.tolist(),
                    scores=step.scores.tolist(),
                    weights=step.weights.tolist(),
                    values=step.values.tolist(),
                    output=step.output.tolist(),
                )
            weights = explorer.attention_head(self.model, ids, layer=body.layer, head=body.head)
            return _rounded(weights, 6), detail

        weights, detail = await self.run(compute)
        return AttentionResponse(
            tokens=self.names.infos(ids),
            n_layer=self.cfg.n_layer,
            n_head=self.cfg.n_head,
            layer=body.layer,
            head=body.head,
            weights=weights,
            detail=detail,
        )

    async def attention_grid(self, body: AttentionGridRequest) -> AttentionGridResponse:
        """Every head of one layer as a small map over the first tokens (the page asks layer by layer)."""
        self.check_layer_head(body.layer)
        ids = self.prompt_ids(body.text)
        shown = ids[:GRID_MAX_TOKENS]
        note = None
        if len(shown) < len(ids):
            note = (
                f"the grid shows the first {len(shown)} of {len(ids)} tokens (attention is causal, so "
                "these are those tokens' exact maps); open a head for all of them"
            )
        heads = await self.run(
            lambda: [_rounded(w, 4) for w in explorer.attention(self.model, shown, layer=body.layer)]
        )  # nh maps of (shown, shown)
        return AttentionGridResponse(
            tokens=self.names.infos(ids),
            n_layer=self.cfg.n_layer,
            n_head=self.cfg.n_head,
            layer=body.layer,
            shown=len(shown),
            note=note,
            heads=heads,
        )

    async def lens(self, body: LensRequest) -> LensResponse:
        """Logit lens: the top next tokens read from each layer's residual stream at one position."""
        ids = self.prompt_ids(body.text)
        position = len(ids) - 1 if body.position is None else body.position
        self.check_position(position, ids)
        layers = await self.run(lambda: explorer.logit_lens(self.model, ids, k=body.k, position=position))
        return LensResponse(
            tokens=self.names.infos(ids),
            position=position,
            layers=[LensLayer(layer=i, tokens=self.names.candidates(top)) for i, top in enumerate(layers)],
        )

    async def lens_grid(self, body: LensGridRequest) -> LensGridResponse:
        """The logit lens at every position: per layer and position, the top token and its probability."""
        ids = self.prompt_ids(body.text)

        def compute() -> tuple[list[list[int]], list[list[float]]]:
            top_ids, top_probs = explorer.lens_grid(self.model, ids)
            return top_ids.tolist(), top_probs.tolist()

        top_ids, top_probs = await self.run(compute)
        return LensGridResponse(
            tokens=self.names.infos(ids),
            cells=[
                self.names.candidates(list(zip(row_ids, row_probs, strict=True)))
                for row_ids, row_probs in zip(top_ids, top_probs, strict=True)
            ],
        )

    async def attribution(self, body: AttributionRequest) -> AttributionResponse:
        """Direct logit attribution of one next token at the last position, per layer and head."""
        if body.token_id is not None and body.token_id >= self.cfg.vocab_size:
            raise APIError(
                400, f"token_id must be < {self.cfg.vocab_size} (the model's vocabulary)", param="token_id"
            )
        ids = self.prompt_ids(body.text)
        a = await self.run(lambda: direct_logit_attribution(self.model, ids, token_id=body.token_id))
        return AttributionResponse(
            token_id=a.token_id,
            token=self.names([a.token_id])[0],
            logit=a.logit,
            bias=a.bias,
            parts=[AttributionPart(name=n, value=v) for n, v in a.parts],
            heads=a.heads,
        )


class _Names:
    """Token ids as the strings the page shows (ids past the tokenizer's vocabulary, which a
    model with a padded embedding may score, are named by their id)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, ids: list[int]) -> list[str]:
        n = self.tokenizer.n_vocab
        known = iter(self.tokenizer.decode_tokens([i for i in ids if i < n]))
        return [next(known) if i < n else f"<id {i}>" for i in ids]

    def infos(self, ids: list[int]) -> list[TokenInfo]:
        return [TokenInfo(id=i, token=t) for i, t in zip(ids, self(ids), strict=True)]

    def candidates(self, top: list[tuple[int, float]]) -> list[Candidate]:
        labels = self([i for i, _ in top])
        return [Candidate(id=i, token=t, prob=p) for (i, p), t in zip(top, labels, strict=True)]


def _rounded(t: torch.Tensor, digits: int) -> list[list[float]]:
    """A weight matrix as JSON-friendly rows; rounding keeps a context-sized map small on the wire."""
    return torch.round(t.double(), decimals=digits).tolist()
