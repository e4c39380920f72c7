"""The wire format: pydantic models per endpoint, fields in the order of OpenAI's docs.

The schemas hold the types and the documented ranges (`Field(ge=, le=)`, at most 4 stop
strings), so the OpenAPI document states them. Every other sampling rule is
`SamplingConfig`'s: `to_sampling_config()`, the one step from wire to engine, builds it and
`wire_error` turns its field errors into a 400 under the wire name. Limits that depend on
the model or the server's settings (the context, `--max-n`, ...) are checked in
openai_completions.py. Unknown fields are rejected (400 naming the field); every documented
OpenAI field is accepted (suffix and best_of != n, which GPT-2 can't honour, are a 400 when
set), and so are vLLM's extra sampling fields: top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, include_stop_str_in_output, skip_special_tokens, spaces_between_special_tokens.

>>> CompletionRequest(model="gpt2", prompt="Hello", max_tokens=5).to_sampling_config().max_new_tokens
5
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from gpt2kit.generation.config import SamplingConfig, SamplingError

# Strict: "1" is not a number and true is not a token id; extra="forbid": a misspelt
# option is an error rather than silently ignored.
STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions (https://platform.openai.com/docs/api-reference/completions/create)."""

    model_config = STRICT

    model: StrictStr = Field(description="The model name, as listed by GET /v1/models.")
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="Text, a list of texts, token ids, or a list of token-id lists (one choice set each)."
    )
    best_of: StrictInt | None = Field(default=None, ge=1, le=128, description="Must equal n when set.")
    echo: StrictBool = Field(default=False, description="Return the prompt before the completion.")
    frequency_penalty: float | None = Field(
        default=None, ge=-2, le=2, description="Subtracted from a token's logit per occurrence in the output."
    )
    logit_bias: dict[StrictStr, float] | None = Field(
        default=None, description="Token id (as a string) -> bias in [-100, 100] added to its logit."
    )
    logprobs: StrictInt | None = Field(
        default=None,
        ge=0,
        le=20,
        description="Report the log-probability of each token and its top alternatives.",
    )
    max_tokens: StrictInt | None = Field(
        default=16, ge=0, description="Tokens to generate at most; prompt + max_tokens must fit the context."
    )
    n: StrictInt = Field(default=1, ge=1, le=128, description="Completions per prompt.")
    presence_penalty: float | None = Field(
        default=None, ge=-2, le=2, description="Subtracted once from the logit of a token in the output."
    )
    seed: StrictInt | None = Field(
        default=None, ge=-(2**63), le=2**64 - 1, description="Choice i samples with seed + i: reproducible."
    )
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = Field(
        default=None,
        description="Up to 4 non-empty strings; generation stops before the first one produced.",
    )
    stream: StrictBool = Field(default=False, description="Send server-sent events, then data: [DONE].")
    stream_options: StreamOptions | None = None
    suffix: StrictStr | None = Field(default=None, description="Not supported; omit it.")
    temperature: float = Field(default=1.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling.")
    user: StrictStr | None = Field(default=None, description="Accepted and ignored.")
    # Extensions, with vLLM's names.
    top_k: StrictInt | None = Field(
        default=None, ge=-1, description="Sample among the k most likely (0/-1: off)."
    )
    min_p: float | None = Field(
        default=None, ge=0, le=1, description="Drop tokens below min_p x the top one."
    )
    repetition_penalty: float | None = Field(
        default=None, gt=0, description="CTRL's penalty over prompt and output (> 1 discourages repeats)."
    )
    truncate_prompt_tokens: StrictInt | None = Field(
        default=None, ge=1, description="Keep only the last N prompt tokens (gpt2kit/vLLM extension)."
    )
    min_tokens: StrictInt = Field(
        default=0,
        ge=0,
        description="Neither the eos nor a stop string ends a choice before this many tokens.",
    )
    ignore_eos: StrictBool = Field(default=False, description="Keep generating after <|endoftext|>.")
    include_stop_str_in_output: StrictBool = Field(
        default=False, description="Keep the stop string that ended the text in it."
    )
    skip_special_tokens: StrictBool = Field(
        default=True, description="False: <|endoftext|> tokens are written in the text."
    )
    spaces_between_special_tokens: StrictBool = Field(
        default=True, description="Accepted; GPT-2's byte-level BPE inserts no spaces either way."
    )

    def to_sampling_config(self) -> SamplingConfig:
        """The engine's view of this request; a SamplingError becomes a 400 naming the wire field."""
        try:
            return SamplingConfig(
                max_new_tokens=16 if self.max_tokens is None else self.max_tokens,
                temperature=float(self.temperature),
                top_k=None if self.top_k is None or self.top_k < 0 else self.top_k,
                top_p=float(self.top_p),
                min_p=self.min_p,
                repetition_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                logit_bias=self.logit_bias,
                stop=self.stop,
                n=self.n,
                seed=self.seed,
                logprobs=self.logprobs,
                min_tokens=self.min_tokens,
                ignore_eos=self.ignore_eos,
                include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
            )
        except SamplingError as e:
            raise wire_error(e) from None


# SamplingConfig's fields under their wire names: the one place the server translates them.
WIRE = {"max_new_tokens": "max_tokens"}


def wire_error(e: SamplingError) -> APIError:
    """A SamplingConfig error as the API says it: 400, the wire field's name, then the problem."""
    name = WIRE.get(e.field, e.field)
    message = e.message.replace("max_new_tokens", "max_tokens")
    return APIError(400, f"{name} {message}", param=name)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """The body of a non-streamed completion, and (with partial choices) of each SSE chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class DecodeStepInfo(BaseModel):
    """Which decode step the engine runs now, and where the compiled one stands
    (server/stepbuild.py): `state` is "building", "ready", "not compiled: <why>" or
    "failed: <why>"; `build_seconds` (from start-up to the swap) and `rows_at_swap` (rows
    in flight that went on with the new step) once a background build is in use."""

    in_use: Literal["eager", "compiled"]
    state: str
    build_seconds: float | None = None
    rows_at_swap: int | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt2kit"
    decode_step: DecodeStepInfo | None = None  # gpt2kit's own field; OpenAI clients keep it as an extra


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    requests_in_flight: int
    auth_required: bool
    decode_step: DecodeStepInfo | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error this server returns: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


# --- the tokenizer endpoints (vLLM's; lm-eval's tokenizer_backend=remote uses them) -------


class TokenizeRequest(BaseModel):
    """POST /tokenize: text -> token ids, as vLLM's TokenizeCompletionRequest."""

    model_config = STRICT

    model: StrictStr | None = Field(default=None, description="If given, must be the served name.")
    prompt: StrictStr = Field(description="The text; <|endoftext|> in it is the special token.")
    add_special_tokens: StrictBool = Field(
        default=True, description="Accepted for vLLM compatibility; GPT-2 adds no BOS/EOS either way."
    )
    return_token_strs: StrictBool | None = Field(default=False, description="Also return each token's text.")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids -> text, as vLLM's DetokenizeRequest."""

    model_config = STRICT

    model: StrictStr | None = Field(default=None, description="If given, must be the served name.")
    tokens: list[StrictInt] = Field(description="Token ids, each in [0, vocabulary size).")


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """GET /tokenizer_info: the tokenizer's configuration, the keys of tokenizer_config.json."""

    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    unk_token: str | None
    model_max_length: int
    add_prefix_space: bool = False
    chat_template: str | None = Field(default=None, description="Omitted: GPT-2 models have none.")


RETRY_AFTER_S = 1  # seconds a 429 asks the client to wait: a slot frees as soon as any row finishes


class APIError(Exception):
    """An error answered as ErrorResponse with `status` and `headers` (raised anywhere in the server).

    >>> APIError(400, "n must be <= 16; ask for fewer choices", param="n").status
    400
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        # A 429 always tells the client when to come back (RFC 9110, Retry-After).
        self.headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else {}
        self.headers.update(headers or {})

    def body(self) -> dict:
        return ErrorResponse(error=self.detail).model_dump()
