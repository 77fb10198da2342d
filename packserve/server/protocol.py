"""The OpenAI wire format: request bodies (validated by pydantic) and the error object."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from packserve.scheduler import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY

from .tool_protocol import Tool, ToolCallIn, ToolChoice

MAX_CHOICES = 256  # n x prompts in one request
MAX_N = 128  # choices per prompt
MAX_STOP = 16  # OpenAI allows 4 stop strings; we allow more, but not thousands
PRIORITY_BOUND = 2**31  # priority is a 32-bit signed integer, as in vLLM's protobuf API

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
LogitBias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON for a schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extension: at most one constraint of these."""

    model_config = ConfigDict(extra="forbid")  # whitespace_pattern, structural_tag: refused

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(BaseModel):
    """Parameters shared by completions and chat completions."""

    # Unknown fields are kept for fields.py to refuse (or ignore, --allow-unknown-fields);
    # the document states the default.
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

    model: str | None = None
    temperature: FiniteFloat = Field(1.0, ge=0, le=2)
    top_p: FiniteFloat = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1: no top-k cut")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} stop strings")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: FiniteFloat = Field(0.0, ge=-2, le=2)
    frequency_penalty: FiniteFloat = Field(0.0, ge=-2, le=2)
    ignore_eos: bool = False
    logit_bias: dict[str, LogitBias] | None = Field(
        None, description="token id (a string) -> bias added to its logit before sampling"
    )
    # vLLM's extensions
    min_p: FiniteFloat = Field(0.0, ge=0, le=1)
    repetition_penalty: FiniteFloat = Field(
        1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY
    )
    min_tokens: int = Field(
        0, ge=0, description="no EOS, stop token or stop string before this many tokens"
    )
    # vLLM's extension. Strict: a JSON integer only (no 1.0, "1" or true), so a typo is
    # refused rather than silently reordered.
    priority: int = Field(
        0,
        strict=True,
        ge=-PRIORITY_BOUND,
        lt=PRIORITY_BOUND,
        description="scheduling priority: lower runs first among waiting requests (default 0)",
    )
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's names before structured_outputs (removed there in v0.12; still taken here).
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stop if s)


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    )
    max_tokens: int | None = Field(
        16, ge=1, description="must fit the context with the prompt; unsent: 16, capped by it"
    )
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Turn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: str | list[TextPart] | None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class TextMessage(_Turn):
    role: Literal["system", "user", "developer"]
    content: str | list[TextPart]


class AssistantMessage(_Turn):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None  # None only beside tool_calls
    tool_calls: list[ToolCallIn] | None = None  # the calls this turn made

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Turn):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str  # the call this is the result of


_KINDS = {
    "system": "TextMessage",
    "developer": "TextMessage",
    "user": "TextMessage",
    "assistant": "AssistantMessage",
    "tool": "ToolMessage",
}


def _message_kind(message: Any) -> str | None:
    role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
    return _KINDS.get(role) if isinstance(role, str) else None


# One model per role, told apart by `role` (the tags are class names, which error locations
# leave out: a missing tool_call_id is `messages.0.tool_call_id`).
ChatMessage = Annotated[
    Annotated[TextMessage, Tag("TextMessage")]
    | Annotated[AssistantMessage, Tag("AssistantMessage")]
    | Annotated[ToolMessage, Tag("ToolMessage")],
    Discriminator(
        _message_kind,
        custom_error_type="invalid_role",
        custom_error_message="role must be system, developer, user, assistant or tool",
    ),
]


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: the context left")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="max_tokens by its newer name; both given must agree"
    )
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, else "none"
    parallel_tool_calls: bool = True


class TokenizePrompt(BaseModel):
    """POST /tokenize with a prompt."""

    model_config = ConfigDict(extra="forbid")  # a body with prompt and messages is refused

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChat(BaseModel):
    """POST /tokenize with chat messages, rendered with the chat template."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)


TokenizeRequest = TokenizePrompt | TokenizeChat


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error object."""

    error: ErrorBody


class APIError(Exception):
    """Raised by handlers; rendered as an OpenAI error object with an HTTP status."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "invalid_request_error",  # OpenAI's, also for model_not_found
        408: "timeout_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "service_unavailable",
    }

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})
        self.body = ErrorResponse(
            error=ErrorBody(
                message=message,
                type=self.TYPES.get(status, "invalid_request_error"),
                param=param,
                code=code,
            )
        )
