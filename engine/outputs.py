"""Results handed to callers: whole outputs (offline) and stream deltas (online)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "deadline" (ended at its SLA deadline)
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    logprobs: list[dict[int, float]] | None = None
    num_cached_tokens: int = 0
    index: int = 0  # which of the request's n choices (SamplingParams.n)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StreamDelta:
    """One step of one choice of a streamed request.

    With n > 1 the deltas of all choices come interleaved on one stream, each with its ``index``
    and the request's own ``request_id``; each choice's last delta has ``finished=True`` and the
    stream ends once every choice has finished. Usage: ``num_prompt_tokens`` is the request's prompt,
    the same on every choice, so a caller counts it once per request; ``num_output_tokens`` is this
    choice's own count so far, so the request's output tokens are the sum over its choices' last deltas.
    """

    request_id: str
    text: str  # new text since the last delta
    token_ids: list[int]  # new token ids since the last delta
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[dict[int, float]] | None = field(default=None)
    num_cached_tokens: int = 0
    index: int = 0  # which of the request's n choices this delta belongs to
