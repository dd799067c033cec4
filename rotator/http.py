"""The daemon's HTTP endpoint: health, readiness, Prometheus metrics, and the
authenticated rotation trigger.

  GET  /healthz              200 while the process is alive
  GET  /readyz               200 when the state store and the last scan are fine: status
                             "ok", or "degraded" while Vault cannot be used (leaked keys
                             are still contained); else 503, status "unavailable"
  GET  /metrics              Prometheus text format
  POST /v1/rotations         open a rotation (Bearer token; only with trigger_token_file)
  GET  /v1/rotations/{id}    one rotation, as in `status --json` (same token)

Binds to loopback unless configured otherwise. Bodies are capped; every malformed
request gets a 4xx with a message, never a traceback.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from rotator import log
from rotator.errors import BadInput, NotFound, RotationExists, RotatorError, Transient
from rotator.leaks import load_json
from rotator.model import ForcedRotation, is_user_name
from rotator.secretfile import read_secret_file

_log = log.get_logger("rotator.http")

MAX_BODY = 16 * 1024
_ROTATION_PATH = re.compile(r"^/v1/rotations/([0-9a-f]{32})$")
# fullmatch, not match with $: "$" also matches before a trailing newline; and [0-9],
# not \d, which matches any Unicode digit.
_KEY_ID = re.compile(r"[A-Z0-9]{16,128}")
_ACCOUNT = re.compile(r"[0-9]{12}")


def parse_trigger(body: bytes) -> ForcedRotation:
    """Validate a `POST /v1/rotations` body; `BadInput` names the first problem, and is
    the only exception whatever the body (a 4xx, never a 500)."""
    try:
        return _trigger(load_json(body, max_bytes=MAX_BODY, name="body"))
    except BadInput:
        raise
    except Exception as exc:  # a bug here must answer 400, not 500
        raise BadInput(f"unreadable body ({type(exc).__name__})") from exc


def _trigger(data: Any) -> ForcedRotation:
    if not isinstance(data, dict):
        raise BadInput("body must be a JSON object")
    unknown = set(data) - {"user_name", "account_id", "access_key_id", "leaked", "reason", "force"}
    if unknown:
        names = ", ".join(json.dumps(name) for name in sorted(unknown))
        raise BadInput(f"unknown field(s): {names[:200]}")
    user = data.get("user_name")
    if not isinstance(user, str) or not is_user_name(user):
        raise BadInput("user_name must be an IAM user name (1-64 of letters, digits, +=,.@_-)")
    account = data.get("account_id")
    if account is not None and (not isinstance(account, str) or not _ACCOUNT.fullmatch(account)):
        raise BadInput("account_id must be a 12-digit string")
    key = data.get("access_key_id")
    if key is not None and (not isinstance(key, str) or not _KEY_ID.fullmatch(key)):
        raise BadInput("access_key_id must be an access key id (upper-case letters and digits)")
    leaked = data.get("leaked", False)
    if not isinstance(leaked, bool):
        raise BadInput("leaked must be true or false")
    reason = data.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 500):
        raise BadInput("reason must be a string of at most 500 characters")
    force = data.get("force", False)
    if not isinstance(force, bool):
        raise BadInput("force must be true or false")
    return ForcedRotation(user, account, key, leaked, reason, force=force)


class Api(Protocol):
    """What the daemon offers the HTTP layer."""

    def healthz(self) -> tuple[int, dict[str, Any]]: ...

    def readyz(self) -> tuple[int, dict[str, Any]]: ...

    def metrics_text(self) -> tuple[bytes, str]: ...

    def trigger(self, request: ForcedRotation) -> dict[str, Any]:
        """Open a rotation; raises NotFound for an unknown user, RotationExists."""
        ...

    def rotation(self, rotation_id: str) -> dict[str, Any] | None: ...


def read_token(path: Path) -> str:
    """The trigger token from its file (refused when others can read the file)."""
    token = read_secret_file(path)
    if len(token) < 16:
        raise BadInput(f"{path}: the trigger token must be at least 16 characters")
    return token


# At most this many connections are served at once; one more is answered 503 at once.
MAX_CONNECTIONS = 16
# A connection that sends nothing for this long is closed (slow or idle clients cannot
# hold handler threads).
IDLE_TIMEOUT = 10.0

_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, but never more than `max_connections` threads."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, max_connections: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(_BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class Server:
    """A threading HTTP server in a background thread: bounded handler threads, idle
    connections closed after IDLE_TIMEOUT."""

    def __init__(
        self,
        host: str,
        port: int,
        api: Api,
        token: Callable[[], str | None] = lambda: None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        handler = _handler_class(api, token)
        handler.timeout = idle_timeout
        self._httpd = _BoundedServer((host, port), handler, max_connections)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="rotator-http", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler_class(api: Api, token: Callable[[], str | None]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "rotator"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:
            _log.debug("http.request", line=format % args)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, doc: dict[str, Any]) -> None:
            self._send(status, json.dumps(doc).encode() + b"\n", "application/json")

        def _authorized(self) -> bool:
            expected = token()
            if expected is None:
                return False
            header = self.headers.get("Authorization", "")
            scheme, _, given = header.partition(" ")
            # Constant-time comparison: no timing hint about the token's prefix.
            return scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode(), expected.encode()
            )

        def do_GET(self) -> None:
            try:
                self._get()
            except Exception as exc:  # a bug must not kill the server thread
                _log.error("http.error", path=self.path, error=type(exc).__name__)
                self._json(500, {"error": "internal error"})

        def _get(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._json(*api.healthz())
            elif path == "/readyz":
                self._json(*api.readyz())
            elif path == "/metrics":
                body, content_type = api.metrics_text()
                self._send(200, body, content_type)
            elif path.startswith("/v1/rotations"):
                if token() is None:
                    self._json(404, {"error": "the trigger endpoint is not enabled"})
                elif not self._authorized():
                    self._json(401, {"error": "missing or invalid bearer token"})
                elif (match := _ROTATION_PATH.match(path)) is None or (
                    doc := api.rotation(match.group(1))
                ) is None:
                    self._json(404, {"error": "no such rotation"})
                else:
                    self._json(200, doc)
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            try:
                self._post()
            except Exception as exc:
                _log.error("http.error", path=self.path, error=type(exc).__name__)
                self._json(500, {"error": "internal error"})

        def _post(self) -> None:
            path = self.path.split("?", 1)[0]
            if path != "/v1/rotations" or token() is None:
                self._json(404, {"error": "not found"})
                return
            if not self._authorized():
                self._json(401, {"error": "missing or invalid bearer token"})
                return
            length_header = self.headers.get("Content-Length")
            if length_header is None or not length_header.isdigit():
                self._json(
                    411 if length_header is None else 400, {"error": "Content-Length required"}
                )
                return
            length = int(length_header)
            if length > MAX_BODY:
                self.close_connection = True
                self._json(413, {"error": f"body larger than {MAX_BODY} bytes"})
                return
            body = self.rfile.read(length)
            try:
                request = parse_trigger(body)
            except BadInput as exc:
                self._json(400, {"error": str(exc)})
                return
            try:
                doc = api.trigger(request)
            except NotFound as exc:
                self._json(404, {"error": str(exc)})
            except RotationExists as exc:
                self._json(409, {"error": str(exc)})
            except BadInput as exc:
                self._json(400, {"error": str(exc)})
            except Transient as exc:
                self._json(503, {"error": str(exc)})
            except RotatorError as exc:
                self._json(422, {"error": str(exc)})
            else:
                self._json(202, doc)

    return Handler
