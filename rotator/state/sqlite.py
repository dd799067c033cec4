"""SQLite state store: rotations, their event trail, and leases between processes.

The embedded default behind `rotator.ports.StateStore`, and the only module that imports
sqlite3. What it guarantees, and how:

- Durability: WAL with `synchronous=FULL`, so once a write returns (CREATE's intent above
  all) a crash or power loss cannot take it back.
- Invariant 5 (one rotation in flight per user and kind) is enforced by the database
  itself: a partial unique index over (account_id, user_name, kind) for rows whose state
  is not terminal. The daemon, the CLI and a second instance on the same file cannot
  race past it; `create` turns the violation into `RotationExists`.
- The event trail is append-only: triggers refuse UPDATE and DELETE on `events`.
- Leases: the owner string is opaque, but the row also records the holder's host and pid,
  so a lease left by a process that died on this host is taken over at once instead of
  delaying recovery until it expires.
- Fencing: each lease carries a token that grows with every new holder; `save` and
  `record` given a lease check, in the same transaction as the write, that it is still
  the current one and unexpired by this store's clock, and raise `LeaseLost` otherwise.
- The schema is versioned with `PRAGMA user_version`; migrations run in order inside one
  write transaction, and a file written by a newer rotator is refused.
- Files are private: missing parent directories are created 0700, the database and its
  `-wal`/`-shm` companions are 0600 whatever the umask.

One connection per thread (a daemon's pool threads share one store; a connection whose
thread ended is closed); connections, stores and processes on the same file coordinate
through SQLite's locks, and every write starts with `BEGIN IMMEDIATE` so it takes the
write lock before reading.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

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
    OPEN_INDEX_SQL,
    OPEN_WHERE,
    HeldLease,
    check_fence,
    grant_lease,
    pid_namespace,
    require_aware,
    require_positive_ttl,
    rotation_conflict,
)

# Each migration is a sequence of statements, applied in order in one transaction.
# Append new migrations; never edit one that has shipped.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE rotations (
            id             TEXT PRIMARY KEY,
            account_id     TEXT NOT NULL,
            user_name      TEXT NOT NULL,
            reason         TEXT NOT NULL,
            state          TEXT NOT NULL,
            created_at     TEXT NOT NULL,
            updated_at     TEXT NOT NULL,
            old_key_id     TEXT,
            new_key_id     TEXT,
            leaked         INTEGER NOT NULL CHECK (leaked IN (0, 1)),
            note           TEXT,
            intent_key_ids TEXT,
            intent_at      TEXT,
            stored_at      TEXT,
            vault_version  INTEGER,
            verified_at    TEXT,
            deactivated_at TEXT,
            overlap_seconds REAL,
            next_action_at TEXT,
            attempts       INTEGER NOT NULL,
            last_error     TEXT,
            waiting_on     TEXT
        )
        """,
        "CREATE INDEX rotations_by_user ON rotations (account_id, user_name, created_at)",
        "CREATE INDEX rotations_by_created ON rotations (created_at)",
        """
        CREATE TABLE events (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            rotation_id TEXT NOT NULL REFERENCES rotations (id),
            at          TEXT NOT NULL,
            from_state  TEXT,
            to_state    TEXT NOT NULL,
            reason      TEXT NOT NULL
        )
        """,
        "CREATE INDEX events_by_rotation ON events (rotation_id, id)",
        """
        CREATE TRIGGER events_no_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END
        """,
        """
        CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END
        """,
        """
        CREATE TABLE leases (
            rotation_id TEXT PRIMARY KEY REFERENCES rotations (id),
            owner       TEXT NOT NULL,
            host        TEXT NOT NULL,
            pid_ns      TEXT NOT NULL,
            pid         INTEGER NOT NULL,
            expires_at  TEXT NOT NULL
        )
        """,
        # `check` commits a write here: only a committed write proves the disk takes one.
        "CREATE TABLE health (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at TEXT NOT NULL)",
    ),
    (
        # Leak events that could not be parsed: kept here, out of the queue's way, so that
        # nothing is retried forever and nothing is silently dropped.
        """
        CREATE TABLE dead_letters (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            source      TEXT NOT NULL,
            message_id  TEXT NOT NULL,
            received_at TEXT NOT NULL,
            error       TEXT NOT NULL,
            body        TEXT NOT NULL,
            UNIQUE (source, message_id)
        )
        """,
    ),
    (
        # Fencing: every acquisition of a rotation's lease by a new holder gets a greater
        # token; rows are kept on release so that the count never starts over.
        "ALTER TABLE leases ADD COLUMN token INTEGER NOT NULL DEFAULT 0",
        # The end of the window in which CreateAccessKey may have minted a key.
        "ALTER TABLE rotations ADD COLUMN intent_until TEXT",
    ),
    (
        # Each key of each leak event, once: EventBridge delivers at least once, so a
        # replayed event must change nothing.
        """
        CREATE TABLE leak_reports (
            event_id    TEXT NOT NULL,
            key_id      TEXT NOT NULL,
            account_id  TEXT NOT NULL,
            user_name   TEXT,
            received_at TEXT NOT NULL,
            result      TEXT NOT NULL,
            PRIMARY KEY (event_id, key_id)
        )
        """,
        "ALTER TABLE rotations ADD COLUMN store_started_at TEXT",
    ),
    (
        # When the rotator first saw each user's quarantine policy: only keys created
        # before it are suspect. The row goes when the policy is detached.
        """
        CREATE TABLE quarantines (
            account_id TEXT NOT NULL,
            user_name  TEXT NOT NULL,
            policy     TEXT NOT NULL,
            first_seen TEXT NOT NULL,
            PRIMARY KEY (account_id, user_name)
        )
        """,
    ),
    (
        # Who scans each account: daemons sharing a store make one scan per account per
        # period. Released leases keep their row (owner ''), token and last scan.
        """
        CREATE TABLE scan_leases (
            account_id   TEXT PRIMARY KEY,
            owner        TEXT NOT NULL,
            host         TEXT NOT NULL,
            pid_ns       TEXT NOT NULL,
            pid          INTEGER NOT NULL,
            token        INTEGER NOT NULL,
            expires_at   TEXT NOT NULL,
            last_scan_at TEXT
        )
        """,
    ),
    (
        # Each event names the lease it was written under: the trail shows which
        # process did each step, and that no two ever interleaved.
        "ALTER TABLE events ADD COLUMN owner TEXT",
        "ALTER TABLE events ADD COLUMN token INTEGER",
    ),
    (
        # Each owner warning stage of each key, once per due moment: a daemon that
        # restarts, or another daemon sharing the store, does not warn again.
        """
        CREATE TABLE warning_stages (
            account_id TEXT NOT NULL,
            key_id     TEXT NOT NULL,
            stage      TEXT NOT NULL,
            user_name  TEXT NOT NULL,
            due_at     TEXT NOT NULL,
            sent_at    TEXT NOT NULL,
            PRIMARY KEY (account_id, key_id, stage)
        )
        """,
    ),
    (
        # What a rotation replaces: the user's access key (every row before this one) or
        # its console password. The one-open index then spans (account, user, kind): it
        # is rebuilt after the migrations, as its SQL changed.
        "ALTER TABLE rotations ADD COLUMN kind TEXT NOT NULL DEFAULT 'key'",
        # A console rotation that may give the user a login profile (`--create`).
        "ALTER TABLE rotations ADD COLUMN create_login INTEGER NOT NULL DEFAULT 0 "
        "CHECK (create_login IN (0, 1))",
    ),
)

