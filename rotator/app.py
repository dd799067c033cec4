"""The service: whole passes on the adapters `rotator.wiring` builds. Runs the jobs the
CLI and the daemon share: scan, contain leaked keys, open rotations, advance them, and
handle leak events (from a file, an HTTP trigger or the SQS queue)."""

from __future__ import annotations

import contextlib
import heapq
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from rotator import log
from rotator.commands import suggested
from rotator.config import Settings
from rotator.console_policy import console_to_rotate
from rotator.digests import (
    Digest,
    Warning,
    build_digests,
    console_warning_id,
    deactivation_notices,
    fill_key_ids,
    pending_console_warnings,
    pending_warnings,
    users_missing_key_ids,
)
from rotator.durations import format_duration
from rotator.engine import Engine, Timing, new_rotation
from rotator.errors import (
    BackendUnavailable,
    BadInput,
    NotFound,
    RotationExists,
    RotatorError,
    Transient,
)
from rotator.inventory import Inventory, scan
from rotator.leaks import LeakEvent, parse_event
from rotator.machine import OPEN, State
from rotator.metrics import LeakEventResult, Metrics
from rotator.model import (
    ConsoleDecision,
    Decision,
    ForcedRotation,
    KeyDecision,
    KeyStatus,
    Rotation,
    RotationKind,
    RotationReason,
    ScanLease,
)
from rotator.policy import Proposal, Rules, exemption, propose, to_deactivate, to_delete
from rotator.ports import Clock, IamPort, Notifier, SecretStore, StateStore
from rotator.urgency import urgent
from rotator.wiring import Wiring

if TYPE_CHECKING:
    from rotator.aws import AwsIam

_log = log.get_logger("rotator.app")

# How many of a user's closed rotations are looked through for the history of one of
# its keys (a leak that named it, an operator who turned it back on).
_HISTORY = 200


@dataclass
class ScanResult:
    inventories: list[Inventory] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # account id -> why


