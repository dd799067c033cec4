"""The SQLite state store: persistence, the one-open-rotation rule, the append-only trail,
leases between processes, migrations and file hygiene."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from rotator.errors import (
    BackendUnavailable,
    LeaseLost,
    NotFound,
    RotationExists,
    RotatorError,
    StaleRotation,
    Transient,
)
from rotator.machine import TERMINAL, State
from rotator.model import Rotation, RotationKind, RotationReason
from rotator.state import SCHEMA_VERSION, SqliteStateStore, lease_owner

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def store(db_path: Path, clock: FakeClock) -> Iterator[SqliteStateStore]:
    s = SqliteStateStore(db_path, clock=clock)
    yield s
    s.close()


def rotation(
    rid: str = "r1",
    *,
    account: str = "111122223333",
    user: str = "alice",
    state: State = State.PLANNED,
    created_at: datetime = T0,
) -> Rotation:
    return Rotation(
        id=rid,
        account_id=account,
        user_name=user,
        reason=RotationReason.AGE,
        state=state,
        created_at=created_at,
        updated_at=created_at,
    )


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def raw(db_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(db_path, isolation_level=None)


# --- persistence -------------------------------------------------------------------


def test_every_rotation_field_round_trips(store: SqliteStateStore) -> None:
    """Every Rotation field, set to a non-default value, comes back equal from the store."""
    full = Rotation(
        id="r-full",
        account_id="111122223333",
        user_name="alice",
        reason=RotationReason.LEAKED,
        state=State.OVERLAP,
        created_at=T0,
        updated_at=T0 + timedelta(minutes=5, microseconds=7),
        old_key_id="AKIAOLD",
        new_key_id="AKIANEW",
        leaked=True,
        note="found by AWS Health",
        intent_key_ids=("AKIAOLD", "AKIAOTHER"),
        intent_at=T0 + timedelta(seconds=1),
        intent_until=T0 + timedelta(seconds=1, microseconds=500),
        store_started_at=T0 + timedelta(seconds=1, microseconds=700),
        stored_at=T0 + timedelta(seconds=2),
        vault_version=3,
        verified_at=T0 + timedelta(seconds=3),
        deactivated_at=T0 + timedelta(seconds=4),
        overlap=timedelta(days=2, seconds=5, microseconds=1),
        next_action_at=T0 + timedelta(days=2),
        attempts=4,
        last_error="Throttling",
        waiting_on="consumers",
        kind=RotationKind.CONSOLE,
        create_login=True,
    )
    # Guard for the future: a field added to Rotation must be set here (and stored).
    defaults = {f.name: f.default for f in dataclasses.fields(Rotation)}
    unset = [
        n for n, d in defaults.items() if d is not dataclasses.MISSING and getattr(full, n) == d
    ]
    assert unset == []

    created = store.create(full, "planned")

    assert created == full
    assert store.get("r-full") == full


def test_defaults_and_empty_tuple_round_trip(store: SqliteStateStore) -> None:
    """None fields stay None, and an empty intent tuple stays () rather than becoming None."""
    bare = rotation()
    store.create(bare, "planned")
    assert store.get("r1") == bare

    with_empty = dataclasses.replace(bare, intent_key_ids=(), overlap=timedelta(0))
    store.save(with_empty, "intent")
    got = store.get("r1")
    assert got is not None
    assert got.intent_key_ids == ()
    assert got.overlap == timedelta(0)


def test_non_utc_datetime_is_stored_as_the_same_instant_in_utc(store: SqliteStateStore) -> None:
    """An aware datetime in another zone comes back as the same instant, in UTC."""
    east = timezone(timedelta(hours=5, minutes=30))
    store.create(rotation(created_at=T0.astimezone(east)), "planned")
    got = store.get("r1")
    assert got is not None
    assert got.created_at == T0
    assert got.created_at.utcoffset() == timedelta(0)


def test_naive_datetime_is_refused(store: SqliteStateStore) -> None:
    """A naive datetime is rejected instead of being stored with a guessed zone."""
    with pytest.raises(ValueError, match="naive"):
        store.create(rotation(created_at=datetime(2024, 5, 1, 12, 0)), "planned")
    assert store.get("r1") is None


def test_get_unknown_rotation_returns_none(store: SqliteStateStore) -> None:
    """`get` of an id that was never created returns None."""
    assert store.get("nope") is None


# --- files ---------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_parent_dirs_are_0700_and_db_wal_shm_are_0600_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    """Missing parents are created 0700 and the db, -wal and -shm files are 0600 under a
    permissive umask and under one that would strip the owner's own bits."""
    path = tmp_path / "a" / "b" / "state.db"
    old = os.umask(umask)
    try:
        s = SqliteStateStore(path)
    finally:
        os.umask(old)
    try:
        s.create(rotation(), "planned")
        modes = {
            p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a", tmp_path / "a" / "b")
        }
        assert modes == {"a": 0o700, "b": 0o700}
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
    finally:
        s.close()


