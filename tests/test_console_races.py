"""Console rotations when the world changes under them, against the moto server and the
OpenBao dev server: a person writing the Vault path at each step, IAM refusing or not
answering, a Vault path that is really the key's, a leak after a failed rotation, and a
process paused past its lease. Each ends with Vault and IAM agreeing, or with IAM
unchanged and the rotation saying what to run; never with a person's password replaced
or an exit code that says all is well when it is not."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from structlog.testing import capture_logs

from rotator.engine import SimulatedCrash
from rotator.machine import RotationKind, State
from rotator.model import ForcedRotation, Rotation
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey
from rotator.state import SqliteStateStore
from tests.conftest import VaultTarget
from tests.faultproxy import (
    Call,
    FaultProxy,
    aws_action,
    aws_error,
    vault_error,
    vault_path,
)
from tests.rig import FakeClock, make_app, rotator, settings_for, vault_secret, write_config

D = timedelta(days=1)
USER = "bob"
CONSOLE_PATH = f"aws/{ACCOUNT_ID}/{USER}/console"
KEY_PATH = f"aws/{ACCOUNT_ID}/{USER}"
OLD_PASSWORD = "Old-Password-1234!"
PERSON_PASSWORD = "Person-Wrote-This-42!"


def seed(aws: LocalAws) -> None:
    aws.add_user(USER, keys=[SeedKey(10 * D)])
    aws.add_login_profile(USER, OLD_PASSWORD, age=100 * D)


def person_writes(vault: VaultTarget) -> None:
    """A person stores their own console password at the path (raw API, root token)."""
    vault.server.request(
        "POST", f"/v1/{vault.mount}/data/{CONSOLE_PATH}", {"data": {"password": PERSON_PASSWORD}}
    )


def rotations(tmp_path: Path) -> list[Rotation]:
    store = SqliteStateStore(tmp_path / "state.db")
    try:
        return store.list_recent(user_name=USER)
    finally:
        store.close()


def assert_person_kept_and_iam_unchanged(aws: LocalAws, vault: VaultTarget) -> None:
    held = vault_secret(vault, CONSOLE_PATH)
    assert held is not None
    assert held["data"]["password"] == PERSON_PASSWORD, "the person's password was overwritten"
    assert aws.login_profile(USER) == (OLD_PASSWORD, False), "IAM was given a password"


def test_iam_not_answering_update_login_profile_makes_rotate_console_exit_3(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """IAM answers every UpdateLoginProfile with 503: the new password is in Vault, IAM
    keeps the old one, and the rotation waits in SET_PASSWORD to set it. `rotate
    --console` exits 3 (a backend could not be reached; the next pass continues it),
    not 0, and names the waiting rotation."""
    seed(aws)
    proxy = fault_proxy(aws.endpoint_url)
    proxy.add(aws_action("UpdateLoginProfile"), aws_error("ServiceUnavailable", 503))
    cfg = write_config(aws, vault, tmp_path, aws={"endpoint_url": proxy.url})
    ran = rotator("--config", str(cfg), "rotate", USER, "--console", "--reason", "INC-7")
    assert ran.returncode == 3, ran.stderr
    [r] = rotations(tmp_path)
    assert r.state is State.SET_PASSWORD
    assert r.id[:8] in ran.stderr
    assert aws.login_profile(USER) == (OLD_PASSWORD, False)


def test_a_person_writing_the_path_after_the_rotations_write_fails_it_with_exit_1(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """A person writes the console path right after the rotation's own write (when the
    rotation sets its custom metadata): the rotation overwrites nothing, gives IAM
    nothing, and ends FAILED; `rotate --console` exits 1 and the error, shown by
    `status`, names the path and the command to run."""
    seed(aws)
    proxy = fault_proxy(vault.addr)
    proxy.add(
        vault_path("POST", rf"/v1/{vault.mount}/metadata/{CONSOLE_PATH}"),
        Call(lambda _: person_writes(vault)),
        times=1,
    )
    cfg = write_config(aws, vault, tmp_path, vault={"url": proxy.url})
    ran = rotator("--config", str(cfg), "rotate", USER, "--console", "--reason", "INC-8")
    assert ran.returncode == 1, ran.stderr
    [r] = rotations(tmp_path)
    assert r.state is State.FAILED
    assert r.last_error is not None
    assert CONSOLE_PATH in r.last_error
    assert f"rotator rotate {USER} --console" in r.last_error
    assert_person_kept_and_iam_unchanged(aws, vault)


def test_a_check_and_set_conflict_with_a_person_fails_the_rotation_at_once(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """A person writes the path between STORE's read and its check-and-set write: Vault
    refuses the rotation's write, the rotation sees a version that is not its own and
    ends FAILED (exit 1); a later pass writes nothing over the person's password."""
    seed(aws)
    proxy = fault_proxy(vault.addr)
    proxy.add(
        vault_path("POST", rf"/v1/{vault.mount}/data/{CONSOLE_PATH}"),
        Call(lambda _: person_writes(vault)),
        times=1,
    )
    cfg = write_config(aws, vault, tmp_path, vault={"url": proxy.url})
    first = rotator("--config", str(cfg), "rotate", USER, "--console")
    assert first.returncode == 1, first.stderr
    again = rotator("--config", str(cfg), "run", "--once")
    assert again.returncode == 4, again.stderr  # the FAILED rotation, reported already
    [r] = rotations(tmp_path)
    assert r.state is State.FAILED
    assert_person_kept_and_iam_unchanged(aws, vault)