@dataclass
class EventResult:
    """What handling one leak event did: the rotations that replace its keys, and a note
    for every key there was nothing to do for."""

    rotations: list[Rotation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    keys: int = 0  # keys the event names
    contained: int = 0  # of those, set Inactive by this delivery
    duplicates: int = 0  # of those, already handled for this event (a replay)

    @property
    def outcome(self) -> LeakEventResult:
        """How `rotator_leak_events_total` counts this delivery."""
        if self.contained:
            return "contained"
        if self.keys and self.duplicates == self.keys:
            return "duplicate"
        return "nothing_to_contain"


@dataclass
class PassResult:
    """What one `run --once` pass saw and did."""

    inventories: list[Inventory] = field(default_factory=list)
    proposals: list[Proposal] = field(default_factory=list)
    opened: list[Rotation] = field(default_factory=list)
    rotations: list[Rotation] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # account id -> why
    # Why Vault could not be used: leaked keys were still contained, other rotations wait.
    vault_error: RotatorError | None = None
    # Keys this pass set Inactive as unused, and inactive keys it deleted as idle (a dry
    # run: those it would, chosen alike, without the re-check at run time).
    deactivated: list[KeyDecision] = field(default_factory=list)
    deleted: list[KeyDecision] = field(default_factory=list)
    # A dry run: the proposals the real pass would open a rotation for, and those it
    # would not, with why (`App.held_back`).
    would_open: list[Proposal] = field(default_factory=list)
    held_back: list[tuple[Proposal, str]] = field(default_factory=list)
    # A dry run: the console passwords the pass would rotate (`console: rotate`, due).
    would_rotate_console: list[ConsoleDecision] = field(default_factory=list)
    # The owners' warning digests this pass handed to the notifier.
    digests: list[Digest] = field(default_factory=list)


class App:
    """One configured rotator: the whole passes (scan, open, advance, contain, leak
    events) on the adapters its `Wiring` builds.

    `App(settings, clock=..., metrics=..., notifier=...)` builds the default wiring from
    `settings`; `App(settings, wiring=...)` runs on the wiring given (which then holds the
    clock, the metrics and the notifier). The app owns its wiring: `close` closes it."""

    def __init__(
        self,
        settings: Settings,
        *,
        wiring: Wiring | None = None,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
        fault: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] | None = None,
        metrics: Metrics | None = None,
        stopping: threading.Event | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        if wiring is None:
            wiring = Wiring(settings, clock=clock, metrics=metrics, notifier=notifier)
        elif wiring.settings is not settings or any(
            given is not None for given in (clock, metrics, notifier)
        ):
            raise ValueError("App(wiring=...) takes settings, clock, metrics and notifier from it")
        self._wiring = wiring
        self.settings = settings
        self._monotonic = monotonic
        self._fault = fault
        # Set on shutdown: no new step starts, and waits inside a step end early.
        self.stopping = stopping or threading.Event()
        self._sleep = sleep or self._interruptible_sleep
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self.owner = wiring.lease_owner()
        self._leak_lock = threading.Lock()
        self._leaks_pending: dict[tuple[str, str], datetime] = {}

    def _interruptible_sleep(self, seconds: float) -> None:
        self.stopping.wait(seconds)

    # --- what the wiring built ------------------------------------------------------

    @property
    def metrics(self) -> Metrics | None:
        return self._wiring.metrics

    def now(self) -> datetime:
        return self._wiring.clock()

    def default_iam(self) -> AwsIam:
        """IAM for the credentials' own account."""
        return self._wiring.default_iam()

    def accounts(self) -> list[str]:
        """The account ids this rotator looks after (`Wiring.accounts`)."""
        return self._wiring.accounts()

    def iam(self, account_id: str) -> IamPort:
        """IAM for one configured account; raises `NotFound` for any other."""
        return self._wiring.iam(account_id)

    @property
    def secrets(self) -> SecretStore:
        return self._wiring.secrets

    @property
    def store(self) -> StateStore:
        return self._wiring.store

    @property
    def notifier(self) -> Notifier:
        return self._wiring.notifier

    @property
    def engine(self) -> Engine:
        with self._engine_lock:
            if self._engine is None:
                wiring = self._wiring
                self._engine = Engine(
                    iam=wiring.iam,
                    secrets=wiring.secrets_on_demand(),
                    store=wiring.store,
                    timing=Timing.from_settings(self.settings),
                    owner=self.owner,
                    clock=wiring.clock,
                    notifier=wiring.notifier,
                    fault=self._fault,
                    sleep=self._sleep,
                    should_stop=self.stopping.is_set,
                    on_transition=self.metrics.observe_transition if self.metrics else None,
                    on_lease=self.metrics.observe_lease_event if self.metrics else None,
                    **({"monotonic": self._monotonic} if self._monotonic else {}),
                )
            return self._engine

    def close(self) -> None:
        self._wiring.close()

    # --- jobs -----------------------------------------------------------------------

    def scan(
        self,
        *,
        as_of: datetime | None = None,
        with_state: bool = True,
        record: bool = True,
        accounts: Iterable[str] | None = None,
    ) -> ScanResult:
        """Scan every account (or only `accounts`); one failing account never stops the
        others.

        `with_state` reads which keys replaced contained leaks, when each quarantine
        policy was first seen and which keys open rotations track (plan may run without
        a state store), and records the quarantines this scan saw (`plan` passes
        `record=False`: it changes nothing)."""
        rules = Rules.from_settings(self.settings)
        result = ScanResult()
        for account in self.accounts() if accounts is None else accounts:
            try:
                replacements: set[str] = set()
                since: dict[str, datetime] = {}
                rotating: dict[str, Rotation] = {}
                if with_state:
                    replacements = self.store.replacement_key_ids(account)
                    since = self.store.quarantines(account)
                    # Keys an open key rotation tracks are described by it (mid-rotation
                    # a user holds two active keys by design: not "blocked").
                    rotating = {
                        key_id: r
                        for r in self.store.list_open()
                        if r.account_id == account and r.kind is RotationKind.KEY
                        for key_id in (r.old_key_id, r.new_key_id)
                        if key_id
                    }
                with ThreadPoolExecutor(max_workers=self.settings.aws.concurrency) as pool:
                    inventory = scan(
                        self.iam(account),
                        rules,
                        as_of or self.now(),
                        replacements=replacements,
                        quarantined_since=since,
                        reactivations=self._reactivations(account) if with_state else None,
                        console_rotated_at=(
                            self._console_rotated_at(account) if with_state else None
                        ),
                        rotations=rotating,
                        pmap=pool.map,
                    )
                if record and with_state:
                    self.store.note_quarantines(account, inventory.quarantined)
            except RotatorError as exc:
                _log.error("scan.account_failed", account=account, error=str(exc))
                result.failures[account] = str(exc)
                continue
            result.inventories.append(inventory)
        if not result.inventories and result.failures:
            # Nothing could be scanned at all: that is an outage, not a partial result.
            raise BackendUnavailable(
                "; ".join(f"account {a}: {e}" for a, e in result.failures.items())
            )
        return result

    def _console_rotated_at(self, account: str) -> Callable[[str], datetime | None]:
        """user -> when the rotator last finished rotating its console password (None:
        never), read from the state store one user at a time as the scan asks: the
        credential report may be four hours old, and must not make a pass rotate a
        password it has just set."""

        def of(user_name: str) -> datetime | None:
            last = self.store.latest_for(account, user_name, RotationKind.CONSOLE)
            if last is None or last.state is not State.DONE:
                return None
            return last.verified_at or last.updated_at

        return of

    def _reactivations(self, account: str) -> Callable[[str], dict[str, datetime]]:
        """user -> {key id: when an operator last turned it back on}, from the rotations
        that did (`reactivate` and `rollback` both end in ROLLED_BACK naming the key as
        their old key): the key counts as idle from then on, not from its last use."""

        def of(user_name: str) -> dict[str, datetime]:
            found: dict[str, datetime] = {}
            for r in self.store.list_recent(limit=_HISTORY, user_name=user_name):
                if r.account_id == account and r.state is State.ROLLED_BACK and r.old_key_id:
                    found.setdefault(r.old_key_id, r.updated_at)  # newest first
            return found

        return of

    def open_rotations(
        self, proposals: Iterable[Proposal], *, scanned_at: datetime | None = None
    ) -> list[Rotation]:
        """Open a rotation for each proposal whose user has none open yet. A user whose
        last rotation FAILED gets no new one (leaks aside) until `retry_failed_after` has
        passed: it failed for a reason an operator has been told about, and trying again
        at once would repeat what failed (minting keys against a Vault that refuses them).
        A user whose latest rotation changed after `scanned_at` (when the scan behind the
        proposals began) is left to the next scan: another process acted on what this
        scan saw, and its proposal may name a key that is already rotated."""
        opened = []
        for p in proposals:
            if self.held_back(p, scanned_at=scanned_at) is not None:
                continue
            rotation = new_rotation(
                p.account_id,
                p.user_name,
                p.reason,
                self.now(),
                old_key_id=p.old_key_id,
                leaked=p.leaked,
                note=p.why,
                overlap=p.overlap,
            )
            try:
                opened.append(self._open(rotation, f"scan: {p.why}"))
            except RotationExists:
                continue  # another process opened it a moment ago
        return opened

    def held_back(self, p: Proposal, *, scanned_at: datetime | None = None) -> str | None:
        """Why `open_rotations` opens no rotation for `p` now (None: it opens one): the
        user has an open key rotation; or, leaks aside, its latest rotation changed after
        `scanned_at` or FAILED less than `retry_failed_after` ago. A dry run asks the
        same question, so that it counts what the real pass opens."""
        existing = self.store.open_for(p.account_id, p.user_name)
        if existing is not None:
            return f"rotation {existing.id[:8]} is open ({existing.state.value})"
        if p.leaked:
            return None
        last = self.store.latest_for(p.account_id, p.user_name)
        if last is None:
            return None
        if scanned_at is not None and last.updated_at > scanned_at:
            return f"rotation {last.id[:8]} changed after this scan began"
        retry_at = last.updated_at + self.settings.policy.retry_failed_after
        if last.state is State.FAILED and self.now() < retry_at:
            return (
                f"rotation {last.id[:8]} FAILED at {last.updated_at.isoformat(timespec='seconds')}"
                f"; retried after retry_failed_after, from {retry_at.isoformat(timespec='seconds')}"
            )
        return None

    def _open(self, rotation: Rotation, reason: str) -> Rotation:
        opened = self.engine.open(rotation, reason)
        if self.metrics is not None:
            self.metrics.observe_opened(opened)
        return opened

    def advance_all(
        self, rotation_ids: Iterable[str], *, recheck_blocked: bool = False
    ) -> list[Rotation]:
        """Advance each rotation as far as it can go now, `aws.concurrency` at a time
        (`recheck_blocked`: BLOCKED ones are looked at now, not at their next recheck).

        A rotation whose new key is not accepted yet (IAM is eventually consistent)
        comes back from VERIFY with a short `next_action_at`: it is put back in line for
        that moment instead of holding a thread idle, so other rotations progress."""
        ids = list(dict.fromkeys(rotation_ids))
        results: dict[str, Rotation] = {}

        def one(rid: str) -> Rotation | None:
            if self.stopping.is_set():
                return self.store.get(rid)
            try:
                return self.engine.advance(rid, recheck_blocked=recheck_blocked)
            except Exception as exc:
                # The engine records step errors on the rotation; what gets here is a
                # store that cannot be read or written. One rotation never stops a pass.
                _log.error("rotation.advance_failed", rotation_id=rid, error=str(exc))
                with contextlib.suppress(Exception):
                    return self.store.get(rid)
                return None

        waiting: list[tuple[datetime, str]] = []
        with ThreadPoolExecutor(max_workers=self.settings.aws.concurrency) as pool:
            running: dict[Future[Rotation | None], str] = {pool.submit(one, r): r for r in ids}
            while running or waiting:
                if running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        rid = running.pop(future)
                        rotation = future.result()
                        if rotation is None:
                            continue
                        results[rid] = rotation
                        due = rotation.next_action_at
                        if rotation.state is State.VERIFY and due and not self.stopping.is_set():
                            heapq.heappush(waiting, (due, rid))
                elif waiting:
                    pause = (waiting[0][0] - self.now()).total_seconds()
                    if pause > 0:
                        self._sleep(pause)
                    if self.stopping.is_set():
                        break
                while waiting and waiting[0][0] <= self.now():
                    _, rid = heapq.heappop(waiting)
                    running[pool.submit(one, rid)] = rid
        return [results[r] for r in ids if r in results]

    def hold_scan_leases(self, ttl: timedelta) -> dict[str, ScanLease]:
        """Take or renew the scan lease of every configured account; return those this
        process holds, by account. Daemons sharing the state store scan only the
        accounts whose lease they hold, so N daemons make one scan per account."""
        held: dict[str, ScanLease] = {}
        for account in self.accounts():
            lease = self.store.hold_scan_lease(account, self.owner, ttl)
            if lease is None:
                continue
            if lease.taken_over:
                _log.warning("scan.lease_taken_over", account=account, fence=lease.token)
                if self.metrics is not None:
                    self.metrics.lease_taken_over("scan")
            held[account] = lease
        if self.metrics is not None:
            self.metrics.observe_scan_leases(self.store.scan_leases(), set(held))
        return held

    def release_scan_leases(self, accounts: Iterable[str]) -> None:
        """Give the accounts' scan leases up now (a daemon stopping): another daemon
        takes them at its next tick instead of after they expire."""
        for account in accounts:
            self.store.release_scan_lease(account, self.owner)

    def scan_and_open(
        self, *, dry_run: bool = False, leases: Mapping[str, ScanLease] | None = None
    ) -> PassResult:
        """Scan every account (with `leases`: only those accounts, recording each
        finished scan under its lease) and open a rotation for each due, leaked or
        blocked user."""
        result = PassResult()
        started = self.now()
        scanned = self.scan(record=not dry_run, accounts=None if leases is None else list(leases))
        result.inventories = scanned.inventories
        result.failures = scanned.failures
        for inventory in scanned.inventories:
            lease = None if leases is None else leases.get(inventory.account_id)
            if lease is None or dry_run:
                continue
            try:
                self.store.scan_finished(lease)
            except RotatorError as exc:  # LeaseLost: another daemon holds the account now
                _log.warning("scan.not_recorded", account=inventory.account_id, error=str(exc))
        if self.metrics is not None:
            self.metrics.observe_scan_duration((self.now() - started).total_seconds())
            self.metrics.observe_scan(result.inventories, self.now())
        rules = Rules.from_settings(self.settings)
        for inventory in result.inventories:
            result.proposals.extend(propose(inventory.decisions, rules))
        if dry_run:
            # What the real pass would do, chosen by its own code, with no write at all.
            for p in result.proposals:
                why_not = self.held_back(p, scanned_at=started)
                if why_not is None:
                    result.would_open.append(p)
                    continue
                if p.leaked:  # the real pass contains it and escalates that rotation
                    why_not += ": the pass contains the key and that rotation replaces it"
                result.held_back.append((p, why_not))
            result.deactivated = self.deactivate_unused(result.inventories, rules, dry_run=True)
            result.deleted = self.delete_idle_inactive(result.inventories, dry_run=True)
            result.would_rotate_console = [
                d
                for inventory in result.inventories
                for d in console_to_rotate(inventory.console)
                if not self.console_held_back(
                    d.user.account_id, d.user.user_name, RotationReason.AGE, scanned_at=started
                )
            ]
            return result
        # Containment needs IAM only and comes first, for every leaked key, whatever
        # else is going on; the replacements follow and wait for Vault if need be.
        contained = self.contain_leaked(result.inventories)
        opened: dict[str, Rotation] = {}
        for account_id, user_name, key_id, why in contained:
            try:
                rotation = self.replace_leaked(account_id, user_name, key_id, why)
            except RotatorError as exc:
                _log.error("leak.replace_failed", user=user_name, key_id=key_id, error=str(exc))
                continue
            opened[rotation.id] = rotation
        result.opened = list(opened.values())
        # IAM only as well, so neither waits for Vault; before any rotation opens, so
        # that a slot an unused key held is free for it.
        result.deactivated = self.deactivate_unused(result.inventories, rules)
        result.deleted = self.delete_idle_inactive(result.inventories)
        # Owners hear of what is coming whether or not Vault is usable today.
        result.digests = self.warn_owners(
            result.inventories,
            rules,
            result.deactivated,
            slot_takers={
                (p.account_id, p.user_name): p.old_key_id
                for p in result.proposals
                if not p.leaked and p.old_key_id is not None
            },
        )
        # A Vault that cannot be used stops the other rotations before any opens; the
        # pass itself goes on (containment is done, open rotations wait by themselves).
        try:
            self.secrets.check()
        except RotatorError as exc:
            _log.error("scan.vault_unusable", error=str(exc), contained=len(contained))
            result.vault_error = exc
            return result
        result.opened += self.open_rotations(
            (p for p in result.proposals if not p.leaked), scanned_at=started
        )
        result.opened += self.open_console_rotations(result.inventories, scanned_at=started)
        return result

    def open_console_rotations(
        self, inventories: Iterable[Inventory], *, scanned_at: datetime
    ) -> list[Rotation]:
        """Open a rotation for each console password the scan found older than its
        rule's `password_max_age` under `console: rotate`. One user's failure never
        stops another's."""
        opened: list[Rotation] = []
        for inventory in inventories:
            for d in console_to_rotate(inventory.console):
                account, user = d.user.account_id, d.user.user_name
                try:
                    rotation = self.open_console_rotation(
                        account,
                        user,
                        RotationReason.AGE,
                        f"scan: {d.reason}",
                        scanned_at=scanned_at,
                    )
                except RotatorError as exc:
                    _log.error("console.open_failed", account=account, user=user, error=str(exc))
                    continue
                if rotation is not None:
                    opened.append(rotation)
        return opened

    def warn_owners(
        self,
        inventories: Iterable[Inventory],
        rules: Rules,
        deactivated: Sequence[KeyDecision] = (),
        *,
        slot_takers: Mapping[tuple[str, str], str] | None = None,
    ) -> list[Digest]:
        """Send each owner one digest of their keys that reach a `notify.warn_before`
        stage now, each stage once per key (the state store remembers, across restarts
        and daemons), and of their keys this pass has just `deactivated` as unused (with
        the command that turns one back on). A stage is recorded once its digest is
        handed to the notifier,
        whose thread sends and retries it. Keys with no owner and no
        `notify.fallback_owner` are logged and skipped. Returns the digests handed on."""
        notify = self.settings.notify
        now = self.now()
        warnings: list[Warning] = deactivation_notices(
            deactivated, now, slot_takers, self.settings.policy.inactive_min_idle
        )
        decisions: list[KeyDecision | ConsoleDecision] = list(deactivated)
        for inventory in inventories:
            account = inventory.account_id
            try:
                found = self._with_key_ids(inventory.decisions, rules, now)
                ids = [d.key.access_key_id for d in found if d.key.access_key_id]
                ids += [console_warning_id(d.user.user_name) for d in inventory.console]
                sent = self.store.warning_stages_sent(account, ids)
            except RotatorError as exc:
                _log.error("owners.warn_failed", account=account, error=str(exc))
                continue
            decisions.extend(found)
            decisions.extend(inventory.console)
            warnings.extend(pending_warnings(found, rules, now, notify.warn_before, sent))
            warnings.extend(
                pending_console_warnings(inventory.console, now, notify.warn_before, sent)
            )
        digests, nobody = build_digests(
            decisions, warnings, notify.owner_tag, notify.fallback_owner
        )
        for w in nobody:
            _log.warning("owners.no_owner", account=w.account_id, user=w.user_name, key_id=w.key_id)
        handed: list[Digest] = []
        for digest in digests:
            key_ids = [w.key_id for w in digest.warnings]
            accepted = self._wiring.owner_notifier.warn_owner(
                digest.owner, digest.subject, digest.text, key_ids
            )
            if not accepted:
                _log.warning("owners.digest_not_sent", owner=digest.owner, keys=len(key_ids))
                continue
            handed.append(digest)
            for w in digest.warnings:
                try:
                    for stage in w.stages:
                        self.store.record_warning_stage(
                            w.account_id, w.user_name, w.key_id, stage, w.due_at
                        )
                except RotatorError as exc:  # warned again next scan: better than never
                    _log.error("owners.stage_not_recorded", key_id=w.key_id, error=str(exc))
            _log.info("owners.warned", owner=digest.owner, keys=len(key_ids))
        return handed

    def _with_key_ids(
        self, decisions: list[KeyDecision], rules: Rules, now: datetime
    ) -> list[KeyDecision]:
        """`decisions` with key ids for the users that have a key to warn about (the
        credential report names none): one `ListAccessKeys` per such user."""
        missing = users_missing_key_ids(decisions, rules, now, self.settings.notify.warn_before)
        listed = {}
        for account, user in sorted(missing):
            try:
                listed[(account, user)] = self.iam(account).list_access_keys(user)
            except NotFound:
                continue  # deleted since the scan
        return fill_key_ids(decisions, listed)

    def contain_leaked(self, inventories: Iterable[Inventory]) -> list[tuple[str, str, str, str]]:
        """Set every Active key the scan judged leaked Inactive now (IAM only); return
        (account, user, key id, why) of each. One user's failure never stops another's
        containment."""
        contained = []
        for inventory in inventories:
            for d in inventory.decisions:
                key_id = d.key.access_key_id
                if d.decision is not Decision.LEAKED or not d.key.active or key_id is None:
                    continue
                try:
                    self.contain(d.user.account_id, d.user.user_name, key_id, d.reason)
                except RotatorError as exc:
                    _log.error(
                        "leak.contain_failed", user=d.user.user_name, key_id=key_id, error=str(exc)
                    )
                    continue
                contained.append((d.user.account_id, d.user.user_name, key_id, d.reason))
        return contained

    def _tracked_keys(self) -> set[tuple[str, str]]:
        """(account, key id) of every key an open rotation tracks, old or new: a pass
        leaves those to their rotation."""
        tracked: set[tuple[str, str]] = set()
        for r in self.store.list_open():
            tracked.update((r.account_id, k) for k in (r.old_key_id, r.new_key_id) if k)
        return tracked

    def deactivate_unused(
        self, inventories: Iterable[Inventory], rules: Rules, *, dry_run: bool = False
    ) -> list[KeyDecision]:
        """Set Inactive every Active key the scan judged unused under a rule that says
        `unused_action: deactivate` (IAM only; no new key: nobody used this one). Before
        each, `GetAccessKeyLastUsed` looks again: the credential report may be hours old,
        and a key used since is left alone. A key an open rotation tracks is left to it.
        Returns the keys deactivated; one failure never stops the others. `dry_run`: the
        keys it would deactivate, chosen alike, with no IAM call (the re-check is left to
        the real pass)."""
        tracked = self._tracked_keys()
        done: list[KeyDecision] = []
        for inventory in inventories:
            for d in to_deactivate(inventory.decisions, rules):
                account, user, key_id = d.user.account_id, d.user.user_name, d.key.access_key_id
                assert key_id is not None
                log_ctx = {"account": account, "user": user, "key_id": key_id, "rule": d.rule}
                if (account, key_id) in tracked:
                    _log.info("key.unused_left_to_rotation", **log_ctx)
                    continue
                if dry_run:
                    done.append(d)
                    continue
                rule = rules.named(d.rule)
                assert rule.unused_after is not None
                try:
                    iam = self.iam(account)
                    last = iam.key_last_used(key_id).last_used_at
                    if last is not None and self.now() - last <= rule.unused_after:
                        _log.info("key.unused_used_since", last_used=last.isoformat(), **log_ctx)
                        continue
                    iam.set_key_status(user, key_id, KeyStatus.INACTIVE)
                except NotFound:
                    continue  # deleted since the scan: nothing to deactivate
                except RotatorError as exc:
                    _log.error("key.unused_deactivate_failed", error=str(exc), **log_ctx)
                    continue
                _log.warning("key.unused_deactivated", reason=d.reason, **log_ctx)
                done.append(d)
        return done

    def delete_idle_inactive(
        self, inventories: Iterable[Inventory], *, dry_run: bool = False
    ) -> list[KeyDecision]:
        """Delete every Inactive key idle longer than its rule's `inactive_delete_after`
        (`policy.inactive_delete_after`; off by default). IAM only. Each key's status is
        read again just before: one turned back on since the scan is left alone. A key an
        open rotation tracks is left to it. Returns the keys deleted. `dry_run`: the keys
        it would delete, chosen alike, with no IAM call (the re-read is left to the real
        pass)."""
        tracked = self._tracked_keys()
        done: list[KeyDecision] = []
        for inventory in inventories:
            for d in to_delete(inventory.decisions):
                account, user, key_id = d.user.account_id, d.user.user_name, d.key.access_key_id
                assert key_id is not None
                log_ctx = {"account": account, "user": user, "key_id": key_id, "rule": d.rule}
                if (account, key_id) in tracked:
                    _log.info("key.idle_left_to_rotation", **log_ctx)
                    continue
                if dry_run:
                    done.append(d)
                    continue
                try:
                    iam = self.iam(account)
                    # Re-read before deleting: a person may have turned it back on since
                    # the scan, and an Active key must never be deleted from under use.
                    now_keys = {k.access_key_id: k for k in iam.list_access_keys(user)}
                    current = now_keys.get(key_id)
                    if current is None:
                        continue
                    if current.active:
                        _log.info("key.idle_reactivated_since", **log_ctx)
                        continue
                    iam.delete_access_key(user, key_id)
                except NotFound:
                    continue
                except RotatorError as exc:
                    _log.error("key.idle_delete_failed", error=str(exc), **log_ctx)
                    continue
                _log.warning("key.idle_deleted", reason=d.reason, **log_ctx)
                done.append(d)
        return done

    def tick(self) -> list[Rotation]:
        """Advance every open rotation that is due now (a BLOCKED one every
        `blocked_recheck`: it resumes within minutes of an operator freeing a slot)."""
        now = self.now()
        due = [r.id for r in self.store.list_open() if r.is_due(now)]
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
        if result.vault_error is not None:
            # Every open rotation's next step needs Vault; the next pass advances them.
            return result
        # An operator ran this pass: a BLOCKED rotation looks now whether a slot is free.
        open_ids = (r.id for r in self.store.list_open())
        result.rotations = self.advance_all(open_ids, recheck_blocked=True)
        return result

    def force(self, request: ForcedRotation) -> Rotation:
        """Open a forced rotation for one user (incident response) and advance it; for a
        leak, also the console password reset it opened (`console_resets`)."""
        opened = self.open_forced(request)
        [advanced] = self.advance_all([opened.id])
        if request.leaked:
            self.console_resets([(opened.account_id, opened.user_name)])
        return advanced

    def console_resets(self, users: Iterable[tuple[str, str]]) -> list[Rotation]:
        """Advance now the console password rotations that leaks of these (account, user)
        opened (`leaks.reset_console_password`): an incident does not wait for the next
        pass. Returns them as they stand."""
        if not self.settings.leaks.reset_console_password:
            return []
        ids = []
        for account, user_name in dict.fromkeys(users):
            r = self.store.open_for(account, user_name, RotationKind.CONSOLE)
            if r is not None and r.reason is RotationReason.LEAKED:
                ids.append(r.id)
        return self.advance_all(ids) if ids else []

    def open_forced(self, request: ForcedRotation) -> Rotation:
        """Open (not advance) a forced rotation. Raises NotFound for an unknown user or
        key, RotationExists when the user already has an open rotation."""
        user_name, key_id, leaked = request.user_name, request.key_id, request.leaked
        reason = request.reason
        account = request.account_id or self.accounts()[0]
        iam = self.iam(account)
        if request.kind is RotationKind.CONSOLE:
            return self._open_forced_console(account, request)
        with urgent() if leaked else contextlib.nullcontext():
            keys = iam.list_access_keys(user_name)  # NotFound when IAM does not know the user
        if not leaked and not request.force:
            # A typo like `rotate break-glass-admin` must not go straight through.
            rules = Rules.from_settings(self.settings)
            exempt = exemption(iam.user_details(user_name), rules, self.now())
            if exempt is not None:
                raise BadInput(
                    f"user {user_name} is not rotated by policy ({exempt}); add --force "
                    '(HTTP: "force": true) to rotate it anyway'
                )
        if not leaked:
            # Checked before the keys are judged: mid-rotation a user has two active keys
            # (old and new), and "name the one to replace" would be the wrong answer.
            existing = self.store.open_for(account, user_name)
            if existing is not None:
                raise RotationExists(
                    f"user {user_name} in account {account} already has open rotation "
                    f"{existing.id} ({existing.state.value}); see `rotator status --user "
                    f"{user_name}`"
                )
        if key_id is not None and key_id not in {k.access_key_id for k in keys}:
            raise NotFound(f"user {user_name} has no key {key_id}")
        if key_id is None:
            active = [k for k in keys if k.status is KeyStatus.ACTIVE]
            if len(active) > 1:
                raise BadInput(
                    f"user {user_name} has two active keys: name the one to replace "
                    "(--key, or access_key_id)"
                )
            chosen = active or sorted(keys, key=lambda k: k.created_at)
            key_id = chosen[0].access_key_id if chosen else None
        if leaked:
            if key_id is None:
                raise BadInput(f"user {user_name} has no key that could have leaked")
            return self.report_leak(account, user_name, key_id, reason or "reported leaked")
        self.secrets.check()
        rotation = new_rotation(
            account,
            user_name,
            RotationReason.MANUAL,
            self.now(),
            old_key_id=key_id,
            note=reason,
            overlap=request.overlap,
        )
        return self._open(rotation, f"forced: {reason or 'no reason given'}")

    def _open_forced_console(self, account: str, request: ForcedRotation) -> Rotation:
        """Open a forced rotation of the user's console password. Refused (`BadInput`)
        for a user without console access unless `request.create`, and for an exempt
        user unless `request.force`; `NotFound` for an unknown user."""
        user_name, reason = request.user_name, request.reason
        iam = self.iam(account)
        user = iam.user_details(user_name)  # NotFound when IAM does not know the user
        if not request.force:
            exempt = exemption(user, Rules.from_settings(self.settings), self.now())
            if exempt is not None:
                raise BadInput(
                    f"user {user_name} is not rotated by policy ({exempt}); add --force "
                    "to rotate its console password anyway"
                )
        existing = self.store.open_for(account, user_name, RotationKind.CONSOLE)
        if existing is not None:
            raise RotationExists(
                f"user {user_name} in account {account} already has open console rotation "
                f"{existing.id} ({existing.state.value}); see `rotator status --user "
                f"{user_name}`"
            )
        has_console = iam.login_profile(user_name) is not None
        if not request.create and not has_console:
            raise BadInput(
                f"user {user_name} has no console access (no login profile); add --create "
                "to give it one (a new password in Vault, a reset required at first sign-in)"
            )
        if request.create and has_console:
            raise BadInput(
                f"user {user_name} has console access already; drop --create to rotate its password"
            )
        self.secrets.check()
        return self._open_console(
            account,
            user_name,
            RotationReason.MANUAL,
            reason,
            f"forced console password: {reason or 'no reason given'}",
            create_login=request.create,
        )

    def _open_console(
        self,
        account: str,
        user_name: str,
        reason: RotationReason,
        note: str | None,
        why: str,
        *,
        create_login: bool = False,
    ) -> Rotation:
        rotation = new_rotation(
            account,
            user_name,
            reason,
            self.now(),
            old_key_id=None,
            note=note,
            kind=RotationKind.CONSOLE,
            create_login=create_login,
        )
        return self._open(rotation, why)

    def open_console_rotation(
        self,
        account: str,
        user_name: str,
        reason: RotationReason,
        note: str,
        *,
        scanned_at: datetime | None = None,
    ) -> Rotation | None:
        """Open a rotation of the user's console password (a pass found it too old, or
        its key leaked). None when one is open already; for a pass also when the user's
        latest console rotation changed after `scanned_at` (another process acted on what
        the scan saw) or FAILED less than `retry_failed_after` ago (as `open_rotations`;
        a leak is never held back by an earlier failure)."""
        if self.console_held_back(account, user_name, reason, scanned_at=scanned_at):
            return None
        try:
            return self._open_console(account, user_name, reason, note, note)
        except RotationExists:
            return None  # another daemon opened it meanwhile

    def console_held_back(
        self,
        account: str,
        user_name: str,
        reason: RotationReason,
        *,
        scanned_at: datetime | None = None,
    ) -> str | None:
        """Why no console rotation opens for the user now (`open_console_rotation`), or
        None when one would."""
        kind = RotationKind.CONSOLE
        current = self.store.open_for(account, user_name, kind)
        if current is not None:
            return f"console rotation {current.id[:8]} is open ({current.state.value})"
        last = self.store.latest_for(account, user_name, kind)
        if last is not None and scanned_at is not None and last.updated_at > scanned_at:
            return f"console rotation {last.id[:8]} changed after the scan began"
        pause = self.settings.policy.retry_failed_after
        if (
            reason is not RotationReason.LEAKED
            and last is not None
            and last.state is State.FAILED
            and self.now() < last.updated_at + pause
        ):
            return (
                f"console rotation {last.id[:8]} FAILED less than retry_failed_after "
                f"({format_duration(pause)}) ago"
            )
        return None

    def reactivate(
        self, user_name: str, key_id: str, *, account_id: str | None = None, reason: str
    ) -> Rotation | None:
        """Set a key Active again (IAM only; e.g. one deactivated as unused) and record it
        as a closed rotation (`ROLLED_BACK`, the key as its old key), so that the key's
        idle clock restarts now and the next pass does not switch it off again at once.
        None when the key was Active already (nothing changed, nothing recorded).

        Refused (`BadInput`) for a key the rotator contained as leaked (a leak rotation
        names it) and for a key an open rotation tracks (`rollback` is its lever);
        `NotFound` for an unknown user or key."""
        account = account_id or self.accounts()[0]
        iam = self.iam(account)
        keys = {k.access_key_id: k for k in iam.list_access_keys(user_name)}
        if key_id not in keys:
            raise NotFound(f"user {user_name} in account {account} has no key {key_id}")
        history = [
            r
            for r in self.store.list_recent(limit=_HISTORY, user_name=user_name)
            if r.account_id == account
        ]
        for r in history:
            if r.leaked and r.old_key_id == key_id:
                raise BadInput(
                    f"key {key_id} of {user_name} was contained as leaked (rotation {r.id}, "
                    f"{r.state.value}): the rotator never turns a leaked key back on; the "
                    f"user's working key is the one that rotation issues (`rotator status "
                    f"--user {user_name}`)"
                )
        if keys[key_id].active:
            _log.info("key.reactivate_noop", user=user_name, key_id=key_id)
            return None
        for r in history:
            if r.state in OPEN and key_id in (r.old_key_id, r.new_key_id):
                raise BadInput(
                    f"key {key_id} of {user_name} belongs to open rotation {r.id} "
                    f"({r.state.value}); `{suggested('rollback', user_name)}` turns a rotation's "
                    "old key back on"
                )
        iam.set_key_status(user_name, key_id, KeyStatus.ACTIVE)
        _log.warning("key.reactivated", user=user_name, key_id=key_id, reason=reason)
        opened = new_rotation(
            account,
            user_name,
            RotationReason.MANUAL,
            self.now(),
            old_key_id=key_id,
            note=f"reactivated by an operator: {reason}",
        )
        # Recorded closed: no rotation runs, the record is the key's history.
        record = replace(opened, state=State.ROLLED_BACK)
        return self.store.create(
            record, f"reactivate: key {key_id} set Active again by an operator ({reason})"
        )

    # --- leaks ----------------------------------------------------------------------

    def contain(self, account_id: str, user_name: str, key_id: str, reason: str) -> bool:
        """Set a leaked key Inactive now: one IAM call, no lease, no Vault, no state store
        (deactivating is idempotent, and the rotator never turns a leaked key back on).
        False when the key no longer exists: nothing to contain."""
        self._leak_pending((account_id, key_id), True)
        try:
            with urgent():  # ahead of every scan and replacement call queued for IAM
                self.iam(account_id).set_key_status(user_name, key_id, KeyStatus.INACTIVE)
        except NotFound:
            self._leak_pending((account_id, key_id), False)
            _log.warning("leak.nothing_to_contain", user=user_name, key_id=key_id, reason=reason)
            return False
        self._leak_pending((account_id, key_id), False)
        _log.warning("leak.contained", user=user_name, key_id=key_id, reason=reason)
        if self.metrics is not None:
            self.metrics.observe_contained(account_id)
        return True

    def _leak_pending(self, key: tuple[str, str], pending: bool) -> None:
        """Track leaked keys whose containment has not succeeded yet (a failed attempt
        leaves its key here until a later one succeeds), for the metrics: a leaked key
        still Active minutes after detection is what the fleet must be alerted on."""
        with self._leak_lock:
            if pending:
                self._leaks_pending.setdefault(key, self.now())
            else:
                self._leaks_pending.pop(key, None)
            if self.metrics is not None:
                self.metrics.observe_leaks_active(self._leaks_pending)

    def report_leak(self, account_id: str, user_name: str, key_id: str, reason: str) -> Rotation:
        """Contain a leaked key now, then open a leak rotation to replace it (or turn the
        user's open rotation into one). Returns the rotation to advance."""
        self.contain(account_id, user_name, key_id, reason)
        return self.replace_leaked(account_id, user_name, key_id, reason)

    def replace_leaked(self, account_id: str, user_name: str, key_id: str, reason: str) -> Rotation:
        """The rotation that replaces a contained key: the user's open rotation, turned
        into a leak rotation whatever its state, or a new one. With
        `leaks.reset_console_password` the user's console password is rotated too."""
        replacing = self._replace_leaked_key(account_id, user_name, key_id, reason)
        if self.settings.leaks.reset_console_password:
            self._reset_console_after_leak(account_id, user_name, key_id)
        return replacing

    def _reset_console_after_leak(self, account_id: str, user_name: str, key_id: str) -> None:
        """Open a rotation of the console password of a user whose key leaked (the same
        person or host may hold both), when the user has console access. The key is
        contained already; a failure here is logged and never undoes that."""
        try:
            if self.iam(account_id).login_profile(user_name) is None:
                return
            opened = self.open_console_rotation(
                account_id,
                user_name,
                RotationReason.LEAKED,
                f"key {key_id} leaked: console password reset (leaks.reset_console_password)",
            )
        except RotatorError as exc:
            _log.error("leak.console_reset_failed", user=user_name, key_id=key_id, error=str(exc))
            return
        if opened is None:
            # The rotation already open goes on; it sets a password made after the leak
            # only if it has not stored one yet. Said, so nobody assumes a reset.
            _log.warning(
                "leak.console_reset_not_opened",
                user=user_name,
                key_id=key_id,
                why="a console rotation of this user is open already",
            )
            return
        _log.warning("leak.console_reset_opened", user=user_name, rotation_id=opened.id)

    def _replace_leaked_key(
        self, account_id: str, user_name: str, key_id: str, reason: str
    ) -> Rotation:
        existing = self.store.open_for(account_id, user_name)
        if existing is not None:
            try:
                escalated = self.engine.escalate(existing, key_id, reason)
            except Transient:
                # Another process is advancing it this very moment; the key is already
                # off, and that process's next step re-reads the keys.
                return existing
            if escalated.state is not State.CANCELLED:
                return escalated
        rotation = new_rotation(
            account_id,
            user_name,
            RotationReason.LEAKED,
            self.now(),
            old_key_id=key_id,
            leaked=True,
            note=reason,
        )
        return self._open(rotation, f"leaked: {reason}")

    def open_for_event(self, event: LeakEvent) -> EventResult:
        """Contain every key an AWS Health event names, each on its own, and open (or
        escalate) the rotation that replaces it. A key that belongs to no user, or no
        longer exists, is "nothing to contain" and the others proceed; a key this event
        was already handled for is skipped (EventBridge delivers at least once). A
        backend failure on one key is raised only after every other key was handled."""
        accounts = self.accounts()
        account = event.account_id or accounts[0]
        if account not in accounts:
            raise BadInput(f"the event is about account {account}, which is not configured")
        iam = self.iam(account)
        result = EventResult(notes=list(event.skipped), keys=len(event.keys))
        failure: RotatorError | None = None
        for leaked in event.keys:
            key_id = leaked.key_id
            if event.event_id and self.store.leak_report_seen(event.event_id, key_id):
                result.notes.append(f"key {key_id}: handled already for this event")
                result.duplicates += 1
                continue
            try:
                with urgent():
                    owner = leaked.user_name or iam.key_last_used(key_id).user_name
                if not owner:
                    outcome = (
                        f"key {key_id}: belongs to no IAM user in {account}: nothing to contain"
                    )
                    result.notes.append(outcome)
                else:
                    # report_leak, counting the keys actually set Inactive.
                    if self.contain(account, owner, key_id, event.reason):
                        result.contained += 1
                    result.rotations.append(
                        self.replace_leaked(account, owner, key_id, event.reason)
                    )
                    outcome = f"key {key_id} of {owner}: contained"
            except NotFound as exc:
                outcome = f"key {key_id}: {exc}: nothing to contain"
                result.notes.append(outcome)
                owner = None
            except RotatorError as exc:
                _log.error("leaks.key_failed", key_id=key_id, error=str(exc))
                failure = failure or exc
                continue
            if event.event_id:
                self.store.add_leak_report(event.event_id, key_id, account, owner, outcome)
        for note in result.notes:
            _log.warning("leaks.note", event_id=event.event_id, note=note)
        if failure is not None:
            raise failure
        return result

    def handle_event(self, raw: bytes | str, *, source: str = "file") -> EventResult:
        """Parse an AWS Health event, contain every key it names, then replace them (the
        replacements wait for Vault when it cannot be used; containment never does)."""
        try:
            event = parse_event(raw)
            result = self.open_for_event(event)
        except BadInput:
            self._count_leak_event(source, "rejected")
            raise
        except RotatorError:
            self._count_leak_event(source, "retry")
            raise
        self._count_leak_event(source, result.outcome)
        result.rotations = self.advance_all(r.id for r in result.rotations)
        result.rotations += self.console_resets(
            (r.account_id, r.user_name) for r in result.rotations
        )
        return result

    def _count_leak_event(self, source: str, result: LeakEventResult) -> None:
        if self.metrics is not None:
            self.metrics.observe_leak_event(source, result)

    def poll_leak_queue(
        self,
        wait_seconds: int = 5,
        *,
        advance: Callable[[list[str]], None] | None = None,
    ) -> int:
        """One long poll of the leak queue (`leaks.sqs_queue_url`). A message is deleted
        only after its rotations are durably recorded; one that cannot be parsed is kept
        in the state store and then deleted (never retried forever, never dropped
        silently); a transient failure leaves it to come back after a pause. Returns
        messages handled."""
        queue = self._wiring.queue
        if queue is None:
            return 0
        handled = 0
        opened: list[Rotation] = []
        for message in queue.receive(wait_seconds=wait_seconds):
            try:
                event = parse_event(message.body)
            except BadInput as exc:
                self.store.add_dead_letter("sqs", message.message_id, str(exc), message.body)
                _log.error("leaks.unparseable", message_id=message.message_id, error=str(exc))
                queue.delete(message)
                self._count_leak_event("sqs", "rejected")
                continue
            try:
                result = self.open_for_event(event)
            except BadInput as exc:
                self.store.add_dead_letter("sqs", message.message_id, str(exc), message.body)
                _log.error("leaks.rejected", message_id=message.message_id, error=str(exc))
                queue.delete(message)
                self._count_leak_event("sqs", "rejected")
                continue
            except RotatorError as exc:
                pause = min(30 * message.receive_count, 900)
                _log.warning(
                    "leaks.retry", message_id=message.message_id, error=str(exc), retry_in=pause
                )
                queue.postpone(message, pause)
                self._count_leak_event("sqs", "retry")
                continue
            queue.delete(message)  # the rotations are in the state store now
            handled += 1
            self._count_leak_event("sqs", result.outcome)
            _log.info(
                "leaks.event",
                message_id=message.message_id,
                code=event.event_code,
                outcome=result.outcome,
                rotations=[r.id for r in result.rotations],
            )
            opened.extend(result.rotations)
        # Every key of the batch is contained before any replacement starts: a
        # replacement needs Vault and may take long, a containment must not wait for it.
        if opened and advance is not None:
            advance([r.id for r in opened])  # elsewhere: the next poll need not wait
        elif opened:
            self.advance_all(r.id for r in opened)
        return handled
