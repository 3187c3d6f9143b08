"""No OpenAI request field is silently dropped: each is honoured or refused with a 400 naming it.

The request models forbid unknown fields (a typo such as ``temprature`` is a 400, not a default).
The OpenAI fields this server does not implement are declared here, so that a request naming one
is refused with the field as ``param`` and a message saying why, unless its value asks for
nothing: null, ``false``, an empty list or object, or one of the inert values listed (``tool_choice:
"none"``, ``service_tier: "auto"``, ``modalities: ["text"]``): a client library that sends its
defaults keeps working. ``response_format`` (JSON object / JSON schema) is validated here too; the
engine enforces it with token masks (``SamplingParams.guided``).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# field -> (inert values besides null / false / [] / {}, why it is refused otherwise)
_REFUSED_COMMON: dict[str, tuple[tuple[Any, ...], str]] = {
    "logit_bias": ((), "logit_bias is not supported by this server"),
    "metadata": ((), "metadata is stored only with store=true, which this server does not offer "
                     "(its audit log records every request)"),
    "store": ((), "store=true (OpenAI's stored completions) is not offered; the audit log records every request"),
    "service_tier": (("auto", "default"), "this server has one service tier: 'auto' or 'default'"),
    "prompt_cache_key": ((), "prompt_cache_key is not supported; the prefix cache is per tenant already"),
    "prompt_cache_retention": ((), "prompt_cache_retention is not supported"),
    "safety_identifier": ((), "safety_identifier is not supported; use 'user'"),
}
REFUSED_CHAT: dict[str, tuple[tuple[Any, ...], str]] = {
    **_REFUSED_COMMON,
    "functions": ((), "the deprecated functions are not supported; use tools"),
    "function_call": (("none",), "the deprecated function_call is not supported; use tool_choice"),
    "audio": ((), "audio output is not supported; text only"),
    "modalities": ((["text"],), "only the 'text' modality is supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "reasoning_effort": ((), "reasoning_effort is not supported by the served models"),
    "verbosity": ((), "verbosity is not supported by the served models"),
    "web_search_options": ((), "web search is not available on an air-gapped appliance"),
}
REFUSED_COMPLETIONS: dict[str, tuple[tuple[Any, ...], str]] = {
    **_REFUSED_COMMON,
    "suffix": (("",), "suffix (insertion) is not supported by the served models"),
}
REFUSED_MESSAGE: dict[str, tuple[tuple[Any, ...], str]] = {
    "function_call": ((), "the deprecated function_call is not supported; use tool_calls"),
    "audio": ((), "audio is not supported; text only"),
    "refusal": (("",), "assistant refusal messages are not supported as input"),
}


class RefusesUnsupported(BaseModel):
    """A request model whose ``REFUSED`` fields (declared ``Any = None`` in it) are refused by name
    unless their value asks for nothing."""

    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {}

    @field_validator("*")
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name in cls.REFUSED:
            return refuse_unsupported(value, info.field_name, cls.REFUSED)
        return value


class RefusedCommonFields(RefusesUnsupported):
    """The OpenAI fields neither endpoint implements (declared so that naming one is a 400 saying why)."""

    logit_bias: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    safety_identifier: Any = None


def _inert(value: Any, allowed: tuple[Any, ...]) -> bool:
    return value is None or value is False or value == [] or value == {} or value in allowed


def refuse_unsupported(value: Any, field: str, table: dict[str, tuple[tuple[Any, ...], str]]) -> Any:
    allowed, why = table[field]
    if not _inert(value, allowed):
        raise ValueError(f"{why}; leave {field} out")
    return value


# ---- response_format ------------------------------------------------------------------------
MAX_SCHEMA_DEPTH = 32
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_SCHEMA_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _SCHEMA_NAME.match(value):
            raise ValueError("name must be 1 to 64 characters of a-z, A-Z, 0-9, '_' or '-'")
        return value

    def check_size(self, limit: int) -> None:
        """Refuse a schema over ``limit`` characters of JSON or nested too deep (the request's caps)."""
        if self.schema_ is None:
            return
        size = len(json.dumps(self.schema_, ensure_ascii=False, allow_nan=False))
        if size > limit:
            raise ValueError(f"response_format.json_schema.schema is at most {limit} characters of JSON, found {size}")
        if _depth(self.schema_) > MAX_SCHEMA_DEPTH:
            raise ValueError(f"response_format.json_schema.schema nests at most {MAX_SCHEMA_DEPTH} levels deep")


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["json_object"]


class JsonSchemaResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]


def guided_spec(fmt: TextFormat | JsonObjectFormat | JsonSchemaResponseFormat | None) -> dict[str, Any] | None:
    """The engine's ``SamplingParams.guided`` for a response_format (None: unconstrained text)."""
    if fmt is None or isinstance(fmt, TextFormat):
        return None
    if isinstance(fmt, JsonObjectFormat) or fmt.json_schema.schema_ is None:
        return {"json_object": True}
    return {"json_schema": fmt.json_schema.schema_}
