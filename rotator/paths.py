"""Where a user's key lives in Vault, and under which field names: one definition for the
adapter, its in-memory fake, `plan` and config.

IAM user names may hold `.` and `..` (IAM allows `[A-Za-z0-9+=,.@_-]`), which Vault
cannot take as path segments: it answers 400, or resolves them to another path. Such a
user is reported and never given a key whose secret could not be stored.
"""

from __future__ import annotations

from rotator.errors import BadInput

# The field names consumers read (INTERFACE.md); changing them breaks every consumer.
ACCESS_KEY_FIELD = "aws_access_key_id"
SECRET_KEY_FIELD = "aws_secret_access_key"  # noqa: S105 - a field name
# A console password's data: the password, and the rotation that wrote it.
PASSWORD_FIELD = "password"  # noqa: S105 - a field name
ROTATION_ID_FIELD = "rotation_id"
DEFAULT_CONSOLE_PATH_TEMPLATE = "aws/{account_id}/{user_name}/console"


def secret_path(template: str, account_id: str, user_name: str) -> str:
    """The KV path (inside the mount) of the user's secret. Raises `BadInput` naming the
    user when the result cannot be a Vault path."""
    problem = path_problem(user_name)
    if problem is not None:
        raise BadInput(problem)
    return template.format(account_id=account_id, user_name=user_name).strip("/")


def path_problem(user_name: str) -> str | None:
    """Why `user_name` cannot be a segment of a Vault path, or None."""
    if user_name in (".", ".."):
        return (
            f"user name {user_name!r} cannot be a Vault path segment: rotate this user's "
            "key by hand, or rename the user"
        )
    return None
