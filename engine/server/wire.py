"""Wire format shared by the node server and RemoteEngine: JSON request bodies, NDJSON deltas.

Every response line is one JSON object: a StreamDelta's fields, or {"error": {"type", "message"}}.
logprobs maps are sent with string keys (JSON) and turned back into int keys on receipt.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pydantic import BaseModel, Field, model_validator

from engine import errors
from engine.outputs import StreamDelta
from engine.sampling_params import SamplingParams

SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if not f.name.startswith("_"))


class GenerateBody(BaseModel):
    request_id: str = Field(min_length=1, max_length=256)
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    params: dict[str, Any] = Field(default_factory=dict)  # SamplingParams fields
    cache_salt: str | None = Field(default=None, max_length=1024)
    priority: int = 0
    deadline: float | None = Field(default=None, allow_inf_nan=False)  # absolute time.time()
    tenant: str | None = Field(default=None, min_length=1, max_length=256)  # fair share between tenants
    tpot_target_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # caps steps' batch size

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateBody:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("exactly one of 'prompt' and 'prompt_token_ids' must be given")
        return self

    def sampling_params(self) -> SamplingParams:
        unknown = sorted(set(self.params) - set(SAMPLING_FIELDS))
        if unknown:
            raise ValueError(f"params: unknown fields {unknown}; allowed {list(SAMPLING_FIELDS)}")
        return SamplingParams(**self.params)


class AbortBody(BaseModel):
    request_id: str = Field(min_length=1, max_length=256)


def params_to_wire(params: SamplingParams) -> dict[str, Any]:
    defaults = SamplingParams()
    return {name: getattr(params, name) for name in SAMPLING_FIELDS if getattr(params, name) != getattr(defaults, name)}


def delta_to_line(delta: StreamDelta) -> bytes:
    return json.dumps(dataclasses.asdict(delta)).encode() + b"\n"


def error_to_line(exc: BaseException) -> bytes:
    return json.dumps({"error": error_body(exc)}).encode() + b"\n"


def error_body(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


def delta_from_obj(obj: dict[str, Any]) -> StreamDelta:
    lps = obj.get("logprobs")
    if lps is not None:
        obj = {**obj, "logprobs": [{int(k): float(v) for k, v in lp.items()} for lp in lps]}
    return StreamDelta(**obj)


def error_from_body(body: dict[str, Any]) -> errors.EngineError:
    """The engine exception named by the server (RequestError subclasses), else RequestError."""
    name, message = str(body.get("type", "")), str(body.get("message", ""))
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.RequestError):
        return cls(message)
    if name == "EngineDeadError":
        return errors.EngineDeadError(message)
    return errors.RequestError(f"{name}: {message}" if name else message)
