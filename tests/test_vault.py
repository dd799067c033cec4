"""The Vault adapter against a real OpenBao dev server (no mocks of hvac)."""

from __future__ import annotations

import os
import secrets
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from rotator.errors import (
    BackendUnavailable,
    BadInput,
    CasConflict,
    ConfigError,
    PermissionDenied,
    RotatorError,
    Transient,
)
from rotator.model import NewKey
from rotator.sandbox import LocalVault, free_port
from rotator.vault import (
    AppRoleAuth,
    TokenAuth,
    TokenFileAuth,
    VaultAuth,
    VaultStore,
    build_auth,
)
from tests.conftest import VaultTarget
from tests.faultproxy import Action, FaultProxy, Respond, vault_error, vault_path

MakeProxy = Callable[[str], FaultProxy]

TEMPLATE = "aws/{account_id}/{user_name}"
META = {
    "access_key_id": "AKIAEXAMPLE",
    "rotation_id": "rot-1",
    "rotated_at": "2026-11-28T09:00:00Z",
}


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def new_key() -> NewKey:
    return NewKey("AKIA" + secrets.token_hex(8).upper(), "SECRET-" + secrets.token_hex(16))


def make_store(
    vault: VaultTarget, auth: VaultAuth | None = None, clock: FakeClock | None = None
) -> VaultStore:
    return VaultStore(
        vault.addr, vault.mount, TEMPLATE, auth or TokenAuth(vault.token), timeout=5, clock=clock
    )


def make_token(vault: VaultTarget, policies: list[str], ttl: str = "1h") -> str:
    resp = vault.server.request("POST", "/v1/auth/token/create", {"policies": policies, "ttl": ttl})
    token: str = resp["auth"]["client_token"]
    return token


def revoke(vault: VaultTarget, token: str) -> None:
    vault.server.request("POST", "/v1/auth/token/revoke", {"token": token})


def put_policy(vault: VaultTarget, hcl: str) -> str:
    name = "p-" + uuid.uuid4().hex[:8]
    vault.server.request("PUT", f"/v1/sys/policies/acl/{name}", {"policy": hcl})
    return name


def full_policy(mount: str) -> str:
    return (
        f'path "{mount}/data/*" {{ capabilities = ["create", "read", "update"] }}\n'
        f'path "{mount}/metadata/*" {{ capabilities = ["create", "read", "update"] }}\n'
    )


def write_atomically(path: Path, text: str) -> None:
    """Replace a file the way Vault Agent's file sink does: temp file, then rename."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)  # a secret file others cannot read
    os.replace(tmp, path)


def assert_hidden(exc: BaseException, *values: str) -> None:
    """None of `values` shows in the exception's text, repr, or its whole formatted chain."""
    rendered = "".join(traceback.format_exception(exc))
    for value in values:
        assert value not in str(exc)
        assert value not in repr(exc)
        assert value not in rendered


@pytest.fixture
def store(vault: VaultTarget) -> Iterator[VaultStore]:
    s = make_store(vault)
    yield s
    s.close()


# ------------------------------------------------------------------ read / write


def test_write_then_read_returns_key_version_and_custom_metadata(
    store: VaultStore, vault: VaultTarget
) -> None:
    """A written key reads back with its pair, version 1 and the caller's custom metadata."""
    path = store.path_for("123456789012", "alice")
    key = new_key()
    assert store.write(path, key, META, cas=0) == 1
    got = store.read(path)
    assert got is not None
    assert (got.access_key_id, got.secret_access_key, got.version) == (
        key.access_key_id,
        key.secret_access_key,
        1,
    )
    assert dict(got.metadata) == META
    assert got.as_new_key() == key
    raw = vault.server.request("GET", f"/v1/{vault.mount}/data/aws/123456789012/alice")
    assert raw["data"]["data"] == {
        "aws_access_key_id": key.access_key_id,
        "aws_secret_access_key": key.secret_access_key,
    }


