"""Wiring and whole passes: builds the adapters from settings and runs the jobs the CLI
and the daemon share (scan, open rotations, advance them)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from rotator import log
from rotator.aws import AwsIam
from rotator.config import Settings
from rotator.engine import Engine, Timing, new_rotation
from rotator.errors import NotFound, RotationExists, RotatorError
from rotator.inventory import Inventory, scan
from rotator.machine import State
from rotator.metrics import Metrics
from rotator.model import KeyStatus, Rotation, RotationReason
from rotator.planner import Proposal, propose
from rotator.policy import Rules
from rotator.ports import Clock, IamPort, Notifier, SecretStore, StateStore
from rotator.state import SqliteStateStore, lease_owner
from rotator.vault import VaultStore, build_auth

_log = log.get_logger("rotator.app")

PROBLEM_STATES = frozenset({State.FAILED, State.BLOCKED})


@dataclass
class PassResult:
    """What one `run --once` pass saw and did."""

    inventories: list[Inventory] = field(default_factory=list)
    proposals: list[Proposal] = field(default_factory=list)
    opened: list[Rotation] = field(default_factory=list)
    rotations: list[Rotation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[Rotation]:
        return [r for r in self.rotations if r.state in PROBLEM_STATES]


def build_secrets(settings: Settings) -> VaultStore:
    auth = settings.vault.auth
    return VaultStore(
        str(settings.vault.url),
        settings.vault.mount,
        settings.vault.path_template,
        build_auth(
            auth.method,
            token=auth.token,
            token_file=str(auth.token_file) if auth.token_file else None,
            role_id=auth.role_id,
            secret_id_file=str(auth.secret_id_file) if auth.secret_id_file else None,
        ),
    )


class App:
    """One configured rotator: adapters built lazily, once, from `settings`."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
        fault: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] | None = None,
        metrics: Metrics | None = None,
        stopping: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self._clock: Clock = clock or (lambda: datetime.now(UTC))
        self._notifier = notifier
        self._fault = fault
        self.metrics = metrics
        # Set on shutdown: no new step starts, and waits inside a step end early.
        self.stopping = stopping or threading.Event()
        self._sleep = sleep or self._interruptible_sleep
        self._iams: dict[str, AwsIam] = {}
        self._default: AwsIam | None = None
        self._secrets: SecretStore | None = None
        self._store: StateStore | None = None
        self._engine: Engine | None = None
        self.owner = lease_owner()

    def _interruptible_sleep(self, seconds: float) -> None:
        self.stopping.wait(seconds)

    # --- adapters -------------------------------------------------------------------

    def now(self) -> datetime:
        return self._clock()

    def default_iam(self) -> AwsIam:
        if self._default is None:
            aws = self.settings.aws
            self._default = AwsIam(
                region=aws.region,
                endpoint_url=str(aws.endpoint_url) if aws.endpoint_url else None,
                before_call=self.metrics.aws_call if self.metrics else None,
            )
        return self._default

    def accounts(self) -> list[str]:
        """The account ids this rotator looks after."""
        configured = self.settings.aws.accounts
        if configured:
            return [a.id for a in configured]
        return [self.default_iam().account_id()]

    def iam(self, account_id: str) -> IamPort:
        if account_id not in self._iams:
            default = self.default_iam()
            if default.account_id() != account_id:
                raise NotFound(f"account {account_id} is not configured")
            self._iams[account_id] = default
        return self._iams[account_id]

    @property
    def secrets(self) -> SecretStore:
        if self._secrets is None:
            self._secrets = build_secrets(self.settings)
        return self._secrets

    @property
    def store(self) -> StateStore:
        if self._store is None:
            self._store = SqliteStateStore(self.settings.state.path, clock=self._clock)
        return self._store

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(
                iam=self.iam,
                secrets=self.secrets,
                store=self.store,
                timing=Timing.from_settings(self.settings),
                owner=self.owner,
                clock=self._clock,
                notifier=self._notifier,
                fault=self._fault,
                sleep=self._sleep,
                should_stop=self.stopping.is_set,
                on_transition=self.metrics.observe_transition if self.metrics else None,
            )
        return self._engine

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        closer = getattr(self._secrets, "close", None)
        if callable(closer):
            closer()

    # --- jobs -----------------------------------------------------------------------

    def scan(self, *, as_of: datetime | None = None, with_state: bool = True) -> list[Inventory]:
        """Scan every account. `with_state` reads which keys replaced contained leaks
        (the plan command runs without touching the state store)."""
        rules = Rules.from_settings(self.settings)
        out = []
        for account in self.accounts():
            replacements = self.store.replacement_key_ids(account) if with_state else set()
            out.append(
                scan(self.iam(account), rules, as_of or self.now(), replacements=replacements)
            )
        return out

    def open_rotations(self, proposals: Iterable[Proposal]) -> list[Rotation]:
        """Open a rotation for each proposal whose user has none open yet."""
        opened = []
        for p in proposals:
            if self.store.open_for(p.account_id, p.user_name) is not None:
                continue
            rotation = new_rotation(
                p.account_id,
                p.user_name,
                p.reason,
                self.now(),
                old_key_id=p.old_key_id,
                leaked=p.leaked,
                note=p.why,
            )
            try:
                opened.append(self._open(rotation, f"scan: {p.why}"))
            except RotationExists:
                continue  # another process opened it a moment ago
        return opened

    def _open(self, rotation: Rotation, reason: str) -> Rotation:
        opened = self.engine.open(rotation, reason)
        if self.metrics is not None:
            self.metrics.observe_opened(opened)
        return opened

    def advance_all(self, rotation_ids: Iterable[str]) -> list[Rotation]:
        """Advance each rotation as far as it can go now, `aws.concurrency` at a time."""
        ids = list(dict.fromkeys(rotation_ids))

        def one(rid: str) -> Rotation | None:
            if self.stopping.is_set():
                return self.store.get(rid)
            try:
                return self.engine.advance(rid)
            except RotatorError as exc:
                _log.error("rotation.advance_failed", rotation_id=rid, error=str(exc))
                return self.store.get(rid)

        with ThreadPoolExecutor(max_workers=self.settings.aws.concurrency) as pool:
            results = list(pool.map(one, ids))
        return [r for r in results if r is not None]

    def scan_and_open(self, *, dry_run: bool = False) -> PassResult:
        """Scan every account and open a rotation for each due, leaked or blocked user."""
        result = PassResult()
        started = self.now()
        result.inventories = self.scan()
        if self.metrics is not None:
            self.metrics.scan_duration.observe((self.now() - started).total_seconds())
            self.metrics.observe_scan(result.inventories, self.now())
        for inventory in result.inventories:
            result.proposals.extend(propose(inventory.decisions))
        if not dry_run:
            self.secrets.check()
            result.opened = self.open_rotations(result.proposals)
        return result

    def tick(self) -> list[Rotation]:
        """Advance every open rotation that is due now (and every BLOCKED one, which
        resumes as soon as an operator frees a slot)."""
        now = self.now()
        due = [
            r.id
            for r in self.store.list_open()
            if r.state is State.BLOCKED or r.next_action_at is None or r.next_action_at <= now
        ]
        advanced = self.advance_all(due)
        if self.metrics is not None:
            self.metrics.observe_open(self.store.list_open())
        return advanced

    def run_once(self, *, dry_run: bool = False) -> PassResult:
        """Scan, open rotations for due and leaked keys, advance every open rotation."""
        result = self.scan_and_open(dry_run=dry_run)
        if dry_run:
            result.rotations = self.store.list_open()
            return result
        result.rotations = self.advance_all(r.id for r in self.store.list_open())
        return result

    def force(
        self,
        user_name: str,
        *,
        account_id: str | None = None,
        key_id: str | None = None,
        leaked: bool = False,
        reason: str | None = None,
        overlap: timedelta | None = None,
    ) -> Rotation:
        """Open a forced rotation for one user (incident response) and advance it."""
        opened = self.open_forced(
            user_name,
            account_id=account_id,
            key_id=key_id,
            leaked=leaked,
            reason=reason,
            overlap=overlap,
        )
        return self.engine.advance(opened.id)

    def open_forced(
        self,
        user_name: str,
        *,
        account_id: str | None = None,
        key_id: str | None = None,
        leaked: bool = False,
        reason: str | None = None,
        overlap: timedelta | None = None,
    ) -> Rotation:
        """Open (not advance) a forced rotation. Raises NotFound for an unknown user or
        key, RotationExists when the user already has an open rotation."""
        account = account_id or self.accounts()[0]
        iam = self.iam(account)
        keys = iam.list_access_keys(user_name)  # NotFound when IAM does not know the user
        if key_id is not None and key_id not in {k.access_key_id for k in keys}:
            raise NotFound(f"user {user_name} has no key {key_id}")
        if key_id is None:
            active = [k for k in keys if k.status is KeyStatus.ACTIVE]
            if len(active) > 1:
                raise RotatorError(
                    f"user {user_name} has two active keys: name the one to replace with --key"
                )
            chosen = active or sorted(keys, key=lambda k: k.created_at)
            key_id = chosen[0].access_key_id if chosen else None
        if leaked and key_id is None:
            raise RotatorError(f"user {user_name} has no key that could have leaked")
        self.secrets.check()
        rotation = new_rotation(
            account,
            user_name,
            RotationReason.LEAKED if leaked else RotationReason.MANUAL,
            self.now(),
            old_key_id=key_id,
            leaked=leaked,
            note=reason,
            overlap=overlap,
        )
        return self._open(rotation, f"forced: {reason or 'no reason given'}")
