"""Several daemons sharing one state store: each account is scanned by the one daemon
holding its scan lease, and a daemon that dies hands its accounts over by itself.

Two real daemon processes share one SQLite file here (the same host); the PostgreSQL
fleet test does the same across a database."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from rotator.sandbox import ACCOUNT_ID, LocalAws, free_port
from tests.conftest import VaultTarget
from tests.rig import config_data, spawn_daemon, wait_until

SCAN_CALL = 'rotator_aws_calls_total{operation="iam:GetAccountAuthorizationDetails"}'


class Member:
    """One daemon of the fleet, probed over HTTP."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def metric(self, name: str) -> float:
        """The value of one sample (name with labels, as exposed); 0 when absent."""
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def holds(self, account: str) -> bool:
        return self.metric(f'rotator_scan_lease_held{{account="{account}"}}') == 1.0


@pytest.fixture
def fleet(tmp_path: Path, aws: LocalAws, vault: VaultTarget) -> Iterator[list[Member]]:
    shared = tmp_path / "shared"
    shared.mkdir()
    members: list[Member] = []
    for name in ("a", "b"):
        home = tmp_path / name
        home.mkdir()
        port = free_port()
        data = config_data(
            aws,
            vault,
            shared,
            schedule={"scan": "2s", "tick": "1s"},
            http={"listen": f"127.0.0.1:{port}"},
        )
        config = home / "rotator.yaml"
        config.write_text(yaml.safe_dump(data))
        members.append(Member(spawn_daemon(config), port))
    yield members
    for m in members:
        if m.proc.poll() is None:
            m.proc.send_signal(signal.SIGTERM)
            try:
                m.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.communicate()


def test_two_daemons_on_one_store_scan_each_account_once_and_hand_over_when_one_dies(
    aws: LocalAws, fleet: list[Member]
) -> None:
    """Both daemons become ready, but only the holder of the account's scan lease scans
    it (the other's GetAccountAuthorizationDetails count stays 0 over several scan
    periods). SIGKILL the holder: the survivor takes the lease over, counts the
    takeover, and scans from then on."""
    account = ACCOUNT_ID
    for m in fleet:
        wait_until(lambda m=m: m.get("/readyz")[0] == 200, 60, f"{m.base}/readyz 200")
    wait_until(lambda: sum(m.holds(account) for m in fleet) == 1, 15, "one holder")
    [holder] = [m for m in fleet if m.holds(account)]
    [other] = [m for m in fleet if m is not holder]

    scans_before = holder.metric(SCAN_CALL)
    time.sleep(5)  # two scan periods and more
    assert holder.metric(SCAN_CALL) > scans_before
    assert other.metric(SCAN_CALL) == 0
    assert not other.holds(account)

    holder.proc.kill()
    holder.proc.communicate()
    wait_until(lambda: other.holds(account), 20, "the survivor to take the scan lease")
    assert other.metric('rotator_lease_takeovers_total{kind="scan"}') == 1.0
    wait_until(lambda: other.metric(SCAN_CALL) > 0, 15, "the survivor to scan")
    last = other.metric(f'rotator_account_last_scan_timestamp_seconds{{account="{account}"}}')
    assert time.time() - last < 10
    assert other.get("/readyz")[0] == 200


def test_a_stopping_daemon_releases_its_scan_lease_so_the_next_takes_it_without_a_takeover(
    aws: LocalAws, fleet: list[Member]
) -> None:
    """SIGTERM on the holder gives its scan lease up: the other daemon holds it at its
    next tick, and that is no takeover (no alert for an orderly stop)."""
    account = ACCOUNT_ID
    for m in fleet:
        wait_until(lambda m=m: m.get("/readyz")[0] == 200, 60, f"{m.base}/readyz 200")
    wait_until(lambda: sum(m.holds(account) for m in fleet) == 1, 15, "one holder")
    [holder] = [m for m in fleet if m.holds(account)]
    [other] = [m for m in fleet if m is not holder]
    holder.proc.send_signal(signal.SIGTERM)
    _, err = holder.proc.communicate(timeout=30)
    assert holder.proc.returncode == 0, err[-2000:]
    wait_until(lambda: other.holds(account), 10, "the other daemon to take the scan lease")
    assert other.metric('rotator_lease_takeovers_total{kind="scan"}') == 0.0
