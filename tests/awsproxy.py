"""A forwarding proxy in front of the moto server that refuses chosen calls the way AWS
does. moto accepts any AssumeRole (the role need not exist); real AWS refuses a role
that is missing or does not trust the caller, and that is the case worth testing."""

from __future__ import annotations

import http.client
import http.server
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager

DENIED = (
    '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
    "<Type>Sender</Type><Code>AccessDenied</Code>"
    "<Message>User is not authorized to perform: sts:AssumeRole</Message>"
    "</Error><RequestId>proxy</RequestId></ErrorResponse>"
)


@contextmanager
def refusing(upstream: str, refuse: Callable[[dict[str, str]], bool]) -> Iterator[str]:
    """Serve a proxy to `upstream`; a form-encoded call whose params satisfy `refuse`
    gets AWS's AccessDenied. Yields the proxy's URL."""
    target = urllib.parse.urlsplit(upstream)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            params = {
                k: v[0] for k, v in urllib.parse.parse_qs(body.decode(errors="replace")).items()
            }
            if refuse(params):
                payload = DENIED.encode()
                self.send_response(403)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            conn.request("POST", self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for key, value in resp.getheaders():
                if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
