"""Never locked out: a crash, a lost answer, an outage, a stalled process or a person
acting at the wrong moment must not leave a user without a working key that Vault
serves. Each case here was a real bug once.

Every test drives the command line as a user does (`python -m rotator ...` in a
subprocess) against the moto server and the OpenBao dev server, with the fault-injecting
proxy (tests/faultproxy.py) in front of either where a case needs a fault, and checks
what IAM, Vault and the state store really hold afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from rotator.model import KeyStatus, NewKey
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey
from rotator.state import SqliteStateStore
from tests.conftest import VaultTarget
from tests.faultproxy import (
    Action,
    DropAfterApply,
    Exchange,
    FaultProxy,
    Reply,
    Request,
    Stall,
    aws_action,
    aws_error,
    vault_error,
    vault_path,
)
from tests.rig import identity_of, rotator, vault_secret, wait_until, write_config

D = timedelta(days=1)
USER = "alice"
PATH = f"aws/{ACCOUNT_ID}/{USER}"
ARN = f"arn:aws:iam::{ACCOUNT_ID}:user/{USER}"
# IAM calls that change something: none may come from a process that lost its lease.
IAM_WRITES = ("CreateAccessKey", "UpdateAccessKey", "DeleteAccessKey")


# --- proxy actions this module needs beyond tests/faultproxy.py ---------------------------


@dataclass(frozen=True)
class First:
    """Run `fn(request)` the moment the call arrives, then let `action` handle it."""

    fn: Callable[[Request], object]
    action: Action

    def perform(self, exchange: Exchange) -> Reply | None:
        self.fn(exchange.request)
        return self.action.perform(exchange)


@dataclass(frozen=True)
class Then:
    """Let `action` handle the call, then run `fn()` before the client hears anything."""

    action: Action
    fn: Callable[[], object]

    def perform(self, exchange: Exchange) -> Reply | None:
        reply = self.action.perform(exchange)
        self.fn()
        return reply


# --- helpers ---------------------------------------------------------------------------


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`rotator --config CONFIG ARGS`, JSON logs on stderr."""
    return rotator("--config", str(config), "--log-format", "json", *args)


def run_once(config: Path) -> subprocess.CompletedProcess[str]:
    return cli(config, "run", "--once")


