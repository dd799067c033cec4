"""`rotator daemon` as a service runs it: a subprocess against the moto server and the
OpenBao dev server, probed over HTTP, stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from rotator.model import KeyStatus
from rotator.sandbox import LocalAws, SeedKey, free_port
from tests.conftest import VaultTarget

D = timedelta(days=1)


def get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:  # not listening yet
        return 0, ""


def wait_for(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def write_config(
    tmp_path: Path, aws: LocalAws, vault: VaultTarget, port: int, extra: str = ""
) -> Path:
    path = tmp_path / "rotator.yaml"
    path.write_text(
        f"""
aws:
  endpoint_url: {aws.endpoint_url}
vault:
  url: {vault.addr}
  mount: {vault.mount}
  auth:
    token: {vault.token}
state:
  path: {tmp_path / "state.db"}
policy:
  overlap: 0s
  delete_after: 0s
  verify_timeout: 10s
schedule:
  scan: 3s
  tick: 1s
http:
  listen: 127.0.0.1:{port}
{extra}"""
    )
    return path


class Running:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.base = f"http://127.0.0.1:{port}"

    def stop(self) -> tuple[int, str, float]:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err, time.monotonic() - started


@pytest.fixture
def daemon(tmp_path: Path, aws: LocalAws, vault: VaultTarget) -> Iterator[Running]:
    port = free_port()
    config = write_config(tmp_path, aws, vault, port)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rotator",
            "--config",
            str(config),
            "--log-format",
            "json",
            "daemon",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    running = Running(proc, port)
    yield running
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_daemon_rotates_serves_probes_and_stops_cleanly(aws: LocalAws, daemon: Running) -> None:
    """A daemon scanning every 3s rotates a due key within seconds, answers /healthz and
    /readyz with 200, exposes rotator_* metrics, logs only JSON lines, and exits 0 on
    SIGTERM within 10s with no rotation left mid-step."""
    [old] = aws.add_user("alice", keys=[SeedKey(120 * D)])
    wait_for(lambda: get(daemon.base + "/healthz")[0] == 200, 30, "/healthz")
    wait_for(lambda: old.access_key_id not in aws.keys("alice"), 30, "the rotation")
    assert list(aws.keys("alice").values()) == [KeyStatus.ACTIVE]
    wait_for(lambda: get(daemon.base + "/readyz")[0] == 200, 15, "/readyz")
    status, ready = get(daemon.base + "/readyz")
    assert json.loads(ready)["checks"] == {"state_store": "ok", "vault": "ok", "scan": "ok"}
    status, metrics = get(daemon.base + "/metrics")
    assert status == 200
    for name in (
        'rotator_keys{account="123456789012",decision="ok"}',
        "rotator_oldest_active_key_age_seconds",
        'rotator_rotations_opened_total{account="123456789012",reason="age"} 1.0',
        'rotator_rotations_finished_total{account="123456789012",reason="age",result="DONE"} 1.0',
        "rotator_open_rotations",
        "rotator_scan_duration_seconds_count",
        "rotator_last_successful_scan_timestamp_seconds",
        'rotator_aws_calls_total{operation="iam:CreateAccessKey"} 1.0',
    ):
        assert name in metrics, name
    code, err, took = daemon.stop()
    assert code == 0, err
    assert took < 10
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "the daemon logged nothing"
    events = [json.loads(line) for line in lines]  # every line parses as JSON
    names = {e["event"] for e in events}
    assert {"daemon.ready", "rotation.transition", "daemon.stopped"} <= names


def test_daemon_survives_a_backend_outage_during_a_scan(aws: LocalAws, daemon: Running) -> None:
    """An AWS error during a scan is logged and the daemon keeps serving."""
    wait_for(lambda: get(daemon.base + "/readyz")[0] == 200, 30, "/readyz")
    aws.stop()
    try:
        time.sleep(4)
        assert daemon.proc.poll() is None
        assert get(daemon.base + "/healthz")[0] == 200
    finally:
        aws._server = type(aws._server)(ip_address="127.0.0.1", port=aws.port, verbose=False)
        aws.start()
    code, err, _ = daemon.stop()
    assert code == 0
    assert "daemon.scan_failed" in err
