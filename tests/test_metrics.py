"""Prometheus metrics that the daemon test cannot provoke on a healthy system."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rotator.app import App
from rotator.config import parse_settings
from rotator.errors import BackendUnavailable, BadInput
from rotator.metrics import Metrics
from rotator.model import KeyStatus
from rotator.sandbox import ACCOUNT_ID, LocalAws, LocalVault, SeedKey, free_port
from rotator.testing import FakeIam, FakeStateStore
from rotator.wiring import Wiring
from tests.conftest import VaultTarget
from tests.rig import FakeClock, settings_for
from tests.test_incident import health_event


def test_vault_failures_are_counted_by_kind(tmp_path: Path) -> None:
    """Every failed Vault call of the app shows in rotator_vault_errors_total by kind."""
    settings = parse_settings(
        {
            "vault": {"url": f"http://127.0.0.1:{free_port()}", "auth": {"token": "t-not-real"}},
            "state": {"path": str(tmp_path / "state.db")},
        },
        {},
    )
    metrics = Metrics()
    app = App(settings, metrics=metrics)
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            app.secrets.check()
    text = metrics.render().decode()
    assert 'rotator_vault_errors_total{kind="BackendUnavailable"} 2.0' in text


def leak_events(metrics: Metrics) -> dict[tuple[str, str], float]:
    """rotator_leak_events_total by (source, result)."""
    return {
        (s.labels["source"], s.labels["result"]): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        if family.name == "rotator_leak_events"
        for s in family.samples
        if s.name == "rotator_leak_events_total"
    }


@pytest.fixture
def closed_vault() -> VaultTarget:
    """A Vault address nothing listens on: leak events are counted without Vault."""
    server = LocalVault()  # never started
    return VaultTarget(server.addr, "t-not-real", "kv", server)


@pytest.fixture
def queue(aws: LocalAws) -> tuple[Any, str]:
    sqs = boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name="us-east-1")
    return sqs, sqs.create_queue(QueueName="health-events")["QueueUrl"]


def test_a_replayed_sqs_leak_event_counts_contained_then_duplicate(
    tmp_path: Path, aws: LocalAws, closed_vault: VaultTarget, queue: tuple[Any, str]
) -> None:
    """The first delivery of a Health event counts "contained" (its key is Inactive in
    IAM); the same event delivered again changes nothing and counts "duplicate"; an
    event naming a key no user has counts "nothing_to_contain". Source: "sqs"."""
    sqs, url = queue
    [leaked] = aws.add_user("frank", keys=[SeedKey(timedelta(days=30))])
    metrics = Metrics()
    settings = settings_for(aws, closed_vault, tmp_path, leaks={"sqs_queue_url": url})
    clock = FakeClock()
    app = App(settings, clock=clock, sleep=clock.sleep, metrics=metrics)
    try:
        event = json.dumps(health_event(leaked.access_key_id))
        sqs.send_message(QueueUrl=url, MessageBody=event)
        assert app.poll_leak_queue(wait_seconds=0) == 1
        assert aws.keys("frank") == {leaked.access_key_id: KeyStatus.INACTIVE}
        assert leak_events(metrics)[("sqs", "contained")] == 1
        sqs.send_message(QueueUrl=url, MessageBody=event)
        assert app.poll_leak_queue(wait_seconds=0) == 1
        unknown = health_event("AKIA" + "Q" * 16)
        unknown["detail"]["eventArn"] += "-unknown-key"
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(unknown))
        assert app.poll_leak_queue(wait_seconds=0) == 1
    finally:
        app.close()
    counted = leak_events(metrics)
    assert counted[("sqs", "contained")] == 1
    assert counted[("sqs", "duplicate")] == 1
    assert counted[("sqs", "nothing_to_contain")] == 1
    assert counted[("sqs", "rejected")] == counted[("sqs", "retry")] == 0


def test_poison_sqs_messages_count_rejected_and_a_failing_account_counts_retry(
    tmp_path: Path, aws: LocalAws, closed_vault: VaultTarget, queue: tuple[Any, str]
) -> None:
    """A message that is not JSON and an event about an account that is not configured
    are dead-lettered and count "rejected"; an event about a configured account the
    credentials cannot act in is postponed (it comes back) and counts "retry"."""
    sqs, url = queue
    metrics = Metrics()
    settings = settings_for(
        aws,
        closed_vault,
        tmp_path,
        leaks={"sqs_queue_url": url},
        aws={"accounts": [{"id": ACCOUNT_ID}, {"id": "444455556666"}]},
    )
    clock = FakeClock()
    app = App(settings, clock=clock, sleep=clock.sleep, metrics=metrics)
    elsewhere = health_event("AKIA" + "Z" * 16)
    elsewhere["account"] = "777788889999"
    unreachable = health_event("AKIA" + "Y" * 16)
    unreachable["account"] = "444455556666"
    try:
        for body in ("{not json", json.dumps(elsewhere), json.dumps(unreachable)):
            sqs.send_message(QueueUrl=url, MessageBody=body)
            app.poll_leak_queue(wait_seconds=0)
        dead = app.store.dead_letters()
    finally:
        app.close()
    counted = leak_events(metrics)
    assert counted[("sqs", "rejected")] == 2
    assert counted[("sqs", "retry")] == 1
    assert counted[("sqs", "contained")] == 0
    assert len(dead) == 2
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessagesNotVisible"] == "1"  # postponed, not lost


def test_leak_events_from_a_file_are_counted_with_source_file(
    tmp_path: Path, aws: LocalAws, closed_vault: VaultTarget
) -> None:
    """`handle_event` (what `rotator leak-event` runs) counts under source "file": a
    contained key, and a malformed event that is refused (BadInput) as "rejected"."""
    [leaked] = aws.add_user("gina", keys=[SeedKey(timedelta(days=30))])
    metrics = Metrics()
    clock = FakeClock()
    app = App(
        settings_for(aws, closed_vault, tmp_path), clock=clock, sleep=clock.sleep, metrics=metrics
    )
    try:
        handled = app.handle_event(json.dumps(health_event(leaked.access_key_id)))
        with pytest.raises(BadInput):
            app.handle_event("{not json")
    finally:
        app.close()
    assert [r.user_name for r in handled.rotations] == ["gina"]
    assert aws.keys("gina") == {leaked.access_key_id: KeyStatus.INACTIVE}
    counted = leak_events(metrics)
    assert counted[("file", "contained")] == 1
    assert counted[("file", "rejected")] == 1
    assert counted[("sqs", "contained")] == 0


def _fleet_app(tmp_path: Path, iam: Any, store: Any, metrics: Metrics) -> App:
    settings = parse_settings(
        {"state": {"path": str(tmp_path / "state.db")}}, {"VAULT_TOKEN": "not-used"}
    )
    return App(settings, wiring=Wiring(settings, iam=iam, store=store, metrics=metrics))


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


def test_a_leaked_key_whose_containment_fails_stays_counted_active_until_contained(
    tmp_path: Path,
) -> None:
    """While IAM refuses the UpdateAccessKey that contains a leaked key, the key counts
    in rotator_leaked_keys_active and rotator_oldest_active_leak_seconds grows; the
    attempt that succeeds brings both back to 0."""
    iam_down = {"on": True}

    def before(operation: str) -> None:
        if operation == "iam:UpdateAccessKey" and iam_down["on"]:
            raise BackendUnavailable("IAM is not answering")

    iam = FakeIam(before_call=before)
    [key] = iam.add_user("alice", keys=[SeedKey(age=timedelta(days=3))])
    metrics = Metrics()
    app = _fleet_app(tmp_path, iam, FakeStateStore(), metrics)
    with pytest.raises(BackendUnavailable):
        app.contain(ACCOUNT_ID, "alice", key.access_key_id, "test leak")
    assert _sample(metrics, "rotator_leaked_keys_active", account=ACCOUNT_ID) == 1.0
    first = _sample(metrics, "rotator_oldest_active_leak_seconds")
    assert first is not None
    assert first >= 0.0
    time.sleep(0.05)
    later = _sample(metrics, "rotator_oldest_active_leak_seconds")
    assert later is not None
    assert later > first
    iam_down["on"] = False
    assert app.contain(ACCOUNT_ID, "alice", key.access_key_id, "test leak")
    assert iam.keys("alice")[key.access_key_id] is KeyStatus.INACTIVE
    assert _sample(metrics, "rotator_leaked_keys_active", account=ACCOUNT_ID) == 0.0
    assert _sample(metrics, "rotator_oldest_active_leak_seconds") == 0.0


def test_scan_leases_show_which_accounts_this_daemon_holds_and_when_each_was_scanned(
    tmp_path: Path,
) -> None:
    """Two services on one store: the first holds the account's scan lease (1 on its
    rotator_scan_lease_held, 0 on the other's); a finished scan sets the account's last
    scan time on every daemon that looks at the store next."""
    store = FakeStateStore()
    iam = FakeIam()
    iam.add_user("alice", keys=[SeedKey(age=timedelta(days=3))])
    ours, theirs = Metrics(), Metrics()
    first = _fleet_app(tmp_path, iam, store, ours)
    second = _fleet_app(tmp_path, iam, store, theirs)
    held = first.hold_scan_leases(timedelta(minutes=3))
    assert list(held) == [ACCOUNT_ID]
    assert second.hold_scan_leases(timedelta(minutes=3)) == {}
    assert _sample(ours, "rotator_scan_lease_held", account=ACCOUNT_ID) == 1.0
    assert _sample(theirs, "rotator_scan_lease_held", account=ACCOUNT_ID) == 0.0
    result = first.scan_and_open(leases=held)
    assert [inv.account_id for inv in result.inventories] == [ACCOUNT_ID]
    second.hold_scan_leases(timedelta(minutes=3))
    [row] = store.scan_leases()
    assert row.last_scan_at is not None
    last = _sample(theirs, "rotator_account_last_scan_timestamp_seconds", account=ACCOUNT_ID)
    assert last == row.last_scan_at.timestamp()


def test_consumers_still_on_the_old_key_are_counted_while_waiting_and_when_cut_off() -> None:
    """An OVERLAP rotation waiting on consumers counts in rotator_consumers_not_switched
    (back to 0 once it moves on); OVERLAP -> DEACTIVATE with the wait still recorded (the
    overlap limit ended it) counts in rotator_deactivated_in_use_total, a plain end of
    the overlap does not."""
    from dataclasses import replace as changed
    from datetime import UTC, datetime

    from rotator.machine import State
    from rotator.model import Rotation, RotationReason

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    waiting = Rotation(
        id="r1",
        account_id=ACCOUNT_ID,
        user_name="alice",
        reason=RotationReason.AGE,
        state=State.OVERLAP,
        created_at=t0,
        updated_at=t0,
        waiting_on="consumers have not switched",
    )
    metrics = Metrics()
    metrics.observe_open([waiting])
    assert _sample(metrics, "rotator_consumers_not_switched", account=ACCOUNT_ID) == 1.0
    cut_off = changed(waiting, state=State.DEACTIVATE, waiting_on="overlap limit reached")
    metrics.observe_transition(cut_off, State.OVERLAP)
    metrics.observe_transition(
        changed(waiting, id="r2", state=State.DEACTIVATE, waiting_on=None), State.OVERLAP
    )
    metrics.observe_open([cut_off])
    assert _sample(metrics, "rotator_consumers_not_switched", account=ACCOUNT_ID) == 0.0
    assert _sample(metrics, "rotator_deactivated_in_use_total", account=ACCOUNT_ID) == 1.0


def test_per_account_series_exist_at_zero_once_the_accounts_are_known() -> None:
    """After `observe_accounts`, the FAILED counter and the contained-leak counter of
    each account exist at 0 before anything happened, so `increase()` sees the first
    step; nothing is created for an account not named."""
    metrics = Metrics()
    metrics.observe_accounts([ACCOUNT_ID])
    for kind in ("key", "console"):
        labels = {"account": ACCOUNT_ID, "kind": kind, "reason": "age", "result": "FAILED"}
        assert _sample(metrics, "rotator_rotations_finished_total", **labels) == 0.0
    assert _sample(metrics, "rotator_leaked_keys_contained_total", account=ACCOUNT_ID) == 0.0
    assert _sample(metrics, "rotator_leaked_keys_contained_total", account="999999999999") is None


def test_a_daemon_that_no_longer_scans_an_account_drops_its_key_gauges(tmp_path: Path) -> None:
    """The key gauges of an account come from the daemon that scans it: once another
    daemon holds the account's scan lease, this one's copies disappear instead of
    going stale beside the scanning daemon's."""
    iam = FakeIam()
    iam.add_user("alice", keys=[SeedKey(age=timedelta(days=3))])
    store = FakeStateStore()
    metrics = Metrics()
    app = _fleet_app(tmp_path, iam, store, metrics)
    held = app.hold_scan_leases(timedelta(minutes=3))
    app.scan_and_open(leases=held)
    assert _sample(metrics, "rotator_keys", account=ACCOUNT_ID, decision="ok") == 1.0
    app.release_scan_leases(held)
    other = _fleet_app(tmp_path, iam, store, Metrics())
    assert list(other.hold_scan_leases(timedelta(minutes=3))) == [ACCOUNT_ID]
    assert app.hold_scan_leases(timedelta(minutes=3)) == {}
    assert _sample(metrics, "rotator_keys", account=ACCOUNT_ID, decision="ok") is None
    assert _sample(metrics, "rotator_oldest_active_key_age_seconds", account=ACCOUNT_ID) is None
