"""Exit codes: what every command's exit status means, and the one place that derives it.

    0  success; nothing needs attention
    1  needs attention now
    2  bad configuration or usage
    3  a backend could not be reached or refused the credentials
    4  nothing new, but a rotation reported earlier is still unresolved

A timer or a script can then tell "look now" (1, 2, 3) from "still blocked, already
reported" (4): `rotator-once.service` counts 4 as success, so a user who stays BLOCKED
fails the unit once, on the pass that blocked it, not every hour after.

Pure: rotations, their event trails and times in, a code out. The CLI gathers the facts
(which rotations the command opened or advanced, their trails, the open rotations, each
user's latest rotation); nothing else decides an exit code.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from enum import IntEnum

from rotator.errors import (
    BadInput,
    ConfigError,
    NotFound,
    PermissionDenied,
    RotationExists,
    RotatorError,
    Transient,
)
from rotator.machine import RotationKind, State
from rotator.model import Event, Rotation


class ExitCode(IntEnum):
    OK = 0
    ATTENTION = 1
    USAGE = 2
    BACKEND = 3
    UNRESOLVED = 4


# The one wording of each code: the README table and `rotator --help` repeat it verbatim
# (tests/test_exit_codes.py holds them to it).
MEANING: Mapping[ExitCode, str] = {
    ExitCode.OK: "success; nothing needs attention",
    ExitCode.ATTENTION: "needs attention now",
    ExitCode.USAGE: "bad configuration or usage",
    ExitCode.BACKEND: "a backend could not be reached or refused the credentials",
    ExitCode.UNRESOLVED: "nothing new, but a rotation reported earlier is still unresolved",
}

# States an operator has to look at.
TROUBLE: frozenset[State] = frozenset({State.FAILED, State.BLOCKED})
# States before the new key is in Vault: a rotation waiting here leaves its user
# without a stored new key until a later pass continues it.
UNSTORED: frozenset[State] = frozenset(
    {State.PLANNED, State.CONTAIN, State.MAKE_ROOM, State.CREATE, State.STORE}
)


def for_error(exc: RotatorError) -> ExitCode:
    """The exit code of a command stopped by `exc`."""
    if isinstance(exc, ConfigError | BadInput | NotFound | RotationExists):
        # RotationExists: the request cannot be carried out as asked (the user's open
        # rotation must end first); nothing was touched.
        return ExitCode.USAGE
    if isinstance(exc, PermissionDenied | Transient):
        return ExitCode.BACKEND
    return ExitCode.ATTENTION


def moved_into_trouble(trail: Iterable[Event], since: datetime) -> bool:
    """Whether the trail holds a move into FAILED or BLOCKED at or after `since`. Notes
    (events that stay in their state) and the opening event are not moves."""
    return any(
        e.from_state is not None
        and e.from_state is not e.to_state
        and e.to_state in TROUBLE
        and e.at >= since
        for e in trail
    )


def newly_troubled(
    handled: Iterable[Rotation], trails: Mapping[str, Sequence[Event]], since: datetime
) -> list[Rotation]:
    """The handled rotations that moved into FAILED or BLOCKED at or after `since`."""
    return [r for r in handled if moved_into_trouble(trails.get(r.id, ()), since)]


def unsettled(rotation: Rotation) -> bool:
    """Whether the rotation has not reached the point a later pass may be left to: a key
    rotation before its new key is stored, a console rotation before IAM has the
    password Vault holds."""
    if rotation.kind is RotationKind.CONSOLE:
        return rotation.state in (State.PLANNED, State.STORE, State.SET_PASSWORD)
    return rotation.state in UNSTORED


def waiting_on_backend(rotation: Rotation, since: datetime, now: datetime) -> bool:
    """Whether `rotation` was set to wait for a retry at or after `since`, after a failure,
    before it was settled (`unsettled`)."""
    return (
        unsettled(rotation)
        and rotation.last_error is not None
        and rotation.next_action_at is not None
        and rotation.next_action_at > now
        and rotation.updated_at >= since
    )


def waiting(handled: Iterable[Rotation], since: datetime, now: datetime) -> list[Rotation]:
    return [r for r in handled if waiting_on_backend(r, since, now)]


def unresolved(standing: Iterable[Rotation]) -> list[Rotation]:
    """Open BLOCKED rotations, and each user's latest rotation of each kind (key,
    console) when it is FAILED.

    `standing` holds the open rotations and, for each user of interest, at least the
    latest rotation of each kind (a user's open rotation is always its latest of that
    kind: one opens only when the previous one has ended)."""
    latest: dict[tuple[str, str, RotationKind], Rotation] = {}
    blocked: dict[str, Rotation] = {}
    for r in standing:
        if r.state is State.BLOCKED:
            blocked[r.id] = r
        key = (r.account_id, r.user_name, r.kind)
        seen = latest.get(key)
        if seen is None or r.created_at > seen.created_at:
            latest[key] = r
    failed = {r.id: r for r in latest.values() if r.state is State.FAILED}
    return list({**blocked, **failed}.values())


def exit_code(
    *,
    started: datetime,
    now: datetime,
    handled: Sequence[Rotation] = (),
    trails: Mapping[str, Sequence[Event]] | None = None,
    own_state_counts: bool = False,
    failed_accounts: Collection[str] = (),
    standing: Iterable[Rotation] = (),
) -> ExitCode:
    """The exit code of a command that ran to its end.

    `started`: the app's clock when the command began; `now`: when it ended.
    `handled`: the rotations the command opened or advanced, as they are now, and
    `trails` their event trails. `own_state_counts`: `rotate` and `leak-event` answer for
    their rotations' state itself, whenever it was reached. `failed_accounts`: accounts
    the scan could not read. `standing`: what code 4 looks at (see `unresolved`).

    When several apply, 1 wins over 3, and 3 over 4: a rotation that must wait continues
    by itself on the next pass, one that is FAILED or BLOCKED does not.
    """
    troubled = newly_troubled(handled, trails or {}, started)
    if own_state_counts:
        troubled += [r for r in handled if r.state in TROUBLE]
    if failed_accounts or troubled:
        return ExitCode.ATTENTION
    if waiting(handled, started, now):
        return ExitCode.BACKEND
    if unresolved(standing):
        return ExitCode.UNRESOLVED
    return ExitCode.OK
