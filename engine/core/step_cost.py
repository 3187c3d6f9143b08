"""How long a step takes for how many batched tokens: a least-squares line over recent steps.

The scheduler asks it how many tokens a step may carry so that the step ends within a request's
TPOT target (time per output token): a long prefill chunk batched with decodes makes every one of
those decodes wait for it. With too little spread in the observed token counts to separate the
fixed cost from the per-token cost (decode-only steps), the whole step time is taken as per-token
cost: a smaller, safe answer.
"""

from __future__ import annotations

from collections import deque

WINDOW = 64  # steps remembered
MIN_STEPS = 4  # observations before any answer


class StepCostModel:
    def __init__(self, window: int = WINDOW) -> None:
        self._obs: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0 and seconds >= 0:
            self._obs.append((num_tokens, seconds))

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds per step, seconds per token), or None before MIN_STEPS observations."""
        n = len(self._obs)
        if n < MIN_STEPS:
            return None
        mean_x = sum(x for x, _ in self._obs) / n
        mean_y = sum(y for _, y in self._obs) / n
        var = sum((x - mean_x) ** 2 for x, _ in self._obs)
        if var > 0:
            slope = sum((x - mean_x) * (y - mean_y) for x, y in self._obs) / var
            base = mean_y - slope * mean_x
            if slope > 0 and base >= 0:
                return base, slope
        return 0.0, mean_y / mean_x

    def max_tokens_within(self, seconds: float) -> int | None:
        """The most tokens a step may batch to end within ``seconds``; None while unknown."""
        fit = self.fit()
        if fit is None:
            return None
        base, per_token = fit
        if per_token <= 0:
            return None
        return max(0, int((seconds - base) / per_token + 1e-6))  # 79.99999 is 80
