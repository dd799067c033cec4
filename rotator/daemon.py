"""`rotator daemon`: scheduled scans and ticks, HTTP, systemd integration, signals.

The only module that imports APScheduler. Two jobs: `scan` on `schedule.scan` (cron or
interval, with jitter) opens rotations; `tick` on `schedule.tick` advances open ones.
Both run with max_instances=1 and coalescing, so a slow pass never piles up.

Signals: SIGTERM/SIGINT stop taking new steps, let running steps finish, exit 0.
SIGHUP re-reads the configuration; an invalid file is reported and the old settings
stay. A failing scan is logged and retried at the next slot: an outage of AWS or Vault
never kills the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import signal
import threading
import time
from collections.abc import Callable
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
from rotator.app import App
from rotator.config import Schedule, Settings
from rotator.errors import ConfigError, RotatorError
from rotator.http import Server, read_token
from rotator.metrics import CONTENT_TYPE_LATEST, Metrics
from rotator.model import Decision, ForcedRotation
from rotator.report import rotation_json
from rotator.systemd import Notifier as SystemdNotifier

_log = log.get_logger("rotator.daemon")

STOP_TIMEOUT = 8.0  # seconds a running step may take to finish after SIGTERM


def release_memory() -> None:
    """Hand memory freed after a scan back to the operating system.

    A scan of many users allocates tens of MB that are all freed when it ends, but glibc
    keeps freed heap pages mapped; an idle daemon would then sit at its peak size."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


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
        self._vault_checked: tuple[float, str | None] = (0.0, None)
        self._token: str | None = None
        self.settings = load()
        self.app = self._build(self.settings)
        self._scheduler: Any = None
        self._server: Server | None = None

    # --- wiring -----------------------------------------------------------------------

    def _build(self, settings: Settings) -> App:
        self._token = self._read_token(settings)
        return App(settings, metrics=self.metrics, stopping=self._stopping)

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
            self._systemd.ready("ready; first scan running")
            self.metrics.up.set(1)
            _log.info("daemon.ready", scan=self.settings.schedule.scan)
            self._loop()
        finally:
            self._shutdown()
        return 0

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

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
        """READY only once the state store, Vault and AWS answered. Retries (with a
        growing pause) until they do or a stop signal arrives."""
        pause = 1.0
        while not self._stopping.is_set():
            try:
                self.app.store.check()
                self.app.secrets.check()
                accounts = self.app.accounts()
                _log.info("daemon.backends_ok", accounts=accounts)
                return True
            except RotatorError as exc:
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
            # One long poll after another: the job returns after at most a few seconds
            # so that a stop signal is never kept waiting.
            scheduler.add_job(
                self.leaks_job,
                IntervalTrigger(seconds=1, timezone=UTC),
                id="leaks",
                name="leaks",
                misfire_grace_time=5,
            )
        scheduler.start()
        self._scheduler = scheduler

    def _shutdown(self) -> None:
        self._stopping.set()
        self._systemd.stopping()
        self.metrics.up.set(0)
        _log.info("daemon.stopping")
        if self._scheduler is not None and self._scheduler.running:
            # No new job starts; running ones see `stopping` and end after their step.
            done = threading.Event()

            def finish() -> None:
                self._scheduler.shutdown(wait=True)
                done.set()

            threading.Thread(target=finish, name="rotator-shutdown", daemon=True).start()
            if not done.wait(STOP_TIMEOUT):
                _log.error("daemon.stop_timeout", waited=STOP_TIMEOUT)
        if self._server is not None:
            self._server.stop()
        self.app.close()
        _log.info("daemon.stopped")

    # --- jobs ---------------------------------------------------------------------------

    def scan_job(self) -> None:
        try:
            self._scan()
        finally:
            release_memory()

    def _scan(self) -> None:
        app = self.app
        started = time.monotonic()
        try:
            result = app.scan_and_open()
        except RotatorError as exc:
            self._scan_failed(str(exc))
            return
        except Exception as exc:  # an unexpected bug must not kill the scheduler
            _log.exception("daemon.scan_crashed")
            self._scan_failed(type(exc).__name__)
            return
        self._last_scan_ok = datetime.now(UTC)
        self._last_scan_error = None
        decisions = [d.decision for inv in result.inventories for d in inv.decisions]
        summary = ", ".join(
            f"{decisions.count(k)} {k.value}"
            for k in (Decision.LEAKED, Decision.BLOCKED, Decision.ROTATE, Decision.WARN)
        )
        text = (
            f"last scan {self._last_scan_ok.isoformat(timespec='seconds')}: {len(decisions)} keys "
            f"({summary}); opened {len(result.opened)}"
        )
        _log.info(
            "daemon.scan_done",
            keys=len(decisions),
            opened=len(result.opened),
            seconds=round(time.monotonic() - started, 3),
        )
        self._systemd.status(text)
        self.tick_job()

    def _scan_failed(self, error: str) -> None:
        self._last_scan_error = error
        self.metrics.scan_failures.inc()
        _log.error("daemon.scan_failed", error=error)
        self._systemd.status(f"last scan failed: {error}")

    def tick_job(self) -> None:
        try:
            self.app.tick()
        except RotatorError as exc:
            _log.error("daemon.tick_failed", error=str(exc))
        except Exception:
            _log.exception("daemon.tick_crashed")

    def leaks_job(self) -> None:
        if self._stopping.is_set():
            return
        try:
            self.app.poll_leak_queue(wait_seconds=5)
        except RotatorError as exc:
            _log.error("daemon.leak_queue_failed", error=str(exc))
            self._stopping.wait(5)
        except Exception:
            _log.exception("daemon.leak_queue_crashed")

    # --- reload -------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read and validate the configuration; keep the old one on error."""
        try:
            settings = self._load()
            app = self._build(settings)
        except ConfigError as exc:
            _log.error("daemon.reload_rejected", problems=exc.problems)
            self._systemd.status("reload rejected: invalid configuration, old settings kept")
            return False
        if settings.http.listen != self.settings.http.listen:
            _log.warning("daemon.reload_listen_unchanged", detail="http.listen applies at restart")
        with self._lock:
            self.settings, self.app = settings, app
        if self._scheduler is not None:
            has_leaks = self._scheduler.get_job("leaks") is not None
            if settings.leaks.sqs_queue_url is not None and not has_leaks:
                self._scheduler.add_job(
                    self.leaks_job, IntervalTrigger(seconds=1, timezone=UTC), id="leaks"
                )
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
        _log.info("daemon.reloaded", scan=settings.schedule.scan)
        return True

    # --- HTTP API -----------------------------------------------------------------------

    def healthz(self) -> tuple[int, dict[str, Any]]:
        return 200, {"status": "alive"}

    def readyz(self) -> tuple[int, dict[str, Any]]:
        checks: dict[str, str] = {}
        app = self.app
        try:
            app.store.check()
            checks["state_store"] = "ok"
        except RotatorError as exc:
            checks["state_store"] = str(exc)
        checks["vault"] = self._vault_status(app)
        period = scan_period(self.settings.schedule.scan_schedule, datetime.now(UTC))
        if self._last_scan_ok is None:
            checks["scan"] = self._last_scan_error or "no scan has completed yet"
        elif datetime.now(UTC) - self._last_scan_ok > 2 * period:
            checks["scan"] = f"last successful scan {self._last_scan_ok.isoformat()} is too old"
        else:
            checks["scan"] = "ok"
        ready = all(v == "ok" for v in checks.values())
        return (200 if ready else 503), {"ready": ready, "checks": checks}

    def _vault_status(self, app: App) -> str:
        # Probes may come every second; ask Vault at most every five.
        checked_at, status = self._vault_checked
        if status is not None and time.monotonic() - checked_at < 5:
            return status
        try:
            app.secrets.check()
            status = "ok"
        except RotatorError as exc:  # counted in rotator_vault_errors_total by the app
            status = str(exc)
        self._vault_checked = (time.monotonic(), status)
        return status

    def metrics_text(self) -> tuple[bytes, str]:
        return self.metrics.render(), CONTENT_TYPE_LATEST

    def trigger(self, request: ForcedRotation) -> dict[str, Any]:
        app = self.app
        if request.reason is None:
            request = replace(request, reason="HTTP trigger")
        rotation = app.open_forced(request)
        threading.Thread(
            target=self._advance_now, args=(app, rotation.id), name="rotator-trigger", daemon=True
        ).start()
        return {"id": rotation.id, "state": rotation.state.value}

    def _advance_now(self, app: App, rotation_id: str) -> None:
        try:
            app.advance_all([rotation_id])
        except Exception:
            _log.exception("daemon.trigger_advance_failed", rotation_id=rotation_id)

    def rotation(self, rotation_id: str) -> dict[str, Any] | None:
        found = self.app.store.get(rotation_id)
        return rotation_json(found) if found is not None else None
