"""Fuzzing the inputs that come from outside: AWS Health events (one parser for the file,
stdin and SQS paths) and the HTTP trigger. Whatever arrives, the answer is a clean
rejection (BadInput / exit 2 / 4xx), never a crash, and nothing changes in IAM; the
nesting and size limits hold exactly where they say."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rotator.daemon import Daemon
from rotator.errors import BadInput
from rotator.http import MAX_BODY, Server, parse_trigger
from rotator.leaks import (
    MAX_EVENT_BYTES,
    MAX_JSON_DEPTH,
    RISK_CODES,
    LeakEvent,
    load_json,
    parse_event,
)
from rotator.model import ForcedRotation, KeyStatus
from rotator.sandbox import LocalAws, SeedKey
from tests.conftest import VaultTarget
from tests.rig import FakeClock, make_app, rotator, settings_for

TOKEN = "fuzz-token-0123456789abcdef"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def event_like() -> st.SearchStrategy[dict[str, Any]]:
    """Dicts shaped like Health events, with each part sometimes wrong."""
    entity = st.fixed_dictionaries(
        {"entityValue": st.one_of(st.from_regex(r"AKIA[A-Z0-9]{16}", fullmatch=True), json_values)}
    )
    detail = st.fixed_dictionaries(
        {
            "service": st.sampled_from(["RISK", "EC2", ""]) | json_values,
            "eventTypeCode": st.sampled_from(sorted(RISK_CODES)) | json_values,
            "affectedEntities": st.lists(entity, max_size=3) | json_values,
        }
    )
    return st.fixed_dictionaries(
        {
            "source": st.sampled_from(["aws.health", "aws.ec2"]) | json_values,
            "detail": detail | json_values,
            "account": st.sampled_from(["123456789012", "12345"]) | json_values,
        }
    )


@given(st.binary(max_size=300) | st.text(max_size=300))
def test_event_parser_rejects_arbitrary_bytes_cleanly(raw: bytes | str) -> None:
    """Random bytes and text give BadInput or a valid event, never another exception."""
    try:
        outcome: LeakEvent | str = parse_event(raw)
    except BadInput as exc:
        outcome = str(exc)
    assert isinstance(outcome, LeakEvent) or (outcome and "\n" not in outcome)


@given(event_like())
@example(  # an unhashable event code once raised TypeError instead of BadInput
    {
        "source": "aws.health",
        "detail": {"service": "RISK", "eventTypeCode": [], "affectedEntities": []},
        "account": "123456789012",
    }
)
def test_event_parser_accepts_only_well_formed_events(data: dict[str, Any]) -> None:
    """Near-miss events are rejected with a message; accepted ones name only key ids."""
    try:
        event = parse_event(json.dumps(data))
    except BadInput as exc:
        message = str(exc)
        assert message
        assert "\n" not in message
        return
    assert data["source"] == "aws.health"
    assert data["detail"]["service"] == "RISK"
    assert event.key_ids
    assert all(k.startswith("AKIA") for k in event.key_ids)


@given(json_values)
def test_trigger_parser_never_crashes(data: Any) -> None:
    """Any JSON body gives a ForcedRotation naming a plausible user, or BadInput."""
    try:
        request = parse_trigger(json.dumps(data).encode())
    except BadInput as exc:
        message = str(exc)
        assert message
        return
    assert isinstance(data, dict)
    assert request.user_name == data["user_name"]


# --- nesting and size limits --------------------------------------------------------------

FIXTURE = (
    Path(__file__).parent / "fixtures" / "health" / "aws-health-tools-risk-credentials-exposed.json"
)
SNS_FIXTURE = Path(__file__).parent / "fixtures" / "health" / "sns-envelope.json"
LEAKED = "AKIAIOSFODNN7EXAMPLE"
HOLE = "@@hole@@"
# Brackets, quotes and escapes are what a depth check can get wrong; draw them often.
tricky_text = st.text(alphabet=st.sampled_from('[]{}"\\:, aé\n') | st.characters(), max_size=12)
deep_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | tricky_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(tricky_text, children, max_size=3)
    ),
    max_leaves=60,
)


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


def nested(depth: int, kind: str) -> str:
    """A JSON value `depth` levels deep, of arrays or of objects."""
    if kind == "[":
        return "[" * depth + "]" * depth
    return '{"k":' * depth + "0" + "}" * depth


def event_text(hole: str = "", description: str = "") -> str:
    """The aws-health-tools sample as JSON text, `hole` spliced in as eventMetadata.d (3
    levels below the top), `description` as the event's description."""
    event = json.loads(FIXTURE.read_text())
    event["detail"]["eventMetadata"] = {"d": HOLE}
    event["detail"]["eventDescription"][0]["latestDescription"] = HOLE + "s"
    text = json.dumps(event, ensure_ascii=False)
    return text.replace(f'"{HOLE}"', hole or "0").replace(f"{HOLE}s", description)