def test_after_a_crash_in_store_a_persons_later_write_is_never_overwritten(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """The process dies right after its Vault write (`console:stored`); a person then
    writes their own password at the path. Recovery sees a version newer than the one
    it wrote on top of, not its own: it writes nothing, gives IAM nothing, and FAILS."""
    seed(aws)
    settings = settings_for(aws, vault, tmp_path)
    clock = FakeClock()

    def crash(point: str) -> None:
        if point == "console:stored":
            raise SimulatedCrash(point)

    app = make_app(settings, clock, fault=crash)
    try:
        app.force(ForcedRotation(USER, kind=RotationKind.CONSOLE, reason="test"))
    except SimulatedCrash:
        pass
    finally:
        app.close()
    person_writes(vault)
    clock.advance(timedelta(minutes=30))  # past the dead process's lease
    app = make_app(settings, clock)
    try:
        app.run_once()
    finally:
        app.close()
    [r] = rotations(tmp_path)
    assert r.state is State.FAILED, (r.state, r.last_error)
    assert "IAM is unchanged" in (r.last_error or "")
    assert_person_kept_and_iam_unchanged(aws, vault)


def test_a_vault_write_during_update_login_profile_fails_instead_of_claiming_done(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """A person writes the path while the rotation's UpdateLoginProfile is on its way:
    IAM gets the rotation's password, Vault's latest is the person's. The rotation does
    not say DONE: it FAILS naming the Vault version IAM may have been given and the
    command that sets one password in both; the person's version is not overwritten."""
    seed(aws)
    proxy = fault_proxy(aws.endpoint_url)
    proxy.add(aws_action("UpdateLoginProfile"), Call(lambda _: person_writes(vault)), times=1)
    cfg = write_config(aws, vault, tmp_path, aws={"endpoint_url": proxy.url})
    ran = rotator("--config", str(cfg), "rotate", USER, "--console")
    assert ran.returncode == 1, ran.stderr
    [r] = rotations(tmp_path)
    assert r.state is State.FAILED
    assert "-version=1" in (r.last_error or "")
    held = vault_secret(vault, CONSOLE_PATH)
    assert held is not None
    assert held["data"]["password"] == PERSON_PASSWORD


def test_a_console_path_vault_reads_as_the_key_path_never_overwrites_the_key(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """`console_path_template: "aws//{account_id}/{user_name}"` is the key's path to
    Vault: `config check` refuses it (exit 2). And whatever the configuration, STORE
    never writes a password over data that is not one: with the key pair at the console
    path, the rotation goes BLOCKED naming the path, and the key pair stays."""
    aws.add_user(USER, keys=[SeedKey(100 * D)])
    aws.add_login_profile(USER, OLD_PASSWORD, age=10 * D)
    bad = write_config(
        aws, vault, tmp_path, vault={"console_path_template": "aws//{account_id}/{user_name}"}
    )
    checked = rotator("--config", str(bad), "config", "check")
    assert checked.returncode == 2
    assert "console_path_template" in checked.stderr
    cfg = write_config(aws, vault, tmp_path)
    assert rotator("--config", str(cfg), "rotate", USER).returncode == 0  # key in Vault
    key_pair = vault_secret(vault, KEY_PATH)
    assert key_pair is not None
    vault.server.request(
        "POST", f"/v1/{vault.mount}/data/{CONSOLE_PATH}", {"data": key_pair["data"]}
    )
    ran = rotator("--config", str(cfg), "rotate", USER, "--console")
    assert ran.returncode == 1, ran.stderr
    [r] = [r for r in rotations(tmp_path) if r.kind is RotationKind.CONSOLE]
    assert r.state is State.BLOCKED
    assert "not a console password" in (r.last_error or "")
    after = vault_secret(vault, CONSOLE_PATH)
    assert after is not None
    assert sorted(after["data"]) == ["aws_access_key_id", "aws_secret_access_key"]
    assert aws.login_profile(USER) == (OLD_PASSWORD, False)


def test_a_failed_console_rotation_keeps_exit_4_beside_a_done_key_rotation(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """A console rotation ends FAILED (IAM refuses GetAccountPasswordPolicy once); the
    same user's key is then rotated (DONE). `run --once` and `status` still exit 4: the
    user's latest console rotation is FAILED, whatever its key rotations did."""
    seed(aws)
    proxy = fault_proxy(aws.endpoint_url)
    proxy.add(aws_action("GetAccountPasswordPolicy"), aws_error("AccessDenied", 403), times=1)
    cfg = write_config(aws, vault, tmp_path, aws={"endpoint_url": proxy.url})
    assert rotator("--config", str(cfg), "rotate", USER, "--console").returncode == 1
    assert rotator("--config", str(cfg), "status").returncode == 4
    assert rotator("--config", str(cfg), "run", "--once").returncode == 4
    assert rotator("--config", str(cfg), "rotate", USER).returncode == 0  # the key: DONE
    assert rotator("--config", str(cfg), "status").returncode == 4


def test_a_leak_resets_the_console_password_even_after_a_recent_failed_rotation(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """With `leaks.reset_console_password: true`, a console rotation FAILED a moment ago;
    then the user's key leaks. `retry_failed_after` holds back a pass, never a leak: the
    console rotation opens, the next pass finishes it, and Vault and IAM agree."""
    seed(aws)
    proxy = fault_proxy(aws.endpoint_url)
    proxy.add(aws_action("GetAccountPasswordPolicy"), aws_error("AccessDenied", 403), times=1)
    cfg = write_config(
        aws,
        vault,
        tmp_path,
        aws={"endpoint_url": proxy.url},
        leaks={"reset_console_password": True},
    )
    assert rotator("--config", str(cfg), "rotate", USER, "--console").returncode == 1
    leak = rotator("--config", str(cfg), "rotate", USER, "--leaked", "--reason", "on GitHub")
    assert leak.returncode == 0, leak.stderr
    rotator("--config", str(cfg), "run", "--once")
    console = [r for r in rotations(tmp_path) if r.kind is RotationKind.CONSOLE]
    assert [(r.reason.value, r.state) for r in console if r.reason.value == "leaked"] == [
        ("leaked", State.DONE)
    ]
    held = vault_secret(vault, CONSOLE_PATH)
    assert held is not None
    assert aws.login_profile(USER) == (held["data"]["password"], True)


def test_one_refused_password_after_vault_errors_counts_as_one_refusal(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """Vault answers the first two writes 500; the third lands; IAM then refuses that
    password once (PasswordPolicyViolation). One new password is made and set: the
    rotation ends DONE, never BLOCKED as if three passwords had been refused."""
    seed(aws)
    vp = fault_proxy(vault.addr)
    vp.add(vault_path("POST", rf"/v1/{vault.mount}/data/"), vault_error(500, ["boom"]), times=2)
    ap = fault_proxy(aws.endpoint_url)
    ap.add(
        aws_action("UpdateLoginProfile"),
        aws_error("PasswordPolicyViolation", 400, "Password should have at least one symbol"),
        times=1,
    )
    settings = settings_for(
        aws, vault, tmp_path, vault={"url": vp.url}, aws={"endpoint_url": ap.url}
    )
    clock = FakeClock()
    app = make_app(settings, clock)
    seen: list[State] = []
    try:
        r = app.force(ForcedRotation(USER, kind=RotationKind.CONSOLE, reason="test"))
        seen.append(r.state)
        for _ in range(4):
            if r.state is State.DONE:
                break
            clock.advance(timedelta(minutes=2))
            [r] = app.advance_all([r.id])
            seen.append(r.state)
    finally:
        app.close()
    assert r.state is State.DONE, seen
    assert State.BLOCKED not in seen
    held = vault_secret(vault, CONSOLE_PATH)
    assert held is not None
    assert aws.login_profile(USER) == (held["data"]["password"], True)


def test_a_process_that_set_a_password_after_losing_its_lease_says_so(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Process A renews its lease, then stops before its UpdateLoginProfile leaves (a VM
    pause) for 30 minutes: B takes the rotation over and finishes it, and an operator's
    new rotation C puts a newer password in Vault and IAM. A's late call cannot be
    fenced (IAM has no condition to send), but A notices it lost the lease, sees Vault's
    latest is not its password, and logs and notifies that IAM and Vault may disagree,
    naming the command that sets one password in both; it records nothing as DONE."""
    seed(aws)
    settings = settings_for(aws, vault, tmp_path)
    clock = FakeClock()
    a = make_app(settings, clock)
    iam = a.iam(ACCOUNT_ID)
    send = iam.set_password

    def paused(user_name: str, password: str, *, create: bool = False) -> None:
        clock.advance(timedelta(minutes=30))
        b = make_app(settings, clock)
        try:
            b.run_once()
            b.force(ForcedRotation(USER, kind=RotationKind.CONSOLE, reason="C"))
        finally:
            b.close()
        send(user_name, password, create=create)

    iam.set_password = paused  # type: ignore[method-assign]
    try:
        with capture_logs() as logs:
            a.force(ForcedRotation(USER, kind=RotationKind.CONSOLE, reason="A"))
    finally:
        a.close()
    [told] = [e for e in logs if e["event"] == "console.stale_password_set"]
    assert told["user"] == USER
    held = vault_secret(vault, CONSOLE_PATH)
    assert held is not None
    assert held["version"] == 2  # B's (A's own write, finished) and C's: nothing more
