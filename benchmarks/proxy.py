"""A counting HTTP proxy for AWS API calls, with an optional fixed delay per call.

Every tool under benchmark points `AWS_ENDPOINT_URL` at this proxy, which forwards each
request to the moto server unchanged. Calls are counted by service and action the same
way for every tool, outside the tool's own process:

- service: the SigV4 credential scope in the `Authorization` header
  (`Credential=AKID/20250101/us-east-1/iam/aws4_request` -> `iam`);
- action: the `Action` query or form parameter (IAM and STS speak the query protocol),
  else the operation of an `X-Amz-Target` header (JSON protocols), else `METHOD /path`.

moto's own control API (`/moto-api/...`) is forwarded but neither counted nor delayed.
`delay` (seconds) is slept before forwarding each counted call: it stands in for the
round trip to a real AWS endpoint. `on_call(name, body)`, when given, is called with
each counted call as soon as its body has arrived, before the delay and the forwarding
(benchmarks/containment.py timestamps calls with it).

Used in-process by `benchmarks/run.py`; also runnable on its own:

    python benchmarks/proxy.py --target http://127.0.0.1:5000 --port 5050 --delay 0.05
    curl http://127.0.0.1:5050/__proxy__/counts         # {"iam:ListUsers": 1, ...}
    curl -X POST http://127.0.0.1:5050/__proxy__/reset
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

CONTROL_PREFIX = "/__proxy__/"
UNCOUNTED_PREFIXES = ("/moto-api",)
_SCOPE = re.compile(r"Credential=[^/,\s]+/\d{8}/[^/]+/([^/]+)/aws4_request")
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


def classify(method: str, path: str, headers: Any, body: bytes) -> str:
    """`service:Action` for one AWS API request."""
    match = _SCOPE.search(headers.get("Authorization", "") or "")
    service = match.group(1) if match else "unknown"
    query = parse_qs(urlsplit(path).query)
    action: str | None = query["Action"][0] if query.get("Action") else None
    if action is None and body:
        content_type = headers.get("Content-Type", "") or ""
        if "x-www-form-urlencoded" in content_type:
            form = parse_qs(body.decode("utf-8", "replace"))
            action = form["Action"][0] if form.get("Action") else None
    if action is None:
        target = headers.get("X-Amz-Target")
        if target:
            action = target.rsplit(".", 1)[-1]
    if action is None:
        action = f"{method} {urlsplit(path).path}"
    return f"{service}:{action}"


class CountingProxy:
    """A ThreadingHTTPServer that forwards to `target` and counts calls."""

    def __init__(
        self,
        target: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
        on_call: Callable[[str, bytes], None] | None = None,
    ) -> None:
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"target must be http://host:port, not {target!r}")
        self.target_host = parts.hostname
        self.target_port = parts.port or 80
        self.delay = delay
        self.on_call = on_call
        self._counts: Counter[str] = Counter()
        self._upstream: dict[str, float] = {}  # seconds spent waiting on the target
        self._lock = threading.Lock()
        self._server = _Server((host, port), _handler(self))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> CountingProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="counting-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def add_upstream_time(self, name: str, seconds: float) -> None:
        with self._lock:
            self._upstream[name] = self._upstream.get(name, 0.0) + seconds

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._counts.items()))

    def upstream_seconds(self) -> dict[str, float]:
        """Seconds the target (moto) took to answer, summed per `service:Action`."""
        with self._lock:
            return {k: round(v, 3) for k, v in sorted(self._upstream.items())}

    def reset(self) -> dict[str, int]:
        """Return the counts so far and start again from zero."""
        with self._lock:
            counts = dict(sorted(self._counts.items()))
            self._counts.clear()
            self._upstream.clear()
            return counts


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


def _handler(proxy: CountingProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # Keep-alive towards the clients, as AWS endpoints do: boto3 reuses connections.
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's
        # algorithm and the client's delayed ACK add ~40 ms to every response.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def _control(self) -> None:
            if self.path == CONTROL_PREFIX + "counts":
                self._reply(200, json.dumps(proxy.snapshot()).encode())
            elif self.path == CONTROL_PREFIX + "reset" and self.command == "POST":
                self._reply(200, json.dumps(proxy.reset()).encode())
            else:
                self._reply(404, b'{"error": "unknown proxy control path"}')

        def _reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self) -> None:
            if self.path.startswith(CONTROL_PREFIX):
                self._control()
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            name: str | None = None
            if not self.path.startswith(UNCOUNTED_PREFIXES):
                name = classify(self.command, self.path, self.headers, body)
                proxy.count(name)
                if proxy.on_call is not None:
                    proxy.on_call(name, body)
                if proxy.delay > 0:
                    time.sleep(proxy.delay)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(proxy.target_host, proxy.target_port, timeout=300)
            try:
                started = time.perf_counter()
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                if name is not None:
                    proxy.add_upstream_time(name, time.perf_counter() - started)
                self.send_response(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
            except OSError as exc:
                message = json.dumps({"error": f"proxy: upstream failed: {exc}"}).encode()
                self.send_response(502)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(message)))
                self.end_headers()
                self.wfile.write(message)
            finally:
                conn.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _forward

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="the moto server, http://host:port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added per call")
    args = parser.parse_args(argv)
    proxy = CountingProxy(args.target, host=args.host, port=args.port, delay=args.delay).start()
    print(proxy.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.stop()


if __name__ == "__main__":
    main()
