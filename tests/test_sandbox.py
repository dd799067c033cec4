"""The local servers the suite and the demo stand on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from rotator.model import KeyStatus
from rotator.sandbox import QUARANTINE_V2, LocalAws, SeedKey
from tests.conftest import VaultTarget


def test_seeded_key_is_backdated_in_the_credential_report(aws: LocalAws) -> None:
    """A seeded key's age and last use show in moto's credential report as given."""
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    aws.add_user(
        "alice", keys=[SeedKey(timedelta(days=120), last_used_ago=timedelta(days=2))], now=now
    )
    aws.backend.generate_report()
    report = aws.backend.get_credential_report()
    row = report.splitlines()[1].split(",")
    assert row[0] == "alice"
    assert row[9] == "2026-07-31T12:00:00+00:00"
    assert row[10] == "2026-11-26T12:00:00+00:00"


def test_quarantine_policy_exists_and_attaches(aws: LocalAws) -> None:
    """AWS's managed quarantine policy can be attached on the moto server."""
    aws.add_user("mallory", policies=[QUARANTINE_V2], keys=[SeedKey(timedelta(days=1))])
    attached = aws.backend.list_attached_user_policies("mallory", None, 100)[0]
    assert [p.arn for p in attached] == [QUARANTINE_V2]


def test_reset_forgets_users(aws: LocalAws) -> None:
    """Resetting the server leaves no user behind for the next test."""
    aws.add_user("bob", keys=[SeedKey(timedelta(days=1), status=KeyStatus.INACTIVE)])
    assert aws.keys("bob")
    aws.reset()
    assert "bob" not in aws.backend.users


def test_vault_fixture_mount_is_kv2(vault: VaultTarget) -> None:
    """The per-test mount on the OpenBao dev server is a KV version 2 engine."""
    mounts = vault.server.request("GET", "/v1/sys/mounts")
    assert mounts[f"{vault.mount}/"]["options"]["version"] == "2"
