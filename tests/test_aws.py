"""The AWS adapter: pagination and error translation, with botocore's Stubber (moto does
not paginate users) and against the moto server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from botocore.stub import Stubber

from rotator.aws import AwsIam
from rotator.errors import BackendUnavailable, CapConflict, NotFound, PermissionDenied, Transient
from rotator.model import KeyStatus
from rotator.sandbox import LocalAws, SeedKey, free_port

ACCOUNT = "123456789012"


def detail(name: str) -> dict[str, object]:
    return {
        "UserName": name,
        "UserId": "AIDA" + name.upper().ljust(17, "X"),
        "Arn": f"arn:aws:iam::{ACCOUNT}:user/{name}",
        "Path": "/",
        "CreateDate": datetime(2026, 1, 1, tzinfo=UTC),
        "Tags": [{"Key": "team", "Value": name}],
        "AttachedManagedPolicies": [],
    }


def stubbed() -> tuple[AwsIam, Stubber]:
    iam = AwsIam(region="us-east-1", endpoint_url="http://127.0.0.1:9", account_id=ACCOUNT)
    return iam, Stubber(iam._iam)


def test_authorization_details_follows_every_page() -> None:
    """Users are read from every page of GetAccountAuthorizationDetails, passing the marker."""
    iam, stub = stubbed()
    stub.add_response(
        "get_account_authorization_details",
        {"UserDetailList": [detail("a"), detail("b")], "IsTruncated": True, "Marker": "m1"},
        {"Filter": ["User"], "MaxItems": 1000},
    )
    stub.add_response(
        "get_account_authorization_details",
        {"UserDetailList": [detail("c")], "IsTruncated": False},
        {"Filter": ["User"], "MaxItems": 1000, "Marker": "m1"},
    )
    with stub:
        users = list(iam.iter_users_with_details())
    stub.assert_no_pending_responses()
    assert [u.user_name for u in users] == ["a", "b", "c"]
    assert users[2].tags == {"team": "c"}


def test_list_access_keys_follows_every_page() -> None:
    """Keys are read from every page of ListAccessKeys."""
    iam, stub = stubbed()
    meta = {"UserName": "a", "Status": "Active", "CreateDate": datetime(2026, 1, 1, tzinfo=UTC)}
    stub.add_response(
        "list_access_keys",
        {
            "AccessKeyMetadata": [{**meta, "AccessKeyId": "AKIAFIRSTPAGE0000000"}],
            "IsTruncated": True,
            "Marker": "k",
        },
        {"UserName": "a"},
    )
    stub.add_response(
        "list_access_keys",
        {
            "AccessKeyMetadata": [
                {**meta, "AccessKeyId": "AKIASECONDPAGE000000", "Status": "Inactive"}
            ],
            "IsTruncated": False,
        },
        {"UserName": "a", "Marker": "k"},
    )
    with stub:
        keys = iam.list_access_keys("a")
    assert [(k.access_key_id, k.status) for k in keys] == [
        ("AKIAFIRSTPAGE0000000", KeyStatus.ACTIVE),
        ("AKIASECONDPAGE000000", KeyStatus.INACTIVE),
    ]


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        ("AccessDenied", 403, PermissionDenied),
        ("Throttling", 400, Transient),
        ("NoSuchEntity", 404, NotFound),
        ("LimitExceeded", 409, CapConflict),
        ("ServiceFailure", 500, Transient),
    ],
)
def test_client_errors_are_translated_by_code(
    code: str, status: int, error: type[Exception]
) -> None:
    """Each IAM error code becomes the project's own error, never an empty result."""
    iam, stub = stubbed()
    stub.add_client_error("list_access_keys", service_error_code=code, http_status_code=status)
    with stub, pytest.raises(error):
        iam.list_access_keys("a")


def test_access_denied_on_scan_raises_naming_the_action() -> None:
    """AccessDenied on the bulk user listing is an error naming the IAM action."""
    iam, stub = stubbed()
    stub.add_client_error("get_account_authorization_details", "AccessDenied", http_status_code=403)
    with stub, pytest.raises(PermissionDenied, match="iam:GetAccountAuthorizationDetails"):
        list(iam.iter_users_with_details())


def test_unreachable_endpoint_is_backend_unavailable() -> None:
    """An endpoint nobody listens on is reported as unreachable."""
    iam = AwsIam(region="us-east-1", endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    with pytest.raises(BackendUnavailable, match="cannot reach AWS"):
        iam.account_id()


def test_create_access_key_is_sent_once_even_when_throttled() -> None:
    """CreateAccessKey goes out exactly once: the SDK never retries it."""
    iam = AwsIam(region="us-east-1", endpoint_url="http://127.0.0.1:9", account_id=ACCOUNT)
    stub = Stubber(iam._iam_once)
    stub.add_client_error("create_access_key", "Throttling", http_status_code=400)
    with stub, pytest.raises(Transient):
        iam.create_access_key("a")
    assert iam.calls["iam:CreateAccessKey"] <= 1
    assert iam._iam_once.meta.config.retries["total_max_attempts"] == 1


def test_key_lifecycle_against_moto(aws: LocalAws) -> None:
    """Create, deactivate, look up the owner of and delete a key on the moto server."""
    aws.add_user("alice", keys=[SeedKey(timedelta(days=3))])
    iam = AwsIam(region="us-east-1", endpoint_url=aws.endpoint_url)
    new = iam.create_access_key("alice")
    assert "alice" in iam.caller_arn(new)
    assert iam.key_last_used(new.access_key_id).user_name == "alice"
    iam.set_key_status("alice", new.access_key_id, KeyStatus.INACTIVE)
    assert aws.keys("alice")[new.access_key_id] is KeyStatus.INACTIVE
    iam.delete_access_key("alice", new.access_key_id)
    assert new.access_key_id not in aws.keys("alice")
    assert iam.account_id() == ACCOUNT
    assert iam.calls["iam:CreateAccessKey"] == 1


def test_third_key_is_a_cap_conflict(aws: LocalAws) -> None:
    """IAM's two-key cap surfaces as CapConflict."""
    aws.add_user("bob", keys=[SeedKey(timedelta(days=1)), SeedKey(timedelta(days=2))])
    iam = AwsIam(region="us-east-1", endpoint_url=aws.endpoint_url)
    with pytest.raises(CapConflict):
        iam.create_access_key("bob")


def test_missing_user_is_not_found(aws: LocalAws) -> None:
    """Asking for a user IAM does not know raises NotFound."""
    iam = AwsIam(region="us-east-1", endpoint_url=aws.endpoint_url)
    with pytest.raises(NotFound):
        iam.user_details("nobody")
