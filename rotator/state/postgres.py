"""PostgreSQL state store: rotations, their event trail, and leases between daemons.

The store behind `rotator.ports.StateStore` when several daemons share the work through
one database, and the only module that imports psycopg. It keeps every guarantee of the
SQLite store (`rotator.state.sqlite`), by the database's own means:

- Durability: a write returns once its transaction has committed (with the server's
  `synchronous_commit`, the DBA's choice; the default waits for the WAL flush).
- Invariant 5 (one rotation in flight per user and kind) is enforced by the database: a
  partial unique index over (account_id, user_name, kind) for rows whose state is not
  terminal. Two daemons creating the same user's rotation of one kind at once cannot
  both succeed; `create` turns the loss into `RotationExists`. The index's comment
  records the columns and the terminal set it was built for, so a rotator whose index
  differs (an older one's, or terminal states that changed) rebuilds it on start.
- The event trail is append-only: triggers refuse UPDATE, DELETE and TRUNCATE on `events`.
- Leases are rows, taken and renewed with `SELECT ... FOR UPDATE` then a write, in one
  transaction: two daemons asking at once queue on the row lock, and the second sees what
  the first wrote. A row also records the holder's host, pid namespace and pid, so a
  lease left by a process that died on this host is taken over at once.
- Fencing: each lease carries a token that grows with every new holder; `save`, `record`
  and `scan_finished` given a lease lock its row, check that it is still the current one
  and unexpired, and write, all in one transaction; else `LeaseLost`, nothing written.
  Each event records the lease (owner, token) it was written under.
- Time: lease expiry and every time the store stamps (events, dead letters, leak
  reports, scans) come from the database's clock (`clock_timestamp()`, read after the
  row locks are held), so daemons on hosts whose clocks disagree still agree on who holds
  a lease. A `clock` given to the constructor replaces it (tests move time with it).
- The schema is versioned in `rotator_schema`; migrations run in order inside one
  transaction that first takes a transaction-scoped advisory lock, so daemons starting
  at once migrate one after the other. A database written by a newer rotator is refused.
- Errors are `rotator.errors`, never psycopg's: an unreachable server or a pool timeout
  is `BackendUnavailable` naming host, port and database (never the password); a
  serialization failure or a deadlock is `Transient`.

Safe behind PgBouncer in transaction pooling mode: each store operation is exactly one
transaction, and no state outlives it. There are no server-side prepared statements
(`prepare_threshold=None`), no `SET` (times are converted to UTC in Python instead of
setting the session's TimeZone), no `LISTEN`, no temporary tables and no session
advisory locks: a session lock would be taken on whichever server connection PgBouncer
lent for that transaction and stay there, held for nobody, after it was handed to
another client. Row locks and `pg_advisory_xact_lock` end with their transaction.
(Statement pooling is not safe: an operation is several statements in one transaction.)

A store holds a `psycopg_pool.ConnectionPool`, so one store may be shared by threads.
A connection is checked as it leaves the pool, and the pool reconnects in the
background: a store whose server went away works again by itself once it is back.
"""

from __future__ import annotations

import getpass
import math
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from rotator.errors import (
    BackendUnavailable,
    NotFound,
    RotatorError,
    StaleRotation,
    Transient,
)
from rotator.machine import State
from rotator.model import Event, Lease, Rotation, RotationKind, RotationReason, ScanLease
from rotator.ports import Clock
from rotator.state.shared import (
    CLOSED_WHERE,
    MAX_DEAD_LETTERS,
    OPEN_INDEX,
    OPEN_INDEX_COLUMNS,
    OPEN_INDEX_SQL,
    OPEN_WHERE,
    TERMINAL_VALUES,
    HeldLease,
    check_fence,
    grant_lease,
    pid_namespace,
    require_aware,
    require_positive_ttl,
    rotation_conflict,
)

__all__ = ["SCHEMA_VERSION", "PostgresStateStore"]

Cursor = psycopg.Cursor[TupleRow]

# What the index's comment says when it was built as today's code builds it: over these
# columns, for this terminal set. An index whose comment says anything else (an older
# rotator's, "terminal states: ..." over account and user only) is rebuilt on start.
_OPEN_INDEX_COMMENT: Final = (
    "columns: " + " ".join(OPEN_INDEX_COLUMNS) + "; terminal states: " + " ".join(TERMINAL_VALUES)
)

