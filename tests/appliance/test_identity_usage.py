"""Token budgets per UTC day and month in real SQLite: atomic reservations under concurrent
threads and two stores (as two gateway processes would have), refusals that consume nothing,
settlement into the periods reserved in."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.db import open_database
from appliance.usage import UsageStore


@dataclass(frozen=True)
class Limits:
    max_tokens_per_day: int = 0
    max_tokens_per_month: int = 0


NOON = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)


@pytest.fixture()
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db.sqlite'}"


def test_concurrent_reservations_never_overspend(url: str) -> None:
    stores = [UsageStore(open_database(url)), UsageStore(open_database(url))]  # two "gateways"
    limits = Limits(max_tokens_per_day=1000)

    def one(i: int) -> bool:
        return stores[i % 2].reserve("acme", 30, limits, now=NOON).allowed

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(80)))
    assert sum(results) == 1000 // 30  # 33 fit, 47 refused, whatever the interleaving
    day, month = stores[0].usage("acme", limits, now=NOON)
    assert day.tokens == month.tokens == 33 * 30
    assert day.requests == month.requests == 33  # refused reservations are not requests


def test_refusal_names_the_period_and_consumes_nothing(url: str) -> None:
    store = UsageStore(open_database(url))
    limits = Limits(max_tokens_per_day=0, max_tokens_per_month=100)
    assert store.reserve("acme", 60, limits, now=NOON).allowed
    refused = store.reserve("acme", 50, limits, now=NOON)
    assert not refused.allowed and refused.reservation is None and refused.code == "token_budget_exceeded"
    assert "per UTC month" in refused.reason and "at most 100" in refused.reason and "found 60 used" in refused.reason
    expected_wait = (dt.datetime(2027, 1, 1, tzinfo=dt.UTC) - NOON).total_seconds()
    assert refused.retry_after_s is not None and abs(refused.retry_after_s - expected_wait) <= 2
    day, month = store.usage("acme", limits, now=NOON)
    assert (day.tokens, month.tokens) == (60, 60)  # the day counter was not left half-updated
    assert month.to_dict()["remaining"] == 40 and day.to_dict()["limit"] is None


def test_settle_replaces_the_reservation_in_the_periods_it_was_made_in(url: str) -> None:
    store = UsageStore(open_database(url))
    limits = Limits(max_tokens_per_day=500)
    before_midnight = dt.datetime(2026, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
    decision = store.reserve("acme", 400, limits, now=before_midnight)
    assert decision.reservation is not None
    store.settle("acme", decision.reservation, 25)  # settled after midnight, counted on the 31st
    day, month = store.usage("acme", limits, now=before_midnight)
    assert (day.tokens, month.tokens) == (25, 25)
    new_year = dt.datetime(2027, 1, 1, 0, 0, 1, tzinfo=dt.UTC)
    day, month = store.usage("acme", limits, now=new_year)
    assert (day.period, day.tokens, month.period, month.tokens) == ("2027-01-01", 0, "2027-01", 0)
    assert store.reserve("acme", 500, limits, now=new_year).allowed  # a new day, a new budget


def test_release_takes_a_refused_requests_reservation_back(url: str) -> None:
    store = UsageStore(open_database(url))
    limits = Limits(max_tokens_per_day=100)
    kept = store.reserve("acme", 30, limits, now=NOON)
    dropped = store.reserve("acme", 70, limits, now=NOON)
    assert kept.reservation is not None and dropped.reservation is not None
    assert not store.reserve("acme", 1, limits, now=NOON).allowed
    store.release("acme", dropped.reservation)  # e.g. admission refused it after the reservation
    day, month = store.usage("acme", limits, now=NOON)
    assert (day.tokens, day.requests, month.tokens, month.requests) == (30, 1, 30, 1)
    assert store.reserve("acme", 70, limits, now=NOON).allowed


def test_tenants_have_separate_counters_and_bad_values_are_refused(url: str) -> None:
    store = UsageStore(open_database(url))
    limits = Limits(max_tokens_per_day=10)
    assert store.reserve("a", 10, limits, now=NOON).allowed
    assert store.reserve("b", 10, limits, now=NOON).allowed
    assert not store.reserve("a", 1, limits, now=NOON).allowed
    with pytest.raises(ValueError, match="expected an int >= 0"):
        store.reserve("a", -1, limits)
    decision = store.reserve("b", 0, Limits(), now=NOON)
    assert decision.reservation is not None
    with pytest.raises(ValueError, match="reservation of tenant 'a'"):
        store.settle("a", decision.reservation, 1)


def test_counts_and_settlements_are_written_in_batches_and_seen_at_once_by_their_store(url: str) -> None:
    """No transaction per request: ``count``/``settle`` go into an in-memory delta that the flusher
    thread writes; the store that took them shows them at once, another store after the flush."""
    import time

    writer = UsageStore(open_database(url), flush_interval_s=0.05)
    reader = UsageStore(open_database(url))
    limits = Limits(max_tokens_per_day=1000)
    held = writer.reserve("acme", 300, limits, now=NOON)
    assert held.reservation is not None
    writer.settle("acme", held.reservation, 100)
    for _ in range(5):
        writer.count("acme", 7, now=NOON)
    day, month = writer.usage("acme", limits, now=NOON)
    assert (day.tokens, day.requests, month.tokens) == (135, 6, 135)  # its own pending deltas included
    deadline = time.monotonic() + 10
    while reader.usage("acme", limits, now=NOON)[0].tokens != 135:  # the flusher writes them
        assert time.monotonic() < deadline, "pending usage was not written by the flusher"
        time.sleep(0.02)
    assert reader.usage("acme", limits, now=NOON)[0].requests == 6
    writer.count("acme", 5, now=NOON)
    writer.close()  # what is pending is written at close
    assert reader.usage("acme", limits, now=NOON)[0].tokens == 140
    with pytest.raises(ValueError, match="expected an int >= 0"):
        writer.count("acme", -1)


def test_pending_usage_survives_a_failed_flush(url: str) -> None:
    """The database refusing a batch keeps its deltas pending for the next one (nothing lost)."""
    import sqlalchemy as sa

    engine = open_database(url)
    store = UsageStore(engine, flush_interval_s=3600)
    store.count("acme", 9, now=NOON)
    store.flush()
    with engine.begin() as conn:  # the database refuses every update of the counters
        conn.execute(sa.text("CREATE TRIGGER no_updates BEFORE UPDATE ON token_usage "
                             "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"))
    store.count("acme", 4, now=NOON)
    with pytest.raises(sa.exc.DatabaseError, match="disk says no"):
        store.flush()
    store.count("acme", 1, now=NOON)
    assert store.usage("acme", Limits(), now=NOON)[0].tokens == 14  # still pending, not lost
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER no_updates"))
    store.close()
    assert UsageStore(open_database(url)).usage("acme", Limits(), now=NOON)[0].tokens == 14
