"""Several daemons on one PostgreSQL database: one daemon against three, the same work.

    python benchmarks/fleet.py            # 300 due users, 100 where the budget binds (~8 min)
    python benchmarks/fleet.py --quick    # 60 and 30, shorter scan series (~3 min)

What runs (benchmarks/README.md, "Several daemons", says how to read the table):

One moto server (LocalAws, in this process) behind the counting proxy
(benchmarks/proxy.py), which adds DELAY (50 ms) to every AWS call, a stand-in for the
round trip to IAM, and notes the arrival (time.time()) and `service:Action` of each. One
OpenBao dev server, one PostgreSQL server (tests/pgserver.py's PgServer: initdb in a
temporary directory, as the `postgres` user when run as root). Every run gets a fresh
seeding, a fresh database and a fresh KV mount; its daemons (`rotator daemon`, each with
its own configuration file and HTTP port, all on the same `state.url`) are started
together and stopped with SIGTERM.

1. Rotation throughput, for each `aws.iam_calls_per_second` in --budgets (20, the
   default; 5, which binds; 1000, out of the way), with 1 and then 3 daemons: N users,
   each with one key 120 days old (`policy.max_age` 90d), `policy.overlap: 0s`,
   `policy.delete_after: 0s`, `schedule.tick: 1s` and `schedule.scan: 1h`, so the
   daemons' first scan (at start) is the only one: the holder of the account's scan
   lease scans and opens every rotation, and every daemon's ticks advance them.
   Throughput is N over the time from the first rotation opened to the last DONE
   (`created_at` and `updated_at` in the database). The calls the proxy received before
   the first rotation was opened are the start-up scan's; those after, the rotations'.
   The budget is a token bucket per account in each daemon's process
   (rotator/wiring.py): a fleet of K daemons may send K times it to one account.
   Afterwards every user must hold exactly one key, Active, the one Vault serves.
2. Scan cost, with 1 and then 3 daemons: N users, a tenth of them past `warn_age` (85
   days: a scan reads their key ids with ListAccessKeys), none due, `schedule.scan`
   every --scan-every seconds. From the first GetAccountAuthorizationDetails on, for
   --scan-periods periods, the proxy counts the scans' calls (every IAM call: nothing
   else runs) across the fleet.

Ratios are against the one-daemon run of the same pair in the same run, never absolute
timings. Results: a Markdown table on stdout, benchmarks/results/fleet.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.append(str(ROOT))

from containment import bao_version, child_env, snapshot_code  # noqa: E402
from memory import DaemonWatch  # noqa: E402
from proxy import CountingProxy  # noqa: E402

from rotator.sandbox import (  # noqa: E402
    ACCOUNT_ID,
    FAKE_AWS_ENV,
    LocalAws,
    LocalVault,
    SeedKey,
    free_port,
)
from tests.pgserver import Missing, PgServer, find_bindir  # noqa: E402

RESULTS = BENCH / "results"
DELAY = 0.050  # seconds the proxy adds to every AWS call
FLEET = 3  # daemons in the fleet, against 1
DUE_AGE = timedelta(days=120)
WARN_AGE = timedelta(days=85)  # past warn_age (80d), short of max_age (90d)
DEFAULT_BUDGET = 20.0  # aws.iam_calls_per_second's default
SCAN_CALLS = (
    "iam:GetAccountAuthorizationDetails",
    "iam:GenerateCredentialReport",
    "iam:GetCredentialReport",
    "iam:ListAccessKeys",
)
START_WAIT = 60.0  # seconds a daemon may take to be ready
# The target: IAM calls of the scans per period across the fleet, 3 daemons against 1.
TARGET_SCAN_RATIO = 1.1


@dataclass(frozen=True)
class Sizes:
    users: int  # due users of the throughput runs
    bound_users: int  # due users where the budget (< 20) binds: 4 N / budget seconds
    scan_users: int  # users of the scan-cost runs, a tenth past warn_age
    scan_every: float  # seconds: schedule.scan of the scan-cost runs
    scan_periods: int  # periods counted


FULL = Sizes(users=300, bound_users=100, scan_users=300, scan_every=10.0, scan_periods=6)
QUICK = Sizes(users=60, bound_users=30, scan_users=100, scan_every=5.0, scan_periods=4)


def log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


# --- what the proxy saw -----------------------------------------------------------------


class Calls:
    """Every AWS call the proxy received: (time.time(), service:Action)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[tuple[float, str]] = []

    def on_call(self, name: str, body: bytes) -> None:
        with self._lock:
            self._calls.append((time.time(), name))

    def between(self, start: float, end: float = math.inf) -> Counter[str]:
        with self._lock:
            return Counter(name for at, name in self._calls if start <= at < end)

    def times(self, name: str, start: float) -> list[float]:
        with self._lock:
            return [at for at, n in self._calls if n == name and at >= start]


