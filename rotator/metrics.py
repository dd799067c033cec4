"""Prometheus metrics, in a registry of their own. Names start with `rotator_`.

Never a secret in a label: labels carry account ids, decisions, states, reasons and
operation names only. Every update goes through a `Metrics` method named for what the
rotator observed."""

from __future__ import annotations

import contextlib
import time
from collections import Counter as TallyCounter
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rotator.console_policy import CONSOLE_DECISIONS
from rotator.inventory import Inventory
from rotator.machine import OPEN, TERMINAL, RotationKind, State
from rotator.model import KEY_DECISIONS, Decision, Rotation, RotationReason, ScanLease

__all__ = ["CONTENT_TYPE_LATEST", "LEAK_EVENT_RESULTS", "LeakEventResult", "Metrics"]

# How handling one leak event (an AWS Health event from SQS or a file) ended:
#   contained           at least one key it names was set Inactive
#   nothing_to_contain  none of its keys belongs to a user or exists any more
#   duplicate           a replay: every key was already handled for this event
#   rejected            not a leak event the rotator can act on (dead-lettered)
#   retry               a backend failed; the event must come again (SQS redelivers it)
LeakEventResult = Literal["contained", "nothing_to_contain", "duplicate", "rejected", "retry"]
LEAK_EVENT_RESULTS: tuple[LeakEventResult, ...] = get_args(LeakEventResult)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._not_switched_accounts: set[str] = set()
        self._leak_accounts: set[str] = set()
        self.keys = Gauge(
            "rotator_keys",
            "Access keys by decision at the last scan.",
            ["account", "decision"],
            registry=r,
        )
        self.console_users = Gauge(
            "rotator_console_users",
            "Users with a console password, by the decision on it at the last scan (absent "
            "for an account whose credential report could not be read).",
            ["account", "decision"],
            registry=r,
        )
        self.oldest_active_key_age = Gauge(
            "rotator_oldest_active_key_age_seconds",
            "Age of the oldest active, non-exempt access key at the last scan.",
            ["account"],
            registry=r,
        )
        # `kind`: "key" (an access key) or "console" (a console password).
        self.opened = Counter(
            "rotator_rotations_opened_total",
            "Rotations opened, by kind and reason.",
            ["account", "kind", "reason"],
            registry=r,
        )
        self.finished = Counter(
            "rotator_rotations_finished_total",
            "Rotations that reached a terminal state, by kind, reason and result.",
            ["account", "kind", "reason", "result"],
            registry=r,
        )
        self.open_rotations = Gauge(
            "rotator_open_rotations",
            "Open rotations by state and kind.",
            ["state", "kind"],
            registry=r,
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
        self.leaks_contained = Counter(
            "rotator_leaked_keys_contained_total",
            "Leaked keys the rotator set Inactive, by account.",
            ["account"],
            registry=r,
        )
        self.leak_events = Counter(
            "rotator_leak_events_total",
            "Leak events (AWS Health) handled, by source (sqs, file) and result.",
            ["source", "result"],
            registry=r,
        )
        self.up = Gauge("rotator_ready", "1 when the daemon is ready.", registry=r)
        self.backend_up = Gauge(
            "rotator_backend_up",
            "1 when the backend answered the daemon's last look at it (state, aws, vault).",
            ["backend"],
            registry=r,
        )
        self.leaked_active = Gauge(
            "rotator_leaked_keys_active",
            "Leaked keys this daemon knows of that are still Active (containment pending "
            "or failing), by account.",
            ["account"],
            registry=r,
        )
        self.oldest_leak = Gauge(
            "rotator_oldest_active_leak_seconds",
            "How long the oldest leaked key this daemon knows of has been Active since "
            "it was detected (0 when there is none).",
            registry=r,
        )
        self.not_switched = Gauge(
            "rotator_consumers_not_switched",
            "Open rotations in OVERLAP whose consumers still use the old key, by account.",
            ["account"],
            registry=r,
        )
        self.deactivated_in_use = Counter(
            "rotator_deactivated_in_use_total",
            "Old keys deactivated at the overlap limit although consumers still used them.",
            ["account"],
            registry=r,
        )
        self.scan_period = Gauge(
            "rotator_scan_period_seconds", "Time between two scheduled scans.", registry=r
        )
        self.account_last_scan = Gauge(
            "rotator_account_last_scan_timestamp_seconds",
            "Unix time of the last finished scan of the account, by any daemon sharing "
            "the state store (as the store records it).",
            ["account"],
            registry=r,
        )
        self.scan_lease_held = Gauge(
            "rotator_scan_lease_held",
            "1 when this daemon holds the account's scan lease (it alone scans the account).",
            ["account"],
            registry=r,
        )
        self.lease_takeovers = Counter(
            "rotator_lease_takeovers_total",
            "Leases this daemon took over from another holder whose lease had expired, by "
            "kind (scan, rotation).",
            ["kind"],
            registry=r,
        )
        self.fenced_writes = Counter(
            "rotator_fenced_writes_total",
            "Writes the state store refused because this daemon's lease had been taken "
            "over or had expired (the work stopped, as fencing requires).",
            registry=r,
        )
        self.observe_open(())
        for kind in ("scan", "rotation"):
            self.lease_takeovers.labels(kind=kind)
        # An age, computed when scraped: it grows while the key stays Active.
        self._oldest_leak_at: float | None = None
        self.oldest_leak.set_function(
            lambda: 0.0 if self._oldest_leak_at is None else time.time() - self._oldest_leak_at
        )
        # The daemon's queue poller is the source /metrics shows: every result starts at
        # 0, so that an alert on its increase sees the first event too.
        for result in LEAK_EVENT_RESULTS:
            self.leak_events.labels(source="sqs", result=result)

    # --- what the rotator observes --------------------------------------------------------

    def observe_scan(self, inventories: Iterable[Inventory], now: datetime) -> None:
        for inv in inventories:
            counts = TallyCounter(d.decision for d in inv.decisions)
            for decision in KEY_DECISIONS:
                labels = {"account": inv.account_id, "decision": decision.value}
                self.keys.labels(**labels).set(counts[decision])
            self._observe_console(inv)
            ages = [
                (now - d.key.created_at).total_seconds()
                for d in inv.decisions
                if d.key.active and d.decision is not Decision.EXEMPT
            ]
            labels = {"account": inv.account_id}
            self.oldest_active_key_age.labels(**labels).set(max(ages, default=0))
        self.last_scan_success.set(now.timestamp())

    def _observe_console(self, inv: Inventory) -> None:
        # Without the credential report console access is unknown: no series, rather
        # than zeros that would read as "nobody has console access".
        if inv.source != "credential_report":
            self._forget_console(inv.account_id)
            return
        counts = TallyCounter(c.decision for c in inv.console)
        for decision in CONSOLE_DECISIONS:
            labels = {"account": inv.account_id, "decision": decision.value}
            self.console_users.labels(**labels).set(counts[decision])

    def _forget_console(self, account: str) -> None:
        for decision in CONSOLE_DECISIONS:
            with contextlib.suppress(KeyError):
                self.console_users.remove(account, decision.value)

    def observe_scan_duration(self, seconds: float) -> None:
        self.scan_duration.observe(seconds)

    def scan_failed(self) -> None:
        self.scan_failures.inc()

    def vault_error(self, kind: str) -> None:
        self.vault_errors.labels(kind=kind).inc()

    def ready(self, ready: bool) -> None:
        self.up.set(1 if ready else 0)

    def observe_open(self, rotations: Iterable[Rotation]) -> None:
        rotations = list(rotations)
        counts: Mapping[tuple[State, RotationKind], int] = TallyCounter(
            (r.state, r.kind) for r in rotations
        )
        for kind in RotationKind:
            for state in sorted(OPEN):
                labels = {"state": state.value, "kind": kind.value}
                self.open_rotations.labels(**labels).set(counts.get((state, kind), 0))
        waiting = TallyCounter(
            r.account_id for r in rotations if r.state is State.OVERLAP and r.waiting_on
        )
        for account in {r.account_id for r in rotations} | self._not_switched_accounts:
            self.not_switched.labels(account=account).set(waiting.get(account, 0))
        self._not_switched_accounts |= set(waiting)

    def backend(self, name: str, up: bool) -> None:
        """The daemon's last look at a backend ("state", "aws", "vault")."""
        self.backend_up.labels(backend=name).set(1 if up else 0)

    def observe_leaks_active(self, detected: Mapping[tuple[str, str], datetime]) -> None:
        """`detected`: (account, key id) -> when it was detected, for every leaked key
        known to be still Active."""
        per_account = TallyCounter(account for account, _ in detected)
        for account in set(per_account) | self._leak_accounts:
            self.leaked_active.labels(account=account).set(per_account.get(account, 0))
        self._leak_accounts |= set(per_account)
        oldest = min(detected.values(), default=None)
        self._oldest_leak_at = None if oldest is None else oldest.timestamp()

    def observe_scan_period(self, seconds: float) -> None:
        self.scan_period.set(seconds)

    def observe_accounts(self, accounts: Iterable[str]) -> None:
        """Create every per-account series at 0 as soon as the accounts are known, so
        that an alert on `increase()` sees a counter's first step too."""
        for account in accounts:
            for kind in RotationKind:
                for reason in RotationReason:
                    labels = {"account": account, "kind": kind.value, "reason": reason.value}
                    self.opened.labels(**labels)
                    for state in sorted(TERMINAL):
                        self.finished.labels(**labels, result=state.value)
            self.leaks_contained.labels(account=account)
            self.deactivated_in_use.labels(account=account)
            self.leaked_active.labels(account=account).set(0)

    def observe_scan_leases(self, leases: Iterable[ScanLease], held: set[str]) -> None:
        """The scan leases as the store holds them: which accounts this daemon holds
        (`held`), and when each account was last scanned by any daemon. The key gauges
        of an account this daemon no longer scans are dropped: the daemon scanning it
        now exports them, and a stale copy here would disagree."""
        for lease in leases:
            labels = {"account": lease.account_id}
            self.scan_lease_held.labels(**labels).set(1 if lease.account_id in held else 0)
            if lease.account_id not in held:
                self._forget_scan(lease.account_id)
            # 0 before the first finished scan: an account never scanned is overdue.
            last = 0.0 if lease.last_scan_at is None else lease.last_scan_at.timestamp()
            self.account_last_scan.labels(**labels).set(last)

    def _forget_scan(self, account: str) -> None:
        for decision in KEY_DECISIONS:
            with contextlib.suppress(KeyError):
                self.keys.remove(account, decision.value)
        self._forget_console(account)
        with contextlib.suppress(KeyError):
            self.oldest_active_key_age.remove(account)

    def observe_lease_event(self, event: Literal["taken_over", "fenced"]) -> None:
        """What the engine reported of a rotation lease."""
        if event == "taken_over":
            self.lease_taken_over("rotation")
        else:
            self.write_fenced()

    def lease_taken_over(self, kind: Literal["scan", "rotation"]) -> None:
        self.lease_takeovers.labels(kind=kind).inc()

    def write_fenced(self) -> None:
        self.fenced_writes.inc()

    def observe_transition(self, rotation: Rotation, from_state: State) -> None:
        if (
            from_state is State.OVERLAP
            and rotation.state is State.DEACTIVATE
            and rotation.waiting_on
        ):
            self.deactivated_in_use.labels(account=rotation.account_id).inc()
        if rotation.state in TERMINAL and from_state not in TERMINAL:
            labels = {
                "account": rotation.account_id,
                "kind": rotation.kind.value,
                "reason": rotation.reason.value,
                "result": rotation.state.value,
            }
            self.finished.labels(**labels).inc()

    def observe_opened(self, rotation: Rotation) -> None:
        labels = {
            "account": rotation.account_id,
            "kind": rotation.kind.value,
            "reason": rotation.reason.value,
        }
        self.opened.labels(**labels).inc()

    def observe_contained(self, account_id: str) -> None:
        self.leaks_contained.labels(account=account_id).inc()

    def observe_leak_event(self, source: str, result: LeakEventResult) -> None:
        """One leak event handled, from `source` ("sqs" or "file")."""
        self.leak_events.labels(source=source, result=result).inc()

    def aws_call(self, operation: str) -> None:
        self.aws_calls.labels(operation=operation).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
