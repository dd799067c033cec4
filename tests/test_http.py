"""The daemon's HTTP endpoint as a hostile client meets it: a trigger token file others
can read is refused, idle connections are closed, and a flood of connections cannot
take more than a bounded number of handler threads. Against a real `Server` on a
loopback port with a small API that answers probes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rotator.errors import BadInput
from rotator.http import Server, read_token
from rotator.model import ForcedRotation

TOKEN = "trigger-token-for-tests-0123456789"


class Probes:
    """An API that answers /healthz and counts the requests it served."""

    def __init__(self) -> None:
        self.served = 0

    def healthz(self) -> tuple[int, dict[str, Any]]:
        self.served += 1
        return 200, {"status": "alive"}

    def readyz(self) -> tuple[int, dict[str, Any]]:
        return 200, {"ready": True}

    def metrics_text(self) -> tuple[bytes, str]:
        return b"", "text/plain"

    def trigger(self, request: ForcedRotation) -> dict[str, Any]:
        raise AssertionError("no trigger in these tests")

    def rotation(self, rotation_id: str) -> dict[str, Any] | None:
        return None


@pytest.fixture
def server() -> Iterator[tuple[Server, Probes]]:
    api = Probes()
    running = Server("127.0.0.1", 0, api, max_connections=3, idle_timeout=1.0).start()
    yield running, api
    running.stop()


def connect(server: Server) -> socket.socket:
    return socket.create_connection(server.address, timeout=5)


def healthz(server: Server) -> bytes:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return sock.recv(4096)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602])
def test_a_token_file_open_to_every_user_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    """A trigger token file that every user on the host can read (or write) is refused,
    naming the file, its mode and the chmod that fixes it; 0600 and 0440 of the
    rotator's own group are accepted."""
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(mode)
    with pytest.raises(BadInput) as refused:
        read_token(path)
    assert f"mode {mode:04o}" in str(refused.value)
    assert f"chmod o-rwx {path}" in str(refused.value)
    assert TOKEN not in str(refused.value)
    for fine in (0o600, 0o440):
        path.chmod(fine)
        assert read_token(path) == TOKEN


def test_an_idle_connection_is_closed_after_the_idle_timeout(
    server: tuple[Server, Probes],
) -> None:
    """A client that connects and sends nothing is cut off after the idle timeout (1 s
    here), so slow clients cannot keep handler threads."""
    running, _ = server
    with connect(running) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # the server closed it
        assert time.monotonic() - started < 4


def test_connections_beyond_the_bound_get_503_and_the_server_recovers(
    server: tuple[Server, Probes],
) -> None:
    """Three idle connections hold all three handler slots: a fourth is answered 503 at
    once instead of starting another thread; once the idle ones time out, requests are
    served again."""
    running, api = server
    idle = [connect(running) for _ in range(3)]
    try:
        time.sleep(0.2)
        threads = threading.active_count()
        assert healthz(running).startswith(b"HTTP/1.1 503")
        assert threading.active_count() <= threads
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while not healthz(running).startswith(b"HTTP/1.0 200") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert api.served >= 1
