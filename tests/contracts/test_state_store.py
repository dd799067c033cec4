"""The StateStore contract: what the core relies on from a state store, held on the
in-memory fake and on every real store.

A new store (PostgreSQL) joins by adding one entry to `STORES`: every test here then runs
on it too. A store that needs a server takes it from a fixture inside its opener
(`request.getfixturevalue`), so that only its own tests start that server."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from rotator.errors import (
    BackendUnavailable,
    LeaseLost,
    NotFound,
    RotationExists,
    RotatorError,
    StaleRotation,
)
from rotator.machine import TERMINAL, State
from rotator.model import Rotation, RotationKind, RotationReason
from rotator.ports import StateStore
from rotator.state import MAX_DEAD_LETTERS, SqliteStateStore
from rotator.state.postgres import PostgresStateStore
from rotator.testing import FakeClock, FakeStateStore
from tests.pgserver import postgres_server, postgres_url  # noqa: F401 - fixtures _postgres uses

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
ACCOUNT = "111122223333"
TTL = timedelta(seconds=30)

Opener = Callable[[pytest.FixtureRequest, FakeClock], StateStore]


def _sqlite(request: pytest.FixtureRequest, clock: FakeClock) -> StateStore:
    tmp_path = request.getfixturevalue("tmp_path")
    return SqliteStateStore(tmp_path / "state.db", clock=clock)


def _postgres(request: pytest.FixtureRequest, clock: FakeClock) -> StateStore:
    """A fresh database on the session's PostgreSQL server (tests/pgserver.py)."""
    return PostgresStateStore(request.getfixturevalue("postgres_url"), clock=clock)


