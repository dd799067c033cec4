"""Owner warnings, pure: which stage each key is warned at, once, and one digest per
owner."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from rotator.commands import suggested
from rotator.digests import (
    build_digests,
    deactivation_notices,
    fill_key_ids,
    is_email_address,
    owner_of,
    pending_warnings,
    users_missing_key_ids,
)
from rotator.model import AccessKey, IamUser, KeyDecision, KeyStatus
from rotator.policy import Rules, decide_user

NOW = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
ACCOUNT = "123456789012"
RULES = Rules(
    max_age=timedelta(days=30),
    warn_age=timedelta(days=20),
    include_paths=("/",),
    exclude_users=(),
    exempt_tag="rotator:exempt",
    quarantine_policies=frozenset(),
)
STAGES = (timedelta(days=14), timedelta(days=7), timedelta(days=1))


def decided(name: str, kid: str | None, age_days: float, **tags: str) -> list[KeyDecision]:
    key = AccessKey(kid, KeyStatus.ACTIVE, NOW - timedelta(days=age_days), last_used_at=NOW)
    user = IamUser(ACCOUNT, name, f"arn:aws:iam::{ACCOUNT}:user/{name}", tags=tags, keys=(key,))
    return decide_user(user, NOW, RULES)


def test_a_key_farther_than_every_stage_gets_no_warning() -> None:
    """A key 20 days from its rotation (max_age 30d, 10 days old) is not warned."""
    assert pending_warnings(decided("a", "AK1", 10), RULES, NOW, STAGES, {}) == []


def test_a_key_first_seen_inside_two_stages_is_warned_once_at_the_nearer_and_settles_both() -> None:
    """A key 5 days from due gets one line at the 7d stage, which also settles 14d."""
    (w,) = pending_warnings(decided("a", "AK1", 25), RULES, NOW, STAGES, {})
    assert (w.key_id, w.stage, w.stages, w.action) == ("AK1", "7d", ("7d", "14d"), "rotate")
    assert w.due_at == NOW + timedelta(days=5)


def test_a_stage_already_sent_for_the_same_due_moment_is_not_sent_again() -> None:
    """Once 7d and 14d are recorded for the key's due moment, nothing is pending until
    the 1d stage applies; a record for another due moment does not count."""
    due = NOW + timedelta(days=5)
    sent = {"AK1": {"7d": due, "14d": due}}
    assert pending_warnings(decided("a", "AK1", 25), RULES, NOW, STAGES, sent) == []
    later = NOW + timedelta(days=4, hours=12)  # the same key, half a day before due
    (w,) = pending_warnings(decided("a", "AK1", 25), RULES, later, STAGES, sent)
    assert (w.stage, w.stages) == ("1d", ("1d",))
    moved = {"AK1": {"7d": due - timedelta(days=3), "14d": due - timedelta(days=3)}}
    (w,) = pending_warnings(decided("a", "AK1", 25), RULES, NOW, STAGES, moved)
    assert w.stage == "7d"


def test_a_key_past_due_or_without_an_id_is_not_warned() -> None:
    """A key already due is left to the pass that acts on it; a key with no id (only
    the credential report read) cannot be named and is not warned."""
    assert pending_warnings(decided("a", "AK1", 31), RULES, NOW, STAGES, {}) == []
    assert pending_warnings(decided("a", None, 25), RULES, NOW, STAGES, {}) == []


def test_keys_inside_the_farthest_stage_without_ids_are_found_and_filled_in() -> None:
    """Users with an id-less key inside 14d are listed; `fill_key_ids` matches listed
    keys by creation second."""
    decisions = decided("a", None, 25) + decided("b", None, 5)
    assert users_missing_key_ids(decisions, RULES, NOW, STAGES) == {(ACCOUNT, "a")}
    listed = AccessKey("AK9", KeyStatus.ACTIVE, decisions[0].key.created_at.replace(microsecond=7))
    filled = fill_key_ids(decisions, {(ACCOUNT, "a"): [listed]})
    assert [d.key.access_key_id for d in filled] == ["AK9", None]


def test_one_digest_per_owner_with_fallback_and_keys_nobody_owns_returned_apart() -> None:
    """Keys are grouped by the owner tag's value; an untagged user goes to the fallback
    owner, and with no fallback its warning is returned as ownerless."""
    decisions = (
        decided("a", "AK1", 25, owner="ann@example.com")
        + decided("a2", "AK2", 29.5, owner="ann@example.com")
        + decided("b", "AK3", 20, owner="@bob")
        + decided("c", "AK4", 25)
    )
    warnings = pending_warnings(decisions, RULES, NOW, STAGES, {})
    digests, nobody = build_digests(decisions, warnings, "owner", "secops@example.com")
    assert nobody == []
    by_owner = {d.owner: [w.key_id for w in d.warnings] for d in digests}
    assert by_owner == {
        "@bob": ["AK3"],
        "ann@example.com": ["AK2", "AK1"],
        "secops@example.com": ["AK4"],
    }
    ann = next(d for d in digests if d.owner == "ann@example.com")
    assert "a2 (123456789012) key AK2: will be rotated after" in ann.text
    assert "(rule default; 1d notice)" in ann.text
    digests, nobody = build_digests(decisions, warnings, "owner", None)
    assert [w.key_id for w in nobody] == ["AK4"]
    assert len(digests) == 2


def test_owner_of_reads_the_configured_tag_and_email_addresses_are_told_from_handles() -> None:
    """The owner is the configured tag's trimmed value, else the fallback; an address
    has a local part, an @ and a dotted domain."""
    assert owner_of({"team-owner": " x@y.io "}, "team-owner", None) == "x@y.io"
    assert owner_of({"owner": ""}, "owner", "fb") == "fb"
    assert is_email_address("ann@example.com")
    assert not is_email_address("@bob")
    assert not is_email_address("ann@localhost")


def test_a_deactivation_notice_gives_a_reactivate_command_that_runs_for_any_user_name() -> None:
    """The line for a key deactivated as unused names the key and the command that turns
    it back on; for a user name that begins with `-` the command puts the name after
    `--`, or the command line would read it as an option."""
    [plain] = deactivation_notices(decided("ann", "AK1", 60), NOW)
    assert plain.line().endswith("to turn it back on: rotator reactivate ann --key AK1")
    [dashed] = deactivation_notices(decided("-svc", "AK2", 60), NOW)
    assert dashed.line().endswith("rotator reactivate --key AK2 -- -svc")
    digest, nobody = build_digests(decided("ann", "AK1", 60), [plain], "owner", "sec@example.com")
    assert nobody == []
    assert "just deactivated as unused" in digest[0].text
    assert "changed or will change soon" in digest[0].subject


def test_suggested_commands_put_an_option_like_user_name_after_a_double_dash() -> None:
    """`suggested` writes `rotator VERB USER OPTIONS`, and `rotator VERB OPTIONS -- USER`
    for a name that begins with `-`."""
    assert suggested("rotate", "bob", "--console") == "rotator rotate bob --console"
    assert suggested("rollback", "-x") == "rotator rollback -- -x"


def test_a_deactivated_key_whose_slot_a_rotation_takes_offers_no_reactivation() -> None:
    """A key deactivated as unused while the same pass rotates the user's other key
    (whose rotation deletes the idle one to free its slot) is told as deleted, with no
    reactivate command that could not work; one idle for less than inactive_min_idle
    keeps the command (MAKE_ROOM does not delete it)."""
    idle = [replace(d, idle_since=NOW - timedelta(days=60)) for d in decided("ann", "AK1", 60)]
    [taken] = deactivation_notices(idle, NOW, {(ACCOUNT, "ann"): "AK9"}, timedelta(days=7))
    assert "deleted to free its slot for the rotation of key AK9" in taken.line()
    assert "reactivate" not in taken.line()
    [kept] = deactivation_notices(idle, NOW, {(ACCOUNT, "ann"): "AK9"}, timedelta(days=90))
    assert "rotator reactivate ann --key AK1" in kept.line()
