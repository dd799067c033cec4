"""A worker: one daemon job (check, scan, tick, trigger, leaks) in a process of its own.

The daemon (`rotator.daemon`) stays small: it schedules, serves HTTP and keeps the
metrics, but never loads boto3 or hvac. Each job runs here, in a short-lived
`python -m rotator.worker` child, and everything it allocated goes back to the operating
system when the child exits. The state store's leases already make several processes
safe on the same rotations; the daemon relies on that.

Protocol. The daemon writes one JSON document to the worker's stdin:

    {"job": "scan", "settings": {...validated settings...},
     "log": {"format": "json", "level": "INFO"}, "request": {...}}

and reads JSON lines from its stdout, each with a "type":

    {"type": "metrics", "journal": [...]}          metric updates to replay
    {"type": "opened", "rotation": {"id", "state"}} (trigger) the rotation is recorded
    {"type": "result", ...}                          the job's summary; the last line
    {"type": "error", "kind": "NotFound", "message": "..."}

Logs go to stderr, which the worker shares with the daemon. Nothing on stdout carries a
secret: the lines hold counts, states, ids and error texts (scrubbed like log lines).
SIGTERM or SIGINT lets the current step finish, then the worker exits.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import IO, Any

from rotator import log
from rotator.app import App
from rotator.config import parse_settings
from rotator.errors import RotatorError
from rotator.metrics import Metrics
from rotator.model import ForcedRotation
from rotator.report import rotation_json

JOBS = ("check", "scan", "tick", "trigger", "leaks")

_log = log.get_logger("rotator.worker")


class Channel:
    """The worker's side of the protocol: JSON lines on stdout, one writer at a time."""

    def __init__(self, stream: IO[str], metrics: Metrics) -> None:
        self._stream = stream
        self._metrics = metrics
        self._lock = threading.Lock()

    def send(self, message_type: str, /, **fields: Any) -> None:
        line = json.dumps({"type": message_type, **fields}, default=str)
        with self._lock:
            self._stream.write(log.scrub(line) + "\n")
            self._stream.flush()

    def flush_metrics(self) -> None:
        journal = self._metrics.drain()
        if journal:
            self.send("metrics", journal=journal)


def check(app: App, channel: Channel, request: dict[str, Any]) -> dict[str, Any]:
    """The backends the daemon cannot check itself: every configured account must
    answer (else the job fails); Vault (with this token, on this mount) is reported,
    "ok" or why it cannot be used, never waited for: containing a leaked key needs
    IAM only."""
    accounts = app.accounts()
    try:
        app.secrets.check()
        vault = "ok"
    except RotatorError as exc:
        vault = str(exc) or type(exc).__name__
    return {"accounts": accounts, "vault": vault}


def scan(app: App, channel: Channel, request: dict[str, Any]) -> dict[str, Any]:
    """Scan every account, open rotations for what is due, then advance what is due.
    When Vault cannot be used, the scan still contains every leaked key; it opens
    nothing else, advances nothing, and says why in `vault_error`."""
    result = app.scan_and_open()
    channel.flush_metrics()
    decisions = Counter(d.decision.value for inv in result.inventories for d in inv.decisions)
    vault_error = None
    advanced = 0
    if result.vault_error is not None:
        # Every open rotation's next step needs Vault; the tick job retries them.
        vault_error = str(result.vault_error) or type(result.vault_error).__name__
    else:
        try:
            advanced = len(app.tick())
        except RotatorError as exc:  # the scan itself succeeded; the next tick retries
            _log.error("daemon.tick_failed", error=str(exc))
    return {
        "keys": sum(decisions.values()),
        "decisions": dict(decisions),
        "opened": len(result.opened),
        "advanced": advanced,
        "failures": result.failures,
        "vault_error": vault_error,
    }


def tick(app: App, channel: Channel, request: dict[str, Any]) -> dict[str, Any]:
    """Advance every open rotation that is due now."""
    return {"advanced": len(app.tick())}


def trigger(app: App, channel: Channel, request: dict[str, Any]) -> dict[str, Any]:
    """Open a forced rotation, say so at once, then advance it as far as it goes now."""
    forced = ForcedRotation.from_dict(request)
    rotation = app.open_forced(forced)
    channel.send("opened", rotation={"id": rotation.id, "state": rotation.state.value})
    channel.flush_metrics()
    [advanced] = app.advance_all([rotation.id])
    return {"rotation": rotation_json(advanced)}


def leaks(app: App, channel: Channel, request: dict[str, Any]) -> dict[str, Any]:
    """Long-poll the leak queue until told to stop; each event is handled at once."""
    handled = 0
    while not app.stopping.is_set():
        try:
            handled += app.poll_leak_queue(wait_seconds=5)
        except RotatorError as exc:
            _log.error("daemon.leak_queue_failed", error=str(exc))
            app.stopping.wait(5)
        channel.flush_metrics()
    return {"handled": handled}


_JOBS: dict[str, Callable[[App, Channel, dict[str, Any]], dict[str, Any]]] = {
    "check": check,
    "scan": scan,
    "tick": tick,
    "trigger": trigger,
    "leaks": leaks,
}


def run(stdin: IO[str], stdout: IO[str]) -> int:
    """Read the job from `stdin`, run it, report on `stdout`. Returns the exit code."""
    order = json.loads(stdin.read())
    logging = order.get("log") or {}
    job = str(order.get("job"))
    log.configure(logging.get("format"), logging.get("level", "INFO"), fields={"job": job})
    metrics = Metrics(journal=True)
    channel = Channel(stdout, metrics)
    stopping = threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    handler = _JOBS.get(job)
    if handler is None:
        channel.send("error", kind="BadInput", message=f"unknown job {job!r}")
        return 2
    app: App | None = None
    try:
        settings = parse_settings(order.get("settings"))
        app = App(settings, metrics=metrics, stopping=stopping)
        summary = handler(app, channel, order.get("request") or {})
    except RotatorError as exc:
        channel.flush_metrics()
        channel.send("error", kind=type(exc).__name__, message=str(exc))
        return 1
    except Exception as exc:  # a bug: report it, the daemon logs and carries on
        _log.exception("worker.crashed")
        channel.flush_metrics()
        channel.send("error", kind="Crash", message=type(exc).__name__)
        return 1
    finally:
        if app is not None:
            app.close()
    channel.flush_metrics()
    channel.send("result", **summary)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.stdin, sys.stdout))
