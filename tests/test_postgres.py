"""What is PostgreSQL's own in its state store (the contract it shares with SQLite and
the fake is tests/contracts/test_state_store.py): migrations, the database's clock,
daemons racing through separate pools, outages, passwords kept out of sight, and the
wiring that builds it."""

from __future__ import annotations

import logging
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from rotator.config import parse_settings
from rotator.errors import BackendUnavailable, LeaseLost, RotationExists, RotatorError
from rotator.machine import State
from rotator.model import Lease, Rotation, RotationKind, RotationReason, ScanLease
from rotator.sandbox import free_port
from rotator.state import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from rotator.state import SqliteStateStore
from rotator.state.postgres import SCHEMA_VERSION, PostgresStateStore
from rotator.wiring import Wiring
from tests.pgserver import (
    PASSWORD_ROLE,
    ROLE_PASSWORD,
    PgServer,
    postgres_server,  # noqa: F401 - a fixture
    postgres_url,  # noqa: F401 - a fixture
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
ACCOUNT = "111122223333"
LONG = timedelta(minutes=5)
MARKER = "pw-marker-7c1d0e5b"  # a password that must never be shown
# Long enough for psycopg_pool's default reconnection backoff (1, 2, 4, 8 s...) to leave
# a gap of several seconds without any attempt: the store must not wait for it.
OUTAGE = 16.0
NEWER_SCHEMA = re.compile(
    r"state store (?P<store>.+) has schema version (?P<found>\d+), newer than this rotator "
    r"understands \((?P<known>\d+)\); upgrade rotator"
)


def rotation(rid: str = "r1", user: str = "alice") -> Rotation:
    return Rotation(
        id=rid,
        account_id=ACCOUNT,
        user_name=user,
        reason=RotationReason.AGE,
        state=State.PLANNED,
        created_at=T0,
        updated_at=T0,
    )


def database_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def sql(url: str, statement: str, *params: object) -> list[tuple[Any, ...]]:
    """Run one statement on the database as a separate client; its rows, if any."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement.encode(), params or None)
        return cur.fetchall() if cur.description else []


def db_now(url: str) -> datetime:
    [(now,)] = sql(url, "SELECT clock_timestamp()")
    assert isinstance(now, datetime)
    return now


def chain_text(exc: BaseException) -> str:
    """An exception's text with every cause and context it carries."""
    texts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(texts) < 20:
        texts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    return "\n".join(texts)


@pytest.fixture
def server(postgres_server: PgServer) -> PgServer:  # noqa: F811
    """The session's PostgreSQL server (a test may stop and start it)."""
    return postgres_server


@pytest.fixture
def db_url(postgres_url: str) -> str:  # noqa: F811
    """A fresh, empty database on it, for the trusted superuser."""
    return postgres_url


@pytest.fixture
def stores(db_url: str) -> Iterator[Callable[..., PostgresStateStore]]:
    """Opens stores on the test's database, each with a pool of its own (as separate
    daemons have); closes them all."""
    opened: list[PostgresStateStore] = []

    def open_store(url: str = db_url, **kwargs: Any) -> PostgresStateStore:
        store = PostgresStateStore(url, **kwargs)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def race(count: int, call: Callable[[int], object]) -> list[object]:
    """Run `call(0)` .. `call(count - 1)` on as many threads released at one moment;
    what each returned, or the exception it raised."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(n: int) -> None:
        barrier.wait()
        try:
            results[n] = call(n)
        except Exception as exc:
            results[n] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a racing thread hung"
    return results


# --- migrations ----------------------------------------------------------------------------


def test_opening_an_up_to_date_database_again_migrates_nothing_and_keeps_its_data(
    db_url: str, stores: Callable[..., PostgresStateStore]
) -> None:
    """A second open finds the schema current: the version rows (with their times) and
    the data stay exactly as the first open and its writes left them."""
    first = stores()
    created = first.create(rotation(), "planned")
    first.close()
    versions = sql(db_url, "SELECT version, applied_at FROM rotator_schema ORDER BY 1")
    assert [v for v, _ in versions] == list(range(1, SCHEMA_VERSION + 1))

    second = stores()

    assert sql(db_url, "SELECT version, applied_at FROM rotator_schema ORDER BY 1") == (versions)
    assert second.get("r1") == created
    assert [e.reason for e in second.events("r1")] == ["planned"]


def test_daemons_starting_at_once_on_an_empty_database_migrate_it_exactly_once(
    db_url: str, stores: Callable[..., PostgresStateStore]
) -> None:
    """Six stores opened at the same moment on an empty database all open (they take
    turns on the migration lock instead of colliding on CREATE TABLE), and each
    migration is recorded once."""
    opened = race(6, lambda _: stores())
    assert all(isinstance(s, PostgresStateStore) for s in opened), opened
    versions = sql(db_url, "SELECT version FROM rotator_schema ORDER BY 1")
    assert [v for (v,) in versions] == list(range(1, SCHEMA_VERSION + 1))


def test_a_database_from_a_newer_rotator_is_refused_in_the_words_sqlite_uses(
    db_url: str, stores: Callable[..., PostgresStateStore], tmp_path: Path
) -> None:
    """A schema version above this rotator's is refused, changing nothing, with the
    message (and error type) the SQLite store gives for a file from a newer rotator."""
    stores().close()
    sql(
        db_url,
        "INSERT INTO rotator_schema (version, applied_at) VALUES (%s, now())",
        SCHEMA_VERSION + 1,
    )
    with pytest.raises(RotatorError) as pg_refusal:
        PostgresStateStore(db_url)

    path = tmp_path / "state.db"
    SqliteStateStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SQLITE_SCHEMA_VERSION + 1}")
    with pytest.raises(RotatorError) as sqlite_refusal:
        SqliteStateStore(path)

    pg_words = NEWER_SCHEMA.fullmatch(str(pg_refusal.value))
    sqlite_words = NEWER_SCHEMA.fullmatch(str(sqlite_refusal.value))
    assert pg_words is not None, str(pg_refusal.value)
    assert sqlite_words is not None, str(sqlite_refusal.value)
    assert (pg_words["found"], pg_words["known"]) == (
        str(SCHEMA_VERSION + 1),
        str(SCHEMA_VERSION),
    )
    assert database_of(db_url) in pg_words["store"]
    assert type(pg_refusal.value) is type(sqlite_refusal.value)
    assert sql(db_url, "SELECT max(version) FROM rotator_schema") == [(SCHEMA_VERSION + 1,)]


def test_an_open_index_built_for_other_terminal_states_is_rebuilt_on_open(
    db_url: str, stores: Callable[..., PostgresStateStore]
) -> None:
    """An index whose comment names another terminal set (a rotator whose states changed)
    is rebuilt when a store opens: a user whose rotation was CANCELLED may then get a new
    one, which the stale index (CANCELLED counted open) would refuse."""
    stores().close()
    sql(db_url, "DROP INDEX rotations_one_open")
    sql(
        db_url,
        "CREATE UNIQUE INDEX rotations_one_open ON rotations (account_id, user_name) "
        "WHERE state NOT IN ('DONE')",
    )
    sql(db_url, "COMMENT ON INDEX rotations_one_open IS 'terminal states: DONE'")

    store = stores()
    first = store.create(rotation("r1"), "planned")
    store.save(replace(first, state=State.CANCELLED), "cancelled", from_state=State.PLANNED)
    store.create(rotation("r2"), "planned")

    open_now = store.open_for(ACCOUNT, "alice")
    assert open_now is not None
    assert open_now.id == "r2"


def test_a_database_from_before_rotation_kinds_is_migrated_to_one_open_rotation_per_kind(
    db_url: str, stores: Callable[..., PostgresStateStore]
) -> None:
    """A database at schema version 2 (no `kind` column, the one-open index over account
    and user with the comment of that version's rotator) holding an open rotation:
    opened by this rotator it gains version 3, the rotation is a key rotation, the index
    is rebuilt over the kind, and the user may open a console rotation but still no
    second key rotation."""
    from rotator.state import postgres as pg_module
    from rotator.state import shared

    with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
        # What version 2's rotator did on an empty database.
        conn.execute(
            "CREATE TABLE rotator_schema (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL)"
        )
        for number, statements in enumerate(pg_module._MIGRATIONS[:2], start=1):
            for statement in statements:
                conn.execute(statement.encode())
            conn.execute(
                "INSERT INTO rotator_schema (version, applied_at) VALUES (%s, now())", (number,)
            )
        conn.execute(
            b"CREATE UNIQUE INDEX rotations_one_open ON rotations (account_id, user_name) "
            + f"WHERE {shared.OPEN_WHERE}".encode()
        )
        old_comment = "terminal states: " + " ".join(shared.TERMINAL_VALUES)
        conn.execute(f"COMMENT ON INDEX rotations_one_open IS '{old_comment}'".encode())
        conn.execute(
            "INSERT INTO rotations (id, account_id, user_name, reason, state, created_at, "
            "updated_at, leaked, attempts) VALUES ('r-old', %s, 'alice', 'age', 'PLANNED', "
            "%s, %s, false, 0)",
            (ACCOUNT, T0, T0),
        )

    store = stores()

    assert sql(db_url, "SELECT version FROM rotator_schema ORDER BY 1") == [(1,), (2,), (3,)]
    assert SCHEMA_VERSION == 3
    [(comment, definition)] = sql(
        db_url,
        "SELECT obj_description('rotations_one_open'::regclass, 'pg_class'), "
        "pg_get_indexdef('rotations_one_open'::regclass)",
    )
    assert comment != old_comment
    assert "kind" in comment
    assert "(account_id, user_name, kind)" in definition
    assert store.get("r-old") == rotation("r-old")
    assert store.open_for(ACCOUNT, "alice") == rotation("r-old")
    assert store.open_for(ACCOUNT, "alice", RotationKind.CONSOLE) is None

    console = replace(rotation("r-console"), kind=RotationKind.CONSOLE)
    assert store.create(console, "planned") == console
    with pytest.raises(RotationExists, match="already has open rotation r-old"):
        store.create(rotation("r-key2"), "planned")
    with pytest.raises(RotationExists, match="already has open console rotation r-console"):
        store.create(replace(console, id="r-console2"), "planned")
    assert {r.id for r in store.list_open()} == {"r-old", "r-console"}

    # A second daemon finds the schema current and changes nothing.
    before = sql(db_url, "SELECT version, applied_at FROM rotator_schema ORDER BY 1")
    again = stores()
    assert sql(db_url, "SELECT version, applied_at FROM rotator_schema ORDER BY 1") == before
    assert again.open_for(ACCOUNT, "alice", RotationKind.CONSOLE) == console


def test_the_event_trail_refuses_update_delete_and_truncate_from_any_client(
    db_url: str, stores: Callable[..., PostgresStateStore]
) -> None:
    """The trail is append-only in the database itself: another client's UPDATE, DELETE
    or TRUNCATE of `events` is refused and the events stay."""
    store = stores()
    store.create(rotation(), "planned")
    for statement in ("UPDATE events SET reason = 'x'", "DELETE FROM events", "TRUNCATE events"):
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            sql(db_url, statement)
    assert [e.reason for e in store.events("r1")] == ["planned"]


# --- time ----------------------------------------------------------------------------------


def test_without_a_clock_leases_expire_and_times_are_stamped_by_the_database_clock(
    db_url: str, stores: Callable[..., PostgresStateStore]
) -> None:
    """With no clock given, a lease of 1 s ends 1 s after the database's time of taking
    it: another owner is refused until the database's clock has passed it, then takes it
    over; the store's own stamps (events, scans) are the database's time too."""
    store = stores()
    before = db_now(db_url)
    store.create(rotation(), "planned")
    lease = store.acquire_lease("r1", "A", timedelta(seconds=1))
    scan = store.hold_scan_lease(ACCOUNT, "A", timedelta(seconds=1))
    after = db_now(db_url)
    assert lease is not None
    assert scan is not None
    assert before + timedelta(seconds=1) <= scan.expires_at <= after + timedelta(seconds=1)
    [created] = store.events("r1")
    assert before <= created.at <= after
    assert store.acquire_lease("r1", "B", LONG) is None
    assert store.hold_scan_lease(ACCOUNT, "B", LONG) is None

    deadline = time.monotonic() + 10
    while db_now(db_url) <= scan.expires_at and time.monotonic() < deadline:
        time.sleep(0.05)

    with pytest.raises(LeaseLost, match="expired"):
        store.record("r1", State.PLANNED, "late note", lease=lease)
    taken = store.acquire_lease("r1", "B", LONG)
    taken_scan = store.hold_scan_lease(ACCOUNT, "B", LONG)
    assert taken is not None
    assert (taken.token, taken.taken_over) == (lease.token + 1, True)
    assert taken_scan is not None
    assert (taken_scan.token, taken_scan.taken_over) == (scan.token + 1, True)
    finished = store.scan_finished(taken_scan)
    assert finished.last_scan_at is not None
    assert finished.last_scan_at <= db_now(db_url)


def test_times_come_back_in_utc_whatever_the_databases_time_zone(
    db_url: str, stores: Callable[..., PostgresStateStore]
) -> None:
    """On a database whose sessions default to another time zone (+05:45), every time
    the store returns is the same instant with a UTC offset of zero."""
    sql(
        db_url,
        f"ALTER DATABASE \"{database_of(db_url)}\" SET timezone = 'Asia/Kathmandu'",
    )
    assert sql(db_url, "SHOW timezone") == [("Asia/Kathmandu",)]
    store = stores()
    store.create(replace(rotation(), next_action_at=T0 + timedelta(hours=1)), "planned")
    store.add_dead_letter("sqs", "m-1", "not JSON", "{")
    scan = store.hold_scan_lease(ACCOUNT, "A", LONG)
    assert scan is not None

    got = store.get("r1")
    assert got is not None
    times = [got.created_at, got.updated_at, got.next_action_at, scan.expires_at]
    times += [e.at for e in store.events("r1")]
    times += [at for _, _, at, _ in store.dead_letters()]
    times += [s.expires_at for s in store.scan_leases()]
    assert all(t is not None and t.utcoffset() == timedelta(0) for t in times), times
    assert got.created_at == T0


# --- daemons racing --------------------------------------------------------------------------


def test_two_daemons_racing_for_a_rotation_lease_have_one_winner_and_fence_the_last(
    stores: Callable[..., PostgresStateStore],
) -> None:
    """Eight owners on two stores (two pools) ask for the same rotation's lease at the
    same moment, ten rounds over: each round exactly one gets it, with a token above
    the round before, and the last round's holder can then write nothing."""
    daemons = [stores(pool_size=4), stores(pool_size=4)]
    current = daemons[0].create(rotation(), "planned")
    previous: Lease | None = None
    for round_number in range(10):
        results = race(8, lambda n: daemons[n % 2].acquire_lease("r1", f"d{n % 2}-w{n}", LONG))
        assert not [r for r in results if isinstance(r, Exception)], results
        winners = [r for r in results if isinstance(r, Lease)]
        assert len(winners) == 1, results
        [won] = winners
        if previous is not None:
            assert won.token > previous.token
            before = (daemons[0].get("r1"), daemons[0].events("r1"))
            stale = replace(current, attempts=99)
            with pytest.raises(LeaseLost):
                daemons[1].save(stale, "stale", lease=previous)
            with pytest.raises(LeaseLost):
                daemons[0].record("r1", State.PLANNED, "stale note", lease=previous)
            assert (daemons[0].get("r1"), daemons[0].events("r1")) == before
        current = replace(current, attempts=round_number)
        daemons[round_number % 2].save(current, "by the winner", lease=won)
        daemons[1].release_lease("r1", won.owner)
        previous = won
    assert daemons[1].get("r1") == current


def test_two_daemons_racing_for_a_scan_lease_have_one_winner_and_fence_the_last(
    stores: Callable[..., PostgresStateStore],
) -> None:
    """The same race for an account's scan lease: one winner a round, tokens growing,
    and `scan_finished` under the last round's lease raises LeaseLost and records no
    scan."""
    daemons = [stores(pool_size=4), stores(pool_size=4)]
    previous: ScanLease | None = None
    for round_number in range(10):
        results = race(8, lambda n: daemons[n % 2].hold_scan_lease(ACCOUNT, f"d{n % 2}-w{n}", LONG))
        assert not [r for r in results if isinstance(r, Exception)], results
        winners = [r for r in results if isinstance(r, ScanLease)]
        assert len(winners) == 1, results
        [won] = winners
        if previous is not None:
            assert won.token > previous.token
            before = daemons[0].scan_leases()
            with pytest.raises(LeaseLost):
                daemons[1].scan_finished(previous)
            assert daemons[0].scan_leases() == before
        finished = daemons[round_number % 2].scan_finished(won)
        [stored] = daemons[0].scan_leases()
        assert (stored.owner, stored.token, stored.last_scan_at) == (
            won.owner,
            won.token,
            finished.last_scan_at,
        )
        daemons[1].release_scan_lease(ACCOUNT, won.owner)
        previous = won


def test_two_daemons_opening_the_same_users_rotation_at_once_open_exactly_one(
    stores: Callable[..., PostgresStateStore],
) -> None:
    """Eight creates of a rotation for the same user through two stores at one moment:
    one succeeds, every other raises RotationExists naming it, and one rotation is open."""
    daemons = [stores(), stores()]
    results = race(8, lambda n: daemons[n % 2].create(rotation(f"r{n}"), "planned"))
    created = [r for r in results if isinstance(r, Rotation)]
    refused = [r for r in results if isinstance(r, RotationExists)]
    assert len(created) == 1, results
    assert len(refused) == 7, results
    assert all(created[0].id in str(e) for e in refused)
    assert [r.id for r in daemons[1].list_open()] == [created[0].id]


# --- outages and passwords -------------------------------------------------------------------


def test_a_stopped_server_fails_calls_fast_without_the_password_and_the_store_recovers(
    server: PgServer,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the password in PGPASSWORD (a role that must give it): while the server is
    stopped, `check` and reads raise BackendUnavailable within seconds, naming host, port
    and database but never the password, which no DEBUG log line shows either. Once it
    is back, after an outage long enough for the pool's reconnection backoff to grow, the
    same store object works again by the second call at the latest."""
    monkeypatch.setenv("PGPASSWORD", ROLE_PASSWORD)
    caplog.set_level(logging.DEBUG)
    url = server.url(database_of(db_url), user=PASSWORD_ROLE)
    where = f"{PASSWORD_ROLE}@127.0.0.1:{server.port}/{database_of(url)}"
    store = PostgresStateStore(url, connect_timeout=2)
    try:
        created = store.create(rotation(), "planned")
        store.check()
        server.stop()
        stopped = time.monotonic()

        calls: list[Callable[[], object]] = [store.check, lambda: store.get("r1"), store.list_open]
        failed = 0
        while failed < len(calls) or time.monotonic() - stopped < OUTAGE:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable) as info:
                calls[failed % len(calls)]()
            assert time.monotonic() - started < 5
            assert where in str(info.value)
            assert ROLE_PASSWORD not in chain_text(info.value)
            failed += 1

        server.start()
        outcomes: list[str] = []
        for call in (store.check, store.check):
            started = time.monotonic()
            try:
                call()
            except BackendUnavailable:
                outcomes.append("failed")
            else:
                outcomes.append("ok")
                assert time.monotonic() - started < 5
                break
        assert outcomes[-1] == "ok", outcomes
        assert store.get("r1") == created
    finally:
        store.close()
    assert "connection" in caplog.text  # psycopg's DEBUG lines were captured
    assert ROLE_PASSWORD not in caplog.text
    assert ROLE_PASSWORD not in repr(store)


def test_an_unreachable_server_at_start_is_backend_unavailable_without_the_password() -> None:
    """Opening a store on a port where nothing listens raises BackendUnavailable naming
    user, host, port and database, and no part of it (causes included) shows the
    URL's password."""
    port = free_port()
    with pytest.raises(BackendUnavailable) as info:
        PostgresStateStore(f"postgresql://rotator:{MARKER}@127.0.0.1:{port}/rotator")
    assert f"postgresql://rotator@127.0.0.1:{port}/rotator" in str(info.value)
    assert MARKER not in chain_text(info.value)


def test_a_wrong_password_is_refused_without_being_shown(server: PgServer, db_url: str) -> None:
    """A password the server refuses is reported as libpq words it, and not repeated."""
    url = server.url(database_of(db_url), user=PASSWORD_ROLE)
    with pytest.raises(BackendUnavailable, match="password authentication failed") as info:
        PostgresStateStore(url.replace("@", f":{MARKER}@", 1))
    assert MARKER not in chain_text(info.value)


def test_a_malformed_url_is_refused_without_repeating_it() -> None:
    """A URL libpq cannot read is refused saying so, without libpq's message, which would
    quote the URL with its password."""
    with pytest.raises(RotatorError, match="not a valid PostgreSQL URL") as info:
        PostgresStateStore(f"postgresql://rotator:{MARKER}@[::1/rotator")
    assert MARKER not in chain_text(info.value)


# --- wiring ------------------------------------------------------------------------------------


def test_the_wiring_builds_a_postgres_store_for_a_state_url(db_url: str, tmp_path: Path) -> None:
    """Settings with `state.url` make the wiring build a PostgresStateStore on that
    database (no SQLite file appears at `state.path`), which closing the wiring closes."""
    settings = parse_settings(
        {"state": {"url": db_url, "path": str(tmp_path / "state.db")}},
        {"VAULT_TOKEN": "not-used"},
    )
    wiring = Wiring(settings)
    store = wiring.store
    assert isinstance(store, PostgresStateStore)
    store.create(rotation(), "planned")
    assert sql(db_url, "SELECT id FROM rotations") == [("r1",)]
    wiring.close()
    assert not (tmp_path / "state.db").exists()
    with pytest.raises(BackendUnavailable, match="closed"):
        store.check()


def test_a_rotator_on_sqlite_never_loads_the_postgresql_driver(tmp_path: Path) -> None:
    """Building and using the SQLite store through the wiring imports no psycopg."""
    script = (
        "import sys\n"
        "from rotator.config import parse_settings\n"
        "from rotator.wiring import Wiring\n"
        f"s = parse_settings({{'state': {{'path': {str(tmp_path / 'state.db')!r}}}}},"
        " {'VAULT_TOKEN': 'not-used'})\n"
        "w = Wiring(s)\n"
        "w.store.check()\n"
        "w.close()\n"
        "print(sorted(m for m in sys.modules if m.startswith('psycopg')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
