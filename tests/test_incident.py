"""Incident response: a leaked key stops being Active within seconds of every source,
and the user ends with a working replacement in Vault. Against the moto server (IAM,
SQS, SNS) and the OpenBao dev server."""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from rotator.machine import State
from rotator.model import ForcedRotation, KeyStatus
from rotator.sandbox import ACCOUNT_ID, QUARANTINE_V2, LocalAws, LocalVault, SeedKey, free_port
from tests.conftest import VaultTarget
from tests.faultproxy import Call, FaultProxy
from tests.rig import (
    FakeClock,
    identity_of,
    make_app,
    rotator,
    settings_for,
    spawn_daemon,
    vault_secret,
    wait_until,
    write_config,
)

D = timedelta(days=1)
TOKEN = "trigger-token-for-tests-0123456789"


def health_event(*key_ids: str, code: str = "AWS_RISK_CREDENTIALS_EXPOSED") -> dict[str, Any]:
    return {
        "version": "0",
        "id": "7bf73129-1428-4cd3-a780-95db273d1602",
        "detail-type": "AWS Health Event",
        "source": "aws.health",
        "account": ACCOUNT_ID,
        "time": "2026-11-28T09:00:00Z",
        "region": "us-east-1",
        "resources": [],
        "detail": {
            "eventArn": "arn:aws:health:global::event/RISK/AWS_RISK_CREDENTIALS_EXPOSED/test-1",
            "service": "RISK",
            "eventTypeCode": code,
            "eventTypeCategory": "issue",
            "affectedEntities": [{"entityValue": k} for k in key_ids],
        },
    }


def config_file(tmp_path: Path, aws: LocalAws, vault: VaultTarget, /, **sections: Any) -> Path:
    """The test servers with a 24h overlap and a 7d retirement: containment must not
    wait for either."""
    policy = {"overlap": "24h", "delete_after": "7d", **sections.pop("policy", {})}
    return write_config(aws, vault, tmp_path, policy=policy, **sections)


def assert_replaced(aws: LocalAws, vault: VaultTarget, user: str, leaked: str) -> str:
    """The leaked key is gone or inactive, and Vault holds a working replacement."""
    keys = aws.keys(user)
    assert keys.get(leaked, KeyStatus.INACTIVE) is KeyStatus.INACTIVE
    secret = vault_secret(vault, f"aws/{ACCOUNT_ID}/{user}")
    assert secret is not None, "no replacement in Vault"
    new_id = secret["data"]["aws_access_key_id"]
    assert new_id != leaked
    assert keys[new_id] is KeyStatus.ACTIVE
    assert identity_of(aws, secret).endswith(f":user/{user}")
    return str(new_id)


