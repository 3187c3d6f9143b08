"""OpenAI-compatible request and response shapes for the tenant API.

Requests are validated strictly: unknown fields and roles, empty messages, OpenAI fields this server
does not implement (appliance/openai_fields.py) and out-of-range sampling values are refused with a
400 naming the field, before anything reaches the engine. Types
are not coerced (``"10"`` is not a number, ``"yes"`` is not a boolean; an integer is a valid float,
as OpenAI accepts ``temperature: 1``). Strings holding a lone UTF-16 surrogate (``"\\ud800"``, valid
JSON that no UTF-8 text can hold) are refused naming the field. Sizes are capped by
``RequestLimits``: the gateway sets the configured limits for each request (``request_limits``), and
each refusal names the limit and what was found.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from appliance.openai_fields import (
    REFUSED_CHAT,
    REFUSED_MESSAGE,
    RefusedCommonFields,
    RefusesUnsupported,
    ResponseFormat,
    guided_spec,
)
from appliance.openai_tools import (
    Tool,
    ToolCall,
    ToolChoice,
    call_schema,
    calling,
    check_tools,
    rendered_call,
    tools_message,
)
from engine.sampling_params import MAX_N

# Below this a temperature divides logits into infinities: the sampler would return garbage, so the
# request is served greedily (temperature 0), which is what such a temperature asks for.
MIN_TEMPERATURE = 1e-5
# top_p at or below this keeps only the most likely token either way.
MIN_TOP_P = 1e-5
SEED_RANGE = 2**63  # the sampler's seeds are in [0, 2**63); other integers are reduced modulo this


@dataclass(frozen=True)
class RequestLimits:
    """Caps on what one request may hold (checked while the body is validated)."""

    max_messages: int = 2048
    max_total_chars: int = 1_000_000  # all message contents together
    max_stop_chars: int = 256  # each stop sequence
    max_model_chars: int = 256
    max_name_chars: int = 256  # message names and ``user``
    max_schema_chars: int = 65536  # a response_format's JSON schema, serialised

    def __post_init__(self) -> None:
        for name in ("max_messages", "max_total_chars", "max_stop_chars", "max_model_chars", "max_name_chars",
                     "max_schema_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, found {value!r}")


# The limits in force for the request being validated; the gateway's edge middleware sets the
# configured ones for each request (pydantic validators cannot receive arguments from FastAPI).
request_limits: ContextVar[RequestLimits] = ContextVar("request_limits", default=RequestLimits())  # noqa: B039 (frozen)


def check_text(value: str, field: str) -> str:
    """Refuse strings that cannot be UTF-8 text: a lone surrogate from a ``\\udXXX`` JSON escape."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{field} holds a lone UTF-16 surrogate (U+{ord(value[exc.start]):04X} at character {exc.start}); "
            "expected valid Unicode text"
        ) from None
    return value


def _cap(value: str, field: str, limit: int) -> str:
    if len(value) > limit:
        raise ValueError(f"{field} is at most {limit} characters, found {len(value)}")
    return check_text(value, field)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _valid_text(cls, value: str) -> str:
        return check_text(value, "text")


