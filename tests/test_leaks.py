"""Parsing AWS Health key-exposure events: the real shapes AWS and its samples publish
(tests/fixtures/health), one bad entity among good ones, and input built to hurt the
parser. Pure: no server needed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from rotator.errors import BadInput
from rotator.leaks import MAX_EVENT_BYTES, MAX_JSON_DEPTH, LeakedKey, LeakEvent, parse_event

FIXTURES = Path(__file__).parent / "fixtures" / "health"
ARN = "arn:aws:health:us-east-1::event/AWS_RISK_CREDENTIALS_EXPOSED_XXXXXXXXXXXXXXXXX"
K1, K2, K3 = "AKIAAAAAAAAAAAAAAAA1", "AKIABBBBBBBBBBBBBBB2", "AKIACCCCCCCCCCCCCCC3"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def plain_event(*values: Any, **detail: Any) -> dict[str, Any]:
    """The aws-health-tools sample with `values` as its entities' entityValue."""
    event = fixture("aws-health-tools-risk-credentials-exposed.json")
    event["detail"]["affectedEntities"] = [{"entityValue": v} for v in values]
    event["detail"].update(detail)
    return event


def rejection(raw: bytes | str) -> str:
    with pytest.raises(BadInput) as info:
        parse_event(raw)
    message = str(info.value)
    assert message
    assert "\n" not in message
    return message


# --- the real shapes --------------------------------------------------------------------


def test_aws_health_tools_sample_names_its_key() -> None:
    """The aws-health-tools sample gives its account, code, ARN and one key, owner unknown."""
    # Shape: README of automated-actions/AWS_RISK_CREDENTIALS_EXPOSED in
    # https://github.com/aws/aws-health-tools (the test JSON for the ExposedKey state machine).
    raw = (FIXTURES / "aws-health-tools-risk-credentials-exposed.json").read_bytes()
    event = parse_event(raw)
    assert event == LeakEvent(
        account_id="123456789012",
        event_code="AWS_RISK_CREDENTIALS_EXPOSED",
        event_id=ARN,
        keys=(LeakedKey("AKIAIOSFODNN7EXAMPLE", None),),
        skipped=(),
    )
    assert event.key_ids == ("AKIAIOSFODNN7EXAMPLE",)
    assert event.reason == f"AWS Health AWS_RISK_CREDENTIALS_EXPOSED ({ARN})"


def test_notify_and_remediate_sample_gives_the_keys_owner() -> None:
    """The sample with eventMetadata names the key's owner; string page/totalPages pass."""
    # Shape: README "Test Event Template" of
    # https://github.com/aws-samples/notify-and-remediate-exposed-access-key (its Lambda reads
    # detail.eventMetadata.publicKey and .userName); redacted ids replaced by fakes.
    raw = (FIXTURES / "notify-and-remediate-exposed-access-key.json").read_text()
    event = parse_event(raw)
    assert event.account_id == "123456789012"
    assert event.event_code == "AWS_RISK_CREDENTIALS_EXPOSED"
    assert (
        event.event_id
        == fixture("notify-and-remediate-exposed-access-key.json")["detail"]["eventArn"]
    )
    assert event.keys == (LeakedKey("AKIAI44QH8DHBEXAMPLE", "test-1"),)
    assert event.skipped == ()


def test_organization_view_event_is_about_the_affected_account() -> None:
    """An event received by the management account acts on detail.affectedAccount."""
    # Shape: detail layout of https://docs.aws.amazon.com/health/latest/ug/
    # aws-health-events-eventbridge-schema.html ("account ... For organizational views this
    # is a different account than the affected account"), with the notify-and-remediate
    # eventMetadata.
    data = fixture("organization-view.json")
    assert data["account"] == "111122223333"
    event = parse_event(json.dumps(data))
    assert event.account_id == "123456789012"
    assert event.keys == (LeakedKey("AKIAEXAMPLEORGVIEW01", "ci-deployer"),)


