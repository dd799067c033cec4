"""`rotator daemon`: scheduled scans and ticks, HTTP, systemd integration, signals.

The only module that imports APScheduler. Two jobs: `scan` on `schedule.scan` (cron or
interval, with jitter) opens rotations and advances what is due; `tick` on
`schedule.tick` advances open rotations whose next step is due. Both run with
max_instances=1 and coalescing, so a slow pass never piles up.

The daemon itself never talks to AWS or Vault: each job runs in a worker process
(`rotator.worker`) that exits when its job is done, so the idle daemon holds no AWS SDK,
no Vault client and nothing a scan of many users allocated. The daemon keeps the
schedule, the HTTP endpoint, the metrics (workers report theirs back) and a read view
of the state store, from which it decides whether a tick has anything to do. With
`leaks.sqs_queue_url` set, one worker long-polls the queue for as long as the daemon runs.

Vault is never waited for: containing a leaked key needs IAM only. The daemon is ready
once the state store and AWS answer; while Vault cannot be used, scans and the leak-queue
poller still contain every leaked key, every other rotation waits for Vault, and
`/readyz` answers 200 with status "degraded" naming why.

Signals: SIGTERM/SIGINT reach the workers too; each lets its running step finish, then
the daemon exits 0. SIGHUP re-reads the configuration; an invalid file is reported and
the old settings stay. A failing scan is logged and retried at the next slot: an outage
of AWS or Vault never kills the process.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from rotator import log
from rotator.config import Settings
from rotator.cron import Schedule
from rotator.errors import ConfigError, RotatorError, Transient
from rotator.http import Server, read_token
from rotator.metrics import CONTENT_TYPE_LATEST, Metrics
from rotator.model import Decision, ForcedRotation, Rotation
from rotator.probe import vault_health
from rotator.report import rotation_json
from rotator.state import SqliteStateStore
from rotator.systemd import Notifier as SystemdNotifier
from rotator.workers import Worker, WorkerFailed, Workers, error_from

_log = log.get_logger("rotator.daemon")

STOP_TIMEOUT = 8.0  # seconds a running step may take to finish after SIGTERM
# At most this many trigger workers at once; a further request waits for a slot up to
# TRIGGER_WAIT seconds, then gets 503. A burst of triggers cannot exhaust memory.
TRIGGER_WORKERS = 4
TRIGGER_WAIT = 30.0


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
        systemd: SystemdNotifier | None = None,
        log_options: Mapping[str, str | None] | None = None,
    ) -> None:
        self._load = load
        self._systemd = systemd or SystemdNotifier()
        self.metrics = Metrics()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._reload_requested = False
        self._lock = threading.Lock()
        self._last_scan_ok: datetime | None = None
        self._last_scan_error: str | None = None
        # Why Vault could not be used, as the last worker that tried it said (the
        # `check` at start, then each scan); None once it could.
        self._vault_error: str | None = None
        self._vault_checked: tuple[float, str | None] = (0.0, None)
        self.settings = load()
        self._token = self._read_token(self.settings)
        self._store: SqliteStateStore | None = None
        self._workers = Workers(
            settings=lambda: self.settings.model_dump(mode="json"),
            log_options=log_options or {},
            on_metrics=self._replay,
        )
        self._leaks_worker: Worker | None = None
        self._trigger_slots = threading.BoundedSemaphore(TRIGGER_WORKERS)
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
    def store(self) -> SqliteStateStore:
        """The state store, opened on first use (a failure is retried by the caller)."""
        with self._lock:
            if self._store is None:
                self._store = SqliteStateStore(self.settings.state.path)
            return self._store

    def _replay(self, journal: list[Any]) -> None:
        skipped = self.metrics.replay(journal)
        if skipped:
            _log.warning("daemon.metrics_skipped", entries=skipped)

    # --- main loop ----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit code."""
        self._install_signals()
        http = self.settings.http
        self._server = Server(http.host, http.port, self, token=lambda: self._token).start()
        host, port = self._server.address
        _log.info("daemon.listening", address=f"{host}:{port}", trigger=self._token is not None)
        try:
            if not self._wait_for_backends():
                return 0
            self._start_scheduler()
            degraded = self._vault_error
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
        """Release what the daemon holds without running (the state store)."""
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

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
            if self._scheduler is not None and self._scheduler.running:
                # Only a live scheduler earns a watchdog ping.
                self._systemd.watchdog()

    def _wait_for_backends(self) -> bool:
        """READY only once the state store and AWS answered (a `check` worker). Retries
        (with a growing pause) until they do or a stop signal arrives. Vault is not
        waited for: the check reports it, and a Vault that cannot be used makes the
        daemon degraded (leaked keys are still contained), not unready."""
        pause = 1.0
        while not self._stopping.is_set():
            try:
                self.store.check()
                checked = self._workers.run("check")
                vault = str(checked.get("vault") or "not checked")
                self._vault_error = None if vault == "ok" else vault
                _log.info("daemon.backends_ok", accounts=checked.get("accounts"), vault=vault)
                if self._vault_error is not None:
                    self._vault_unusable(
                        self._vault_error,
                        "starting degraded: scans and the leak queue still contain leaked "
                        "keys (IAM only); every other rotation waits for Vault",
                    )
                return True
            except RotatorError as exc:
                if self._stopping.is_set():
                    break
                _log.warning("daemon.backend_unavailable", error=str(exc), retry_in=pause)
                self._systemd.status(f"waiting for backends: {exc}")
                self._stopping.wait(pause)
                pause = min(pause * 2, 30.0)
        return False

    def _start_scheduler(self) -> None:
        settings = self.settings
        scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(max_workers=3)},
            job_defaults={"coalesce": True, "max_instances": 1},
        )
        period = scan_period(settings.schedule.scan_schedule, datetime.now(UTC))
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
        if settings.leaks.sqs_queue_url is not None:
            self._add_leaks_job(scheduler)
        scheduler.start()
        self._scheduler = scheduler

    def _add_leaks_job(self, scheduler: Any) -> None:
        # The job lasts as long as its worker; if the worker ends, the next second
        # starts another.
        scheduler.add_job(
            self.leaks_job,
            IntervalTrigger(seconds=1, timezone=UTC),
            id="leaks",
            name="leaks",
            misfire_grace_time=5,
        )

    def _shutdown(self) -> None:
        self._stopping.set()
        self._systemd.stopping()
        self.metrics.ready(False)
        _log.info("daemon.stopping")
        # Workers got SIGTERM with us from a terminal or systemd; tell them anyway, so
        # that a `kill <daemon pid>` stops them too. Each ends after its running step.
        if not self._workers.stop(STOP_TIMEOUT):
            _log.error("daemon.stop_timeout", waited=STOP_TIMEOUT)
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        if self._server is not None:
            self._server.stop()
        self.close()
        _log.info("daemon.stopped")

    # --- jobs ---------------------------------------------------------------------------

    def scan_job(self) -> None:
        started = time.monotonic()
        try:
            result = self._workers.run("scan")
        except RotatorError as exc:
            if not self._stopping.is_set():
                self._scan_failed(str(exc))
            return
        # A scan that could not use Vault still contained every leaked key: for leak
        # detection it succeeded.
        self._last_scan_ok = datetime.now(UTC)
        self._last_scan_error = None
        vault_error = result.get("vault_error")
        self._vault_error = str(vault_error) if vault_error else None
        decisions: Mapping[str, int] = result.get("decisions") or {}
        summary = ", ".join(
            f"{decisions.get(k.value, 0)} {k.value}"
            for k in (Decision.LEAKED, Decision.BLOCKED, Decision.ROTATE, Decision.WARN)
        )
        text = (
            f"last scan {self._last_scan_ok.isoformat(timespec='seconds')}: "
            f"{result.get('keys', 0)} keys ({summary}); opened {result.get('opened', 0)}"
        )
        failures: Mapping[str, str] = result.get("failures") or {}
        if failures:
            text += f"; failed accounts: {', '.join(sorted(failures))}"
            for account, why in sorted(failures.items()):
                _log.error("daemon.account_failed", account=account, error=why)
        if self._vault_error is not None:
            text += (
                f"; DEGRADED: Vault cannot be used ({self._vault_error}): leaked keys were "
                "contained, every other rotation waits for Vault"
            )
            self._vault_unusable(
                self._vault_error,
                "leaked keys were contained (IAM only); every other rotation waits for Vault",
            )
        _log.info(
            "daemon.scan_done",
            keys=result.get("keys", 0),
            opened=result.get("opened", 0),
            advanced=result.get("advanced", 0),
            failed_accounts=sorted(failures),
            vault=self._vault_error or "ok",
            seconds=round(time.monotonic() - started, 3),
        )
        self._systemd.status(text)

    @staticmethod
    def _vault_unusable(error: str, detail: str) -> None:
        _log.error("daemon.vault_unusable", error=error, detail=detail)

    def _scan_failed(self, error: str) -> None:
        self._last_scan_error = error
        self.metrics.scan_failed()
        _log.error("daemon.scan_failed", error=error)
        self._systemd.status(f"last scan failed: {error}")

    def tick_job(self) -> None:
        """Start a worker only when a rotation is due: most ticks cost one SQLite read."""
        try:
            rotations = self.store.list_open()
        except RotatorError as exc:
            _log.error("daemon.tick_failed", error=str(exc))
            return
        self.metrics.observe_open(rotations)
        if not self._any_due(rotations):
            return
        try:
            self._workers.run("tick")
        except RotatorError as exc:
            if not self._stopping.is_set():
                _log.error("daemon.tick_failed", error=str(exc))

    @staticmethod
    def _any_due(rotations: Iterable[Rotation]) -> bool:
        now = datetime.now(UTC)
        return any(r.is_due(now) for r in rotations)

    def leaks_job(self) -> None:
        if self._stopping.is_set() or self.settings.leaks.sqs_queue_url is None:
            return
        try:
            worker = self._workers.start("leaks")
        except RotatorError:
            return
        self._leaks_worker = worker
        try:
            worker.finish()
        except RotatorError as exc:
            if not self._stopping.is_set():
                _log.error("daemon.leak_queue_failed", error=str(exc))
                self._stopping.wait(5)
        finally:
            self._leaks_worker = None

    # --- reload -------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read and validate the configuration; keep the old one on error."""
        try:
            settings = self._load()
            token = self._read_token(settings)
        except ConfigError as exc:
            _log.error("daemon.reload_rejected", problems=exc.problems)
            self._systemd.status("reload rejected: invalid configuration, old settings kept")
            return False
        if settings.http.listen != self.settings.http.listen:
            _log.warning("daemon.reload_listen_unchanged", detail="http.listen applies at restart")
        with self._lock:
            old = self.settings
            self.settings, self._token = settings, token
            if settings.state.path != old.state.path and self._store is not None:
                self._store.close()
                self._store = None  # reopened at the new path on next use
        if self._scheduler is not None:
            has_leaks = self._scheduler.get_job("leaks") is not None
            if settings.leaks.sqs_queue_url is not None and not has_leaks:
                self._add_leaks_job(self._scheduler)
            elif settings.leaks.sqs_queue_url is None and has_leaks:
                self._scheduler.remove_job("leaks")
            self._scheduler.reschedule_job(
                "scan", trigger=scan_trigger(settings.schedule.scan_schedule)
            )
            self._scheduler.reschedule_job(
                "tick",
                trigger=IntervalTrigger(
                    seconds=settings.schedule.tick.total_seconds(), timezone=UTC
                ),
            )
        leaks = self._leaks_worker
        if leaks is not None and settings != old:
            leaks.terminate()  # the next one starts with the new settings
        _log.info("daemon.reloaded", scan=settings.schedule.scan)
        return True

    # --- HTTP API -----------------------------------------------------------------------

    def healthz(self) -> tuple[int, dict[str, Any]]:
        return 200, {"status": "alive"}

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """200 "ok" when every check passes; 200 "degraded" when only Vault fails (leaked
        keys are still contained, other rotations wait); 503 "unavailable" when the
        state store or the scan fails."""
        checks: dict[str, str] = {}
        try:
            self.store.check()
            checks["state_store"] = "ok"
        except RotatorError as exc:
            checks["state_store"] = str(exc)
        checks["vault"] = self._vault_check()
        period = scan_period(self.settings.schedule.scan_schedule, datetime.now(UTC))
        if self._last_scan_ok is None:
            checks["scan"] = self._last_scan_error or "no scan has completed yet"
        elif datetime.now(UTC) - self._last_scan_ok > 2 * period:
            checks["scan"] = f"last successful scan {self._last_scan_ok.isoformat()} is too old"
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

    def _vault_check(self) -> str:
        """ "ok" or why Vault cannot be used: the daemon's own probe (reachable,
        unsealed), then what the last worker that used Vault said (a token or mount
        the probe cannot see)."""
        probe = self._vault_status()
        if probe != "ok":
            return probe
        error = self._vault_error
        return "ok" if error is None else f"the last use of Vault failed: {error}"

    def _vault_status(self) -> str:
        # Probes may come every second; ask Vault at most every five.
        checked_at, status = self._vault_checked
        if status is not None and time.monotonic() - checked_at < 5:
            return status
        status = vault_health(str(self.settings.vault.url))
        self._vault_checked = (time.monotonic(), status)
        return status

    def metrics_text(self) -> tuple[bytes, str]:
        return self.metrics.render(), CONTENT_TYPE_LATEST

    def trigger(self, request: ForcedRotation) -> dict[str, Any]:
        """Open the rotation in a worker and answer as soon as it is recorded; the
        worker goes on advancing it."""
        if request.reason is None:
            request = replace(request, reason="HTTP trigger")
        if not self._trigger_slots.acquire(timeout=TRIGGER_WAIT):
            raise Transient(f"{TRIGGER_WORKERS} triggered rotations are running; retry shortly")
        try:
            worker = self._workers.start("trigger", request.as_dict())
        except BaseException:
            self._trigger_slots.release()
            raise
        opened: dict[str, Any] | None = None
        try:
            for message in worker.messages():
                if message.get("type") == "opened":
                    opened = message.get("rotation") or {}
                    break
                if message.get("type") == "error":
                    for _ in worker.messages():  # read to the end: the pipe gets closed
                        pass
                    worker.wait()
                    raise error_from(message)
            else:
                code = worker.wait()
                raise WorkerFailed(f"the trigger worker exited with code {code} before opening")
        finally:
            if opened is None:
                self._trigger_slots.release()
        threading.Thread(
            target=self._finish_trigger, args=(worker,), name="rotator-trigger"
        ).start()
        return {"id": opened.get("id"), "state": opened.get("state")}

    def _finish_trigger(self, worker: Worker) -> None:
        try:
            result = worker.finish()
        except RotatorError as exc:
            _log.error("daemon.trigger_advance_failed", error=str(exc))
            return
        finally:
            self._trigger_slots.release()
        rotation = result.get("rotation") or {}
        _log.info(
            "daemon.trigger_done", rotation_id=rotation.get("id"), state=rotation.get("state")
        )

    def rotation(self, rotation_id: str) -> dict[str, Any] | None:
        found = self.store.get(rotation_id)
        return rotation_json(found) if found is not None else None
