"""SharedRateLimiter (appliance/limit_leases.py) on a real SQLite file and a real PostgreSQL.

The in-memory limiter's behaviour (tests/appliance/test_limits.py) must hold unchanged when the
budgets live in the database; "two gateways" here are two limiters on two engines of one database
(tests/appliance/test_shared_limits_processes.py runs them as separate processes). A manual clock,
given to both the leases and the ledger, tests windows, lease life and heartbeats without sleeping.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from appliance.db import open_database
from appliance.limit_leases import LimitsUnavailable, SharedRateLimiter
from policies import PolicyValidationError, default_policy_dir, load_policy_set


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'appliance.db'}"
    return str(request.getfixturevalue("postgres_db_url"))


@pytest.fixture
def engines(store_url: str) -> Iterator[list[sa.Engine]]:
    """Two engines on one database: what two gateway processes hold."""
    made = [open_database(store_url), open_database(store_url)]
    yield made
    for engine in made:
        engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pair(engines: list[sa.Engine], clock: FakeClock) -> Iterator[list[SharedRateLimiter]]:
    made = [SharedRateLimiter(e, clock=clock, background=False) for e in engines]
    yield made
    for limiter in made:
        limiter.close()


def test_requests_per_minute_limit_and_retry_after(pair: list[SharedRateLimiter], clock: FakeClock) -> None:
    limiter = pair[0]
    assert limiter.reserve_blocking("t", tpm=0, tokens=10, rpm=2).allowed
    clock.now += 10
    assert limiter.reserve_blocking("t", tpm=0, tokens=10, rpm=2).allowed
    denied = limiter.reserve_blocking("t", tpm=0, tokens=10, rpm=2)
    assert not denied.allowed and denied.reason == "rate limit of 2 requests per minute reached"
    assert denied.code == "rate_limit_exceeded" and denied.retry_after_s == 50
    refused_here = pair[1].reserve_blocking("t", tpm=0, tokens=10, rpm=2)  # the other gateway: the same minute
    assert not refused_here.allowed and refused_here.retry_after_s == 50
    assert not pair[1].enter_blocking("t", rpm=2).allowed
    clock.now += 51
    assert pair[1].reserve_blocking("t", tpm=0, tokens=10, rpm=2).allowed
    assert not pair[0].reserve_blocking("t", tpm=0, tokens=10, rpm=2).allowed


def test_tenants_have_separate_budgets(pair: list[SharedRateLimiter]) -> None:
    limiter = pair[0]
    assert limiter.reserve_blocking("a", tpm=0, tokens=1, rpm=1).allowed
    assert not limiter.reserve_blocking("a", tpm=0, tokens=1, rpm=1).allowed
    assert limiter.reserve_blocking("b", tpm=0, tokens=1, rpm=1).allowed
    assert pair[1].reserve_blocking("c", tpm=0, tokens=1, rpm=1).allowed


def test_token_budget_counts_settled_usage_by_ticket(pair: list[SharedRateLimiter]) -> None:
    one, two = pair
    first = one.reserve_blocking("t", tpm=100, tokens=80)
    other = two.reserve_blocking("t", tpm=100, tokens=10)  # settled by ticket, not by count
    assert first.allowed and other.allowed
    refused = one.reserve_blocking("t", tpm=100, tokens=30)
    assert not refused.allowed
    assert refused.reason == "token limit of 100 tokens per minute reached (90 used, 30 requested)"
    assert one.totals("t")[1] == 90  # a refused reservation took nothing
    one.settle(first.ticket, used=20)  # held here until given back (or until the next grant writes it)
    one.flush()
    assert two.reserve_blocking("t", tpm=100, tokens=70).allowed  # 20 + 10 + 70
    assert not one.reserve_blocking("t", tpm=100, tokens=1).allowed
    two.settle(other.ticket, used=10)  # unchanged: nothing comes back
    two.flush(final=True)
    assert one.totals("t")[:2] == (3, 100)


def test_concurrency_slots_across_gateways(pair: list[SharedRateLimiter]) -> None:
    one, two = pair
    assert one.enter_blocking("a", rpm=0, max_concurrent=2).allowed
    assert two.enter_blocking("a", rpm=0, max_concurrent=2).allowed
    refused = one.enter_blocking("a", rpm=0, max_concurrent=2)
    assert not refused.allowed and refused.code == "concurrency_limit_exceeded" and refused.retry_after_s == 1
    assert refused.reason == "concurrency limit of 2 requests in flight reached"
    assert not two.enter_blocking("a", rpm=0, max_concurrent=2).allowed
    assert one.enter_blocking("b", rpm=0, max_concurrent=2).allowed  # another tenant's slots are its own
    two.leave("a")
    assert not one.enter_blocking("a", rpm=0, max_concurrent=2).allowed  # not given back yet: late, never early
    two.flush()
    assert one.enter_blocking("a", rpm=0, max_concurrent=2).allowed
    assert (one.in_flight("a"), two.in_flight("a")) == (2, 0)
    assert one.totals("a")[2] == 2


def test_surplus_slots_far_from_the_limit_are_kept_a_lease_life(pair: list[SharedRateLimiter],
                                                                 clock: FakeClock) -> None:
    one, two = pair
    assert one.enter_blocking("t", rpm=0, max_concurrent=10).allowed
    assert one.totals("t")[2] == 5  # half of what is free: the next four need no transaction
    one.leave("t")
    one.flush()
    assert one.totals("t")[2] == 5
    assert [two.enter_blocking("t", rpm=0, max_concurrent=10).allowed for _ in range(6)] == [True] * 5 + [False]
    clock.now += 1.01
    one.flush()  # the lease's life is over: the surplus goes back
    assert one.totals("t")[2] == 5 and two.enter_blocking("t", rpm=0, max_concurrent=10).allowed


def test_cancel_gives_back_the_request_and_its_tokens(pair: list[SharedRateLimiter]) -> None:
    one, two = pair
    taken = one.reserve_blocking("t", tpm=100, tokens=100, rpm=1)
    assert taken.allowed and not two.reserve_blocking("t", tpm=100, tokens=1, rpm=1).allowed
    one.cancel(taken.ticket)  # refused after its reservation (admission, audit)
    one.flush(final=True)
    assert one.totals("t")[:2] == (0, 0)
    assert two.reserve_blocking("t", tpm=100, tokens=100, rpm=1).allowed


def test_a_refused_request_leaves_the_budget_untouched(pair: list[SharedRateLimiter]) -> None:
    one, two = pair
    assert one.reserve_blocking("t", tpm=50, tokens=40, rpm=3).allowed
    one.flush(final=True)  # everything unused given back: the ledger holds exactly what was used
    before = one.totals("t")
    for limiter in pair:
        assert not limiter.reserve_blocking("t", tpm=50, tokens=11, rpm=3).allowed
    two.flush(final=True)
    assert one.totals("t") == before == (1, 40, 0)
    assert two.reserve_blocking("t", tpm=50, tokens=10, rpm=3).allowed


def test_a_lease_held_by_one_gateway_goes_back_after_its_life(pair: list[SharedRateLimiter], clock: FakeClock) -> None:
    """Far from the limit a gateway leases more than one request; the other gateway may be refused
    while that lease lives, and gets what was unused once it is given back: exactly N in all."""
    one, two = pair
    assert one.reserve_blocking("t", tpm=0, tokens=1, rpm=10).allowed
    leased = one.totals("t")[0]
    assert leased > 1  # a slice, not a request: the next ones here need no transaction
    taken_by_two = 0
    while (decision := two.reserve_blocking("t", tpm=0, tokens=1, rpm=10)).allowed:
        taken_by_two += 1
    assert taken_by_two == 10 - leased
    assert decision.retry_after_s == 2  # not the minute: the other lease gives back what it did not use
    clock.now += 1.01  # the lease's life is over: the flusher gives back its unused part
    one.flush()
    while (decision := two.reserve_blocking("t", tpm=0, tokens=1, rpm=10)).allowed:
        taken_by_two += 1
    assert taken_by_two == 9 and one.totals("t")[0] == 10
    assert decision.retry_after_s == 59  # now the oldest request's minute


def test_a_dead_gateways_slots_are_reclaimed_after_its_heartbeat_expires(engines: list[sa.Engine],
                                                                        clock: FakeClock) -> None:
    alive = SharedRateLimiter(engines[0], clock=clock, background=False, holder_expiry_s=30)
    dead = SharedRateLimiter(engines[1], clock=clock, background=False, holder_expiry_s=30)
    try:
        assert dead.enter_blocking("t", rpm=0, max_concurrent=2).allowed
        assert dead.enter_blocking("t", rpm=0, max_concurrent=2).allowed  # then it stops: no flush, no heartbeat
        clock.now += 29
        alive.flush()
        assert not alive.enter_blocking("t", rpm=0, max_concurrent=2).allowed
        clock.now += 2
        assert alive.enter_blocking("t", rpm=0, max_concurrent=2).allowed
        assert alive.enter_blocking("t", rpm=0, max_concurrent=2).allowed
        assert not alive.enter_blocking("t", rpm=0, max_concurrent=2).allowed
    finally:
        alive.close()


def test_a_living_gateways_heartbeat_keeps_its_slots(engines: list[sa.Engine], clock: FakeClock) -> None:
    one = SharedRateLimiter(engines[0], clock=clock, background=False, holder_expiry_s=30)
    two = SharedRateLimiter(engines[1], clock=clock, background=False, holder_expiry_s=30)
    try:
        assert one.enter_blocking("t", rpm=0, max_concurrent=1).allowed
        for _ in range(4):  # 80 s in all, a flush (and a heartbeat) every 20 s
            clock.now += 20
            one.flush()
            assert not two.enter_blocking("t", rpm=0, max_concurrent=1).allowed
    finally:
        one.close()
        two.close()


def test_close_gives_everything_back(pair: list[SharedRateLimiter]) -> None:
    one, two = pair
    assert one.enter_blocking("t", rpm=10, max_concurrent=1).allowed
    assert one.reserve_blocking("t", tpm=1000, tokens=100, rpm=10).allowed
    assert one.totals("t")[0] > 1 and one.totals("t")[2] == 1
    one.leave("t")
    one.close()
    assert two.totals("t") == (1, 100, 0)
    with pytest.raises(LimitsUnavailable, match="closed"):  # a grant now would never be given back
        one.reserve_blocking("t", tpm=1000, tokens=100, rpm=10)


def test_the_event_loop_never_runs_a_query_and_leases_spare_transactions(store_url: str) -> None:
    engine = open_database(store_url)
    loop_thread: list[int] = []
    queries_on_loop: list[str] = []
    begins: list[int] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _seen(_conn, _cursor, statement, *_args):  # type: ignore[no-untyped-def]
        if threading.get_ident() in loop_thread:
            queries_on_loop.append(statement)
        if "rate_limit_leases" in statement and statement.lstrip().upper().startswith("INSERT"):
            begins.append(1)

    limiter = SharedRateLimiter(engine)

    async def traffic() -> int:
        loop_thread.append(threading.get_ident())
        accepted = 0
        for _ in range(400):
            entered = await limiter.enter("t", rpm=100_000, max_concurrent=50)
            reserved = await limiter.reserve("t", tpm=10_000_000, tokens=200, rpm=100_000)
            assert entered.allowed and reserved.allowed
            limiter.settle(reserved.ticket, 120)
            limiter.leave("t")
            accepted += 1
        return accepted

    try:
        assert asyncio.run(traffic()) == 400
        assert queries_on_loop == []
        assert len(begins) <= 20, f"{len(begins)} leases for 400 requests far from the limit"
        limiter.close()
        assert limiter.totals("t")[:2] == (400, 400 * 120)
    finally:
        limiter.close()
        engine.dispose()


def test_limits_of_zero_are_no_limit_and_need_no_database(store_url: str) -> None:
    engine = open_database(store_url)
    limiter = SharedRateLimiter(engine, background=False)
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    try:
        for _ in range(1000):
            assert limiter.enter_blocking("t", rpm=0, max_concurrent=0).allowed
            taken = limiter.reserve_blocking("t", tpm=0, tokens=10**9, rpm=0)
            assert taken.allowed
            limiter.settle(taken.ticket, 5)
        assert limiter.in_flight("t") == 1000 and statements == []
    finally:
        limiter.close()
        engine.dispose()


@pytest.mark.parametrize(("call", "message"), [
    (lambda lim: lim.enter_blocking("t", rpm=-1), "rpm: expected an int >= 0 (0 = no limit), found -1"),
    (lambda lim: lim.enter_blocking("t", rpm=5, max_concurrent=-2), "max_concurrent: expected an int >= 0"),
    (lambda lim: lim.reserve_blocking("t", tpm=True, tokens=1), "tpm: expected an int >= 0 (0 = no limit), found True"),
    (lambda lim: lim.reserve_blocking("t", tpm=10, tokens=-3), "tokens: expected an int >= 0, found -3"),
    (lambda lim: lim.settle(1, -1), "used: expected an int >= 0, found -1"),
])
def test_bad_limits_and_counts_are_refused_clearly(tmp_path: Path, call, message: str) -> None:  # type: ignore[no-untyped-def]
    engine = open_database(f"sqlite:///{tmp_path / 'a.db'}")
    limiter = SharedRateLimiter(engine, background=False)
    try:
        with pytest.raises(ValueError, match=re.escape(message)):
            call(limiter)
    finally:
        limiter.close()
        engine.dispose()


def test_the_policy_refuses_negative_limits(tmp_path: Path) -> None:
    policy = tmp_path / "policies"
    shutil.copytree(default_policy_dir(), policy)
    (policy / "tenants_site.yaml").write_text(
        "tenants:\n  acme:\n    rate_limit_rpm: -1\n    max_tokens_per_minute: -5\n    max_concurrent_requests: -2\n")
    with pytest.raises(PolicyValidationError) as refused:
        load_policy_set(policy)
    for field in ("rate_limit_rpm", "max_tokens_per_minute", "max_concurrent_requests"):
        assert f"tenants.acme.{field}: expected greater than or equal to" in str(refused.value)


def test_an_unreachable_database_refuses_the_request(tmp_path: Path) -> None:
    path = tmp_path / "gone.db"
    engine = open_database(f"sqlite:///{path}")
    limiter = SharedRateLimiter(engine, background=False)
    try:
        engine.dispose()
        for leftover in tmp_path.glob("gone.db*"):
            leftover.unlink()
        path.mkdir()  # the database file is now a directory: no connection can open it
        with pytest.raises(LimitsUnavailable, match="could not be reached"):
            limiter.reserve_blocking("t", tpm=100, tokens=1, rpm=10)
        with pytest.raises(LimitsUnavailable):
            asyncio.run(limiter.enter("t", rpm=10))
    finally:
        limiter.close()
        engine.dispose()


def test_a_ledger_made_by_the_first_version_gains_its_new_column(store_url: str) -> None:
    """The first version's lease table had no ``returned_by``: opening it adds the column, twice is
    a no-op, and grants work."""
    first = sa.MetaData()
    sa.Table("rate_limit_leases", first,
             sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
             sa.Column("tenant", sa.String(64), nullable=False), sa.Column("holder", sa.String(128), nullable=False),
             sa.Column("requests", sa.BigInteger, nullable=False), sa.Column("tokens", sa.BigInteger, nullable=False),
             sa.Column("expires_at", sa.Double, nullable=False))
    engine = sa.create_engine(store_url, poolclass=sa.pool.NullPool)
    try:
        first.create_all(engine)
    finally:
        engine.dispose()
    engine = open_database(store_url)
    limiters = [SharedRateLimiter(engine, background=False), SharedRateLimiter(engine, background=False)]
    try:
        assert "returned_by" in {c["name"] for c in sa.inspect(engine).get_columns("rate_limit_leases")}
        assert limiters[0].reserve_blocking("t", tpm=0, tokens=1, rpm=1).allowed
        assert not limiters[1].reserve_blocking("t", tpm=0, tokens=1, rpm=1).allowed
    finally:
        for limiter in limiters:
            limiter.close()
        engine.dispose()


@pytest.mark.parametrize("seed", [1, 2])
def test_one_gateway_decides_exactly_as_the_in_memory_limiter(store_url: str, seed: int) -> None:
    """The same random sequence of enter/leave/reserve/settle/cancel and clock steps, given to the
    in-memory RateLimiter and to one SharedRateLimiter, gets the same decisions, reasons, codes and
    Retry-After. (The clock moves by whole seconds, at least a lease's life, as two requests served
    from one lease at different times are counted from the later one: never less, see the docs.)"""
    import random

    from appliance.ratelimit import RateLimiter

    limits = {"a": (5, 300, 2), "b": (3, 1000, 0), "c": (10, 100, 1)}  # rpm, tpm, max_concurrent
    rnd = random.Random(seed)
    clock = FakeClock()
    memory = RateLimiter(clock)
    engine = open_database(store_url)
    shared = SharedRateLimiter(engine, clock=clock, background=False)
    tickets: list[tuple[int, int]] = []  # (in-memory, shared) of reservations not yet settled
    try:
        for step in range(400):
            tenant = rnd.choice("abc")
            rpm, tpm, most = limits[tenant]
            op = rnd.random()
            if op < 0.25:
                got = (memory.enter(tenant, rpm, most), shared.enter_blocking(tenant, rpm, most))
            elif op < 0.4:
                memory.leave(tenant)
                shared.leave(tenant)
                continue
            elif op < 0.75:
                tokens = rnd.randint(1, 150)
                got = (memory.reserve(tenant, tpm, tokens, rpm), shared.reserve_blocking(tenant, tpm, tokens, rpm))
                if got[0].allowed and got[1].allowed:
                    tickets.append((got[0].ticket, got[1].ticket))
            elif op < 0.85 and tickets:
                mine, theirs = tickets.pop(rnd.randrange(len(tickets)))
                used = rnd.randint(1, 200)
                memory.settle(mine, used)
                shared.settle(theirs, used)
                continue
            elif op < 0.9 and tickets:
                mine, theirs = tickets.pop(rnd.randrange(len(tickets)))
                memory.cancel(mine)
                shared.cancel(theirs)
                continue
            else:
                clock.now += rnd.choice([1, 2, 5, 15, 30])
                continue
            want, found = got
            assert (found.allowed, found.reason, found.retry_after_s, found.code) == \
                (want.allowed, want.reason, want.retry_after_s, want.code), (step, tenant)
            assert memory.in_flight(tenant) == shared.in_flight(tenant)
    finally:
        shared.close()
        engine.dispose()
