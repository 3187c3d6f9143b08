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
    assert limiter.reserve("t", tpm=0, tokens=10, rpm=2).allowed
    clock.now += 10
    assert limiter.reserve("t", tpm=0, tokens=10, rpm=2).allowed
    denied = limiter.reserve("t", tpm=0, tokens=10, rpm=2)
    assert not denied.allowed and "2 requests per minute" in denied.reason
    assert denied.retry_after_s == 50
    clock.now += 51
    assert limiter.reserve("t", tpm=0, tokens=10, rpm=2).allowed


def test_tenants_have_separate_budgets() -> None:
    limiter = RateLimiter(FakeClock())
    assert limiter.reserve("a", tpm=0, tokens=1, rpm=1).allowed
    assert not limiter.reserve("a", tpm=0, tokens=1, rpm=1).allowed
    assert limiter.reserve("b", tpm=0, tokens=1, rpm=1).allowed


def test_token_budget_counts_settled_usage() -> None:
    limiter = RateLimiter(FakeClock())
    first = limiter.reserve("t", tpm=100, tokens=80)
    other = limiter.reserve("t", tpm=100, tokens=10)  # same size as nothing else: settled by ticket, not by count
    assert first.allowed and other.allowed and first.ticket != other.ticket
    assert not limiter.reserve("t", tpm=100, tokens=30).allowed  # a refused reservation takes nothing
    limiter.settle(first.ticket, used=20)
    assert limiter.reserve("t", tpm=100, tokens=70).allowed
    assert not limiter.reserve("t", tpm=100, tokens=1).allowed


def test_concurrency_slots_per_tenant() -> None:
    limiter = RateLimiter(FakeClock())
    assert limiter.enter("a", rpm=0, max_concurrent=2).allowed
    assert limiter.enter("a", rpm=0, max_concurrent=2).allowed
    refused = limiter.enter("a", rpm=0, max_concurrent=2)
    assert not refused.allowed and refused.code == "concurrency_limit_exceeded"
    assert limiter.enter("b", rpm=0, max_concurrent=2).allowed  # another tenant's slots are its own
    limiter.leave("a")
    assert limiter.enter("a", rpm=0, max_concurrent=2).allowed


def test_admission_refuses_when_queue_would_miss_target() -> None:
    ctl = AdmissionController(smoothing=1.0)
    assert ctl.try_admit("n", "t", 1, 100, ttft_target_ms=1000).admitted  # no measurement yet: admit
    ctl.first_token("n", "t", 1, 100, ttft_s=1.0)  # learns 100 prompt tokens per second
    assert ctl.queued_tokens("n") == 0
    assert ctl.try_admit("n", "t", 1, 50, ttft_target_ms=1000).admitted  # 0.5 s estimate
    refused = ctl.try_admit("n", "t", 1, 80, ttft_target_ms=1000)  # (50 + 80) / 100 = 1.3 s > 1 s
    assert not refused.admitted and refused.retry_after_s >= 1
    assert refused.estimated_ttft_ms == pytest.approx(1300)
    ctl.release("n", "t", 1, 50)
    assert ctl.try_admit("n", "t", 1, 80, ttft_target_ms=1000).admitted


def test_admission_counts_another_tenants_flood_only_up_to_a_fair_share() -> None:
    ctl = AdmissionController(smoothing=1.0)
    ctl.try_admit("n", "flood", 1, 100, ttft_target_ms=1000)
    ctl.first_token("n", "flood", 1, 100, ttft_s=1.0)  # 100 prompt tokens per second
    for _ in range(100):  # a batch tenant queues 100 x 50 tokens = 50 s of prefill
        ctl.try_admit("n", "flood", 1, 50, ttft_target_ms=10**9)
    assert ctl.queued_tokens("n", "flood") == 5000
    # the victim's 50 tokens wait for at most as much of the flood as its own share: (50 + 50) / 100
    victim = ctl.try_admit("n", "victim", 1, 50, ttft_target_ms=1000)
    assert victim.admitted and victim.estimated_ttft_ms == pytest.approx(1000)
    # a higher-priority class waits for nothing of a lower one; a lower one waits for all of it
    assert ctl.estimate_ms("n", "other", 0, 50) == pytest.approx(500)
    assert ctl.estimate_ms("n", "other", 2, 50) == pytest.approx((5000 + 50 + 50) * 10)


def test_admission_caps_a_tenants_queued_tokens() -> None:
    ctl = AdmissionController()
    assert ctl.try_admit("n", "t", 1, 60, 1000, max_queued_tokens=100).admitted
    refused = ctl.try_admit("m", "t", 1, 60, 1000, max_queued_tokens=100)  # across nodes
    assert not refused.admitted and "queue limit of 100" in refused.reason
    assert ctl.try_admit("n", "u", 1, 60, 1000, max_queued_tokens=100).admitted


def test_admission_rejects_bad_smoothing() -> None:
    with pytest.raises(ValueError, match="smoothing"):
        AdmissionController(smoothing=0)