def test_path_for_fills_template_and_odd_user_names_round_trip(store: VaultStore) -> None:
    """The template is filled with account and user; IAM's `+=,.@_-` survive the URL."""
    assert store.path_for("123456789012", "alice") == "aws/123456789012/alice"
    path = store.path_for("123456789012", "svc+ci=a,b.c@d_e-f")
    key = new_key()
    store.write(path, key, META, cas=0)
    got = store.read(path)
    assert got is not None
    assert got.access_key_id == key.access_key_id


def test_second_write_with_cas_zero_raises_cas_conflict(store: VaultStore) -> None:
    """cas=0 means "must not exist": the first write succeeds, the second is refused."""
    path = store.path_for("1", "bob")
    first, second = new_key(), new_key()
    assert store.write(path, first, META, cas=0) == 1
    with pytest.raises(CasConflict) as info:
        store.write(path, second, META, cas=0)
    assert path in str(info.value)
    assert_hidden(info.value, first.secret_access_key, second.secret_access_key)
    got = store.read(path)
    assert got is not None
    assert got.access_key_id == first.access_key_id


def test_write_with_current_version_keeps_history_and_stale_version_conflicts(
    store: VaultStore, vault: VaultTarget
) -> None:
    """cas=current writes version 2, version 1 stays readable; a stale cas is refused."""
    path = store.path_for("1", "carol")
    old, new, late = new_key(), new_key(), new_key()
    store.write(path, old, META, cas=0)
    meta2 = {**META, "access_key_id": new.access_key_id, "rotation_id": "rot-2"}
    assert store.write(path, new, meta2, cas=1) == 2
    got = store.read(path)
    assert got is not None
    assert (got.access_key_id, got.version, dict(got.metadata)) == (new.access_key_id, 2, meta2)
    v1 = vault.server.request("GET", f"/v1/{vault.mount}/data/{path}?version=1")
    assert v1["data"]["data"]["aws_access_key_id"] == old.access_key_id
    assert v1["data"]["data"]["aws_secret_access_key"] == old.secret_access_key
    with pytest.raises(CasConflict):
        store.write(path, late, META, cas=1)


def test_read_of_missing_path_returns_none(store: VaultStore) -> None:
    """Nothing written at a path reads as None."""
    assert store.read(store.path_for("1", "nobody")) is None


def test_read_after_latest_version_deleted_or_destroyed_returns_none(
    store: VaultStore, vault: VaultTarget
) -> None:
    """A soft-deleted or destroyed latest version reads as None, not as the older one."""
    deleted, destroyed = store.path_for("1", "dora"), store.path_for("1", "erin")
    for path in (deleted, destroyed):
        store.write(path, new_key(), META, cas=0)
        store.write(path, new_key(), META, cas=1)
    vault.server.request("DELETE", f"/v1/{vault.mount}/data/{deleted}")
    vault.server.request("PUT", f"/v1/{vault.mount}/destroy/{destroyed}", {"versions": [2]})
    assert store.read(deleted) is None
    assert store.read(destroyed) is None


def test_read_of_secret_without_key_fields_raises_bad_input_naming_path(
    store: VaultStore, vault: VaultTarget
) -> None:
    """A secret that lacks the two fields is BadInput naming the path, not the values."""
    path = store.path_for("1", "frank")
    value = "VALUE-" + secrets.token_hex(8)
    vault.server.request(
        "POST", f"/v1/{vault.mount}/data/{path}", {"data": {"aws_access_key_id": value}}
    )
    with pytest.raises(BadInput) as info:
        store.read(path)
    assert f"{vault.mount}/data/{path}" in str(info.value)
    assert_hidden(info.value, value)


def test_read_on_a_mount_that_does_not_exist_raises_instead_of_none(vault: VaultTarget) -> None:
    """A missing mount is a configuration error naming vault.mount, never mistaken for
    "no secret here"."""
    store = VaultStore(vault.addr, "no-such-mount", TEMPLATE, TokenAuth(vault.token), timeout=5)
    with pytest.raises(ConfigError) as info:
        store.read("aws/1/alice")
    assert "no-such-mount/data/aws/1/alice" in str(info.value)
    assert str(info.value).startswith("vault.mount:")
    assert_hidden(info.value, vault.token)


