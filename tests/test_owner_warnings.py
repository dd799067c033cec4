"""Owners are warned before their keys are rotated: `rotator run --once` (a new process
each time, like a restarted daemon) against moto, with a webhook receiver and SES."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey
from tests.conftest import VaultTarget
from tests.rig import rotator, write_config

SENDER = "rotator@example.com"


class Receiver:
    """A loopback webhook that keeps every JSON body it is sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def warnings(self) -> list[dict[str, str]]:
        return [b["rotator"] for b in self.bodies if b["rotator"]["event"] == "owner_warning"]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.close()


def _sent_emails() -> list[Any]:
    """What moto's SES kept of every email sent (the v2 API keeps them in v1's store)."""
    from moto.backends import get_backend

    return list(get_backend("ses")[ACCOUNT_ID]["us-east-1"].sent_messages)


@pytest.fixture
def ses(aws: LocalAws) -> Iterator[None]:
    """SES on the moto server, emptied, with the rotator's sender address verified."""
    from moto.backends import get_backend

    get_backend("ses")[ACCOUNT_ID]["us-east-1"].reset()
    client = boto3.client("ses", endpoint_url=aws.endpoint_url, region_name="us-east-1")
    client.verify_email_identity(EmailAddress=SENDER)
    yield
    get_backend("ses")[ACCOUNT_ID]["us-east-1"].reset()


def _config(aws: LocalAws, vault: VaultTarget, tmp_path: Path, hook: Receiver) -> Path:
    return write_config(
        aws,
        vault,
        tmp_path,
        policy={
            "max_age": "30d",
            "warn_age": "20d",
            "overlap": "0s",
            "delete_after": "0s",
            "verify_timeout": "10s",
        },
        notify={
            "webhook_url": hook.url,
            "owner_tag": "owner",
            "warn_before": ["14d", "7d", "1d"],
            "fallback_owner": "secops@example.com",
            "email": {"from": SENDER},
        },
    )


def _run(cfg: Path) -> None:
    ran = rotator("--config", str(cfg), "run", "--once", "--json")
    assert ran.returncode in (0, 4), ran.stderr
    assert "owners.no_owner" not in ran.stderr


def test_each_stage_is_sent_once_per_key_across_restarts_in_one_digest_per_owner(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, receiver: Receiver, ses: None
) -> None:
    """Three `run --once` processes on one state store: the first sends one digest per
    owner (webhook for every owner, SES email for the email owners, the untagged user's
    key to the fallback owner), naming no secret; the two later passes send nothing; a
    key 20 days from due is in no digest."""
    ann = aws.add_user(
        "ann-app", tags={"owner": "ann@example.com"}, keys=[SeedKey(timedelta(days=25))]
    )
    ann2 = aws.add_user(
        "ann-ci", tags={"owner": "ann@example.com"}, keys=[SeedKey(timedelta(days=29, hours=12))]
    )
    bob = aws.add_user("bob-app", tags={"owner": "@bob"}, keys=[SeedKey(timedelta(days=20))])
    orphan = aws.add_user("orphan", keys=[SeedKey(timedelta(days=25))])
    fresh = aws.add_user("fresh", tags={"owner": "@bob"}, keys=[SeedKey(timedelta(days=10))])
    cfg = _config(aws, vault, tmp_path, receiver)

    _run(cfg)

    hooks = receiver.warnings()
    by_owner = {w["owner"]: set(w["key_ids"].split(",")) for w in hooks}
    assert len(hooks) == 3  # one digest per owner
    assert by_owner == {
        "ann@example.com": {ann[0].access_key_id, ann2[0].access_key_id},
        "@bob": {bob[0].access_key_id},
        "secops@example.com": {orphan[0].access_key_id},
    }
    texts = [b["text"] for b in receiver.bodies]
    assert any("ann@example.com" in t and "7d notice" in t and "1d notice" in t for t in texts)
    assert all(fresh[0].access_key_id not in t for t in texts)
    emails = _sent_emails()
    assert sorted(m.destinations["ToAddresses"][0] for m in emails) == [
        "ann@example.com",
        "secops@example.com",
    ]
    assert all(m.source == SENDER for m in emails)
    ann_mail = next(m for m in emails if m.destinations["ToAddresses"] == ["ann@example.com"])
    assert ann[0].access_key_id in ann_mail.body
    assert ann2[0].access_key_id in ann_mail.body
    secrets = [k.secret_access_key for k in (*ann, *ann2, *bob, *orphan, *fresh)]
    sent_text = json.dumps(receiver.bodies) + "".join(m.body for m in emails)
    assert not any(s in sent_text for s in secrets)

    _run(cfg)
    _run(cfg)

    assert len(receiver.warnings()) == 3
    assert len(_sent_emails()) == 2


def test_without_a_fallback_owner_an_untagged_users_key_is_logged_and_not_sent(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, receiver: Receiver
) -> None:
    """No owner tag and no `notify.fallback_owner`: no digest, and the pass logs which
    key had nobody to tell."""
    orphan = aws.add_user("orphan", keys=[SeedKey(timedelta(days=25))])
    cfg = write_config(
        aws,
        vault,
        tmp_path,
        policy={"max_age": "30d", "warn_age": "20d"},
        notify={"webhook_url": receiver.url},
    )
    ran = rotator("--config", str(cfg), "run", "--once", "--json")
    assert ran.returncode in (0, 4), ran.stderr
    assert receiver.warnings() == []
    assert "owners.no_owner" in ran.stderr
    assert orphan[0].access_key_id in ran.stderr


def test_plan_sends_no_owner_warning(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, receiver: Receiver
) -> None:
    """`plan` scans and shows, but warns nobody."""
    aws.add_user("ann-app", tags={"owner": "@ann"}, keys=[SeedKey(timedelta(days=25))])
    cfg = _config(aws, vault, tmp_path, receiver)
    planned = rotator("--config", str(cfg), "plan")
    assert planned.returncode in (0, 4), planned.stderr
    assert receiver.warnings() == []