def test_sns_envelope_around_an_event_is_unwrapped() -> None:
    """An SNS notification as SQS receives it yields the event in its Message."""
    # Shape: the SQS message body in https://docs.aws.amazon.com/sns/latest/dg/
    # sns-sqs-as-subscriber.html, around the aws-health-tools sample.
    raw = (FIXTURES / "sns-envelope.json").read_text()
    event = parse_event(raw)
    assert event == parse_event(json.loads(raw)["Message"])
    assert event.account_id == "123456789012"
    assert event.key_ids == ("AKIAEXAMPLESNSWRAP01",)


# --- SNS envelopes ------------------------------------------------------------------------


def envelope(inner: Any) -> dict[str, Any]:
    outer = fixture("sns-envelope.json")
    outer["Message"] = inner if not isinstance(inner, dict) else json.dumps(inner)
    return outer


def test_an_envelope_inside_an_envelope_is_unwrapped_too() -> None:
    """SNS forwarded to SNS (two envelopes) still yields the event."""
    event = parse_event(json.dumps(envelope(envelope(plain_event(K1)))))
    assert event.key_ids == (K1,)


def test_three_envelopes_are_rejected() -> None:
    """A third SNS envelope is no delivery path AWS has: BadInput."""
    message = rejection(json.dumps(envelope(envelope(envelope(plain_event(K1))))))
    assert "SNS envelopes" in message


@pytest.mark.parametrize("message", [None, 7, ["x"], {"source": "aws.health"}])
def test_an_envelope_whose_message_is_not_a_string_is_rejected(message: Any) -> None:
    """An SNS notification's Message must be a string."""
    outer = fixture("sns-envelope.json")
    outer["Message"] = message
    assert "Message must be a string" in rejection(json.dumps(outer))


def test_subscription_confirmation_says_what_to_do() -> None:
    """A SubscriptionConfirmation on the queue is rejected with a hint, not as a bad event."""
    confirmation = {
        "Type": "SubscriptionConfirmation",
        "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "Token": "2336412f37EXAMPLE",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:health-events",
        "Message": "You have chosen to subscribe to the topic ...",
        "SubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=x",
    }
    message = rejection(json.dumps(confirmation))
    assert "SubscriptionConfirmation" in message
    assert "Token=" not in message


# --- each key on its own ------------------------------------------------------------------


def test_a_bad_entity_is_skipped_with_a_note_and_the_good_keys_remain() -> None:
    """Entities that are not access key ids are noted; the keys around them are kept."""
    event = parse_event(
        json.dumps(
            plain_event(
                K1,
                "arn:aws:iam::123456789012:user/test-user",
                42,
                None,
                "ASIAEXAMPLETEMPKEY01",
                K2,
            )
        )
    )
    assert event.key_ids == (K1, K2)
    assert len(event.skipped) == 4
    assert event.skipped[0].startswith("detail.affectedEntities[1].entityValue")
    assert "arn:aws:iam::123456789012:user/test-user" in event.skipped[0]
    assert "detail.affectedEntities[2]" in event.skipped[1]
    assert "detail.affectedEntities[3]" in event.skipped[2]
    assert "temporary" in event.skipped[3]


def test_entities_of_the_wrong_shape_are_skipped() -> None:
    """An entity that is not an object, or has no entityValue, is noted and skipped."""
    event = plain_event(K1)
    event["detail"]["affectedEntities"] += ["AKIABBBBBBBBBBBBBBB2", {"entity": K3}, [K3]]
    parsed = parse_event(json.dumps(event))
    assert parsed.key_ids == (K1,)
    assert [n.split(" ")[0] for n in parsed.skipped] == [
        "detail.affectedEntities[1]",
        "detail.affectedEntities[2]",
        "detail.affectedEntities[3]",
    ]


def test_keys_are_deduplicated_in_order() -> None:
    """A key named twice is listed once, at its first place."""
    event = parse_event(json.dumps(plain_event(K2, K1, K2, f" {K3} ", K1)))
    assert event.key_ids == (K2, K1, K3)


def test_an_event_with_no_valid_key_is_bad_input_naming_why() -> None:
    """When no entity is a key id, the event is rejected and the message says why."""
    message = rejection(json.dumps(plain_event("not-a-key", 7)))
    assert "names no access key id" in message
    assert "detail.affectedEntities[0]" in message


