"""SamplingParams validation: ValueError naming the field and the allowed range."""

from __future__ import annotations

from typing import Any

import pytest

from engine import SamplingParams


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("max_tokens", 0, ">= 1"),
        ("temperature", -0.1, "in [0, 100]"),
        ("top_p", 0.0, "in (0, 1]"),
        ("top_p", 1.5, "in (0, 1]"),
        ("top_k", -2, "-1 (disabled)"),
        ("min_p", 1.1, "in [0, 1]"),
        ("seed", -1, "[0, 2**63)"),
        ("logprobs", 21, "[0, 20]"),
        ("presence_penalty", 3.0, "in [-2, 2]"),
        ("frequency_penalty", -2.5, "in [-2, 2]"),
        ("repetition_penalty", 0.0, "in (0, 10]"),
        ("stop", [""], "non-empty"),
        ("stop_token_ids", [-1], "integers >= 0"),
    ],
)
def test_invalid_values_name_field_and_range(field: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert allowed in str(info.value)


def test_min_tokens_bounded_by_max_tokens() -> None:
    with pytest.raises(ValueError, match=r"min_tokens must be an integer in \[0, max_tokens=4\]"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_defaults_and_single_stop_string() -> None:
    p = SamplingParams(stop="END")  # type: ignore[arg-type]
    assert p.stop_strings == ["END"]
    assert SamplingParams().max_tokens == 16 and not SamplingParams().greedy
    assert SamplingParams(temperature=0).greedy
