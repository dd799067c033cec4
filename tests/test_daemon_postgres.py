"""`rotator daemon` on PostgreSQL while the database goes away and comes back: no side
effect while it is away, not ready, and back to work by itself."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from rotator.model import KeyStatus
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey, free_port
from tests.conftest import VaultTarget
from tests.pgserver import (
    PgServer,
    postgres_server,  # noqa: F401 - a fixture
    postgres_url,  # noqa: F401 - a fixture
)
from tests.rig import config_data, spawn_daemon, vault_secret, wait_until

D = timedelta(days=1)
SCAN_EVERY = 1  # seconds: schedule.scan


def get(base: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(base + path, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def sample(base: str, name: str) -> float | None:
    for line in get(base, "/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


@pytest.fixture
def daemon_on_postgres(
    tmp_path: Path,
    aws: LocalAws,
    vault: VaultTarget,
    postgres_url: str,  # noqa: F811 - the fixture
) -> Iterator[str]:
    port = free_port()
    data = config_data(
        aws,
        vault,
        tmp_path,
        schedule={"scan": f"{SCAN_EVERY}s", "tick": "1s"},
        http={"listen": f"127.0.0.1:{port}"},
        state={"url": postgres_url},
    )
    config = tmp_path / "rotator.yaml"
    config.write_text(yaml.safe_dump(data))
    proc = spawn_daemon(config)
    yield f"http://127.0.0.1:{port}"
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]


def test_with_postgresql_away_the_daemon_does_nothing_is_not_ready_and_resumes_by_itself(
    aws: LocalAws,
    vault: VaultTarget,
    postgres_server: PgServer,  # noqa: F811 - the fixture
    daemon_on_postgres: str,
) -> None:
    """Stop PostgreSQL under a ready daemon: within seconds /readyz is 503 naming the
    state store, rotator_ready and rotator_backend_up{backend="state"} are 0, and a user
    made due meanwhile keeps their keys untouched (no IAM call changes anything while
    nothing can be recorded). Start PostgreSQL again: the daemon is ready by itself and
    rotates that user, the new key in Vault and the old one gone."""
    base = daemon_on_postgres
    wait_until(lambda: get(base, "/readyz")[0] == 200, 60, "/readyz 200")

    postgres_server.stop()
    try:

        def store_reported_away() -> bool:
            status, body = get(base, "/readyz")
            return status == 503 and json.loads(body)["checks"]["state_store"] != "ok"

        wait_until(store_reported_away, 20, "/readyz 503 naming the state store")
        checks = json.loads(get(base, "/readyz")[1])["checks"]
        assert "state store" in checks["state_store"] or "postgresql" in checks["state_store"]
        wait_until(lambda: sample(base, "rotator_ready") == 0.0, 15, "rotator_ready 0")
        assert sample(base, 'rotator_backend_up{backend="state"}') == 0.0

        [old] = aws.add_user("late", keys=[SeedKey(age=100 * D)])
        time.sleep(3 * SCAN_EVERY)  # three scan periods
        assert aws.keys("late") == {old.access_key_id: KeyStatus.ACTIVE}
        assert vault_secret(vault, f"aws/{ACCOUNT_ID}/late") is None
    finally:
        postgres_server.start()

    wait_until(lambda: get(base, "/readyz")[0] == 200, 30, "/readyz 200 again")
    assert sample(base, 'rotator_backend_up{backend="state"}') == 1.0

    def rotated() -> bool:
        keys = aws.keys("late")
        return old.access_key_id not in keys and len(keys) == 1

    wait_until(rotated, 60, "the due user to be rotated")
    [new_key] = aws.keys("late")
    secret = vault_secret(vault, f"aws/{ACCOUNT_ID}/late")
    assert secret is not None
    assert secret["data"]["aws_access_key_id"] == new_key