def in_sns(message: str) -> str:
    outer = json.loads(SNS_FIXTURE.read_text())
    outer["Message"] = message
    return json.dumps(outer, ensure_ascii=False)


@given(deep_values)
def test_depth_is_measured_exactly(value: Any) -> None:
    """load_json accepts a value at exactly its depth and refuses it one level tighter,
    whatever brackets, quotes and escapes its strings hold."""
    text = json.dumps(value)
    depth = depth_of(value)
    assert load_json(text, max_bytes=10**6, name="x", max_depth=depth) == value
    if depth:
        with pytest.raises(BadInput, match="nests deeper"):
            load_json(text, max_bytes=10**6, name="x", max_depth=depth - 1)


@given(
    depth=st.integers(0, MAX_JSON_DEPTH + 5) | st.integers(0, 30_000),
    kind=st.sampled_from("[{"),
    where=st.sampled_from(["bare", "event", "sns"]),
    as_bytes=st.booleans(),
)
@example(depth=MAX_JSON_DEPTH - 3, kind="[", where="event", as_bytes=True)
@example(depth=MAX_JSON_DEPTH - 2, kind="{", where="sns", as_bytes=False)
@example(depth=30_000, kind="[", where="bare", as_bytes=True)
def test_event_nesting_limit_holds_exactly(
    depth: int, kind: str, where: str, as_bytes: bool
) -> None:
    """Events nested up to MAX_JSON_DEPTH parse as usual; deeper, at any depth, on its
    own or in an event or an SNS Message, is BadInput saying so."""
    value = nested(depth, kind)
    text = {"bare": value, "event": event_text(value), "sns": in_sns(event_text(value))}[where]
    total = depth if where == "bare" else depth + 3
    try:
        event: LeakEvent | None = parse_event(text.encode() if as_bytes else text)
        message = ""
    except BadInput as exc:
        event, message = None, str(exc)
    if total > MAX_JSON_DEPTH:
        assert f"nests deeper than {MAX_JSON_DEPTH} levels" in message
    elif where == "bare":
        assert event is None
        assert "nests" not in message
    else:
        assert event is not None
        assert event.key_ids == (LEAKED,)