def iam(counts: Counter[str]) -> int:
    return sum(n for name, n in counts.items() if name.startswith("iam:"))


# --- the rig ----------------------------------------------------------------------------


class Rig:
    """moto behind the counting proxy, OpenBao, PostgreSQL; a code snapshot the daemons
    run, so that edits made to the tree meanwhile change nothing."""

    def __init__(self, scratch: Path, cleanup: contextlib.ExitStack, code: Path) -> None:
        self.scratch = scratch
        self.aws = LocalAws().start()
        cleanup.callback(self.aws.stop)
        self.calls = Calls()
        self.proxy = CountingProxy(
            self.aws.endpoint_url, delay=DELAY, on_call=self.calls.on_call
        ).start()
        cleanup.callback(self.proxy.stop)
        self.vault = LocalVault(log_path=scratch / "bao.log").start()
        cleanup.callback(self.vault.stop)
        self.pg = PgServer(find_bindir()).init().start()
        cleanup.callback(self.pg.close)
        self.env = child_env(self.proxy.url, scratch, code)
        self.code = code
        self.runs = 0
        self.started = 0.0  # time.time() when the current fleet began to start

    def check_code(self) -> None:
        """Refuse to run unless a daemon (`python -P`, in the repository) imports rotator
        from the snapshot: -P keeps the working directory off the import path."""
        done = subprocess.run(
            [sys.executable, "-P", "-c", "import rotator; print(rotator.__file__)"],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=ROOT,
        )
        found = Path(done.stdout.strip() or ".").resolve()
        if not found.is_relative_to(self.code.resolve()):
            raise SystemExit(f"daemons import rotator from {found}, not from {self.code}")

    @contextlib.contextmanager
    def fleet(
        self, name: str, daemons: int, budget: float, scan: str
    ) -> Iterator[tuple[list[Member], str]]:
        """`daemons` daemons on a fresh database and KV mount; (members, database URL)."""
        self.runs += 1
        work = self.scratch / f"{self.runs:02d}-{name}"
        work.mkdir()
        database = self.pg.create_database()
        url = self.pg.url(database)
        mount = f"fleet{self.runs}"
        self.vault.enable_kv2(mount)
        members: list[Member] = []
        self.started = time.time()
        try:
            for i in range(daemons):
                home = work / f"daemon-{i}"
                home.mkdir()
                port = free_port()
                config = {
                    "aws": {
                        "region": "us-east-1",
                        "endpoint_url": self.proxy.url,
                        "iam_calls_per_second": budget,
                    },
                    "vault": {
                        "url": self.vault.addr,
                        "auth": {"token": self.vault.token},
                        "mount": mount,
                    },
                    "state": {"url": url},
                    "policy": {"overlap": "0s", "delete_after": "0s"},
                    "schedule": {"scan": scan, "tick": "1s"},
                    "http": {"listen": f"127.0.0.1:{port}"},
                }
                path = home / "rotator.yaml"
                path.write_text(yaml.safe_dump(config, sort_keys=False))
                cmd = [sys.executable, "-P", "-m", "rotator", "--config", str(path)]
                cmd += ["--log-format", "json", "daemon"]
                watch = DaemonWatch(cmd, self.env, home / "daemon.log", every=1.0)
                members.append(Member(watch.start(), port))
            for m in members:
                if not m.watch.wait_for("daemon.ready", timeout=START_WAIT):
                    raise RuntimeError(f"a daemon never became ready: {m.watch.tail()}")
            yield members, url
        finally:
            for m in members:
                m.watch.stop()
            self.pg.drop_database(database)

    def vault_key(self, mount: str, user: str) -> str | None:
        try:
            doc = self.vault.request("GET", f"/v1/{mount}/data/aws/{ACCOUNT_ID}/{user}")
        except OSError:
            return None
        return str(doc["data"]["data"]["aws_access_key_id"])


