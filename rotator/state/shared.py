"""What the SQL state stores (`rotator.state.sqlite`, `rotator.state.postgres`) share:
the SQL that tells open rotations from closed ones, the dead-letter cap, the lease rules
(who may take a lease, which fencing token a grant carries, when a fenced write is
refused) and the process facts those rules rest on.

Plain constants and functions, no database driver: each store keeps its own SQL,
transactions and error translation, and calls these where its logic is the other's.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from rotator.errors import LeaseLost, RotationExists, RotatorError
from rotator.machine import TERMINAL
from rotator.model import Lease, Rotation, RotationKind, ScanLease

# The state values below are our own enum's values (no user input), so building SQL
# from them is safe; the partial unique index must spell out the terminal set literally.
TERMINAL_VALUES: Final = tuple(sorted(s.value for s in TERMINAL))
_TERMINAL_SQL: Final = ", ".join(f"'{v}'" for v in TERMINAL_VALUES)
OPEN_WHERE: Final = f"state NOT IN ({_TERMINAL_SQL})"
CLOSED_WHERE: Final = f"state IN ({_TERMINAL_SQL})"

# Invariant 5 (one rotation in flight per user and kind: a key rotation and a console
# one may be open together), enforced by the database itself.
OPEN_INDEX: Final = "rotations_one_open"
OPEN_INDEX_COLUMNS: Final = ("account_id", "user_name", "kind")
OPEN_INDEX_SQL: Final = (
    f"CREATE UNIQUE INDEX {OPEN_INDEX} ON rotations ({', '.join(OPEN_INDEX_COLUMNS)}) "
    f"WHERE {OPEN_WHERE}"
)

# Dead letters kept at most; the oldest go first (a flood of junk must not fill the disk).
MAX_DEAD_LETTERS: Final = 1000


def lease_owner() -> str:
    """A lease owner name unique to this process and call: `host:pid:random`."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def pid_namespace() -> str:
    """The pid namespace id on Linux, so two containers sharing a hostname and a store
    never judge each other's pids; empty where there are no pid namespaces."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (in this pid namespace)."""
    if pid <= 0:
        return True  # not a process id we can ask about; never take over on it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # PermissionError: it exists, under another user
    return True


def require_aware(value: datetime) -> datetime:
    """`value`, refused when naive: a store keeps instants, and a naive time is none."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()}: the store keeps aware UTC times")
    return value


def require_positive_ttl(ttl: timedelta) -> None:
    if ttl <= timedelta(0):
        raise ValueError(f"lease ttl must be positive, not {ttl}")


# --- leases ------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldLease:
    """A lease row (a rotation's or an account's scan lease) as read inside the
    transaction that may write it."""

    owner: str  # "" once released
    host: str
    pid_ns: str
    pid: int
    expires_at: datetime
    token: int


def may_take_lease(held: HeldLease, owner: str, now: datetime, *, host: str, pid_ns: str) -> bool:
    """Whether `owner`, asking at `now` from `host` in `pid_ns`, may take the lease
    `held`: when it is its own (a renewal), expired, or held by a process of this host
    that no longer exists."""
    if held.owner == owner or held.expires_at <= now:
        return True
    # Same host and same pid namespace: the pid is meaningful here, and a holder that
    # no longer exists must not delay recovery until its lease runs out.
    same_machine = held.host == host and held.pid_ns == pid_ns
    return same_machine and not pid_alive(held.pid)


def grant_lease(
    held: HeldLease, owner: str, now: datetime, *, host: str, pid_ns: str
) -> tuple[int, bool] | None:
    """The fencing token of granting the lease `held` to `owner`, and whether that takes
    it from another holder; None when `may_take_lease` says no."""
    if not may_take_lease(held, owner, now, host=host, pid_ns=pid_ns):
        return None
    # Only a renewal of an unexpired lease keeps its token: anything else fences off
    # earlier holders with a greater one.
    renewal = held.owner == owner and held.expires_at > now
    token = held.token if renewal else held.token + 1
    # A released lease has no owner: taking it is no takeover.
    return token, held.owner not in (owner, "")


def check_fence(
    subject: str, lease: Lease | ScanLease, held: HeldLease | None, now: datetime
) -> None:
    """Raise `LeaseLost` unless `lease` is the current, unexpired one, given its row as
    read inside the write's transaction (`held`, None when there is no row). `subject`
    names what the lease is for."""
    if held is None or held.owner != lease.owner or held.token != lease.token:
        raise LeaseLost(f"{subject}: lease {lease.token} was taken over")
    if held.expires_at <= now:
        raise LeaseLost(f"{subject}: lease {lease.token} has expired")


# --- rotations ---------------------------------------------------------------------


def rotation_conflict(rotation: Rotation, open_id: object | None) -> RotatorError:
    """The error for an insert or update of `rotation` that broke a constraint: the
    one-open-rotation index when `open_id` (another open rotation of the user of the
    same kind, as the store found it) is given, else the primary key."""
    if open_id is not None:
        return RotationExists(
            f"user {rotation.user_name} in account {rotation.account_id} already has "
            f"open {kind_words(rotation.kind)}rotation {open_id}"
        )
    return RotatorError(f"rotation {rotation.id} already exists")


def kind_words(kind: RotationKind) -> str:
    """How a conflict message names a rotation's kind: nothing for a key rotation (the
    words every message had before console rotations), `console ` for the other."""
    return "" if kind == RotationKind.KEY else f"{RotationKind(kind).value} "
