"""A real PostgreSQL server for the tests, started from the system's own binaries.

`postgres_server` (session): `initdb` into a temporary directory, `postgres` on a free
loopback port (its unix socket inside that directory; fsync off, for speed), stopped at
the end of the session. `postgres_url` (function): a fresh, empty database on it, as a
URL, dropped after the test. A test that stops the server (an outage) starts it again
with `PgServer.start`, or leaves it to the next test's `postgres_url` to do so.

The binaries are found on PATH, else in `pg_config --bindir`, else in
/usr/lib/postgresql/*/bin (Debian's layout). When they are missing, the tests that need
them are skipped with a reason naming what is missing; with `ROTATOR_REQUIRE_POSTGRES=1`
(as CI sets it) they fail instead, so that they cannot silently not run.

initdb and postgres refuse to run as root: as root they run as the unprivileged
`postgres` system user (which Debian's package creates), in a directory it owns.

A test module uses the fixtures by importing them: `from tests.pgserver import
postgres_server, postgres_url`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

import psycopg
import pytest

from rotator.sandbox import free_port

REQUIRE_ENV = "ROTATOR_REQUIRE_POSTGRES"
SERVICE_USER = "postgres"

# A role that logs in with a password over TCP (scram-sha-256), for the tests that prove
# a password is used but never shown. Every other login is trusted (a throwaway server
# that listens on 127.0.0.1 only).
PASSWORD_ROLE = "rotator_pw"
ROLE_PASSWORD = "pw-" + uuid.uuid4().hex


class Missing(Exception):
    """What this machine lacks to run a PostgreSQL server, in words for a skip reason."""


def find_bindir() -> Path:
    """The directory of PostgreSQL's server binaries; raises `Missing` naming where it
    looked."""
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres and Path(initdb).parent == Path(postgres).parent:
        return Path(initdb).parent
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()))
    # Debian installs each major version beside the others: the newest first.
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(versions)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise Missing(
        "PostgreSQL server binaries not found: no initdb and postgres on PATH, in "
        "`pg_config --bindir`, or in /usr/lib/postgresql/*/bin "
        "(install Debian's postgresql package)"
    )


def _run_as() -> pwd.struct_passwd | None:
    """The user to run the server as: None for ourselves, `postgres` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise Missing(
            f"running as root, and there is no {SERVICE_USER!r} system user to run "
            f"initdb and postgres as (they refuse root)"
        ) from None


class PgServer:
    """One PostgreSQL cluster in a temporary directory, served on 127.0.0.1:`port`."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.host = "127.0.0.1"
        self._user = _run_as()
        self._root = Path(tempfile.mkdtemp(prefix="rotator-pg-"))
        self.data = self._root / "data"
        self.sockets = self._root / "sockets"
        self.log_path = self._root / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._role_made = False
        self.sockets.mkdir()
        self.log_path.touch()
        if self._user is not None:
            for path in (self._root, self.sockets, self.log_path):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def url(self, database: str = "postgres", user: str = SERVICE_USER) -> str:
        """A URL without password (the trusted superuser, or PASSWORD_ROLE with
        PGPASSWORD set)."""
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    def _as_service_user(self, args: list[str], **popen: Any) -> subprocess.Popen[bytes]:
        """Start `args` as the user that runs the server (ourselves unless we are root)."""
        user = self._user
        return subprocess.Popen(
            args,
            user=None if user is None else user.pw_uid,
            group=None if user is None else user.pw_gid,
            extra_groups=None if user is None else [],
            cwd=self._root,
            stdin=subprocess.DEVNULL,
            **popen,
        )

    def init(self) -> PgServer:
        """`initdb` the cluster, and let PASSWORD_ROLE log in with its password only."""
        initdb = self._as_service_user(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SERVICE_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LC_ALL": "C"},
        )
        output, _ = initdb.communicate(timeout=120)
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed ({initdb.returncode}): {output.decode()[-2000:]}")
        (self.data / "pg_hba.conf").write_text(
            f"local all all trust\n"
            f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
            f"host all all 127.0.0.1/32 trust\n",
            encoding="utf-8",
        )
        return self

    def start(self, timeout: float = 30.0) -> PgServer:
        """Start postgres (again, after `stop`) and wait until it accepts connections."""
        if self.running:
            return self
        self._log = log = self.log_path.open("ab")
        self._proc = self._as_service_user(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.sockets),
                "-c",
                f"listen_addresses={self.host}",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with code {self._proc.returncode}: {self.log_tail()}"
                )
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    pass
            except psycopg.OperationalError:
                time.sleep(0.1)
                continue
            if not self._role_made:
                self.admin(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{ROLE_PASSWORD}'")
                self._role_made = True
            return self
        self.stop()
        raise RuntimeError(f"postgres did not accept connections within {timeout}s")

    def stop(self) -> None:
        """Stop postgres (fast shutdown: clients are disconnected at once)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # SIGINT is postgres's fast shutdown: clients are disconnected at once (SIGTERM,
            # the smart one, would wait for them to leave).
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log, self._log = self._log, None
        if log is not None:
            log.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def admin(self, sql: str, database: str = "postgres") -> None:
        """Run one statement as the superuser, outside a transaction."""
        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.encode())

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; its name."""
        name = name or "t_" + uuid.uuid4().hex[:16]
        self.admin(f'CREATE DATABASE "{name}"')
        self.admin(f'GRANT ALL ON SCHEMA public TO "{PASSWORD_ROLE}"', database=name)
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._root, ignore_errors=True)


def _unavailable(reason: str) -> NoReturn:
    """Skip the test that needs PostgreSQL, saying why; fail it when CI demands it."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: PostgreSQL tests must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the session (skipped, or failed under
    ROTATOR_REQUIRE_POSTGRES=1, when the machine has none)."""
    try:
        server = PgServer(find_bindir())
    except Missing as exc:
        _unavailable(str(exc))
    try:
        server.init().start()
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: PgServer) -> Iterator[str]:
    """A fresh, empty database on the session's server (started again if a test stopped
    it), as a URL for the trusted superuser."""
    postgres_server.start()
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.start()
    postgres_server.drop_database(name)
