"""The exception family. Adapters translate backend errors into these at the edge.

Every error a caller may want to act on has its own class; `Transient` marks the ones
worth retrying (throttling, a sealed or unreachable Vault, a timeout).
"""

from __future__ import annotations


class RotatorError(Exception):
    """Base of every error this project raises on purpose.

    `answered` is True when the backend answered the call (with an error document):
    whatever the call did, it did before that answer, and it cannot take effect later.
    `not_applied` is True when that answer was a refusal (a 4xx status): the call
    certainly had no effect. A 5xx may have been applied; a timeout or a dropped
    connection may even be applied after the caller gave up."""

    answered: bool = False
    not_applied: bool = False


class ConfigError(RotatorError):
    """The configuration is invalid; `problems` names each one by its path in the file."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class Transient(RotatorError):
    """Worth retrying later: throttling, timeouts, a sealed or unreachable backend."""


class BackendUnavailable(Transient):
    """A backend (AWS, Vault, the state store) could not be reached at all."""


class PermissionDenied(RotatorError):
    """The backend refused an action; `action` names it (e.g. `iam:CreateAccessKey`)."""

    def __init__(self, action: str, resource: str | None = None, detail: str = "") -> None:
        self.action = action
        self.resource = resource
        text = f"permission denied: {action}"
        if resource:
            text += f" on {resource}"
        if detail:
            text += f" ({detail})"
        super().__init__(text)


class NotFound(RotatorError):
    """The entity (user, key, secret) does not exist."""


class CapConflict(RotatorError):
    """IAM refused a new key: the user already holds two (`LimitExceeded`)."""


class PasswordRefused(RotatorError):
    """IAM refused a console password (`PasswordPolicyViolation`): the account's password
    policy changed since it was read."""


class CasConflict(RotatorError):
    """Vault refused a check-and-set write: someone else wrote the secret meanwhile."""


class IllegalTransition(RotatorError):
    """A rotation was asked to move between two states the table does not connect."""


class RotationExists(RotatorError):
    """An open rotation for the same (account, user) already exists."""


class StaleRotation(RotatorError):
    """A rotation was saved from a state it is no longer in: another process moved it."""


class LeaseLost(StaleRotation):
    """This process no longer holds the rotation's lease (it expired, or another process
    took it over): it must make no further side effect and no further write."""


class BadInput(RotatorError):
    """Input from a user or a script (an event, a request body, a time) is malformed."""