# Each migration is a sequence of statements, applied in order in one transaction.
# Append new migrations; never edit one that has shipped.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE rotations (
            id               text PRIMARY KEY,
            -- Insertion order: ties of created_at are broken by it, as SQLite's rowid.
            seq              bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
            account_id       text NOT NULL,
            user_name        text NOT NULL,
            reason           text NOT NULL,
            state            text NOT NULL,
            created_at       timestamptz NOT NULL,
            updated_at       timestamptz NOT NULL,
            old_key_id       text,
            new_key_id       text,
            leaked           boolean NOT NULL,
            note             text,
            intent_key_ids   text[],
            intent_at        timestamptz,
            intent_until     timestamptz,
            store_started_at timestamptz,
            stored_at        timestamptz,
            vault_version    bigint,
            verified_at      timestamptz,
            deactivated_at   timestamptz,
            overlap          interval,
            next_action_at   timestamptz,
            attempts         integer NOT NULL,
            last_error       text,
            waiting_on       text
        )
        """,
        "CREATE INDEX rotations_by_user ON rotations (account_id, user_name, created_at)",
        "CREATE INDEX rotations_by_created ON rotations (created_at)",
        """
        CREATE TABLE events (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            rotation_id text NOT NULL REFERENCES rotations (id),
            at          timestamptz NOT NULL,
            from_state  text,
            to_state    text NOT NULL,
            reason      text NOT NULL,
            -- The lease the write was made under; NULL for one that needs none.
            owner       text,
            token       bigint
        )
        """,
        "CREATE INDEX events_by_rotation ON events (rotation_id, id)",
        """
        CREATE FUNCTION rotator_events_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'events are append-only';
        END
        $$
        """,
        """
        CREATE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON events
        FOR EACH ROW EXECUTE FUNCTION rotator_events_append_only()
        """,
        """
        CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
        FOR EACH STATEMENT EXECUTE FUNCTION rotator_events_append_only()
        """,
        # Fencing: every acquisition of a rotation's lease by a new holder gets a greater
        # token; rows are kept on release so that the count never starts over.
        """
        CREATE TABLE leases (
            rotation_id text PRIMARY KEY REFERENCES rotations (id),
            owner       text NOT NULL,
            host        text NOT NULL,
            pid_ns      text NOT NULL,
            pid         integer NOT NULL,
            expires_at  timestamptz NOT NULL,
            token       bigint NOT NULL
        )
        """,
        # Who scans each account: daemons sharing a store make one scan per account per
        # period. Released leases keep their row (owner ''), token and last scan.
        """
        CREATE TABLE scan_leases (
            account_id   text PRIMARY KEY,
            owner        text NOT NULL,
            host         text NOT NULL,
            pid_ns       text NOT NULL,
            pid          integer NOT NULL,
            expires_at   timestamptz NOT NULL,
            token        bigint NOT NULL,
            last_scan_at timestamptz
        )
        """,
        # `check` commits a write here: only a committed write proves the server takes one
        # (a hot standby, a full disk or a read-only user answers reads all the same).
        """
        CREATE TABLE health (
            id         integer PRIMARY KEY CHECK (id = 1),
            checked_at timestamptz NOT NULL
        )
        """,
        # Leak events that could not be parsed: kept here, out of the queue's way, so that
        # nothing is retried forever and nothing is silently dropped.
        """
        CREATE TABLE dead_letters (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            source      text NOT NULL,
            message_id  text NOT NULL,
            received_at timestamptz NOT NULL,
            error       text NOT NULL,
            body        text NOT NULL,
            UNIQUE (source, message_id)
        )
        """,
        # Each key of each leak event, once: EventBridge delivers at least once, so a
        # replayed event must change nothing.
        """
        CREATE TABLE leak_reports (
            event_id    text NOT NULL,
            key_id      text NOT NULL,
            account_id  text NOT NULL,
            user_name   text,
            received_at timestamptz NOT NULL,
            result      text NOT NULL,
            PRIMARY KEY (event_id, key_id)
        )
        """,
        # When the rotator first saw each user's quarantine policy: only keys created
        # before it are suspect. The row goes when the policy is detached.
        """
        CREATE TABLE quarantines (
            account_id text NOT NULL,
            user_name  text NOT NULL,
            policy     text NOT NULL,
            first_seen timestamptz NOT NULL,
            PRIMARY KEY (account_id, user_name)
        )
        """,
    ),
    (
        # Each owner warning stage of each key, once per due moment: a daemon that
        # restarts, or another daemon sharing the store, does not warn again.
        """
        CREATE TABLE warning_stages (
            account_id text NOT NULL,
            key_id     text NOT NULL,
            stage      text NOT NULL,
            user_name  text NOT NULL,
            due_at     timestamptz NOT NULL,
            sent_at    timestamptz NOT NULL,
            PRIMARY KEY (account_id, key_id, stage)
        )
        """,
    ),
    (
        # What a rotation replaces: the user's access key (every row before this one) or
        # its console password. The one-open index then spans (account, user, kind): it
        # is rebuilt after the migrations, as its comment changed.
        "ALTER TABLE rotations ADD COLUMN kind text NOT NULL DEFAULT 'key'",
        "ALTER TABLE rotations ADD COLUMN create_login boolean NOT NULL DEFAULT false",
    ),
)

SCHEMA_VERSION: Final = len(_MIGRATIONS)
"""The highest `rotator_schema` version this code writes and understands."""

# The key of the transaction-scoped advisory lock that serializes migrations ("rotator"
# in ASCII): daemons starting at once on an empty database migrate one at a time.
_MIGRATION_LOCK: Final = 0x726F7461746F72

_COLUMNS: Final = (
    "id",
    "account_id",
    "user_name",
    "reason",
    "state",
    "created_at",
    "updated_at",
    "old_key_id",
    "new_key_id",
    "leaked",
    "note",
    "intent_key_ids",
    "intent_at",
    "intent_until",
    "store_started_at",
    "stored_at",
    "vault_version",
    "verified_at",
    "deactivated_at",
    "overlap",
    "next_action_at",
    "attempts",
    "last_error",
    "waiting_on",
    "kind",
    "create_login",
)
# An empty Python list has no element type to send: the column's type is spelt out.
_PARAMS: Final = {c: f"%({c})s::text[]" if c == "intent_key_ids" else f"%({c})s" for c in _COLUMNS}
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM rotations"  # noqa: S608 - fixed names
# ON CONFLICT DO NOTHING covers the primary key and the one-open index alike: a refused
# insert returns no row and leaves the transaction usable, to say which one refused it.
_INSERT: Final = (
    f"INSERT INTO rotations ({', '.join(_COLUMNS)}) "  # noqa: S608 - fixed names
    f"VALUES ({', '.join(_PARAMS.values())}) ON CONFLICT DO NOTHING RETURNING id"
)
_UPDATE: Final = (
    "UPDATE rotations SET "  # noqa: S608 - fixed names
    + ", ".join(f"{c} = {p}" for c, p in _PARAMS.items() if c != "id")
    + " WHERE id = %(id)s"
)
_USER_FILTER: Final = "(%(user)s::text IS NULL OR user_name = %(user)s::text)"
_RECENT: Final = (
    f"(SELECT {', '.join(_COLUMNS)}, seq FROM rotations "  # noqa: S608 - fixed text
    f"WHERE {OPEN_WHERE} AND {_USER_FILTER}) "
    f"UNION ALL "
    f"(SELECT {', '.join(_COLUMNS)}, seq FROM rotations "
    f"WHERE {CLOSED_WHERE} AND {_USER_FILTER} "
    f"ORDER BY created_at DESC, seq DESC LIMIT %(limit)s) "
    f"ORDER BY created_at DESC, seq DESC"
)

# The lease tables share their lease columns; `key` names the row (a rotation, an account).
_LEASE_TABLES: Final = {"leases": "rotation_id", "scan_leases": "account_id"}


def _lease_sql(table: str) -> tuple[str, str, str]:
    """The lock, insert and update statements of one lease table (fixed names only)."""
    key = _LEASE_TABLES[table]
    extra = ", last_scan_at" if table == "scan_leases" else ", NULL"
    lock = (
        f"SELECT owner, host, pid_ns, pid, expires_at, token{extra} "  # noqa: S608 - fixed names
        f"FROM {table} WHERE {key} = %(key)s FOR UPDATE"
    )
    insert = (
        f"INSERT INTO {table} ({key}, owner, host, pid_ns, pid, expires_at, token) "  # noqa: S608
        f"VALUES (%(key)s, %(owner)s, %(host)s, %(pid_ns)s, %(pid)s, %(expires_at)s, 1) "
        f"ON CONFLICT ({key}) DO NOTHING RETURNING token"
    )
    update = (
        f"UPDATE {table} SET owner = %(owner)s, host = %(host)s, "  # noqa: S608 - fixed names
        f"pid_ns = %(pid_ns)s, pid = %(pid)s, expires_at = %(expires_at)s, "
        f"token = %(token)s WHERE {key} = %(key)s"
    )
    return lock, insert, update


@dataclass(frozen=True)
class _Taken:
    """What an acquisition wrote."""

    token: int
    expires_at: datetime
    # The account's last scan as the row held it (None: the first holder, or a
    # rotation's lease).
    last_scan_at: datetime | None
    # Taken from another owner that had neither released the lease nor renewed it in
    # time; a released lease has no owner (""), and taking it is no takeover.
    taken_over: bool


class PostgresStateStore:
    """`StateStore` on one PostgreSQL database. See the module docstring for the
    guarantees."""

    def __init__(
        self,
        url: str,
        *,
        clock: Clock | None = None,
        connect_timeout: float = 5.0,
        pool_size: int = 4,
    ) -> None:
        """Connect to the database at `url` (a libpq URL or conninfo string; the password
        may come from it, `PGPASSWORD` or a libpq password file) and bring its schema up to
        date. Raises `BackendUnavailable` when the server cannot be reached.

        `clock` replaces the database's clock (tests); `connect_timeout` (seconds) bounds
        a connection attempt and the wait for a pooled connection; `pool_size` is the
        most connections the store opens at once.
        """
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be positive, not {connect_timeout}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, not {pool_size}")
        params = _parse_url(url)
        self._where = _describe(params)
        self._secrets = [s for s in (params.get("password"), os.environ.get("PGPASSWORD")) if s]
        self._clock: Callable[[], datetime] | None = clock
        self._timeout = connect_timeout
        self._host = socket.gethostname()
        self._pid_ns = pid_namespace()
        self._closed = False
        self._close_lock = threading.Lock()
        # libpq's connect_timeout is whole seconds, and at least 2.
        defaults = {
            "connect_timeout": str(max(2, math.ceil(connect_timeout))),
            "application_name": "rotator",
        }
        conninfo = make_conninfo(url, **{k: v for k, v in defaults.items() if k not in params})
        # autocommit: every operation opens its own transaction (`conn.transaction()`);
        # prepare_threshold=None: no server-side prepared statement, which PgBouncer in
        # transaction mode would lose between transactions.
        kwargs: dict[str, Any] = {"autocommit": True, "prepare_threshold": None}
        # The first connection is made directly, not through the pool: a wrong password
        # or a missing database is reported as libpq words it, not as a pool timeout.
        try:
            with psycopg.connect(conninfo, **kwargs) as conn:
                self._migrate(conn)
        except psycopg.Error as exc:
            raise self._translate(exc, "open") from exc
        self._pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
            conninfo,
            kwargs=kwargs,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=connect_timeout,
            # A connection is tried as it leaves the pool: one the server dropped (a
            # restart) is replaced instead of failing the operation that drew it.
            check=ConnectionPool.check_connection,
            # A connection lost while the server is away is retried in the background
            # with a backoff that doubles up to this long, then given up; the next
            # operation then asks for a new one at once. Left at the pool's default (5
            # minutes), a store could wait minutes more for a server that is back.
            reconnect_timeout=connect_timeout,
            name="rotator-state",
        )
        self._pool.open(wait=False)

    def __repr__(self) -> str:
        return f"PostgresStateStore({self._where})"

    # --- StateStore ---------------------------------------------------------------

    def create(self, rotation: Rotation, reason: str) -> Rotation:
        row = _encode(rotation)
        with self._transaction("create") as cur:
            if cur.execute(_INSERT, row).fetchone() is None:
                raise self._conflict(cur, rotation)
            self._append_event(cur, rotation.id, None, rotation.state, reason)
            stored = self._select_one(cur, rotation.id)
        assert stored is not None  # inserted in this very transaction
        return stored

    def get(self, rotation_id: str) -> Rotation | None:
        with self._transaction("get") as cur:
            return self._select_one(cur, rotation_id)

    def open_for(
        self, account_id: str, user_name: str, kind: RotationKind = RotationKind.KEY
    ) -> Rotation | None:
        sql = f"{_SELECT} WHERE account_id = %s AND user_name = %s AND kind = %s AND {OPEN_WHERE}"
        with self._transaction("open_for") as cur:
            row = cur.execute(sql, (account_id, user_name, RotationKind(kind).value)).fetchone()
        return None if row is None else _decode(row)

    def latest_for(
        self, account_id: str, user_name: str, kind: RotationKind = RotationKind.KEY
    ) -> Rotation | None:
        sql = (
            f"{_SELECT} WHERE account_id = %s AND user_name = %s AND kind = %s "
            "ORDER BY created_at DESC, seq DESC LIMIT 1"
        )
        with self._transaction("latest_for") as cur:
            row = cur.execute(sql, (account_id, user_name, RotationKind(kind).value)).fetchone()
        return None if row is None else _decode(row)

    def list_open(self) -> list[Rotation]:
        """Every open rotation, oldest first."""
        sql = f"{_SELECT} WHERE {OPEN_WHERE} ORDER BY created_at, seq"
        with self._transaction("list_open") as cur:
            rows = cur.execute(sql).fetchall()
        return [_decode(r) for r in rows]

    def list_recent(self, limit: int = 50, user_name: str | None = None) -> list[Rotation]:
        """Every open rotation plus at most `limit` of the newest closed ones, newest
        `created_at` first. Open rotations are never cut by `limit`."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        with self._transaction("list_recent") as cur:
            rows = cur.execute(_RECENT, {"user": user_name, "limit": limit}).fetchall()
        return [_decode(r) for r in rows]

    def add_dead_letter(self, source: str, message_id: str, error: str, body: str) -> None:
        """Keep an event that could not be parsed (idempotent per source and message id)."""
        with self._transaction("add_dead_letter") as cur:
            # Writers of dead letters take turns, so that the cap holds exactly and ids
            # follow the order of arrival (the oldest go first). They are rare.
            cur.execute("LOCK TABLE dead_letters IN SHARE ROW EXCLUSIVE MODE")
            cur.execute(
                "INSERT INTO dead_letters (source, message_id, received_at, error, body) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (source, message_id) DO NOTHING",
                (source, message_id, self._now(cur), error, body),
            )
            cur.execute(
                "DELETE FROM dead_letters WHERE id <= "
                "(SELECT id FROM dead_letters ORDER BY id DESC LIMIT 1 OFFSET %s)",
                (MAX_DEAD_LETTERS,),
            )

    def dead_letters(self) -> list[tuple[str, str, datetime, str]]:
        """(source, message id, received at, error) of every kept event, oldest first."""
        with self._transaction("dead_letters") as cur:
            rows = cur.execute(
                "SELECT source, message_id, received_at, error FROM dead_letters ORDER BY id"
            ).fetchall()
        return [(str(r[0]), str(r[1]), _utc(r[2]), str(r[3])) for r in rows]

    def leak_report_seen(self, event_id: str, key_id: str) -> bool:
        """Whether this key of this event was handled already."""
        with self._transaction("leak_report_seen") as cur:
            row = cur.execute(
                "SELECT 1 FROM leak_reports WHERE event_id = %s AND key_id = %s",
                (event_id, key_id),
            ).fetchone()
        return row is not None

    def add_leak_report(
        self, event_id: str, key_id: str, account_id: str, user_name: str | None, result: str
    ) -> None:
        """Record that this key of this event was handled (idempotent)."""
        with self._transaction("add_leak_report") as cur:
            cur.execute(
                "INSERT INTO leak_reports "
                "(event_id, key_id, account_id, user_name, received_at, result) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (event_id, key_id) DO NOTHING",
                (event_id, key_id, account_id, user_name, self._now(cur), result),
            )

    def warning_stages_sent(
        self, account_id: str, key_ids: Iterable[str]
    ) -> dict[str, dict[str, datetime]]:
        """Key id -> {stage: due moment} of the owner warnings already sent."""
        wanted = sorted(set(key_ids))
        with self._transaction("warning_stages_sent") as cur:
            rows = cur.execute(
                "SELECT key_id, stage, due_at FROM warning_stages "
                "WHERE account_id = %s AND key_id = ANY(%s)",
                (account_id, wanted),
            ).fetchall()
        out: dict[str, dict[str, datetime]] = {}
        for key_id, stage, due in rows:
            out.setdefault(str(key_id), {})[str(stage)] = _utc(due)
        return out

    def record_warning_stage(
        self, account_id: str, user_name: str, key_id: str, stage: str, due_at: datetime
    ) -> None:
        """Record an owner warning stage of a key (idempotent; a new due moment replaces
        the old one)."""
        with self._transaction("record_warning_stage") as cur:
            cur.execute(
                "INSERT INTO warning_stages "
                "(account_id, key_id, stage, user_name, due_at, sent_at) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (account_id, key_id, stage) "
                "DO UPDATE SET due_at = excluded.due_at, sent_at = excluded.sent_at "
                "WHERE warning_stages.due_at <> excluded.due_at",
                (account_id, key_id, stage, user_name, require_aware(due_at), self._now(cur)),
            )

    def quarantines(self, account_id: str) -> dict[str, datetime]:
        """User -> when the rotator first saw its quarantine policy attached."""
        with self._transaction("quarantines") as cur:
            rows = cur.execute(
                "SELECT user_name, first_seen FROM quarantines WHERE account_id = %s",
                (account_id,),
            ).fetchall()
        return {str(r[0]): _utc(r[1]) for r in rows}

    def note_quarantines(self, account_id: str, seen: Mapping[str, tuple[str, datetime]]) -> None:
        """A full scan of the account saw exactly these users quarantined (user ->
        (policy, first seen)): keep the earliest first sighting of each, and forget
        users whose policy was detached (a later one is a new leak)."""
        users = list(seen)
        policies = [seen[u][0] for u in users]
        first_seen = [require_aware(seen[u][1]) for u in users]
        with self._transaction("note_quarantines") as cur:
            cur.execute(
                "DELETE FROM quarantines WHERE account_id = %s AND NOT user_name = ANY(%s::text[])",
                (account_id, users),
            )
            cur.execute(
                "INSERT INTO quarantines (account_id, user_name, policy, first_seen) "
                "SELECT %s, u, p, f FROM unnest(%s::text[], %s::text[], %s::timestamptz[]) "
                "AS seen (u, p, f) ON CONFLICT (account_id, user_name) DO NOTHING",
                (account_id, users, policies, first_seen),
            )

    def replacement_key_ids(self, account_id: str) -> set[str]:
        """Keys issued to replace a contained leak (rotations that did not fail)."""
        sql = (
            "SELECT new_key_id FROM rotations WHERE account_id = %s AND leaked "
            "AND new_key_id IS NOT NULL AND state NOT IN ('FAILED', 'CANCELLED')"
        )
        with self._transaction("replacement_key_ids") as cur:
            rows = cur.execute(sql, (account_id,)).fetchall()
        return {str(r[0]) for r in rows}

    def save(
        self,
        rotation: Rotation,
        reason: str,
        from_state: State | None = None,
        *,
        lease: Lease | None = None,
    ) -> None:
        row = _encode(rotation)
        with self._transaction("save") as cur:
            # Locks in one order everywhere (the lease row, then the rotation's), so two
            # writers never wait for each other in a circle.
            if lease is not None:
                self._fence(cur, rotation.id, lease)
            # NO KEY UPDATE: the row is ours until commit, yet events may still be
            # appended to it (their foreign key takes only a KEY SHARE lock).
            current = cur.execute(
                "SELECT state FROM rotations WHERE id = %s FOR NO KEY UPDATE", (rotation.id,)
            ).fetchone()
            if current is None:
                raise NotFound(f"rotation {rotation.id} not found")
            if from_state is not None and current[0] != from_state.value:
                # Someone else moved it on meanwhile (a lease that ran out): never
                # overwrite their progress with ours.
                raise StaleRotation(f"rotation {rotation.id} is in {current[0]}, not {from_state}")
            try:
                # A savepoint: moving a closed rotation back to an open state while
                # another is open breaks the one-open index, and the transaction must
                # stay usable to name that other rotation.
                with cur.connection.transaction():
                    cur.execute(_UPDATE, row)
            except pg_errors.UniqueViolation as exc:
                raise self._conflict(cur, rotation) from exc
            if from_state is not None and from_state != rotation.state:
                self._append_event(cur, rotation.id, from_state, rotation.state, reason, lease)

    def record(
        self, rotation_id: str, state: State, reason: str, *, lease: Lease | None = None
    ) -> None:
        """Append a note to the trail of a rotation that stays in `state` (e.g. "consumers
        still use the old key"): an event whose from and to states are both `state`."""
        with self._transaction("record") as cur:
            self._require(cur, rotation_id)
            if lease is not None:
                self._fence(cur, rotation_id, lease)
            self._append_event(cur, rotation_id, state, state, reason, lease)

    def events(self, rotation_id: str) -> list[Event]:
        """The rotation's events in the order they were recorded."""
        sql = (
            "SELECT rotation_id, at, from_state, to_state, reason, owner, token FROM events "
            "WHERE rotation_id = %s ORDER BY id"
        )
        with self._transaction("events") as cur:
            rows = cur.execute(sql, (rotation_id,)).fetchall()
        return [
            Event(
                rotation_id=str(r[0]),
                at=_utc(r[1]),
                from_state=None if r[2] is None else State(r[2]),
                to_state=State(r[3]),
                reason=str(r[4]),
                owner=_opt_str(r[5]),
                token=None if r[6] is None else int(r[6]),
            )
            for r in rows
        ]

    def acquire_lease(self, rotation_id: str, owner: str, ttl: timedelta) -> Lease | None:
        """Take the lease when it is free, expired, already `owner`'s (renewal), or held by
        a process on this host that no longer exists; None otherwise. Only a renewal of
        an unexpired lease keeps the token: anything else fences off earlier holders."""
        require_positive_ttl(ttl)
        with self._transaction("acquire_lease") as cur:
            self._require(cur, rotation_id)
            taken = self._take(cur, "leases", rotation_id, owner, ttl)
        if taken is None:
            return None
        return Lease(rotation_id, owner, taken.token, taken.taken_over)

    def renew_lease(self, lease: Lease, ttl: timedelta) -> Lease | None:
        """Extend `lease` by `ttl` from now while it is still the current, unexpired one;
        None otherwise (and nothing changes: a holder that lost its lease never takes
        the rotation back this way)."""
        require_positive_ttl(ttl)
        with self._transaction("renew_lease") as cur:
            lock, _, _ = _LEASE_SQL["leases"]
            row = cur.execute(lock, {"key": lease.rotation_id}).fetchone()
            now = self._now(cur)
            if row is None:
                return None
            held = _held(row)
            if held.owner != lease.owner or held.token != lease.token or held.expires_at <= now:
                return None
            cur.execute(
                "UPDATE leases SET expires_at = %s WHERE rotation_id = %s",
                (now + ttl, lease.rotation_id),
            )
        return lease

    def release_lease(self, rotation_id: str, owner: str) -> None:
        """End the lease now if `owner` holds it; a no-op otherwise. The row stays, with
        its token, so that the next holder's token is greater still, and with no owner
        (""), so that taking it next is no takeover."""
        with self._transaction("release_lease") as cur:
            cur.execute(
                "UPDATE leases SET owner = '', expires_at = %s "
                "WHERE rotation_id = %s AND owner = %s",
                (self._now(cur), rotation_id, owner),
            )

    def hold_scan_lease(self, account_id: str, owner: str, ttl: timedelta) -> ScanLease | None:
        """Take or renew an account's scan lease, on the rules of `acquire_lease`."""
        require_positive_ttl(ttl)
        with self._transaction("hold_scan_lease") as cur:
            taken = self._take(cur, "scan_leases", account_id, owner, ttl)
        if taken is None:
            return None
        return ScanLease(
            account_id, owner, taken.token, taken.expires_at, taken.last_scan_at, taken.taken_over
        )

    def scan_finished(self, lease: ScanLease) -> ScanLease:
        """Record the end of a scan, fenced by `lease` (raises `LeaseLost` otherwise)."""
        with self._transaction("scan_finished") as cur:
            lock, _, _ = _LEASE_SQL["scan_leases"]
            row = cur.execute(lock, {"key": lease.account_id}).fetchone()
            now = self._now(cur)
            held = None if row is None else _held(row)
            check_fence(f"scan of {lease.account_id}", lease, held, now)
            cur.execute(
                "UPDATE scan_leases SET last_scan_at = %s WHERE account_id = %s",
                (now, lease.account_id),
            )
        return replace(lease, last_scan_at=now)

    def release_scan_lease(self, account_id: str, owner: str) -> None:
        """End the account's scan lease now if `owner` holds it; a no-op otherwise. The
        row stays, without owner, with its token and last scan."""
        with self._transaction("release_scan_lease") as cur:
            cur.execute(
                "UPDATE scan_leases SET owner = '', expires_at = %s "
                "WHERE account_id = %s AND owner = %s",
                (self._now(cur), account_id, owner),
            )

    def scan_leases(self) -> list[ScanLease]:
        """Every account's scan lease as stored (expired ones too), by account id."""
        with self._transaction("scan_leases") as cur:
            rows = cur.execute(
                "SELECT account_id, owner, token, expires_at, last_scan_at "
                "FROM scan_leases ORDER BY account_id"
            ).fetchall()
        return [
            ScanLease(str(r[0]), str(r[1]), int(r[2]), _utc(r[3]), _opt_utc(r[4])) for r in rows
        ]

    def check(self) -> None:
        """Commit a small write; raise `BackendUnavailable` naming the database if it fails.

        A read would pass on a hot standby, a full disk or a user that may only read."""
        try:
            with self._transaction("check") as cur:
                cur.execute(
                    "INSERT INTO health (id, checked_at) VALUES (1, %s) "
                    "ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                    (self._now(cur),),
                )
        except BackendUnavailable:
            raise
        except RotatorError as exc:
            raise BackendUnavailable(f"state store {self._where} is not writable: {exc}") from exc

    def close(self) -> None:
        """Close the pool and its connections; later calls raise `BackendUnavailable`.
        Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close()

    # --- internals ----------------------------------------------------------------

    @contextmanager
    def _transaction(self, doing: str) -> Iterator[Cursor]:
        """One transaction on a pooled connection: committed when the block ends, rolled
        back when it raises. psycopg's errors leave as `rotator.errors`."""
        if self._closed:
            raise BackendUnavailable(f"state store {self._where} is closed")
        try:
            with (
                self._pool.connection() as conn,
                conn.transaction(),
                conn.cursor() as cur,
            ):
                yield cur
        except (psycopg.Error, PoolTimeout, PoolClosed) as exc:
            raise self._translate(exc, doing) from exc

    def _translate(self, exc: Exception, doing: str) -> RotatorError:
        if isinstance(exc, PoolClosed) or (self._closed and isinstance(exc, PoolTimeout)):
            return BackendUnavailable(f"state store {self._where} is closed")
        if isinstance(exc, PoolTimeout):
            return BackendUnavailable(
                f"state store {self._where}: {doing} failed: no connection within "
                f"{self._timeout:g} s (the server is down or unreachable, or all "
                f"{self._pool.max_size} of this store's connections stayed busy)"
            )
        text = f"state store {self._where}: {doing} failed: {self._scrub(_message(exc))}"
        if isinstance(exc, _TRANSIENT):
            return Transient(text)
        if isinstance(exc, _UNAVAILABLE):
            return BackendUnavailable(text)
        return RotatorError(text)

    def _scrub(self, text: str) -> str:
        """Belt and braces: libpq names no password, but nothing we raise may carry one.
        (A password of a few characters would blank out ordinary words: it stays.)"""
        for secret in self._secrets:
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    def _now(self, cur: Cursor) -> datetime:
        """The store's time now: the injected clock, else the database's. Read after the
        transaction's row locks are held, so a wait for a lock cannot make it stale."""
        if self._clock is not None:
            return require_aware(self._clock())
        row = cur.execute("SELECT clock_timestamp()").fetchone()
        assert row is not None
        return _utc(row[0])

    def _migrate(self, conn: psycopg.Connection[TupleRow]) -> None:
        with conn.transaction(), conn.cursor() as cur:
            if self._schema_current(cur):
                return
        with conn.transaction(), conn.cursor() as cur:
            # Transaction-scoped: released at commit, so it is safe behind PgBouncer.
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS rotator_schema ("
                "version integer PRIMARY KEY, applied_at timestamptz NOT NULL)"
            )
            version = self._version(cur)  # again: another daemon may have migrated
            for number, statements in enumerate(_MIGRATIONS[version:], start=version + 1):
                for sql in statements:
                    cur.execute(sql)
                cur.execute(
                    "INSERT INTO rotator_schema (version, applied_at) VALUES (%s, %s)",
                    (number, self._now(cur)),
                )
            if self._index_comment(cur) != _OPEN_INDEX_COMMENT:
                # The terminal set in `machine`, or the indexed columns, changed since the
                # index was built.
                cur.execute(f"DROP INDEX IF EXISTS {OPEN_INDEX}")
                try:
                    with conn.transaction():
                        cur.execute(OPEN_INDEX_SQL)
                except pg_errors.UniqueViolation as exc:
                    raise RotatorError(
                        f"state store {self._where}: a user has two rotations that are open "
                        f"under the current terminal states; close one first"
                    ) from exc
                cur.execute(f"COMMENT ON INDEX {OPEN_INDEX} IS '{_OPEN_INDEX_COMMENT}'")

    def _schema_current(self, cur: Cursor) -> bool:
        return self._version(cur) == SCHEMA_VERSION and (
            self._index_comment(cur) == _OPEN_INDEX_COMMENT
        )

    def _version(self, cur: Cursor) -> int:
        row = cur.execute("SELECT to_regclass('rotator_schema') IS NOT NULL").fetchone()
        if row is None or not row[0]:
            return 0
        row = cur.execute("SELECT coalesce(max(version), 0) FROM rotator_schema").fetchone()
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise RotatorError(
                f"state store {self._where} has schema version {version}, newer than this "
                f"rotator understands ({SCHEMA_VERSION}); upgrade rotator"
            )
        return version

    @staticmethod
    def _index_comment(cur: Cursor) -> str | None:
        row = cur.execute(
            "SELECT obj_description(to_regclass(%s), 'pg_class')", (OPEN_INDEX,)
        ).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def _conflict(self, cur: Cursor, rotation: Rotation) -> RotatorError:
        """Name the constraint an insert or update of `rotation` broke: the one-open-
        rotation index (another open rotation of the same kind for the user exists) or
        the primary key."""
        row = cur.execute(
            f"SELECT id FROM rotations WHERE account_id = %s AND user_name = %s "  # noqa: S608
            f"AND kind = %s AND {OPEN_WHERE} AND id != %s",
            (
                rotation.account_id,
                rotation.user_name,
                RotationKind(rotation.kind).value,
                rotation.id,
            ),
        ).fetchone()
        return rotation_conflict(rotation, None if row is None else row[0])

    def _take(self, cur: Cursor, table: str, key: str, owner: str, ttl: timedelta) -> _Taken | None:
        """Take or renew the lease row `key` of `table` for `owner`, inside the caller's
        transaction; None when another live owner holds it."""
        lock, insert, update = _LEASE_SQL[table]
        me: dict[str, object] = {
            "key": key,
            "owner": owner,
            "host": self._host,
            "pid_ns": self._pid_ns,
            "pid": os.getpid(),
        }
        row = cur.execute(lock, {"key": key}).fetchone()
        if row is None:
            expires_at = self._now(cur) + ttl
            # Another daemon may be inserting the first row right now: ours then waits for
            # its commit and does nothing, and the row it wrote is judged below.
            if cur.execute(insert, {**me, "expires_at": expires_at}).fetchone() is not None:
                return _Taken(1, expires_at, None, taken_over=False)
            row = cur.execute(lock, {"key": key}).fetchone()
            assert row is not None  # rows are never deleted
        now = self._now(cur)
        grant = grant_lease(_held(row), owner, now, host=self._host, pid_ns=self._pid_ns)
        if grant is None:
            return None
        token, taken_over = grant
        cur.execute(update, {**me, "expires_at": now + ttl, "token": token})
        return _Taken(token, now + ttl, _opt_utc(row[6]), taken_over)

    def _fence(self, cur: Cursor, rotation_id: str, lease: Lease) -> None:
        """Raise `LeaseLost` unless `lease` is the rotation's current, unexpired lease.
        Runs inside the write transaction and keeps the lease row locked until it ends,
        so no takeover can commit between the check and the write."""
        if lease.rotation_id != rotation_id:
            raise ValueError(f"lease of {lease.rotation_id} used to write {rotation_id}")
        lock, _, _ = _LEASE_SQL["leases"]
        row = cur.execute(lock, {"key": rotation_id}).fetchone()
        now = self._now(cur)
        check_fence(f"rotation {rotation_id}", lease, None if row is None else _held(row), now)

    @staticmethod
    def _require(cur: Cursor, rotation_id: str) -> None:
        if cur.execute("SELECT 1 FROM rotations WHERE id = %s", (rotation_id,)).fetchone() is None:
            raise NotFound(f"rotation {rotation_id} not found")

    @staticmethod
    def _select_one(cur: Cursor, rotation_id: str) -> Rotation | None:
        row = cur.execute(f"{_SELECT} WHERE id = %s", (rotation_id,)).fetchone()
        return None if row is None else _decode(row)

    def _append_event(
        self,
        cur: Cursor,
        rotation_id: str,
        from_state: State | None,
        to_state: State,
        reason: str,
        lease: Lease | None = None,
    ) -> None:
        cur.execute(
            "INSERT INTO events (rotation_id, at, from_state, to_state, reason, owner, token) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                rotation_id,
                self._now(cur),
                None if from_state is None else from_state.value,
                to_state.value,
                reason,
                None if lease is None else lease.owner,
                None if lease is None else lease.token,
            ),
        )


