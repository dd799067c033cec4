"""The IamPort contract: IAM (and STS) as the core relies on them, held on the in-memory
fake and on `AwsIam` against the moto server.

Users and keys are seeded with the same helper on both (`LocalAws.add_user`,
`FakeIam.add_user`), the way an operator would have made them: backdated keys, tags,
attached policies."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import boto3
import pytest

from rotator.aws import AwsIam
from rotator.errors import CapConflict, NotFound, RotatorError
from rotator.inventory import fetch_credential_report, parse_credential_report
from rotator.model import IamGroup, KeyStatus, NewKey
from rotator.ports import IamPort, KeyLastUsed
from rotator.sandbox import ACCOUNT_ID, QUARANTINE_V2, LocalAws, SeedKey
from rotator.testing import FakeIam

D = timedelta(days=1)
S = timedelta(seconds=1)
ADMIN = "arn:aws:iam::aws:policy/AdministratorAccess"
READ_ONLY = "arn:aws:iam::aws:policy/ReadOnlyAccess"
KEY_ID = re.compile(r"AKIA[A-Z0-9]{16}")
UNKNOWN_KEY = "AKIAUNKNOWN000000000"

# One boto3 session for the module: building clients from a fresh one costs a quarter
# of a second, most of a test's time here.
_SESSION = boto3.session.Session()


class AddUser(Protocol):
    def __call__(
        self,
        name: str,
        *,
        path: str = "/",
        tags: dict[str, str] | None = None,
        policies: tuple[str, ...] = (),
        keys: tuple[SeedKey, ...] = (),
        now: datetime | None = None,
    ) -> list[NewKey]: ...


class AddGroup(Protocol):
    def __call__(
        self,
        name: str,
        *,
        path: str = "/",
        policies: tuple[str, ...] = (),
        users: tuple[str, ...] = (),
    ) -> None: ...


@dataclass(frozen=True)
class Iam:
    """An IAM port, and the backend's own view of it for seeding and for checking."""

    port: IamPort
    add_user: AddUser
    keys: Callable[[str], dict[str, KeyStatus]]
    set_last_used: Callable[[str, str, datetime], None]
    add_group: AddGroup


def _fake(request: pytest.FixtureRequest) -> Iam:
    fake = FakeIam(ACCOUNT_ID)
    return Iam(fake, fake.add_user, fake.keys, fake.set_last_used, fake.add_group)


def _moto(request: pytest.FixtureRequest) -> Iam:
    aws: LocalAws = request.getfixturevalue("aws")
    port = AwsIam(region="us-east-1", endpoint_url=aws.endpoint_url, session=_SESSION)
    return Iam(port, aws.add_user, aws.keys, aws.set_last_used, aws.add_group)


PORTS: dict[str, Callable[[pytest.FixtureRequest], Iam]] = {"fake": _fake, "real": _moto}


@pytest.fixture(params=list(PORTS))
def iam(request: pytest.FixtureRequest) -> Iam:
    return PORTS[request.param](request)


def now() -> datetime:
    return datetime.now(UTC)


# --- keys --------------------------------------------------------------------------------


def test_a_created_key_is_listed_active_with_the_time_it_was_made(iam: Iam) -> None:
    """CreateAccessKey returns an AKIA key id and its secret; the key is then listed as
    Active, created now."""
    iam.add_user("alice")
    before = now()
    new = iam.port.create_access_key("alice")
    after = now()
    assert KEY_ID.fullmatch(new.access_key_id)
    assert new.secret_access_key
    [listed] = iam.port.list_access_keys("alice")
    assert (listed.access_key_id, listed.status) == (new.access_key_id, KeyStatus.ACTIVE)
    # IAM stamps CreateDate in whole seconds; moto keeps microseconds.
    assert before - S <= listed.created_at <= after + S
    assert listed.created_at.utcoffset() == timedelta(0)


