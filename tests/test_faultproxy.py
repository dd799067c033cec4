"""The fault-injecting proxy against the real servers: it forwards unchanged, and each
fault does to boto3 and hvac what the same fault in AWS or Vault would do."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import boto3
import botocore.config
import botocore.exceptions
import hvac
import hvac.exceptions
import pytest
import requests
from mypy_boto3_iam import IAMClient

from rotator.sandbox import LocalAws
from tests.conftest import VaultTarget
from tests.faultproxy import (
    Call,
    DropAfterApply,
    FaultProxy,
    Outcome,
    Stall,
    aws_action,
    aws_error,
    vault_error,
    vault_path,
)
from tests.rig import wait_until

MakeProxy = Callable[[str], FaultProxy]


def iam(url: str, attempts: int = 1) -> IAMClient:
    """An IAM client that makes `attempts` tries per call (1: botocore never retries)."""
    return boto3.client(
        "iam",
        endpoint_url=url,
        region_name="us-east-1",
        config=botocore.config.Config(retries={"total_max_attempts": attempts}),
    )


def test_boto3_iam_works_unchanged_through_the_proxy(aws: LocalAws, fault_proxy: MakeProxy) -> None:
    """With no rules, IAM calls through the proxy reach moto and answer as they would."""
    proxy = fault_proxy(aws.endpoint_url)
    client = iam(proxy.url)
    client.create_user(UserName="alice")
    client.create_user(UserName="bob")
    names = [u["UserName"] for u in client.list_users()["Users"]]
    assert sorted(names) == ["alice", "bob"]
    assert set(aws.backend.users) == {"alice", "bob"}
    assert [(r.action, o) for r, o in proxy.log] == [
        ("CreateUser", Outcome.FORWARDED),
        ("CreateUser", Outcome.FORWARDED),
        ("ListUsers", Outcome.FORWARDED),
    ]


def test_dropped_create_access_key_response_still_mints_the_key(
    aws: LocalAws, fault_proxy: MakeProxy
) -> None:
    """DropAfterApply: the client sees the connection close, yet IAM holds the new key."""
    proxy = fault_proxy(aws.endpoint_url)
    client = iam(proxy.url)
    client.create_user(UserName="alice")
    proxy.add(aws_action("CreateAccessKey"), DropAfterApply())
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        client.create_access_key(UserName="alice")
    listed = iam(aws.endpoint_url).list_access_keys(UserName="alice")["AccessKeyMetadata"]
    assert len(listed) == 1
    assert proxy.outcomes(aws_action("CreateAccessKey")) == [Outcome.DROPPED]


def test_default_boto3_retries_turn_a_dropped_response_into_a_second_key(
    aws: LocalAws, fault_proxy: MakeProxy
) -> None:
    """botocore retries CreateAccessKey after a lost response and reports success, while
    IAM now holds two keys: why the rotator's CreateAccessKey client is send-once."""
    proxy = fault_proxy(aws.endpoint_url)
    client = iam(proxy.url, attempts=3)
    client.create_user(UserName="alice")
    proxy.add(aws_action("CreateAccessKey"), DropAfterApply(), times=1)
    returned = client.create_access_key(UserName="alice")["AccessKey"]["AccessKeyId"]
    assert len(aws.keys("alice")) == 2
    assert returned in aws.keys("alice")
    assert proxy.outcomes(aws_action("CreateAccessKey")) == [Outcome.DROPPED, Outcome.FORWARDED]


def test_an_injected_aws_error_answers_only_the_next_call(
    aws: LocalAws, fault_proxy: MakeProxy
) -> None:
    """aws_error with times=1: the first call gets that error code from botocore, the
    second reaches moto."""
    proxy = fault_proxy(aws.endpoint_url)
    client = iam(proxy.url)
    rule = proxy.add(aws_action("CreateUser"), aws_error("ServiceUnavailable", 503), times=1)
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        client.create_user(UserName="alice")
    assert refused.value.response["Error"]["Code"] == "ServiceUnavailable"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert "alice" not in aws.backend.users
    client.create_user(UserName="alice")
    assert "alice" in aws.backend.users
    assert rule.hits == 1
    assert proxy.outcomes(aws_action("CreateUser")) == [Outcome.RESPONDED, Outcome.FORWARDED]


def test_rules_apply_in_order_until_used_up_and_clear_removes_them(
    aws: LocalAws, fault_proxy: MakeProxy
) -> None:
    """The first matching rule that is not used up decides; after clear() calls pass."""
    proxy = fault_proxy(aws.endpoint_url)
    client = iam(proxy.url)
    proxy.add(aws_action("ListUsers"), aws_error("Throttling", 400), times=1)
    proxy.add(aws_action("ListUsers"), aws_error("AccessDenied", 403))
    codes = []
    for _ in range(3):
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            client.list_users()
        codes.append(refused.value.response["Error"]["Code"])
    assert codes == ["Throttling", "AccessDenied", "AccessDenied"]
    proxy.clear()
    assert client.list_users()["Users"] == []