_LEASE_SQL: Final = {table: _lease_sql(table) for table in _LEASE_TABLES}

# Worth retrying as they are: the transaction lost a race and was rolled back whole.
_TRANSIENT: Final = (
    pg_errors.SerializationFailure,
    pg_errors.DeadlockDetected,
    pg_errors.LockNotAvailable,
    pg_errors.QueryCanceled,
)
# The server cannot take this operation now (gone, restarting, out of connections or
# disk, or a read-only standby), as opposed to a bug or a refusal.
_UNAVAILABLE: Final = (
    psycopg.OperationalError,
    pg_errors.ReadOnlySqlTransaction,
)


# --- the connection URL --------------------------------------------------------------


def _parse_url(url: str) -> dict[str, str]:
    """libpq's reading of `url`. A malformed one is refused without being quoted: libpq's
    own message may repeat the part that holds the password."""
    try:
        params: dict[str, object] | None = dict(conninfo_to_dict(url))
    except psycopg.Error:
        params = None
    if params is None:
        # Raised out here, so that libpq's error is not even this one's context.
        raise RotatorError(
            "state store URL is not a valid PostgreSQL URL (postgresql://user@host:5432/database)"
        )
    return {k: str(v) for k, v in params.items() if v is not None}


def _describe(params: Mapping[str, str]) -> str:
    """`postgresql://user@host:port/database` as libpq will connect, with the defaults
    it takes from the environment; never the password."""
    env = os.environ
    user = params.get("user") or env.get("PGUSER") or _local_user()
    host = params.get("host") or params.get("hostaddr") or env.get("PGHOST") or "localhost"
    port = params.get("port") or env.get("PGPORT") or "5432"
    database = params.get("dbname") or env.get("PGDATABASE") or user
    return f"postgresql://{user}@{host}:{port}/{database}"


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "?"


