"""`rotator daemon` as a service runs it: a subprocess against the moto server and the
OpenBao dev server, probed over HTTP, stopped with SIGTERM."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
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
from tests.rig import spawn_daemon, wait_until, write_config

D = timedelta(days=1)


def get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:  # not listening yet
        return 0, ""


def daemon_config(tmp_path: Path, aws: LocalAws, vault: VaultTarget, port: int) -> Path:
    return write_config(
        aws,
        vault,
        tmp_path,
        schedule={"scan": "3s", "tick": "1s"},
        http={"listen": f"127.0.0.1:{port}"},
    )


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
    config = daemon_config(tmp_path, aws, vault, port)
    proc = spawn_daemon(config)
    running = Running(proc, port)
    yield running
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def children(pid: int) -> set[int]:
    """The live child processes of `pid`."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.update(int(c) for c in (task / "children").read_text().split())
    return found


def test_daemon_rotates_serves_probes_and_stops_cleanly(aws: LocalAws, daemon: Running) -> None:
    """A daemon scanning every 3s rotates a due key within seconds, in its own process
    (it starts no child process), its metrics show the work, it answers /healthz and
    /readyz with 200, logs only JSON lines, and exits 0 on SIGTERM within 10s."""
    [old] = aws.add_user("alice", keys=[SeedKey(120 * D)])
    wait_until(lambda: get(daemon.base + "/healthz")[0] == 200, 30, "/healthz")
    wait_until(lambda: old.access_key_id not in aws.keys("alice"), 30, "the rotation")
    assert list(aws.keys("alice").values()) == [KeyStatus.ACTIVE]
    wait_until(lambda: get(daemon.base + "/readyz")[0] == 200, 15, "/readyz")
    status, ready = get(daemon.base + "/readyz")
    assert json.loads(ready)["checks"] == {"state_store": "ok", "vault": "ok", "scan": "ok"}
    assert json.loads(ready)["status"] == "ok"
    status, metrics = get(daemon.base + "/metrics")
    assert status == 200
    for name in (
        'rotator_keys{account="123456789012",decision="ok"}',
        "rotator_oldest_active_key_age_seconds",
        'rotator_rotations_opened_total{account="123456789012",kind="key",reason="age"} 1.0',
        'rotator_rotations_finished_total{account="123456789012",kind="key",reason="age",'
        'result="DONE"} 1.0',
        "rotator_open_rotations",
        "rotator_scan_duration_seconds_count",
        "rotator_last_successful_scan_timestamp_seconds",
        'rotator_aws_calls_total{operation="iam:CreateAccessKey"} 1.0',
    ):
        assert name in metrics, name
    assert children(daemon.proc.pid) == set()
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
    wait_until(lambda: get(daemon.base + "/readyz")[0] == 200, 30, "/readyz")
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


def test_daemon_speaks_the_systemd_notify_protocol(
    tmp_path: Path, aws: LocalAws, vault: VaultTarget
) -> None:
    """Under a notify socket the daemon sends READY=1 once the backends answered,
    WATCHDOG=1 at half of WATCHDOG_USEC, STATUS= lines about the scan, and STOPPING=1."""
    sock_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(0.5)
    port = free_port()
    config = daemon_config(tmp_path, aws, vault, port)
    proc = spawn_daemon(config, {"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"})
    received: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                received.append(listener.recv(4096).decode())
            joined = "\n".join(received)
            if "READY=1" in joined and "last scan" in joined and joined.count("WATCHDOG=1") >= 2:
                break
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        for _ in range(10):
            try:
                received.append(listener.recv(4096).decode())
            except TimeoutError:
                break
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
    joined = "\n".join(received)
    assert "READY=1" in joined
    assert joined.count("WATCHDOG=1") >= 2
    assert "STATUS=last scan" in joined
    assert "STOPPING=1" in joined
    assert proc.returncode == 0


def test_sighup_keeps_old_config_on_error_and_applies_a_valid_one(
    tmp_path: Path, aws: LocalAws, vault: VaultTarget, daemon: Running
) -> None:
    """SIGHUP with an invalid file logs why and keeps serving the old settings; with a
    valid file the daemon reloads."""
    wait_until(lambda: get(daemon.base + "/readyz")[0] == 200, 30, "/readyz")
    config = tmp_path / "rotator.yaml"
    good = config.read_text()
    config.write_text(good + "policy:\n  max_age: 9x\n")
    daemon.proc.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    assert get(daemon.base + "/healthz")[0] == 200
    config.write_text(good.replace("scan: 3s", "scan: 5s"))
    daemon.proc.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    code, err, _ = daemon.stop()
    assert code == 0
    events = [json.loads(line) for line in err.splitlines() if line.strip()]
    rejected = [e for e in events if e["event"] == "daemon.reload_rejected"]
    assert rejected
    assert any("policy" in p for p in rejected[0]["problems"])
    assert any(e["event"] == "daemon.reloaded" and e["scan"] == "5s" for e in events)