def test_scan_contains_a_quarantined_user_despite_a_long_overlap(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A scan that sees the quarantine policy deactivates the key at once (overlap 24h
    notwithstanding) and the user ends with a working replacement."""
    clock = FakeClock()
    [leaked] = aws.add_user("mallory", policies=[QUARANTINE_V2], keys=[SeedKey(3 * D)])
    app = make_app(settings_for(aws, vault, tmp_path, policy={"overlap": "24h"}), clock)
    [r] = app.run_once().rotations
    assert r.state is State.DONE, r.last_error
    assert leaked.access_key_id not in aws.keys("mallory")
    assert_replaced(aws, vault, "mallory", leaked.access_key_id)
    # The next scan sees the replacement, not a new leak: the quarantine policy stays
    # attached until an operator detaches it.
    again = make_app(settings_for(aws, vault, tmp_path, policy={"overlap": "24h"}), clock)
    assert again.run_once().opened == []


def test_rotate_leaked_contains_only_that_key(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """`rotate --leaked --key` deactivates that key at once; the user's other active key
    is not touched by containment."""
    leaked, other = aws.add_user("alice", keys=[SeedKey(10 * D), SeedKey(5 * D)])
    config = config_file(tmp_path, aws, vault)
    started = time.monotonic()
    done = rotator(
        "--config",
        str(config),
        "rotate",
        "alice",
        "--key",
        leaked.access_key_id,
        "--leaked",
        "--reason",
        "INC-1234 key in a public repo",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30
    doc = json.loads(done.stdout)
    assert doc["state"] == "DONE"
    assert doc["leaked"] is True
    keys = aws.keys("alice")
    assert leaked.access_key_id not in keys
    assert keys[other.access_key_id] is KeyStatus.ACTIVE
    assert_replaced(aws, vault, "alice", leaked.access_key_id)
    status = rotator("--config", str(config), "status", "--user", "alice", "--json")
    events = json.loads(status.stdout)["rotations"][0]["events"]
    assert any("INC-1234" in e["reason"] for e in events)
    assert [e["to"] for e in events][:3] == ["PLANNED", "CONTAIN", "MAKE_ROOM"]


def test_leak_event_file_and_stdin_contain_and_rotate(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """`leak-event` resolves each key's user, contains it and rotates it; from a file and
    from stdin alike."""
    [k1] = aws.add_user("bob", keys=[SeedKey(40 * D)])
    [k2] = aws.add_user("carol", keys=[SeedKey(40 * D)])
    config = config_file(tmp_path, aws, vault)
    event = tmp_path / "event.json"
    event.write_text(json.dumps(health_event(k1.access_key_id)))
    done = rotator("--config", str(config), "leak-event", str(event))
    assert done.returncode == 0, done.stderr
    assert_replaced(aws, vault, "bob", k1.access_key_id)
    piped = rotator(
        "--config",
        str(config),
        "leak-event",
        "-",
        stdin=json.dumps(health_event(k2.access_key_id, code="AWS_RISK_IAM_QUARANTINE")),
    )
    assert piped.returncode == 0, piped.stderr
    assert_replaced(aws, vault, "carol", k2.access_key_id)


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        '{"source": "aws.ec2"}',
        json.dumps({**health_event("AKIAAAAAAAAAAAAAAAAA"), "detail": {"service": "EC2"}}),
        json.dumps(health_event("not-a-key")),
        json.dumps(health_event("AKIAAAAAAAAAAAAAAAAA", code="AWS_EC2_MAINTENANCE")),
    ],
    ids=["not-json", "array", "wrong-source", "wrong-service", "bad-key-id", "wrong-code"],
)
def test_malformed_leak_event_exits_2_with_one_line(
    body: str, aws: LocalAws, tmp_path: Path
) -> None:
    """Malformed events exit 2 with one line on stderr and no traceback; IAM unchanged."""
    [key] = aws.add_user("dave", keys=[SeedKey(1 * D)])
    path = tmp_path / "event.json"
    path.write_text(body)
    done = rotator("--config", str(tmp_path / "missing-is-fine.yaml"), "leak-event", str(path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert aws.keys("dave") == {key.access_key_id: KeyStatus.ACTIVE}


def test_leaked_old_key_of_an_open_rotation_is_contained_at_once(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A key that leaks while its normal rotation waits in OVERLAP is deactivated now
    and deleted, instead of living out the 24h overlap."""
    clock = FakeClock()
    [old] = aws.add_user("erin", keys=[SeedKey(120 * D)])
    settings = settings_for(aws, vault, tmp_path, policy={"overlap": "24h", "delete_after": "7d"})
    app = make_app(settings, clock)
    [r] = app.run_once().rotations
    assert r.state is State.OVERLAP
    escalated = app.force(
        ForcedRotation("erin", key_id=old.access_key_id, leaked=True, reason="INC-9")
    )
    assert escalated.id == r.id
    assert escalated.state is State.DONE, escalated.last_error
    assert list(aws.keys("erin")) == [r.new_key_id]


# --- the daemon: SQS and the HTTP trigger ----------------------------------------------


class Capture(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        Capture.received.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    Capture.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", Capture.received
    server.shutdown()
    server.server_close()


class Daemon:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.base = f"http://127.0.0.1:{port}"

    def request(
        self, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture
def sqs(aws: LocalAws) -> Any:
    return boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name="us-east-1")


def trigger_token_file(directory: Path) -> Path:
    path = directory / "trigger-token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def start_daemon(config: Path, port: int) -> Daemon:
    """`rotator daemon` on `config`, once /readyz answers 200."""
    running = Daemon(spawn_daemon(config), port)
    try:
        wait_until(lambda: _ready(running), 30, "daemon ready")
    except BaseException:
        stop_daemon(running)
        raise
    return running


def stop_daemon(running: Daemon) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 20 s."""
    proc = running.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.fixture
def daemon(
    tmp_path: Path, aws: LocalAws, vault: VaultTarget, sqs: Any, webhook: tuple[str, list[Any]]
) -> Iterator[Daemon]:
    """A daemon with everything on: the leak queue, the HTTP trigger and a webhook. Its
    stop waits for the long poll of the queue in flight (up to LEAK_POLL_WAIT)."""
    queue_url = sqs.create_queue(QueueName="health-events")["QueueUrl"]
    port = free_port()
    config = config_file(
        tmp_path,
        aws,
        vault,
        schedule={"scan": "1h", "tick": "1s"},
        http={
            "listen": f"127.0.0.1:{port}",
            "trigger_token_file": str(trigger_token_file(tmp_path)),
        },
        leaks={"sqs_queue_url": queue_url},
        notify={"webhook_url": webhook[0]},
    )
    running = start_daemon(config, port)
    yield running
    stop_daemon(running)


@pytest.fixture(scope="module")
def refusing_daemon(
    local_aws: LocalAws, local_vault: LocalVault, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """One daemon with the HTTP trigger for the tests of requests it must refuse, which
    change nothing it holds; without a leak queue, so that its stop need not wait for
    a long poll."""
    home = tmp_path_factory.mktemp("refusing-daemon")
    local_aws.reset()
    mount = "kv-" + uuid.uuid4().hex[:10]
    local_vault.enable_kv2(mount)
    vault = VaultTarget(local_vault.addr, local_vault.token, mount, local_vault)
    port = free_port()
    config = config_file(
        home,
        local_aws,
        vault,
        schedule={"scan": "1h", "tick": "1s"},
        http={"listen": f"127.0.0.1:{port}", "trigger_token_file": str(trigger_token_file(home))},
    )
    running = start_daemon(config, port)
    yield running
    stop_daemon(running)


def _ready(d: Daemon) -> bool:
    try:
        return d.request("GET", "/readyz", token=None)[0] == 200
    except OSError:
        return False


def test_sqs_health_event_is_contained_by_the_daemon(
    aws: LocalAws, vault: VaultTarget, sqs: Any, daemon: Daemon, webhook: tuple[str, list[Any]]
) -> None:
    """A Health event on the SQS queue gets the key deactivated within seconds and a
    replacement into Vault; the message is deleted; a webhook names the user and no
    secret."""
    [leaked] = aws.add_user("frank", keys=[SeedKey(30 * D)])
    queue_url = sqs.get_queue_url(QueueName="health-events")["QueueUrl"]
    sent = time.monotonic()
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(health_event(leaked.access_key_id)))
    wait_until(
        lambda: aws.keys("frank").get(leaked.access_key_id) is not KeyStatus.ACTIVE,
        20,
        "containment",
    )
    assert time.monotonic() - sent < 20
    wait_until(
        lambda: vault_secret(vault, f"aws/{ACCOUNT_ID}/frank") is not None, 20, "replacement"
    )
    new_id = assert_replaced(aws, vault, "frank", leaked.access_key_id)
    attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0"
    wait_until(
        lambda: any(m["rotator"]["event"] == "leaked_contained" for m in webhook[1]), 15, "webhook"
    )
    secret = vault_secret(vault, f"aws/{ACCOUNT_ID}/frank")
    assert secret is not None
    text = json.dumps(webhook[1])
    assert "frank" in text
    assert secret["data"]["aws_secret_access_key"] not in text
    assert leaked.secret_access_key not in text
    assert new_id


def test_sighup_moves_the_leak_poller_to_a_new_queue(
    aws: LocalAws, sqs: Any, daemon: Daemon, tmp_path: Path
) -> None:
    """After the config names another queue and SIGHUP, events on the new queue are
    contained and the old queue is no longer read."""
    old_url = sqs.get_queue_url(QueueName="health-events")["QueueUrl"]
    new_url = sqs.create_queue(QueueName="health-events-2")["QueueUrl"]
    config = tmp_path / "rotator.yaml"
    data = yaml.safe_load(config.read_text())
    data["leaks"]["sqs_queue_url"] = new_url
    config.write_text(yaml.safe_dump(data))
    daemon.proc.send_signal(signal.SIGHUP)
    time.sleep(7)  # the poller in flight finishes its long poll and is replaced
    [stale] = aws.add_user("gina", keys=[SeedKey(30 * D)])
    sqs.send_message(QueueUrl=old_url, MessageBody=json.dumps(health_event(stale.access_key_id)))
    [leaked] = aws.add_user("hugo", keys=[SeedKey(30 * D)])
    sqs.send_message(QueueUrl=new_url, MessageBody=json.dumps(health_event(leaked.access_key_id)))
    wait_until(
        lambda: aws.keys("hugo").get(leaked.access_key_id) is not KeyStatus.ACTIVE,
        20,
        "containment from the new queue",
    )
    assert aws.keys("gina") == {stale.access_key_id: KeyStatus.ACTIVE}
    attrs = sqs.get_queue_attributes(QueueUrl=old_url, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "1"


def test_unparseable_sqs_message_is_kept_aside_and_the_daemon_goes_on(
    aws: LocalAws, sqs: Any, daemon: Daemon, tmp_path: Path
) -> None:
    """A message that is not a Health event is deleted from the queue only after being
    kept in the state store, and the daemon keeps serving."""
    queue_url = sqs.get_queue_url(QueueName="health-events")["QueueUrl"]
    sqs.send_message(QueueUrl=queue_url, MessageBody="{not json")
    wait_until(
        lambda: (
            sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"][
                "ApproximateNumberOfMessages"
            ]
            == "0"
            and sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"][
                "ApproximateNumberOfMessagesNotVisible"
            ]
            == "0"
        ),
        20,
        "the message to leave the queue",
    )
    assert daemon.request("GET", "/healthz", token=None)[0] == 200
    daemon.proc.send_signal(signal.SIGTERM)
    _, err = daemon.proc.communicate(timeout=20)
    assert "leaks.unparseable" in err
    status = rotator("--config", str(tmp_path / "rotator.yaml"), "status", "--json")
    [kept] = json.loads(status.stdout)["dead_letters"]
    assert kept["source"] == "sqs"
    assert kept["error"].startswith("not JSON")


def test_a_leak_event_the_last_long_poll_brings_at_sigterm_is_contained_and_replaced_later(
    aws: LocalAws,
    vault: VaultTarget,
    sqs: Any,
    tmp_path: Path,
    fault_proxy: Callable[[str], FaultProxy],
) -> None:
    """SIGTERM while the leak poller's long poll is in flight: the daemon waits for that
    poll (SQS may hand it a message, which nobody would read otherwise), and the event
    it brings after the daemon began to stop is contained, recorded and deleted from the
    queue; the daemon exits 0 logging no error, and the next pass replaces the key."""
    queue_url = sqs.create_queue(QueueName="health-events")["QueueUrl"]
    [leaked] = aws.add_user("ivan", keys=[SeedKey(30 * D)])
    # The daemon reaches moto through a proxy that tells when a long poll begins.
    proxy = fault_proxy(aws.endpoint_url)
    polling = threading.Event()
    proxy.add(lambda request: b'"WaitTimeSeconds"' in request.body, Call(lambda _: polling.set()))
    port = free_port()
    config = config_file(
        tmp_path,
        aws,
        vault,
        aws={"endpoint_url": proxy.url},
        schedule={"scan": "1h", "tick": "1s"},
        http={"listen": f"127.0.0.1:{port}"},
        leaks={"sqs_queue_url": queue_url},
    )
    running = start_daemon(config, port)
    try:
        polling.clear()
        wait_until(polling.is_set, 10, "a long poll of the leak queue to begin")
        running.proc.send_signal(signal.SIGTERM)
        time.sleep(1)  # the daemon stops its scheduler and pools; its long poll goes on
        sqs.send_message(
            QueueUrl=queue_url, MessageBody=json.dumps(health_event(leaked.access_key_id))
        )
        _, err = running.proc.communicate(timeout=20)
    finally:
        stop_daemon(running)
    assert running.proc.returncode == 0, err[-3000:]
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    events = [r["event"] for r in records]
    assert "leaks.event" in events, err[-3000:]
    assert events.index("daemon.stopping") < events.index("leaks.event")
    errors = [r for r in records if r.get("level") in ("error", "critical")]
    assert not errors, errors
    assert aws.keys("ivan") == {leaked.access_key_id: KeyStatus.INACTIVE}
    attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert (
        attrs["ApproximateNumberOfMessages"],
        attrs["ApproximateNumberOfMessagesNotVisible"],
    ) == (
        "0",
        "0",
    )

    done = rotator("--config", str(config), "run", "--once")
    assert done.returncode == 0, done.stderr
    assert_replaced(aws, vault, "ivan", leaked.access_key_id)


def test_http_trigger_contains_and_reports_the_rotation(
    aws: LocalAws, vault: VaultTarget, daemon: Daemon
) -> None:
    """An authenticated POST /v1/rotations with leaked=true answers 202 with the rotation
    id; the key stops being Active within seconds; GET returns the rotation."""
    leaked, other = aws.add_user("gina", keys=[SeedKey(30 * D), SeedKey(2 * D)])
    body = json.dumps(
        {
            "user_name": "gina",
            "access_key_id": leaked.access_key_id,
            "leaked": True,
            "reason": "INC-7",
        }
    ).encode()
    status, doc = daemon.request("POST", "/v1/rotations", body)
    assert status == 202, doc
    wait_until(
        lambda: aws.keys("gina").get(leaked.access_key_id) is not KeyStatus.ACTIVE,
        10,
        "containment",
    )
    wait_until(
        lambda: daemon.request("GET", f"/v1/rotations/{doc['id']}")[1]["state"] == "DONE",
        20,
        "DONE",
    )
    assert aws.keys("gina")[other.access_key_id] is KeyStatus.ACTIVE
    assert_replaced(aws, vault, "gina", leaked.access_key_id)


@pytest.mark.parametrize(
    "token", [None, "wrong-token-wrong-token-wrong", TOKEN[:-1], TOKEN + "x", ""]
)
def test_http_trigger_without_the_right_token_gets_401_and_changes_nothing(
    aws: LocalAws, refusing_daemon: Daemon, token: str | None
) -> None:
    """No token, a wrong one, a prefix or an extension of the right one: 401, IAM unchanged."""
    [key] = aws.add_user("hank", keys=[SeedKey(30 * D)])
    body = json.dumps(
        {"user_name": "hank", "leaked": True, "access_key_id": key.access_key_id}
    ).encode()
    status, _ = refusing_daemon.request("POST", "/v1/rotations", body, token=token)
    assert status == 401
    time.sleep(0.5)
    assert aws.keys("hank") == {key.access_key_id: KeyStatus.ACTIVE}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{", 400),
        (b'{"user_name": 5}', 400),
        (b'{"user_name": "x", "leaked": "yes"}', 400),
        (b'{"user_name": "x", "extra": 1}', 400),
        (b'{"user_name": "nobody-here"}', 404),
        (b"x" * 20000, 413),
    ],
    ids=[
        "truncated",
        "wrong-type",
        "leaked-not-bool",
        "unknown-field",
        "unknown-user",
        "oversized",
    ],
)
def test_http_trigger_rejects_bad_requests(
    aws: LocalAws, refusing_daemon: Daemon, body: bytes, expected: int
) -> None:
    """Malformed bodies get 400, an unknown user 404, an oversized body 413."""
    status, doc = refusing_daemon.request("POST", "/v1/rotations", body)
    assert status == expected
    assert doc["error"]
    assert refusing_daemon.request("GET", "/healthz", token=None)[0] == 200


def test_sns_notification_reaches_the_topic(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """With notify.sns_topic_arn set, a finished rotation is published to the topic
    (read back through an SQS subscription), naming the user and no secret."""
    sns = boto3.client("sns", endpoint_url=aws.endpoint_url, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name="us-east-1")
    topic = sns.create_topic(Name="rotator")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="notes")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
    [old] = aws.add_user("ivy", keys=[SeedKey(100 * D)])
    app = make_app(settings_for(aws, vault, tmp_path, notify={"sns_topic_arn": topic}), FakeClock())
    [r] = app.run_once().rotations
    app.close()
    assert r.state is State.DONE
    messages = sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
    ).get("Messages", [])
    bodies = " ".join(m["Body"] for m in messages)
    assert "ivy" in bodies
    assert "rotator: done" in bodies
    secret = vault_secret(vault, f"aws/{ACCOUNT_ID}/ivy")
    assert secret is not None
    assert secret["data"]["aws_secret_access_key"] not in bodies
    assert old.secret_access_key not in bodies
