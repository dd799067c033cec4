"""`rotator daemon` while Vault cannot be used: containing a leaked key needs IAM only, so
the daemon becomes ready, scans, polls the leak queue and contains every leaked key; it
says it is degraded, and every other rotation waits for Vault. Against the moto server
and an OpenBao dev server that is not running (its port closed) until a test starts it."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rotator.machine import State
from rotator.model import KeyStatus
from rotator.sandbox import QUARANTINE_V2, LocalAws, LocalVault, SeedKey, free_port
from rotator.state import SqliteStateStore
from tests.conftest import VaultTarget
from tests.rig import spawn_daemon, wait_until, write_config
from tests.test_daemon import Running, children, get
from tests.test_incident import health_event

D = timedelta(days=1)


@pytest.fixture
def vault_down() -> Iterator[VaultTarget]:
    """An OpenBao dev server that is not started: its port is closed. A test may start
    it (`.server.start()`, then mount `kv`) to bring Vault back; it is stopped after."""
    server = LocalVault()
    yield VaultTarget(server.addr, server.token, "kv", server)
    server.stop()


@pytest.fixture
def start_daemon(tmp_path: Path, aws: LocalAws) -> Iterator[Any]:
    """Starts `rotator daemon` (scan every 2 s, tick every 1 s) with the given Vault and
    extra config sections; kills what is still running at the end."""
    started: list[Running] = []

    def start(vault: VaultTarget, env: dict[str, str] | None = None, **sections: Any) -> Running:
        port = free_port()
        config = write_config(
            aws,
            vault,
            tmp_path,
            schedule={"scan": "2s", "tick": "1s"},
            http={"listen": f"127.0.0.1:{port}"},
            **sections,
        )
        running = Running(spawn_daemon(config, env), port)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.communicate()


def readyz(daemon: Running) -> tuple[int, dict[str, Any]]:
    status, body = get(daemon.base + "/readyz")
    return status, (json.loads(body) if body else {})


def key_status(aws: LocalAws, user: str, key_id: str) -> str:
    """The key's status as IAM answers ListAccessKeys (boto3 against moto)."""
    iam = boto3.client("iam", endpoint_url=aws.endpoint_url, region_name="us-east-1")
    keys = iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
    [status] = [k["Status"] for k in keys if k["AccessKeyId"] == key_id]
    return str(status)


