"""The Explorer's wire format: one pydantic model per request and response.

Strict like protocol.py: unknown fields are a 400 naming them, "1" is not a number.
Bounds that depend on the model (layer < n_layer, position < the prompt's tokens, the
context) are checked in explorer_routes.py.

>>> NextRequest(text="Hello", top_k=40, top_p=0.9).top_k
40
"""

from __future__ import annotations

from pydantic import BaseModel, Field, StrictInt, StrictStr

from gpt2kit.server.protocol import STRICT

MAX_EXPLORER_TEXT = 20_000  # characters; the token count is checked against the context
GRID_MAX_TOKENS = 64  # the attention grid shows at most this many leading tokens


class TokenInfo(BaseModel):
    id: int
    token: str


class Candidate(BaseModel):
    id: int
    token: str
    prob: float


# --- POST /api/next ----------------------------------------------------------------------


class NextRequest(BaseModel):
    model_config = STRICT

    text: StrictStr = Field(max_length=MAX_EXPLORER_TEXT, description="The prompt ('' = <|endoftext|>).")
    k: StrictInt = Field(default=10, ge=1, le=100, description="How many candidates.")
    temperature: float = Field(default=1.0, gt=0, le=5, description="Divides the logits before softmax.")
    top_k: StrictInt | None = Field(
        default=None, ge=0, description="Keep the top_k most likely tokens after temperature (0 = off)."
    )
    top_p: float | None = Field(
        default=None, gt=0, le=1, description="Then keep the smallest set reaching top_p (nucleus)."
    )
    seed: StrictInt | None = Field(
        default=None,
        ge=0,
        le=2**63 - 1,
        description="Draw one token from the filtered distribution with this seed (as `gpt2kit generate`).",
    )


class NextCandidate(Candidate):
    kept_prob: float = Field(description="After temperature, top-k, then top-p, renormalised; 0 if dropped.")


class NextResponse(BaseModel):
    prompt_tokens: list[TokenInfo]
    tokens: list[NextCandidate] = Field(description="In descending probability (after temperature).")
    kept: int = Field(description="How many vocabulary entries survive top-k and top-p.")
    sampled: NextCandidate | None = Field(default=None, description="The draw, when `seed` was given.")


# --- POST /api/surprise ------------------------------------------------------------------


class SurpriseRequest(BaseModel):
    model_config = STRICT

    text: StrictStr = Field(min_length=1, max_length=MAX_EXPLORER_TEXT, description="The text to score.")


class SurpriseToken(BaseModel):
    id: int
    token: str
    logprob: float = Field(description="ln P(token | <|endoftext|> and the tokens before it).")
    rank: int = Field(description="1 = the model's top choice at this position.")


class SurpriseResponse(BaseModel):
    tokens: list[SurpriseToken]
    total_bits: float = Field(description="-sum(logprob) / ln 2.")
    bits_per_byte: float = Field(description="total_bits over the text's UTF-8 bytes.")
    n_bytes: int


# --- POST /api/attention and /api/attention/grid -----------------------------------------


class AttentionRequest(BaseModel):
    model_config = STRICT

    text: StrictStr = Field(max_length=MAX_EXPLORER_TEXT)
    layer: StrictInt = Field(default=0, ge=0)
    head: StrictInt = Field(default=0, ge=0)
    position: StrictInt | None = Field(
        default=None, ge=0, description="A query token (0-based) to work through in `detail`."
    )


class AttentionDetail(BaseModel):
    """One query's attention, step by step, over the keys 0..position it may see."""

    position: int
    scale: float = Field(description="1 / sqrt(head size).")
    query: list[float] = Field(description="q of the query token (head size).")
    keys: list[list[float]] = Field(description="k of each visible token.")
    dots: list[float] = Field(description="q . k for each visible token.")
    scores: list[float] = Field(description="dots * scale.")
    weights: list[float] = Field(description="softmax(scores): sums to 1.")
    values: list[list[float]] = Field(description="v of each visible token.")
    output: list[float] = Field(description="sum of weights * values: the head's output before c_proj.")


class AttentionResponse(BaseModel):
    tokens: list[TokenInfo]
    n_layer: int
    n_head: int
    layer: int
    head: int
    weights: list[list[float]] = Field(description="T x T: row i is how token i spreads its attention.")
    detail: AttentionDetail | None = Field(default=None, description="When `position` was given.")


class AttentionGridRequest(BaseModel):
    model_config = STRICT

    text: StrictStr = Field(max_length=MAX_EXPLORER_TEXT)
    layer: StrictInt = Field(ge=0, description="One layer per request: the page loads rows lazily.")


class AttentionGridResponse(BaseModel):
    tokens: list[TokenInfo]
    n_layer: int
    n_head: int
    layer: int
    shown: int = Field(description=f"Leading tokens in each map (at most {GRID_MAX_TOKENS}).")
    note: str | None = Field(description="Why fewer tokens are shown than the prompt has.")
    heads: list[list[list[float]]] = Field(description="Per head, shown x shown weights.")


# --- POST /api/lens and /api/lens/grid ---------------------------------------------------


class LensRequest(BaseModel):
    model_config = STRICT

    text: StrictStr = Field(max_length=MAX_EXPLORER_TEXT)
    k: StrictInt = Field(default=3, ge=1, le=20)
    position: StrictInt | None = Field(
        default=None, ge=0, description="The token to read (default: the last)."
    )


class LensLayer(BaseModel):
    layer: int = Field(description="0 = the embeddings, i = after block i.")
    tokens: list[Candidate]


class LensResponse(BaseModel):
    tokens: list[TokenInfo]
    position: int
    layers: list[LensLayer]


class LensGridRequest(BaseModel):
    model_config = STRICT

    text: StrictStr = Field(max_length=MAX_EXPLORER_TEXT)


class LensGridResponse(BaseModel):
    tokens: list[TokenInfo]
    cells: list[list[Candidate]] = Field(
        description="Per layer (0 = embeddings), per position: the top token read there."
    )


# --- POST /api/attribution ---------------------------------------------------------------


class AttributionRequest(BaseModel):
    model_config = STRICT

    text: StrictStr = Field(max_length=MAX_EXPLORER_TEXT)
    token_id: StrictInt | None = Field(
        default=None, ge=0, description="The next token to explain (default: the most likely)."
    )


class AttributionPart(BaseModel):
    name: str = Field(description="embed, attn.{i} or mlp.{i}.")
    value: float


class AttributionResponse(BaseModel):
    token_id: int
    token: str
    logit: float
    bias: float = Field(description="ln_f's bias and centring: sum(parts) + bias == logit.")
    parts: list[AttributionPart]
    heads: list[list[float]] = Field(
        description="Per layer, per head; layer i sums to attn.{i} minus c_proj's bias."
    )
