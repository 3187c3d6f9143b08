"""Tenant limits held across gateway processes: real processes, real threads, one real database.

Each "gateway" is a separate process (multiprocessing, spawn) with its own engine and its own
SharedRateLimiter, driving it from asyncio clients as the gateway does; on SQLite they share one
file, on PostgreSQL one database. They start together and hammer one tenant: the accepted total is
exactly the limit, settled tokens come back and are used again, the tenant's requests in flight
never exceed its concurrency limit, and a gateway killed with SIGKILL loses at most its lease while
its concurrency slots come back once its heartbeat expires.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.synchronize
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.db import open_database
from appliance.limit_leases import SharedRateLimiter

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'appliance.db'}"
    return str(request.getfixturevalue("postgres_db_url"))


def _gateway(url: str, job: dict[str, Any], ready: Any, start: multiprocessing.synchronize.Event,
             results: Any, in_flight: Any, peak: Any) -> None:
    """One gateway process: ``job["clients"]`` asyncio clients for ``job["seconds"]``."""
    engine = open_database(url)
    limiter = SharedRateLimiter(engine, holder_expiry_s=job.get("holder_expiry_s", 30.0))
    ready.put(1)
    start.wait(120)

    async def client() -> tuple[int, int]:
        accepted = refused = 0
        deadline = time.monotonic() + job["seconds"]
        while time.monotonic() < deadline:
            entered = await limiter.enter("acme", job["rpm"], job["max_concurrent"])
            if not entered.allowed:
                refused += 1
                await asyncio.sleep(0.005)
                continue
            with in_flight.get_lock():
                in_flight.value += 1
                peak.value = max(peak.value, in_flight.value)
            reserved = await limiter.reserve("acme", job["tpm"], job["tokens"], job["rpm"])
            await asyncio.sleep(job.get("hold_s", 0))
            with in_flight.get_lock():
                in_flight.value -= 1
            if reserved.allowed:
                accepted += 1
                limiter.settle(reserved.ticket, job["used"])
            else:
                refused += 1
            limiter.leave("acme")
            await asyncio.sleep(0.001 if reserved.allowed else 0.005)
        return accepted, refused

    async def clients() -> list[tuple[int, int]]:
        return await asyncio.gather(*(client() for _ in range(job["clients"])))

    done = asyncio.run(clients())
    limiter.close()
    engine.dispose()
    results.put((sum(a for a, _ in done), sum(r for _, r in done)))


def _run_gateways(url: str, job: dict[str, Any], count: int) -> tuple[list[tuple[int, int]], int]:
    """Start ``count`` gateway processes, let them go at once; (accepted, refused) each, and the
    most requests that were in flight at once across all of them."""
    open_database(url).dispose()  # the tables exist before the processes race
    ready, results, start = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event()
    in_flight, peak = SPAWN.Value("i", 0), SPAWN.Value("i", 0)
    procs = [SPAWN.Process(target=_gateway, args=(url, job, ready, start, results, in_flight, peak))
             for _ in range(count)]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        start.set()
        outcome = [results.get(timeout=120 + job["seconds"]) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    return outcome, int(peak.value)


def _ledger(url: str) -> tuple[int, int, int]:
    engine = open_database(url)
    limiter = SharedRateLimiter(engine, background=False)
    try:
        return limiter.totals("acme")
    finally:
        limiter.close()
        engine.dispose()


def test_three_gateways_accept_exactly_the_requests_per_minute(store_url: str) -> None:
    job = {"rpm": 37, "tpm": 1_000_000, "tokens": 50, "used": 20, "max_concurrent": 0, "clients": 4,
           "seconds": 3.0}
    outcome, _ = _run_gateways(store_url, job, 3)
    accepted = sum(a for a, _ in outcome)
    assert accepted == 37, outcome
    assert all(refused > 0 for _, refused in outcome)  # every gateway met the limit
    assert _ledger(store_url) == (37, 37 * 20, 0)  # what was settled; nothing leased or held is left


def test_settled_tokens_come_back_and_are_used_across_gateways(store_url: str) -> None:
    # 300 reserved per request, 100 used: without settling 10 requests fit in 3000 tokens
    job = {"rpm": 100_000, "tpm": 3000, "tokens": 300, "used": 100, "max_concurrent": 0, "clients": 3,
           "seconds": 4.0}
    outcome, _ = _run_gateways(store_url, job, 2)
    accepted = sum(a for a, _ in outcome)
    # at every grant the charges (100 settled, 300 reserved) plus 300 fit in 3000: never more than
    # 30; once everything is settled and given back a request fits while 100 * accepted <= 2700
    assert 28 <= accepted <= 30, outcome
    assert _ledger(store_url)[:2] == (accepted, 100 * accepted)


def test_requests_in_flight_across_gateways_never_exceed_the_concurrency_limit(store_url: str) -> None:
    job = {"rpm": 100_000, "tpm": 10_000_000, "tokens": 10, "used": 10, "max_concurrent": 3, "clients": 4,
           "seconds": 3.0, "hold_s": 0.01}
    outcome, peak = _run_gateways(store_url, job, 3)
    assert 1 <= peak <= 3, peak
    assert sum(a for a, _ in outcome) >= 20 and sum(r for _, r in outcome) > 0, outcome
    assert _ledger(store_url)[2] == 0  # every slot given back at close


def _holder(url: str, ready: Any) -> None:
    """A gateway that takes a lease and two slots, then hangs until it is killed (its lease lives
    longer than the test, so it is still held then; its heartbeat goes on until the kill)."""
    limiter = SharedRateLimiter(open_database(url), holder_expiry_s=5.0, lease_s=600)
    taken = limiter.reserve_blocking("acme", tpm=0, tokens=1, rpm=20)
    slots = [limiter.enter_blocking("acme", rpm=0, max_concurrent=2).allowed for _ in range(2)]
    ready.put((taken.allowed, slots))
    time.sleep(600)


def test_a_killed_gateway_loses_at_most_its_lease_and_its_slots_come_back(store_url: str) -> None:
    open_database(store_url).dispose()
    ready = SPAWN.Queue()
    proc = SPAWN.Process(target=_holder, args=(store_url, ready))
    proc.start()
    engine = open_database(store_url)
    limiter = SharedRateLimiter(engine, holder_expiry_s=5.0)
    try:
        assert ready.get(timeout=120) == (True, [True, True])
        leased = limiter.totals("acme")[0]
        assert 1 < leased < 20  # a slice of the minute's 20 requests
        assert not limiter.enter_blocking("acme", rpm=0, max_concurrent=2).allowed  # alive: its slots count
        proc.kill()  # SIGKILL: nothing is given back
        proc.join(timeout=30)
        assert not limiter.enter_blocking("acme", rpm=0, max_concurrent=2).allowed  # its heartbeat is fresh
        accepted = 0
        while limiter.reserve_blocking("acme", tpm=0, tokens=1, rpm=20).allowed:
            accepted += 1
        assert accepted == 20 - leased  # the dead gateway's lease stays counted until its window passes
        deadline = time.monotonic() + 60
        while not limiter.enter_blocking("acme", rpm=0, max_concurrent=2).allowed:
            assert time.monotonic() < deadline, "the killed gateway's slots never came back"
            time.sleep(0.2)
        assert limiter.enter_blocking("acme", rpm=0, max_concurrent=2).allowed  # both of them
    finally:
        if proc.is_alive():
            proc.kill()
        limiter.close()
        engine.dispose()
