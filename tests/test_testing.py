"""The fakes where they follow AWS rather than moto, which the contract suite cannot hold
the real adapter to (moto checks no credentials and renders its report live)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from rotator.errors import Transient
from rotator.inventory import parse_credential_report
from rotator.model import KeyStatus, NewKey
from rotator.sandbox import SeedKey
from rotator.testing import FakeClock, FakeIam

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def test_caller_arn_refuses_a_key_aws_would_refuse_as_not_accepted_yet() -> None:
    """A deleted or Inactive key, or a wrong secret, does not authenticate: `Transient`,
    as `AwsIam` reports AWS's InvalidClientTokenId / SignatureDoesNotMatch."""
    iam = FakeIam()
    [off, gone] = iam.add_user("ann", keys=[SeedKey(timedelta(days=2)), SeedKey(timedelta(0))])
    iam.set_key_status("ann", off.access_key_id, KeyStatus.INACTIVE)
    iam.delete_access_key("ann", gone.access_key_id)
    for key in (off, gone, NewKey(off.access_key_id, "not-the-secret")):
        with pytest.raises(Transient, match="not accepted yet"):
            iam.caller_arn(key)
    iam.set_key_status("ann", off.access_key_id, KeyStatus.ACTIVE)
    assert iam.caller_arn(off).endswith(":user/ann")


def test_the_credential_report_is_a_snapshot_renewed_after_four_hours() -> None:
    """The report shows the keys as they were when it was generated; a generation within
    four hours reuses it (COMPLETE), a later one makes a new one (STARTED)."""
    clock = FakeClock(T0)
    iam = FakeIam(clock=clock)
    iam.add_user("bea", keys=[SeedKey(timedelta(days=9))])
    assert iam.generate_credential_report() == "STARTED"
    iam.create_access_key("bea")
    clock.advance(timedelta(hours=3))
    assert iam.generate_credential_report() == "COMPLETE"
    report = iam.get_credential_report()
    assert report is not None
    assert len(parse_credential_report(report)["bea"]) == 1
    clock.advance(timedelta(hours=1))
    assert iam.generate_credential_report() == "STARTED"
    report = iam.get_credential_report()
    assert report is not None
    assert len(parse_credential_report(report)["bea"]) == 2
