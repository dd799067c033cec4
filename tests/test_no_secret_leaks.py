"""Invariant 3: a secret access key never appears in logs, the state store, exceptions
or CLI output. Every rotation path that handles a secret runs with logging at DEBUG
(in process and as `rotator` subprocesses): zero-overlap rotations, a leaked-key
rotation, and a STORE that fails because Vault went away. Every secret that ever
existed is collected from moto's backend and from Vault, and every output is searched.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import structlog

from rotator import log
from rotator.errors import RotatorError
from rotator.machine import State
from rotator.model import ForcedRotation, NewKey
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey
from rotator.vault import TokenAuth, VaultStore
from tests.conftest import VaultTarget
from tests.rig import FakeClock, make_app, rotator, settings_for

D = timedelta(days=1)


@dataclass
class Secrets:
    """Every secret access key seen, and the public key ids (the positive control: they
    must show up where the secrets must not)."""

    values: set[str] = field(default_factory=set)
    key_ids: set[str] = field(default_factory=set)

    def from_backend(self, aws: LocalAws) -> None:
        """Every key moto holds right now, for every user."""
        for user in aws.backend.users.values():
            for key in user.access_keys:
                self.values.add(key.secret_access_key)
                self.key_ids.add(key.access_key_id)

    def from_vault(self, vault: VaultTarget, user: str) -> None:
        """Every version Vault holds for `user` (raw API, root token)."""
        path = f"aws/{ACCOUNT_ID}/{user}"
        meta = vault.server.request("GET", f"/v1/{vault.mount}/metadata/{path}")
        for number in meta["data"]["versions"]:
            got = vault.server.request("GET", f"/v1/{vault.mount}/data/{path}?version={number}")
            self.values.add(got["data"]["data"]["aws_secret_access_key"])
            self.key_ids.add(got["data"]["data"]["aws_access_key_id"])

    def add(self, keys: list[NewKey]) -> None:
        for key in keys:
            self.values.add(key.secret_access_key)
            self.key_ids.add(key.access_key_id)

    def hook(self, aws: LocalAws) -> Callable[[str], None]:
        """A fault hook that reads moto's backend right after each CreateAccessKey: the
        only way to see the secret of a key that is deleted again (a failed STORE)."""

        def capture(point: str) -> None:
            if point == "create:created":
                self.from_backend(aws)

        return capture


def fragments(secret: str) -> list[str]:
    """The secret, its halves (a truncated secret is still a leak), and the secret as
    JSON may escape it."""
    half = len(secret) // 2
    return [secret, secret[:half], secret[half:], secret.replace("/", "\\/")]


def assert_no_secret(name: str, haystack: str | bytes, secrets: Secrets) -> None:
    """No secret, whole or half, is in `haystack`; the haystack is not empty."""
    assert haystack, f"{name}: nothing to search"
    text = haystack.decode("latin-1") if isinstance(haystack, bytes) else haystack
    for secret in secrets.values:
        for piece in fragments(secret):
            assert piece not in text, f"{name} holds (part of) a secret access key"


def state_files(db: Path) -> dict[str, bytes]:
    """The raw bytes of the state file and its -wal and -shm companions that exist."""
    out = {}
    for suffix in ("", "-wal", "-shm"):
        path = db.with_name(db.name + suffix)
        if path.exists():
            out[path.name] = path.read_bytes()
    return out


@pytest.fixture
def debug_log() -> Iterator[io.StringIO]:
    """The rotator's logging at DEBUG, as JSON, into a buffer; restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    moto = logging.getLogger("moto")
    moto_level = moto.level
    saved = structlog.get_config()
    stream = io.StringIO()
    log.configure("json", "DEBUG", stream=stream)
    # moto's server runs inside this test process (in production it is AWS, elsewhere):
    # its own DEBUG records would describe its responses, secrets included.
    moto.setLevel(logging.INFO)
    yield stream
    for handler in list(root.handlers):
        if getattr(handler, "stream", None) is stream:
            root.removeHandler(handler)
    for handler in handlers:
        # pytest's capture handlers belong to one phase each; pytest manages them.
        if handler not in root.handlers and not type(handler).__module__.startswith("_pytest"):
            root.addHandler(handler)
    root.setLevel(level)
    moto.setLevel(moto_level)
    structlog.configure(**saved)


