"""Several accounts: each reached through its role (AssumeRole), keys rotated in each
with the account in its Vault path, and one failing account never stopping the others."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import boto3

from rotator.machine import State
from rotator.model import KeyStatus
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey
from tests.conftest import VaultTarget
from tests.faultproxy import FaultProxy, aws_error
from tests.rig import FakeClock, identity_of, make_app, rotator, settings_for, vault_secret

D = timedelta(days=1)
OTHER = "222233334444"
BROKEN = "333344445555"


def test_two_accounts_rotate_each_into_its_own_vault_path(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Due keys in the credentials' own account and in one reached by AssumeRole are both
    rotated; each new key lands under its account's Vault path and works."""
    role = aws.add_role(OTHER, "rotator")
    aws.add_user("alice", keys=[SeedKey(120 * D)])
    aws.add_user("alice", keys=[SeedKey(130 * D)], account_id=OTHER)
    settings = settings_for(
        aws,
        vault,
        tmp_path,
        aws={
            "accounts": [
                {"id": ACCOUNT_ID},
                {"id": OTHER, "role_arn": role, "external_id": "ext-1"},
            ]
        },
    )
    result = make_app(settings, FakeClock()).run_once()
    assert result.failures == {}
    assert {(r.account_id, r.state) for r in result.rotations} == {
        (ACCOUNT_ID, State.DONE),
        (OTHER, State.DONE),
    }
    for account in (ACCOUNT_ID, OTHER):
        secret = vault_secret(vault, f"aws/{account}/alice")
        assert secret is not None
        new_id = secret["data"]["aws_access_key_id"]
        assert aws.keys("alice", account) == {new_id: KeyStatus.ACTIVE}
        assert identity_of(aws, secret) == f"arn:aws:iam::{account}:user/alice"


def test_one_account_failing_does_not_stop_the_other(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """When one account's role cannot be assumed, the other is still rotated and
    `run --once` exits 1 naming the failed account and why."""
    role = aws.add_role(OTHER, "rotator")
    [old] = aws.add_user("bob", keys=[SeedKey(120 * D)], account_id=OTHER)
    config = tmp_path / "rotator.yaml"
    config.write_text(
        json.dumps(
            {
                "aws": {
                    "endpoint_url": aws.endpoint_url,
                    "accounts": [
                        {"id": OTHER, "role_arn": role},
                        {"id": BROKEN, "role_arn": f"arn:aws:iam::{BROKEN}:role/missing"},
                    ],
                },
                "vault": {"url": vault.addr, "mount": vault.mount, "auth": {"token": vault.token}},
                "state": {"path": str(tmp_path / "state.db")},
                "policy": {"overlap": "0s", "delete_after": "0s"},
            }
        )
    )
    broken_role = f"arn:aws:iam::{BROKEN}:role/missing"
    # moto accepts any AssumeRole (the role need not exist); real AWS refuses a role that
    # is missing or does not trust the caller, and that is the case worth testing.
    with FaultProxy(aws.endpoint_url) as proxy:
        proxy.add(
            lambda request: request.form.get("RoleArn") == broken_role,
            aws_error("AccessDenied", 403, "User is not authorized to perform: sts:AssumeRole"),
        )
        text = config.read_text().replace(aws.endpoint_url, proxy.url)
        config.write_text(text)
        done = rotator("--config", str(config), "run", "--once", "--json")
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert "sts:AssumeRole" in doc["failed_accounts"][BROKEN]
    assert f"account {BROKEN} failed" in done.stderr
    assert [r["state"] for r in doc["rotations"]] == ["DONE"]
    assert old.access_key_id not in aws.keys("bob", OTHER)


def test_organization_discovery_assumes_the_role_in_each_member(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """With aws.organization the accounts come from ListAccounts, filtered by
    include/exclude, and the named role is assumed in each."""
    org = boto3.client("organizations", endpoint_url=aws.endpoint_url, region_name="us-east-1")
    org.create_organization(FeatureSet="ALL")
    created = [
        org.create_account(Email=f"{name}@example.invalid", AccountName=name)[
            "CreateAccountStatus"
        ]["AccountId"]
        for name in ("prod", "dev")
    ]
    prod, dev = created
    for account in created:
        aws.add_role(account, "rotator")
        aws.add_user("svc", keys=[SeedKey(100 * D)], account_id=account)
    settings = settings_for(
        aws, vault, tmp_path, aws={"organization": {"role_name": "rotator", "exclude": [dev]}}
    )
    app = make_app(settings, FakeClock())
    assert prod in app.accounts()
    assert dev not in app.accounts()
    result = app.run_once()
    rotated = {r.account_id for r in result.rotations if r.state is State.DONE}
    assert prod in rotated
    assert dev not in rotated
    assert aws.keys("svc", dev) != {}
    assert all(s is KeyStatus.ACTIVE for s in aws.keys("svc", dev).values())