@pytest.mark.parametrize("entities", [None, [], {"entityValue": K1}, "AKIA"])
def test_no_entity_list_and_no_metadata_key_is_bad_input(entities: Any) -> None:
    """Without a usable affectedEntities list or eventMetadata key there is nothing to do."""
    event = plain_event()
    event["detail"]["affectedEntities"] = entities
    assert "names no access key id" in rejection(json.dumps(event))


def test_the_user_name_belongs_only_to_the_metadata_key() -> None:
    """eventMetadata.userName is given to the key in publicKey, not to its neighbours."""
    event = parse_event(
        json.dumps(plain_event(K1, K2, eventMetadata={"publicKey": K2, "userName": "ci"}))
    )
    assert event.keys == (LeakedKey(K1, None), LeakedKey(K2, "ci"))


def test_the_metadata_key_counts_even_when_no_entity_names_it() -> None:
    """A key only in eventMetadata.publicKey is still a leaked key, after the entities."""
    event = parse_event(
        json.dumps(plain_event(K1, eventMetadata={"publicKey": K3, "userName": "svc"}))
    )
    assert event.keys == (LeakedKey(K1, None), LeakedKey(K3, "svc"))
    alone = plain_event(eventMetadata={"publicKey": K3})
    del alone["detail"]["affectedEntities"]
    assert parse_event(json.dumps(alone)).keys == (LeakedKey(K3, None),)


@pytest.mark.parametrize("user", ["N/A", "", 42, ["ci"], "a" * 65])
def test_a_metadata_user_name_that_cannot_be_one_is_dropped_with_a_note(user: Any) -> None:
    """An eventMetadata.userName that is no IAM user name is ignored; the key stays."""
    event = parse_event(
        json.dumps(plain_event(K1, eventMetadata={"publicKey": K1, "userName": user}))
    )
    assert event.keys == (LeakedKey(K1, None),)
    assert any("userName" in n for n in event.skipped)


def test_odd_metadata_is_noted_and_the_entities_still_count() -> None:
    """eventMetadata that is not an object, or a bad publicKey, leaves the entity keys."""
    for metadata in (["x"], {"publicKey": 5}, {"publicKey": "nope", "userName": "ci"}):
        event = parse_event(json.dumps(plain_event(K1, eventMetadata=metadata)))
        assert event.keys == (LeakedKey(K1, None),)
        assert len(event.skipped) == 1


def test_a_value_that_may_be_a_secret_is_not_echoed() -> None:
    """A secret access key pasted as an entity is described, never repeated in a note."""
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    event = parse_event(json.dumps(plain_event(K1, secret)))
    assert event.key_ids == (K1,)
    assert secret not in " ".join(event.skipped)
    assert "40 characters" in event.skipped[0]


def test_notes_are_capped() -> None:
    """Thousands of bad entities give a bounded list of notes."""
    event = parse_event(json.dumps(plain_event(K1, *range(5000))))
    assert event.key_ids == (K1,)
    assert len(event.skipped) == 21
    assert event.skipped[-1] == "... and 4980 more"


# --- account and identity -----------------------------------------------------------------


def test_top_level_account_is_used_without_affected_account() -> None:
    """Without detail.affectedAccount (or with null) the top-level account is the one."""
    event = plain_event(K1)
    event["account"] = "111122223333"
    assert parse_event(json.dumps(event)).account_id == "111122223333"
    event["detail"]["affectedAccount"] = None
    assert parse_event(json.dumps(event)).account_id == "111122223333"
    del event["account"]
    assert parse_event(json.dumps(event)).account_id is None


@pytest.mark.parametrize("account", ["AKIAXXXXXXXXXX", "1234567890", 123456789012, "", []])
def test_a_bad_affected_account_is_bad_input(account: Any) -> None:
    """detail.affectedAccount, when present, must be a 12-digit string."""
    message = rejection(json.dumps(plain_event(K1, affectedAccount=account)))
    assert "detail.affectedAccount" in message


@pytest.mark.parametrize("account", ["123456789012\n", "١٢٣٤٥٦٧٨٩٠١٢", 1, ["123456789012"]])
def test_a_bad_top_level_account_is_bad_input(account: Any) -> None:
    """A top-level account that is not exactly 12 ASCII digits is rejected."""
    event = plain_event(K1)
    event["account"] = account
    assert "account must be a 12-digit string" in rejection(json.dumps(event))


