"""Three daemons on one PostgreSQL database share the rotations and the scans; one of
them killed with SIGKILL in the middle of the rotations loses nothing, and no rotation is
ever advanced by two of them at once.

The PostgreSQL big brother of tests/test_fleet.py: three real `rotator daemon`
processes, each with its own configuration file and HTTP port, all on the same
`state.url`, the same moto server (behind a proxy that adds latency to every AWS call,
so that rotations are still in flight when a daemon dies) and the same OpenBao.

Twice: with each daemon in a PID namespace of its own, as on three hosts or in three
pods, where the survivors cannot see that the holder of a lease died and take it over
once it has expired (`state.lease_ttl`, the scan lease's 30 s); and with the three in
one PID namespace, where they see it and take over at their next tick.

Skipped without PostgreSQL binaries, unless ROTATOR_REQUIRE_POSTGRES=1 (tests/pgserver.py).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotator.daemon import SCAN_LEASE_MIN
from rotator.deadlines import call_deadline
from rotator.machine import TERMINAL, State
from rotator.model import Event, KeyStatus, Rotation
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey, free_port
from rotator.state.postgres import PostgresStateStore
from tests.conftest import VaultTarget
from tests.faultproxy import Call, FaultProxy, Stall, aws_action
from tests.pgserver import postgres_server, postgres_url  # noqa: F401 - fixtures
from tests.rig import config_data, identity_of, spawn_daemon, vault_secret, wait_until
from tests.test_fleet import SCAN_CALL, Member

USERS = 36
SCAN_EVERY = 4.0  # seconds: schedule.scan
TICK = 1.0  # seconds: schedule.tick
CALL_TIMEOUT = timedelta(seconds=1)  # aws.call_timeout and vault.timeout
# The shortest lease the configuration check accepts: twice the longest call deadline.
LEASE_TTL = 2 * call_deadline(CALL_TIMEOUT, CALL_TIMEOUT).total_seconds()
# The scan lease lasts three ticks, and at least SCAN_LEASE_MIN (rotator.daemon).
SCAN_LEASE_TTL = max(3 * TICK, SCAN_LEASE_MIN.total_seconds())
# Added to every AWS call but the scan's first, and each daemon advances at most
# CONCURRENCY rotations at once: the rotations take several seconds, so that some are
# done and others in flight in every daemon when one dies.
AWS_LATENCY = 0.3
CONCURRENCY = 4
ROTATIONS_NEED = 15.0  # seconds the rotations left at the kill may take, takeover aside
STEP = 5.0  # seconds one step of a rotation may take, its calls slowed down
TAKEOVER_SCAN = 'rotator_lease_takeovers_total{kind="scan"}'
SCAN_ACTION = "GetAccountAuthorizationDetails"  # each scan's first call, one page here

ISOLATE = ["unshare", "--pid", "--fork", "--kill-child"]
if os.geteuid() != 0:  # unprivileged: a PID namespace inside a user namespace of its own
    ISOLATE[1:1] = ["--user", "--map-root-user"]


def can_isolate() -> str | None:
    """Why a daemon cannot run in a PID namespace of its own here (None: it can)."""
    if shutil.which("unshare") is None:
        return "no unshare(1) to run each daemon in a PID namespace of its own"
    done = subprocess.run([*ISOLATE, "true"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`{' '.join(ISOLATE)} true` failed: {done.stderr.strip()}"
    return None


class Daemon(Member):
    """A fleet member whose JSON log is read as it comes (a full pipe would block the
    daemon) and kept for the failure messages. `pid`: the daemon's own process, which
    is not `proc` when `proc` is the `unshare` that runs it in a PID namespace."""

    def __init__(self, proc: subprocess.Popen[str], port: int, *, isolated: bool) -> None:
        super().__init__(proc, port)
        self.lines: list[str] = []
        self.pid = proc.pid
        if isolated:
            wait_until(lambda: self._child() is not None, 10, "unshare to start the daemon")
            self.pid = self._child() or proc.pid
        threading.Thread(target=self._read, daemon=True).start()

    def _child(self) -> int | None:
        with suppress(OSError, ValueError):
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                found = (task / "children").read_text().split()
                if found:
                    return int(found[0])
        return None

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def signal(self, signum: int) -> None:
        with suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def records(self, *events: str) -> list[dict[str, Any]]:
        """Its log records with one of these event names."""
        found = []
        for line in list(self.lines):
            with suppress(ValueError):
                record = json.loads(line)
                if record.get("event") in events:
                    found.append(record)
        return found


@dataclass
class Fleet:
    """The daemons, the store as the test reads it, and the scans the proxy saw."""

    daemons: list[Daemon]
    store: PostgresStateStore
    scans: list[float]  # time.time() of every scan's first call
    isolated: bool  # each daemon in a PID namespace of its own
    started: float  # time.time() before the first daemon was started

    def rotations(self) -> list[Rotation]:
        return self.store.list_recent(limit=10 * USERS)

    def logs(self, events: tuple[str, ...]) -> str:
        lines = [f"{d.pid}: {r}" for d in self.daemons for r in d.records(*events)]
        return "\n".join(lines[-40:])


@pytest.fixture(params=["own-pid-namespaces", "one-pid-namespace"])
def fleet(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    aws: LocalAws,
    vault: VaultTarget,
    postgres_url: str,  # noqa: F811 - the fixture imported above
) -> Iterator[Fleet]:
    """Three daemons on one PostgreSQL database, each in a PID namespace of its own or
    all in this one; moto behind a proxy that slows every call down but the scans'
    first, whose arrival it notes."""
    isolated = request.param == "own-pid-namespaces"
    if isolated and (why := can_isolate()):
        pytest.skip(why)
    now = datetime.now(UTC)
    for i in range(USERS):
        aws.add_user(f"fleet-{i:02d}", keys=[SeedKey(age=timedelta(days=120))], now=now)
    scans: list[float] = []
    daemons: list[Daemon] = []
    started = time.time()
    with FaultProxy(aws.endpoint_url) as proxy:
        proxy.add(aws_action(SCAN_ACTION), Call(lambda _: scans.append(time.time())))
        proxy.add(lambda _: True, Stall(AWS_LATENCY))
        for name in "abc":
            home = tmp_path / name
            home.mkdir()
            port = free_port()
            data = config_data(
                aws,
                vault,
                home,
                aws={
                    "endpoint_url": proxy.url,
                    "call_timeout": f"{CALL_TIMEOUT.seconds}s",
                    "concurrency": CONCURRENCY,
                },
                vault={"timeout": f"{CALL_TIMEOUT.seconds}s"},
                state={"url": postgres_url, "lease_ttl": f"{LEASE_TTL:g}s"},
                schedule={"scan": f"{SCAN_EVERY:g}s", "tick": f"{TICK:g}s"},
                http={"listen": f"127.0.0.1:{port}"},
            )
            config = home / "rotator.yaml"
            config.write_text(yaml.safe_dump(data))
            daemons.append(Daemon(start(config, isolated), port, isolated=isolated))
        store = PostgresStateStore(postgres_url)
        try:
            yield Fleet(daemons, store, scans, isolated, started)
        finally:
            store.close()
            for d in daemons:
                d.signal(signal.SIGTERM)
            for d in daemons:
                try:
                    d.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    d.signal(signal.SIGKILL)
                    d.proc.kill()
                    d.proc.wait()


def start(config: Path, isolated: bool) -> subprocess.Popen[str]:
    """`rotator daemon` on `config`; `isolated`: in a PID namespace of its own."""
    if not isolated:
        return spawn_daemon(config)
    command = [sys.executable, "-m", "rotator", "--config", str(config), "--log-format", "json"]
    return subprocess.Popen(
        [*ISOLATE, *command, "daemon"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def leased(trail: list[Event]) -> list[Event]:
    """The events written under a lease (creation, for one, is not)."""
    return [e for e in trail if e.token is not None]


def takeovers(trails: dict[str, list[Event]], victim: str, killed: datetime) -> dict[str, float]:
    """Rotations the victim was advancing when it died and another daemon went on with
    after the kill, under a greater token: rotation id -> seconds from the kill to the
    first event the new owner wrote."""
    found = {}
    for rid, trail in trails.items():
        events = leased(trail)
        last = max((i for i, e in enumerate(events) if e.owner == victim), default=None)
        if last is None or events[last].to_state in TERMINAL:
            continue
        after = [e for e in events[last + 1 :] if e.owner != victim and e.at > killed]
        if after and (after[0].token or 0) > (events[last].token or 0):
            found[rid] = (after[0].at - killed).total_seconds()
    return found


def test_three_daemons_on_postgres_finish_every_rotation_once_when_one_is_killed_mid_way(
    aws: LocalAws, vault: VaultTarget, fleet: Fleet
) -> None:
    """Three daemons share 36 due rotations; the one holding the scan lease is killed
    (SIGKILL) while it advances some of them. Every rotation still ends DONE within the
    lease's life and a few ticks after the kill, each user with one Active key that is
    Vault's and works; every event trail shows fencing tokens that never go back and
    each token in one owner's hands, and some show the survivors taking over the dead
    daemon's rotations; the fleet made one scan per scan period (never one per daemon),
    and a survivor took the scan lease over and counted it."""
    daemons = fleet.daemons
    for d in daemons:
        wait_until(lambda d=d: d.get("/readyz")[0] == 200, 60, f"{d.base}/readyz 200")
    wait_until(lambda: sum(d.holds(ACCOUNT_ID) for d in daemons) == 1, 15, "one scan holder")
    [victim] = [d for d in daemons if d.holds(ACCOUNT_ID)]
    survivors = [d for d in daemons if d is not victim]
    [lease] = fleet.store.scan_leases()
    victim_owner = lease.owner
    assert victim.holds(ACCOUNT_ID), "the scan lease changed hands before the test began"

    # Kill once some rotations are DONE and the victim is in the middle of others.
    at_kill: dict[str, State] = {}

    def mid_way() -> bool:
        rotations = fleet.rotations()
        done = sum(r.state is State.DONE for r in rotations)
        if done < USERS // 6:
            return False
        mine = [
            r
            for r in rotations
            if r.state not in TERMINAL
            and (events := leased(fleet.store.events(r.id)))
            and events[-1].owner == victim_owner
        ]
        at_kill.update((r.id, r.state) for r in rotations)
        return len(mine) >= 2

    wait_until(mid_way, 60, "some rotations DONE while the scan holder advances others")
    open_at_kill = sum(s not in TERMINAL for s in at_kill.values())
    victim_scans = victim.metric(SCAN_CALL)
    killed = datetime.now(UTC)
    victim.signal(signal.SIGKILL)
    victim.proc.wait(timeout=10)

    def finished() -> bool:
        rotations = fleet.rotations()
        return len(rotations) == USERS and all(r.state is State.DONE for r in rotations)

    allowed = LEASE_TTL + 3 * TICK + ROTATIONS_NEED
    try:
        wait_until(finished, allowed, f"every rotation DONE within {allowed:g} s of the kill")
    except AssertionError as exc:
        states = sorted(f"{r.user_name}: {r.state.value}" for r in fleet.rotations())
        why = fleet.logs(("rotation.stale", "rotation.lease_held", "rotation.advance_failed"))
        raise AssertionError(f"{exc}\n{states}\n{why}") from None

    # The survivors take the scan lease over (once it expired, or at once when they
    # see its holder is gone), count it, and scan once per period between them.
    wait_until(
        lambda: sum(d.holds(ACCOUNT_ID) for d in survivors) == 1,
        SCAN_LEASE_TTL + 3 * TICK,
        "a survivor to take the scan lease over",
    )
    assert sum(d.metric(TAKEOVER_SCAN) for d in survivors) == 1.0
    if fleet.isolated:
        # The account went unscanned for the scan lease's life, longer than a period:
        # the new holder scans at once.
        assert fleet.logs(("daemon.scan_catch_up",)), "no catch-up scan after the takeover"
    time.sleep(2.5 * SCAN_EVERY)
    assert len([t for t in fleet.scans if t > killed.timestamp()]) >= 2, fleet.scans

    # Every user: one key, Active, the one Vault serves, and it works.
    for i in range(USERS):
        user = f"fleet-{i:02d}"
        keys = aws.keys(user)
        secret = vault_secret(vault, f"aws/{ACCOUNT_ID}/{user}")
        assert secret is not None, f"{user}: nothing in Vault"
        served = secret["data"]["aws_access_key_id"]
        assert keys == {served: KeyStatus.ACTIVE}, f"{user}: IAM has {keys}, Vault {served}"
        assert identity_of(aws, secret).endswith(f":user/{user}")

    # Fencing: within a trail, tokens never go back and each is one owner's.
    trails = {r.id: fleet.store.events(r.id) for r in fleet.rotations()}
    for rid, trail in trails.items():
        events = leased(trail)
        tokens = [e.token for e in events if e.token is not None]
        assert tokens == sorted(tokens), f"rotation {rid}: tokens go back: {tokens}"
        owners: dict[int | None, set[str | None]] = {}
        for e in events:
            owners.setdefault(e.token, set()).add(e.owner)
        shared = {t: o for t, o in owners.items() if len(o) > 1}
        assert not shared, f"rotation {rid}: a token in several owners' hands: {shared}"
    taken = takeovers(trails, victim_owner, killed)
    assert taken, (
        f"no rotation shows a takeover: {open_at_kill} were open at the kill, none of "
        "them under the victim's lease"
    )
    delays = sorted(round(t, 1) for t in taken.values())
    if fleet.isolated:
        # The survivors cannot see that the victim died: they wait for its leases to
        # expire (each taken or renewed a step before the kill, for a full LEASE_TTL).
        assert delays[0] >= LEASE_TTL / 2, f"taken over before the leases expired: {delays}"
        assert delays[-1] <= LEASE_TTL + 2 * TICK + STEP, f"takeovers after {delays} s"
    else:
        # They see its pid is gone: they take over at their next tick that is not busy
        # with rotations of their own, never waiting for the leases to expire.
        assert delays[-1] < LEASE_TTL / 2, f"takeovers after {delays} s"

    # One scan per period across the fleet: counted by the daemons (the victim's last
    # reading, the survivors' now) and seen by the proxy.
    periods = (time.time() - fleet.started) / SCAN_EVERY
    counted = victim_scans + sum(d.metric(SCAN_CALL) for d in survivors)
    # The daemons count a call as they send it, the proxy as it arrives: one scan may
    # fall between (the victim's after its last reading, a survivor's in flight now).
    assert abs(len(fleet.scans) - counted) <= 1, f"{counted} counted, {fleet.scans} seen"
    assert 2 <= len(fleet.scans) <= periods + 2, f"{len(fleet.scans)} scans in {periods:.1f}"
    gaps = [b - a for a, b in itertools.pairwise(fleet.scans)]
    # Never two scans in one period, but at the handover: the new holder scans on its
    # own schedule when the last scan is recent, at once when it is not.
    short = [round(g, 2) for g in gaps if g < SCAN_EVERY * 0.75]
    assert len(short) <= 1, f"scans closer than a period: {short} among {gaps}"
    crashed = fleet.logs(("daemon.scan_crashed", "daemon.tick_crashed"))
    assert not crashed, crashed
