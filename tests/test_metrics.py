"""Prometheus metrics that the daemon test cannot provoke on a healthy system."""

from __future__ import annotations

from pathlib import Path

import pytest

from rotator.app import App
from rotator.config import parse_settings
from rotator.errors import BackendUnavailable
from rotator.metrics import Metrics
from rotator.sandbox import free_port


def test_vault_failures_are_counted_by_kind(tmp_path: Path) -> None:
    """Every failed Vault call of the app shows in rotator_vault_errors_total by kind."""
    settings = parse_settings(
        {
            "vault": {"url": f"http://127.0.0.1:{free_port()}", "auth": {"token": "t-not-real"}},
            "state": {"path": str(tmp_path / "state.db")},
        },
        {},
    )
    metrics = Metrics()
    app = App(settings, metrics=metrics)
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            app.secrets.check()
    text = metrics.render().decode()
    assert 'rotator_vault_errors_total{kind="BackendUnavailable"} 2.0' in text
