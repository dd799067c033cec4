"""Prometheus metrics, in a registry of their own. Names start with `rotator_`.

Never a secret in a label: labels carry account ids, decisions, states, reasons and
operation names only."""

from __future__ import annotations

from collections import Counter as TallyCounter
from collections.abc import Iterable, Mapping
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rotator.inventory import Inventory
from rotator.machine import OPEN, TERMINAL, State
from rotator.model import Decision, Rotation

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.keys = Gauge(
            "rotator_keys",
            "Access keys by decision at the last scan.",
            ["account", "decision"],
            registry=r,
        )
        self.oldest_active_key_age = Gauge(
            "rotator_oldest_active_key_age_seconds",
            "Age of the oldest active, non-exempt access key at the last scan.",
            ["account"],
            registry=r,
        )
        self.opened = Counter(
            "rotator_rotations_opened_total", "Rotations opened.", ["account", "reason"], registry=r
        )
        self.finished = Counter(
            "rotator_rotations_finished_total",
            "Rotations that reached a terminal state, by reason and result.",
            ["account", "reason", "result"],
            registry=r,
        )
        self.open_rotations = Gauge(
            "rotator_open_rotations", "Open rotations by state.", ["state"], registry=r
        )
        self.scan_duration = Histogram(
            "rotator_scan_duration_seconds",
            "Duration of a scan (all accounts).",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.last_scan_success = Gauge(
            "rotator_last_successful_scan_timestamp_seconds",
            "Unix time of the last scan that succeeded.",
            registry=r,
        )
        self.scan_failures = Counter(
            "rotator_scan_failures_total", "Scans that failed.", registry=r
        )
        self.aws_calls = Counter(
            "rotator_aws_calls_total",
            "AWS API calls sent, by operation.",
            ["operation"],
            registry=r,
        )
        self.vault_errors = Counter(
            "rotator_vault_errors_total",
            "Vault operations that failed, by kind.",
            ["kind"],
            registry=r,
        )
        self.up = Gauge("rotator_ready", "1 when the daemon is ready.", registry=r)
        for state in sorted(OPEN):
            self.open_rotations.labels(state=state.value).set(0)

    def observe_scan(self, inventories: Iterable[Inventory], now: datetime) -> None:
        for inv in inventories:
            counts = TallyCounter(d.decision for d in inv.decisions)
            for decision in Decision:
                self.keys.labels(account=inv.account_id, decision=decision.value).set(
                    counts[decision]
                )
            ages = [
                (now - d.key.created_at).total_seconds()
                for d in inv.decisions
                if d.key.active and d.decision is not Decision.EXEMPT
            ]
            self.oldest_active_key_age.labels(account=inv.account_id).set(max(ages, default=0))
        self.last_scan_success.set(now.timestamp())

    def observe_open(self, rotations: Iterable[Rotation]) -> None:
        counts: Mapping[State, int] = TallyCounter(r.state for r in rotations)
        for state in sorted(OPEN):
            self.open_rotations.labels(state=state.value).set(counts.get(state, 0))

    def observe_transition(self, rotation: Rotation, from_state: State) -> None:
        if rotation.state in TERMINAL and from_state not in TERMINAL:
            self.finished.labels(
                account=rotation.account_id,
                reason=rotation.reason.value,
                result=rotation.state.value,
            ).inc()

    def observe_opened(self, rotation: Rotation) -> None:
        self.opened.labels(account=rotation.account_id, reason=rotation.reason.value).inc()

    def aws_call(self, operation: str) -> None:
        self.aws_calls.labels(operation=operation).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
