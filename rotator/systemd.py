"""systemd's notify protocol over its datagram socket: no libsystemd needed.

`READY=1` once the backends were reached, `WATCHDOG=1` at half of `WATCHDOG_USEC`,
`STATUS=` lines, `STOPPING=1` on shutdown. Outside systemd (`NOTIFY_SOCKET` unset) every
call is a no-op."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class SystemdNotify:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading "@" and bound with a NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self._watchdog_usec = int(usec)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half the configured timeout), or None."""
        return self._watchdog_usec / 2_000_000 if self._watchdog_usec else None

    def send(self, *lines: str) -> bool:
        if not self._address:
            return False
        payload = "\n".join(lines).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(payload, self._address)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")