def test_metadata_refused_after_data_write_still_returns_version_and_logs(
    vault: VaultTarget,
) -> None:
    """When custom metadata cannot be set, the stored key is not disowned: version
    returned, data readable, and a warning event names the path."""
    policy = put_policy(
        vault, f'path "{vault.mount}/data/*" {{ capabilities = ["create", "read", "update"] }}'
    )
    store = make_store(vault, TokenAuth(make_token(vault, [policy])))
    path = store.path_for("1", "gina")
    key = new_key()
    with capture_logs() as logs:
        assert store.write(path, key, META, cas=0) == 1
    got = store.read(path)
    assert got is not None
    assert got.access_key_id == key.access_key_id
    assert dict(got.metadata) == {}
    events = [e for e in logs if e["event"] == "vault.custom_metadata_failed"]
    assert len(events) == 1
    assert events[0]["path"] == path
    assert events[0]["version"] == 1
    assert key.secret_access_key not in repr(logs)


# ------------------------------------------------------------------------- auth


def test_token_file_auth_picks_up_a_rewritten_file(vault: VaultTarget, tmp_path: Path) -> None:
    """After Vault Agent rewrites the token file and the old token is revoked, operations
    keep working with the new token."""
    policy = put_policy(vault, full_policy(vault.mount))
    first, second = make_token(vault, [policy]), make_token(vault, [policy])
    token_file = tmp_path / "token"
    token_file.write_text(first + "\n")
    token_file.chmod(0o600)  # a secret file others cannot read
    store = make_store(vault, TokenFileAuth(token_file))
    path = store.path_for("1", "hank")
    store.write(path, new_key(), META, cas=0)

    write_atomically(token_file, f"  {second}\n")
    revoke(vault, first)
    key = new_key()
    with capture_logs() as logs:
        assert store.write(path, key, META, cas=1) == 2
    events = [e["event"] for e in logs]
    # Picked up from the file's new stamp, before Vault had to refuse anything.
    assert "vault.token_file_reloaded" in events
    assert "vault.token_replaced" not in events
    got = store.read(path)
    assert got is not None
    assert got.access_key_id == key.access_key_id
    assert first not in repr(store)
    assert second not in repr(store)


def test_token_file_rewritten_in_place_is_reread_when_vault_refuses_the_old_token(
    vault: VaultTarget, tmp_path: Path
) -> None:
    """Even if the file's stamp looks unchanged, a refused token makes the store re-read
    the file once and retry the operation."""
    policy = put_policy(vault, full_policy(vault.mount))
    first, second = make_token(vault, [policy]), make_token(vault, [policy])
    token_file = tmp_path / "token"
    token_file.write_text(first)
    token_file.chmod(0o600)  # a secret file others cannot read
    stamp = token_file.stat()
    store = make_store(vault, TokenFileAuth(token_file))
    path = store.path_for("1", "ivan")
    store.write(path, new_key(), META, cas=0)
    token_file.write_text(second)  # same length, same inode
    token_file.chmod(0o600)  # a secret file others cannot read
    os.utime(token_file, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    revoke(vault, first)
    with capture_logs() as logs:
        got = store.read(path)
    assert got is not None
    assert got.version == 1
    replaced = [e["reason"] for e in logs if e["event"] == "vault.token_replaced"]
    assert replaced == ["token refused"]


def test_token_file_missing_or_empty_is_a_config_error(vault: VaultTarget, tmp_path: Path) -> None:
    """A token file that does not exist, or holds only whitespace, is a ConfigError naming it."""
    missing = tmp_path / "absent"
    with pytest.raises(ConfigError) as info:
        make_store(vault, TokenFileAuth(missing)).read("aws/1/x")
    assert str(missing) in str(info.value)
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    empty.chmod(0o600)  # a secret file others cannot read
    with pytest.raises(ConfigError) as info:
        make_store(vault, TokenFileAuth(empty)).read("aws/1/x")
    assert str(empty) in str(info.value)
    assert "empty" in str(info.value)


def _approle(vault: VaultTarget, tmp_path: Path, ttl: str = "1h") -> AppRoleAuth:
    """Enable AppRole on a fresh mount with a role allowed on the test mount."""
    auth_mount = "approle-" + uuid.uuid4().hex[:8]
    vault.server.request("POST", f"/v1/sys/auth/{auth_mount}", {"type": "approle"})
    policy = put_policy(vault, full_policy(vault.mount))
    role = f"/v1/auth/{auth_mount}/role/rotator"
    vault.server.request("POST", role, {"token_policies": [policy], "token_ttl": ttl})
    role_id = vault.server.request("GET", f"{role}/role-id")["data"]["role_id"]
    secret_id = vault.server.request("POST", f"{role}/secret-id", {})["data"]["secret_id"]
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret_id + "\n")
    secret_file.chmod(0o600)  # a secret file others cannot read
    return AppRoleAuth(role_id, secret_file, mount_point=auth_mount)


