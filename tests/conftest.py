"""Fixtures shared by the suite: a real moto server and a real OpenBao dev server, each
on a free loopback port, started once per session and reset for every test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from rotator.sandbox import FAKE_AWS_ENV, LocalAws, LocalVault
from tests.faultproxy import FaultProxy

# No test may ever reach a real AWS account: fake credentials for the whole session,
# and no profile or config file that could point elsewhere.
for _var in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "VAULT_ADDR"):
    os.environ.pop(_var, None)
os.environ.update(FAKE_AWS_ENV)
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull


@pytest.fixture(scope="session")
def local_aws() -> Iterator[LocalAws]:
    """One moto server for the session."""
    server = LocalAws().start()
    yield server
    server.stop()


@pytest.fixture
def aws(local_aws: LocalAws, monkeypatch: pytest.MonkeyPatch) -> LocalAws:
    """The moto server, emptied, with AWS_ENDPOINT_URL pointing at it."""
    local_aws.reset()
    monkeypatch.setenv("AWS_ENDPOINT_URL", local_aws.endpoint_url)
    return local_aws


@pytest.fixture(scope="session")
def local_vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalVault]:
    """One OpenBao dev server for the session."""
    log = tmp_path_factory.mktemp("bao") / "bao.log"
    server = LocalVault(log_path=log).start()
    yield server
    server.stop()


@dataclass(frozen=True)
class VaultTarget:
    addr: str
    token: str
    mount: str
    server: LocalVault


@pytest.fixture
def vault(local_vault: LocalVault, monkeypatch: pytest.MonkeyPatch) -> VaultTarget:
    """A fresh KV v2 mount on the OpenBao dev server, with VAULT_ADDR/VAULT_TOKEN set."""
    mount = "kv-" + uuid.uuid4().hex[:10]
    local_vault.enable_kv2(mount)
    monkeypatch.setenv("VAULT_ADDR", local_vault.addr)
    monkeypatch.setenv("VAULT_TOKEN", local_vault.token)
    return VaultTarget(local_vault.addr, local_vault.token, mount, local_vault)


@pytest.fixture
def own_vault() -> Iterator[Callable[[], VaultTarget]]:
    """Starts dedicated OpenBao dev servers (a test may stop them); stops them all."""
    started: list[LocalVault] = []

    def start_one() -> VaultTarget:
        server = LocalVault().start()
        started.append(server)
        server.enable_kv2("kv")
        return VaultTarget(server.addr, server.token, "kv", server)

    yield start_one
    for server in started:
        server.stop()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[str], FaultProxy]]:
    """Starts fault-injecting proxies in front of test servers; closes them all."""
    with ExitStack() as stack:
        yield lambda upstream_url: stack.enter_context(FaultProxy(upstream_url))
