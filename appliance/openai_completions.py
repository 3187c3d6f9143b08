"""The legacy OpenAI ``/v1/completions`` request: a plain prompt, no chat template.

Validated as strictly as chat requests (appliance/openai_schema.py), under the same configured
caps (``request_limits``: the prompt counts as the total characters): no type coercion, unknown
fields refused, one prompt (a string, or a list holding exactly one string), ``n`` choices,
``logprobs`` (up to 5 alternatives per token), ``echo`` (the prompt before each choice's text; not
with ``logprobs``, which would need the prompt's logprobs), ``best_of`` only equal to ``n``, and no
``suffix`` or ``logit_bias`` (refused rather than silently dropped: appliance/openai_fields.py).
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from appliance.openai_fields import REFUSED_COMPLETIONS, RefusedCommonFields
from appliance.openai_schema import (
    SamplingExtensions,
    SamplingValues,
    StreamOptions,
    check_text,
    clamped_sampling,
    request_limits,
)
from engine.sampling_params import MAX_N


class RefusedCompletionFields(RefusedCommonFields):
    """OpenAI completions fields this server does not implement: refused unless they ask for nothing."""

    REFUSED = REFUSED_COMPLETIONS
    suffix: Any = None


class CompletionRequest(SamplingExtensions, RefusedCompletionFields):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    user: str | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        limit = request_limits.get().max_model_chars
        if len(value) > limit:
            raise ValueError(f"model is at most {limit} characters, found {len(value)}")
        return check_text(value, "model")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"exactly one prompt per request is supported, found {len(value)}")
        text = value if isinstance(value, str) else value[0]
        limit = request_limits.get().max_total_chars
        if len(text) > limit:
            raise ValueError(f"prompt is at most {limit} characters, found {len(text)}")
        if not text:
            raise ValueError("a non-empty prompt, found an empty string")
        check_text(text, "prompt")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, found {len(stops)}")
        limit = request_limits.get().max_stop_chars
        for stop in stops:
            if len(stop) > limit:
                raise ValueError(f"each stop sequence is at most {limit} characters, found {len(stop)}")
            check_text(stop, "stop")
        return value

    @model_validator(mode="after")
    def _combinations(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of other than n is not supported (found best_of {self.best_of}, n {self.n}); "
                             "leave best_of out")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs would need the prompt's logprobs, which this server does not "
                             "compute; use one or the other")
        return self

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def sampling(self) -> SamplingValues:
        return clamped_sampling(self)