def test_event_id_falls_back_to_the_eventbridge_id() -> None:
    """Without a usable eventArn the event id is the EventBridge id, else None."""
    event = plain_event(K1)
    event["detail"]["eventArn"] = {"not": "a string"}
    assert parse_event(json.dumps(event)).event_id == event["id"]
    event["id"] = 7
    assert parse_event(json.dumps(event)).event_id is None


def test_a_key_id_with_a_trailing_newline_inside_is_not_a_key() -> None:
    """A key id must match whole: junk after it is not ignored."""
    event = parse_event(json.dumps(plain_event(K1, K2 + "\nX")))
    assert event.key_ids == (K1,)


# --- input built to hurt ------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 100_000,
        "{" * 100_000,
        '{"a":' * 50_000,  # 250 KB, within the size limit
        json.dumps(envelope("[" * 100_000)),
    ],
    ids=["arrays", "braces", "objects", "in-sns-message"],
)
def test_deep_nesting_is_bad_input_quickly(raw: str) -> None:
    """Tens of thousands of levels are rejected before json.loads recurses, in under 1s."""
    started = time.perf_counter()
    message = rejection(raw)
    assert time.perf_counter() - started < 1
    assert f"nests deeper than {MAX_JSON_DEPTH} levels" in message


def test_nesting_up_to_the_limit_is_accepted() -> None:
    """An event nested exactly MAX_JSON_DEPTH deep parses; one more level does not."""
    deep: Any = "x"
    for _ in range(MAX_JSON_DEPTH - 3):  # event, detail and eventMetadata are 3 levels
        deep = [deep]
    assert parse_event(json.dumps(plain_event(K1, eventMetadata={"d": deep}))).key_ids == (K1,)
    assert "nests deeper" in rejection(json.dumps(plain_event(K1, eventMetadata={"d": [deep]})))


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """A description full of brackets and escaped quotes is text, not depth."""
    text = '[{\\"' * 5_000
    event = plain_event(K1)
    event["detail"]["eventDescription"][0]["latestDescription"] = text
    assert parse_event(json.dumps(event)).key_ids == (K1,)


@pytest.mark.parametrize(
    "raw",
    [
        b"{" + b" " * MAX_EVENT_BYTES + b"}",
        "é" * (MAX_EVENT_BYTES // 2 + 1),  # fewer characters than the limit, more bytes
        json.dumps(envelope("x")).encode() + b" " * MAX_EVENT_BYTES,
    ],
    ids=["bytes", "multibyte-text", "sns"],
)
def test_huge_input_is_bad_input_quickly(raw: bytes | str) -> None:
    """Input over MAX_EVENT_BYTES (counted in UTF-8 bytes) is rejected at once."""
    started = time.perf_counter()
    message = rejection(raw)
    assert time.perf_counter() - started < 1
    assert f"larger than {MAX_EVENT_BYTES} bytes" in message


def test_an_event_just_under_the_size_limit_parses() -> None:
    """The size limit is not stricter than it says."""
    event = json.dumps(plain_event(K1)).encode()
    raw = event + b" " * (MAX_EVENT_BYTES - len(event))
    assert len(raw) == MAX_EVENT_BYTES
    assert parse_event(raw).key_ids == (K1,)


@pytest.mark.parametrize(
    "raw",
    [
        '{"source": ' + "1" * 5000 + "}",  # int() refuses more than 4300 digits: ValueError
        b"\xff\xfe{}",
        b'{"source": "aws.health", "detail": "\xed\xa0\x80"}',
        '"\ud800"',
        "",
        b"\x00",
        "NaN",
        '{"source": "aws.health", "detail": {"service": "RISK", "eventTypeCode": {}}}',
        json.dumps(plain_event(K1, eventTypeCode=["AWS_RISK_CREDENTIALS_EXPOSED"])),
        json.dumps({"source": ["aws.health"]}),
    ],
)
def test_odd_input_is_only_ever_bad_input(raw: bytes | str) -> None:
    """Odd numbers, encodings and types give a one-line BadInput, never another exception."""
    rejection(raw)