def test_approle_auth_writes_reads_and_logs_in_again_after_revocation(
    vault: VaultTarget, tmp_path: Path
) -> None:
    """An AppRole-authenticated store writes and reads, and when its token is revoked
    it logs in again and the operation succeeds."""
    auth = _approle(vault, tmp_path)
    store = make_store(vault, auth)
    path = store.path_for("1", "judy")
    key = new_key()
    with capture_logs() as logs:
        assert store.write(path, key, META, cas=0) == 1
        got = store.read(path)
        assert got is not None
        assert got.access_key_id == key.access_key_id
        first = auth.token(None)
        revoke(vault, first)
        assert store.write(path, new_key(), META, cas=1) == 2
    second = auth.token(None)
    assert second != first
    logins = [e for e in logs if e["event"] == "vault.approle_login"]
    assert len(logins) == 2
    for text in (repr(auth), repr(store), repr(logs)):
        assert first not in text
        assert second not in text
        assert auth.secret_id_file.read_text().strip() not in text


def test_approle_token_past_expiry_is_replaced_before_the_operation(
    vault: VaultTarget, tmp_path: Path
) -> None:
    """When the clock says the token has expired, the store logs in again first."""
    auth = _approle(vault, tmp_path)
    clock = FakeClock()
    store = make_store(vault, auth, clock=clock)
    path = store.path_for("1", "kate")
    store.write(path, new_key(), META, cas=0)
    first = auth.token(None)
    clock.now += timedelta(hours=2)
    with capture_logs() as logs:
        assert store.read(path) is not None
    assert auth.token(None) != first
    assert [e["reason"] for e in logs if e["event"] == "vault.token_replaced"] == ["expired"]


def test_approle_with_wrong_secret_id_is_permission_denied_on_login(
    vault: VaultTarget, tmp_path: Path
) -> None:
    """A refused AppRole login is PermissionDenied on the login path, secret id hidden."""
    auth = _approle(vault, tmp_path)
    wrong = "wrong-" + secrets.token_hex(8)
    auth.secret_id_file.write_text(wrong)
    with pytest.raises(PermissionDenied) as info:
        make_store(vault, auth).read("aws/1/x")
    assert info.value.action == "vault:login"
    assert info.value.resource is not None
    assert info.value.resource.endswith("/login")
    assert_hidden(info.value, wrong)


def test_renewable_token_is_renewed_after_two_thirds_of_its_ttl(vault: VaultTarget) -> None:
    """A renewable 1h token is not renewed at 30 min, and is renewed at 41 min."""
    policy = put_policy(vault, full_policy(vault.mount))
    token = make_token(vault, [policy], ttl="1h")
    clock = FakeClock()
    store = make_store(vault, TokenAuth(token), clock=clock)
    path = store.path_for("1", "liam")

    def last_renewal() -> object:
        data = vault.server.request("POST", "/v1/auth/token/lookup", {"token": token})["data"]
        return data.get("last_renewal_time")

    store.read(path)
    clock.now += timedelta(minutes=30)
    with capture_logs() as logs:
        store.read(path)
    assert not last_renewal()
    assert not [e for e in logs if e["event"] == "vault.token_renewed"]
    clock.now += timedelta(minutes=11)
    with capture_logs() as logs:
        store.read(path)
    assert last_renewal()
    assert [e["event"] for e in logs].count("vault.token_renewed") == 1