@contextmanager
def spawned(config: Path, log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`rotator --config CONFIG ARGS` in the background, its output in `log`; on the
    way out it is resumed (if stopped) and killed (if still running)."""
    with open(log, "wb") as sink:
        command = [sys.executable, "-m", "rotator", "--config", str(config)]
        proc = subprocess.Popen(
            [*command, "--log-format", "json", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait(timeout=30)


def seed_user(aws: LocalAws, user: str = USER) -> NewKey:
    """A user with one active key 120 days old: due for rotation (max_age 90d)."""
    [key] = aws.add_user(user, keys=[SeedKey(120 * D)], now=datetime.now(UTC))
    return key


def seed_previous_version(vault: VaultTarget, old: NewKey, rotated_at: datetime) -> None:
    """Vault already serves `old` at PATH, with custom metadata from an earlier rotation
    (raw API, root token)."""
    data = {"aws_access_key_id": old.access_key_id, "aws_secret_access_key": old.secret_access_key}
    vault.server.request("POST", f"/v1/{vault.mount}/data/{PATH}", {"data": data})
    custom = {
        "access_key_id": old.access_key_id,
        "rotation_id": "an-earlier-rotation",
        "rotated_at": rotated_at.isoformat(timespec="seconds"),
    }
    vault.server.request("POST", f"/v1/{vault.mount}/metadata/{PATH}", {"custom_metadata": custom})


def operator_iam(aws: LocalAws) -> Any:
    """What a person uses: boto3 straight against moto, past any proxy."""
    return boto3.client("iam", endpoint_url=aws.endpoint_url, region_name="us-east-1")


def status_of(config: Path, user: str = USER) -> dict[str, Any]:
    """The user's latest rotation as `rotator status --user USER --json` shows it,
    with its events."""
    shown = cli(config, "status", "--user", user, "--json")
    assert shown.returncode in (0, 4), shown.stderr
    rotations = json.loads(shown.stdout)["rotations"]
    assert rotations, f"no rotation recorded for {user}"
    return dict(rotations[0])


def rotations_of(tmp_path: Path, user: str = USER) -> list[Any]:
    """Every rotation of `user` in the state store, newest first."""
    store = SqliteStateStore(tmp_path / "state.db")
    try:
        return store.list_recent(limit=100, user_name=user)
    finally:
        store.close()


def trail(tmp_path: Path, rotation_id: str) -> list[Any]:
    store = SqliteStateStore(tmp_path / "state.db")
    try:
        return store.events(rotation_id)
    finally:
        store.close()


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def wait_for(moment: datetime | str | None, margin: float = 0.5) -> None:
    """Sleep until `moment` (a time, or an ISO time from `status --json`) has passed."""
    assert moment is not None
    due = at(moment) if isinstance(moment, str) else moment
    time.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()) + margin)


def vault_versions(vault: VaultTarget, path: str = PATH) -> dict[int, str]:
    """Every version's access key id at `path` (raw API, root token)."""
    meta = vault.server.request("GET", f"/v1/{vault.mount}/metadata/{path}")
    out = {}
    for number in meta["data"]["versions"]:
        got = vault.server.request("GET", f"/v1/{vault.mount}/data/{path}?version={number}")
        out[int(number)] = got["data"]["data"]["aws_access_key_id"]
    return out


def assert_one_working_key(aws: LocalAws, vault: VaultTarget, user: str = USER) -> str:
    """The user holds exactly one key, Active; Vault's latest version is that key, and
    the pair a consumer reads there authenticates as the user. Returns the key id."""
    keys = aws.keys(user)
    assert list(keys.values()) == [KeyStatus.ACTIVE], keys
    [key_id] = keys
    held = vault_secret(vault, f"aws/{ACCOUNT_ID}/{user}")
    assert held is not None, "Vault serves nothing"
    assert held["data"]["aws_access_key_id"] == key_id
    assert identity_of(aws, held) == f"arn:aws:iam::{ACCOUNT_ID}:user/{user}"
    return key_id


def kv_calls(vault: VaultTarget) -> Callable[[Request], bool]:
    """Every call to the KV mount (reads, writes, metadata), none of Vault's health,
    token or mount checks."""
    return lambda request: request.path.startswith(f"/v1/{vault.mount}/")


def iam_calls(proxy: FaultProxy, names: tuple[str, ...], since: int = 0) -> list[str]:
    return [r.request.action or "" for r in proxy.log[since:] if r.request.action in names]


# --- 1. a crash between the Vault data write and the custom-metadata write ----------------


def test_crash_between_data_and_metadata_write_starts_the_overlap_at_recovery(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """Killed before the metadata write: the overlap starts at recovery; metadata is repaired."""
    # The metadata still names the old key, rotated 90 days ago: an overlap counted from it
    # would deactivate the old key at once.
    old = seed_user(aws)
    seed_previous_version(vault, old, datetime.now(UTC) - 90 * D)
    proxy = fault_proxy(vault.addr)
    # hvac's update_metadata is a POST to <mount>/metadata/<path>. Held unforwarded: the
    # process dies first, and the proxy drops the call when it closes.
    held_metadata = proxy.add(
        vault_path("POST", rf"/v1/{vault.mount}/metadata/"), Stall(300), times=1
    )
    config = write_config(aws, vault, tmp_path, vault={"url": proxy.url}, policy={"overlap": "1h"})
    with spawned(config, tmp_path / "killed.log", "run", "--once") as first:
        wait_until(
            lambda: held_metadata.hits >= 1 or first.poll() is not None, 30, "the metadata write"
        )
        assert first.poll() is None, (tmp_path / "killed.log").read_text()
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    [new_id] = set(aws.keys(USER)) - {old.access_key_id}
    stored = vault_secret(vault, PATH)
    assert stored is not None
    assert stored["data"]["aws_access_key_id"] == new_id
    assert stored["metadata"]["access_key_id"] == old.access_key_id  # the crash's window
    assert rotations_of(tmp_path)[0].state.value == "STORE"

    recovered_at = datetime.now(UTC)
    second = run_once(config)
    assert second.returncode == 0, second.stderr
    # The overlap clock started at recovery: the old key is still Active.
    assert aws.keys(USER) == {old.access_key_id: KeyStatus.ACTIVE, new_id: KeyStatus.ACTIVE}
    shown = status_of(config)
    assert shown["state"] == "OVERLAP", shown
    assert shown["new_key_id"] == new_id
    due = at(shown["next_action_at"])
    assert recovered_at + timedelta(minutes=59) <= due <= datetime.now(UTC) + timedelta(hours=1)
    served = vault_secret(vault, PATH)
    assert served is not None
    assert served["data"]["aws_access_key_id"] == new_id
    assert served["metadata"]["access_key_id"] == new_id
    assert served["metadata"]["rotation_id"] == shown["id"]
    assert at(served["metadata"]["rotated_at"]) >= recovered_at - timedelta(seconds=1)
    assert identity_of(aws, served) == ARN


# --- 2. a process whose lease expired makes no further write -------------------------------


@pytest.mark.slow
def test_a_process_stalled_past_its_lease_makes_no_write_after_the_takeover(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """A run stopped past its lease makes no write after another run took over and finished."""
    # A is stopped (SIGSTOP) with its Vault write in flight until its 24s lease is over; B
    # takes over, deletes A's key as an orphan and rotates with its own; then A's write is
    # let through (Vault refuses it: check-and-set) and A resumes.
    old = seed_user(aws)
    vault_proxy = fault_proxy(vault.addr)
    aws_proxy = fault_proxy(aws.endpoint_url)
    config = write_config(
        aws,
        vault,
        tmp_path,
        aws={"endpoint_url": aws_proxy.url, "call_timeout": "1s"},
        vault={"url": vault_proxy.url, "timeout": "1s"},
        state={"lease_ttl": "24s"},
    )
    pids: list[int] = []
    stopped = threading.Event()

    def stop_a(request: Request) -> None:
        os.kill(pids[0], signal.SIGSTOP)
        stopped.set()

    data_write = vault_path("POST", rf"/v1/{vault.mount}/data/")
    vault_proxy.add(data_write, First(stop_a, Stall(300)), times=1)
    with spawned(config, tmp_path / "a.log", "run", "--once") as a:
        pids.append(a.pid)
        wait_until(lambda: stopped.is_set() or a.poll() is not None, 30, "A's Vault write")
        assert a.poll() is None, (tmp_path / "a.log").read_text()
        [a_key] = set(aws.keys(USER)) - {old.access_key_id}
        [r] = rotations_of(tmp_path)
        assert r.state.value == "STORE"
        assert r.new_key_id == a_key

        time.sleep(25)  # A's 24s lease runs out while A is stopped
        vault_proxy.clear()  # B's calls pass; A's write stays held
        b = run_once(config)
        assert b.returncode == 0, b.stderr
        [after_b] = rotations_of(tmp_path)
        assert after_b.state.value == "DONE", after_b.last_error
        b_key = after_b.new_key_id
        assert b_key not in (None, a_key, old.access_key_id)
        assert f"deleted orphan key {a_key}" in " ".join(e.reason for e in trail(tmp_path, r.id))
        events_after_b = trail(tmp_path, r.id)
        vault_mark, aws_mark = len(vault_proxy.log), len(aws_proxy.log)

        # A's write reaches Vault now (check-and-set from before B's write), then A runs.
        vault_proxy.release()
        wait_until(lambda: len(vault_proxy.log) > vault_mark, 10, "A's write to reach Vault")
        os.kill(a.pid, signal.SIGCONT)
        a.wait(timeout=30)
    a_output = (tmp_path / "a.log").read_text()
    assert "rotation.stale" in a_output, a_output

    # Nothing A did after B took over shows anywhere.
    assert trail(tmp_path, r.id) == events_after_b
    assert rotations_of(tmp_path) == [after_b]
    later_vault = [x.request for x in vault_proxy.log[vault_mark:]]
    vault_writes = [q for q in later_vault if q.method in ("POST", "PUT", "DELETE", "PATCH")]
    assert len(vault_writes) == 1, later_vault  # A's own held write, refused; nothing else
    assert iam_calls(aws_proxy, IAM_WRITES, since=aws_mark) == []
    assert vault_versions(vault) == {1: b_key}
    assert a_key not in aws.keys(USER)
    assert assert_one_working_key(aws, vault) == b_key


# --- 3. a Vault write applied but its answer lost, then Vault down for a while -----------


@pytest.mark.slow
def test_a_stored_key_whose_answer_was_lost_is_kept_through_a_vault_outage(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """A new key Vault stored (answer lost) is kept through a Vault outage and then completed."""
    # Vault applies the write but the answer is lost, then answers 503 to everything for 6s.
    old = seed_user(aws)
    proxy = fault_proxy(vault.addr)
    went_down: list[float] = []

    def vault_goes_down() -> None:
        proxy.add(lambda request: True, vault_error(503, ["Vault is sealed"]))
        went_down.append(time.monotonic())

    data_write = vault_path("POST", rf"/v1/{vault.mount}/data/")
    proxy.add(data_write, Then(DropAfterApply(), vault_goes_down), times=1)
    config = write_config(aws, vault, tmp_path, vault={"url": proxy.url})
    first = run_once(config)
    assert went_down, "the data write never came"
    assert first.returncode == 3, first.stderr
    stored = vault_secret(vault, PATH)
    assert stored is not None
    new_id = stored["data"]["aws_access_key_id"]
    # The key Vault serves is kept, and so is the old one.
    assert aws.keys(USER) == {old.access_key_id: KeyStatus.ACTIVE, new_id: KeyStatus.ACTIVE}
    [r] = rotations_of(tmp_path)
    assert r.state.value == "STORE", r.last_error
    assert r.new_key_id == new_id
    assert r.attempts == 1
    # The outage ends 6s after it began, and never before the first pass has ended.
    time.sleep(max(0.0, went_down[0] + 6.0 - time.monotonic()))
    proxy.clear()
    wait_for(r.next_action_at)
    second = run_once(config)
    assert second.returncode == 0, second.stderr
    [done] = rotations_of(tmp_path)
    assert done.state.value == "DONE", done.last_error
    assert assert_one_working_key(aws, vault) == new_id


# --- 4. CreateAccessKey refused, then a person creates a key during the retry wait -------


@pytest.mark.slow
def test_a_key_created_by_hand_during_the_retry_wait_is_left_alone_and_named(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """A key made by hand during CreateAccessKey's retry wait is left alone and BLOCKED names it."""
    # CreateAccessKey is answered 503 once (sent once: the SDK must not retry it).
    old = seed_user(aws)
    proxy = fault_proxy(aws.endpoint_url)
    proxy.add(aws_action("CreateAccessKey"), aws_error("ServiceUnavailable", 503), times=1)
    config = write_config(aws, vault, tmp_path, aws={"endpoint_url": proxy.url})
    first = run_once(config)
    assert first.returncode == 3, first.stderr
    assert aws.keys(USER) == {old.access_key_id: KeyStatus.ACTIVE}
    waiting = status_of(config)
    assert waiting["state"] == "CREATE", waiting
    assert waiting["attempts"] == 1

    mine = operator_iam(aws).create_access_key(UserName=USER)["AccessKey"]["AccessKeyId"]
    wait_for(waiting["next_action_at"])
    second = run_once(config)
    assert second.returncode == 1, second.stderr
    shown = status_of(config)
    assert shown["state"] == "BLOCKED", shown
    assert mine in (shown["last_error"] or "")
    assert mine in second.stderr
    assert aws.keys(USER) == {old.access_key_id: KeyStatus.ACTIVE, mine: KeyStatus.ACTIVE}
    assert iam_calls(proxy, ("CreateAccessKey",)) == ["CreateAccessKey"]
    assert vault_secret(vault, PATH) is None


# --- 5. the new key deleted or deactivated by a person during the overlap ------------------


@pytest.mark.slow
@pytest.mark.parametrize("what", ["deleted", "deactivated"])
def test_a_new_key_lost_during_the_overlap_leaves_the_old_key_active(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, what: str
) -> None:
    """A new key lost during the overlap: the old key stays active, FAILED; a later pass rotates."""
    old = seed_user(aws)
    # A long retirement: a deactivated old key would stay Inactive through the pass,
    # not be switched back on by DELETE's own re-check a moment later.
    config = write_config(aws, vault, tmp_path, policy={"overlap": "3s", "delete_after": "1h"})
    first = run_once(config)
    assert first.returncode == 0, first.stderr
    [r] = rotations_of(tmp_path)
    assert r.state.value == "OVERLAP", r.last_error
    new_id = r.new_key_id
    assert new_id is not None
    iam = operator_iam(aws)
    if what == "deleted":
        iam.delete_access_key(UserName=USER, AccessKeyId=new_id)
    else:
        iam.update_access_key(UserName=USER, AccessKeyId=new_id, Status="Inactive")
    wait_for(r.next_action_at)

    second = run_once(config)
    assert second.returncode == 1, second.stderr
    assert aws.keys(USER)[old.access_key_id] is KeyStatus.ACTIVE
    shown = status_of(config)
    assert shown["state"] == "FAILED", shown
    assert new_id in shown["last_error"]
    assert old.access_key_id in shown["last_error"]
    # RETIRE is entered only once the old key has been deactivated.
    assert "RETIRE" not in [e["to"] for e in shown["events"]], shown["events"]

    # Once the operator has looked (or policy.retry_failed_after has passed), a pass
    # opens a new rotation for the still-due old key.
    config = write_config(
        aws,
        vault,
        tmp_path,
        policy={"overlap": "0s", "delete_after": "0s", "retry_failed_after": "0s"},
    )
    third = run_once(config)
    assert third.returncode == 0, third.stderr
    latest, failed = rotations_of(tmp_path)
    assert failed.id == r.id
    assert latest.state.value == "DONE", latest.last_error
    assert latest.old_key_id == old.access_key_id
    final = assert_one_working_key(aws, vault)
    assert final not in (old.access_key_id, new_id)


# --- 6. a user whose key cannot be stored: no key is created ----------------------------------


def test_a_vault_mount_that_does_not_exist_creates_no_key(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """A Vault mount that does not exist: the pass exits 1 naming vault.mount and makes no
    key; the next exits 4 (reported, still unresolved) and makes none either."""
    old = seed_user(aws)
    proxy = fault_proxy(aws.endpoint_url)
    config = write_config(
        aws, vault, tmp_path, aws={"endpoint_url": proxy.url}, vault={"mount": "no-such-mount"}
    )
    for expected in (1, 4):
        done = run_once(config)
        assert done.returncode == expected, done.stderr
        assert "vault.mount" in status_of(config)["last_error"]
        assert aws.keys(USER) == {old.access_key_id: KeyStatus.ACTIVE}
    assert iam_calls(proxy, ("CreateAccessKey",)) == []


def test_a_user_named_dot_dot_is_blocked_and_gets_no_key(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """A user named `..` is blocked for its Vault path, in plan and in run; no key is created."""
    # IAM allows the name; Vault cannot take `..` as a path segment.
    old = seed_user(aws, "..")
    proxy = fault_proxy(aws.endpoint_url)
    config = write_config(aws, vault, tmp_path, aws={"endpoint_url": proxy.url})
    plan = cli(config, "plan", "--json")
    assert plan.returncode == 0, plan.stderr
    [item] = [i for i in json.loads(plan.stdout)["items"] if i["user_name"] == ".."]
    assert item["decision"] == "blocked", item
    assert "Vault path" in item["reason"]
    done = run_once(config)
    assert done.returncode == 1, done.stderr
    [r] = rotations_of(tmp_path, "..")
    assert r.state.value == "BLOCKED"
    assert "Vault path" in (r.last_error or "")
    assert aws.keys("..") == {old.access_key_id: KeyStatus.ACTIVE}
    assert iam_calls(proxy, ("CreateAccessKey",)) == []


# --- 7. the old key deleted by a person during the overlap -------------------------------


def test_an_old_key_deleted_during_the_overlap_ends_the_rotation_done(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """An old key deleted by a person during the overlap ends the rotation DONE, exit 0."""
    old = seed_user(aws)
    config = write_config(aws, vault, tmp_path, policy={"overlap": "3s"})
    first = run_once(config)
    assert first.returncode == 0, first.stderr
    [r] = rotations_of(tmp_path)
    assert r.state.value == "OVERLAP", r.last_error
    operator_iam(aws).delete_access_key(UserName=USER, AccessKeyId=old.access_key_id)
    wait_for(r.next_action_at)
    second = run_once(config)
    assert second.returncode == 0, second.stderr
    [done] = rotations_of(tmp_path)
    assert done.state.value == "DONE", done.last_error
    assert assert_one_working_key(aws, vault) == r.new_key_id


# --- 8. a lost answer to the KV write: the custom metadata still names the new key ---------


def test_a_lost_write_answer_still_leaves_metadata_naming_the_new_key(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """A lost answer to the KV write still ends with custom metadata naming the new key."""
    # The data write applied, its answer lost: the metadata write after it was never sent.
    old = seed_user(aws)
    seed_previous_version(vault, old, datetime.now(UTC) - 120 * D)
    proxy = fault_proxy(vault.addr)
    proxy.add(vault_path("POST", rf"/v1/{vault.mount}/data/"), DropAfterApply(), times=1)
    config = write_config(aws, vault, tmp_path, vault={"url": proxy.url})
    done = run_once(config)
    assert done.returncode == 0, done.stderr
    [r] = rotations_of(tmp_path)
    assert r.state.value == "DONE", r.last_error
    new_id = assert_one_working_key(aws, vault)
    served = vault_secret(vault, PATH)
    assert served is not None
    assert served["metadata"]["access_key_id"] == new_id
    assert served["metadata"]["rotation_id"] == r.id
    assert vault_versions(vault) == {1: old.access_key_id, 2: new_id}


# --- 9. Vault down: no key is created, and the retries back off --------------------------------


@pytest.mark.slow
def test_no_key_is_created_while_vault_is_down_and_retries_back_off(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """While Vault is down no key is created, and the rotation's retries back off pass by pass."""
    old = seed_user(aws)
    vault_proxy = fault_proxy(vault.addr)
    aws_proxy = fault_proxy(aws.endpoint_url)
    config = write_config(
        aws, vault, tmp_path, aws={"endpoint_url": aws_proxy.url}, vault={"url": vault_proxy.url}
    )
    sealed = vault_error(503, ["Vault is sealed"])
    everything = vault_proxy.add(lambda request: True, sealed)
    down = run_once(config)
    assert down.returncode == 3, down.stderr
    assert everything.hits >= 1
    assert rotations_of(tmp_path) == []

    vault_proxy.clear()
    vault_proxy.add(kv_calls(vault), sealed)
    first = run_once(config)
    assert first.returncode == 3, first.stderr
    waiting = status_of(config)
    assert waiting["state"] in ("MAKE_ROOM", "CREATE"), waiting
    assert waiting["attempts"] == 1

    early = run_once(config)  # the retry is not due yet: nothing moves
    assert early.returncode in (0, 3), early.stderr
    assert status_of(config) == waiting

    wait_for(waiting["next_action_at"])
    second = run_once(config)
    assert second.returncode == 3, second.stderr
    again = status_of(config)
    assert again["state"] in ("MAKE_ROOM", "CREATE"), again
    assert again["attempts"] == 2

    def gap(shown: dict[str, Any]) -> float:
        return (at(shown["next_action_at"]) - at(shown["updated_at"])).total_seconds()

    assert gap(again) > gap(waiting) > 0
    assert aws.keys(USER) == {old.access_key_id: KeyStatus.ACTIVE}
    assert iam_calls(aws_proxy, ("CreateAccessKey",)) == []


# --- 10. no rollback of a leak rotation ---------------------------------------------------------


@pytest.mark.parametrize("stage", ["completed", "waiting for Vault"])
def test_rollback_of_a_leak_rotation_is_refused_and_the_leaked_key_stays_off(
    aws: LocalAws,
    vault: VaultTarget,
    tmp_path: Path,
    fault_proxy: Callable[[str], FaultProxy],
    stage: str,
) -> None:
    """Rolling back a leak rotation exits 2 and leaves the leaked key off (deleted or Inactive)."""
    old = seed_user(aws)
    proxy = fault_proxy(vault.addr)
    if stage == "waiting for Vault":
        sealed = vault_error(503, ["Vault is sealed"])
        proxy.add(kv_calls(vault), sealed)
    config = write_config(aws, vault, tmp_path, vault={"url": proxy.url})
    leaked = cli(config, "rotate", USER, "--key", old.access_key_id, "--leaked")
    assert leaked.returncode == (0 if stage == "completed" else 3), leaked.stderr
    before = aws.keys(USER)
    assert before.get(old.access_key_id) in (None, KeyStatus.INACTIVE)

    refused = cli(config, "rollback", USER)
    assert refused.returncode == 2, refused.stderr
    assert "leaked" in refused.stderr
    assert old.access_key_id in refused.stderr
    assert aws.keys(USER) == before
    if stage == "completed":
        assert old.access_key_id not in before
        assert assert_one_working_key(aws, vault) != old.access_key_id
    else:
        assert before == {old.access_key_id: KeyStatus.INACTIVE}
