"""The daemon runs its jobs in worker processes: the protocol, the metrics they report
back, errors, stopping, and what the daemon itself loads."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rotator import daemon as daemon_module
from rotator.config import parse_settings
from rotator.errors import NotFound, RotatorError, Transient
from rotator.machine import State
from rotator.metrics import Metrics
from rotator.model import ForcedRotation, Rotation, RotationReason
from rotator.probe import vault_health
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey, free_port
from rotator.workers import WorkerFailed, Workers
from tests.conftest import VaultTarget
from tests.rig import settings_for, vault_secret, wait_until

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def samples(metrics: Metrics) -> list[str]:
    """The exposition text without `_created` lines (those carry the creation time)."""
    text = metrics.render().decode()
    return [line for line in text.splitlines() if "_created" not in line]


def workers_for(settings: Any, replayed: Metrics, **kwargs: Any) -> Workers:
    return Workers(
        settings=lambda: settings.model_dump(mode="json"),
        log_options={"format": "json", "level": "DEBUG"},
        on_metrics=replayed.replay,
        **kwargs,
    )


def test_a_replayed_journal_reproduces_every_metric_exactly() -> None:
    """Counters, gauges and histograms replayed from a worker's journal render as in
    the worker."""
    worker = Metrics(journal=True)
    worker.aws_call("iam:ListAccessKeys")
    worker.aws_call("iam:ListAccessKeys")
    worker.vault_error("Transient")
    worker.observe_scan_duration(1.7)
    worker.observe_scan_duration(42.0)
    worker.scan_failed()
    worker.ready(True)
    daemon = Metrics()
    assert daemon.replay(json.loads(json.dumps(worker.drain()))) == 0
    assert samples(daemon) == samples(worker)
    assert worker.drain() == []  # drained once


def test_replay_skips_malformed_and_unknown_entries() -> None:
    """A journal entry naming no metric, the wrong operation or bad labels is skipped
    and counted; the good ones still apply."""
    daemon = Metrics()
    entries = [
        ["inc", "no_such_metric", {}, 1],
        ["inc", "keys", {"account": "1", "decision": "ok"}, 1],  # a gauge takes "set"
        ["inc", "aws_calls", {"nope": "x"}, 1],
        ["inc", "aws_calls", {"operation": "iam:GetUser"}, "one"],
        "not an entry",
        ["inc", "aws_calls", {"operation": "iam:GetUser"}, 1],
    ]
    assert daemon.replay(entries) == 5
    assert 'rotator_aws_calls_total{operation="iam:GetUser"} 1.0' in samples(daemon)


def test_the_daemon_loads_neither_the_aws_sdk_nor_the_vault_client() -> None:
    """`rotator daemon` imports no boto3, botocore, hvac or requests: those live in the
    workers, which exit after their job."""
    code = (
        "import sys, rotator.cli, rotator.daemon;"
        "print([m for m in ('boto3', 'botocore', 'hvac', 'requests', 'rotator.app')"
        " if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_scan_worker_rotates_and_reports_metrics_without_any_secret(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A `scan` worker rotates a due key, reports counts and its metrics; its stdout
    and stderr at DEBUG never hold the new secret."""
    aws.add_user("alice", keys=[SeedKey(age=timedelta(days=120))])
    settings = settings_for(aws, vault, tmp_path)
    order = {
        "job": "scan",
        "settings": settings.model_dump(mode="json"),
        "log": {"format": "json", "level": "DEBUG"},
    }
    done = subprocess.run(
        [sys.executable, "-m", "rotator.worker"],
        input=json.dumps(order),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    result = lines[-1]
    assert result["type"] == "result"
    assert result["opened"] == 1
    assert result["decisions"] == {"rotate": 1}
    journal = [entry for line in lines if line["type"] == "metrics" for entry in line["journal"]]
    daemon = Metrics()
    assert daemon.replay(journal) == 0
    assert any('operation="iam:CreateAccessKey"' in s for s in samples(daemon))
    secret = vault_secret(vault, f"aws/{ACCOUNT_ID}/alice")
    assert secret is not None
    value = secret["data"]["aws_secret_access_key"]
    assert value not in done.stdout
    assert value not in done.stderr
    assert all(json.loads(line) for line in done.stderr.splitlines())  # JSON log lines


def test_workers_run_check_and_relay_a_not_found_from_a_trigger(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """`check` returns the accounts; a trigger for an unknown user raises NotFound in
    the daemon, as the in-process call would."""
    settings = settings_for(aws, vault, tmp_path)
    replayed = Metrics()
    workers = workers_for(settings, replayed)
    assert workers.run("check")["accounts"] == [ACCOUNT_ID]
    with pytest.raises(NotFound, match="ghost"):
        workers.run("trigger", {"user_name": "ghost"})
    assert workers.live() == 0


def test_a_worker_that_ends_without_a_result_is_a_failure(tmp_path: Path) -> None:
    """A worker that exits without reporting (crash, kill) raises WorkerFailed with its
    exit code; lines that are not JSON are skipped."""
    script = "import sys; sys.stdin.read(); print('garbage'); sys.exit(3)"
    workers = Workers(
        settings=dict,
        log_options={},
        on_metrics=Metrics().replay,
        command=[sys.executable, "-c", script],
    )
    with pytest.raises(WorkerFailed, match="code 3"):
        workers.run("scan")


def test_stop_terminates_workers_and_kills_those_that_ignore_it() -> None:
    """`stop` sends SIGTERM; a worker that ends on it is a clean stop, one that ignores
    it is killed after the timeout; no worker starts afterwards."""
    polite = "import sys, time; sys.stdin.read(); time.sleep(60)"
    stubborn = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "sys.stdin.read(); print('{}', flush=True); time.sleep(60)"
    )
    for script, clean in ((polite, True), (stubborn, False)):
        workers = Workers(
            settings=dict,
            log_options={},
            on_metrics=Metrics().replay,
            command=[sys.executable, "-c", script],
        )
        worker = workers.start("tick")
        if not clean:
            next(iter(worker._lines))  # the handler is installed once it printed
        assert workers.stop(timeout=1.0) is clean
        assert workers.live() == 0
        with pytest.raises(RotatorError, match="stopping"):
            workers.start("tick")


def rotation(state: State, next_action_at: datetime | None) -> Rotation:
    return Rotation(
        id="r1",
        account_id="123456789012",
        user_name="alice",
        reason=RotationReason.AGE,
        state=state,
        created_at=NOW,
        updated_at=NOW,
        next_action_at=next_action_at,
    )


def test_a_tick_starts_a_worker_only_for_a_due_or_blocked_rotation() -> None:
    """Due: no next action time, one in the past, or BLOCKED; a rotation waiting out
    its overlap is not."""
    later = NOW + timedelta(hours=1)
    assert rotation(State.CREATE, None).is_due(NOW)
    assert rotation(State.VERIFY, NOW - timedelta(seconds=1)).is_due(NOW)
    assert rotation(State.BLOCKED, later).is_due(NOW)
    assert not rotation(State.OVERLAP, later).is_due(NOW)


def test_vault_health_probe_tells_ok_sealed_and_unreachable(
    own_vault: Any,
) -> None:
    """The daemon's own Vault probe: "ok" for a live server, "sealed" once sealed, and
    a reason naming the address when nothing listens."""
    target = own_vault()
    assert vault_health(target.addr) == "ok"
    target.server.request("PUT", "/v1/sys/seal")
    assert vault_health(target.addr) == "sealed"
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert vault_health(nowhere).startswith(f"vault unreachable at {nowhere}")


def test_triggers_beyond_the_worker_cap_wait_then_get_a_retry_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every trigger slot busy, a further trigger waits and then fails as
    Transient (HTTP 503); once a worker ends, its slot serves the next trigger."""
    monkeypatch.setattr(daemon_module, "TRIGGER_WORKERS", 1)
    monkeypatch.setattr(daemon_module, "TRIGGER_WAIT", 0.5)
    release = tmp_path / "release"
    script = (
        "import json, os, sys, time; sys.stdin.read();"
        "print(json.dumps({'type': 'opened', 'rotation': {'id': 'r1', 'state': 'CONTAIN'}}),"
        " flush=True);"
        f"[time.sleep(0.05) for _ in range(400) if not os.path.exists({str(release)!r})];"
        "print(json.dumps({'type': 'result', 'rotation': {'id': 'r1'}}), flush=True)"
    )
    settings = parse_settings({"state": {"path": str(tmp_path / "state.db")}}, {}, need_vault=False)
    daemon = daemon_module.Daemon(lambda: settings)
    daemon._workers = Workers(
        settings=dict,
        log_options={},
        on_metrics=Metrics().replay,
        command=[sys.executable, "-c", script],
    )
    try:
        request = ForcedRotation(user_name="alice", leaked=True)
        assert daemon.trigger(request) == {"id": "r1", "state": "CONTAIN"}
        with pytest.raises(Transient, match="retry"):
            daemon.trigger(request)
        release.touch()
        wait_until(lambda: daemon._workers.live() == 0, 20, "the first worker to end")
        assert daemon.trigger(request)["id"] == "r1"
    finally:
        release.touch()
        daemon._workers.stop(timeout=5)
        daemon.close()