def test_build_auth_names_what_each_method_lacks(tmp_path: Path) -> None:
    """Each method needs its own fields; a missing one is a ConfigError naming it."""
    none: dict[str, str | None] = {
        "token": None,
        "token_file": None,
        "role_id": None,
        "secret_id_file": None,
    }
    with pytest.raises(ConfigError, match=r"vault\.auth\.token"):
        build_auth("token", **none)
    with pytest.raises(ConfigError, match=r"vault\.auth\.token_file"):
        build_auth("token_file", **none)
    with pytest.raises(ConfigError) as info:
        build_auth("approle", **none)
    assert len(info.value.problems) == 2
    with pytest.raises(ConfigError, match=r"vault\.auth\.method"):
        build_auth("kerberos", **none)
    assert isinstance(build_auth("token", **{**none, "token": "t"}), TokenAuth)
    assert isinstance(build_auth("token_file", **{**none, "token_file": "/x"}), TokenFileAuth)
    approle = build_auth("approle", **{**none, "role_id": "r", "secret_id_file": str(tmp_path)})
    assert isinstance(approle, AppRoleAuth)


def test_path_template_with_unknown_placeholder_is_a_config_error(vault: VaultTarget) -> None:
    """A template may use only {account_id} and {user_name}."""
    with pytest.raises(ConfigError, match="path_template"):
        VaultStore(vault.addr, vault.mount, "aws/{account}/{user_name}", TokenAuth("t"))


# ------------------------------------------------------------- errors & check


def test_token_without_permission_is_permission_denied_naming_path_and_capability(
    vault: VaultTarget,
) -> None:
    """A token allowed only elsewhere gets PermissionDenied with vault:<capability> and
    <mount>/data/<path>, for read and for write."""
    policy = put_policy(
        vault, f'path "{vault.mount}/data/elsewhere/*" {{ capabilities = ["read"] }}'
    )
    token = make_token(vault, [policy])
    store = make_store(vault, TokenAuth(token))
    path = store.path_for("1", "mia")
    key = new_key()
    with pytest.raises(PermissionDenied) as read_info:
        store.read(path)
    assert read_info.value.action == "vault:read"
    assert read_info.value.resource == f"{vault.mount}/data/{path}"
    with pytest.raises(PermissionDenied) as write_info:
        store.write(path, key, META, cas=0)
    assert write_info.value.action == "vault:create/update"
    assert write_info.value.resource == f"{vault.mount}/data/{path}"
    assert "invalid or expired" not in str(write_info.value)
    for exc in (read_info.value, write_info.value):
        assert f"{vault.mount}/data/{path}" in str(exc)
        assert_hidden(exc, token, key.secret_access_key)


def test_revoked_static_token_is_permission_denied_saying_the_token_is_dead(
    vault: VaultTarget,
) -> None:
    """A static token revoked mid-life cannot be replaced: PermissionDenied says so."""
    policy = put_policy(vault, full_policy(vault.mount))
    token = make_token(vault, [policy])
    store = make_store(vault, TokenAuth(token))
    path = store.path_for("1", "ned")
    store.write(path, new_key(), META, cas=0)
    revoke(vault, token)
    with pytest.raises(PermissionDenied) as info:
        store.read(path)
    assert "invalid or expired" in str(info.value)
    assert_hidden(info.value, token)


def test_unreachable_vault_is_backend_unavailable_quickly() -> None:
    """Nobody listening on the port: BackendUnavailable naming the URL, within the timeout."""
    url = f"http://127.0.0.1:{free_port()}"
    token = "tok-" + secrets.token_hex(8)
    store = VaultStore(url, "secret", TEMPLATE, TokenAuth(token), timeout=1)
    started = time.monotonic()
    calls: list[Callable[[], object]] = [lambda: store.read("aws/1/x"), store.check]
    for call in calls:
        with pytest.raises(BackendUnavailable) as info:
            call()
        assert url in str(info.value)
        assert isinstance(info.value.__cause__, Exception)
        assert_hidden(info.value, token)
    assert time.monotonic() - started < 5