class ChatMessage(RefusesUnsupported):
    model_config = ConfigDict(extra="forbid", strict=True)
    REFUSED = REFUSED_MESSAGE

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # handed to the chat template (most templates ignore it)
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls (appliance/openai_tools.py)
    tool_call_id: str | None = Field(default=None, max_length=256)  # a tool message: which call it answers
    # refused unless empty (appliance/openai_fields.py)
    function_call: Any = None
    audio: Any = None
    refusal: Any = None

    @field_validator("content")
    @classmethod
    def _valid_content(cls, value: str | list[TextPart] | None) -> str | list[TextPart] | None:
        return check_text(value, "content") if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        return None if value is None else _cap(value, "name", request_limits.get().max_name_chars)

    def text(self) -> str:
        if self.tool_calls:  # an earlier call, as the model wrote it
            calls = "\n".join(rendered_call(c) for c in self.tool_calls)
            return calls if self.content is None else f"{self.text_content()}\n{calls}"
        return self.text_content()

    def text_content(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def text_length(self) -> int:
        if self.content is None:
            return 0
        if isinstance(self.content, str):
            return len(self.content)
        return sum(len(part.text) for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


@dataclass(frozen=True)
class SamplingValues:
    """What the sampler is asked for, after clamping to what it can honour."""

    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    presence_penalty: float
    frequency_penalty: float
    n: int = 1
    logprobs: int | None = None  # the sampled token's logprob and this many alternatives
    guided: dict[str, Any] | None = None  # response_format, for the engine's token masks
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0


class SamplingExtensions(BaseModel):
    """Sampling fields vLLM and SGLang accept beside OpenAI's (sent with the client's ``extra_body``)."""

    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0, allow_inf_nan=False)


class RefusedChatFields(RefusedCommonFields):
    """OpenAI chat fields this server does not implement: refused unless they ask for nothing."""

    REFUSED = REFUSED_CHAT
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None


class ChatCompletionRequest(SamplingExtensions, RefusedChatFields):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    user: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # one call per reply is what this server makes

    @field_validator("model")
    @classmethod
    def _valid_model(cls, value: str) -> str:
        return _cap(value, "model", request_limits.get().max_model_chars)

    @field_validator("user")
    @classmethod
    def _valid_user(cls, value: str | None) -> str | None:
        return None if value is None else _cap(value, "user", request_limits.get().max_name_chars)

    @field_validator("messages", mode="before")
    @classmethod
    def _message_count(cls, value: Any) -> Any:
        # Checked before the items are validated, so an oversized list costs one len().
        limit = request_limits.get().max_messages
        if isinstance(value, list) and len(value) > limit:
            raise ValueError(f"at most {limit} messages are allowed, found {len(value)}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, found {len(value)}")
        limit = request_limits.get().max_stop_chars
        for stop in [value] if isinstance(value, str) else value or []:
            if not stop:
                raise ValueError("stop sequences must be non-empty strings, found ''")
            _cap(stop, "stop sequence", limit)
        return value

    @model_validator(mode="after")
    def _total_chars(self) -> ChatCompletionRequest:
        limit = request_limits.get().max_total_chars
        total = sum(m.text_length() for m in self.messages)
        if total > limit:
            raise ValueError(f"messages hold at most {limit} characters in all, found {total}")
        return self

    @model_validator(mode="after")
    def _top_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema":
            fmt.json_schema.check_size(request_limits.get().max_schema_chars)  # type: ignore[union-attr]
        check_tools(self.tools, self.tool_choice)
        if self.calls_tools() and fmt is not None and fmt.type != "text":
            raise ValueError("response_format and a required tool call both constrain the reply; send one of them")
        if self.tools:
            size = len(json.dumps([t.model_dump() for t in self.tools]))
            if size > request_limits.get().max_schema_chars:
                raise ValueError(f"tools are at most {request_limits.get().max_schema_chars} characters of JSON, "
                                 f"found {size}")
        return self

    def calls_tools(self) -> bool:
        """Whether the reply must be a call of one of the tools."""
        return bool(calling(self.tools, self.tool_choice))

    def logprobs_count(self) -> int | None:
        """The engine's ``logprobs``: None (off), else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def stop_list(self) -> list[str]:
        return stop_list(self.stop)

    def sampling(self) -> SamplingValues:
        return clamped_sampling(self)

    def template_messages(self) -> list[dict[str, Any]]:
        shown = calling(self.tools, self.tool_choice)
        head = [tools_message(shown)] if shown else []
        return head + [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                       for m in self.messages]


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def clamped_sampling(req: Any) -> SamplingValues:
    """The sampling values to serve for a chat or a completions request (both carry the same
    fields): OpenAI's defaults filled in, then clamped to what the sampler honours (a temperature
    below ``MIN_TEMPERATURE`` is greedy, a ``top_p`` below ``MIN_TOP_P`` is ``MIN_TOP_P``, a seed
    outside [0, 2**63) is taken modulo 2**63)."""
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0
    top_p = 1.0 if req.top_p is None else max(float(req.top_p), MIN_TOP_P)
    tools = calling(getattr(req, "tools", None), getattr(req, "tool_choice", None))
    guided = {"json_schema": call_schema(tools)} if tools else guided_spec(getattr(req, "response_format", None))
    top_k = getattr(req, "top_k", None)
    min_p = getattr(req, "min_p", None)
    repetition_penalty = getattr(req, "repetition_penalty", None)
    return SamplingValues(
        temperature=temperature, top_p=top_p,
        seed=None if req.seed is None else req.seed % SEED_RANGE,
        stop=stop_list(req.stop),
        presence_penalty=float(req.presence_penalty or 0.0),
        frequency_penalty=float(req.frequency_penalty or 0.0),
        n=req.n, logprobs=req.logprobs_count(), guided=guided,
        top_k=-1 if top_k is None else top_k, min_p=float(min_p or 0.0),
        repetition_penalty=1.0 if repetition_penalty is None else float(repetition_penalty),
    )


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope, which the official clients parse into their exception types."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
