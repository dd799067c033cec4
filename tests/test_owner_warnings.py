"""Owners are warned before their keys are rotated or deactivated as unused, and told
when a pass has deactivated one: `rotator run --once` (a new process each time, like a
restarted daemon), an in-process `App` on a clock the test moves, and real `rotator
daemon` processes restarted on one state store, against moto and OpenBao, with a
webhook receiver and SES."""

from __future__ import annotations

import http.server
import json
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import boto3
import pytest

from rotator.app import App
from rotator.config import parse_settings
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey, free_port
from tests.conftest import VaultTarget
from tests.rig import (
    FakeClock,
    config_data,
    make_app,
    rotator,
    run_pass,
    vault_secret,
    wait_until,
    write_config,
)

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


D = timedelta(days=1)
HUMANS = {
    "name": "humans",
    "match": {"tag": {"type": "human"}},
    "unused_after": "45d",
    "unused_action": "deactivate",
}


def _config(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, hook: Receiver, **extra: Mapping[str, Any]
) -> Path:
    return write_config(
        aws,
        vault,
        tmp_path,
        **extra,
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


# --- keys deactivated as unused: the owner is told in the digest of that same pass ------


def _notify(hook: Receiver) -> dict[str, Any]:
    return {
        "webhook_url": hook.url,
        "owner_tag": "owner",
        "warn_before": ["14d", "7d", "1d"],
        "email": {"from": SENDER},
    }


def _humans_data(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, hook: Receiver
) -> dict[str, Any]:
    """The test servers' configuration with the `humans` rule (unused 45d: deactivate)
    and owner warnings to `hook` and SES."""
    data = config_data(aws, vault, tmp_path, notify=_notify(hook))
    data["rules"] = [HUMANS]
    return data


def _iam_keys(aws: LocalAws, user: str) -> dict[str, str]:
    """The user's keys as IAM answers ListAccessKeys: {key id: status}."""
    iam = boto3.client("iam", endpoint_url=aws.endpoint_url, region_name="us-east-1")
    listed = iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
    return {k["AccessKeyId"]: k["Status"] for k in listed}


def _line_of(text: str, key_id: str) -> str:
    """The one line of a digest's text that names `key_id`."""
    [line] = [line for line in text.splitlines() if key_id in line]
    return line


REACTIVATE = re.compile(r"; to turn it back on: (rotator reactivate \S+ --key \S+)$")


def test_a_key_past_the_unused_threshold_when_first_seen_is_deactivated_and_its_owner_told(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, receiver: Receiver, ses: None
) -> None:
    """The first `run --once` that sees a human's key never used in 60 days (rule humans:
    unused 45d, deactivate) sets it Inactive in IAM, issues no key and writes nothing to
    Vault; the owner's one digest of that same pass (webhook and SES email) says the key
    was deactivated as unused and gives the exact `rotator reactivate USER --key KEY`
    command, which turns it back on when run; the same digest warns of the owner's other
    key due in 5 days (7d notice). A key used yesterday is left on and in no digest, and
    nothing sent holds a secret."""
    [idle] = aws.add_user(
        "ann", tags={"type": "human", "owner": "ann@example.com"}, keys=[SeedKey(60 * D)]
    )
    [soon] = aws.add_user(
        "ann-laptop", tags={"type": "human", "owner": "ann@example.com"}, keys=[SeedKey(40 * D)]
    )
    [busy] = aws.add_user(
        "ben", tags={"type": "human", "owner": "@ben"}, keys=[SeedKey(60 * D, last_used_ago=D)]
    )
    cfg = tmp_path / "rotator.yaml"
    cfg.write_text(json.dumps(_humans_data(aws, vault, tmp_path, receiver)))

    ran = rotator("--config", str(cfg), "run", "--once", "--json")

    assert ran.returncode == 0, ran.stderr
    doc = json.loads(ran.stdout)
    assert [(k["user_name"], k["access_key_id"]) for k in doc["deactivated_unused"]] == [
        ("ann", idle.access_key_id)
    ]
    assert doc["opened"] == []
    # Through the AWS API: the same single key, now Inactive; no replacement was minted.
    assert _iam_keys(aws, "ann") == {idle.access_key_id: "Inactive"}
    assert _iam_keys(aws, "ann-laptop") == {soon.access_key_id: "Active"}
    assert _iam_keys(aws, "ben") == {busy.access_key_id: "Active"}
    assert vault_secret(vault, f"aws/{ACCOUNT_ID}/ann") is None

    [digest] = receiver.warnings()  # one digest, for ann's owner; none for ben's
    assert digest["owner"] == "ann@example.com"
    assert set(digest["key_ids"].split(",")) == {idle.access_key_id, soon.access_key_id}
    [body] = [b for b in receiver.bodies if b["rotator"]["event"] == "owner_warning"]
    text = body["text"]
    assert "these IAM access keys were just deactivated as unused:" in text
    done = _line_of(text, idle.access_key_id)
    assert done.startswith(f"- ann ({ACCOUNT_ID}) key {idle.access_key_id}: deactivated as unused")
    assert "(rule humans)" in done
    assert done.endswith(f"; to turn it back on: rotator reactivate ann --key {idle.access_key_id}")
    coming = _line_of(text, soon.access_key_id)
    assert "will be deactivated as unused after" in coming
    assert "7d notice" in coming
    assert "reactivate" not in coming
    assert busy.access_key_id not in json.dumps(receiver.bodies)

    [mail] = _sent_emails()
    assert mail.destinations["ToAddresses"] == ["ann@example.com"]
    assert f"rotator reactivate ann --key {idle.access_key_id}" in mail.body
    assert mail.subject == (
        "rotator: 2 access keys of yours changed or will change soon (ann@example.com)"
    )
    sent = json.dumps(receiver.bodies) + mail.body + mail.subject + ran.stdout + ran.stderr
    for secret in (idle.secret_access_key, soon.secret_access_key, busy.secret_access_key):
        assert secret not in sent

    # The command the owner was given works as written.
    match = REACTIVATE.search(done)
    assert match is not None
    command = shlex.split(match.group(1))
    assert command[0] == "rotator"
    back = rotator("--config", str(cfg), *command[1:])
    assert back.returncode == 0, back.stderr
    assert _iam_keys(aws, "ann") == {idle.access_key_id: "Active"}


def test_a_warned_key_is_deactivated_later_without_rotation_and_the_owner_told(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, receiver: Receiver
) -> None:
    """A human's key never used in 40 days (unused 45d: deactivate) gets a 7d warning
    from a first pass and stays Active; six days later (the app's clock moved, the
    state store kept) a pass sets it Inactive, with no new key, no rotation and nothing
    in Vault, and its owner's digest says it was deactivated at that moment with the
    reactivate command, not another stage notice; a third pass a day later tells nobody
    anything more."""
    [key] = aws.add_user("cal", tags={"type": "human", "owner": "@cal"}, keys=[SeedKey(40 * D)])
    settings = parse_settings(_humans_data(aws, vault, tmp_path, receiver), {})
    clock = FakeClock()

    run_pass(make_app(settings, clock))

    assert _iam_keys(aws, "cal") == {key.access_key_id: "Active"}
    [warned] = receiver.bodies
    assert warned["rotator"] == {
        "event": "owner_warning",
        "owner": "@cal",
        "key_ids": key.access_key_id,
    }
    line = _line_of(warned["text"], key.access_key_id)
    assert "will be deactivated as unused after" in line
    assert "(rule humans; 7d notice)" in line
    assert "deactivated as unused at" not in warned["text"]

    clock.advance(6 * D)  # one day past the 45 days
    run_pass(make_app(settings, clock))

    assert _iam_keys(aws, "cal") == {key.access_key_id: "Inactive"}
    assert vault_secret(vault, f"aws/{ACCOUNT_ID}/cal") is None
    app = App(settings, clock=clock)
    try:
        assert app.store.list_recent(user_name="cal") == []  # no rotation opened
    finally:
        app.close()
    assert len(receiver.bodies) == 2
    told = receiver.bodies[1]
    assert told["rotator"]["event"] == "owner_warning"
    assert (told["rotator"]["owner"], told["rotator"]["key_ids"]) == ("@cal", key.access_key_id)
    done = _line_of(told["text"], key.access_key_id)
    when = clock.now.strftime("%Y-%m-%d %H:%M UTC")
    assert done == (
        f"- cal ({ACCOUNT_ID}) key {key.access_key_id}: deactivated as unused at {when} "
        f"(rule humans); to turn it back on: rotator reactivate cal --key {key.access_key_id}"
    )
    assert "notice" not in told["text"]
    assert key.secret_access_key not in json.dumps(receiver.bodies)

    clock.advance(D)
    run_pass(make_app(settings, clock))

    assert len(receiver.bodies) == 2
    assert _iam_keys(aws, "cal") == {key.access_key_id: "Inactive"}


# --- the daemon: each stage once per key across restarts -------------------------------


ROTATOR = (sys.executable, "-m", "rotator")


class Daemon:
    """`rotator --log-format json daemon` in the background, its stderr (JSON lines) in
    a file the test reads while it runs."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[str] = open(log_path, "w")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            [*ROTATOR, "--config", str(config), "--log-format", "json", "daemon"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            text=True,
        )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The log events written so far (a line still being written is skipped)."""
        found = []
        for line in self.log_path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    def wait_for(self, name: str, count: int = 1, timeout: float = 30) -> None:
        """Until the daemon has logged `name` `count` times; fails at once if it exits."""

        def seen() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.events()}")
            return len(self.events(name)) >= count

        wait_until(seen, timeout, f"{count} x {name}; the daemon logged: {self.log_tail}")

    @property
    def log_tail(self) -> str:
        """What the daemon logged last, to say why a wait timed out."""
        return "\n".join(self.log_path.read_text().splitlines()[-30:])

    def stop(self) -> int:
        """SIGTERM; the exit code (the daemon flushes its notifier before it exits)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit 20 s after SIGTERM; logged: {self.log_tail}") from None
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test starts; any still running at the end is killed."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


def test_each_stage_is_sent_once_per_key_across_two_daemon_restarts(
    aws: LocalAws,
    vault: VaultTarget,
    tmp_path: Path,
    receiver: Receiver,
    ses: None,
    daemons: list[Daemon],
) -> None:
    """Three `rotator daemon` processes one after another on one state file (each
    stopped by SIGTERM, exit 0): the first scan of the first sends one digest per owner
    (webhook, and SES for the email owners), each key's stage named once; the second and
    third daemons each complete scans (`daemon.scan_done`, logged after the digests of
    the scan are handed on) and send nothing: the receiver still holds one digest per
    owner, each key once, and the state store holds each key's stages."""
    ann = aws.add_user(
        "ann-app", tags={"owner": "ann@example.com"}, keys=[SeedKey(timedelta(days=25))]
    )
    ann2 = aws.add_user(
        "ann-ci", tags={"owner": "ann@example.com"}, keys=[SeedKey(timedelta(days=29, hours=12))]
    )
    bob = aws.add_user("bob-app", tags={"owner": "@bob"}, keys=[SeedKey(timedelta(days=20))])
    orphan = aws.add_user("orphan", keys=[SeedKey(timedelta(days=25))])
    expected = {
        "ann@example.com": {ann[0].access_key_id: "7d", ann2[0].access_key_id: "1d"},
        "@bob": {bob[0].access_key_id: "14d"},
        "secops@example.com": {orphan[0].access_key_id: "7d"},
    }

    def start(n: int) -> Daemon:
        cfg = _config(
            aws,
            vault,
            tmp_path,
            receiver,
            schedule={"scan": "2s", "tick": "1s"},
            http={"listen": f"127.0.0.1:{free_port()}"},
        )
        daemon = Daemon(cfg, tmp_path / f"daemon-{n}.log")
        daemons.append(daemon)
        return daemon

    def stages_in(text: str) -> dict[str, str]:
        """key id -> the stage its line names."""
        found = re.findall(r"key (\S+): will be rotated after .*; (\w+) notice\)", text)
        return dict(found)

    first = start(1)
    first.wait_for("daemon.scan_done")  # logged once the scan's digests are handed on
    wait_until(lambda: len(receiver.warnings()) >= 3, 15, "the first daemon's digests")
    assert first.stop() == 0
    assert len(first.events("owners.warned")) == 3

    for n in (2, 3):
        later = start(n)
        later.wait_for("daemon.scan_done", count=2)  # the scan at start, and one more
        assert later.stop() == 0
        assert later.events("owners.warned") == []
        assert later.events("owners.no_owner") == []

    bodies = [b for b in receiver.bodies if b["rotator"]["event"] == "owner_warning"]
    assert len(bodies) == 3  # one digest per owner, all from the first daemon's scan
    got = {b["rotator"]["owner"]: stages_in(b["text"]) for b in bodies}
    assert got == expected
    for owner, keys in expected.items():
        [body] = [b for b in bodies if b["rotator"]["owner"] == owner]
        assert set(body["rotator"]["key_ids"].split(",")) == set(keys)
    everything = json.dumps(receiver.bodies)
    for key in (*ann, *ann2, *bob, *orphan):
        assert everything.count(f"key {key.access_key_id}:") == 1
        assert key.secret_access_key not in everything
    emails = _sent_emails()
    assert sorted(m.destinations["ToAddresses"][0] for m in emails) == [
        "ann@example.com",
        "secops@example.com",
    ]

    settings = parse_settings(config_data(aws, vault, tmp_path, notify=_notify(receiver)), {})
    app = App(settings)
    try:
        ids = [k for keys in expected.values() for k in keys]
        recorded = app.store.warning_stages_sent(ACCOUNT_ID, ids)
    finally:
        app.close()
    assert {k: set(v) for k, v in recorded.items()} == {
        ann[0].access_key_id: {"14d", "7d"},
        ann2[0].access_key_id: {"14d", "7d", "1d"},
        bob[0].access_key_id: {"14d"},
        orphan[0].access_key_id: {"14d", "7d"},
    }