# Each entry opens a fresh, empty store whose clock is `clock`. A store that needs a
# server (PostgreSQL) takes it from a session fixture inside its opener.
STORES: dict[str, Opener] = {
    "fake": lambda request, clock: FakeStateStore(clock),
    "real": _sqlite,
    "postgres": _postgres,
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture(params=list(STORES))
def store(request: pytest.FixtureRequest, clock: FakeClock) -> Iterator[StateStore]:
    opened = STORES[request.param](request, clock)
    yield opened
    opened.close()


def rotation(
    rid: str = "r1",
    *,
    account: str = ACCOUNT,
    user: str = "alice",
    state: State = State.PLANNED,
    created_at: datetime = T0,
    kind: RotationKind = RotationKind.KEY,
) -> Rotation:
    return Rotation(
        id=rid,
        account_id=account,
        user_name=user,
        reason=RotationReason.AGE,
        state=state,
        created_at=created_at,
        updated_at=created_at,
        kind=kind,
    )


def close(store: StateStore, r: Rotation, to: State = State.DONE) -> Rotation:
    closed = replace(r, state=to)
    store.save(closed, "closed", from_state=r.state)
    return closed


# --- rotations ---------------------------------------------------------------------------


def test_a_created_rotation_reads_back_equal_in_every_field_with_times_in_utc(
    store: StateStore,
) -> None:
    """Every Rotation field, set to a non-default value, comes back equal from `create`
    and from `get`; a time given in another zone comes back as the same instant in UTC."""
    east = timezone(timedelta(hours=5, minutes=30))
    full = Rotation(
        id="r-full",
        account_id=ACCOUNT,
        user_name="alice",
        reason=RotationReason.LEAKED,
        state=State.OVERLAP,
        created_at=T0.astimezone(east),
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
    # A field added to Rotation must be set above, so that this test covers it.
    unset = [
        f.name
        for f in dataclasses.fields(Rotation)
        if f.default is not dataclasses.MISSING and getattr(full, f.name) == f.default
    ]
    assert unset == []

    created = store.create(full, "planned")
    got = store.get("r-full")

    assert created == full
    assert got == full
    assert got.created_at.utcoffset() == timedelta(0)


def test_get_of_an_unknown_id_is_none(store: StateStore) -> None:
    """`get` of an id that was never created returns None."""
    assert store.get("nope") is None


def test_a_naive_time_is_refused_and_nothing_is_stored(store: StateStore) -> None:
    """A naive datetime raises ValueError instead of being stored with a guessed zone."""
    with pytest.raises(ValueError, match="naive"):
        store.create(rotation(created_at=datetime(2024, 5, 1, 12, 0)), "planned")
    assert store.get("r1") is None


def test_a_second_open_rotation_for_a_user_raises_rotation_exists_and_leaves_nothing(
    store: StateStore,
) -> None:
    """One open rotation per (account, user): a second raises RotationExists naming the
    first, and leaves no row and no event behind."""
    store.create(rotation("r1"), "planned")
    with pytest.raises(RotationExists, match="r1"):
        store.create(rotation("r2"), "planned")
    assert store.get("r2") is None
    assert store.events("r2") == []


def test_a_closed_rotation_frees_its_user_for_a_new_one(store: StateStore) -> None:
    """Once a rotation reaches any terminal state its user may get a new open rotation."""
    for n, terminal in enumerate(sorted(TERMINAL)):
        user = f"user{n}"
        first = store.create(rotation(f"{user}-1", user=user), "planned")
        close(store, first, terminal)
        store.create(rotation(f"{user}-2", user=user, created_at=T0 + timedelta(hours=1)), "p")
        opened = store.open_for(ACCOUNT, user)
        assert opened is not None
        assert opened.id == f"{user}-2", terminal


def test_the_one_open_rotation_rule_is_per_account_and_user(store: StateStore) -> None:
    """The same user name in another account, and another user, may each rotate too."""
    store.create(rotation("r1", account=ACCOUNT), "planned")
    store.create(rotation("r2", account="444455556666"), "planned")
    store.create(rotation("r3", user="bob"), "planned")
    assert {r.id for r in store.list_open()} == {"r1", "r2", "r3"}


def test_a_rotation_is_a_key_rotation_unless_it_says_otherwise(store: StateStore) -> None:
    """A Rotation made without a kind is a key rotation, and reads back as one; a console
    rotation reads back as a console one from `create`, `get` and every listing."""
    plain = store.create(rotation("r-key"), "planned")
    console = store.create(rotation("r-console", kind=RotationKind.CONSOLE), "planned")

    assert rotation().kind is RotationKind.KEY
    assert (plain.kind, console.kind) == (RotationKind.KEY, RotationKind.CONSOLE)
    got_key, got_console = store.get("r-key"), store.get("r-console")
    assert got_key is not None
    assert got_console is not None
    assert (got_key.kind, got_console.kind) == (RotationKind.KEY, RotationKind.CONSOLE)
    assert {(r.id, r.kind) for r in store.list_open()} == {
        ("r-key", RotationKind.KEY),
        ("r-console", RotationKind.CONSOLE),
    }
    assert {(r.id, r.kind) for r in store.list_recent()} == {
        ("r-key", RotationKind.KEY),
        ("r-console", RotationKind.CONSOLE),
    }


def test_a_user_may_have_one_open_rotation_of_each_kind(store: StateStore) -> None:
    """A console rotation may open beside the user's open key rotation (and the other
    way round), but a second open rotation of either kind raises RotationExists naming
    the open one of that kind, a console one in so many words, and leaves nothing."""
    store.create(rotation("k1"), "planned")
    store.create(rotation("c1", kind=RotationKind.CONSOLE), "planned")

    with pytest.raises(RotationExists, match=r"already has open console rotation c1$"):
        store.create(rotation("c2", kind=RotationKind.CONSOLE), "planned")
    with pytest.raises(RotationExists, match=r"already has open rotation k1$"):
        store.create(rotation("k2"), "planned")
    for refused in ("c2", "k2"):
        assert store.get(refused) is None
        assert store.events(refused) == []
    assert {r.id for r in store.list_open()} == {"k1", "c1"}


def test_a_console_rotation_opens_while_a_key_one_is_open_and_the_other_way_round(
    store: StateStore,
) -> None:
    """The order does not matter: a key rotation may open beside an open console one."""
    store.create(rotation("c1", kind=RotationKind.CONSOLE), "planned")
    store.create(rotation("k1"), "planned")
    assert {r.id for r in store.list_open()} == {"c1", "k1"}


def test_closing_one_kind_frees_that_kind_only(store: StateStore) -> None:
    """A closed console rotation lets a new console rotation open, while the open key
    rotation still keeps a second key one out; reopening the closed console rotation
    beside the new one raises RotationExists naming it, and changes nothing."""
    store.create(rotation("k1"), "planned")
    c1 = store.create(rotation("c1", kind=RotationKind.CONSOLE), "planned")
    closed = close(store, c1, State.CANCELLED)
    store.create(rotation("c2", kind=RotationKind.CONSOLE, created_at=T0 + timedelta(hours=1)), "p")
    with pytest.raises(RotationExists, match="k1"):
        store.create(rotation("k2", created_at=T0 + timedelta(hours=1)), "planned")
    with pytest.raises(RotationExists, match="open console rotation c2"):
        store.save(replace(closed, state=State.PLANNED), "oops", State.CANCELLED)
    assert store.get("c1") == closed


def test_open_for_and_latest_for_answer_for_one_kind_and_default_to_key(
    store: StateStore,
) -> None:
    """`open_for` and `latest_for` see only rotations of the kind asked, the key kind
    when none is named: a user's open console rotation is no open key rotation, and its
    newer console rotation is not its latest key one."""
    console = RotationKind.CONSOLE
    close(store, store.create(rotation("k-old", created_at=T0), "planned"))
    store.create(rotation("c-open", kind=console, created_at=T0 + timedelta(days=1)), "p")

    assert store.open_for(ACCOUNT, "alice") is None
    assert store.open_for(ACCOUNT, "alice", RotationKind.KEY) is None
    open_console = store.open_for(ACCOUNT, "alice", console)
    assert open_console is not None
    assert open_console.id == "c-open"
    latest_key = store.latest_for(ACCOUNT, "alice")
    assert latest_key is not None
    assert latest_key.id == "k-old"
    latest_console = store.latest_for(ACCOUNT, "alice", kind=console)
    assert latest_console is not None
    assert latest_console.id == "c-open"

    store.create(rotation("k-open", created_at=T0 + timedelta(days=2)), "planned")
    open_key = store.open_for(ACCOUNT, "alice")
    assert open_key is not None
    assert open_key.id == "k-open"
    open_console = store.open_for(ACCOUNT, "alice", console)
    assert open_console is not None
    assert open_console.id == "c-open"
    assert store.open_for(ACCOUNT, "bob", console) is None
    assert store.latest_for(ACCOUNT, "bob", console) is None
    assert store.latest_for("444455556666", "alice", console) is None


def test_reusing_a_rotation_id_is_refused_but_not_as_rotation_exists(store: StateStore) -> None:
    """A second rotation with an existing id (for another user) is an error, but not
    RotationExists: nobody else's rotation is in the way."""
    store.create(rotation("r1"), "planned")
    with pytest.raises(RotatorError, match="r1 already exists") as info:
        store.create(rotation("r1", user="bob"), "planned")
    assert not isinstance(info.value, RotationExists)


def test_reopening_a_closed_rotation_while_another_is_open_raises_rotation_exists(
    store: StateStore,
) -> None:
    """`save` cannot move a closed rotation back to open while its user has another open
    one; the closed row stays as it was."""
    cancelled = close(store, store.create(rotation("r1"), "planned"), State.CANCELLED)
    store.create(rotation("r2"), "planned")
    with pytest.raises(RotationExists, match="r2"):
        store.save(replace(cancelled, state=State.PLANNED), "oops", State.CANCELLED)
    assert store.get("r1") == cancelled


def test_a_save_that_moves_the_state_appends_one_event_at_the_store_clock(
    store: StateStore, clock: FakeClock
) -> None:
    """A save from one state to another persists the row and appends (from, to, reason)
    stamped with the store's clock; `create` wrote the first event (None -> state)."""
    r = store.create(rotation(), "age 95d > 90d")
    clock.advance(timedelta(minutes=1))
    moved = replace(r, state=State.MAKE_ROOM, updated_at=clock.now, attempts=1)

    store.save(moved, "slot free", from_state=State.PLANNED)

    assert store.get("r1") == moved
    assert [(e.from_state, e.to_state, e.reason, e.at) for e in store.events("r1")] == [
        (None, State.PLANNED, "age 95d > 90d", T0),
        (State.PLANNED, State.MAKE_ROOM, "slot free", T0 + timedelta(minutes=1)),
    ]


def test_a_save_that_keeps_the_state_appends_no_event(store: StateStore) -> None:
    """A save with no from_state, or from the state it stays in, writes the row only."""
    r = store.create(rotation(), "planned")
    store.save(replace(r, attempts=1), "retry")
    store.save(replace(r, attempts=2), "retry", from_state=State.PLANNED)
    got = store.get("r1")
    assert got is not None
    assert got.attempts == 2
    assert len(store.events("r1")) == 1


def test_a_save_from_a_state_the_row_has_left_raises_stale_rotation_and_changes_nothing(
    store: StateStore,
) -> None:
    """A writer that lost the race (the row moved on) cannot overwrite the newer state,
    and its move leaves no event."""
    first = store.create(rotation(), "planned")
    moved = replace(first, state=State.MAKE_ROOM)
    store.save(moved, "room", State.PLANNED)
    with pytest.raises(StaleRotation, match="MAKE_ROOM"):
        store.save(replace(first, state=State.BLOCKED), "late writer", State.PLANNED)
    assert store.get(first.id) == moved
    assert [e.reason for e in store.events(first.id)] == ["planned", "room"]


def test_save_and_record_of_an_unknown_rotation_raise_not_found(store: StateStore) -> None:
    """Saving, or noting on, a rotation that was never created raises NotFound and
    records nothing."""
    with pytest.raises(NotFound):
        store.save(rotation("ghost"), "moved", from_state=State.PLANNED)
    with pytest.raises(NotFound):
        store.record("ghost", State.OVERLAP, "note")
    assert store.events("ghost") == []


def test_record_appends_a_note_in_the_state_the_rotation_stays_in(store: StateStore) -> None:
    """`record` appends an event whose from and to states are both the given state."""
    store.create(rotation(state=State.OVERLAP), "planned")
    store.record("r1", State.OVERLAP, "consumers still use the old key")
    last = store.events("r1")[-1]
    assert (last.from_state, last.to_state, last.reason) == (
        State.OVERLAP,
        State.OVERLAP,
        "consumers still use the old key",
    )


def test_the_event_trail_only_ever_grows(store: StateStore) -> None:
    """Every write appends to the trail and none rewrites it: each earlier reading is a
    prefix of every later one, and changing a list the store handed out changes nothing."""
    r = store.create(rotation(), "planned")
    readings = [store.events("r1")]
    r2 = replace(r, state=State.MAKE_ROOM)
    store.save(r2, "start", State.PLANNED)
    readings.append(store.events("r1"))
    store.record("r1", State.MAKE_ROOM, "a note")
    readings.append(store.events("r1"))
    store.save(replace(r2, attempts=3), "retry", State.MAKE_ROOM)
    readings.append(store.events("r1"))
    close(store, r2)
    readings.append(store.events("r1"))

    for earlier, later in itertools.pairwise(readings):
        assert later[: len(earlier)] == earlier
    assert [len(x) for x in readings] == [1, 2, 3, 3, 4]
    handed_out = store.events("r1")
    handed_out.clear()
    assert store.events("r1") == readings[-1]


# --- queries -----------------------------------------------------------------------------


def test_list_open_lists_only_open_rotations_oldest_first(store: StateStore) -> None:
    """`list_open` leaves out terminal rotations and orders the rest by creation."""
    close(store, store.create(rotation("r-done", user="carol"), "planned"))
    store.create(rotation("r-b", user="bob", created_at=T0 + timedelta(hours=1)), "planned")
    store.create(rotation("r-a", user="alice"), "planned")
    assert [r.id for r in store.list_open()] == ["r-a", "r-b"]


def test_list_recent_keeps_every_open_rotation_and_limits_the_closed_ones(
    store: StateStore,
) -> None:
    """`list_recent` returns every open rotation plus the newest `limit` closed ones,
    newest created first, filtered by user name; a negative limit is refused."""
    for i in range(5):
        close(store, store.create(rotation(f"alice{i}", created_at=T0 + timedelta(days=i)), "p"))
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
    with pytest.raises(ValueError, match="limit"):
        store.list_recent(limit=-1)


def test_latest_for_returns_the_newest_rotation_of_the_user_in_any_state(
    store: StateStore,
) -> None:
    """`latest_for` returns the user's newest rotation even when it is closed; `open_for`
    then returns None, and both return None for a user with no rotation."""
    close(store, store.create(rotation("r-old", created_at=T0), "planned"))
    close(store, store.create(rotation("r-new", created_at=T0 + timedelta(days=1)), "planned"))
    latest = store.latest_for(ACCOUNT, "alice")
    assert latest is not None
    assert (latest.id, latest.state) == ("r-new", State.DONE)
    assert store.open_for(ACCOUNT, "alice") is None
    assert store.latest_for(ACCOUNT, "nobody") is None


def test_replacement_key_ids_are_the_new_keys_of_leak_rotations_that_did_not_fail(
    store: StateStore,
) -> None:
    """Key ids issued to replace a leaked key are those of leak rotations of the account
    that did not end FAILED or CANCELLED; other rotations' new keys are not among them."""

    def leak(rid: str, user: str, key: str, end: State | None, account: str = ACCOUNT) -> None:
        r = replace(rotation(rid, user=user, account=account), leaked=True, new_key_id=key)
        store.create(r, "leaked")
        if end is not None:
            close(store, r, end)

    leak("l1", "a", "AKIAOPEN", None)
    leak("l2", "b", "AKIADONE", State.DONE)
    leak("l3", "c", "AKIAFAILED", State.FAILED)
    leak("l4", "d", "AKIACANCELLED", State.CANCELLED)
    leak("l5", "e", "AKIAELSEWHERE", None, account="444455556666")
    store.create(replace(rotation("n1", user="f"), new_key_id="AKIANORMAL"), "age")
    assert store.replacement_key_ids(ACCOUNT) == {"AKIAOPEN", "AKIADONE"}


# --- leases ------------------------------------------------------------------------------


def test_a_live_lease_keeps_every_other_owner_out(store: StateStore) -> None:
    """While one owner's lease is live, another owner's acquisition returns None."""
    store.create(rotation(), "planned")
    assert store.acquire_lease("r1", "A", TTL) is not None
    assert store.acquire_lease("r1", "B", TTL) is None


def test_an_expired_lease_is_taken_over_with_a_greater_fencing_token(
    store: StateStore, clock: FakeClock
) -> None:
    """Once the ttl has passed on the store's clock another owner takes the lease with a
    greater token, and the first owner is then kept out."""
    store.create(rotation(), "planned")
    first = store.acquire_lease("r1", "A", TTL)
    assert first is not None
    clock.advance(TTL)
    taken = store.acquire_lease("r1", "B", TTL)
    assert taken is not None
    assert taken.token > first.token
    assert store.acquire_lease("r1", "A", TTL) is None


def test_the_holder_renews_a_live_lease_keeping_its_token(
    store: StateStore, clock: FakeClock
) -> None:
    """A holder's re-acquisition or `renew_lease` of its live lease keeps the token and
    extends the lease from now."""
    store.create(rotation(), "planned")
    lease = store.acquire_lease("r1", "A", TTL)
    assert lease is not None
    clock.advance(timedelta(seconds=20))
    again = store.acquire_lease("r1", "A", TTL)
    assert again == lease
    clock.advance(timedelta(seconds=20))  # 40 s after the grant: alive through the renewal
    assert store.renew_lease(lease, TTL) == lease
    clock.advance(timedelta(seconds=29))
    assert store.acquire_lease("r1", "B", TTL) is None


def test_release_ends_the_lease_and_the_next_holder_gets_a_greater_token(
    store: StateStore,
) -> None:
    """Only the holder's release frees the lease; whoever takes it next, the releasing
    owner included, gets a greater token than before."""
    store.create(rotation(), "planned")
    first = store.acquire_lease("r1", "A", TTL)
    assert first is not None
    store.release_lease("r1", "B")
    assert store.acquire_lease("r1", "B", TTL) is None
    store.release_lease("r1", "A")
    second = store.acquire_lease("r1", "B", TTL)
    assert second is not None
    assert second.token > first.token
    store.release_lease("r1", "B")
    third = store.acquire_lease("r1", "A", TTL)
    assert third is not None
    assert third.token > second.token


def test_only_taking_a_lease_its_holder_neither_released_nor_renewed_is_a_takeover(
    store: StateStore, clock: FakeClock
) -> None:
    """`taken_over` is set when the lease is taken from another owner whose lease
    expired (it died or stalled); a first lease, a renewal and taking a released lease
    are no takeover."""
    store.create(rotation(), "planned")
    first = store.acquire_lease("r1", "A", TTL)
    assert first is not None
    assert first.taken_over is False
    renewed = store.acquire_lease("r1", "A", TTL)
    assert renewed is not None
    assert renewed.taken_over is False
    clock.advance(TTL)
    taken = store.acquire_lease("r1", "B", TTL)
    assert taken is not None
    assert taken.taken_over is True
    store.release_lease("r1", "B")
    after_release = store.acquire_lease("r1", "C", TTL)
    assert after_release is not None
    assert after_release.taken_over is False


def test_each_event_names_the_lease_it_was_written_under(
    store: StateStore, clock: FakeClock
) -> None:
    """A write under a lease records its owner and token in the event; a write with no
    lease (the creation, an operator's command) records neither. After a takeover the
    trail shows the new owner with a greater token."""
    r = store.create(rotation(), "planned")
    first = store.acquire_lease("r1", "A", TTL)
    assert first is not None
    moved = replace(r, state=State.MAKE_ROOM)
    store.save(moved, "room", from_state=State.PLANNED, lease=first)
    store.record("r1", State.MAKE_ROOM, "a note", lease=first)
    clock.advance(TTL)
    second = store.acquire_lease("r1", "B", TTL)
    assert second is not None
    store.save(replace(moved, state=State.CREATE), "create", State.MAKE_ROOM, lease=second)
    store.record("r1", State.CREATE, "operator note")
    trail = [(e.reason, e.owner, e.token) for e in store.events("r1")]
    assert trail == [
        ("planned", None, None),
        ("room", "A", first.token),
        ("a note", "A", first.token),
        ("create", "B", second.token),
        ("operator note", None, None),
    ]
    assert second.token > first.token


def test_renew_lease_never_takes_back_a_lost_lease(store: StateStore, clock: FakeClock) -> None:
    """Renewing an expired lease, or one another owner took over, returns None and
    leaves the current holder's lease as it was."""
    store.create(rotation(), "planned")
    lease = store.acquire_lease("r1", "A", TTL)
    assert lease is not None
    clock.advance(TTL)
    assert store.renew_lease(lease, TTL) is None
    taken = store.acquire_lease("r1", "B", TTL)
    assert taken is not None
    assert store.renew_lease(lease, TTL) is None
    assert store.acquire_lease("r1", "C", TTL) is None  # B still holds it
    assert store.renew_lease(taken, TTL) == taken


def test_a_write_under_a_lease_taken_over_raises_lease_lost_and_changes_nothing(
    store: StateStore, clock: FakeClock
) -> None:
    """After a takeover, a save or a note carrying the old lease raises LeaseLost and the
    row and the trail stay as the new holder left them."""
    r = store.create(rotation(), "planned")
    stale = store.acquire_lease("r1", "A", TTL)
    assert stale is not None
    clock.advance(TTL + timedelta(seconds=1))
    current = store.acquire_lease("r1", "B", TTL)
    assert current is not None
    moved = replace(r, state=State.MAKE_ROOM)
    store.save(moved, "by B", from_state=State.PLANNED, lease=current)

    with pytest.raises(LeaseLost):
        store.save(replace(moved, state=State.CREATE), "by A", State.MAKE_ROOM, lease=stale)
    with pytest.raises(LeaseLost):
        store.save(replace(moved, attempts=9), "by A", lease=stale)
    with pytest.raises(LeaseLost):
        store.record("r1", State.MAKE_ROOM, "note by A", lease=stale)

    assert store.get("r1") == moved
    assert [e.reason for e in store.events("r1")] == ["planned", "by B"]


def test_a_write_under_an_expired_lease_raises_lease_lost_with_no_new_holder(
    store: StateStore, clock: FakeClock
) -> None:
    """A lease past its ttl on the store's clock authorises nothing, although nobody has
    taken it over: the holder may have stalled while another process read the row."""
    r = store.create(rotation(), "planned")
    lease = store.acquire_lease("r1", "A", TTL)
    assert lease is not None
    clock.advance(TTL)
    with pytest.raises(LeaseLost):
        store.save(replace(r, state=State.MAKE_ROOM), "late", State.PLANNED, lease=lease)
    assert store.get("r1") == r


def test_a_lease_needs_an_existing_rotation_and_a_positive_ttl(store: StateStore) -> None:
    """Acquiring a lease on an unknown rotation raises NotFound; a ttl of zero is refused."""
    with pytest.raises(NotFound):
        store.acquire_lease("ghost", "A", TTL)
    store.create(rotation(), "planned")
    with pytest.raises(ValueError, match="ttl"):
        store.acquire_lease("r1", "A", timedelta(0))


# --- scan leases -------------------------------------------------------------------------

OTHER_ACCOUNT = "444455556666"


def test_a_first_scan_lease_is_no_takeover_and_keeps_every_other_daemon_out(
    store: StateStore, clock: FakeClock
) -> None:
    """The first holder of an account's scan lease gets token 1, no takeover and no last
    scan, expiring ttl from now; while it lives another owner gets None, and the lease
    of another account is independent."""
    first = store.hold_scan_lease(ACCOUNT, "A", TTL)
    assert first is not None
    assert (first.owner, first.token, first.last_scan_at, first.taken_over) == ("A", 1, None, False)
    assert first.expires_at == T0 + TTL
    assert store.hold_scan_lease(ACCOUNT, "B", TTL) is None
    other = store.hold_scan_lease(OTHER_ACCOUNT, "B", TTL)
    assert other is not None
    assert other.owner == "B"


def test_the_holder_renews_its_scan_lease_keeping_the_token(
    store: StateStore, clock: FakeClock
) -> None:
    """A holder that renews before expiry keeps its token (no takeover), and the lease
    then runs ttl from the renewal: another owner is still kept out after the first ttl."""
    first = store.hold_scan_lease(ACCOUNT, "A", TTL)
    assert first is not None
    clock.advance(timedelta(seconds=20))
    again = store.hold_scan_lease(ACCOUNT, "A", TTL)
    assert again is not None
    assert (again.token, again.taken_over) == (first.token, False)
    assert again.expires_at == T0 + timedelta(seconds=20) + TTL
    clock.advance(timedelta(seconds=20))
    assert store.hold_scan_lease(ACCOUNT, "B", TTL) is None


def test_an_expired_scan_lease_is_taken_over_with_a_greater_token_and_its_last_scan(
    store: StateStore, clock: FakeClock
) -> None:
    """A daemon that stops renewing loses the account: once the ttl has passed another
    owner takes the lease with a greater token, `taken_over`, and the last scan time;
    the old holder is then kept out and its fenced `scan_finished` raises LeaseLost."""
    first = store.hold_scan_lease(ACCOUNT, "A", TTL)
    assert first is not None
    scanned = store.scan_finished(first)
    clock.advance(TTL)
    taken = store.hold_scan_lease(ACCOUNT, "B", TTL)
    assert taken is not None
    assert taken.token > first.token
    assert taken.taken_over is True
    assert taken.last_scan_at == scanned.last_scan_at == T0
    assert store.hold_scan_lease(ACCOUNT, "A", TTL) is None
    with pytest.raises(LeaseLost):
        store.scan_finished(first)
    assert store.scan_leases()[0].last_scan_at == T0


def test_scan_finished_records_the_store_time_only_under_a_live_lease(
    store: StateStore, clock: FakeClock
) -> None:
    """`scan_finished` under the live lease records now (the store's clock) for every
    daemon to read; under an expired lease, even with nobody else holding it, it raises
    LeaseLost and the last scan time stays."""
    lease = store.hold_scan_lease(ACCOUNT, "A", TTL)
    assert lease is not None
    clock.advance(timedelta(seconds=5))
    done = store.scan_finished(lease)
    assert done.last_scan_at == T0 + timedelta(seconds=5)
    assert done.last_scan_at.utcoffset() == timedelta(0)
    clock.advance(TTL)
    with pytest.raises(LeaseLost):
        store.scan_finished(lease)
    [row] = store.scan_leases()
    assert row.last_scan_at == T0 + timedelta(seconds=5)


def test_a_released_scan_lease_is_free_at_once_and_taking_it_is_no_takeover(
    store: StateStore,
) -> None:
    """Releasing (a daemon stopping) frees the account at once: the next owner gets a
    greater token and no takeover. Only the holder's release counts."""
    first = store.hold_scan_lease(ACCOUNT, "A", TTL)
    assert first is not None
    store.release_scan_lease(ACCOUNT, "B")
    assert store.hold_scan_lease(ACCOUNT, "B", TTL) is None
    store.release_scan_lease(ACCOUNT, "A")
    second = store.hold_scan_lease(ACCOUNT, "B", TTL)
    assert second is not None
    assert second.token > first.token
    assert second.taken_over is False


def test_scan_leases_lists_every_account_with_holder_expiry_and_last_scan(
    store: StateStore, clock: FakeClock
) -> None:
    """`scan_leases` shows each account's row ordered by account, expired ones too, with
    the holder, the expiry and the last scan; a released row has no owner."""
    assert store.scan_leases() == []
    a = store.hold_scan_lease(OTHER_ACCOUNT, "A", TTL)
    b = store.hold_scan_lease(ACCOUNT, "B", TTL)
    assert a is not None
    assert b is not None
    store.scan_finished(b)
    store.release_scan_lease(OTHER_ACCOUNT, "A")
    clock.advance(TTL * 2)
    rows = store.scan_leases()
    assert [(r.account_id, r.owner, r.last_scan_at) for r in rows] == [
        (ACCOUNT, "B", T0),
        (OTHER_ACCOUNT, "", None),
    ]
    assert rows[0].expires_at == T0 + TTL
    assert all(not r.taken_over for r in rows)


def test_a_scan_lease_needs_a_positive_ttl(store: StateStore) -> None:
    """A ttl of zero is refused and nothing is held."""
    with pytest.raises(ValueError, match="ttl"):
        store.hold_scan_lease(ACCOUNT, "A", timedelta(0))
    assert store.scan_leases() == []


# --- leak bookkeeping --------------------------------------------------------------------


def test_dead_letters_are_kept_once_per_message_and_bounded_oldest_first(
    store: StateStore, clock: FakeClock
) -> None:
    """A dead letter is kept once per (source, message id) with the store's time; past
    the cap the oldest go first."""
    store.add_dead_letter("sqs", "m-0", "not JSON", "{")
    store.add_dead_letter("sqs", "m-0", "again", "{")
    store.add_dead_letter("http", "m-0", "not JSON", "{")
    assert store.dead_letters() == [
        ("sqs", "m-0", T0, "not JSON"),
        ("http", "m-0", T0, "not JSON"),
    ]
    for i in range(1, MAX_DEAD_LETTERS + 1):
        clock.advance(timedelta(seconds=1))
        store.add_dead_letter("sqs", f"m-{i}", "not JSON", "{")

    kept = store.dead_letters()
    assert len(kept) == MAX_DEAD_LETTERS
    assert [m for s, m, _, _ in kept[:2]] == ["m-1", "m-2"]
    assert kept[-1][1:3] == (f"m-{MAX_DEAD_LETTERS}", T0 + timedelta(seconds=MAX_DEAD_LETTERS))


def test_a_leak_report_is_seen_once_added_and_adding_it_again_is_harmless(
    store: StateStore,
) -> None:
    """`leak_report_seen` is False until the (event, key) pair is added, True after; a
    replayed add changes nothing and other pairs stay unseen."""
    assert not store.leak_report_seen("ev-1", "AKIA1")
    store.add_leak_report("ev-1", "AKIA1", ACCOUNT, "alice", "contained")
    store.add_leak_report("ev-1", "AKIA1", ACCOUNT, "alice", "contained again")
    store.add_leak_report("ev-1", "AKIA2", ACCOUNT, None, "unknown key")
    assert store.leak_report_seen("ev-1", "AKIA1")
    assert store.leak_report_seen("ev-1", "AKIA2")
    assert not store.leak_report_seen("ev-2", "AKIA1")


def test_a_quarantine_first_sighting_is_kept_until_a_scan_no_longer_sees_it(
    store: StateStore,
) -> None:
    """The first time a scan saw a user's quarantine policy stays put across later scans,
    is per account, and is forgotten when a full scan no longer sees the policy: seen
    again later, it is a new leak with a new first sighting."""
    other = "444455556666"
    first, later = T0, T0 + timedelta(hours=3)
    store.note_quarantines(ACCOUNT, {"oz": ("AWSCompromisedKeyQuarantineV2", first)})
    store.note_quarantines(other, {"oz": ("AWSCompromisedKeyQuarantineV2", later)})
    store.note_quarantines(
        ACCOUNT,
        {
            "oz": ("AWSCompromisedKeyQuarantineV2", later),
            "eve": ("AWSCompromisedKeyQuarantineV3", later),
        },
    )
    assert store.quarantines(ACCOUNT) == {"oz": first, "eve": later}
    store.note_quarantines(ACCOUNT, {"eve": ("AWSCompromisedKeyQuarantineV3", later)})
    assert store.quarantines(ACCOUNT) == {"eve": later}
    store.note_quarantines(ACCOUNT, {"oz": ("AWSCompromisedKeyQuarantineV2", later)})
    assert store.quarantines(ACCOUNT) == {"oz": later}
    assert store.quarantines(other) == {"oz": later}
    assert store.quarantines("999999999999") == {}


# --- health ------------------------------------------------------------------------------


def test_check_passes_and_a_closed_store_refuses_every_call(store: StateStore) -> None:
    """`check` passes on a usable store; once closed (twice is harmless) every call
    raises BackendUnavailable."""
    store.create(rotation(), "planned")
    store.check()
    store.close()
    store.close()
    calls: list[Callable[[], object]] = [
        store.check,
        lambda: store.get("r1"),
        store.list_open,
        lambda: store.create(rotation("r2", user="bob"), "planned"),
        lambda: store.acquire_lease("r1", "A", TTL),
        store.dead_letters,
    ]
    for call in calls:
        with pytest.raises(BackendUnavailable):
            call()


# --- owner warnings ----------------------------------------------------------------------


def test_warning_stages_are_recorded_per_account_and_key_and_listed_for_the_keys_asked(
    store: StateStore,
) -> None:
    """`record_warning_stage` keeps each (account, key, stage) with its due moment;
    `warning_stages_sent` lists them for the keys asked only, per account, and leaves
    out keys never warned."""
    due = T0 + timedelta(days=5, microseconds=123456)
    store.record_warning_stage(ACCOUNT, "alice", "AKIA1", "7d", due)
    store.record_warning_stage(ACCOUNT, "alice", "AKIA1", "14d", due)
    store.record_warning_stage(ACCOUNT, "bob", "AKIA2", "1d", due)
    store.record_warning_stage("444455556666", "alice", "AKIA1", "1d", due)
    assert store.warning_stages_sent(ACCOUNT, ["AKIA1", "AKIA3"]) == {
        "AKIA1": {"7d": due, "14d": due}
    }
    assert store.warning_stages_sent(ACCOUNT, ["AKIA1", "AKIA2"]) == {
        "AKIA1": {"7d": due, "14d": due},
        "AKIA2": {"1d": due},
    }
    assert store.warning_stages_sent("444455556666", ["AKIA1"]) == {"AKIA1": {"1d": due}}
    assert store.warning_stages_sent("999999999999", ["AKIA1"]) == {}
    assert store.warning_stages_sent(ACCOUNT, []) == {}


def test_recording_a_warning_stage_again_is_harmless_and_a_new_due_moment_replaces_it(
    store: StateStore, clock: FakeClock
) -> None:
    """Recording the same stage twice leaves one record; recording it for another due
    moment (the key's deadline moved) keeps only the new one, in UTC."""
    due = T0 + timedelta(days=5)
    store.record_warning_stage(ACCOUNT, "alice", "AKIA1", "7d", due)
    clock.advance(timedelta(hours=1))
    store.record_warning_stage(ACCOUNT, "alice", "AKIA1", "7d", due)
    assert store.warning_stages_sent(ACCOUNT, ["AKIA1"]) == {"AKIA1": {"7d": due}}
    later = (T0 + timedelta(days=40)).astimezone(timezone(timedelta(hours=2)))
    store.record_warning_stage(ACCOUNT, "alice", "AKIA1", "7d", later)
    sent = store.warning_stages_sent(ACCOUNT, ["AKIA1"])
    assert sent == {"AKIA1": {"7d": later}}
    assert sent["AKIA1"]["7d"].utcoffset() == timedelta(0)
