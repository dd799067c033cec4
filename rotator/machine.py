"""The rotation state machine: every state and every legal move, on one screen.

    normal (age, manual, unused)
    PLANNED -> MAKE_ROOM -> CREATE -> STORE -> VERIFY -> OVERLAP -> DEACTIVATE
            -> RETIRE -> DELETE -> DONE
    leaked
    PLANNED -> CONTAIN -> MAKE_ROOM -> CREATE -> STORE -> VERIFY -> DELETE -> DONE

    console password (`kind: console`)
    PLANNED -> STORE -> SET_PASSWORD -> DONE

    side exits: BLOCKED (needs an operator), FAILED (retries exhausted or refused),
                ROLLED_BACK (old key reactivated), CANCELLED (user gone, or withdrawn)

CREATE and STORE lead back to MAKE_ROOM when a new key had to be deleted (its secret
could not be stored), and to BLOCKED when a key nobody can attribute to the rotation
appeared, or Vault holds someone else's newer key. BLOCKED leads back to MAKE_ROOM when a
later pass finds a free slot. OVERLAP and DEACTIVATE end DONE when the old key is already
gone (the goal is reached). Every state from VERIFY on leads back to MAKE_ROOM when the
new key itself leaked: it is contained and deleted, and another one replaces it.

A console rotation writes a new password to Vault (STORE) before IAM is given it
(SET_PASSWORD, with a reset required at the next sign-in). SET_PASSWORD leads back to
STORE when IAM refused the password (the account's policy changed): a new one is made.
A BLOCKED console rotation is looked at again in place: it writes its password (to
SET_PASSWORD), or sets the one Vault holds for it (to DONE).
"""

from __future__ import annotations

from enum import StrEnum

from rotator.errors import IllegalTransition


class RotationKind(StrEnum):
    """What a rotation replaces: a user's access key, or its console password."""

    KEY = "key"
    CONSOLE = "console"


class State(StrEnum):
    PLANNED = "PLANNED"
    CONTAIN = "CONTAIN"
    MAKE_ROOM = "MAKE_ROOM"
    CREATE = "CREATE"
    STORE = "STORE"
    VERIFY = "VERIFY"
    OVERLAP = "OVERLAP"
    DEACTIVATE = "DEACTIVATE"
    RETIRE = "RETIRE"
    DELETE = "DELETE"
    SET_PASSWORD = "SET_PASSWORD"  # noqa: S105 - a state name
    DONE = "DONE"
    BLOCKED = "BLOCKED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    CANCELLED = "CANCELLED"


S = State
_EXITS = {S.FAILED, S.CANCELLED}

TRANSITIONS: dict[State, frozenset[State]] = {
    S.PLANNED: frozenset({S.CONTAIN, S.MAKE_ROOM, S.BLOCKED} | _EXITS),
    S.CONTAIN: frozenset({S.MAKE_ROOM} | _EXITS),
    S.MAKE_ROOM: frozenset({S.CREATE, S.BLOCKED} | _EXITS),
    S.CREATE: frozenset({S.STORE, S.MAKE_ROOM, S.BLOCKED} | _EXITS),
    S.STORE: frozenset({S.VERIFY, S.MAKE_ROOM, S.BLOCKED} | _EXITS),
    S.VERIFY: frozenset({S.OVERLAP, S.DELETE, S.DONE, S.MAKE_ROOM} | _EXITS),
    S.OVERLAP: frozenset({S.DEACTIVATE, S.DONE, S.MAKE_ROOM} | _EXITS),
    S.DEACTIVATE: frozenset({S.RETIRE, S.DONE, S.ROLLED_BACK, S.MAKE_ROOM} | _EXITS),
    S.RETIRE: frozenset({S.DELETE, S.ROLLED_BACK, S.MAKE_ROOM} | _EXITS),
    S.DELETE: frozenset({S.DONE, S.ROLLED_BACK, S.MAKE_ROOM} | _EXITS),
    S.BLOCKED: frozenset({S.MAKE_ROOM} | _EXITS),
    S.DONE: frozenset(),
    S.FAILED: frozenset(),
    S.ROLLED_BACK: frozenset(),
    S.CANCELLED: frozenset(),
}

# A console password's rotation: its own, shorter table over the same states.
CONSOLE_TRANSITIONS: dict[State, frozenset[State]] = {
    S.PLANNED: frozenset({S.STORE, S.BLOCKED} | _EXITS),
    S.STORE: frozenset({S.SET_PASSWORD, S.BLOCKED} | _EXITS),
    S.SET_PASSWORD: frozenset({S.DONE, S.STORE, S.BLOCKED} | _EXITS),
    S.BLOCKED: frozenset({S.STORE, S.SET_PASSWORD, S.DONE} | _EXITS),
    S.DONE: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}

# Terminal states end a rotation; every other state holds the user's one open slot.
TERMINAL: frozenset[State] = frozenset({S.DONE, S.FAILED, S.ROLLED_BACK, S.CANCELLED})
OPEN: frozenset[State] = frozenset(State) - TERMINAL


def check_transition(current: State, target: State, kind: RotationKind = RotationKind.KEY) -> None:
    """Raise `IllegalTransition` naming both states unless the table of rotations of
    `kind` allows the move."""
    table = CONSOLE_TRANSITIONS if kind is RotationKind.CONSOLE else TRANSITIONS
    if target not in table.get(current, frozenset()):
        raise IllegalTransition(f"illegal transition {current} -> {target} ({kind} rotation)")