@dataclass
class Member:
    """One daemon of a fleet, its log watched and its /metrics read over HTTP."""

    watch: DaemonWatch
    port: int

    def metrics(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def count(self, event: str, **fields: str) -> int:
        return sum(
            all(e.fields.get(k) == v for k, v in fields.items())
            for e in self.watch.events
            if e.name == event
        )


def iam_sent(metrics: dict[str, float]) -> int:
    """The IAM calls a daemon counted itself (rotator_aws_calls_total)."""
    prefix = 'rotator_aws_calls_total{operation="iam:'
    return int(sum(v for k, v in metrics.items() if k.startswith(prefix)))


# --- 1. rotation throughput ---------------------------------------------------------------


@dataclass
class Throughput:
    daemons: int
    budget: float
    users: int
    done: int = 0
    states: dict[str, int] = field(default_factory=dict)
    start_to_first_open_s: float | None = None
    window_s: float | None = None  # first rotation opened -> last DONE
    scan_calls: dict[str, int] = field(default_factory=dict)  # before the first open
    rotation_calls: dict[str, int] = field(default_factory=dict)  # after it
    per_daemon_done: list[int] = field(default_factory=list)
    per_daemon_iam: list[int] = field(default_factory=list)
    per_daemon_scans: list[int] = field(default_factory=list)
    leases_held_skips: int = 0  # rotation.lease_held: a tick found another daemon on it
    stale: int = 0  # rotation.stale: a write refused (LeaseLost and the like)
    wrong_users: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def per_minute(self) -> float | None:
        if not self.window_s or self.done < self.users:
            return None
        return self.users / self.window_s * 60

    @property
    def iam_per_rotation(self) -> float | None:
        return iam(Counter(self.rotation_calls)) / self.done if self.done else None

    @property
    def iam_rate(self) -> float | None:
        """IAM calls per second across the fleet during the rotations."""
        return iam(Counter(self.rotation_calls)) / self.window_s if self.window_s else None

    def doc(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(
            rotations_per_minute=_round(self.per_minute),
            iam_calls_per_rotation=_round(self.iam_per_rotation, 2),
            fleet_iam_calls_per_second=_round(self.iam_rate),
            fleet_budget=self.daemons * self.budget,
        )
        return d


def rotations(rig: Rig, daemons: int, budget: float, users: int, timeout: float) -> Throughput:
    result = Throughput(daemons, budget, users)
    rig.aws.reset()
    now = datetime.now(UTC)
    names = [f"fleet-{i:04d}" for i in range(users)]
    for name in names:
        rig.aws.add_user(name, keys=[SeedKey(age=DUE_AGE)], now=now)
    label = f"{daemons} daemon(s), budget {budget:g}/s, {users} users"
    log(f"rotations: {label}")
    with rig.fleet(f"rotate-{daemons}x{budget:g}", daemons, budget, "1h") as (members, url):
        started = rig.started
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result.states = states(url)
            if result.states.get("DONE", 0) >= users or result.states.get("FAILED"):
                break
            time.sleep(0.5)
        result.states = states(url)
        result.done = result.states.get("DONE", 0)
        first, last = window(url)
        if first is not None and last is not None:
            result.start_to_first_open_s = round(first - started, 2)
            result.window_s = round(last - first, 2)
            result.scan_calls = dict(sorted(rig.calls.between(started, first).items()))
            result.rotation_calls = dict(sorted(rig.calls.between(first, last + 1).items()))
        for m in members:
            result.per_daemon_iam.append(iam_sent(m.metrics()))
            result.per_daemon_done.append(m.count("rotation.transition", to="DONE"))
            result.per_daemon_scans.append(m.count("daemon.scan_done"))
            result.leases_held_skips += m.count("rotation.lease_held")
            result.stale += m.count("rotation.stale")
        mount = f"fleet{rig.runs}"
        for name in names:
            keys = rig.aws.keys(name)
            served = rig.vault_key(mount, name)
            if len(keys) != 1 or served not in keys or keys[served].value != "Active":
                result.wrong_users.append(f"{name}: IAM {keys}, Vault {served}")
    if result.done < users:
        result.error = f"{result.done} of {users} DONE within {timeout:g} s: {result.states}"
    log(
        f"  {result.done}/{users} DONE, {_fmt(result.per_minute)} rotations/min, "
        f"{_fmt(result.iam_rate)} IAM calls/s; by daemon {result.per_daemon_done}"
    )
    return result


def states(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT state, count(*) FROM rotations GROUP BY state").fetchall()
    return {str(s): int(n) for s, n in rows}


def window(url: str) -> tuple[float | None, float | None]:
    """When the first rotation was opened, when the last one became DONE (epoch)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT min(created_at), max(updated_at) FILTER (WHERE state = 'DONE') FROM rotations"
        ).fetchone()
    if row is None or row[0] is None or row[1] is None:
        return None, None
    return row[0].timestamp(), row[1].timestamp()


# --- 2. scan cost -------------------------------------------------------------------------


@dataclass
class ScanCost:
    daemons: int
    users: int
    warn: int
    period_s: float
    periods: int
    scans: int = 0  # GetAccountAuthorizationDetails (one page each) in the window
    calls: dict[str, int] = field(default_factory=dict)
    per_daemon_scans: list[int] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def scan_calls_per_period(self) -> float:
        return sum(self.calls.get(c, 0) for c in SCAN_CALLS) / self.periods

    @property
    def iam_per_period(self) -> float:
        return iam(Counter(self.calls)) / self.periods

    def doc(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(
            scans_per_period=round(self.scans / self.periods, 2),
            scan_calls_per_period=round(self.scan_calls_per_period, 1),
            iam_calls_per_period=round(self.iam_per_period, 1),
        )
        return d


def scan_cost(rig: Rig, daemons: int, users: int, period: float, periods: int) -> ScanCost:
    rig.aws.reset()
    now = datetime.now(UTC)
    warn = 0
    for i in range(users):
        warned = i % 10 == 0
        age = WARN_AGE if warned else timedelta(days=5 + (i * 7) % 70, hours=i % 24)
        rig.aws.add_user(f"scan-{i:04d}", keys=[SeedKey(age=age)], now=now)
        warn += warned
    result = ScanCost(daemons, users, warn, period, periods)
    log(f"scans: {daemons} daemon(s), {users} users ({warn} past warn_age), every {period:g} s")
    with rig.fleet(f"scan-{daemons}", daemons, DEFAULT_BUDGET, f"{period:g}s") as (members, _):
        started = rig.started
        first = _first(rig.calls, "iam:GetAccountAuthorizationDetails", started, START_WAIT)
        if first is None:
            result.error = "no scan within a minute of the start"
            return result
        end = first + period * periods
        time.sleep(max(0.0, end - time.time()) + 1.0)
        counts = rig.calls.between(first - 0.5, end)  # the scan's STS call comes first
        result.calls = dict(sorted(counts.items()))
        starts = rig.calls.times("iam:GetAccountAuthorizationDetails", first - 0.5)
        starts = [t for t in starts if t < end]
        result.scans = len(starts)
        result.gaps_s = [round(b - a, 2) for a, b in itertools.pairwise(starts)]
        result.per_daemon_scans = [m.count("daemon.scan_done") for m in members]
    log(
        f"  {result.scans} scans in {periods} periods, {result.scan_calls_per_period:.1f} "
        f"scan calls per period; by daemon {result.per_daemon_scans}"
    )
    return result


def _first(calls: Calls, name: str, start: float, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = calls.times(name, start)
        if found:
            return found[0]
        time.sleep(0.1)
    return None


# --- report -------------------------------------------------------------------------------


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "n/a"
    return f"{value / base:.2f}x"


def throughput_table(runs: list[Throughput]) -> list[str]:
    out = [
        "| `iam_calls_per_second` (per daemon) | daemons | fleet budget | due users "
        "| start to first open | first open to last DONE | rotations/min | vs 1 daemon "
        "| IAM calls/s (fleet) | share of fleet budget | IAM calls/rotation "
        "| DONE by each daemon | start-up scan: IAM calls (GAAD) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    base: dict[tuple[float, int], float | None] = {
        (r.budget, r.users): r.per_minute for r in runs if r.daemons == 1
    }
    for r in runs:
        rate = r.iam_rate
        share = f"{rate / (r.daemons * r.budget):.0%}" if rate else "n/a"
        scan = Counter(r.scan_calls)
        gaad = scan.get("iam:GetAccountAuthorizationDetails", 0)
        out.append(
            f"| {r.budget:g} | {r.daemons} | {r.daemons * r.budget:g}/s | {r.users} "
            f"| {_fmt(r.start_to_first_open_s)} s | {_fmt(r.window_s)} s "
            f"| {_fmt(r.per_minute, 0)} | {_ratio(r.per_minute, base.get((r.budget, r.users)))} "
            f"| {_fmt(rate)} | {share} | {_fmt(r.iam_per_rotation, 2)} "
            f"| {' / '.join(map(str, r.per_daemon_done))} | {iam(scan)} ({gaad}) |"
        )
    return out


def scan_table(runs: list[ScanCost]) -> list[str]:
    out = [
        "| daemons | users (past warn_age) | `schedule.scan` | scans in the window "
        "| scans per period | scan IAM calls per period | vs 1 daemon "
        "| GAAD / GenerateCredentialReport / GetCredentialReport / ListAccessKeys "
        "| scans by each daemon |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    base = next((r.scan_calls_per_period for r in runs if r.daemons == 1), None)
    for r in runs:
        parts = " / ".join(str(r.calls.get(c, 0)) for c in SCAN_CALLS)
        out.append(
            f"| {r.daemons} | {r.users} ({r.warn}) | {r.period_s:g}s | {r.scans} in "
            f"{r.periods} | {r.scans / r.periods:.2f} | {r.scan_calls_per_period:.1f} "
            f"| {_ratio(r.scan_calls_per_period, base)} | {parts} "
            f"| {' / '.join(map(str, r.per_daemon_scans))} |"
        )
    return out


def targets(rotation_runs: list[Throughput], scan_runs: list[ScanCost]) -> list[dict[str, Any]]:
    found = []
    one = next((r for r in scan_runs if r.daemons == 1), None)
    many = next((r for r in scan_runs if r.daemons == FLEET), None)
    if one and many:
        ratio = many.scan_calls_per_period / one.scan_calls_per_period
        found.append(
            {
                "target": f"scan IAM calls per period, {FLEET} daemons / 1 <= {TARGET_SCAN_RATIO}",
                "measured": f"{ratio:.2f}x ({many.scan_calls_per_period:.1f} / "
                f"{one.scan_calls_per_period:.1f})",
                "pass": ratio <= TARGET_SCAN_RATIO and not (one.error or many.error),
            }
        )
    for r in rotation_runs:
        gaad = r.scan_calls.get("iam:GetAccountAuthorizationDetails", 0)
        found.append(
            {
                "target": f"{r.daemons} daemon(s), budget {r.budget:g}: every rotation DONE, "
                "each user one Active key that Vault serves; one start-up scan",
                "measured": f"{r.done}/{r.users} DONE, {len(r.wrong_users)} users wrong, "
                f"{gaad} start-up scan(s)",
                "pass": r.done == r.users and not r.wrong_users and gaad == 1,
            }
        )
    return found


def describe_run(opts: argparse.Namespace, wall: float, load: tuple[float, float]) -> str:
    pg = subprocess.run(
        [str(find_bindir() / "postgres"), "--version"], capture_output=True, text=True
    ).stdout.split()  # postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)
    return (
        f"Run {datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')} "
        f"({'quick' if opts.quick else 'full'}), {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, moto {metadata.version('moto')}, "
        f"OpenBao {bao_version()}, PostgreSQL {pg[2] if len(pg) > 2 else '?'}, "
        f"psycopg {metadata.version('psycopg')}, rotator: {opts.code}. "
        f"{DELAY * 1000:.0f} ms added to every AWS call. Total {wall:.0f} s; "
        f"1-min load average {load[0]:.2f} at the start, {load[1]:.2f} at the end."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer users, shorter scan series")
    parser.add_argument(
        "--budgets",
        default="20,5,1000",
        help="aws.iam_calls_per_second of each throughput pair (default 20,5,1000); "
        "a budget under 20 gets the smaller --bound-users",
    )
    parser.add_argument("--users", type=int, help="due users of a throughput run")
    parser.add_argument("--bound-users", type=int, help="due users where the budget is < 20")
    parser.add_argument("--no-scans", action="store_true", help="skip the scan-cost runs")
    parser.add_argument("--rev", help="run this git revision of rotator/ (default: the tree)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    opts = parser.parse_args(argv)
    sizes = QUICK if opts.quick else FULL
    opts.sizes = Sizes(
        users=opts.users or sizes.users,
        bound_users=opts.bound_users or sizes.bound_users,
        scan_users=sizes.scan_users,
        scan_every=sizes.scan_every,
        scan_periods=sizes.scan_periods,
    )
    opts.budget_list = [float(b) for b in opts.budgets.split(",") if b.strip()]
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        find_bindir()
    except Missing as exc:
        raise SystemExit(str(exc)) from exc
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "VAULT_ADDR"):
        os.environ.pop(var, None)
    os.environ.update(FAKE_AWS_ENV)
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    scratch = Path(tempfile.mkdtemp(prefix="rotator-fleet-"))
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    opts.code = snapshot_code(scratch / "code", opts.rev)
    log(f"rotator: {opts.code}; scratch directory {scratch}")
    sizes: Sizes = opts.sizes
    rotation_runs: list[Throughput] = []
    scan_runs: list[ScanCost] = []
    try:
        with contextlib.ExitStack() as cleanup:
            rig = Rig(scratch, cleanup, scratch / "code")
            rig.check_code()
            for budget in opts.budget_list:
                users = sizes.users if budget >= DEFAULT_BUDGET else sizes.bound_users
                # The slowest run: the scan and the rotations at one daemon's budget
                # (about 5 IAM calls each), three times over, and a few minutes.
                timeout = 3 * users * 5 / budget + 180
                for daemons in (1, FLEET):
                    rotation_runs.append(rotations(rig, daemons, budget, users, timeout))
            if not opts.no_scans:
                for daemons in (1, FLEET):
                    scan_runs.append(
                        scan_cost(
                            rig, daemons, sizes.scan_users, sizes.scan_every, sizes.scan_periods
                        )
                    )
    except KeyboardInterrupt:
        log("interrupted")
        opts.keep = True
    wall = time.monotonic() - started
    header = describe_run(opts, wall, (load_start, os.getloadavg()[0]))
    found = targets(rotation_runs, scan_runs)
    lines = [header, "", "Rotation throughput:", "", *throughput_table(rotation_runs)]
    if scan_runs:
        lines += ["", "Scan cost:", "", *scan_table(scan_runs)]
    problems = [f"- {r.daemons} daemon(s), budget {r.budget:g}: {r.error}" for r in rotation_runs]
    problems += [f"  - {w}" for r in rotation_runs for w in r.wrong_users[:5]]
    problems += [f"- scans, {r.daemons} daemon(s): {r.error}" for r in scan_runs if r.error]
    problems = [p for p in problems if not p.endswith(": None")]
    if problems:
        lines += ["", "Problems:", "", *problems]
    lines += ["", "Targets:", ""]
    lines += [
        f"- **{'PASS' if t['pass'] else 'FAIL'}** {t['target']}: {t['measured']}" for t in found
    ]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fleet.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "fleet.json").write_text(
        json.dumps(
            {
                "run": header,
                "sizes": sizes.__dict__,
                "rotations": [r.doc() for r in rotation_runs],
                "scans": [r.doc() for r in scan_runs],
                "targets": found,
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    if opts.keep:
        print(f"\nscratch directory kept: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if all(t["pass"] for t in found) else 1


if __name__ == "__main__":
    sys.exit(main())