SCHEMA_VERSION: Final = len(_MIGRATIONS)
"""The `PRAGMA user_version` this code writes and understands."""

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
    "overlap_seconds",
    "next_action_at",
    "attempts",
    "last_error",
    "waiting_on",
    "kind",
    "create_login",
)
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM rotations"  # noqa: S608 - fixed names
_INSERT: Final = (
    f"INSERT INTO rotations ({', '.join(_COLUMNS)}) "  # noqa: S608 - fixed names
    f"VALUES ({', '.join(':' + c for c in _COLUMNS)})"
)
_UPDATE: Final = (
    "UPDATE rotations SET "  # noqa: S608 - fixed names
    + ", ".join(f"{c} = :{c}" for c in _COLUMNS if c != "id")
    + " WHERE id = :id"
)
_RECENT: Final = (
    f"SELECT * FROM ("  # noqa: S608 - fixed names and enum values
    f"SELECT {', '.join(_COLUMNS)}, rowid AS seq FROM rotations "
    f"WHERE {OPEN_WHERE} AND (:user IS NULL OR user_name = :user)) "
    f"UNION ALL SELECT * FROM ("
    f"SELECT {', '.join(_COLUMNS)}, rowid AS seq FROM rotations "
    f"WHERE {CLOSED_WHERE} AND (:user IS NULL OR user_name = :user) "
    f"ORDER BY created_at DESC, rowid DESC LIMIT :limit) "
    f"ORDER BY created_at DESC, seq DESC"
)

