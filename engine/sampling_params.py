"""Per-request sampling parameters, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_N = 16
GUIDED_KINDS = ("json_object", "json_schema", "regex", "grammar")


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """temperature == 0 means greedy. top_k = -1 (or 0) disables top-k.

    Penalties: presence/frequency (OpenAI semantics, over generated tokens) and repetition
    (HF semantics, over prompt + generated tokens). logprobs = N returns, per generated token,
    the sampled token's log-probability plus the N most likely alternatives (from raw logits).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # n > 1: that many independent choices of one prompt, sharing its KV blocks (engine/README: n)
    n: int = 1
    # constrained decoding: exactly one key, {"json_object": true} | {"json_schema": <schema dict>}
    # | {"regex": <pattern>} | {"grammar": <EBNF/Lark text>}; enforced with token masks (engine.guided)
    guided: dict[str, Any] | None = None
    _stop_tuple: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               "max_tokens", "an integer >= 1", self.max_tokens)
        _check(0.0 <= self.temperature <= 100.0, "temperature", "in [0, 100]", self.temperature)
        _check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 0),
               "top_k", "-1 (disabled), 0 (disabled) or an integer >= 1", self.top_k)
        _check(0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]", self.min_p)
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
               "seed", "None or an integer in [0, 2**63)", self.seed)
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", f"an integer in [0, max_tokens={self.max_tokens}]", self.min_tokens)
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               "logprobs", "None or an integer in [0, 20]", self.logprobs)
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "in [-2, 2]", self.presence_penalty)
        _check(-2.0 <= self.frequency_penalty <= 2.0,
               "frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        _check(0.0 < self.repetition_penalty <= 10.0,
               "repetition_penalty", "in (0, 10]", self.repetition_penalty)
        _check(isinstance(self.n, int) and not isinstance(self.n, bool) and 1 <= self.n <= MAX_N,
               "n", f"an integer in [1, {MAX_N}]", self.n)
        _check(self.guided is None or (isinstance(self.guided, dict) and len(self.guided) == 1
                                       and next(iter(self.guided)) in GUIDED_KINDS),
               "guided", f"None or a dict with exactly one key of {list(GUIDED_KINDS)}", self.guided)
        stop = self.stop
        if isinstance(stop, str):
            stop = [stop]
        _check(stop is None or (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)),
               "stop", "None, a non-empty string or a list of non-empty strings", self.stop)
        object.__setattr__(self, "_stop_tuple", tuple(stop or ()))
        ids = self.stop_token_ids
        _check(ids is None or (isinstance(ids, list) and all(isinstance(i, int) and i >= 0 for i in ids)),
               "stop_token_ids", "None or a list of integers >= 0", ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stop_strings(self) -> list[str]:
        return list(self._stop_tuple)

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