def test_sealed_vault_is_transient() -> None:
    """A sealed server makes read, write and check raise a Transient error naming the URL."""
    server = LocalVault().start()
    try:
        store = VaultStore(server.addr, "secret", TEMPLATE, TokenAuth(server.token), timeout=5)
        store.write("aws/1/x", new_key(), META, cas=0)
        server.request("PUT", "/v1/sys/seal")
        key = new_key()
        for call in (
            lambda: store.read("aws/1/x"),
            lambda: store.write("aws/1/x", key, META, cas=1),
            store.check,
        ):
            with pytest.raises(Transient) as info:
                call()
            assert "sealed" in str(info.value)
            assert server.addr in str(info.value)
            assert_hidden(info.value, server.token, key.secret_access_key)
    finally:
        server.stop()


def test_check_passes_on_a_kv2_mount_and_rejects_a_kv1_mount(vault: VaultTarget) -> None:
    """check() is silent on the fixture's KV v2 mount and a ConfigError on a KV v1 one."""
    store = make_store(vault)
    store.check()
    assert store.kv_version() == 2
    kv1 = "kv1-" + uuid.uuid4().hex[:8]
    vault.server.request(
        "POST", f"/v1/sys/mounts/{kv1}", {"type": "kv", "options": {"version": "1"}}
    )
    old = VaultStore(vault.addr, kv1, TEMPLATE, TokenAuth(vault.token), timeout=5)
    with pytest.raises(ConfigError, match="KV version 1"):
        old.check()
    with pytest.raises(ConfigError, match="KV version 2"):
        old.write("aws/1/x", new_key(), META, cas=0)


def test_check_with_a_token_that_may_not_see_mounts_passes(vault: VaultTarget) -> None:
    """A token whose policy covers only data paths cannot see the mount type; check()
    treats that as "can't tell", not as a failure."""
    policy = put_policy(vault, 'path "elsewhere/*" { capabilities = ["read"] }')
    store = make_store(vault, TokenAuth(make_token(vault, [policy])))
    store.check()
    assert store.kv_version() is None


def test_check_with_a_revoked_token_fails(vault: VaultTarget) -> None:
    """check() raises PermissionDenied when the token is no longer valid."""
    token = make_token(vault, ["default"])
    revoke(vault, token)
    with pytest.raises(PermissionDenied) as info:
        make_store(vault, TokenAuth(token)).check()
    assert_hidden(info.value, token)


def test_no_secret_or_token_in_reprs(vault: VaultTarget, tmp_path: Path) -> None:
    """repr() of the store, each auth and a returned secret shows no token or secret."""
    store = make_store(vault)
    key = new_key()
    path = store.path_for("1", "olga")
    store.write(path, key, META, cas=0)
    got = store.read(path)
    assert got is not None
    role_id = "role-" + secrets.token_hex(8)
    token_file = tmp_path / "token"
    token_file.write_text(vault.token)
    token_file.chmod(0o600)  # a secret file others cannot read
    file_auth = TokenFileAuth(token_file)
    file_auth.token(None)
    for obj in (
        store,
        got,
        TokenAuth(vault.token),
        file_auth,
        AppRoleAuth(role_id, tmp_path / "sid"),
    ):
        assert vault.token not in repr(obj)
        assert vault.token not in str(obj)
        assert key.secret_access_key not in repr(obj)
        assert role_id not in repr(obj)


def test_every_error_is_a_rotator_error_never_an_hvac_type(vault: VaultTarget) -> None:
    """Errors crossing the seam are the project's own; hvac's stay as the cause only."""
    store = VaultStore(vault.addr, "no-such-mount", TEMPLATE, TokenAuth(vault.token), timeout=5)
    with pytest.raises(RotatorError) as info:
        store.write("aws/1/x", new_key(), META, cas=0)
    assert type(info.value).__module__ == "rotator.errors"
    assert info.value.__cause__ is not None
    assert type(info.value.__cause__).__module__.startswith("hvac")


# --- the retry vocabulary, against OpenBao through the fault-injecting proxy ---------


