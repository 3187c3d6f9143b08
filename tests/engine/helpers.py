"""Model-free helpers for bookkeeping tests."""

from __future__ import annotations

from typing import Any

from engine.core.sequence import Sequence
from engine.sampling_params import SamplingParams


def make_seq(request_id: str, tokens: list[int], **kwargs: Any) -> Sequence:
    """A Sequence without a tokenizer (bookkeeping tests never detokenize)."""
    params = kwargs.pop("params", SamplingParams(max_tokens=16))
    return Sequence(request_id, list(tokens), params, detokenizer=None, **kwargs)  # type: ignore[arg-type]