def leak_events(daemon: Running) -> dict[tuple[str, str], float]:
    """rotator_leak_events_total from the daemon's /metrics, by (source, result)."""
    status, text = get(daemon.base + "/metrics")
    assert status == 200
    return {
        (s.labels["source"], s.labels["result"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "rotator_leak_events"
        for s in family.samples
        if s.name == "rotator_leak_events_total"
    }


def log_events(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_daemon_with_vault_unreachable_is_ready_degraded_and_its_scan_contains_a_leak(
    tmp_path: Path, aws: LocalAws, vault_down: VaultTarget, start_daemon: Any
) -> None:
    """With Vault's port closed, the daemon still becomes ready (READY=1) and /readyz
    answers 200 "degraded" naming Vault; its scan sets the key of a user with the
    quarantine policy Inactive in IAM; the leak rotation waits for Vault, no other
    rotation opens (a due key stays as it is); the log and STATUS= say leaked keys were
    contained and rotations wait for Vault."""
    [leaked] = aws.add_user("mallory", policies=[QUARANTINE_V2], keys=[SeedKey(3 * D)])
    [due] = aws.add_user("alice", keys=[SeedKey(120 * D)])
    sock_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    try:
        daemon = start_daemon(vault_down, {"NOTIFY_SOCKET": sock_path})
        wait_until(lambda: readyz(daemon)[0] == 200, 30, "/readyz 200")
        status, body = readyz(daemon)
        assert status == 200
        assert body["ready"] is True
        assert body["status"] == "degraded"
        assert body["checks"]["state_store"] == "ok"
        assert body["checks"]["scan"] == "ok"
        assert f"Vault at {vault_down.addr} is unreachable" in body["checks"]["vault"]
        wait_until(
            lambda: key_status(aws, "mallory", leaked.access_key_id) == "Inactive",
            15,
            "containment",
        )
        time.sleep(1)  # /readyz saw the scan end; let its STATUS= line follow
        code, err, _ = daemon.stop()
        received = []
        listener.settimeout(0.2)
        with contextlib.suppress(TimeoutError):
            while True:
                received.append(listener.recv(4096).decode())
    finally:
        listener.close()
    assert code == 0, err[-2000:]
    assert aws.keys("alice") == {due.access_key_id: KeyStatus.ACTIVE}
    store = SqliteStateStore(str(tmp_path / "state.db"))
    try:
        [waiting] = store.list_open()
        assert store.latest_for("123456789012", "alice") is None
    finally:
        store.close()
    assert (waiting.user_name, waiting.leaked) == ("mallory", True)
    assert waiting.state not in (State.DONE, State.FAILED)
    assert waiting.next_action_at is not None
    assert "Vault" in (waiting.last_error or "")
    events = log_events(err)
    unusable = [e for e in events if e["event"] == "daemon.vault_unusable"]
    assert any("leaked keys were contained" in e["detail"] for e in unusable)
    assert all("waits for Vault" in e["detail"] for e in unusable)
    assert not [e for e in events if e["event"] == "daemon.scan_failed"]
    joined = "\n".join(received)
    assert "READY=1" in joined
    assert "STATUS=ready, degraded: Vault cannot be used" in joined
    assert "DEGRADED: Vault cannot be used" in joined
    assert "leaked keys were contained, every other rotation waits for Vault" in joined


def test_daemon_contains_sqs_leak_events_while_vault_is_unreachable_and_counts_them(
    tmp_path: Path, aws: LocalAws, vault_down: VaultTarget, start_daemon: Any
) -> None:
    """With Vault's port closed, the SQS poller still runs: a Health event's key is set
    Inactive in IAM and the message deleted, its leak rotation waits for Vault; the
    daemon's /metrics counts it contained, the same event delivered again duplicate,
    and messages that are not events (a poison one queued ahead of the leak among them)
    rejected. The poller is a thread of the daemon: no child process, and no log line
    per second while it waits."""
    sqs = boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name="us-east-1")
    queue_url = sqs.create_queue(QueueName="health-events")["QueueUrl"]
    [leaked] = aws.add_user("frank", keys=[SeedKey(30 * D)])
    daemon = start_daemon(vault_down, leaks={"sqs_queue_url": queue_url})
    wait_until(lambda: readyz(daemon)[0] == 200, 30, "/readyz 200")
    assert readyz(daemon)[1]["status"] == "degraded"
    assert leak_events(daemon)[("sqs", "contained")] == 0
    event = json.dumps(health_event(leaked.access_key_id))
    sqs.send_message(QueueUrl=queue_url, MessageBody="[" * 100_000)  # poison first
    sqs.send_message(QueueUrl=queue_url, MessageBody=event)
    wait_until(
        lambda: key_status(aws, "frank", leaked.access_key_id) == "Inactive", 20, "containment"
    )
    wait_until(lambda: leak_events(daemon)[("sqs", "contained")] == 1, 15, "contained counted")
    sqs.send_message(QueueUrl=queue_url, MessageBody=event)  # EventBridge delivers twice
    sqs.send_message(QueueUrl=queue_url, MessageBody="{not json")
    wait_until(
        lambda: (
            leak_events(daemon)[("sqs", "duplicate")] == 1
            and leak_events(daemon)[("sqs", "rejected")] == 2
        ),
        20,
        "duplicate and rejected counted",
    )
    counted = leak_events(daemon)
    assert counted[("sqs", "contained")] == 1
    assert counted[("sqs", "retry")] == 0
    attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert (
        attrs["ApproximateNumberOfMessages"],
        attrs["ApproximateNumberOfMessagesNotVisible"],
    ) == (
        "0",
        "0",
    )
    assert children(daemon.proc.pid) == set()
    time.sleep(6)  # idle: the poller long-polls an empty queue
    code, err, _ = daemon.stop()
    assert code == 0, err[-2000:]
    events = log_events(err)
    assert not [e for e in events if "maximum number of running instances" in str(e)]
    per_event = Counter(e["event"] for e in events)
    assert max(per_event.values()) < 30, per_event.most_common(3)
    store = SqliteStateStore(str(tmp_path / "state.db"))
    try:
        [waiting] = store.list_open()
        dead = store.dead_letters()
    finally:
        store.close()
    assert (waiting.user_name, waiting.leaked) == ("frank", True)
    assert waiting.state not in (State.DONE, State.FAILED)
    assert "Vault" in (waiting.last_error or "")
    assert len(dead) == 2
    assert aws.keys("frank") == {leaked.access_key_id: KeyStatus.INACTIVE}


def test_readyz_turns_from_degraded_to_ok_once_vault_comes_back(
    aws: LocalAws, vault_down: VaultTarget, start_daemon: Any
) -> None:
    """A daemon that started while Vault was down answers /readyz 200 "degraded"; once
    Vault listens and holds the mount, the next scan finds it and /readyz says "ok"."""
    daemon = start_daemon(vault_down)
    wait_until(lambda: readyz(daemon)[0] == 200, 30, "/readyz 200")
    assert readyz(daemon)[1]["status"] == "degraded"
    vault_down.server.start()
    vault_down.server.enable_kv2(vault_down.mount)
    wait_until(lambda: readyz(daemon)[1].get("status") == "ok", 20, '/readyz "ok"')
    status, body = readyz(daemon)
    assert status == 200
    assert body == {
        "ready": True,
        "status": "ok",
        "checks": {"state_store": "ok", "vault": "ok", "scan": "ok"},
    }
    code, err, _ = daemon.stop()
    assert code == 0, err[-2000:]


def test_readyz_is_503_unavailable_while_no_scan_has_succeeded(
    tmp_path: Path, vault_down: VaultTarget, start_daemon: Any
) -> None:
    """While AWS cannot be reached the daemon is not ready: /readyz answers 503 with
    status "unavailable" and says no scan has completed; a stop still exits 0."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    daemon = start_daemon(vault_down, aws={"endpoint_url": nowhere})
    wait_until(lambda: readyz(daemon)[0] != 0, 15, "/readyz to answer")
    status, body = readyz(daemon)
    assert status == 503
    assert body["ready"] is False
    assert body["status"] == "unavailable"
    assert body["checks"]["state_store"] == "ok"
    assert body["checks"]["scan"] == "no scan has completed yet"
    code, err, _ = daemon.stop()
    assert code == 0, err[-2000:]
