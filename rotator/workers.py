"""The daemon's side of `rotator.worker`: start a worker process, read what it reports.

A worker is `python -P -m rotator.worker` with the daemon's environment; its stderr is
the daemon's, so its log lines land where the daemon's do. It receives the daemon's
validated settings on stdin (never on the command line or in the environment), so a
configuration file edited on disk changes nothing until SIGHUP validates it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

from rotator import log
from rotator.errors import (
    BackendUnavailable,
    BadInput,
    NotFound,
    RotationExists,
    RotatorError,
    Transient,
)

_log = log.get_logger("rotator.workers")

# Errors a worker reports that the daemon answers differently (HTTP status, retry).
_ERRORS: dict[str, type[RotatorError]] = {
    "BadInput": BadInput,
    "NotFound": NotFound,
    "RotationExists": RotationExists,
    "Transient": Transient,
    "BackendUnavailable": BackendUnavailable,
}


class WorkerFailed(RotatorError):
    """A worker ended without a result: it crashed, was killed, or broke the protocol."""


def error_from(message: Mapping[str, Any]) -> RotatorError:
    """The exception a worker's `error` line stands for."""
    kind = str(message.get("kind", ""))
    text = str(message.get("message", "")) or kind
    cls = _ERRORS.get(kind)
    if cls is not None:
        return cls(text)
    if kind == "Crash":
        return WorkerFailed(f"the worker crashed ({text}); see its log lines")
    return RotatorError(text)


class Worker:
    """One running worker. Iterate `messages()` from one thread at a time."""

    def __init__(
        self,
        job: str,
        proc: subprocess.Popen[str],
        on_metrics: Callable[[list[Any]], None],
        on_exit: Callable[[Worker], None] | None = None,
    ) -> None:
        self.job = job
        self._proc = proc
        self._on_metrics = on_metrics
        self._on_exit = on_exit
        self._lines: Iterator[str] = iter(proc.stdout or ())

    @property
    def pid(self) -> int:
        return self._proc.pid

    def messages(self) -> Iterator[dict[str, Any]]:
        """The worker's reports in order, metrics already applied; ends at its exit,
        when the pipe is closed (by the reading thread, never under another reader)."""
        yield from self._reports()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def _reports(self) -> Iterator[dict[str, Any]]:
        for line in self._lines:
            try:
                message = json.loads(line)
            except ValueError:
                _log.warning("worker.bad_line", job=self.job, pid=self.pid)
                continue
            if not isinstance(message, dict):
                continue
            if message.get("type") == "metrics":
                self._on_metrics(message.get("journal") or [])
                continue
            yield message

    def finish(self) -> dict[str, Any]:
        """Read to the end; the `result` line, or raise what the worker reported."""
        result: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        for message in self.messages():
            if message.get("type") == "result":
                result = message
            elif message.get("type") == "error":
                error = message
        code = self.wait()
        if error is not None:
            raise error_from(error)
        if result is None:
            raise WorkerFailed(f"the {self.job} worker exited with code {code} and no result")
        return result

    def wait(self, timeout: float | None = None) -> int:
        code = self._proc.wait(timeout)
        if self._on_exit is not None:
            self._on_exit(self)
        return code

    def terminate(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()


class Workers:
    """Starts workers and keeps track of the live ones, so a stop reaches them all."""

    def __init__(
        self,
        *,
        settings: Callable[[], Mapping[str, Any]],
        log_options: Mapping[str, str | None],
        on_metrics: Callable[[list[Any]], None],
        command: list[str] | None = None,
    ) -> None:
        self._settings = settings
        self._log_options = dict(log_options)
        self._on_metrics = on_metrics
        self._command = command or [sys.executable, "-P", "-m", "rotator.worker"]
        self._live: set[Worker] = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self, job: str, request: Mapping[str, Any] | None = None) -> Worker:
        """Start a worker on `job`; its stdout is ours to read."""
        order = {
            "job": job,
            "settings": dict(self._settings()),
            "log": self._log_options,
            "request": dict(request or {}),
        }
        with self._lock:
            if self._closed:
                raise Transient("the daemon is stopping")
            proc = subprocess.Popen(
                self._command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                encoding="utf-8",
            )
            worker = Worker(job, proc, self._on_metrics, self._forget)
            self._live.add(worker)
        _log.debug("worker.started", job=job, pid=proc.pid)
        _send_order(proc.stdin, order)
        return worker

    def run(self, job: str, request: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run `job` to its end; its result, or raise the error it reported."""
        return self.start(job, request).finish()

    def _forget(self, worker: Worker) -> None:
        with self._lock:
            self._live.discard(worker)

    def live(self) -> int:
        with self._lock:
            return len(self._live)

    def stop(self, timeout: float) -> bool:
        """SIGTERM every live worker, wait up to `timeout`, SIGKILL what is left. No new
        worker starts afterwards. True when all had ended by themselves."""
        with self._lock:
            self._closed = True
            live = list(self._live)
        for worker in live:
            worker.terminate()
        clean = True
        for worker in live:
            try:
                worker.wait(timeout)
            except subprocess.TimeoutExpired:
                clean = False
                _log.error("worker.killed", job=worker.job, pid=worker.pid, waited=timeout)
                worker.kill()
                worker.wait()
        return clean


def _send_order(stdin: IO[str] | None, order: Mapping[str, Any]) -> None:
    if stdin is None:
        return
    try:
        stdin.write(json.dumps(order))
        stdin.close()
    except BrokenPipeError:  # the worker died at once; its exit code tells the rest
        pass