def _message(exc: Exception) -> str:
    """An error's text on one line: the server's own message without the statement it
    quotes, or libpq's without the hints that follow on lines of their own."""
    text = exc.diag.message_primary if isinstance(exc, psycopg.Error) else None
    return " ".join((text or str(exc)).split()) or type(exc).__name__


# --- rows ----------------------------------------------------------------------------


def _opt_aware(value: datetime | None) -> datetime | None:
    return None if value is None else require_aware(value)


def _utc(value: object) -> datetime:
    """A timestamptz as read (in the session's time zone, whatever the server's default)
    as the same instant in UTC."""
    if not isinstance(value, datetime):
        raise RotatorError(f"state store row holds {value!r} where a time belongs")
    return value.astimezone(UTC)


def _opt_utc(value: object) -> datetime | None:
    return None if value is None else _utc(value)


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _held(row: Sequence[Any]) -> HeldLease:
    """A lease row as locked: (owner, host, pid_ns, pid, expires_at, token, ...)."""
    return HeldLease(
        owner=str(row[0]),
        host=str(row[1]),
        pid_ns=str(row[2]),
        pid=int(row[3]),
        expires_at=_utc(row[4]),
        token=int(row[5]),
    )


def _encode(r: Rotation) -> dict[str, object]:
    row: dict[str, object] = {
        "id": r.id,
        "account_id": r.account_id,
        "user_name": r.user_name,
        "reason": r.reason.value,
        "state": r.state.value,
        "created_at": require_aware(r.created_at),
        "updated_at": require_aware(r.updated_at),
        "old_key_id": r.old_key_id,
        "new_key_id": r.new_key_id,
        "leaked": r.leaked,
        "note": r.note,
        "intent_key_ids": None if r.intent_key_ids is None else list(r.intent_key_ids),
        "intent_at": _opt_aware(r.intent_at),
        "intent_until": _opt_aware(r.intent_until),
        "store_started_at": _opt_aware(r.store_started_at),
        "stored_at": _opt_aware(r.stored_at),
        "vault_version": r.vault_version,
        "verified_at": _opt_aware(r.verified_at),
        "deactivated_at": _opt_aware(r.deactivated_at),
        "overlap": r.overlap,
        "next_action_at": _opt_aware(r.next_action_at),
        "attempts": r.attempts,
        "last_error": r.last_error,
        "waiting_on": r.waiting_on,
        "kind": RotationKind(r.kind).value,
        "create_login": r.create_login,
    }
    assert tuple(row) == _COLUMNS
    return row