def test_existing_world_readable_db_is_tightened(db_path: Path) -> None:
    """An existing database file readable by others loses its group/other bits on open."""
    SqliteStateStore(db_path).close()
    db_path.chmod(0o644)
    SqliteStateStore(db_path).close()
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


# --- one open rotation per user -----------------------------------------------------------


def test_second_open_rotation_for_same_user_raises(store: SqliteStateStore) -> None:
    """A second open rotation for the same (account, user) raises RotationExists naming
    the first, and leaves no row or event behind."""
    store.create(rotation("r1"), "planned")
    with pytest.raises(RotationExists, match="r1"):
        store.create(rotation("r2"), "planned")
    assert store.get("r2") is None
    assert store.events("r2") == []


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_new_rotation_allowed_after_first_is_terminal(
    store: SqliteStateStore, terminal: State
) -> None:
    """Once the open rotation reaches a terminal state the user can get a new one."""
    first = rotation("r1")
    store.create(first, "planned")
    store.save(dataclasses.replace(first, state=terminal), "closed", from_state=State.PLANNED)

    store.create(rotation("r2", created_at=T0 + timedelta(hours=1)), "planned")

    opened = store.open_for("111122223333", "alice")
    assert opened is not None
    assert opened.id == "r2"


def test_same_user_name_in_another_account_is_independent(store: SqliteStateStore) -> None:
    """The rule is per (account, user): the same name in another account may rotate too."""
    store.create(rotation("r1", account="111122223333"), "planned")
    store.create(rotation("r2", account="444455556666"), "planned")
    store.create(rotation("r3", user="bob"), "planned")
    assert {r.id for r in store.list_open()} == {"r1", "r2", "r3"}


def test_reopening_a_closed_rotation_while_another_is_open_raises(store: SqliteStateStore) -> None:
    """`save` cannot move a closed rotation back to open while the user has another open one."""
    first = rotation("r1")
    store.create(first, "planned")
    cancelled = dataclasses.replace(first, state=State.CANCELLED)
    store.save(cancelled, "withdrawn", from_state=State.PLANNED)
    store.create(rotation("r2"), "planned")

    with pytest.raises(RotationExists, match="r2"):
        store.save(dataclasses.replace(first, state=State.PLANNED), "oops", State.CANCELLED)
    assert store.get("r1") == cancelled


def test_duplicate_rotation_id_is_not_reported_as_rotation_exists(store: SqliteStateStore) -> None:
    """Re-using a rotation id for another user is an error, but not RotationExists."""
    store.create(rotation("r1"), "planned")
    with pytest.raises(RotatorError, match="r1 already exists") as info:
        store.create(rotation("r1", user="bob"), "planned")
    assert not isinstance(info.value, RotationExists)


