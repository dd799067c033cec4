"""`rotator daemon`: one process that scans, ticks, polls the leak queue, serves HTTP,
talks to systemd and handles signals.

The only module that imports APScheduler. Everything runs in this process, on one
`App` and the `Wiring` of adapters it receives, built from the settings (rebuilt on
SIGHUP):

  - `scan` on `schedule.scan` (cron or interval, with jitter) scans the accounts whose
    scan lease this daemon holds, contains leaked keys and opens rotations, which then
    advance on a small pool of their own (as leak replacements do) so that the next scan
    never waits for them; after it, memory the scan allocated is given back to the
    operating system (`rotator.memory`);
  - `tick` on `schedule.tick` advances open rotations whose next step is due (most
    ticks cost one state-store read);
  - both run in APScheduler's thread pool with max_instances=1 and coalescing, so a
    slow pass never piles up;
  - with `leaks.sqs_queue_url` set, one supervised thread long-polls the queue for as
    long as the daemon runs; a failure is logged and retried with a growing pause;
  - HTTP triggers open their rotation in the request (202 as soon as it is recorded)
    and advance it on a bounded pool: at most TRIGGER_WORKERS at once, a further
    request waits up to TRIGGER_WAIT seconds for a slot, then gets 503.

Vault is never waited for: containing a leaked key needs IAM only. The daemon is ready
once the state store and AWS answer; while Vault cannot be used, scans and the leak-queue
poller still contain every leaked key, every other rotation waits for Vault, and
`/readyz` answers 200 with status "degraded" naming why. A background check looks at
Vault every VAULT_CHECK_EVERY seconds, so a probe never waits for a slow Vault.

Signals: SIGTERM/SIGINT let every running step finish, then the daemon exits 0. SIGHUP
re-reads the configuration; an invalid file is reported and the old settings stay. A
failing scan is logged and retried at the next slot: an outage of AWS or Vault never
kills the process.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor as TriggerPool
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from rotator import log
from rotator.app import App, PassResult
from rotator.backoff import retry_pause
from rotator.config import Settings
from rotator.cron import Schedule
from rotator.errors import BackendUnavailable, ConfigError, RotatorError, Transient
from rotator.http import Server, read_token
from rotator.memory import give_back
from rotator.metrics import CONTENT_TYPE_LATEST, Metrics
from rotator.model import Decision, ForcedRotation, Rotation, ScanLease
from rotator.render import rotation_json
from rotator.systemd import SystemdNotify
from rotator.wiring import Wiring

_log = log.get_logger("rotator.daemon")

STOP_TIMEOUT = 8.0  # seconds running steps may take to finish after SIGTERM
# At most this many triggered rotations advance at once; a further request waits for a
# slot up to TRIGGER_WAIT seconds, then gets 503. A burst of triggers stays bounded.
TRIGGER_WORKERS = 4
TRIGGER_WAIT = 30.0
VAULT_CHECK_EVERY = 10.0  # seconds between two background looks at Vault
STATE_CHECK_EVERY = 5.0  # seconds between two background looks at the state store
# A daemon holds each account it scans for this many ticks (renewed every tick): after it
# dies, another daemon sharing the state store scans the account within that time.
SCAN_LEASE_TICKS = 3
SCAN_LEASE_MIN = timedelta(seconds=30)
# Seconds one SQS long poll waits for a message. A stop waits for the poll in flight
# (see `_replace_later`), so SIGTERM may take this long when the queue is idle.
LEAK_POLL_WAIT = 5
LEAK_RETRY_CAP = 60.0  # the longest pause after the leak queue failed
BACKEND_RETRY_CAP = 30.0  # the longest pause between two looks at the backends at start

AppFactory = Callable[[Settings, Metrics, threading.Event], App]


def build_app(settings: Settings, metrics: Metrics, stopping: threading.Event) -> App:
    """The service on adapters built from `settings`, each once, shared by every thread."""
    return App(settings, wiring=Wiring(settings, metrics=metrics), stopping=stopping)


def scan_trigger(schedule: Schedule) -> Any:
    """An APScheduler trigger for `schedule.scan`, with jitter so that many rotators
    do not hit IAM in the same second."""
    if schedule.interval is not None:
        seconds = schedule.interval.total_seconds()
        return IntervalTrigger(seconds=seconds, jitter=min(seconds * 0.1, 300.0), timezone=UTC)
    return CronTrigger(**schedule.cron_fields(), timezone=UTC, jitter=30)


def scan_period(schedule: Schedule, now: datetime) -> timedelta:
    """The time between two scans (for a cron schedule: the next two fire times)."""
    if schedule.interval is not None:
        return schedule.interval
    trigger = CronTrigger(**schedule.cron_fields(), timezone=UTC)
    first = trigger.get_next_fire_time(None, now)
    second = trigger.get_next_fire_time(first, first + timedelta(seconds=1)) if first else None
    if first is None or second is None:
        return timedelta(days=1)
    period: timedelta = second - first
    return period


class Daemon:
    def __init__(
        self,
        load: Callable[[], Settings],
        *,
        systemd: SystemdNotify | None = None,
        app_factory: AppFactory = build_app,
    ) -> None:
        self._load = load
        self._app_factory = app_factory
        self._systemd = systemd or SystemdNotify()
        self.metrics = Metrics()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._reload_requested = False
        self._lock = threading.Lock()
        self._last_scan_ok: datetime | None = None
        self._last_scan_error: str | None = None
        # "ok", or why Vault cannot be used, as the background check or the last scan
        # found (a scan sees a refused token or a missing mount too).
        self._vault: str = "not checked yet"
        # "ok", or why the state store cannot be used: while it cannot, the daemon makes
        # no side effect at all (every pass starts by reading it) and is not ready.
        self._state: str = "not checked yet"
        # The accounts whose scan lease this daemon holds, and when any daemon last
        # finished a scan of each account (the store's record), as the last tick saw.
        self._held: dict[str, ScanLease] = {}
        self._fleet_scans: dict[str, datetime | None] = {}
        self.settings = load()
        self._token = self._read_token(self.settings)
        self._app = app_factory(self.settings, self.metrics, self._stopping)
        self._retired: list[App] = []  # replaced on reload; closed at shutdown
        self._trigger_slots = threading.BoundedSemaphore(TRIGGER_WORKERS)
        self._triggers = TriggerPool(TRIGGER_WORKERS, thread_name_prefix="rotator-trigger")
        self._advancing = TriggerPool(2, thread_name_prefix="rotator-advance")
        self._threads: dict[str, threading.Thread] = {}
        self._scheduler: Any = None
        self._server: Server | None = None

    @staticmethod
    def _read_token(settings: Settings) -> str | None:
        path = settings.http.trigger_token_file
        if path is None:
            return None
        try:
            return read_token(Path(path))
        except OSError as exc:
            raise ConfigError(
                [f"http.trigger_token_file: cannot read {path}: {exc.strerror}"]
            ) from exc
        except RotatorError as exc:
            raise ConfigError([f"http.trigger_token_file: {exc}"]) from exc

    @property
    def app(self) -> App:
        """The service the jobs run on (replaced, not changed, on reload)."""
        with self._lock:
            return self._app

    # --- main loop ----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit code."""
        self._install_signals()
        # Looked at before the first probe can come: /readyz never says "not checked".
        self._check_state()
        http = self.settings.http
        self._server = Server(http.host, http.port, self, token=lambda: self._token).start()
        host, port = self._server.address
        _log.info("daemon.listening", address=f"{host}:{port}", trigger=self._token is not None)
        try:
            if not self._wait_for_backends():
                return 0
            self._start_threads()
            self._start_scheduler()
            degraded = None if self._vault == "ok" else self._vault
            self._systemd.ready(
                "ready; first scan running"
                if degraded is None
                else f"ready, degraded: Vault cannot be used ({degraded}); first scan running"
            )
            self.metrics.ready(True)
            _log.info("daemon.ready", scan=self.settings.schedule.scan)
            self._loop()
        finally:
            self._shutdown()
        return 0

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def close(self) -> None:
        """Release what the daemon holds (its apps' clients and state store)."""
        with self._lock:
            apps, self._retired = [self._app, *self._retired], []
        for app in apps:
            app.close()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.stop()

        def on_reload(signum: int, frame: FrameType | None) -> None:
            self._reload_requested = True
            self._wake.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    def _loop(self) -> None:
        interval = self._systemd.watchdog_interval or 5.0
        while not self._stopping.is_set():
            self._wake.wait(timeout=interval)
            self._wake.clear()
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            self._start_threads()  # a supervised thread that died starts again
            if self._scheduler is not None and self._scheduler.running:
                # Only a live scheduler earns a watchdog ping.
                self._systemd.watchdog()

    def _wait_for_backends(self) -> bool:
        """READY only once the state store and AWS answered. Retries (with a growing
        pause) until they do or a stop signal arrives. Vault is not waited for: a Vault
        that cannot be used makes the daemon degraded (leaked keys are still contained),
        not unready."""
        failures = 0
        while not self._stopping.is_set():
            app = self.app
            self._check_state()
            try:
                if self._state != "ok":
                    raise BackendUnavailable(self._state)
                accounts = app.accounts()
            except RotatorError as exc:
                if self._stopping.is_set():
                    break
                failures += 1
                pause = retry_pause(failures, base=1.0, cap=BACKEND_RETRY_CAP)
                _log.warning("daemon.backend_unavailable", error=str(exc), retry_in=pause)
                self._systemd.status(f"waiting for backends: {exc}")
                self._stopping.wait(pause)
                continue
            self.metrics.backend("aws", True)
            self.metrics.observe_accounts(accounts)
            self._check_vault()
            _log.info("daemon.backends_ok", accounts=accounts, vault=self._vault)
            if self._vault != "ok":
                self._vault_unusable(
                    self._vault,
                    "starting degraded: scans and the leak queue still contain leaked "
                    "keys (IAM only); every other rotation waits for Vault",
                )
            return True
        return False

    def _start_scheduler(self) -> None:
        settings = self.settings
        scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(max_workers=2)},
            job_defaults={"coalesce": True, "max_instances": 1},
        )
        period = scan_period(settings.schedule.scan_schedule, datetime.now(UTC))
        self.metrics.observe_scan_period(period.total_seconds())
        scheduler.add_job(
            self.scan_job,
            scan_trigger(settings.schedule.scan_schedule),
            id="scan",
            name="scan",
            next_run_time=datetime.now(UTC),
            misfire_grace_time=max(1, int(period.total_seconds() / 2)),
        )
        tick = settings.schedule.tick.total_seconds()
        scheduler.add_job(
            self.tick_job,
            IntervalTrigger(seconds=tick, timezone=UTC),
            id="tick",
            name="tick",
            misfire_grace_time=max(1, int(tick)),
        )
        scheduler.start()
        self._scheduler = scheduler

    def _start_threads(self) -> None:
        """Start (or start again) the long-running threads: the Vault check and the
        leak-queue poller. Each catches its own failures; a thread found dead here
        (which would be a bug) is logged and replaced."""
        threads = (("backend-check", self._backend_loop), ("leak-poller", self._leak_loop))
        for name, target in threads:
            thread = self._threads.get(name)
            if thread is not None and thread.is_alive():
                continue
            if thread is not None:
                _log.error("daemon.thread_restarted", thread=name)
            if self._stopping.is_set():
                return
            thread = threading.Thread(target=target, name=f"rotator-{name}", daemon=True)
            self._threads[name] = thread
            thread.start()

    def _shutdown(self) -> None:
        self._stopping.set()
        self._systemd.stopping()
        self.metrics.ready(False)
        _log.info("daemon.stopping")
        deadline = time.monotonic() + STOP_TIMEOUT
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        self._triggers.shutdown(wait=True)
        self._advancing.shutdown(wait=True)
        self._release_scan_leases()
        for thread in self._threads.values():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                _log.error("daemon.stop_timeout", thread=thread.name, waited=STOP_TIMEOUT)
        if self._server is not None:
            self._server.stop()
        self.close()
        _log.info("daemon.stopped")

    # --- jobs ---------------------------------------------------------------------------

    def scan_job(self) -> None:
        """Scan, contain, open; then advance what is due (unless Vault cannot be used:
        every step left needs it) and give the scan's memory back."""
        started = time.monotonic()
        app = self.app
        if not self._state_usable("scan"):
            return
        try:
            leases = self._hold_scan_leases(app)
            if not leases:
                _log.info("daemon.scan_skipped", reason="other daemons hold every account")
                self._tick(app)
                return
            result = app.scan_and_open(leases=leases)
        except RotatorError as exc:
            if not self._stopping.is_set():
                self._scan_failed(str(exc))
            return
        except Exception as exc:  # a bug: say so, keep the daemon up
            _log.exception("daemon.scan_crashed")
            self._scan_failed(type(exc).__name__)
            return
        finally:
            give_back()
        if result.vault_error is None:
            self._vault = "ok"
            # What the scan opened advances on a pool of its own, now: the scan job ends,
            # so the next scheduled scan is never skipped behind long rotations (the
            # rotation leases keep the tick from advancing the same ones at once).
            if result.opened:
                self._advancing.submit(app.advance_all, [r.id for r in result.opened])
        else:
            self._vault = str(result.vault_error)
        self._scan_done(result, time.monotonic() - started)

    def _scan_done(self, result: PassResult, seconds: float) -> None:
        # A scan that could not use Vault still contained every leaked key: for leak
        # detection it succeeded.
        self._last_scan_ok = datetime.now(UTC)
        self._last_scan_error = None
        self.metrics.backend("aws", True)  # at least one account answered
        decisions = Counter(d.decision for inv in result.inventories for d in inv.decisions)
        summary = ", ".join(
            f"{decisions.get(k, 0)} {k.value}"
            for k in (Decision.LEAKED, Decision.BLOCKED, Decision.ROTATE, Decision.WARN)
        )
        text = (
            f"last scan {self._last_scan_ok.isoformat(timespec='seconds')}: "
            f"{sum(decisions.values())} keys ({summary}); opened {len(result.opened)}"
        )
        if result.failures:
            text += f"; failed accounts: {', '.join(sorted(result.failures))}"
            for account, why in sorted(result.failures.items()):
                _log.error("daemon.account_failed", account=account, error=why)
        if result.vault_error is not None:
            text += (
                f"; DEGRADED: Vault cannot be used ({result.vault_error}): leaked keys were "
                "contained, every other rotation waits for Vault"
            )
            self._vault_unusable(
                str(result.vault_error),
                "leaked keys were contained (IAM only); every other rotation waits for Vault",
            )
        _log.info(
            "daemon.scan_done",
            keys=sum(decisions.values()),
            opened=len(result.opened),
            failed_accounts=sorted(result.failures),
            vault=self._vault,
            seconds=round(seconds, 3),
        )
        self._systemd.status(text)

    @staticmethod
    def _vault_unusable(error: str, detail: str) -> None:
        _log.error("daemon.vault_unusable", error=error, detail=detail)

    def _scan_failed(self, error: str) -> None:
        self._last_scan_error = error
        self.metrics.scan_failed()
        self.metrics.backend("aws", False)  # no account answered
        _log.error("daemon.scan_failed", error=error)
        self._systemd.status(f"last scan failed: {error}")

    def tick_job(self) -> None:
        """Renew the scan leases this daemon holds (take over those of a daemon that
        died, scanning at once what it left unscanned), then advance what is due; most
        ticks cost one state-store read and one lease write per account."""
        app = self.app
        if not self._state_usable("tick"):
            return
        try:
            before = set(self._held)
            held = self._hold_scan_leases(app)
            if self._missed_scan(set(held) - before):
                self._scan_now()
            self._tick(app)
        except RotatorError as exc:
            if not self._stopping.is_set():
                _log.error("daemon.tick_failed", error=str(exc))
        except Exception:  # a bug: say so, keep the daemon up
            _log.exception("daemon.tick_crashed")

    def _tick(self, app: App) -> None:
        rotations = app.store.list_open()
        self.metrics.observe_open(rotations)
        if self._any_due(rotations):
            app.tick()

    # --- scan leases --------------------------------------------------------------------

    def _scan_lease_ttl(self) -> timedelta:
        return max(SCAN_LEASE_TICKS * self.settings.schedule.tick, SCAN_LEASE_MIN)

    def _hold_scan_leases(self, app: App) -> dict[str, ScanLease]:
        held = app.hold_scan_leases(self._scan_lease_ttl())
        gained, lost = set(held) - set(self._held), set(self._held) - set(held)
        if gained or lost:
            _log.info(
                "daemon.scan_leases", held=sorted(held), gained=sorted(gained), lost=sorted(lost)
            )
        self._held = held
        self._fleet_scans = {
            lease.account_id: lease.last_scan_at for lease in app.store.scan_leases()
        }
        return held

    def _missed_scan(self, gained: set[str]) -> bool:
        """Whether an account this daemon just took over was not scanned within the
        last period (its previous holder died before its scan)."""
        now = datetime.now(UTC)
        period = scan_period(self.settings.schedule.scan_schedule, now)
        return any(
            (last := self._fleet_scans.get(account)) is None or now - last > period
            for account in gained
        )

    def _scan_now(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            _log.info("daemon.scan_catch_up", reason="took over an account not scanned this period")
            self._scheduler.modify_job("scan", next_run_time=datetime.now(UTC))

    def _release_scan_leases(self) -> None:
        held, self._held = self._held, {}
        if not held:
            return
        try:
            self.app.release_scan_leases(held)
        except RotatorError as exc:  # they expire by themselves
            _log.warning("daemon.scan_leases_not_released", error=str(exc))

    @staticmethod
    def _any_due(rotations: Iterable[Rotation]) -> bool:
        now = datetime.now(UTC)
        return any(r.is_due(now) for r in rotations)

    def _leak_loop(self) -> None:
        """Long-poll the leak queue for as long as the daemon runs. Every failure is
        logged and retried after a growing pause; nothing a message holds stops it."""
        failures = 0
        while not self._stopping.is_set():
            app = self.app
            if app.settings.leaks.sqs_queue_url is None or self._state != "ok":
                # A reload may configure a queue. While the state store is away no
                # message is taken: each receive would count towards the queue's
                # redrive limit, and a leak event must not reach its dead-letter queue.
                self._stopping.wait(LEAK_POLL_WAIT)
                continue
            try:
                app.poll_leak_queue(
                    wait_seconds=LEAK_POLL_WAIT, advance=partial(self._replace_later, app)
                )
                failures = 0
                continue
            except RotatorError as exc:
                failures += 1
                pause = retry_pause(failures, base=1.0, cap=LEAK_RETRY_CAP)
                _log.error("daemon.leak_queue_failed", error=str(exc), retry_in=pause)
            except Exception:  # a bug: say so, keep polling
                failures += 1
                pause = retry_pause(failures, base=1.0, cap=LEAK_RETRY_CAP)
                _log.exception("daemon.leak_queue_crashed", retry_in=pause)
            self._stopping.wait(pause)

    def _replace_later(self, app: App, rotation_ids: list[str]) -> None:
        """Advance leak replacements on their own pool: the poller goes back to the
        queue at once, so the next leak's containment never waits for a replacement
        (which needs Vault and may wait for IAM to accept the new key).

        A stopping daemon still finishes the long poll in flight (SQS may hand it a
        message, which would stay invisible for the queue's visibility timeout if
        nobody read the answer), after its pools were shut down: what that poll brings
        is contained and recorded, and its replacements are left to the next pass of
        this daemon or another, like any open rotation."""
        try:
            self._advancing.submit(app.advance_all, rotation_ids)
        except RuntimeError:  # the pool was shut down: only a stopping daemon does that
            if not self._stopping.is_set():
                raise
            _log.info(
                "daemon.replacement_deferred",
                rotation_ids=rotation_ids,
                detail="stopping: the next pass replaces the contained keys",
            )

    def _backend_loop(self) -> None:
        """Look at the state store every STATE_CHECK_EVERY seconds and at Vault every
        VAULT_CHECK_EVERY, so that probes and jobs read the answer instead of waiting
        for a slow backend."""
        last_vault = time.monotonic()
        while not self._stopping.wait(STATE_CHECK_EVERY):
            self._check_state()
            if time.monotonic() - last_vault >= VAULT_CHECK_EVERY:
                last_vault = time.monotonic()
                self._check_vault()
            self._observe_ready()

    def _check_state(self) -> None:
        try:
            self.app.store.check()
        except RotatorError as exc:
            if self._state == "ok":
                _log.error(
                    "daemon.state_store_unavailable",
                    error=str(exc),
                    detail="no scan, tick or leak-queue poll runs until it answers again",
                )
            self._state = str(exc)
            self.metrics.backend("state", False)
        except Exception as exc:  # a bug: say so, report the store as not usable
            _log.exception("daemon.state_check_crashed")
            self._state = type(exc).__name__
            self.metrics.backend("state", False)
        else:
            if self._state != "ok":
                _log.info("daemon.state_store_back")
            self._state_ok()

    def _state_ok(self) -> None:
        self._state = "ok"
        self.metrics.backend("state", True)

    def _state_usable(self, job: str) -> bool:
        if self._state == "ok":
            return True
        _log.warning("daemon.job_skipped", job=job, state_store=self._state)
        return False

    def _observe_ready(self) -> None:
        if self._scheduler is not None:
            self.metrics.ready(self.readyz()[0] == 200)

    def _check_vault(self) -> None:
        try:
            self.app.secrets.check()
        except RotatorError as exc:
            self._vault = str(exc)
        except Exception as exc:  # a bug: say so, report Vault as not usable
            _log.exception("daemon.vault_check_crashed")
            self._vault = type(exc).__name__
        else:
            self._vault = "ok"
        self.metrics.backend("vault", self._vault == "ok")

    # --- reload -------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read and validate the configuration; keep the old one on error. Running
        steps finish on the app they started with; new ones use the new app."""
        try:
            settings = self._load()
            token = self._read_token(settings)
        except ConfigError as exc:
            _log.error("daemon.reload_rejected", problems=exc.problems)
            self._systemd.status("reload rejected: invalid configuration, old settings kept")
            return False
        if settings.http.listen != self.settings.http.listen:
            _log.warning("daemon.reload_listen_unchanged", detail="http.listen applies at restart")
        fresh = self._app_factory(settings, self.metrics, self._stopping)
        with self._lock:
            self.settings, self._token = settings, token
            self._retired.append(self._app)
            self._app = fresh
        if self._scheduler is not None:
            self._scheduler.reschedule_job(
                "scan", trigger=scan_trigger(settings.schedule.scan_schedule)
            )
            self._scheduler.reschedule_job(
                "tick",
                trigger=IntervalTrigger(
                    seconds=settings.schedule.tick.total_seconds(), timezone=UTC
                ),
            )
        _log.info("daemon.reloaded", scan=settings.schedule.scan)
        return True

    # --- HTTP API -----------------------------------------------------------------------

    def healthz(self) -> tuple[int, dict[str, Any]]:
        return 200, {"status": "alive"}

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """200 "ok" when every check passes; 200 "degraded" when only Vault fails (leaked
        keys are still contained, other rotations wait); 503 "unavailable" when the
        state store cannot be used or no account was scanned (by this daemon or another
        sharing the store) within two scan periods. Reads what the background checks
        and the jobs found: a probe never waits for a backend."""
        checks: dict[str, str] = {"state_store": self._state, "vault": self._vault}
        now = datetime.now(UTC)
        period = scan_period(self.settings.schedule.scan_schedule, now)
        scans = [t for t in (self._last_scan_ok, *self._fleet_scans.values()) if t is not None]
        last = max(scans, default=None)
        if last is None:
            checks["scan"] = self._last_scan_error or "no scan has completed yet"
        elif now - last > 2 * period:
            checks["scan"] = f"last successful scan {last.isoformat()} is too old"
        else:
            checks["scan"] = "ok"
        ready = checks["state_store"] == "ok" and checks["scan"] == "ok"
        if not ready:
            status = "unavailable"
        elif checks["vault"] != "ok":
            status = "degraded"
        else:
            status = "ok"
        return (200 if ready else 503), {"ready": ready, "status": status, "checks": checks}

    def metrics_text(self) -> tuple[bytes, str]:
        return self.metrics.render(), CONTENT_TYPE_LATEST

    def trigger(self, request: ForcedRotation) -> dict[str, Any]:
        """Open the rotation (containing a leaked key at once) and answer as soon as it
        is recorded; a bounded pool goes on advancing it."""
        if request.reason is None:
            request = replace(request, reason="HTTP trigger")
        if not self._trigger_slots.acquire(timeout=TRIGGER_WAIT):
            raise Transient(f"{TRIGGER_WORKERS} triggered rotations are running; retry shortly")
        try:
            app = self.app
            rotation = app.open_forced(request)
            self._triggers.submit(self._advance_trigger, app, rotation.id)
        except BaseException:
            self._trigger_slots.release()
            raise
        return {"id": rotation.id, "state": rotation.state.value}

    def _advance_trigger(self, app: App, rotation_id: str) -> None:
        try:
            advanced = app.advance_all([rotation_id])
        except Exception as exc:
            _log.error("daemon.trigger_advance_failed", rotation_id=rotation_id, error=str(exc))
            return
        finally:
            self._trigger_slots.release()
        for r in advanced:
            _log.info("daemon.trigger_done", rotation_id=r.id, state=r.state.value)

    def rotation(self, rotation_id: str) -> dict[str, Any] | None:
        found = self.app.store.get(rotation_id)
        return rotation_json(found) if found is not None else None
