"""Console passwords rotated into Vault, against the moto server and the OpenBao dev
server: forced from the command line, with and without console access, under a strict
password policy, crashed at every step boundary, with answers lost after they were
applied, and with a person writing the Vault path mid-rotation.

What is checked is what IAM and Vault really hold: the password Vault serves at the
console path is the one IAM has (with a reset required at the next sign-in), or IAM is
unchanged. No password appears in any output."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rotator.app import App
from rotator.engine import SimulatedCrash
from rotator.machine import CONSOLE_TRANSITIONS, RotationKind, State
from rotator.model import ForcedRotation, Rotation
from rotator.passwords import SYMBOLS
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey
from rotator.state import SqliteStateStore
from tests.conftest import VaultTarget
from tests.faultproxy import DropAfterApply, FaultProxy, aws_action, vault_path
from tests.rig import FakeClock, make_app, rotator, settings_for, vault_secret, write_config

D = timedelta(days=1)
USER = "bob"
CONSOLE_PATH = f"aws/{ACCOUNT_ID}/{USER}/console"
OLD_PASSWORD = "Old-Password-1234!"

# The fault points a forced console rotation passes, in order: a crash at each one must
# end, after recovery, with Vault and IAM agreeing.
CONSOLE_POINTS = (
    "moved:PLANNED->STORE",
    "console:stored",
    "moved:STORE->SET_PASSWORD",
    "console:set",
    "moved:SET_PASSWORD->DONE",
)


def seed(aws: LocalAws, *, age: timedelta = 100 * D, profile: bool = True) -> None:
    aws.add_user(USER, keys=[SeedKey(10 * D)])
    if profile:
        aws.add_login_profile(USER, OLD_PASSWORD, age=age)


def console_in_vault(vault: VaultTarget) -> dict[str, Any] | None:
    return vault_secret(vault, CONSOLE_PATH)


def assert_agree(aws: LocalAws, vault: VaultTarget) -> str:
    """Vault's latest console password is IAM's, a reset is required, and it is new."""
    held = console_in_vault(vault)
    assert held is not None, "no console password in Vault"
    profile = aws.login_profile(USER)
    assert profile is not None
    password, reset_required = profile
    assert held["data"]["password"] == password
    assert reset_required
    assert password != OLD_PASSWORD
    return password


def rotations(settings_path: Path) -> list[Rotation]:
    store = SqliteStateStore(settings_path)
    try:
        return store.list_recent(user_name=USER)
    finally:
        store.close()


def test_rotate_console_puts_a_new_password_in_vault_then_iam_with_a_reset_required(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """`rotator rotate USER --console --reason ...` writes a new password to Vault at
    aws/<account>/<user>/console (data key `password`, the rotation's id beside it,
    custom metadata rotation_id and rotated_at), sets it in IAM with
    PasswordResetRequired, exits 0, and shows the rotation as kind console in `status`.
    At DEBUG, neither command prints the password; the user's key is untouched."""
    seed(aws)
    keys_before = aws.keys(USER)
    cfg = write_config(aws, vault, tmp_path)
    ran = rotator(
        "--config", str(cfg), "--log-level", "DEBUG", "rotate", USER, "--console",
        "--reason", "INC-42: password pasted in a ticket", "--json",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    password = assert_agree(aws, vault)
    held = console_in_vault(vault)
    assert held is not None
    shown = json.loads(ran.stdout)
    assert shown["kind"] == "console"
    assert shown["state"] == "DONE"
    assert held["data"]["rotation_id"] == shown["id"]
    assert held["metadata"]["rotation_id"] == shown["id"]
    assert "rotated_at" in held["metadata"]
    assert aws.keys(USER) == keys_before
    status = rotator("--config", str(cfg), "--log-level", "DEBUG", "status", "--json")
    assert status.returncode == 0, status.stderr
    [row] = [r for r in json.loads(status.stdout)["rotations"] if r["id"] == shown["id"]]
    assert row["kind"] == "console"
    assert row["note"] == "INC-42: password pasted in a ticket"
    for out in (ran.stdout, ran.stderr, status.stdout, status.stderr):
        assert password not in out
        assert OLD_PASSWORD not in out
    state_bytes = (tmp_path / "state.db").read_bytes()
    assert password.encode() not in state_bytes


def test_the_new_password_satisfies_a_strict_account_password_policy(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Under a policy asking for 64 characters with every kind of character, the new
    password has them all (moto does not enforce the policy: the test checks it)."""
    seed(aws)
    aws.set_password_policy(
        minimum_password_length=64,
        require_symbols=True,
        require_numbers=True,
        require_uppercase_characters=True,
        require_lowercase_characters=True,
    )
    ran = rotator("--config", str(write_config(aws, vault, tmp_path)), "rotate", USER, "--console")
    assert ran.returncode == 0, ran.stderr
    password = assert_agree(aws, vault)
    assert len(password) >= 64
    assert any(c.isupper() for c in password)
    assert any(c.islower() for c in password)
    assert any(c.isdigit() for c in password)
    assert any(c in SYMBOLS for c in password)


def test_a_user_without_console_access_is_refused_unless_create_is_given(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """No login profile: `rotate --console` exits 2 saying to add --create, and IAM and
    Vault are untouched; with --create the user gets a login profile whose password is
    the one in Vault, created with a reset required."""
    seed(aws, profile=False)
    # moto keeps no reset flag from CreateLoginProfile: the proxy shows what was asked.
    proxy = fault_proxy(aws.endpoint_url)
    cfg = write_config(aws, vault, tmp_path, aws={"endpoint_url": proxy.url})
    refused = rotator("--config", str(cfg), "rotate", USER, "--console")
    assert refused.returncode == 2, refused.stderr
    assert "--create" in refused.stderr
    assert aws.login_profile(USER) is None
    assert console_in_vault(vault) is None
    created = rotator("--config", str(cfg), "rotate", USER, "--console", "--create")
    assert created.returncode == 0, created.stderr
    held = console_in_vault(vault)
    assert held is not None
    profile = aws.login_profile(USER)
    assert profile is not None
    assert profile[0] == held["data"]["password"]
    [create] = [r.request for r in proxy.log if r.request.action == "CreateLoginProfile"]
    assert create.form["PasswordResetRequired"] == "true"


def test_console_options_that_make_no_sense_together_are_refused_before_anything_runs(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """--create without --console, --console with --leaked, and --create for a user
    that has console access already, each exit 2 and change nothing."""
    seed(aws)
    cfg = write_config(aws, vault, tmp_path)
    for args in (["--create"], ["--console", "--leaked"], ["--console", "--create"]):
        ran = rotator("--config", str(cfg), "rotate", USER, *args)
        assert ran.returncode == 2, (args, ran.stderr)
    assert aws.login_profile(USER) == (OLD_PASSWORD, False)
    assert console_in_vault(vault) is None


class Crash:
    """A fault hook that raises `SimulatedCrash` at `at` (once) and records every point."""

    def __init__(self, at: str | None) -> None:
        self.at = at
        self.points: list[str] = []
        self.crashed = False

    def __call__(self, point: str) -> None:
        self.points.append(point)
        if point == self.at and not self.crashed:
            self.crashed = True
            raise SimulatedCrash(point)


def _force(app: App) -> None:
    try:
        app.force(ForcedRotation(USER, kind=RotationKind.CONSOLE, reason="test"))
    finally:
        app.close()


def test_a_forced_console_rotation_passes_exactly_the_listed_fault_points(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Guard for the crash matrix: an undisturbed rotation passes CONSOLE_POINTS, in
    order, and every move it makes is one the console table allows."""
    seed(aws)
    settings = settings_for(aws, vault, tmp_path)
    watch = Crash(None)
    _force(make_app(settings, FakeClock(), fault=watch))
    assert tuple(watch.points) == CONSOLE_POINTS
    [r] = rotations(settings.state.path)
    assert r.state is State.DONE
    for point in CONSOLE_POINTS:
        if point.startswith("moved:"):
            frm, to = point.removeprefix("moved:").split("->")
            assert State(to) in CONSOLE_TRANSITIONS[State(frm)]
    assert_agree(aws, vault)


@pytest.mark.parametrize("point", CONSOLE_POINTS)
def test_a_crash_at_every_step_boundary_recovers_with_vault_and_iam_agreeing(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, point: str
) -> None:
    """The process dies at `point`; a fresh one (`run --once`, a new lease owner, the
    same state file) finishes the rotation. In the end Vault's latest password is IAM's
    with a reset required, Vault holds a single new version (a write whose rotation id
    it recognises is adopted, never written twice), and the trail is one legal chain."""
    seed(aws)
    settings = settings_for(aws, vault, tmp_path)
    clock = FakeClock()
    crash = Crash(point)
    with pytest.raises(SimulatedCrash):
        _force(make_app(settings, clock, fault=crash))
    [r] = rotations(settings.state.path)
    assert r.state is not State.DONE or point == "moved:SET_PASSWORD->DONE"
    if point in ("moved:PLANNED->STORE", "console:stored"):
        # Nothing reached IAM yet.
        assert aws.login_profile(USER) == (OLD_PASSWORD, False)
    clock.advance(timedelta(minutes=30))  # past the dead process's lease
    app = make_app(settings, clock)
    try:
        app.run_once()
    finally:
        app.close()
    [done] = rotations(settings.state.path)
    assert done.state is State.DONE, (done.state, done.last_error)
    assert_agree(aws, vault)
    held = console_in_vault(vault)
    assert held is not None
    assert held["version"] == 1
    store = SqliteStateStore(settings.state.path)
    try:
        trail = store.events(done.id)
    finally:
        store.close()
    moves = [(e.from_state, e.to_state) for e in trail if e.from_state != e.to_state]
    for frm, to in moves[1:]:
        assert frm is not None
        assert to in CONSOLE_TRANSITIONS[frm], moves


@pytest.mark.parametrize(
    "lost",
    ["vault-write", "UpdateLoginProfile"],
)
def test_an_answer_lost_after_it_was_applied_ends_with_vault_and_iam_agreeing(
    aws: LocalAws,
    vault: VaultTarget,
    tmp_path: Path,
    fault_proxy: Callable[[str], FaultProxy],
    lost: str,
) -> None:
    """Vault stores the password (or IAM sets it) but the answer never comes back: the
    rotation does not write a second password over it; it recognises its own write,
    finishes, and Vault's single new version is IAM's password."""
    seed(aws)
    if lost == "vault-write":
        proxy = fault_proxy(vault.addr)
        proxy.add(vault_path("POST", rf"/v1/{vault.mount}/data/"), DropAfterApply(), times=1)
        cfg = write_config(aws, vault, tmp_path, vault={"url": proxy.url})
    else:
        proxy = fault_proxy(aws.endpoint_url)
        proxy.add(aws_action("UpdateLoginProfile"), DropAfterApply(), times=1)
        cfg = write_config(aws, vault, tmp_path, aws={"endpoint_url": proxy.url})
    first = rotator("--config", str(cfg), "rotate", USER, "--console")
    assert first.returncode in (0, 3), first.stderr
    if first.returncode == 3:
        again = rotator("--config", str(cfg), "run", "--once")
        assert again.returncode in (0, 4), again.stderr
    [done] = rotations(tmp_path / "state.db")
    assert done.state is State.DONE, (done.state, done.last_error)
    assert_agree(aws, vault)
    held = console_in_vault(vault)
    assert held is not None
    assert held["version"] == 1


def test_a_person_writing_the_vault_path_mid_rotation_is_not_overwritten(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Between STORE and SET_PASSWORD a person writes their own password to the console
    path: the rotation does not give IAM its password over theirs, nor write Vault
    again. It ends FAILED, naming the path and what to run; IAM is unchanged."""
    seed(aws)
    settings = settings_for(aws, vault, tmp_path)

    def person_writes(point: str) -> None:
        if point == "moved:STORE->SET_PASSWORD":
            vault.server.request(
                "POST",
                f"/v1/{vault.mount}/data/{CONSOLE_PATH}",
                {"data": {"password": "Set-By-A-Person-99!"}},
            )

    app = make_app(settings, FakeClock(), fault=person_writes)
    _force(app)
    [r] = rotations(settings.state.path)
    assert r.state is State.FAILED, (r.state, r.last_error)
    assert aws.login_profile(USER) == (OLD_PASSWORD, False)
    held = console_in_vault(vault)
    assert held is not None
    assert held["data"] == {"password": "Set-By-A-Person-99!"}
    store = SqliteStateStore(settings.state.path)
    try:
        why = store.events(r.id)[-1].reason
    finally:
        store.close()
    assert CONSOLE_PATH in why
    assert f"rotator rotate {USER} --console" in why


def test_a_leaked_key_also_resets_the_console_password_when_configured(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """With leaks.reset_console_password, `rotate --leaked` contains and replaces the key
    and, in the same command, rotates the same user's console password (shown beside
    the key's rotation, with where to read it); without it, the console password is
    left alone."""
    aws.add_user(USER, keys=[SeedKey(10 * D)])
    aws.add_login_profile(USER, OLD_PASSWORD)
    cfg = write_config(aws, vault, tmp_path, leaks={"reset_console_password": True})
    leaked = rotator("--config", str(cfg), "rotate", USER, "--leaked")
    assert leaked.returncode == 0, leaked.stderr
    assert "console" in leaked.stdout
    assert f"-field=password {CONSOLE_PATH}" in leaked.stdout
    kinds = {(r.kind, r.state) for r in rotations(tmp_path / "state.db")}
    assert (RotationKind.KEY, State.DONE) in kinds
    assert (RotationKind.CONSOLE, State.DONE) in kinds
    assert_agree(aws, vault)

    other = tmp_path / "other"
    other.mkdir()
    aws.reset()
    aws.add_user(USER, keys=[SeedKey(10 * D)])
    aws.add_login_profile(USER, OLD_PASSWORD)
    cfg2 = write_config(aws, vault, other)
    assert rotator("--config", str(cfg2), "rotate", USER, "--leaked").returncode == 0
    assert rotator("--config", str(cfg2), "run", "--once").returncode in (0, 4)
    assert {r.kind for r in rotations(other / "state.db")} == {RotationKind.KEY}
    assert aws.login_profile(USER) == (OLD_PASSWORD, False)


def test_a_pass_rotates_a_100_day_old_password_under_console_rotate_once(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Under `console: rotate`, `run --once` rotates a 100-day-old password into Vault and
    IAM (reset required) and leaves a 10-day-old one alone; a second pass, whose
    credential report still dates the password 100 days back (as AWS's may for four
    hours, and moto's always), does not rotate it again."""
    seed(aws)
    aws.add_user("carol")
    aws.add_login_profile("carol", "Carol-Password-77!", age=10 * D)
    cfg = write_config(aws, vault, tmp_path, policy={"console": "rotate"})
    first = rotator("--config", str(cfg), "run", "--once")
    assert first.returncode == 0, first.stderr
    password = assert_agree(aws, vault)
    assert aws.login_profile("carol") == ("Carol-Password-77!", False)
    assert vault_secret(vault, f"aws/{ACCOUNT_ID}/carol/console") is None
    second = rotator("--config", str(cfg), "run", "--once")
    assert second.returncode == 0, second.stderr
    held = console_in_vault(vault)
    assert held is not None
    assert held["version"] == 1
    assert aws.login_profile(USER) == (password, True)
    [r] = [r for r in rotations(tmp_path / "state.db") if r.kind is RotationKind.CONSOLE]
    assert r.state is State.DONE
    assert r.reason.value == "age"


def test_a_dry_run_names_the_console_passwords_the_pass_would_rotate_and_changes_none(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Under `console: rotate`, `run --once --dry-run` (text and --json) names the due
    password and leaves IAM and Vault as they are; once a console rotation of the user
    is open, the dry run no longer lists it (the pass would not open another)."""
    seed(aws)
    cfg = write_config(aws, vault, tmp_path, policy={"console": "rotate"})
    text = rotator("--config", str(cfg), "run", "--once", "--dry-run")
    assert text.returncode == 0, text.stderr
    assert f"would rotate the console password of {USER}" in text.stdout
    doc = rotator("--config", str(cfg), "run", "--once", "--dry-run", "--json")
    assert doc.returncode == 0, doc.stderr
    [item] = json.loads(doc.stdout)["would_rotate_console"]
    assert item["user_name"] == USER
    assert aws.login_profile(USER) == (OLD_PASSWORD, False)
    assert console_in_vault(vault) is None
    settings = settings_for(aws, vault, tmp_path, policy={"console": "rotate"})
    app = make_app(settings, FakeClock())
    try:
        app.open_forced(ForcedRotation(USER, kind=RotationKind.CONSOLE))
    finally:
        app.close()
    again = rotator("--config", str(cfg), "run", "--once", "--dry-run", "--json")
    assert json.loads(again.stdout)["would_rotate_console"] == []


def test_under_console_report_a_pass_changes_no_password(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """`console: report` (the default): `run --once` leaves a 100-day-old password as it
    is, writes nothing to Vault and opens no console rotation."""
    seed(aws)
    cfg = write_config(aws, vault, tmp_path)
    ran = rotator("--config", str(cfg), "run", "--once")
    assert ran.returncode == 0, ran.stderr
    assert aws.login_profile(USER) == (OLD_PASSWORD, False)
    assert console_in_vault(vault) is None
    assert [r for r in rotations(tmp_path / "state.db") if r.kind is RotationKind.CONSOLE] == []