def exception_texts(exc: BaseException) -> str:
    """Everything an exception shows: str, repr and the traceback with its causes."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


def test_in_process_rotations_at_debug_leak_no_secret(
    aws: LocalAws,
    vault: VaultTarget,
    own_vault: Callable[[], VaultTarget],
    tmp_path: Path,
    debug_log: io.StringIO,
) -> None:
    """Zero-overlap rotations, a leaked-key rotation and a STORE that fails with Vault
    down, all logged at DEBUG: no secret in the log, the state files (with -wal and
    -shm, before and after close), rotation errors, or the errors the Vault adapter
    raises while holding a secret."""
    clock = FakeClock()
    secrets = Secrets()
    for name in ("ann", "ben"):
        secrets.add(aws.add_user(name, keys=[SeedKey(120 * D)], now=clock.now))
    [leaked] = aws.add_user("cat", keys=[SeedKey(5 * D)], now=clock.now)
    secrets.add([leaked])
    settings = settings_for(aws, vault, tmp_path)
    db = Path(settings.state.path)
    snapshots: dict[str, bytes] = {}
    errors: list[str] = []

    app = make_app(settings, clock, fault=secrets.hook(aws))
    result = app.run_once()
    assert {r.state for r in result.rotations} == {State.DONE}
    forced = app.force(
        ForcedRotation("cat", key_id=leaked.access_key_id, leaked=True, reason="on a paste site")
    )
    assert forced.state is State.DONE
    errors += result.failures.values()
    errors += [r.last_error or "" for r in app.store.list_recent(limit=50)]
    snapshots.update({f"open {k}": v for k, v in state_files(db).items()})
    app.close()
    snapshots.update({f"closed {k}": v for k, v in state_files(db).items()})

    # A STORE that cannot reach Vault: the new key is kept until a read shows Vault lacks
    # it, but its secret, held only by the call that created it, is gone for good.
    down = own_vault()
    secrets.add(aws.add_user("dan", keys=[SeedKey(120 * D)], now=clock.now))
    seeded = set(secrets.key_ids)
    down_settings = settings_for(aws, down, tmp_path / "down")
    capture = secrets.hook(aws)

    def capture_then_stop(point: str) -> None:
        capture(point)
        if point == "create:recorded":
            down.server.stop()

    app = make_app(down_settings, clock, fault=capture_then_stop)
    [failed] = app.run_once().rotations
    assert failed.state is State.STORE
    doomed = failed.new_key_id
    assert doomed in secrets.key_ids - seeded
    assert failed.last_error
    errors.append(failed.last_error)
    down_db = Path(down_settings.state.path)
    snapshots.update({f"down open {k}": v for k, v in state_files(down_db).items()})
    app.close()

    # The errors the Vault adapter raises while it holds a new key's secret.
    held = vault.server.request("GET", f"/v1/{vault.mount}/data/aws/{ACCOUNT_ID}/ann")
    key = NewKey(
        held["data"]["data"]["aws_access_key_id"], held["data"]["data"]["aws_secret_access_key"]
    )
    store = VaultStore(str(down.addr), "kv", "aws/{account_id}/{user_name}", TokenAuth("x"))
    raised: list[BaseException] = []
    with pytest.raises(RotatorError) as unreachable:
        store.write("aws/x/dan", key, {}, cas=0)
    raised.append(unreachable.value)
    live = VaultStore(
        vault.addr, vault.mount, "aws/{account_id}/{user_name}", TokenAuth(vault.token)
    )
    with pytest.raises(RotatorError) as stale:
        live.write(f"aws/{ACCOUNT_ID}/ann", key, {}, cas=0)  # it exists: a conflict
    raised.append(stale.value)
    vault.server.request(
        "POST",
        "/v1/sys/policies/acl/read-only",
        {"policy": f'path "{vault.mount}/*" {{ capabilities = ["read"] }}'},
    )
    token = vault.server.request(
        "POST", "/v1/auth/token/create", {"policies": ["read-only"], "ttl": "10m"}
    )["auth"]["client_token"]
    reader = VaultStore(vault.addr, vault.mount, "aws/{account_id}/{user_name}", TokenAuth(token))
    with pytest.raises(RotatorError) as denied:
        reader.write(f"aws/{ACCOUNT_ID}/ann", key, {}, cas=0)
    raised.append(denied.value)
    for s in (store, live, reader):
        s.close()

    for name in ("ann", "ben", "cat"):
        secrets.from_vault(vault, name)
    secrets.from_backend(aws)
    # Four seeded keys and four new ones (dan's kept in IAM, its secret in no store).
    assert len(secrets.values) == 8
    assert doomed in aws.keys("dan")
    logged = debug_log.getvalue()
    # The positive control: the log does describe these rotations, key ids and all.
    new_ids = [r.new_key_id for r in [*result.rotations, forced]]
    assert len(new_ids) == 3
    for key_id in new_ids:
        assert f'"new_key_id": "{key_id}"' in logged
    assert_no_secret("the DEBUG log", logged, secrets)
    assert "[REDACTED]" not in logged, "something tried to log a secret"
    for name, raw in snapshots.items():
        assert_no_secret(f"state file {name}", raw, secrets)
    assert any(str(forced.new_key_id).encode() in raw for raw in snapshots.values())
    assert_no_secret("rotation errors", "\n".join(errors), secrets)
    for exc in raised:
        assert_no_secret(f"exception {type(exc).__name__}", exception_texts(exc), secrets)
    assert [type(e).__name__ for e in raised] == [
        "BackendUnavailable",
        "CasConflict",
        "PermissionDenied",
    ]
    # The negative control: the search does find a secret where there is one.
    with pytest.raises(AssertionError):
        assert_no_secret("control", logged + key.secret_access_key[:20], secrets)


def rotator_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return rotator("--config", str(config), *args)


def test_cli_at_debug_leaks_no_secret(aws: LocalAws, vault: VaultTarget, tmp_path: Path) -> None:
    """`run --once` and `rotate --leaked` at DEBUG with JSON logs, then `status` (text,
    JSON, per user with events) and `plan --json`: no secret in any stdout or stderr,
    nor in the state files the runs left."""
    secrets = Secrets()
    for name in ("eve", "fay"):
        secrets.add(aws.add_user(name, keys=[SeedKey(120 * D)]))
    [leaked] = aws.add_user("gus", keys=[SeedKey(5 * D)])
    secrets.add([leaked])
    db = tmp_path / "state.db"
    config = tmp_path / "rotator.yaml"
    config.write_text(
        f"aws:\n  endpoint_url: {aws.endpoint_url}\n"
        f"vault:\n  url: {vault.addr}\n  mount: {vault.mount}\n  auth:\n    token: {vault.token}\n"
        f"state:\n  path: {db}\n"
        "policy:\n  overlap: 0s\n  delete_after: 0s\n"
    )
    debug = ("--log-level", "DEBUG", "--log-format", "json")
    outputs: dict[str, subprocess.CompletedProcess[str]] = {}
    outputs["run"] = rotator_cli(config, *debug, "run", "--once", "--json")
    outputs["rotate"] = rotator_cli(
        config, *debug, "rotate", "gus", "--leaked", "--key", leaked.access_key_id, "--json"
    )
    readers = {
        "status": ("status",),
        "status --json": ("status", "--json"),
        "status --user": ("status", "--json", "--user", "gus"),
        "plan --json": ("plan", "--json"),
    }
    with ThreadPoolExecutor(len(readers)) as pool:  # they only read: run them side by side
        done = pool.map(lambda args: rotator_cli(config, *debug, *args), readers.values())
        outputs.update(zip(readers, done, strict=True))
    for name, result in outputs.items():
        assert result.returncode == 0, (name, result.stdout, result.stderr)

    for name in ("eve", "fay", "gus"):
        secrets.from_vault(vault, name)
    secrets.from_backend(aws)
    assert len(secrets.values) == 6  # three seeded keys, three new ones
    new_ids = {k for name in ("eve", "fay", "gus") for k in aws.keys(name)}
    assert len(new_ids) == 3
    for name, result in outputs.items():
        assert_no_secret(f"{name} stdout", result.stdout, secrets)
        if result.stderr or name in ("run", "rotate"):
            assert_no_secret(f"{name} stderr", result.stderr, secrets)
        assert "[REDACTED]" not in result.stdout + result.stderr, name
    # The positive control: the DEBUG logs do describe the rotations, key ids and all.
    for key_id in new_ids:
        assert key_id in outputs["run"].stderr + outputs["rotate"].stderr
    status = json.loads(outputs["status --json"].stdout)
    assert {r["new_key_id"] for r in status["rotations"]} == new_ids
    assert json.loads(outputs["status --user"].stdout)["rotations"][0]["events"]
    plan = json.loads(outputs["plan --json"].stdout)
    assert {i["user_name"] for i in plan["items"]} == {"eve", "fay", "gus"}
    files = state_files(db)
    assert files
    for name, raw in files.items():
        assert_no_secret(f"state file {name}", raw, secrets)


def test_each_new_secret_is_forgotten_by_the_scrubber_once_stored(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A long-running daemon must not hold every secret it ever minted: the log scrubber
    registers each new secret while the key is between IAM and Vault, and lets go of it
    once the rotation no longer holds it, so the count is back where it started."""
    for n in range(3):
        aws.add_user(f"forget-{n}", keys=[SeedKey(timedelta(days=120))])
    before = log.secrets_held()
    app = make_app(settings_for(aws, vault, tmp_path), FakeClock())
    try:
        rotations = app.run_once().rotations
    finally:
        app.close()
    assert len(rotations) == 3
    assert all(r.state is State.DONE for r in rotations), [r.last_error for r in rotations]
    assert log.secrets_held() == before


