"""A fault-injecting HTTP proxy the tests put in front of the moto server or the OpenBao
dev server: it forwards every call unchanged unless a rule says otherwise.

    with FaultProxy(aws.endpoint_url) as proxy:
        proxy.add(aws_action("CreateAccessKey"), DropAfterApply(), times=1)
        ...  # a client pointed at proxy.url: IAM mints the key, the client never hears

Rules are tried in the order they were added; the first one that matches and is not
used up decides. An action sees the call through an `Exchange`, which fetches the
upstream answer, holds the call, or answers in the proxy's place. Every call ends in
`proxy.log` with its `Outcome`: whether it reached the upstream and whether the client
got an answer.
"""

from __future__ import annotations

import http.client
import http.server
import json
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Any, NamedTuple, Protocol
from xml.sax.saxutils import escape

# Headers that describe one connection, not the message: never relayed. Content-Length
# is recomputed, because the proxy always sends whole bodies.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
UPSTREAM_TIMEOUT = 30.0


@dataclass(frozen=True, repr=False)
class Request:
    """One call as the proxy received it. `form` holds the parameters of a form-encoded
    body (the AWS query API); `action` is AWS's `Action` parameter, or None."""

    method: str
    path: str
    query: Mapping[str, str]
    form: Mapping[str, str]
    body: bytes

    @property
    def action(self) -> str | None:
        return self.form.get("Action") or self.query.get("Action")

    def __repr__(self) -> str:
        # The body is left out: a Vault write carries the secret it stores.
        return f"<Request {self.method} {self.path}{' ' + self.action if self.action else ''}>"


Match = Callable[[Request], bool]


def aws_action(name: str) -> Match:
    """Matches the AWS query-API call `name` (e.g. "CreateAccessKey")."""
    return lambda request: request.action == name


def vault_path(method: str, path_regex: str) -> Match:
    """Matches a Vault API call by HTTP method and a regex matched at the path's start."""
    pattern = re.compile(path_regex)
    return lambda request: request.method == method and pattern.match(request.path) is not None


class Outcome(Enum):
    """What became of one call: did the upstream see it, did the client get an answer."""

    FORWARDED = "forwarded"  # upstream applied it; the client got upstream's answer
    RESPONDED = "responded"  # not forwarded; the client got the proxy's answer
    DROPPED = "dropped"  # upstream applied it; the client got no answer
    ABANDONED = "abandoned"  # not forwarded (proxy closed, upstream down); no answer

    @property
    def reached_upstream(self) -> bool:
        return self in (Outcome.FORWARDED, Outcome.DROPPED)


class Reply(NamedTuple):
    status: int
    reason: str | None  # None: the standard phrase for the status
    headers: list[tuple[str, str]]
    body: bytes


class Record(NamedTuple):
    request: Request
    outcome: Outcome


class Action(Protocol):
    def perform(self, exchange: Exchange) -> Reply | None:
        """The reply to send the client, or None to close its connection unanswered."""


@dataclass(frozen=True)
class Respond:
    """Answer in the upstream's place; the call never reaches it."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] | None = None

    def perform(self, exchange: Exchange) -> Reply | None:
        return Reply(self.status, None, list((self.headers or {}).items()), self.body)


def aws_error(code: str, status: int, message: str = "") -> Respond:
    """AWS's query-API error document (IAM's and STS's share it; botocore reads the
    code, not the namespace). 5xx errors are AWS's fault ("Receiver"), others the
    caller's ("Sender")."""
    kind = "Receiver" if status >= 500 else "Sender"
    body = (
        '<ErrorResponse xmlns="https://iam.amazonaws.com/doc/2010-05-08/">'
        f"<Error><Type>{kind}</Type><Code>{escape(code)}</Code>"
        f"<Message>{escape(message or code + ' (injected by the test proxy)')}</Message>"
        "</Error><RequestId>faultproxy</RequestId></ErrorResponse>"
    )
    return Respond(status, body.encode(), {"Content-Type": "text/xml"})


def vault_error(status: int, errors: Iterable[str] = ()) -> Respond:
    """Vault's error document, `{"errors": [...]}`."""
    body = json.dumps({"errors": list(errors)}).encode()
    return Respond(status, body, {"Content-Type": "application/json"})


@dataclass(frozen=True)
class DropAfterApply:
    """Forward the call and read the whole answer, so the upstream has applied it; then
    close the client's connection without a word: a lost response."""

    def perform(self, exchange: Exchange) -> Reply | None:
        exchange.fetch()
        return None


@dataclass(frozen=True)
class Stall:
    """Hold the call `seconds` before forwarding it (`after`: forward it, then hold the
    answer). `FaultProxy.release()` ends the hold early; closing the proxy ends it with
    the client unanswered."""

    seconds: float
    after: bool = False

    def perform(self, exchange: Exchange) -> Reply | None:
        if not self.after:
            return exchange.fetch() if exchange.hold(self.seconds) else None
        reply = exchange.fetch()
        return reply if exchange.hold(self.seconds) else None


@dataclass(frozen=True)
class Call:
    """Run `fn(request)` at the moment the call arrives, then forward the call."""

    fn: Callable[[Request], object]

    def perform(self, exchange: Exchange) -> Reply | None:
        self.fn(exchange.request)
        return exchange.fetch()


