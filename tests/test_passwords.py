"""New console passwords: random, and accepted by any password policy IAM can hold."""

from __future__ import annotations

import pytest

from rotator.errors import PasswordRefused
from rotator.model import PasswordPolicy
from rotator.passwords import DEFAULT_LENGTH, IAM_DEFAULT, MAX_LENGTH, new_password, problems

STRICT = PasswordPolicy(
    minimum_length=64,
    require_symbols=True,
    require_numbers=True,
    require_uppercase=True,
    require_lowercase=True,
)


@pytest.mark.parametrize(
    "policy", [IAM_DEFAULT, STRICT, PasswordPolicy(minimum_length=MAX_LENGTH)], ids=str
)
def test_every_new_password_satisfies_its_policy_and_iams_own_rule(policy: PasswordPolicy) -> None:
    """Two hundred passwords per policy: each one meets it, is as long as the policy
    asks and at least DEFAULT_LENGTH, and no two are alike."""
    made = [new_password(policy) for _ in range(200)]
    for password in made:
        assert problems(password, policy) == []
        assert problems(password, IAM_DEFAULT) == []
        assert len(password) == max(DEFAULT_LENGTH, policy.minimum_length)
    assert len(set(made)) == len(made)


def test_problems_names_what_a_policy_has_against_a_password_without_quoting_it() -> None:
    """A short, digit-only password breaks the strict policy on every count, and the
    problems say which without showing the password; IAM's default rule wants three
    kinds of character."""
    found = problems("12345678", STRICT)
    assert "shorter than 64 characters" in found
    assert {"no upper-case letter", "no lower-case letter", "no symbol"} <= set(found)
    assert all("12345678" not in p for p in found)
    assert problems("abcdefgh", IAM_DEFAULT) == [
        "fewer than three of upper case, lower case, digits and symbols"
    ]


def test_a_policy_no_iam_password_can_meet_is_refused_with_what_to_fix() -> None:
    """A minimum length above IAM's 128 characters cannot be met: `PasswordRefused`
    names the policy to fix instead of a password IAM would refuse."""
    with pytest.raises(PasswordRefused, match="GetAccountPasswordPolicy"):
        new_password(PasswordPolicy(minimum_length=MAX_LENGTH + 1))