def test_console_passwords_at_debug_leak_nowhere(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Console passwords, at DEBUG with JSON logs: a forced `rotate --console`, a pass
    that rotates a due password under `console: rotate`, a leaked key whose user's
    password is reset (`leaks.reset_console_password`), then `status` (text, JSON, per
    user), `plan --json` and `report --format json`. No password, old or new, whole or
    half, is in any stdout or stderr, nor in the state files."""
    secrets = Secrets()
    old_passwords = {
        "hal": "Hal-Old-Password-0001!",
        "ida": "Ida-Old-Password-0002!",
        "jon": "Jon-Old-Password-0003!",
    }
    for name, password in old_passwords.items():
        secrets.add(aws.add_user(name, keys=[SeedKey(5 * D)]))
        aws.add_login_profile(name, password, age=(100 if name == "ida" else 5) * D)
    db = tmp_path / "state.db"
    config = tmp_path / "rotator.yaml"
    config.write_text(
        f"aws:\n  endpoint_url: {aws.endpoint_url}\n"
        f"vault:\n  url: {vault.addr}\n  mount: {vault.mount}\n  auth:\n    token: {vault.token}\n"
        f"state:\n  path: {db}\n"
        "policy:\n  overlap: 0s\n  delete_after: 0s\n  console: rotate\n"
        "leaks:\n  reset_console_password: true\n"
    )
    debug = ("--log-level", "DEBUG", "--log-format", "json")
    outputs: dict[str, subprocess.CompletedProcess[str]] = {}
    outputs["rotate --console"] = rotator_cli(
        config, *debug, "rotate", "hal", "--console", "--json"
    )
    outputs["run"] = rotator_cli(config, *debug, "run", "--once", "--json")
    outputs["rotate --leaked"] = rotator_cli(config, *debug, "rotate", "jon", "--leaked")
    outputs["run again"] = rotator_cli(config, *debug, "run", "--once", "--json")
    for args in (
        ("status",),
        ("status", "--json"),
        ("status", "--json", "--user", "jon"),
        ("plan", "--json"),
        ("report", "--format", "json"),
    ):
        outputs[" ".join(args)] = rotator_cli(config, *debug, *args)
    for name, result in outputs.items():
        assert result.returncode in (0, 4), (name, result.stdout, result.stderr)

    passwords = set(old_passwords.values())
    for name in old_passwords:
        path = f"aws/{ACCOUNT_ID}/{name}/console"
        meta = vault.server.request("GET", f"/v1/{vault.mount}/metadata/{path}")
        for number in meta["data"]["versions"]:
            got = vault.server.request("GET", f"/v1/{vault.mount}/data/{path}?version={number}")
            passwords.add(got["data"]["data"]["password"])
        profile = aws.login_profile(name)
        assert profile is not None
        passwords.add(profile[0])
    assert len(passwords) == 6  # three old passwords, three rotated ones
    secrets.values |= passwords
    secrets.from_backend(aws)
    for name, result in outputs.items():
        assert_no_secret(f"{name} stdout", result.stdout, secrets)
        assert_no_secret(f"{name} stderr", result.stderr or "-", secrets)
    # The positive control: the logs do describe the console rotations.
    assert "console" in outputs["rotate --console"].stderr
    for raw_name, raw in state_files(db).items():
        assert_no_secret(f"state file {raw_name}", raw, secrets)