def proxied_store(
    vault: VaultTarget, fault_proxy: MakeProxy, method: str, reply: Action
) -> tuple[VaultStore, str]:
    """A VaultStore whose KV data calls with `method` get `reply` from the proxy in front
    of OpenBao (every other call reaches it), and the path it reads and writes."""
    proxy = fault_proxy(vault.addr)
    proxy.add(vault_path(method, rf"/v1/{vault.mount}/data/"), reply)
    store = VaultStore(proxy.url, vault.mount, TEMPLATE, TokenAuth(vault.token), timeout=5)
    return store, store.path_for("123456789012", "alice")


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["read", "write"])
@pytest.mark.parametrize("status", [400, 405, 409, 413, 418, 422])
def test_an_unknown_4xx_from_vault_is_a_refusal_never_retried(
    vault: VaultTarget, fault_proxy: MakeProxy, status: int, method: str
) -> None:
    """A 4xx vault.py does not know (not a CAS mismatch, 403 or 404) is a bug or a
    refusal: a plain RotatorError, not Transient, marked answered and not applied, saying
    "refused"; for a read and for a write alike."""
    store, path = proxied_store(vault, fault_proxy, method, vault_error(status, ["unsupported"]))
    key = new_key()
    call: Callable[[], object] = (
        (lambda: store.read(path))
        if method == "GET"
        else (lambda: store.write(path, key, META, cas=0))
    )
    with pytest.raises(RotatorError) as info:
        call()
    assert type(info.value) is RotatorError
    assert (info.value.answered, info.value.not_applied) == (True, True)
    assert "refused" in str(info.value)
    store.close()


@pytest.mark.parametrize(
    "reply",
    [
        vault_error(412, ["required index state not present"]),
        vault_error(429, ["request path kv/data/x: rate limit quota exceeded"]),
        vault_error(500, ["internal error"]),
        vault_error(502, ["bad gateway"]),
        Respond(504, b"Gateway Timeout", {"Content-Type": "text/plain"}),
        Respond(408, b"Request Timeout", {"Content-Type": "text/plain"}),
    ],
    ids=["412", "429", "500", "502", "504-load-balancer", "408-proxy"],
)
def test_overload_timeouts_and_5xx_from_vault_are_transient(
    vault: VaultTarget, fault_proxy: MakeProxy, reply: Respond
) -> None:
    """A 5xx (whatever hvac calls it: a 504 is its `UnexpectedError`), a 412 from a
    standby that has not caught up, a rate limit (429) and a 408 are Transient: worth a
    retry. A 5xx may have been applied; a 4xx was not."""
    store, path = proxied_store(vault, fault_proxy, "GET", reply)
    with pytest.raises(Transient) as info:
        store.read(path)
    assert info.value.answered
    assert info.value.not_applied is (reply.status < 500)
    assert vault.token not in str(info.value)


def test_a_write_vault_forbids_is_a_refusal_marked_not_applied(
    vault: VaultTarget, fault_proxy: MakeProxy
) -> None:
    """A 403 on the write (the token lives; its policy forbids it) is PermissionDenied,
    not Transient, marked as Vault's answer and not applied: the key is not stored and
    no write of it can land later."""
    store, path = proxied_store(vault, fault_proxy, "POST", vault_error(403, ["permission denied"]))
    with pytest.raises(PermissionDenied) as info:
        store.write(path, new_key(), META, cas=0)
    assert (info.value.answered, info.value.not_applied) == (True, True)
    assert store.current_version(path) == 0


@pytest.mark.parametrize(
    ("status", "usable"),
    [(473, True), (472, False)],
    ids=["performance-standby", "dr-secondary"],
)
def test_a_performance_standby_is_usable_and_a_dr_secondary_is_not(
    vault: VaultTarget, fault_proxy: MakeProxy, status: int, usable: bool
) -> None:
    """`check` accepts a performance standby (sys/health 473: it serves reads and
    forwards writes) and refuses a disaster-recovery secondary (472) as unavailable,
    saying to point vault.url at the primary, instead of retrying it for ever."""
    proxy = fault_proxy(vault.addr)
    proxy.add(vault_path("GET", r"/v1/sys/health"), vault_error(status))
    store = VaultStore(proxy.url, vault.mount, TEMPLATE, TokenAuth(vault.token), timeout=5)
    try:
        if usable:
            store.check()
        else:
            with pytest.raises(BackendUnavailable, match="primary"):
                store.check()
    finally:
        store.close()
