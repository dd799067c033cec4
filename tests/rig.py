"""A rotator wired to the test servers, with a clock the test moves by hand."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import yaml

from rotator.app import App
from rotator.config import Settings, parse_settings
from rotator.sandbox import LocalAws
from tests.conftest import VaultTarget


@dataclass
class FakeClock:
    """Starts at the real time (moto stamps keys with it) and moves only when told;
    `sleep` moves it too, so retries and waits cost no real time."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    slept: list[float] = field(default_factory=list)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += timedelta(seconds=seconds)


def config_data(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, /, **sections: Mapping[str, Any]
) -> dict[str, Any]:
    """Configuration for the test servers (zero overlap and retirement, a 2 s IAM call
    timeout), each section in `sections` merged over the defaults."""
    data: dict[str, Any] = {
        # A short call timeout keeps the window in which a crashed CreateAccessKey may
        # still mint a key (the engine waits it out, on IAM's clock) to a few seconds.
        "aws": {"endpoint_url": aws.endpoint_url, "region": "us-east-1", "call_timeout": "2s"},
        "vault": {
            "url": vault.addr,
            "mount": vault.mount,
            "auth": {"token": vault.token},
            "timeout": "1s",
        },
        "state": {"path": str(tmp_path / "state.db")},
        "policy": {"overlap": "0s", "delete_after": "0s", "verify_timeout": "10s"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def settings_for(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, /, **sections: Mapping[str, Any]
) -> Settings:
    return parse_settings(config_data(aws, vault, tmp_path, **sections), {})


def write_config(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, /, **sections: Mapping[str, Any]
) -> Path:
    """The same configuration as a file, `tmp_path/rotator.yaml`, for the CLI."""
    path = tmp_path / "rotator.yaml"
    path.write_text(yaml.safe_dump(config_data(aws, vault, tmp_path, **sections)))
    return path


def make_app(
    settings: Settings, clock: FakeClock, fault: Callable[[str], None] | None = None
) -> App:
    return App(settings, clock=clock, sleep=clock.sleep, fault=fault)


def vault_secret(vault: VaultTarget, path: str) -> dict[str, Any] | None:
    """What a consumer reads at `path`: data and custom metadata (raw API, root token)."""
    try:
        data = vault.server.request("GET", f"/v1/{vault.mount}/data/{path}")
        meta = vault.server.request("GET", f"/v1/{vault.mount}/metadata/{path}")
    except Exception:
        return None
    return {
        "data": data["data"]["data"],
        "metadata": meta["data"]["custom_metadata"] or {},
        "version": data["data"]["metadata"]["version"],
    }


def rotator(
    *args: str, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m rotator ARGS` as a user runs it; `env` adds to this environment."""
    return subprocess.run(
        [sys.executable, "-m", "rotator", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `check` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def spawn_daemon(config: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """`rotator --config CONFIG --log-format json daemon` in the background."""
    return subprocess.Popen(
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
        env={**os.environ, **(env or {})},
    )


def identity_of(aws: LocalAws, secret: Mapping[str, Any]) -> str:
    """The ARN the key pair a consumer reads from Vault authenticates as (moto's STS)."""
    sts = boto3.client(
        "sts",
        endpoint_url=aws.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=secret["data"]["aws_access_key_id"],
        aws_secret_access_key=secret["data"]["aws_secret_access_key"],
    )
    return str(sts.get_caller_identity()["Arn"])


def run_pass(app: App) -> None:
    """One `run --once` pass of `app`, then close it (also when the pass raises)."""
    try:
        app.run_once()
    finally:
        app.close()
