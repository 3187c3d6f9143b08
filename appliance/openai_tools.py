"""Tool calling through structured output: the model's reply is forced to be one call.

With ``tools`` and ``tool_choice`` ``"required"`` (or a named function), the engine decodes under a
JSON schema of ``{"name": <a tool's name>, "arguments": <that tool's parameters schema>}``, so the
call always parses and its arguments validate against the tool's parameters; the reply carries it
as ``tool_calls`` with ``finish_reason: "tool_calls"``. The tools are shown to the model in a
system message (the served models' chat templates have no tool syntax of their own).

``tool_choice: "auto"`` (the default when tools are given) would let the model decide between text
and a call: a constrained decoder cannot make that choice for it, so it is refused with a 400 that
says what to send instead. ``"none"`` generates text, as OpenAI does. The conversation may carry
earlier calls (assistant ``tool_calls``) and their results (``tool`` messages with
``tool_call_id``); both are rendered into the prompt as text.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    description: str | None = Field(default=None, max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("a function name is 1 to 64 characters of a-z, A-Z, 0-9, '_' or '-'")
        return value


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: NamedFunction


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    arguments: str


class ToolCall(BaseModel):
    """An earlier call in the conversation (an assistant message's ``tool_calls``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(max_length=256)
    type: Literal["function"]
    function: FunctionCall


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def check_tools(tools: list[Tool] | None, choice: ToolChoice | None) -> None:
    """Refuse what cannot be honoured (ValueError, naming the field's problem)."""
    if not tools:
        if choice not in (None, "none"):
            raise ValueError("tool_choice needs tools: expected a list of tools, found none")
        return
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"at most {MAX_TOOLS} tools are allowed, found {len(tools)}")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique, found {sorted(n for n in set(names) if names.count(n) > 1)}")
    if choice is None or choice == "auto":
        raise ValueError("tool_choice 'auto' (the default with tools) is not supported: the server enforces a call "
                         "with structured output and cannot let the model choose between text and a call; send "
                         "tool_choice 'required', name a function, or 'none'")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools {names}")


def calling(tools: list[Tool] | None, choice: ToolChoice | None) -> list[Tool]:
    """The tools one of which the reply must call (empty: a text reply)."""
    if not tools or choice in (None, "none", "auto"):
        return []
    if isinstance(choice, NamedToolChoice):
        return [t for t in tools if t.function.name == choice.function.name]
    return list(tools)


def call_schema(tools: list[Tool]) -> dict[str, Any]:
    """The JSON schema of one call of one of ``tools``."""
    options = [{
        "type": "object",
        "properties": {"name": {"const": t.function.name},
                       "arguments": t.function.parameters or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tools_message(tools: list[Tool]) -> dict[str, Any]:
    """The system message that shows the model the tools it must call one of."""
    listed = [{"name": t.function.name, "description": t.function.description or "",
               "parameters": t.function.parameters or {"type": "object"}} for t in tools]
    return {"role": "system", "content": (
        "You have these tools:\n" + json.dumps(listed, ensure_ascii=False)
        + "\nAnswer with one call, as a JSON object {\"name\": <tool name>, \"arguments\": {...}}.")}


def rendered_call(call: ToolCall) -> str:
    """An earlier call as the model wrote it."""
    try:
        arguments: Any = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    return json.dumps({"name": call.function.name, "arguments": arguments}, ensure_ascii=False)


def parse_call(text: str) -> dict[str, Any] | None:
    """The reply as an OpenAI tool call, or None when it is not a complete call (cut by max_tokens)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str) or "arguments" not in doc:
        return None
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": doc["name"], "arguments": json.dumps(doc["arguments"], ensure_ascii=False)}}