@given(
    size=st.integers(MAX_EVENT_BYTES - 3_000, MAX_EVENT_BYTES + 3_000),
    char=st.sampled_from(["a", "é", "€", "𝄞"]),
    as_bytes=st.booleans(),
    sns=st.booleans(),
)
@example(size=MAX_EVENT_BYTES, char="a", as_bytes=True, sns=False)
@example(size=MAX_EVENT_BYTES + 1, char="a", as_bytes=False, sns=True)
def test_event_size_limit_counts_utf8_bytes(
    size: int, char: str, as_bytes: bool, sns: bool
) -> None:
    """An event of up to MAX_EVENT_BYTES UTF-8 bytes parses and a larger one is BadInput,
    as bytes (a file, stdin) or as text (an SQS body), bare or in an SNS envelope."""
    wrap = in_sns if sns else (lambda text: text)
    empty = len(wrap(event_text()).encode())
    text = wrap(event_text(description=char * max(0, (size - empty) // len(char.encode()))))
    text += " " * max(0, size - len(text.encode()))  # whitespace brings it to `size` exactly
    assert len(text.encode()) == size
    try:
        event: LeakEvent | None = parse_event(text.encode() if as_bytes else text)
        message = ""
    except BadInput as exc:
        event, message = None, str(exc)
    if size > MAX_EVENT_BYTES:
        assert message == f"event larger than {MAX_EVENT_BYTES} bytes"
    else:
        assert event is not None, message
        assert event.key_ids == (LEAKED,)


@given(st.text(alphabet='[]{}",:\\ 0aé\n\ud800', max_size=3_000) | st.binary(max_size=3_000))
def test_structural_noise_is_only_ever_bad_input(raw: str | bytes) -> None:
    """Random brackets, quotes, escapes and bytes give a one-line BadInput from both
    parsers, never another exception."""
    body = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    calls: list[Callable[[], object]] = [lambda: parse_event(raw), lambda: parse_trigger(body)]
    for call in calls:
        try:
            call()
            message = "accepted"
        except BadInput as exc:
            message = str(exc)
        assert message
        assert "\n" not in message


@given(
    depth=st.integers(0, MAX_JSON_DEPTH + 3) | st.integers(0, 3_000),
    kind=st.sampled_from("[{"),
    pad=st.integers(0, 2 * MAX_BODY),
)
@example(depth=MAX_JSON_DEPTH - 1, kind="[", pad=0)
@example(depth=MAX_JSON_DEPTH, kind="{", pad=0)
@example(depth=0, kind="[", pad=MAX_BODY - 39)
def test_trigger_body_nesting_and_size_limits_hold(depth: int, kind: str, pad: int) -> None:
    """A trigger body over MAX_BODY bytes or nested deeper than MAX_JSON_DEPTH is BadInput
    saying so; within both, the usual answer (a request, or which field is wrong)."""
    if depth:
        body = ('{"user_name": "victim", "leaked": ' + nested(depth, kind) + "}").encode()
    else:
        body = json.dumps({"user_name": "victim", "leaked": True}).encode()
    body += b" " * pad
    try:
        request: ForcedRotation | None = parse_trigger(body)
        message = ""
    except BadInput as exc:
        request, message = None, str(exc)
    if len(body) > MAX_BODY:
        assert message == f"body larger than {MAX_BODY} bytes"
    elif depth + 1 > MAX_JSON_DEPTH:
        assert message == f"the body nests deeper than {MAX_JSON_DEPTH} levels"
    elif depth:
        assert message == "leaked must be true or false"
    else:
        assert request == ForcedRotation("victim", leaked=True)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"source": ' + b"9" * 5_000 + b"}",
        b" " * (MAX_EVENT_BYTES + 1),
    ],
    ids=["deep", "long-number", "huge"],
)
@pytest.mark.parametrize("source", ["file", "stdin"])
def test_leak_event_file_and_stdin_reject_hostile_input_with_exit_2(
    body: bytes, source: str, tmp_path: Path
) -> None:
    """`leak-event` given hostile input on a file or stdin exits 2 with one line, no traceback."""
    path = tmp_path / "event.json"
    path.write_bytes(body)
    args = ["--config", str(tmp_path / "missing-is-fine.yaml"), "leak-event"]
    if source == "file":
        done = rotator(*args, str(path))
    else:
        done = rotator(*args, "-", stdin=body.decode())
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_sqs_poison_messages_are_dead_lettered_and_a_leak_behind_them_is_contained(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Hostile SQS messages ahead of a real event are kept as dead letters; the poller
    does not raise, and the real leak behind them is contained."""
    [leaked] = aws.add_user("victim", keys=[SeedKey(timedelta(days=40))])
    sqs = boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name="us-east-1")
    url = sqs.create_queue(QueueName="health-events")["QueueUrl"]
    poison = [
        "[" * 100_000,
        '{"source": ' + "9" * 5_000 + "}",
        in_sns(in_sns(in_sns(event_text()))),
        event_text(nested(MAX_JSON_DEPTH, "{")),
    ]
    for body in poison:
        sqs.send_message(QueueUrl=url, MessageBody=body)
    event = json.loads(FIXTURE.read_text())
    event["detail"]["affectedEntities"] = [{"entityValue": leaked.access_key_id}]
    sqs.send_message(QueueUrl=url, MessageBody=in_sns(json.dumps(event)))
    app = make_app(settings_for(aws, vault, tmp_path, leaks={"sqs_queue_url": url}), FakeClock())
    try:
        for _ in range(10):
            app.poll_leak_queue(wait_seconds=0)
            if aws.keys("victim").get(leaked.access_key_id) is not KeyStatus.ACTIVE:
                break
        kept = [error for _, _, _, error in app.store.dead_letters()]
    finally:
        app.close()
    assert aws.keys("victim").get(leaked.access_key_id, KeyStatus.INACTIVE) is KeyStatus.INACTIVE
    assert len(kept) == len(poison)
    assert sum("nests deeper" in e for e in kept) == 2
    assert attrs(sqs, url) == ("0", "0")


def attrs(sqs: Any, url: str) -> tuple[str, str]:
    got = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return got["ApproximateNumberOfMessages"], got["ApproximateNumberOfMessagesNotVisible"]


@pytest.fixture
def served(aws: LocalAws, vault: VaultTarget, tmp_path: Path) -> Iterator[tuple[str, LocalAws]]:
    """The daemon's HTTP API on a free port, backed by the real servers (no scheduler)."""
    base = settings_for(aws, vault, tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    config = base.model_copy(
        update={"http": base.http.model_copy(update={"trigger_token_file": token_file})}
    )
    daemon = Daemon(lambda: config)
    server = Server("127.0.0.1", 0, daemon, token=lambda: TOKEN).start()
    host, port = server.address
    yield f"http://{host}:{port}", aws
    server.stop()
    daemon.close()


def post(url: str, body: bytes, token: str | None = TOKEN) -> int:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {"user_name": st.text(max_size=70), "leaked": json_values, "access_key_id": json_values}
        ).map(lambda v: json.dumps(v).encode()),
        st.integers(min_value=16_385, max_value=40_000).map(lambda n: b"a" * n),
        st.integers(min_value=MAX_JSON_DEPTH, max_value=MAX_BODY).map(lambda n: b"[" * n),
        st.integers(min_value=4_301, max_value=10_000).map(
            lambda n: b'{"user_name": "victim", "leaked": ' + b"9" * n + b"}"
        ),
    ),
    token=st.sampled_from([TOKEN, None, "nope", TOKEN + "x", TOKEN[:-1]]),
)
def test_http_trigger_fuzz_always_4xx_and_iam_unchanged(
    served: tuple[str, LocalAws], body: bytes, token: str | None
) -> None:
    """Fuzzed bodies and tokens always get a 4xx (never 5xx), the server keeps serving,
    and the seeded user's key is untouched."""
    base, aws = served
    if "victim" not in aws.backend.users:
        aws.add_user("victim", keys=[SeedKey(timedelta(days=200))])
    before = aws.keys("victim")
    status = post(base + "/v1/rotations", body, token)
    assert 400 <= status < 500
    if token != TOKEN:
        assert status == 401
    with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
        assert resp.status == 200
    assert aws.keys("victim") == before
    assert all(s is KeyStatus.ACTIVE for s in before.values())