def test_a_third_key_is_refused_as_a_cap_conflict_even_beside_an_inactive_one(
    iam: Iam,
) -> None:
    """IAM's cap of two keys counts Inactive keys too: a third CreateAccessKey raises
    CapConflict, marked as a refusal that minted nothing, and the keys stay as they were."""
    seeded = iam.add_user("bob", keys=(SeedKey(2 * D), SeedKey(1 * D, status=KeyStatus.INACTIVE)))
    before = iam.keys("bob")
    with pytest.raises(CapConflict) as info:
        iam.port.create_access_key("bob")
    assert info.value.answered
    assert info.value.not_applied
    assert iam.keys("bob") == before
    assert set(before) == {k.access_key_id for k in seeded}


def test_set_key_status_turns_a_key_off_and_on_again_and_repeating_it_is_harmless(
    iam: Iam,
) -> None:
    """UpdateAccessKey sets Inactive and Active; setting the status a key already has
    changes nothing and raises nothing."""
    [key] = iam.add_user("carol", keys=(SeedKey(3 * D),))
    iam.port.set_key_status("carol", key.access_key_id, KeyStatus.INACTIVE)
    iam.port.set_key_status("carol", key.access_key_id, KeyStatus.INACTIVE)
    assert iam.keys("carol") == {key.access_key_id: KeyStatus.INACTIVE}
    iam.port.set_key_status("carol", key.access_key_id, KeyStatus.ACTIVE)
    assert [k.status for k in iam.port.list_access_keys("carol")] == [KeyStatus.ACTIVE]


def test_a_deleted_key_is_gone_and_deleting_it_again_is_not_found(iam: Iam) -> None:
    """DeleteAccessKey removes the key (freeing its slot); a second delete raises NotFound."""
    old, other = iam.add_user("dave", keys=(SeedKey(100 * D), SeedKey(1 * D)))
    iam.port.delete_access_key("dave", old.access_key_id)
    assert list(iam.keys("dave")) == [other.access_key_id]
    with pytest.raises(NotFound):
        iam.port.delete_access_key("dave", old.access_key_id)
    iam.port.create_access_key("dave")
    assert len(iam.keys("dave")) == 2


def test_list_access_keys_shows_each_key_with_its_status_and_creation_time(iam: Iam) -> None:
    """ListAccessKeys gives every key's id, status and creation time (no last use)."""
    moment = now()
    keys = iam.add_user(
        "erin",
        keys=(SeedKey(200 * D, status=KeyStatus.INACTIVE), SeedKey(10 * D, last_used_ago=D)),
        now=moment,
    )
    listed = sorted(iam.port.list_access_keys("erin"), key=lambda k: k.created_at)
    assert [k.access_key_id for k in listed] == [k.access_key_id for k in keys]
    assert [k.status for k in listed] == [KeyStatus.INACTIVE, KeyStatus.ACTIVE]
    for key, age in zip(listed, (200 * D, 10 * D), strict=True):
        assert abs(key.created_at - (moment - age)) <= S
        assert key.last_used_at is None


def test_every_call_naming_an_unknown_user_raises_not_found_as_a_refusal(iam: Iam) -> None:
    """ListAccessKeys, CreateAccessKey, UpdateAccessKey, DeleteAccessKey and GetUser for a
    user IAM does not know raise NotFound (a refusal: nothing happened), never an empty
    answer."""
    calls: list[Callable[[], object]] = [
        lambda: iam.port.list_access_keys("nobody"),
        lambda: iam.port.create_access_key("nobody"),
        lambda: iam.port.set_key_status("nobody", UNKNOWN_KEY, KeyStatus.INACTIVE),
        lambda: iam.port.delete_access_key("nobody", UNKNOWN_KEY),
        lambda: iam.port.user_details("nobody"),
    ]
    for call in calls:
        with pytest.raises(NotFound) as info:
            call()
        assert info.value.not_applied


