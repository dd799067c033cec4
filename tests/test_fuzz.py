"""Fuzzing the inputs that come from outside: AWS Health events and the HTTP trigger.
Whatever arrives, the answer is a clean rejection (BadInput / 4xx), never a crash, and
nothing changes in IAM."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rotator.daemon import Daemon
from rotator.errors import BadInput
from rotator.http import Server, parse_trigger
from rotator.leaks import RISK_CODES, LeakEvent, parse_event
from rotator.model import KeyStatus
from rotator.sandbox import LocalAws, SeedKey
from tests.conftest import VaultTarget
from tests.rig import settings_for

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


@pytest.fixture
def served(aws: LocalAws, vault: VaultTarget, tmp_path: Path) -> Iterator[tuple[str, LocalAws]]:
    """The daemon's HTTP API on a free port, backed by the real servers (no scheduler)."""
    base = settings_for(aws, vault, tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
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
