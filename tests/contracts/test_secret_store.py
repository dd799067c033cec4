"""The SecretStore contract: KV version 2 as the core relies on it, held on the in-memory
fake and on `VaultStore` against the OpenBao dev server."""

from __future__ import annotations

import secrets
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pytest

from rotator.errors import BadInput, CasConflict
from rotator.model import NewKey
from rotator.paths import ACCESS_KEY_FIELD
from rotator.ports import SecretStore
from rotator.testing import FakeSecrets
from rotator.vault import TokenAuth, VaultStore
from tests.conftest import VaultTarget

TEMPLATE = "aws/{account_id}/{user_name}"
ACCOUNT = "123456789012"
META = {"access_key_id": "AKIAEXAMPLE", "rotation_id": "rot-1", "rotated_at": "2026-11-28T09:00Z"}


@dataclass(frozen=True)
class Vault:
    """A secret store, and what another writer can do to its backend behind its back."""

    store: SecretStore
    # Where errors say the secret lives: "<mount>/data/<path>".
    mount: str
    # Write a version holding this data, without check-and-set (a person, another tool).
    put_data: Callable[[str, Mapping[str, str]], object]
    # Soft-delete the latest version (`vault kv delete`).
    delete_latest: Callable[[str], None]


def _fake(request: pytest.FixtureRequest) -> Vault:
    fake = FakeSecrets(TEMPLATE, mount="kv")
    return Vault(fake, "kv", fake.put_data, fake.delete_latest)


def _openbao(request: pytest.FixtureRequest) -> Vault:
    vault: VaultTarget = request.getfixturevalue("vault")
    store = VaultStore(vault.addr, vault.mount, TEMPLATE, TokenAuth(vault.token), timeout=5)
    request.addfinalizer(store.close)

    def put_data(path: str, data: Mapping[str, str]) -> None:
        vault.server.request("POST", f"/v1/{vault.mount}/data/{path}", {"data": dict(data)})

    def delete_latest(path: str) -> None:
        vault.server.request("DELETE", f"/v1/{vault.mount}/data/{path}")

    return Vault(store, vault.mount, put_data, delete_latest)


STORES: dict[str, Callable[[pytest.FixtureRequest], Vault]] = {"fake": _fake, "real": _openbao}


@pytest.fixture(params=list(STORES))
def vault(request: pytest.FixtureRequest) -> Vault:
    return STORES[request.param](request)


@pytest.fixture
def store(vault: Vault) -> SecretStore:
    return vault.store


def new_key() -> NewKey:
    return NewKey("AKIA" + secrets.token_hex(8).upper(), "SECRET-" + secrets.token_hex(16))