def test_concurrent_create_from_threads_yields_exactly_one(db_path: Path) -> None:
    """Eight threads, each with its own connection, race to open a rotation for one user:
    exactly one succeeds and the others get RotationExists."""
    SqliteStateStore(db_path).close()
    stores = [SqliteStateStore(db_path) for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    results: list[str] = []
    lock = threading.Lock()

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            stores[i].create(rotation(f"r{i}"), "planned")
            outcome = "ok"
        except RotationExists:
            outcome = "exists"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()

    assert sorted(results) == ["exists"] * 7 + ["ok"]


def test_concurrent_create_from_processes_yields_exactly_one(db_path: Path) -> None:
    """Separate processes racing to open a rotation for one user: exactly one succeeds."""
    SqliteStateStore(db_path).close()
    code = """
        import sys
        from datetime import UTC, datetime
        from rotator.errors import RotationExists
        from rotator.machine import State
        from rotator.model import Rotation, RotationReason
        from rotator.state import SqliteStateStore
        now = datetime.now(UTC)
        store = SqliteStateStore(sys.argv[1])
        r = Rotation(sys.argv[2], "111122223333", "alice", RotationReason.AGE,
                     State.PLANNED, now, now)
        try:
            store.create(r, "planned")
            print("ok")
        except RotationExists:
            print("exists")
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(db_path), f"p{i}"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    assert sorted(outputs) == ["exists"] * 3 + ["ok"]


# --- events --------------------------------------------------------------------------


def test_create_records_first_event(store: SqliteStateStore, clock: FakeClock) -> None:
    """`create` writes the first event, from None to the initial state, at the clock's time."""
    store.create(rotation(), "age 95d > 90d")
    [event] = store.events("r1")
    assert (event.from_state, event.to_state, event.reason, event.at) == (
        None,
        State.PLANNED,
        "age 95d > 90d",
        clock.now,
    )


def test_save_with_state_change_appends_event(store: SqliteStateStore, clock: FakeClock) -> None:
    """A save that moves the state appends (from, to, reason) and persists the row."""
    r = rotation()
    store.create(r, "planned")
    clock.advance(timedelta(minutes=1))
    moved = dataclasses.replace(r, state=State.MAKE_ROOM, updated_at=clock.now, attempts=1)

    store.save(moved, "slot free", from_state=State.PLANNED)

    assert store.get("r1") == moved
    events = store.events("r1")
    assert [(e.from_state, e.to_state, e.reason) for e in events] == [
        (None, State.PLANNED, "planned"),
        (State.PLANNED, State.MAKE_ROOM, "slot free"),
    ]
    assert events[1].at == T0 + timedelta(minutes=1)


def test_save_without_state_change_appends_no_event(store: SqliteStateStore) -> None:
    """A save with no from_state, or with from_state equal to the state, writes the row
    but no event."""
    r = rotation()
    store.create(r, "planned")

    store.save(dataclasses.replace(r, attempts=1), "retry")
    store.save(dataclasses.replace(r, attempts=2), "retry", from_state=State.PLANNED)

    got = store.get("r1")
    assert got is not None
    assert got.attempts == 2
    assert len(store.events("r1")) == 1


def test_save_of_unknown_rotation_raises_not_found(store: SqliteStateStore) -> None:
    """Saving a rotation that was never created raises NotFound and records nothing."""
    with pytest.raises(NotFound):
        store.save(rotation("ghost"), "moved", from_state=State.PLANNED)
    assert store.events("ghost") == []


def test_record_appends_a_note_in_the_same_state(store: SqliteStateStore) -> None:
    """`record` appends an event whose from and to states are both the given state."""
    store.create(rotation(state=State.OVERLAP), "planned")
    store.record("r1", State.OVERLAP, "consumers still use the old key")
    last = store.events("r1")[-1]
    assert (last.from_state, last.to_state, last.reason) == (
        State.OVERLAP,
        State.OVERLAP,
        "consumers still use the old key",
    )


def test_record_on_unknown_rotation_raises_not_found(store: SqliteStateStore) -> None:
    """`record` refuses a rotation id that does not exist."""
    with pytest.raises(NotFound):
        store.record("ghost", State.OVERLAP, "note")


def test_events_cannot_be_updated_or_deleted(store: SqliteStateStore, db_path: Path) -> None:
    """Raw SQL UPDATE and DELETE on events fail: the trail is append-only in the database."""
    store.create(rotation(), "planned")
    conn = raw(db_path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE events SET reason = 'rewritten'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM events")
    finally:
        conn.close()
    assert [e.reason for e in store.events("r1")] == ["planned"]


# --- queries -------------------------------------------------------------------------


def _close(store: SqliteStateStore, r: Rotation) -> None:
    store.save(dataclasses.replace(r, state=State.DONE), "done", from_state=r.state)


def test_list_recent_keeps_all_open_and_limits_closed(store: SqliteStateStore) -> None:
    """`list_recent` returns every open rotation plus the newest `limit` closed ones,
    newest created first, and filters by user name."""
    for i in range(5):
        r = rotation(f"alice{i}", created_at=T0 + timedelta(days=i))
        store.create(r, "planned")
        _close(store, r)
    store.create(rotation("alice-open", created_at=T0 - timedelta(days=10)), "planned")
    store.create(rotation("bob-open", user="bob", created_at=T0 + timedelta(days=20)), "planned")

    assert [r.id for r in store.list_recent(limit=2)] == [
        "bob-open",
        "alice4",
        "alice3",
        "alice-open",
    ]
    assert [r.id for r in store.list_recent(limit=0, user_name="alice")] == ["alice-open"]
    assert [r.id for r in store.list_recent(limit=1, user_name="alice")] == [
        "alice4",
        "alice-open",
    ]


def test_latest_for_returns_newest_in_any_state(store: SqliteStateStore) -> None:
    """`latest_for` returns the newest rotation for the user even when it is closed."""
    old = rotation("r-old", created_at=T0)
    store.create(old, "planned")
    _close(store, old)
    new = rotation("r-new", created_at=T0 + timedelta(days=1))
    store.create(new, "planned")
    _close(store, new)

    latest = store.latest_for("111122223333", "alice")
    assert latest is not None
    assert latest.id == "r-new"
    assert latest.state is State.DONE
    assert store.open_for("111122223333", "alice") is None
    assert store.latest_for("111122223333", "nobody") is None


def test_list_open_excludes_terminal_rotations(store: SqliteStateStore) -> None:
    """`list_open` lists open rotations only, oldest first."""
    done = rotation("r-done", user="carol")
    store.create(done, "planned")
    _close(store, done)
    store.create(rotation("r-b", user="bob", created_at=T0 + timedelta(hours=1)), "planned")
    store.create(rotation("r-a", user="alice"), "planned")
    assert [r.id for r in store.list_open()] == ["r-a", "r-b"]


# --- leases --------------------------------------------------------------------------


def test_second_owner_is_refused_while_lease_is_live(store: SqliteStateStore) -> None:
    """While one owner's lease is live, another owner cannot take it."""
    store.create(rotation(), "planned")
    assert store.acquire_lease("r1", "A", timedelta(seconds=30))
    assert not store.acquire_lease("r1", "B", timedelta(seconds=30))


def test_expired_lease_can_be_taken(store: SqliteStateStore, clock: FakeClock) -> None:
    """Once the lease's ttl has passed another owner takes it, and the first is then out."""
    store.create(rotation(), "planned")
    assert store.acquire_lease("r1", "A", timedelta(seconds=30))
    clock.advance(timedelta(seconds=31))
    assert store.acquire_lease("r1", "B", timedelta(seconds=30))
    assert not store.acquire_lease("r1", "A", timedelta(seconds=30))


def test_same_owner_renewal_extends_the_lease(store: SqliteStateStore, clock: FakeClock) -> None:
    """Re-acquiring by the holder succeeds and pushes the expiry out."""
    store.create(rotation(), "planned")
    assert store.acquire_lease("r1", "A", timedelta(seconds=30))
    clock.advance(timedelta(seconds=20))
    assert store.acquire_lease("r1", "A", timedelta(seconds=30))
    clock.advance(timedelta(seconds=20))  # 40s after the first grant: past its ttl
    assert not store.acquire_lease("r1", "B", timedelta(seconds=30))


def test_fencing_token_grows_with_every_new_holder_and_survives_release(
    store: SqliteStateStore, clock: FakeClock
) -> None:
    """A renewal of a live lease keeps its token; a takeover after expiry, and a new
    acquisition after a release, each get a greater token than any before."""
    store.create(rotation(), "planned")
    first = store.acquire_lease("r1", "A", timedelta(seconds=30))
    assert first is not None
    renewed = store.acquire_lease("r1", "A", timedelta(seconds=30))
    assert renewed is not None
    assert renewed.token == first.token
    clock.advance(timedelta(seconds=31))
    taken = store.acquire_lease("r1", "B", timedelta(seconds=30))
    assert taken is not None
    assert taken.token > first.token
    store.release_lease("r1", "B")
    again = store.acquire_lease("r1", "A", timedelta(seconds=30))
    assert again is not None
    assert again.token > taken.token


def test_renewal_extends_a_live_lease_and_never_takes_back_a_lost_one(
    store: SqliteStateStore, clock: FakeClock
) -> None:
    """`renew_lease` extends the current lease; once it expired or was taken over it
    returns None and leaves the new holder's lease as it was."""
    store.create(rotation(), "planned")
    lease = store.acquire_lease("r1", "A", timedelta(seconds=30))
    assert lease is not None
    clock.advance(timedelta(seconds=20))
    assert store.renew_lease(lease, timedelta(seconds=30)) == lease
    clock.advance(timedelta(seconds=20))  # 40s after the grant, 20s after the renewal
    assert store.acquire_lease("r1", "B", timedelta(seconds=30)) is None
    clock.advance(timedelta(seconds=11))
    assert store.renew_lease(lease, timedelta(seconds=30)) is None  # expired
    taken = store.acquire_lease("r1", "B", timedelta(seconds=30))
    assert taken is not None
    assert store.renew_lease(lease, timedelta(seconds=30)) is None
    assert store.acquire_lease("r1", "C", timedelta(seconds=30)) is None  # B still holds it


def test_a_write_under_a_lost_lease_is_refused_and_changes_nothing(
    store: SqliteStateStore, clock: FakeClock
) -> None:
    """Once another holder has taken the lease over, a save or a note carrying the old
    lease raises LeaseLost and the row and the trail stay as the new holder left them."""
    r = store.create(rotation(), "planned")
    stale = store.acquire_lease("r1", "A", timedelta(seconds=30))
    assert stale is not None
    clock.advance(timedelta(seconds=31))
    current = store.acquire_lease("r1", "B", timedelta(seconds=30))
    assert current is not None
    moved = replace(r, state=State.MAKE_ROOM)
    store.save(moved, "by B", from_state=State.PLANNED, lease=current)
    with pytest.raises(LeaseLost):
        store.save(replace(moved, state=State.CREATE), "by A", State.MAKE_ROOM, lease=stale)
    with pytest.raises(LeaseLost):
        store.record("r1", State.MAKE_ROOM, "note by A", lease=stale)
    assert store.get("r1") == moved
    assert [e.reason for e in store.events("r1")] == ["planned", "by B"]


def test_a_write_under_an_expired_lease_is_refused_even_with_no_new_holder(
    store: SqliteStateStore, clock: FakeClock
) -> None:
    """A lease past its ttl by the store's clock authorises nothing, although nobody has
    taken it over yet: the holder may have stalled while another process read the row."""
    r = store.create(rotation(), "planned")
    lease = store.acquire_lease("r1", "A", timedelta(seconds=30))
    assert lease is not None
    clock.advance(timedelta(seconds=30))
    with pytest.raises(LeaseLost):
        store.save(replace(r, state=State.MAKE_ROOM), "late", State.PLANNED, lease=lease)
    assert store.get("r1") == r


def test_lease_of_dead_process_on_this_host_is_taken_at_once(
    store: SqliteStateStore, db_path: Path
) -> None:
    """A lease left by a process on this host that has exited is taken over before expiry."""
    store.create(rotation(), "planned")
    result = run_python(
        """
        import sys
        from datetime import timedelta
        from rotator.state import SqliteStateStore, lease_owner
        store = SqliteStateStore(sys.argv[1])
        assert store.acquire_lease("r1", lease_owner(), timedelta(hours=1))
        store.close()
        """,
        str(db_path),
    )
    assert result.returncode == 0, result.stderr

    assert store.acquire_lease("r1", "B", timedelta(seconds=30))  # the clock has not moved

    conn = raw(db_path)
    try:
        assert conn.execute("SELECT owner, pid FROM leases").fetchone() == ("B", os.getpid())
    finally:
        conn.close()


def test_dead_holder_lease_taken_but_live_or_remote_holder_kept(
    store: SqliteStateStore, db_path: Path
) -> None:
    """A lease held by an exited pid on this host is taken at once; the same lease held by
    a live pid, or by a pid on another host, is not."""
    store.create(rotation(), "planned")
    result = run_python(
        """
        import sys
        from datetime import timedelta
        from rotator.state import SqliteStateStore, lease_owner
        store = SqliteStateStore(sys.argv[1])
        assert store.acquire_lease("r1", lease_owner(), timedelta(hours=1))
        store.close()
        """,
        str(db_path),
    )
    assert result.returncode == 0, result.stderr
    conn = raw(db_path)
    try:
        dead_pid, host = conn.execute("SELECT pid, host FROM leases").fetchone()
        assert dead_pid != os.getpid()
        assert host == socket.gethostname()

        conn.execute("UPDATE leases SET host = 'elsewhere'")
        assert not store.acquire_lease("r1", "B", timedelta(seconds=30))

        conn.execute("UPDATE leases SET host = ?, pid = ?", (host, os.getpid()))
        assert not store.acquire_lease("r1", "B", timedelta(seconds=30))

        conn.execute("UPDATE leases SET pid = ?", (dead_pid,))
        assert store.acquire_lease("r1", "B", timedelta(seconds=30))
        assert conn.execute("SELECT owner, pid FROM leases").fetchone() == ("B", os.getpid())
    finally:
        conn.close()


def test_release_by_wrong_owner_is_a_no_op(store: SqliteStateStore) -> None:
    """Only the holder's release frees the lease."""
    store.create(rotation(), "planned")
    assert store.acquire_lease("r1", "A", timedelta(seconds=30))
    store.release_lease("r1", "B")
    assert not store.acquire_lease("r1", "B", timedelta(seconds=30))
    store.release_lease("r1", "A")
    assert store.acquire_lease("r1", "B", timedelta(seconds=30))


def test_lease_on_unknown_rotation_raises_not_found(store: SqliteStateStore) -> None:
    """A lease can only be taken on a rotation that exists."""
    with pytest.raises(NotFound):
        store.acquire_lease("ghost", "A", timedelta(seconds=30))


def test_lease_owner_names_host_pid_and_a_random_part() -> None:
    """`lease_owner` is host:pid:8-hex and differs between calls."""
    owner = lease_owner()
    host, pid, tail = owner.rsplit(":", 2)
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    assert len(tail) == 8
    int(tail, 16)
    assert lease_owner() != owner


# --- sharing ----------------------------------------------------------------------------


def test_two_stores_on_one_file_see_each_others_writes(db_path: Path) -> None:
    """Two connections to the same file read each other's committed rows and events."""
    a = SqliteStateStore(db_path)
    b = SqliteStateStore(db_path)
    try:
        r = rotation()
        a.create(r, "planned")
        assert b.get("r1") == r
        moved = dataclasses.replace(r, state=State.MAKE_ROOM)
        b.save(moved, "slot free", from_state=State.PLANNED)
        assert a.get("r1") == moved
        assert [e.to_state for e in a.events("r1")] == [State.PLANNED, State.MAKE_ROOM]
        with pytest.raises(RotationExists):
            a.create(rotation("r2"), "planned")
    finally:
        a.close()
        b.close()


def test_one_store_is_safe_to_share_between_threads(store: SqliteStateStore) -> None:
    """Many threads writing through one store lose no write and raise nothing."""
    store.create(rotation(state=State.OVERLAP), "planned")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(25):
                store.record("r1", State.OVERLAP, "note")
                store.get("r1")
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.events("r1")) == 1 + 8 * 25


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_threads_that_come_and_go_leave_no_connection_behind(
    store: SqliteStateStore, db_path: Path
) -> None:
    """A thread that ended never uses its connection again: the next connection opened
    closes it. A daemon serving each HTTP request (a readiness probe every few seconds)
    on a thread of its own keeps a bounded number of files open, not one more per
    request."""

    def open_files() -> int:
        fds = Path("/proc/self/fd")
        names = []
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                names.append(os.readlink(fd))
        return sum(1 for name in names if name.startswith(str(db_path)))

    def read() -> None:
        store.list_open()

    store.list_open()
    before = open_files()
    for _ in range(50):
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
    # This thread's connection, and at most the last ended thread's (closed by the next).
    assert open_files() <= 2 * before
    store.close()
    assert open_files() == 0


def test_locked_database_raises_transient(db_path: Path) -> None:
    """When another writer holds the lock past the busy timeout, writes raise Transient."""
    s = SqliteStateStore(db_path, busy_timeout=0.1)
    s.create(rotation(), "planned")
    blocker = raw(db_path)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(Transient, match="locked"):
            s.record("r1", State.PLANNED, "note")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    s.record("r1", State.PLANNED, "note")  # and works again once the lock is gone
    s.close()


# --- schema --------------------------------------------------------------------------


def _user_version(db_path: Path) -> int:
    conn = raw(db_path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def test_fresh_db_gets_current_schema_version(db_path: Path) -> None:
    """A new file is migrated to SCHEMA_VERSION, in WAL mode."""
    SqliteStateStore(db_path).close()
    assert SCHEMA_VERSION >= 1
    assert _user_version(db_path) == SCHEMA_VERSION
    conn = raw(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_reopening_is_idempotent_and_keeps_data(db_path: Path) -> None:
    """Opening an up-to-date file again changes nothing and keeps its rows."""
    s = SqliteStateStore(db_path)
    s.create(rotation(), "planned")
    s.close()
    s = SqliteStateStore(db_path)
    try:
        assert s.get("r1") == rotation()
        assert _user_version(db_path) == SCHEMA_VERSION
    finally:
        s.close()


def test_newer_schema_version_is_refused(db_path: Path) -> None:
    """A file written by a newer rotator (higher user_version) is refused with a clear error."""
    SqliteStateStore(db_path).close()
    conn = raw(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RotatorError, match="newer than this rotator"):
        SqliteStateStore(db_path)
    assert _user_version(db_path) == SCHEMA_VERSION + 1


def test_open_index_is_rebuilt_when_terminal_states_differ(db_path: Path) -> None:
    """A one-open-rotation index built from another terminal set is replaced on open."""
    SqliteStateStore(db_path).close()
    conn = raw(db_path)
    conn.execute("DROP INDEX rotations_one_open")
    conn.execute(
        "CREATE UNIQUE INDEX rotations_one_open ON rotations (account_id, user_name) "
        "WHERE state NOT IN ('DONE')"
    )
    conn.close()
    s = SqliteStateStore(db_path)
    try:
        first = rotation("r1")
        s.create(first, "planned")
        s.save(dataclasses.replace(first, state=State.CANCELLED), "gone", State.PLANNED)
        s.create(rotation("r2"), "planned")  # refused by the stale index
    finally:
        s.close()


# --- health --------------------------------------------------------------------------


def test_check_passes_on_a_writable_store(store: SqliteStateStore) -> None:
    """`check` returns quietly when the file takes a write."""
    store.check()


def test_check_raises_backend_unavailable_when_writes_fail(db_path: Path) -> None:
    """When the file cannot grow (RLIMIT_FSIZE, which binds root too), `check` raises
    BackendUnavailable naming the path."""
    SqliteStateStore(db_path).close()
    result = run_python(
        """
        import resource, signal, sys
        from rotator.errors import BackendUnavailable
        from rotator.state import SqliteStateStore
        store = SqliteStateStore(sys.argv[1])
        store.check()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))
        try:
            store.check()
        except BackendUnavailable as exc:
            print("unavailable:", exc)  # stdout is a pipe: not limited
        else:
            print("passed")
        """,
        str(db_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("unavailable:")
    assert str(db_path) in result.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_check_raises_backend_unavailable_on_read_only_file(db_path: Path) -> None:
    """A database file without write permission fails `check` with BackendUnavailable."""
    SqliteStateStore(db_path).close()
    db_path.chmod(0o400)
    try:
        s = SqliteStateStore(db_path)
        try:
            with pytest.raises(BackendUnavailable, match=str(db_path)):
                s.check()
        finally:
            s.close()
    finally:
        db_path.chmod(0o600)


def test_closed_store_raises_backend_unavailable(db_path: Path) -> None:
    """After `close`, calls raise BackendUnavailable and a second close is harmless."""
    s = SqliteStateStore(db_path)
    s.close()
    s.close()
    with pytest.raises(BackendUnavailable, match="closed"):
        s.get("r1")
    with pytest.raises(BackendUnavailable):
        s.check()


def test_schema_has_no_column_for_a_secret(store: SqliteStateStore, db_path: Path) -> None:
    """No table has a column meant for a secret (invariant 3)."""
    conn = raw(db_path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        columns = [c[1].lower() for t in tables for c in conn.execute(f"PRAGMA table_info({t})")]
    finally:
        conn.close()
    assert "rotations" in tables
    assert not [c for c in columns if "secret" in c]


def test_save_from_a_state_the_row_has_left_is_refused(store: SqliteStateStore) -> None:
    """A writer that lost the race (the row moved on) cannot overwrite the newer state."""
    first = store.create(rotation(), "planned")
    store.save(dataclasses.replace(first, state=State.MAKE_ROOM), "room", State.PLANNED)
    late = dataclasses.replace(first, state=State.BLOCKED)
    with pytest.raises(StaleRotation, match="MAKE_ROOM"):
        store.save(late, "late writer", State.PLANNED)
    stored = store.get(first.id)
    assert stored is not None
    assert stored.state is State.MAKE_ROOM


def test_a_version_1_store_is_migrated_in_place_keeping_its_rotations(
    db_path: Path, clock: FakeClock
) -> None:
    """A store written by the first schema gains the dead-letter table on open, keeps its
    rotations and events, and records the new schema version."""
    from rotator.state import sqlite as state_module

    old = rotation()
    conn = sqlite3.connect(db_path)
    for sql in state_module._MIGRATIONS[0]:
        conn.execute(sql)
    # A rotation and its first event, as the first schema's code wrote them.
    row = state_module._encode(old)
    # columns of later schemas
    del row["intent_until"], row["store_started_at"], row["kind"], row["create_login"]
    names = ", ".join(row)
    values = ", ".join(":" + n for n in row)
    conn.execute(f"INSERT INTO rotations ({names}) VALUES ({values})", row)  # noqa: S608
    conn.execute(
        "INSERT INTO events (rotation_id, at, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
        (old.id, "2026-01-01T00:00:00+00:00", None, "PLANNED", "planned before the upgrade"),
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = SqliteStateStore(db_path, clock=clock)
    try:
        with raw(db_path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 9
        assert store.get(old.id) == old
        assert [e.reason for e in store.events(old.id)] == ["planned before the upgrade"]
        store.add_dead_letter("sqs", "m-1", "not JSON", "{")
        store.add_dead_letter("sqs", "m-1", "not JSON", "{")
        assert [(s, m, e) for s, m, _, e in store.dead_letters()] == [("sqs", "m-1", "not JSON")]
    finally:
        store.close()


def test_a_store_from_before_rotation_kinds_is_migrated_to_one_open_rotation_per_kind(
    db_path: Path, clock: FakeClock
) -> None:
    """A file at schema version 8 (no `kind` column, the one-open index over account
    and user only, as the rotator of that version built it) holding an open rotation:
    opened by this rotator, the rotation is a key rotation, the index spans the kind,
    and its user may open a console rotation but still no second key rotation."""
    from rotator.state import shared
    from rotator.state import sqlite as state_module

    old = rotation("r-old")
    conn = sqlite3.connect(db_path, isolation_level=None)
    for statements in state_module._MIGRATIONS[:8]:
        for sql in statements:
            conn.execute(sql)
    # The index exactly as version 8's code made it.
    conn.execute(
        "CREATE UNIQUE INDEX rotations_one_open ON rotations (account_id, user_name) "
        f"WHERE {shared.OPEN_WHERE}"
    )
    row = state_module._encode(old)
    del row["kind"], row["create_login"]  # the columns of the next schema
    names = ", ".join(row)
    values = ", ".join(":" + n for n in row)
    conn.execute(f"INSERT INTO rotations ({names}) VALUES ({values})", row)  # noqa: S608
    conn.execute("PRAGMA user_version = 8")
    conn.close()

    store = SqliteStateStore(db_path, clock=clock)
    try:
        assert _user_version(db_path) == SCHEMA_VERSION == 9
        with contextlib.closing(raw(db_path)) as check:
            [(index_sql,)] = check.execute(
                "SELECT sql FROM sqlite_master WHERE name = 'rotations_one_open'"
            ).fetchall()
        assert index_sql == shared.OPEN_INDEX_SQL
        assert "kind" in index_sql

        got = store.get("r-old")
        assert got == old
        assert got.kind is RotationKind.KEY
        assert store.open_for("111122223333", "alice") == old
        assert store.open_for("111122223333", "alice", RotationKind.CONSOLE) is None

        console = rotation("r-console", created_at=T0 + timedelta(hours=1))
        console = dataclasses.replace(console, kind=RotationKind.CONSOLE)
        assert store.create(console, "planned") == console
        with pytest.raises(RotationExists, match="already has open rotation r-old"):
            store.create(rotation("r-key2", created_at=T0 + timedelta(hours=1)), "planned")
        with pytest.raises(RotationExists, match="already has open console rotation r-console"):
            store.create(dataclasses.replace(console, id="r-console2"), "planned")
        assert {r.id for r in store.list_open()} == {"r-old", "r-console"}
    finally:
        store.close()

    # Opening it again changes nothing more.
    again = SqliteStateStore(db_path, clock=clock)
    try:
        assert again.open_for("111122223333", "alice", RotationKind.CONSOLE) == console
    finally:
        again.close()


def test_quarantine_first_sighting_is_kept_and_forgotten_once_the_policy_is_detached(
    store: SqliteStateStore,
) -> None:
    """The first time a scan saw a user's quarantine policy stays put across later scans
    (they see it again, later), is per account, and goes when a full scan no longer sees
    the policy: a policy attached again later is a new leak with a new first sighting."""
    account, other = "111122223333", "444455556666"
    first, later = T0, T0 + timedelta(hours=3)
    store.note_quarantines(account, {"oz": ("AWSCompromisedKeyQuarantineV2", first)})
    store.note_quarantines(other, {"oz": ("AWSCompromisedKeyQuarantineV2", later)})
    store.note_quarantines(
        account,
        {
            "oz": ("AWSCompromisedKeyQuarantineV2", later),
            "eve": ("AWSCompromisedKeyQuarantineV3", later),
        },
    )
    assert store.quarantines(account) == {"oz": first, "eve": later}
    assert store.quarantines(other) == {"oz": later}
    store.note_quarantines(account, {"eve": ("AWSCompromisedKeyQuarantineV3", later)})
    assert store.quarantines(account) == {"eve": later}
    store.note_quarantines(account, {"oz": ("AWSCompromisedKeyQuarantineV2", later)})
    assert store.quarantines(account) == {"oz": later}
    assert store.quarantines(other) == {"oz": later}