def test_an_unknown_key_or_another_users_key_is_not_found(iam: Iam) -> None:
    """A key id the user does not hold, whether nobody's or another user's, raises
    NotFound for UpdateAccessKey and DeleteAccessKey and leaves that key alone;
    GetAccessKeyLastUsed of an id nobody holds raises NotFound too."""
    [theirs] = iam.add_user("frank", keys=(SeedKey(D),))
    iam.add_user("gina")
    for key_id in (UNKNOWN_KEY, theirs.access_key_id):
        with pytest.raises(NotFound):
            iam.port.set_key_status("gina", key_id, KeyStatus.INACTIVE)
        with pytest.raises(NotFound):
            iam.port.delete_access_key("gina", key_id)
    assert iam.keys("frank") == {theirs.access_key_id: KeyStatus.ACTIVE}
    with pytest.raises(NotFound):
        iam.port.key_last_used(UNKNOWN_KEY)


def test_key_last_used_names_the_owner_and_is_none_for_a_key_never_used(iam: Iam) -> None:
    """GetAccessKeyLastUsed names the key's user, with no time for a key never used
    (a new key among them) and the time of last use for a used one."""
    moment = now()
    [idle, used] = iam.add_user(
        "hank", keys=(SeedKey(5 * D), SeedKey(4 * D, last_used_ago=2 * D)), now=moment
    )
    assert iam.port.key_last_used(idle.access_key_id) == KeyLastUsed("hank", None)
    last = iam.port.key_last_used(used.access_key_id)
    assert last.user_name == "hank"
    assert last.last_used_at is not None
    assert abs(last.last_used_at - (moment - 2 * D)) <= S
    iam.set_last_used("hank", idle.access_key_id, moment)
    seen = iam.port.key_last_used(idle.access_key_id).last_used_at
    assert seen is not None
    assert abs(seen - moment) <= S
    iam.port.delete_access_key("hank", idle.access_key_id)
    new = iam.port.create_access_key("hank")
    assert iam.port.key_last_used(new.access_key_id).last_used_at is None


def test_a_new_key_authenticates_as_its_user(iam: Iam) -> None:
    """`caller_arn` with a freshly created key pair is the user's ARN."""
    iam.add_user("ivy", path="/svc/")
    new = iam.port.create_access_key("ivy")
    assert iam.port.caller_arn(new) == f"arn:aws:iam::{ACCOUNT_ID}:user/svc/ivy"


def test_no_secret_shows_in_the_repr_of_the_port_or_of_the_new_key(iam: Iam) -> None:
    """The secret of a minted key is in neither repr nor str of the key or of the port
    (a fake holds every secret it minted)."""
    iam.add_user("pat")
    new = iam.port.create_access_key("pat")
    for obj in (iam.port, new):
        assert new.secret_access_key not in repr(obj)
        assert new.secret_access_key not in str(obj)


# --- users and the account ---------------------------------------------------------------


def test_the_account_id_is_the_accounts(iam: Iam) -> None:
    """`account_id` is the account the port speaks for."""
    assert iam.port.account_id() == ACCOUNT_ID


def test_user_details_carry_path_arn_tags_and_attached_policies(iam: Iam) -> None:
    """GetUser with its tags and attached managed policies gives the whole user."""
    iam.add_user("jack", path="/ops/", tags={"rotator:exempt": "true"}, policies=(QUARANTINE_V2,))
    user = iam.port.user_details("jack")
    assert (user.account_id, user.user_name, user.path, user.arn) == (
        ACCOUNT_ID,
        "jack",
        "/ops/",
        f"arn:aws:iam::{ACCOUNT_ID}:user/ops/jack",
    )
    assert dict(user.tags) == {"rotator:exempt": "true"}
    assert user.attached_policy_arns == {QUARANTINE_V2}
    assert user.keys == ()