def rendered(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


def test_a_key_written_with_cas_0_reads_back_as_version_1_with_its_metadata(
    store: SecretStore,
) -> None:
    """A first write (cas 0: must not exist yet) returns version 1; a read returns the
    key pair, that version and the custom metadata."""
    path = store.path_for(ACCOUNT, "alice")
    key = new_key()
    assert store.write(path, key, META, cas=0) == 1
    got = store.read(path)
    assert got is not None
    assert got.as_new_key() == key
    assert got.version == 1
    assert dict(got.metadata) == META
    assert store.current_version(path) == 1


def test_a_second_write_with_cas_0_is_a_refused_cas_conflict_and_keeps_the_first(
    store: SecretStore,
) -> None:
    """cas 0 on a path that holds a secret raises CasConflict, marked as a refusal (not
    applied), naming the path and neither secret; the first key stays."""
    path = store.path_for(ACCOUNT, "bob")
    first, second = new_key(), new_key()
    store.write(path, first, META, cas=0)
    with pytest.raises(CasConflict) as info:
        store.write(path, second, META, cas=0)
    assert info.value.answered
    assert info.value.not_applied
    assert path in str(info.value)
    assert first.secret_access_key not in rendered(info.value)
    assert second.secret_access_key not in rendered(info.value)
    got = store.read(path)
    assert got is not None
    assert got.access_key_id == first.access_key_id


def test_a_write_at_the_current_version_adds_one_and_any_other_cas_conflicts(
    store: SecretStore,
) -> None:
    """A write with cas equal to the current version makes the next version; a stale cas,
    a cas ahead of the current version, and a cas above 0 on an empty path all raise
    CasConflict and change nothing."""
    path = store.path_for(ACCOUNT, "carol")
    with pytest.raises(CasConflict):
        store.write(path, new_key(), META, cas=1)
    assert store.current_version(path) == 0
    store.write(path, new_key(), META, cas=0)
    latest = new_key()
    assert store.write(path, latest, META, cas=1) == 2
    for cas in (1, 3):
        with pytest.raises(CasConflict):
            store.write(path, new_key(), META, cas=cas)
    got = store.read(path)
    assert got is not None
    assert (got.access_key_id, got.version) == (latest.access_key_id, 2)


def test_custom_metadata_is_replaced_whole_by_each_write_and_by_set_metadata(
    store: SecretStore,
) -> None:
    """Custom metadata belongs to the path: each write replaces it with the write's own
    (an empty mapping clears it), and `set_metadata` replaces it without a new version."""
    path = store.path_for(ACCOUNT, "dora")
    store.write(path, new_key(), META, cas=0)
    store.write(path, new_key(), {"rotation_id": "rot-2"}, cas=1)
    got = store.read(path)
    assert got is not None
    assert dict(got.metadata) == {"rotation_id": "rot-2"}

    store.set_metadata(path, {"access_key_id": got.access_key_id})
    repaired = store.read(path)
    assert repaired is not None
    assert (dict(repaired.metadata), repaired.version) == ({"access_key_id": got.access_key_id}, 2)

    store.write(path, new_key(), {}, cas=2)
    cleared = store.read(path)
    assert cleared is not None
    assert dict(cleared.metadata) == {}


def test_metadata_set_where_no_secret_is_makes_no_version(store: SecretStore) -> None:
    """Vault accepts custom metadata on a path that holds no secret (it creates the
    metadata alone): the path still reads as None at version 0, and a cas 0 write then
    succeeds and replaces that metadata."""
    path = store.path_for(ACCOUNT, "erin")
    store.set_metadata(path, {"rotation_id": "rot-early"})
    assert store.read(path) is None
    assert store.current_version(path) == 0
    assert store.write(path, new_key(), META, cas=0) == 1
    got = store.read(path)
    assert got is not None
    assert dict(got.metadata) == META


def test_a_missing_path_reads_as_none_at_version_0(store: SecretStore) -> None:
    """Nothing written at a path: `read` is None and `current_version` is 0."""
    path = store.path_for(ACCOUNT, "nobody")
    assert store.read(path) is None
    assert store.current_version(path) == 0


def test_a_deleted_latest_version_reads_as_none_but_still_counts_for_cas(
    vault: Vault, store: SecretStore
) -> None:
    """A soft-deleted latest version reads as None (not as the older version), its number
    stays the current version, so cas 0 is refused and cas=current writes the next one."""
    path = store.path_for(ACCOUNT, "frank")
    store.write(path, new_key(), META, cas=0)
    store.write(path, new_key(), META, cas=1)
    vault.delete_latest(path)
    assert store.read(path) is None
    assert store.current_version(path) == 2
    with pytest.raises(CasConflict):
        store.write(path, new_key(), META, cas=0)
    key = new_key()
    assert store.write(path, key, META, cas=2) == 3
    got = store.read(path)
    assert got is not None
    assert got.access_key_id == key.access_key_id


def test_another_writers_version_is_what_a_read_returns(vault: Vault, store: SecretStore) -> None:
    """A version written behind the store's back is the latest: read returns it, with the
    path's custom metadata as it was, and it counts for check-and-set."""
    path = store.path_for(ACCOUNT, "gina")
    store.write(path, new_key(), META, cas=0)
    theirs = new_key()
    vault.put_data(
        path,
        {
            "aws_access_key_id": theirs.access_key_id,
            "aws_secret_access_key": theirs.secret_access_key,
        },
    )
    got = store.read(path)
    assert got is not None
    assert (got.as_new_key(), got.version, dict(got.metadata)) == (theirs, 2, META)
    with pytest.raises(CasConflict):
        store.write(path, new_key(), META, cas=1)


def test_a_path_that_holds_no_key_pair_raises_bad_input_naming_it_not_its_values(
    vault: Vault, store: SecretStore
) -> None:
    """A secret that lacks one of the two fields raises BadInput naming the path (and as a
    refusal), never showing the values it does hold."""
    path = store.path_for(ACCOUNT, "hank")
    value = "VALUE-" + secrets.token_hex(8)
    vault.put_data(path, {ACCESS_KEY_FIELD: value})
    with pytest.raises(BadInput) as info:
        store.read(path)
    assert f"{vault.mount}/data/{path}" in str(info.value)
    assert value not in rendered(info.value)
    assert info.value.not_applied


def test_path_for_fills_the_template_and_refuses_a_name_vault_cannot_hold(
    store: SecretStore,
) -> None:
    """`path_for` fills account and user into the template, keeps IAM's `+=,.@_-`, and
    raises BadInput for `.` and `..`, which Vault cannot take as path segments."""
    assert store.path_for(ACCOUNT, "alice") == f"aws/{ACCOUNT}/alice"
    odd = store.path_for(ACCOUNT, "svc+ci=a,b.c@d_e-f")
    key = new_key()
    store.write(odd, key, META, cas=0)
    got = store.read(odd)
    assert got is not None
    assert got.access_key_id == key.access_key_id
    for name in (".", ".."):
        with pytest.raises(BadInput, match="path segment"):
            store.path_for(ACCOUNT, name)


def test_no_secret_shows_in_the_repr_of_the_store_or_of_what_it_returns(
    store: SecretStore,
) -> None:
    """The secret access key is in neither repr nor str of the store (holding it) or of
    the secret it returns."""
    path = store.path_for(ACCOUNT, "olga")
    key = new_key()
    store.write(path, key, META, cas=0)
    got = store.read(path)
    assert got is not None
    for obj in (store, got, got.as_new_key()):
        assert key.secret_access_key not in repr(obj)
        assert key.secret_access_key not in str(obj)


def test_check_passes_on_a_usable_store(store: SecretStore) -> None:
    """`check` returns quietly when the store can be used."""
    store.check()