# Primary result codes that mean "the file cannot be used right now", as opposed to a
# bug or a corrupt database.
_UNAVAILABLE_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOLFS,
    }
)
_BUSY_CODES: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SqliteStateStore:
    """`StateStore` on one SQLite file. See the module docstring for the guarantees."""

    def __init__(
        self,
        path: str | Path,
        clock: Clock | None = None,
        *,
        busy_timeout: float = 10.0,
    ) -> None:
        """Open (creating when missing) the store at `path` and bring its schema up to date.

        `busy_timeout` is how long, in seconds, a statement waits for another writer
        before `Transient` is raised.
        """
        self._path = Path(path)
        self._clock: Callable[[], datetime] = clock or _utcnow
        self._busy_timeout = busy_timeout
        # One connection per thread: SQLite itself serialises writers (BEGIN IMMEDIATE
        # with a busy timeout) and lets readers run beside them in WAL mode, so threads
        # never queue behind each other's fsync on a Python lock. A thread that ended
        # never uses its connection again: it is closed when the next one opens (a
        # daemon serves each HTTP request on a thread of its own).
        self._local = threading.local()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._connections: dict[threading.Thread, sqlite3.Connection] = {}
        self._closed = False
        self._host = socket.gethostname()
        self._pid_ns = pid_namespace()
        _prepare_file(self._path)
        try:
            self._connection()
            self._migrate()
            for suffix in ("-wal", "-shm"):
                _make_private(self._path.with_name(self._path.name + suffix))
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        return self._path

    # --- StateStore ---------------------------------------------------------------

    def create(self, rotation: Rotation, reason: str) -> Rotation:
        row = _encode(rotation)
        with self._write("create") as conn:
            try:
                conn.execute(_INSERT, row)
            except sqlite3.IntegrityError as exc:
                raise self._conflict(conn, rotation) from exc
            self._append_event(conn, rotation.id, None, rotation.state, reason)
            stored = self._select_one(conn, rotation.id)
        assert stored is not None  # inserted in this very transaction
        return stored

    def get(self, rotation_id: str) -> Rotation | None:
        with self._read("get") as conn:
            return self._select_one(conn, rotation_id)

    def open_for(
        self, account_id: str, user_name: str, kind: RotationKind = RotationKind.KEY
    ) -> Rotation | None:
        sql = f"{_SELECT} WHERE account_id = ? AND user_name = ? AND kind = ? AND {OPEN_WHERE}"
        with self._read("open_for") as conn:
            row = conn.execute(sql, (account_id, user_name, RotationKind(kind).value)).fetchone()
        return None if row is None else _decode(row)

    def latest_for(
        self, account_id: str, user_name: str, kind: RotationKind = RotationKind.KEY
    ) -> Rotation | None:
        sql = (
            f"{_SELECT} WHERE account_id = ? AND user_name = ? AND kind = ? "
            "ORDER BY created_at DESC, rowid DESC LIMIT 1"
        )
        with self._read("latest_for") as conn:
            row = conn.execute(sql, (account_id, user_name, RotationKind(kind).value)).fetchone()
        return None if row is None else _decode(row)

    def list_open(self) -> list[Rotation]:
        """Every open rotation, oldest first."""
        sql = f"{_SELECT} WHERE {OPEN_WHERE} ORDER BY created_at, rowid"
        with self._read("list_open") as conn:
            rows = conn.execute(sql).fetchall()
        return [_decode(r) for r in rows]

    def list_recent(self, limit: int = 50, user_name: str | None = None) -> list[Rotation]:
        """Every open rotation plus at most `limit` of the newest closed ones, newest
        `created_at` first. Open rotations are never cut by `limit`."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        with self._read("list_recent") as conn:
            rows = conn.execute(_RECENT, {"user": user_name, "limit": limit}).fetchall()
        return [_decode(r) for r in rows]

    def add_dead_letter(self, source: str, message_id: str, error: str, body: str) -> None:
        """Keep an event that could not be parsed (idempotent per source and message id)."""
        with self._write("add_dead_letter") as conn:
            conn.execute(
                "INSERT OR IGNORE INTO dead_letters (source, message_id, received_at, error, body) "
                "VALUES (?, ?, ?, ?, ?)",
                (source, message_id, _encode_ts(self._clock()), error, body),
            )
            conn.execute(
                "DELETE FROM dead_letters WHERE id <= "
                "(SELECT id FROM dead_letters ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (MAX_DEAD_LETTERS,),
            )

    def dead_letters(self) -> list[tuple[str, str, datetime, str]]:
        """(source, message id, received at, error) of every kept event, oldest first."""
        with self._read("dead_letters") as conn:
            rows = conn.execute(
                "SELECT source, message_id, received_at, error FROM dead_letters ORDER BY id"
            ).fetchall()
        return [(str(r[0]), str(r[1]), _parse_ts(r[2]), str(r[3])) for r in rows]

    def leak_report_seen(self, event_id: str, key_id: str) -> bool:
        """Whether this key of this event was handled already."""
        with self._read("leak_report_seen") as conn:
            row = conn.execute(
                "SELECT 1 FROM leak_reports WHERE event_id = ? AND key_id = ?", (event_id, key_id)
            ).fetchone()
        return row is not None

    def add_leak_report(
        self, event_id: str, key_id: str, account_id: str, user_name: str | None, result: str
    ) -> None:
        """Record that this key of this event was handled (idempotent)."""
        with self._write("add_leak_report") as conn:
            conn.execute(
                "INSERT OR IGNORE INTO leak_reports "
                "(event_id, key_id, account_id, user_name, received_at, result) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (event_id, key_id, account_id, user_name, _encode_ts(self._clock()), result),
            )

    def quarantines(self, account_id: str) -> dict[str, datetime]:
        """User -> when the rotator first saw its quarantine policy attached."""
        with self._read("quarantines") as conn:
            rows = conn.execute(
                "SELECT user_name, first_seen FROM quarantines WHERE account_id = ?",
                (account_id,),
            ).fetchall()
        return {str(r[0]): _parse_ts(r[1]) for r in rows}

    def note_quarantines(self, account_id: str, seen: Mapping[str, tuple[str, datetime]]) -> None:
        """A full scan of the account saw exactly these users quarantined (user ->
        (policy, first seen)): keep the earliest first sighting of each, and forget
        users whose policy was detached (a later one is a new leak)."""
        with self._write("note_quarantines") as conn:
            known = {
                str(r[0])
                for r in conn.execute(
                    "SELECT user_name FROM quarantines WHERE account_id = ?", (account_id,)
                )
            }
            for user_name in known - set(seen):
                conn.execute(
                    "DELETE FROM quarantines WHERE account_id = ? AND user_name = ?",
                    (account_id, user_name),
                )
            for user_name, (policy, first_seen) in seen.items():
                conn.execute(
                    "INSERT OR IGNORE INTO quarantines (account_id, user_name, policy, first_seen)"
                    " VALUES (?, ?, ?, ?)",
                    (account_id, user_name, policy, _encode_ts(first_seen)),
                )

    def warning_stages_sent(
        self, account_id: str, key_ids: Iterable[str]
    ) -> dict[str, dict[str, datetime]]:
        """Key id -> {stage: due moment} of the owner warnings already sent."""
        wanted = set(key_ids)
        with self._read("warning_stages_sent") as conn:
            rows = conn.execute(
                "SELECT key_id, stage, due_at FROM warning_stages WHERE account_id = ?",
                (account_id,),
            ).fetchall()
        out: dict[str, dict[str, datetime]] = {}
        for key_id, stage, due in rows:
            if str(key_id) in wanted:
                out.setdefault(str(key_id), {})[str(stage)] = _parse_ts(due)
        return out

    def record_warning_stage(
        self, account_id: str, user_name: str, key_id: str, stage: str, due_at: datetime
    ) -> None:
        """Record an owner warning stage of a key (idempotent; a new due moment replaces
        the old one)."""
        with self._write("record_warning_stage") as conn:
            conn.execute(
                "INSERT INTO warning_stages "
                "(account_id, key_id, stage, user_name, due_at, sent_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (account_id, key_id, stage) "
                "DO UPDATE SET due_at = excluded.due_at, sent_at = excluded.sent_at "
                "WHERE warning_stages.due_at <> excluded.due_at",
                (
                    account_id,
                    key_id,
                    stage,
                    user_name,
                    _encode_ts(due_at),
                    _encode_ts(self._clock()),
                ),
            )

    def replacement_key_ids(self, account_id: str) -> set[str]:
        """Keys issued to replace a contained leak (rotations that did not fail)."""
        sql = (
            "SELECT new_key_id FROM rotations WHERE account_id = ? AND leaked = 1 "
            "AND new_key_id IS NOT NULL AND state NOT IN ('FAILED', 'CANCELLED')"
        )
        with self._read("replacement_key_ids") as conn:
            rows = conn.execute(sql, (account_id,)).fetchall()
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
        with self._write("save") as conn:
            if lease is not None:
                self._fence(conn, rotation.id, lease)
            if from_state is not None:
                current = conn.execute(
                    "SELECT state FROM rotations WHERE id = ?", (rotation.id,)
                ).fetchone()
                if current is not None and current[0] != from_state.value:
                    # Someone else moved it on meanwhile (a lease that ran out): never
                    # overwrite their progress with ours.
                    raise StaleRotation(
                        f"rotation {rotation.id} is in {current[0]}, not {from_state}"
                    )
            try:
                cursor = conn.execute(_UPDATE, row)
            except sqlite3.IntegrityError as exc:
                # Moving a closed rotation back to an open state while another is open.
                raise self._conflict(conn, rotation) from exc
            if cursor.rowcount == 0:
                raise NotFound(f"rotation {rotation.id} not found")
            if from_state is not None and from_state != rotation.state:
                self._append_event(conn, rotation.id, from_state, rotation.state, reason, lease)

    def record(
        self, rotation_id: str, state: State, reason: str, *, lease: Lease | None = None
    ) -> None:
        """Append a note to the trail of a rotation that stays in `state` (e.g. "consumers
        still use the old key"): an event whose from and to states are both `state`."""
        with self._write("record") as conn:
            self._require(conn, rotation_id)
            if lease is not None:
                self._fence(conn, rotation_id, lease)
            self._append_event(conn, rotation_id, state, state, reason, lease)

    def events(self, rotation_id: str) -> list[Event]:
        """The rotation's events in the order they were recorded."""
        sql = (
            "SELECT rotation_id, at, from_state, to_state, reason, owner, token FROM events "
            "WHERE rotation_id = ? ORDER BY id"
        )
        with self._read("events") as conn:
            rows = conn.execute(sql, (rotation_id,)).fetchall()
        return [
            Event(
                rotation_id=str(r[0]),
                at=_parse_ts(r[1]),
                from_state=None if r[2] is None else State(r[2]),
                to_state=State(r[3]),
                reason=str(r[4]),
                owner=_opt_str(r[5]),
                token=_opt_int(r[6]),
            )
            for r in rows
        ]

    def acquire_lease(self, rotation_id: str, owner: str, ttl: timedelta) -> Lease | None:
        """Take the lease when it is free, expired, already `owner`'s (renewal), or held by
        a process on this host that no longer exists; None otherwise. Only a renewal of
        an unexpired lease keeps the token: anything else fences off earlier holders."""
        require_positive_ttl(ttl)
        now = self._clock()
        with self._write("acquire_lease") as conn:
            self._require(conn, rotation_id)
            held = conn.execute(
                "SELECT owner, host, pid_ns, pid, expires_at, token FROM leases "
                "WHERE rotation_id = ?",
                (rotation_id,),
            ).fetchone()
            token, taken_over = 1, False
            if held is not None:
                grant = self._grant(held, owner, now)
                if grant is None:
                    return None
                token, taken_over = grant
            conn.execute(
                "INSERT INTO leases (rotation_id, owner, host, pid_ns, pid, expires_at, token) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (rotation_id) DO UPDATE SET owner = excluded.owner, "
                "host = excluded.host, pid_ns = excluded.pid_ns, pid = excluded.pid, "
                "expires_at = excluded.expires_at, token = excluded.token",
                (
                    rotation_id,
                    owner,
                    self._host,
                    self._pid_ns,
                    os.getpid(),
                    _encode_ts(now + ttl),
                    token,
                ),
            )
        return Lease(rotation_id, owner, token, taken_over)

    def renew_lease(self, lease: Lease, ttl: timedelta) -> Lease | None:
        """Extend `lease` by `ttl` from now while it is still the current, unexpired one;
        None otherwise (and nothing changes: a holder that lost its lease never takes
        the rotation back this way)."""
        require_positive_ttl(ttl)
        now = self._clock()
        with self._write("renew_lease") as conn:
            cursor = conn.execute(
                "UPDATE leases SET expires_at = ? "
                "WHERE rotation_id = ? AND owner = ? AND token = ? AND expires_at > ?",
                (
                    _encode_ts(now + ttl),
                    lease.rotation_id,
                    lease.owner,
                    lease.token,
                    _encode_ts(now),
                ),
            )
        return lease if cursor.rowcount == 1 else None

    def release_lease(self, rotation_id: str, owner: str) -> None:
        """End the lease now if `owner` holds it; a no-op otherwise. The row stays, with
        its token, so that the next holder's token is greater still, and with no owner
        (""), so that taking it next is no takeover."""
        with self._write("release_lease") as conn:
            conn.execute(
                "UPDATE leases SET owner = '', expires_at = ? WHERE rotation_id = ? AND owner = ?",
                (_encode_ts(self._clock()), rotation_id, owner),
            )

    def hold_scan_lease(self, account_id: str, owner: str, ttl: timedelta) -> ScanLease | None:
        """Take or renew an account's scan lease, on the rules of `acquire_lease`."""
        require_positive_ttl(ttl)
        now = self._clock()
        with self._write("hold_scan_lease") as conn:
            held = conn.execute(
                "SELECT owner, host, pid_ns, pid, expires_at, token, last_scan_at "
                "FROM scan_leases WHERE account_id = ?",
                (account_id,),
            ).fetchone()
            token, last, taken_over = 1, None, False
            if held is not None:
                grant = self._grant(held, owner, now)
                if grant is None:
                    return None
                token, taken_over = grant
                last = _parse_opt_ts(held[6])
            conn.execute(
                "INSERT INTO scan_leases "
                "(account_id, owner, host, pid_ns, pid, token, expires_at, last_scan_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (account_id) DO UPDATE SET owner = excluded.owner, "
                "host = excluded.host, pid_ns = excluded.pid_ns, pid = excluded.pid, "
                "token = excluded.token, expires_at = excluded.expires_at",
                (
                    account_id,
                    owner,
                    self._host,
                    self._pid_ns,
                    os.getpid(),
                    token,
                    _encode_ts(now + ttl),
                    _encode_opt_ts(last),
                ),
            )
        return ScanLease(account_id, owner, token, now + ttl, last, taken_over)

    def scan_finished(self, lease: ScanLease) -> ScanLease:
        """Record the end of a scan, fenced by `lease` (raises `LeaseLost` otherwise)."""
        now = self._clock()
        with self._write("scan_finished") as conn:
            row = conn.execute(
                "SELECT owner, host, pid_ns, pid, expires_at, token FROM scan_leases "
                "WHERE account_id = ?",
                (lease.account_id,),
            ).fetchone()
            held = None if row is None else _held(row)
            check_fence(f"scan of {lease.account_id}", lease, held, now)
            conn.execute(
                "UPDATE scan_leases SET last_scan_at = ? WHERE account_id = ?",
                (_encode_ts(now), lease.account_id),
            )
        return replace(lease, last_scan_at=now)

    def release_scan_lease(self, account_id: str, owner: str) -> None:
        with self._write("release_scan_lease") as conn:
            conn.execute(
                "UPDATE scan_leases SET owner = '', expires_at = ? "
                "WHERE account_id = ? AND owner = ?",
                (_encode_ts(self._clock()), account_id, owner),
            )

    def scan_leases(self) -> list[ScanLease]:
        with self._read("scan_leases") as conn:
            rows = conn.execute(
                "SELECT account_id, owner, token, expires_at, last_scan_at "
                "FROM scan_leases ORDER BY account_id"
            ).fetchall()
        return [
            ScanLease(str(r[0]), str(r[1]), _int(r[2]), _parse_ts(r[3]), _parse_opt_ts(r[4]))
            for r in rows
        ]

    def check(self) -> None:
        """Commit a small write; raise `BackendUnavailable` naming the file if it fails.

        A `BEGIN IMMEDIATE; ROLLBACK` would only prove the lock can be taken: a full disk
        or a file that cannot grow shows up only when a write reaches the WAL."""
        try:
            with self._write("check") as conn:
                conn.execute(
                    "INSERT INTO health (id, checked_at) VALUES (1, ?) "
                    "ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                    (_encode_ts(self._clock()),),
                )
        except RotatorError as exc:
            detail = exc.__cause__ or exc  # the sqlite error, without the path twice
            raise BackendUnavailable(f"state store {self._path} is not writable: {detail}") from exc

    def close(self) -> None:
        """Close every connection; later calls raise `BackendUnavailable`. Idempotent."""
        with self._lock:
            self._closed = True
            connections, self._connections = list(self._connections.values()), {}
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # --- internals ----------------------------------------------------------------

    def _configure(self, conn: sqlite3.Connection, busy_timeout: float) -> None:
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            # A crash must not lose a recorded intent: FULL syncs the WAL on every commit.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise self._translate(exc, "open") from exc
        if str(mode).lower() != "wal":
            raise BackendUnavailable(
                f"state store {self._path}: cannot use WAL mode (journal_mode is {mode})"
            )

    def _migrate(self) -> None:
        with self._read("open") as c:
            if self._schema_current(c):
                return
        with self._write("migrate") as c:
            version = self._user_version(c)  # again: another process may have migrated
            for statements in _MIGRATIONS[version:]:
                for sql in statements:
                    c.execute(sql)
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if self._index_sql(c) != OPEN_INDEX_SQL:
                # The terminal set in `machine`, or the indexed columns, changed since the
                # index was built.
                c.execute(f"DROP INDEX IF EXISTS {OPEN_INDEX}")
                try:
                    c.execute(OPEN_INDEX_SQL)
                except sqlite3.IntegrityError as exc:
                    raise RotatorError(
                        f"state store {self._path}: a user has two rotations that are open "
                        f"under the current terminal states; close one first"
                    ) from exc

    def _schema_current(self, conn: sqlite3.Connection) -> bool:
        return self._user_version(conn) == SCHEMA_VERSION and (
            self._index_sql(conn) == OPEN_INDEX_SQL
        )

    def _user_version(self, conn: sqlite3.Connection) -> int:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RotatorError(
                f"state store {self._path} has schema version {version}, newer than this "
                f"rotator understands ({SCHEMA_VERSION}); upgrade rotator"
            )
        return version

    @staticmethod
    def _index_sql(conn: sqlite3.Connection) -> str | None:
        row = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (OPEN_INDEX,)
        ).fetchone()
        return None if row is None else str(row[0])

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        if self._closed:
            raise BackendUnavailable(f"state store {self._path} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        try:
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # close() may run on another thread
            )
        except sqlite3.Error as exc:
            raise self._translate(exc, "open") from exc
        try:
            self._configure(conn, self._busy_timeout)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if self._closed:
                conn.close()
                raise BackendUnavailable(f"state store {self._path} is closed")
            ended = [t for t in self._connections if not t.is_alive()]
            orphans = [self._connections.pop(t) for t in ended]
            self._connections[threading.current_thread()] = conn
        for orphan in orphans:
            with contextlib.suppress(sqlite3.Error):
                orphan.close()
        self._local.conn = conn
        return conn

    @contextmanager
    def _read(self, doing: str) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        try:
            yield conn
        except sqlite3.Error as exc:
            raise self._translate(exc, doing) from exc

    @contextmanager
    def _write(self, doing: str) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock up front, so what the
        transaction reads cannot change before it writes (no read-then-upgrade race).

        Writers of this process queue on a lock first: SQLite's own busy handler backs
        off in coarse sleeps, which would leave threads idle while the file is free."""
        conn = self._connection()
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._translate(exc, doing) from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._translate(exc, doing) from exc
                raise

    def _translate(self, exc: sqlite3.Error, doing: str) -> RotatorError:
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        text = f"state store {self._path}: {doing} failed: {exc}"
        if primary in _BUSY_CODES or "database is locked" in str(exc):
            return Transient(text)
        if primary in _UNAVAILABLE_CODES:
            return BackendUnavailable(text)
        return RotatorError(text)

    def _conflict(self, conn: sqlite3.Connection, rotation: Rotation) -> RotatorError:
        """Name the constraint an insert or update of `rotation` broke: the one-open-
        rotation index (another open rotation of the same kind for the user exists) or
        the primary key."""
        row = conn.execute(
            f"SELECT id FROM rotations WHERE account_id = ? AND user_name = ? "  # noqa: S608
            f"AND kind = ? AND {OPEN_WHERE} AND id != ?",
            (
                rotation.account_id,
                rotation.user_name,
                RotationKind(rotation.kind).value,
                rotation.id,
            ),
        ).fetchone()
        return rotation_conflict(rotation, None if row is None else row[0])

    def _grant(self, row: Sequence[object], owner: str, now: datetime) -> tuple[int, bool] | None:
        """`grant_lease` of the lease row `row` to `owner` from this process's host."""
        return grant_lease(_held(row), owner, now, host=self._host, pid_ns=self._pid_ns)

    def _fence(self, conn: sqlite3.Connection, rotation_id: str, lease: Lease) -> None:
        """Raise `LeaseLost` unless `lease` is the rotation's current, unexpired lease.
        Runs inside the write transaction, so the check and the write are one."""
        if lease.rotation_id != rotation_id:
            raise ValueError(f"lease of {lease.rotation_id} used to write {rotation_id}")
        row = conn.execute(
            "SELECT owner, host, pid_ns, pid, expires_at, token FROM leases WHERE rotation_id = ?",
            (rotation_id,),
        ).fetchone()
        held = None if row is None else _held(row)
        check_fence(f"rotation {rotation_id}", lease, held, self._clock())

    @staticmethod
    def _require(conn: sqlite3.Connection, rotation_id: str) -> None:
        if conn.execute("SELECT 1 FROM rotations WHERE id = ?", (rotation_id,)).fetchone() is None:
            raise NotFound(f"rotation {rotation_id} not found")

    @staticmethod
    def _select_one(conn: sqlite3.Connection, rotation_id: str) -> Rotation | None:
        row = conn.execute(f"{_SELECT} WHERE id = ?", (rotation_id,)).fetchone()
        return None if row is None else _decode(row)

    def _append_event(
        self,
        conn: sqlite3.Connection,
        rotation_id: str,
        from_state: State | None,
        to_state: State,
        reason: str,
        lease: Lease | None = None,
    ) -> None:
        conn.execute(
            "INSERT INTO events (rotation_id, at, from_state, to_state, reason, owner, token) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                rotation_id,
                _encode_ts(self._clock()),
                None if from_state is None else from_state.value,
                to_state.value,
                reason,
                None if lease is None else lease.owner,
                None if lease is None else lease.token,
            ),
        )