def _decode(values: Sequence[Any]) -> Rotation:
    # `values` may carry extra trailing columns (list_recent's sort key): zip stops early.
    row: Mapping[str, Any] = dict(zip(_COLUMNS, values, strict=False))
    intent = row["intent_key_ids"]
    overlap = row["overlap"]
    vault_version = row["vault_version"]
    return Rotation(
        id=str(row["id"]),
        account_id=str(row["account_id"]),
        user_name=str(row["user_name"]),
        reason=RotationReason(str(row["reason"])),
        state=State(str(row["state"])),
        created_at=_utc(row["created_at"]),
        updated_at=_utc(row["updated_at"]),
        old_key_id=_opt_str(row["old_key_id"]),
        new_key_id=_opt_str(row["new_key_id"]),
        leaked=bool(row["leaked"]),
        note=_opt_str(row["note"]),
        intent_key_ids=None if intent is None else tuple(str(k) for k in intent),
        intent_at=_opt_utc(row["intent_at"]),
        intent_until=_opt_utc(row["intent_until"]),
        store_started_at=_opt_utc(row["store_started_at"]),
        stored_at=_opt_utc(row["stored_at"]),
        vault_version=None if vault_version is None else int(vault_version),
        verified_at=_opt_utc(row["verified_at"]),
        deactivated_at=_opt_utc(row["deactivated_at"]),
        overlap=None if overlap is None else _interval(overlap),
        next_action_at=_opt_utc(row["next_action_at"]),
        attempts=int(row["attempts"]),
        last_error=_opt_str(row["last_error"]),
        waiting_on=_opt_str(row["waiting_on"]),
        kind=RotationKind(str(row["kind"])),
        create_login=bool(row["create_login"]),
    )


def _interval(value: object) -> timedelta:
    if not isinstance(value, timedelta):
        raise RotatorError(f"state store row holds {value!r} where a duration belongs")
    return value
