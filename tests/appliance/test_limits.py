from __future__ import annotations

import pytest

from appliance.admission import AdmissionController
from appliance.ratelimit import RateLimiter


class FakeClock:
    """A manual clock: rate windows are tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_limit_and_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    assert limiter.check_and_record("t", rpm=2, tpm=0, tokens=10).allowed
    clock.now += 10
    assert limiter.check_and_record("t", rpm=2, tpm=0, tokens=10).allowed
    denied = limiter.check_and_record("t", rpm=2, tpm=0, tokens=10)
    assert not denied.allowed and "2 requests per minute" in denied.reason
    assert denied.retry_after_s == 50
    clock.now += 51
    assert limiter.check_and_record("t", rpm=2, tpm=0, tokens=10).allowed


def test_tenants_have_separate_budgets() -> None:
    limiter = RateLimiter(FakeClock())
    assert limiter.check_and_record("a", rpm=1, tpm=0, tokens=1).allowed
    assert not limiter.check_and_record("a", rpm=1, tpm=0, tokens=1).allowed
    assert limiter.check_and_record("b", rpm=1, tpm=0, tokens=1).allowed


def test_token_budget_counts_settled_usage() -> None:
    limiter = RateLimiter(FakeClock())
    assert limiter.check_and_record("t", rpm=0, tpm=100, tokens=80).allowed
    assert not limiter.check_and_record("t", rpm=0, tpm=100, tokens=30).allowed
    limiter.settle("t", reserved=80, used=20)
    assert limiter.check_and_record("t", rpm=0, tpm=100, tokens=30).allowed


def test_admission_refuses_when_queue_would_miss_target() -> None:
    ctl = AdmissionController(smoothing=1.0)
    assert ctl.try_admit("n", 100, ttft_target_ms=1000).admitted  # no measurement yet: admit
    ctl.first_token("n", 100, ttft_s=1.0)  # learns 100 prompt tokens per second
    assert ctl.queued_tokens("n") == 0
    assert ctl.try_admit("n", 50, ttft_target_ms=1000).admitted  # 0.5 s estimate
    refused = ctl.try_admit("n", 80, ttft_target_ms=1000)  # (50 + 80) / 100 = 1.3 s > 1 s
    assert not refused.admitted and refused.retry_after_s >= 1
    assert refused.estimated_ttft_ms == pytest.approx(1300)
    ctl.release("n", 50)
    assert ctl.try_admit("n", 80, ttft_target_ms=1000).admitted


def test_admission_rejects_bad_smoothing() -> None:
    with pytest.raises(ValueError, match="smoothing"):
        AdmissionController(smoothing=0)