def test_the_bulk_listing_has_every_user_with_tags_and_policies(iam: Iam) -> None:
    """Every user comes from GetAccountAuthorizationDetails with its tags and attached
    policies, and without keys (those come from the credential report or ListAccessKeys)."""
    iam.add_user("kim", tags={"team": "a"}, policies=(QUARANTINE_V2,), keys=(SeedKey(D),))
    iam.add_user("lee")
    bulk = {u.user_name: u for u in iam.port.iter_users_with_details()}
    assert set(bulk) == {"kim", "lee"}
    assert dict(bulk["kim"].tags) == {"team": "a"}
    assert bulk["kim"].attached_policy_arns == {QUARANTINE_V2}
    assert bulk["kim"].keys == ()
    assert dict(bulk["lee"].tags) == {}


def test_the_bulk_listing_gives_each_users_groups_with_what_they_attach(iam: Iam) -> None:
    """GetAccountAuthorizationDetails gives every user its groups, each with the managed
    policies attached to the group, beside the user's own attached policies; a user in
    no group has none. `user_details` (GetUser and friends) reads no groups."""
    iam.add_user("uma", policies=(QUARANTINE_V2,))
    iam.add_user("vic")
    iam.add_user("wes")
    iam.add_group("admins", path="/ops/", policies=(ADMIN, READ_ONLY), users=("uma", "vic"))
    iam.add_group("deployers", users=("vic",))
    bulk = {u.user_name: u for u in iam.port.iter_users_with_details()}
    assert bulk["uma"].groups == (IamGroup("admins", frozenset({ADMIN, READ_ONLY})),)
    assert bulk["uma"].attached_policy_arns == {QUARANTINE_V2}
    assert sorted(g.name for g in bulk["vic"].groups) == ["admins", "deployers"]
    assert {g.name: g.attached_policy_arns for g in bulk["vic"].groups}["deployers"] == set()
    assert bulk["vic"].attached_policy_arns == set()
    assert bulk["wes"].groups == ()
    assert iam.port.user_details("uma").groups == ()


def test_the_credential_report_gives_every_users_keys_once_generated(iam: Iam) -> None:
    """No report is there before one is generated; once GenerateCredentialReport says
    COMPLETE, the report lists each user's keys with status, age and last use (to the
    second, and without key ids)."""
    moment = now()
    iam.add_user(
        "mia",
        keys=(SeedKey(90 * D, last_used_ago=3 * D), SeedKey(D, status=KeyStatus.INACTIVE)),
        now=moment,
    )
    iam.add_user("ned")
    assert iam.port.get_credential_report() is None
    report = parse_credential_report(fetch_credential_report(iam.port, sleep=lambda _: None))
    assert set(report) == {"mia", "ned"}
    assert report["ned"] == []
    first, second = sorted(report["mia"], key=lambda k: k.created_at)
    assert first.access_key_id is None
    assert (first.status, second.status) == (KeyStatus.ACTIVE, KeyStatus.INACTIVE)
    assert abs(first.created_at - (moment - 90 * D)) <= S
    assert first.last_used_at is not None
    assert abs(first.last_used_at - (moment - 3 * D)) <= S
    assert second.last_used_at is None
    assert iam.port.generate_credential_report() == "COMPLETE"


def test_iam_time_is_unknown_before_any_answer_and_iams_clock_after(iam: Iam) -> None:
    """`iam_time` is None until IAM has answered a call, then IAM's clock now."""
    assert iam.port.iam_time() is None
    iam.add_user("oz")
    iam.port.list_access_keys("oz")
    seen = iam.port.iam_time()
    assert seen is not None
    assert abs(seen - now()) <= 5 * S


def test_errors_are_the_projects_own(iam: Iam) -> None:
    """What crosses the port is a `rotator.errors` type, never a backend's."""
    with pytest.raises(RotatorError) as info:
        iam.port.list_access_keys("nobody")
    assert type(info.value).__module__ == "rotator.errors"
