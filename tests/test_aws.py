"""The AWS adapter: pagination and error translation, with botocore's Stubber (moto does
not paginate users) and against the moto server."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from botocore.stub import Stubber

from rotator.aws import AwsIam
from rotator.errors import (
    BackendUnavailable,
    CapConflict,
    NotFound,
    PermissionDenied,
    RotatorError,
    Transient,
)
from rotator.model import KeyStatus
from rotator.sandbox import LocalAws, SeedKey, free_port
from tests.faultproxy import Action, DropAfterApply, FaultProxy, Respond, aws_action, aws_error

MakeProxy = Callable[[str], FaultProxy]

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
        {"Filter": ["User", "Group"], "MaxItems": 1000},
    )
    stub.add_response(
        "get_account_authorization_details",
        {"UserDetailList": [detail("c")], "IsTruncated": False},
        {"Filter": ["User", "Group"], "MaxItems": 1000, "Marker": "m1"},
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


# --- the retry vocabulary, against moto through the fault-injecting proxy ------------


def proxied(aws: LocalAws, fault_proxy: MakeProxy, reply: Action) -> tuple[AwsIam, FaultProxy]:
    """An AwsIam whose ListAccessKeys calls get `reply` from the proxy in front of moto
    (one attempt: what the SDK's own retries would do is not the question here)."""
    aws.add_user("alice", keys=[SeedKey(timedelta(days=3))])
    proxy = fault_proxy(aws.endpoint_url)
    proxy.add(aws_action("ListAccessKeys"), reply)
    return AwsIam(region="us-east-1", endpoint_url=proxy.url, max_attempts=1), proxy


@pytest.mark.parametrize(
    "reply",
    [
        aws_error("ValidationError", 400),
        aws_error("InvalidInput", 400),
        aws_error("OptInRequired", 403),
        aws_error("NoSuchFeature", 404),
        aws_error("MalformedSomething", 422),
        Respond(418, b"I'm a teapot"),
        Respond(403, b"<!DOCTYPE html><html><body>Blocked by policy<br></body></html>"),
    ],
    ids=[
        "ValidationError",
        "InvalidInput",
        "OptInRequired-403",
        "unknown-404",
        "422",
        "418-plain",
        "403-proxy-page",
    ],
)
def test_an_unknown_4xx_is_a_refusal_never_retried(
    aws: LocalAws, fault_proxy: MakeProxy, reply: Action
) -> None:
    """A 4xx whose code aws.py does not know, or that is not AWS's XML at all (a proxy's
    page), is a bug or a refusal: a plain RotatorError (not Transient, so nobody retries
    it), marked answered and not applied, naming the action; the call was sent once."""
    iam, proxy = proxied(aws, fault_proxy, reply)
    with pytest.raises(RotatorError) as info:
        iam.list_access_keys("alice")
    assert not isinstance(info.value, Transient)
    assert type(info.value) is RotatorError
    assert (info.value.answered, info.value.not_applied) == (True, True)
    assert "iam:ListAccessKeys: refused" in str(info.value)
    assert iam.calls["iam:ListAccessKeys"] == 1
    assert len(proxy.outcomes(aws_action("ListAccessKeys"))) == 1


@pytest.mark.parametrize(
    ("reply", "not_applied"),
    [
        (aws_error("Throttling", 400), True),
        (Respond(429, b"Too Many Requests"), True),
        (Respond(429, b""), True),
        (aws_error("SlowDownPlease", 429), True),
        (Respond(408, b"Request Timeout"), True),
        (aws_error("ServiceFailure", 500), False),
        (aws_error("SomethingBroke", 500), False),
        (Respond(502, b"Bad Gateway"), False),
        (Respond(504, b"Gateway Timeout"), False),
    ],
    ids=[
        "Throttling",
        "429-plain",
        "429-empty",
        "429-unknown-code",
        "408",
        "500",
        "500-unknown",
        "502",
        "504",
    ],
)
def test_throttling_timeouts_and_5xx_are_transient(
    aws: LocalAws, fault_proxy: MakeProxy, reply: Action, not_applied: bool
) -> None:
    """Throttling (by code, or a 429 whatever its code or body), a 408 and any 5xx are
    Transient: worth retrying later. A 5xx may have been applied; a 408 or 429 was not."""
    iam, _ = proxied(aws, fault_proxy, reply)
    with pytest.raises(Transient) as info:
        iam.list_access_keys("alice")
    assert info.value.answered
    assert info.value.not_applied is not_applied


def test_a_success_answer_that_cannot_be_read_is_transient_not_a_botocore_error(
    aws: LocalAws, fault_proxy: MakeProxy
) -> None:
    """A 200 whose body is not IAM's XML (a proxy's page): Transient, the project's own
    error, with botocore's only as the cause."""
    iam, _ = proxied(aws, fault_proxy, Respond(200, b"<html>Welcome to the hotel wifi"))
    with pytest.raises(Transient) as info:
        iam.list_access_keys("alice")
    assert type(info.value).__module__ == "rotator.errors"
    assert type(info.value.__cause__).__module__.startswith("botocore")


def test_a_connection_closed_before_the_answer_is_transient_and_may_have_been_applied(
    aws: LocalAws, fault_proxy: MakeProxy
) -> None:
    """IAM applied the call but the answer never came: Transient (BackendUnavailable),
    neither answered nor known to be unapplied."""
    iam, _ = proxied(aws, fault_proxy, DropAfterApply())
    with pytest.raises(BackendUnavailable) as info:
        iam.list_access_keys("alice")
    assert (info.value.answered, info.value.not_applied) == (False, False)


def test_the_known_4xx_codes_keep_their_own_errors_through_a_real_answer(
    aws: LocalAws, fault_proxy: MakeProxy
) -> None:
    """The 4xx codes aws.py knows stay what they mean (not a generic refusal): the key
    cap is CapConflict, a missing user NotFound, AccessDenied PermissionDenied."""
    for reply, error in (
        (aws_error("LimitExceeded", 409), CapConflict),
        (aws_error("NoSuchEntity", 404), NotFound),
        (aws_error("AccessDenied", 403), PermissionDenied),
    ):
        iam, proxy = proxied(aws, fault_proxy, reply)
        with pytest.raises(error) as info:
            iam.list_access_keys("alice")
        assert not isinstance(info.value, Transient)
        assert info.value.not_applied
        proxy.close()
        aws.reset()


def test_a_request_botocore_refuses_to_send_is_not_retried() -> None:
    """A value IAM cannot take (an empty user name) is refused by botocore before it is
    sent: a plain RotatorError, not Transient, and certainly not applied."""
    iam = AwsIam(region="us-east-1", endpoint_url="http://127.0.0.1:9", account_id=ACCOUNT)
    with pytest.raises(RotatorError) as info:
        iam.list_access_keys("")
    assert not isinstance(info.value, Transient)
    assert info.value.not_applied
    assert iam.calls["iam:ListAccessKeys"] == 0
