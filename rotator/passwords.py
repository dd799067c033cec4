"""Console passwords: a new random one that the account's password policy accepts.
Pure: randomness from the operating system's source (`secrets`), no I/O.

Every password holds upper- and lower-case letters, digits and symbols, whatever the
policy asks: that satisfies any IAM password policy, and IAM's own rule when the account
has none (at least 8 characters and three of those four kinds). It is as long as the
policy's minimum, and never shorter than `DEFAULT_LENGTH`.
"""

from __future__ import annotations

import secrets
import string

from rotator.errors import PasswordRefused
from rotator.model import PasswordPolicy

__all__ = ["DEFAULT_LENGTH", "IAM_DEFAULT", "MAX_LENGTH", "SYMBOLS", "new_password", "problems"]

# The symbols IAM counts as such in a password policy (its documentation lists them).
SYMBOLS = "!@#$%^&*()_+-=[]{}|'"
DEFAULT_LENGTH = 32
MAX_LENGTH = 128  # IAM refuses longer passwords
# The account has no password policy: IAM's own minimums apply.
IAM_DEFAULT = PasswordPolicy(minimum_length=8)

_CLASSES = (string.ascii_uppercase, string.ascii_lowercase, string.digits, SYMBOLS)
_ALPHABET = "".join(_CLASSES)


def new_password(policy: PasswordPolicy = IAM_DEFAULT) -> str:
    """A random password `policy` accepts: one character of each kind, the rest from all
    of them, shuffled. `PasswordRefused` when no password IAM takes can meet it."""
    length = min(MAX_LENGTH, max(DEFAULT_LENGTH, policy.minimum_length))
    if policy.minimum_length > MAX_LENGTH:
        raise PasswordRefused(
            f"the account's password policy (GetAccountPasswordPolicy) asks for "
            f"{policy.minimum_length} characters; IAM takes at most {MAX_LENGTH}: fix the "
            "policy"
        )
    chars = [secrets.choice(kind) for kind in _CLASSES]
    chars += [secrets.choice(_ALPHABET) for _ in range(length - len(chars))]
    secrets.SystemRandom().shuffle(chars)
    return "".join(chars)


def problems(password: str, policy: PasswordPolicy = IAM_DEFAULT) -> list[str]:
    """What `policy` (and IAM's own rule, when it is `IAM_DEFAULT`) has against
    `password`: empty when it is accepted. Never quotes the password."""
    out: list[str] = []
    if len(password) < policy.minimum_length:
        out.append(f"shorter than {policy.minimum_length} characters")
    if len(password) > MAX_LENGTH:
        out.append(f"longer than {MAX_LENGTH} characters")
    has = [any(c in kind for c in password) for kind in _CLASSES]
    needed = (
        policy.require_uppercase,
        policy.require_lowercase,
        policy.require_numbers,
        policy.require_symbols,
    )
    names = ("upper-case letter", "lower-case letter", "digit", "symbol")
    out += [
        f"no {name}" for name, need, got in zip(names, needed, has, strict=True) if need and not got
    ]
    if policy == IAM_DEFAULT and sum(has) < 3:
        out.append("fewer than three of upper case, lower case, digits and symbols")
    if any(c not in _ALPHABET for c in password):
        out.append("a character IAM does not count in any kind")
    return out