def test_call_runs_before_the_request_is_forwarded(aws: LocalAws, fault_proxy: MakeProxy) -> None:
    """Call(fn) runs fn when the call arrives, before the upstream has applied it."""
    proxy = fault_proxy(aws.endpoint_url)
    client = iam(proxy.url)
    client.create_user(UserName="alice")
    seen: list[int] = []
    proxy.add(aws_action("CreateAccessKey"), Call(lambda _: seen.append(len(aws.keys("alice")))))
    client.create_access_key(UserName="alice")
    assert seen == [0]
    assert len(aws.keys("alice")) == 1


def test_an_error_in_a_call_surfaces_when_the_proxy_closes(aws: LocalAws) -> None:
    """If Call's fn raises, the call is not forwarded, the client gets no answer, and
    closing the proxy raises that error, so a broken test hook cannot pass unnoticed."""

    def broken(_: object) -> None:
        raise LookupError("hook failed")

    proxy = FaultProxy(aws.endpoint_url)
    proxy.add(aws_action("CreateUser"), Call(broken))
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        iam(proxy.url).create_user(UserName="alice")
    assert "alice" not in aws.backend.users
    assert proxy.outcomes(aws_action("CreateUser")) == [Outcome.ABANDONED]
    with pytest.raises(LookupError, match="hook failed"):
        proxy.close()


def test_release_ends_a_stall_at_once(aws: LocalAws, fault_proxy: MakeProxy) -> None:
    """release() from another thread ends a Stall(2) early, and the call then completes."""
    proxy = fault_proxy(aws.endpoint_url)
    client = iam(proxy.url)
    proxy.add(aws_action("ListUsers"), Stall(2))
    timer = threading.Timer(0.2, proxy.release)
    started = time.monotonic()
    timer.start()
    assert client.list_users()["Users"] == []
    elapsed = time.monotonic() - started
    timer.join()
    assert 0.2 <= elapsed < 1.0
    assert proxy.outcomes(aws_action("ListUsers")) == [Outcome.FORWARDED]


def test_closing_the_proxy_ends_a_stall_without_forwarding(aws: LocalAws) -> None:
    """Closing the proxy ends a stall at once: the client loses its answer and the held
    call never reaches the upstream."""
    proxy = FaultProxy(aws.endpoint_url)
    client = iam(proxy.url)
    proxy.add(aws_action("CreateUser"), Stall(30))
    timer = threading.Timer(0.2, proxy.close)
    started = time.monotonic()
    timer.start()
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        client.create_user(UserName="alice")
    timer.join()
    assert time.monotonic() - started < 10.0  # far below the 30 s stall
    assert "alice" not in aws.backend.users
    assert proxy.outcomes(aws_action("CreateUser")) == [Outcome.ABANDONED]


def test_dropped_vault_write_raises_in_hvac_yet_is_written(
    vault: VaultTarget, fault_proxy: MakeProxy
) -> None:
    """DropAfterApply on a KV v2 write: hvac raises requests' ConnectionError (as for an
    unreachable Vault), yet OpenBao holds the new version."""
    proxy = fault_proxy(vault.addr)
    client = hvac.Client(url=proxy.url, token=vault.token)
    kv = client.secrets.kv.v2
    kv.create_or_update_secret("app", secret={"key": "one"}, mount_point=vault.mount)
    proxy.add(vault_path("POST", r"/v1/[^/]+/data/"), DropAfterApply())
    with pytest.raises(requests.ConnectionError):
        kv.create_or_update_secret("app", secret={"key": "two"}, mount_point=vault.mount)
    stored = vault.server.request("GET", f"/v1/{vault.mount}/data/app")["data"]
    assert stored["metadata"]["version"] == 2
    assert stored["data"] == {"key": "two"}
    assert [o for _, o in proxy.log] == [Outcome.FORWARDED, Outcome.DROPPED]


def test_vault_503_makes_hvac_raise_vault_down(vault: VaultTarget, fault_proxy: MakeProxy) -> None:
    """vault_error(503) answers the way a sealed Vault does: hvac raises VaultDown."""
    vault.server.request("POST", f"/v1/{vault.mount}/data/app", {"data": {"key": "one"}})
    proxy = fault_proxy(vault.addr)
    kv = hvac.Client(url=proxy.url, token=vault.token).secrets.kv.v2
    proxy.add(vault_path("GET", r"/v1/[^/]+/data/"), vault_error(503, ["Vault is sealed"]), times=1)
    with pytest.raises(hvac.exceptions.VaultDown, match="Vault is sealed"):
        kv.read_secret_version("app", mount_point=vault.mount, raise_on_deleted_version=True)
    read = kv.read_secret_version("app", mount_point=vault.mount, raise_on_deleted_version=True)
    assert read["data"]["data"] == {"key": "one"}


def test_closing_the_proxy_ends_its_threads_despite_pooled_connections(
    aws: LocalAws, vault: VaultTarget
) -> None:
    """close() ends the server thread and the threads serving keep-alive connections
    that boto3 and requests still hold open in their pools."""
    before = set(threading.enumerate())
    with FaultProxy(aws.endpoint_url) as to_aws, FaultProxy(vault.addr) as to_vault:
        aws_client = iam(to_aws.url)
        aws_client.list_users()
        vault_client = hvac.Client(url=to_vault.url, token=vault.token)
        vault_client.sys.is_initialized()
        # Two server threads, and one per pooled connection the clients keep open.
        assert len(set(threading.enumerate()) - before) == 4
    wait_until(lambda: set(threading.enumerate()) <= before, 2.0, "the proxy threads to end")