# --- files -------------------------------------------------------------------------


def _prepare_file(path: Path) -> None:
    """Create missing parent directories (0700) and the database file (0600), both
    independent of the umask, before SQLite opens it."""
    try:
        _make_private_dirs(path.parent)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            _make_private(path)
        else:
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
    except OSError as exc:
        raise BackendUnavailable(f"state store {path}: cannot prepare file: {exc}") from exc


def _make_private_dirs(directory: Path) -> None:
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to chmod
        os.chmod(d, 0o700)


def _make_private(path: Path) -> None:
    """Take group and other permissions off an existing file (SQLite creates the WAL and
    shm files with the database's mode; this covers files made by anything else)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        os.chmod(path, mode & 0o700)


# --- rows ----------------------------------------------------------------------------


def _encode_ts(value: datetime) -> str:
    # Fixed width, so that text order is time order (ORDER BY created_at).
    return require_aware(value).astimezone(UTC).isoformat(timespec="microseconds")


def _encode_opt_ts(value: datetime | None) -> str | None:
    return None if value is None else _encode_ts(value)


def _parse_ts(value: object) -> datetime:
    return datetime.fromisoformat(str(value))


def _parse_opt_ts(value: object) -> datetime | None:
    return None if value is None else _parse_ts(value)


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _int(value: object) -> int:
    if isinstance(value, int):
        return value
    raise RotatorError(f"state store row holds {value!r} where an integer belongs")


def _opt_int(value: object) -> int | None:
    return None if value is None else _int(value)


def _held(row: Sequence[object]) -> HeldLease:
    """A lease row read as (owner, host, pid_ns, pid, expires_at, token, ...)."""
    pid = row[3]
    return HeldLease(
        owner=str(row[0]),
        host=str(row[1]),
        pid_ns=str(row[2]),
        # A pid that is no integer names no process we can ask about: as pid 0, whose
        # holder is never taken over.
        pid=pid if isinstance(pid, int) else 0,
        expires_at=_parse_ts(row[4]),
        token=_int(row[5]),
    )


def _float(value: object) -> float:
    if isinstance(value, int | float):
        return float(value)
    raise RotatorError(f"state store row holds {value!r} where a number belongs")


def _encode(r: Rotation) -> dict[str, object]:
    row: dict[str, object] = {
        "id": r.id,
        "account_id": r.account_id,
        "user_name": r.user_name,
        "reason": r.reason.value,
        "state": r.state.value,
        "created_at": _encode_ts(r.created_at),
        "updated_at": _encode_ts(r.updated_at),
        "old_key_id": r.old_key_id,
        "new_key_id": r.new_key_id,
        "leaked": int(r.leaked),
        "note": r.note,
        "intent_key_ids": None if r.intent_key_ids is None else json.dumps(r.intent_key_ids),
        "intent_at": _encode_opt_ts(r.intent_at),
        "intent_until": _encode_opt_ts(r.intent_until),
        "store_started_at": _encode_opt_ts(r.store_started_at),
        "stored_at": _encode_opt_ts(r.stored_at),
        "vault_version": r.vault_version,
        "verified_at": _encode_opt_ts(r.verified_at),
        "deactivated_at": _encode_opt_ts(r.deactivated_at),
        "overlap_seconds": None if r.overlap is None else r.overlap.total_seconds(),
        "next_action_at": _encode_opt_ts(r.next_action_at),
        "attempts": r.attempts,
        "last_error": r.last_error,
        "waiting_on": r.waiting_on,
        "kind": RotationKind(r.kind).value,
        "create_login": int(r.create_login),
    }
    assert tuple(row) == _COLUMNS
    return row


def _decode(values: Sequence[object]) -> Rotation:
    # `values` may carry extra trailing columns (list_recent's sort key): zip stops early.
    row: Mapping[str, object] = dict(zip(_COLUMNS, values, strict=False))
    intent = row["intent_key_ids"]
    overlap = row["overlap_seconds"]
    return Rotation(
        id=str(row["id"]),
        account_id=str(row["account_id"]),
        user_name=str(row["user_name"]),
        reason=RotationReason(str(row["reason"])),
        state=State(str(row["state"])),
        created_at=_parse_ts(row["created_at"]),
        updated_at=_parse_ts(row["updated_at"]),
        old_key_id=_opt_str(row["old_key_id"]),
        new_key_id=_opt_str(row["new_key_id"]),
        leaked=bool(row["leaked"]),
        note=_opt_str(row["note"]),
        intent_key_ids=None if intent is None else tuple(str(k) for k in json.loads(str(intent))),
        intent_at=_parse_opt_ts(row["intent_at"]),
        intent_until=_parse_opt_ts(row["intent_until"]),
        store_started_at=_parse_opt_ts(row["store_started_at"]),
        stored_at=_parse_opt_ts(row["stored_at"]),
        vault_version=_opt_int(row["vault_version"]),
        verified_at=_parse_opt_ts(row["verified_at"]),
        deactivated_at=_parse_opt_ts(row["deactivated_at"]),
        overlap=None if overlap is None else timedelta(seconds=_float(overlap)),
        next_action_at=_parse_opt_ts(row["next_action_at"]),
        attempts=_int(row["attempts"]),
        last_error=_opt_str(row["last_error"]),
        waiting_on=_opt_str(row["waiting_on"]),
        kind=RotationKind(str(row["kind"])),
        create_login=bool(row["create_login"]),
    )