@dataclass(frozen=True)
class Forward:
    """What a call no rule matches gets."""

    def perform(self, exchange: Exchange) -> Reply | None:
        return exchange.fetch()


@dataclass(eq=False)
class Rule:
    """`action` for the calls `match` accepts, the next `times` of them (None: all)."""

    match: Match
    action: Action
    times: int | None = None
    hits: int = 0

    @property
    def used_up(self) -> bool:
        return self.times is not None and self.hits >= self.times


class Exchange:
    """One call in flight, as an action sees it."""

    def __init__(
        self, proxy: FaultProxy, request: Request, path: str, headers: dict[str, str]
    ) -> None:
        self.request = request
        self.applied = False
        self._proxy = proxy
        self._path = path
        self._headers = headers

    def fetch(self) -> Reply | None:
        """Send the call upstream and read its whole answer; None if that failed."""
        conn = http.client.HTTPConnection(*self._proxy.upstream, timeout=UPSTREAM_TIMEOUT)
        try:
            conn.request(
                self.request.method, self._path, body=self.request.body, headers=self._headers
            )
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()
        self.applied = True
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
        return Reply(resp.status, resp.reason, headers, body)

    def hold(self, seconds: float) -> bool:
        """Wait `seconds` or until released; False if the proxy is closing."""
        return self._proxy._hold(seconds)


class FaultProxy:
    """A forwarding proxy to `upstream_url` on a free loopback port (`url`), injecting
    the faults its rules describe. Starts at once; close it (or use `with`)."""

    def __init__(self, upstream_url: str) -> None:
        target = urllib.parse.urlsplit(upstream_url)
        if target.scheme != "http" or not target.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream_url!r}")
        self.upstream = (target.hostname, target.port or 80)
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._log: list[Record] = []
        self._released = threading.Event()
        self._closing = False
        self._server = _Server(self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"faultproxy-{self._server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()

    def add(self, match: Match, action: Action, times: int | None = None) -> Rule:
        rule = Rule(match, action, times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def log(self) -> list[Record]:
        """Every finished call so far, in order (a copy)."""
        with self._lock:
            return list(self._log)

    def outcomes(self, match: Match) -> list[Outcome]:
        """The outcomes of the logged calls `match` accepts, in order."""
        return [outcome for request, outcome in self.log if match(request)]

    def release(self) -> None:
        """End every stall now in progress (later stalls hold as usual)."""
        with self._lock:
            released, self._released = self._released, threading.Event()
        released.set()

    def close(self) -> None:
        """Stop serving, end every stall and client connection; then raise the first
        error a rule's code raised, so a broken `Call` cannot pass unnoticed."""
        with self._lock:
            already, self._closing = self._closing, True
            self._released.set()
        if not already:
            self._server.shutdown()
            self._server.close_clients()
            self._server.server_close()
            self._thread.join()
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _pick(self, request: Request) -> Action:
        with self._lock:
            for rule in self._rules:
                if not rule.used_up and rule.match(request):
                    rule.hits += 1
                    return rule.action
        return Forward()

    def _hold(self, seconds: float) -> bool:
        with self._lock:
            if self._closing:
                return False
            released = self._released
        released.wait(seconds)
        return not self._closing

    def _record(self, request: Request, outcome: Outcome) -> None:
        with self._lock:
            self._log.append(Record(request, outcome))


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._clients_lock:
            self._clients.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._clients_lock:
            self._clients.discard(request)
        super().shutdown_request(request)

    def close_clients(self) -> None:
        # A pooled keep-alive connection keeps its handler thread reading; shutting the
        # socket down ends that read, and with it the thread.
        with self._clients_lock:
            clients = list(self._clients)
        for client in clients:
            with suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)


class _Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 keeps boto3's and requests' pooled connections open between calls.
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        # Every method (Vault also uses LIST) is handled alike.
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        exchange = Exchange(proxy, self._request(body), self.path, self._upstream_headers())
        try:
            reply = proxy._pick(exchange.request).perform(exchange)
        except Exception as exc:
            proxy.errors.append(exc)
            reply = None
        outcome = _outcome(exchange.applied, reply is not None)
        # Logged before the client hears, so a test that has its answer sees the entry.
        proxy._record(exchange.request, outcome)
        if reply is None:
            self.close_connection = True
            return
        with suppress(OSError):
            self._send(reply)

    def _request(self, body: bytes) -> Request:
        url = urllib.parse.urlsplit(self.path)
        form_encoded = self.headers.get_content_type() == "application/x-www-form-urlencoded"
        return Request(
            method=self.command,
            path=url.path,
            query=_params(url.query),
            form=_params(body.decode(errors="replace")) if form_encoded else {},
            body=body,
        )

    def _upstream_headers(self) -> dict[str, str]:
        return {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status, reply.reason)
        for key, value in reply.headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)


def _params(encoded: str) -> dict[str, str]:
    return {k: v[0] for k, v in urllib.parse.parse_qs(encoded, keep_blank_values=True).items()}


def _outcome(applied: bool, answered: bool) -> Outcome:
    if answered:
        return Outcome.FORWARDED if applied else Outcome.RESPONDED
    return Outcome.DROPPED if applied else Outcome.ABANDONED
