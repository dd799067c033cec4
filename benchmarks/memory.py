"""The daemon's resident memory over many scans: does it stay flat?

    python benchmarks/memory.py                  # 5,000 users, 20 scans every 10 s, with
                                                 # and without give_back (~10 min on 2 cores)
    python benchmarks/memory.py --users 1000 --scans 5 --interval 5s   # smoke (~1 min)

What runs (benchmarks/README.md says why and how to read the table):

A moto server (LocalAws, in this process) is seeded with `--users` IAM users, one key
each; every `--due-every`-th key (default 500th: 10 of 5,000) is older than max_age, the
others are 5 to 74 days old, so every scan reads the whole account and writes little.
`rotator daemon` runs against it with an OpenBao dev server, `schedule.scan` every
`--interval` (APScheduler adds up to 10% jitter), `policy.overlap: 0s` and
`policy.delete_after: 0s`: the first scan opens and completes the due users' rotations,
every later one only reads. `MALLOC_ARENA_MAX=2`, as in deploy/ (`--arenas 0` leaves
glibc's default).

The daemon is one process. Its VmRSS (/proc/PID/status) is read every 50 ms and at the
moment each of its JSON log lines arrives on stderr: `daemon.backends_ok` (start-up done:
imports, the AWS and Vault clients, the state store; the scheduler and the first scan
not started yet), `daemon.ready`, and `daemon.scan_done` (logged after the scan, the
memory given back and the tick that follows it). A scan started `seconds` (a field of
`scan_done`) before its line; the samples in between give its peak, and the last sample
before it the idle RSS between two scans. Its open files (/proc/PID/fd) are counted at
each `scan_done`. Meanwhile /readyz is fetched every `--probe-every` seconds, as a
readiness probe would (each request is served on a thread of its own and reads the
state store). After `--scans` scans: SIGTERM.

Then the same again on a fresh seeding, state store and Vault, with the daemon started
through benchmarks/daemon_keep_memory.py, which replaces `rotator.daemon.give_back`
(gc.collect + malloc_trim after each scan) with a no-op in its own process.

Results: benchmarks/results/memory.json and memory.md; the targets as PASS/FAIL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from rotator.durations import parse_duration  # noqa: E402
from rotator.sandbox import FAKE_AWS_ENV, LocalAws, LocalVault, SeedKey, free_port  # noqa: E402

RESULTS = BENCH / "results"
MIB = 1024.0
MAX_AGE = timedelta(days=90)
DUE_AGE = timedelta(days=120)
REPORT_AFTER = (1, 5, 10, 20)  # the scans whose RSS the table shows

TARGET_GROWTH = 1.15  # VmRSS after the last scan / after the first
TARGET_IDLE_MIB = 100  # VmRSS once started, before the first scan
# Open files after the last scan, beyond those after the first: a connection, a socket
# or a file left behind by each scan or request would show here long before in RSS.
TARGET_FILES_SLACK = 2


def log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (KiB) and Threads of a live process; empty once it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


# --- a daemon under watch ---------------------------------------------------------------


@dataclass
class Event:
    """One JSON log line of the daemon, with this process's clock and the daemon's
    VmRSS when it arrived."""

    name: str
    fields: dict[str, Any]
    at: float  # time.monotonic() on arrival
    rss_kib: int
    open_files: int


@dataclass
class DaemonWatch:
    """`cmd` as a child process whose stderr JSON lines are parsed as they arrive (and
    copied to `log_path`), and whose VmRSS is sampled every `every` seconds."""

    cmd: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    every: float = 0.05
    events: list[Event] = field(default_factory=list)
    samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, KiB)

    def __post_init__(self) -> None:
        self._changed = threading.Condition()
        self._done = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonWatch:
        self.proc = subprocess.Popen(
            list(self.cmd),
            env=dict(self.env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            start_new_session=True,
        )
        self.started = time.monotonic()
        assert self.proc.stderr is not None
        threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True).start()
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int:
        return proc_status(self.pid).get("VmRSS", 0)

    def open_files(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return 0

    def _read(self, stream: IO[bytes]) -> None:
        with open(self.log_path, "wb") as copy:
            for raw in stream:
                copy.write(raw)
                rss = self.rss_kib()
                line = raw.decode(errors="replace").strip()
                if not line.startswith("{"):
                    continue
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                event = Event(str(doc.get("event")), doc, time.monotonic(), rss, self.open_files())
                with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()
        with self._changed:
            self._done.set()
            self._changed.notify_all()

    def _sample(self) -> None:
        while not self._done.wait(self.every):
            rss = self.rss_kib()
            if rss:
                self.samples.append((time.monotonic(), rss))

    def wait_for(self, name: str, count: int = 1, timeout: float = 60.0) -> list[Event]:
        """The first `count` events called `name`; fewer if the daemon exited or
        `timeout` seconds passed first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [e for e in self.events if e.name == name]
                left = deadline - time.monotonic()
                if len(found) >= count or self._done.is_set() or left <= 0:
                    return found[:count]
                self._changed.wait(min(left, 1.0))

    def peak_kib(self, start: float, end: float) -> int:
        return max((kib for at, kib in self.samples if start <= at <= end), default=0)

    def last_before(self, moment: float) -> int | None:
        before = [kib for at, kib in self.samples if at < moment]
        return before[-1] if before else None

    def stop(self, timeout: float = 20.0) -> tuple[int | None, float]:
        """SIGTERM; (exit code, seconds it took)."""
        assert self.proc is not None
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._done.wait(5)
        return self.proc.returncode, round(time.monotonic() - started, 2)

    def tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def mib(kib: int | None) -> float | None:
    return round(kib / MIB, 1) if kib else None


# --- seeding and configuration ----------------------------------------------------------


def seed(aws: LocalAws, users: int, due_every: int, now: datetime) -> int:
    """Users `mem-<i>` with one active key each; every `due_every`-th is due (120 days
    old), the others 5 to 74 days old. Returns how many are due."""
    due = 0
    for i in range(users):
        is_due = i % due_every == 0
        age = DUE_AGE if is_due else timedelta(days=5 + (i * 7) % 70, hours=i % 24)
        aws.add_user(
            f"mem-{i:05d}",
            path="/bench/",
            tags={"team": f"team-{i % 25:02d}", "owner": f"owner-{i % 300}"},
            keys=[SeedKey(age=age, last_used_ago=timedelta(hours=1 + i % 48))],
            now=now,
        )
        due += is_due
    return due


def daemon_env(aws_url: str, work: Path, arenas: int) -> dict[str, str]:
    """Fake credentials, moto as the endpoint, nothing of the caller's AWS/Vault/rotator
    settings; MALLOC_ARENA_MAX as deploy/ sets it (0: glibc's default)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "VAULT_", "ROTATOR_", "BOTO_", "MALLOC_", "PYTHONMALLOC"))
    }
    env.update(FAKE_AWS_ENV)
    env.update(
        {
            "AWS_ENDPOINT_URL": aws_url,
            "AWS_CONFIG_FILE": str(work / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(work / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if arenas:
        env["MALLOC_ARENA_MAX"] = str(arenas)
    return env


def write_config(work: Path, aws_url: str, vault: LocalVault, interval: str) -> tuple[Path, int]:
    """The daemon's configuration file, and the port its HTTP server listens on."""
    port = free_port()
    settings = {
        "aws": {"region": "us-east-1", "endpoint_url": aws_url},
        "vault": {
            "url": vault.addr,
            "auth": {"method": "token", "token": vault.token},
            "mount": "secret",
        },
        "state": {"path": str(work / "state.db")},
        "policy": {"max_age": f"{MAX_AGE.days}d", "overlap": "0s", "delete_after": "0s"},
        "schedule": {"scan": interval},
        "http": {"listen": f"127.0.0.1:{port}"},
    }
    path = work / "rotator.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path, port


class Prober:
    """GET `url` every `every` seconds on a thread, as a readiness probe does; counts
    the answers by HTTP status ("error" when there was none)."""

    def __init__(self, url: str, every: float) -> None:
        self.url, self.every = url, every
        self.answers: dict[str, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Prober:
        if self.every > 0:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._done.wait(self.every):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as answer:
                    status = str(answer.status)
            except urllib.error.HTTPError as exc:
                status = str(exc.code)
            except (urllib.error.URLError, OSError):
                status = "error"
            self.answers[status] = self.answers.get(status, 0) + 1

    def stop(self) -> dict[str, int]:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.answers


# --- one series of scans ----------------------------------------------------------------


def series(
    aws: LocalAws,
    *,
    give_back: bool,
    users: int,
    due_every: int,
    scans: int,
    interval: str,
    arenas: int,
    probe_every: float,
    scratch: Path,
) -> dict[str, Any]:
    """Seed afresh, start the daemon, probe /readyz, watch `scans` scans, stop it."""
    label = "give_back" if give_back else "no_give_back"
    work = scratch / label
    work.mkdir()
    aws.reset()
    due = seed(aws, users, due_every, datetime.now(UTC))
    vault = LocalVault(log_path=work / "bao.log").start()
    config, port = write_config(work, aws.endpoint_url, vault, interval)
    entry = (
        [sys.executable, "-m", "rotator"]
        if give_back
        else [sys.executable, str(BENCH / "daemon_keep_memory.py")]
    )
    cmd = [*entry, "--config", str(config), "--log-format", "json", "daemon"]
    period = parse_duration(interval).total_seconds()
    result: dict[str, Any] = {"give_back": give_back, "users": users, "due": due, "scans": []}
    watch = DaemonWatch(cmd, daemon_env(aws.endpoint_url, work, arenas), work / "daemon.log")
    probe = Prober(f"http://127.0.0.1:{port}/readyz", probe_every)
    log(f"{label}: {users:,} users ({due} due), a scan every {interval}, {scans} scans")
    try:
        watch.start()
        (started,) = watch.wait_for("daemon.backends_ok", timeout=120) or (None,)
        (ready,) = watch.wait_for("daemon.ready", timeout=60) or (None,)
        if started is None or ready is None:
            result["error"] = "the daemon never became ready"
            result["stderr_tail"] = watch.tail()
            return result
        result["startup_s"] = round(started.at - watch.started, 2)
        result["startup_mib"] = mib(started.rss_kib)
        result["ready_mib"] = mib(ready.rss_kib)
        result["open_files_ready"] = ready.open_files
        probe.start()
        for n in range(1, scans + 1):
            done = watch.wait_for("daemon.scan_done", n, timeout=max(120.0, 4 * period))
            if len(done) < n:
                break  # the daemon exited, or the scan never finished
            last = done[-1]
            began = last.at - float(last.fields.get("seconds", 0.0))
            scan = {
                "scan": n,
                "after_mib": mib(last.rss_kib),
                "peak_mib": mib(watch.peak_kib(began, last.at)),
                "idle_before_mib": mib(watch.last_before(began)),
                "seconds": last.fields.get("seconds"),
                "keys": last.fields.get("keys"),
                "opened": last.fields.get("opened"),
                "advanced": last.fields.get("advanced"),
                "open_files": last.open_files,
            }
            result["scans"].append(scan)
            log(
                f"{label}: scan {n}: {scan['after_mib']} MiB after it, peak "
                f"{scan['peak_mib']} MiB, {scan['seconds']} s"
            )
        time.sleep(2)
        status = proc_status(watch.pid)
        result["end_mib"] = mib(status.get("VmRSS"))
        result["vmhwm_mib"] = mib(status.get("VmHWM"))
        result["threads"] = status.get("Threads")
        result["open_files_end"] = watch.open_files()
        result["failures"] = [
            e.fields for e in watch.events if e.name.endswith(("_failed", "_crashed"))
        ][:5]
    finally:
        result["readyz"] = probe.stop()
        result["exit_code"], result["stop_s"] = watch.stop() if watch.proc else (None, 0.0)
        vault.stop()
    if len(result["scans"]) < scans:
        result["error"] = f"{len(result['scans'])} of {scans} scans completed"
        result["stderr_tail"] = watch.tail()
    return summarize(result)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    by_scan = {s["scan"]: s for s in result["scans"]}
    result["after"] = {n: by_scan[n]["after_mib"] for n in REPORT_AFTER if n in by_scan}
    if by_scan:
        first, last = by_scan[1]["after_mib"], by_scan[max(by_scan)]["after_mib"]
        result["last_scan"] = max(by_scan)
        result["growth"] = round(last / first, 3) if first and last else None
        result["peak_mib"] = max(s["peak_mib"] or 0 for s in result["scans"])
        idle = [s["idle_before_mib"] for s in result["scans"][1:] if s["idle_before_mib"]]
        result["idle_between_scans_mib"] = idle[-1] if idle else None
    return result


# --- report -----------------------------------------------------------------------------


def evaluate(runs: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    run = runs.get("give_back")
    if not run or "growth" not in run:
        return [{"target": "the daemon completes its scans", "measured": "no", "pass": False}]
    growth, idle = run["growth"], run["startup_mib"]
    files = [s["open_files"] for s in run["scans"]]
    last = run["last_scan"]
    return [
        {
            "target": f"VmRSS after scan {last} <= {TARGET_GROWTH:g} x after scan 1",
            "measured": f"{growth}x ({run['after'].get(1)} -> {run['scans'][-1]['after_mib']} MiB)",
            "pass": growth is not None and growth <= TARGET_GROWTH and "error" not in run,
        },
        {
            "target": f"idle daemon (started, before its first scan) < {TARGET_IDLE_MIB} MiB",
            "measured": f"{idle} MiB VmRSS",
            "pass": idle is not None and idle < TARGET_IDLE_MIB,
        },
        {
            "target": f"open files after scan {last} <= after scan 1 + {TARGET_FILES_SLACK}",
            "measured": f"{files[0]} -> {files[-1]}",
            "pass": files[-1] <= files[0] + TARGET_FILES_SLACK,
        },
    ]


def markdown(results: dict[str, Any]) -> str:
    p = results["params"]
    shown = [n for n in REPORT_AFTER if n <= p["scans"]]
    due = next((r.get("due") for r in results["runs"].values()), "?")
    probes = f"GET /readyz every {p['probe_every']:g} s" if p["probe_every"] else "no probes"
    lines = [
        f"Run {results['generated_at']}, {results['cpus']} CPUs, Python {results['python']}, "
        f"rotator at {results['rotator_commit']}"
        f"{' + uncommitted changes' if results['rotator_dirty'] else ''}; "
        f"{p['users']:,} users ({due} due), `schedule.scan: {p['interval']}`, {probes}, "
        f"MALLOC_ARENA_MAX={p['arenas'] or 'unset'}; 1-min load average "
        f"{results['loadavg_start']} at the start, {results['loadavg_end']} at the end. "
        f"Total {results['total_s']:.0f} s.",
        "",
        "| daemon | started, before scan 1 | "
        + " | ".join(f"after scan {n}" for n in shown)
        + " | after last / after 1 | idle between scans | peak in a scan | VmHWM "
        "| open files (after 1, last) |",
        "|---|---:|" + "---:|" * len(shown) + "---:|---:|---:|---:|---:|",
    ]
    for name, label in (
        ("give_back", "`give_back` after each scan"),
        ("no_give_back", "`give_back` a no-op (baseline)"),
    ):
        run = results["runs"].get(name)
        if not run:
            continue
        after = run.get("after", {})
        cells = [f"{after[n]} MiB" if after.get(n) is not None else "n/a" for n in shown]
        files = [s["open_files"] for s in run["scans"]]
        lines.append(
            f"| {label} | {run.get('startup_mib')} MiB | "
            + " | ".join(cells)
            + f" | {run.get('growth')}x | {run.get('idle_between_scans_mib')} MiB "
            f"| {run.get('peak_mib')} MiB | {run.get('vmhwm_mib')} MiB "
            f"| {f'{files[0]}, {files[-1]}' if files else 'n/a'} |"
        )
    g = results["runs"].get("give_back", {})
    if g.get("scans"):
        secs = [s["seconds"] for s in g["scans"] if s.get("seconds") is not None]
        answers = ", ".join(f"{n} x {k}" for k, n in sorted(g.get("readyz", {}).items()))
        lines += [
            "",
            f"A scan took {min(secs):.1f}-{max(secs):.1f} s; the first opened "
            f"{g['scans'][0]['opened']} rotations and advanced {g['scans'][0]['advanced']}. "
            f"Start-up (to `daemon.backends_ok`) {g.get('startup_s')} s; /readyz answered "
            f"{answers or 'nothing'}; SIGTERM -> exit {g.get('exit_code')} in "
            f"{g.get('stop_s')} s.",
        ]
    for name, run in results["runs"].items():
        for failure in run.get("failures", []):
            lines.append(f"- {name}: the daemon logged {failure.get('event')}: {failure}")
        if run.get("error"):
            lines.append(f"- {name}: {run['error']}")
    lines += ["", "Targets:", ""]
    for t in results["targets"]:
        lines.append(f"- **{'PASS' if t['pass'] else 'FAIL'}** {t['target']}: {t['measured']}")
    return "\n".join(lines) + "\n"


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the daemon's RSS over many scans")
    parser.add_argument("--users", type=int, default=5_000, help="IAM users (default 5,000)")
    parser.add_argument(
        "--due-every", type=int, default=500, help="every Nth user is due (default 500)"
    )
    parser.add_argument("--scans", type=int, default=20, help="scans to watch (default 20)")
    parser.add_argument("--interval", default="10s", help="schedule.scan (default 10s)")
    parser.add_argument(
        "--arenas", type=int, default=2, help="MALLOC_ARENA_MAX (default 2; 0 = unset)"
    )
    parser.add_argument(
        "--probe-every",
        type=float,
        default=1.0,
        help="seconds between two GET /readyz (default 1; a Kubernetes probe: 15; 0 = none)",
    )
    parser.add_argument("--only", choices=("give_back", "no_give_back"), help="run one series only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    results: dict[str, Any] = {
        "generated_at": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "rotator_commit": git("rev-parse", "--short", "HEAD"),
        "rotator_dirty": bool(git("status", "--porcelain", "--", "rotator")),
        "params": {
            "users": args.users,
            "due_every": args.due_every,
            "scans": args.scans,
            "interval": args.interval,
            "arenas": args.arenas,
            "probe_every": args.probe_every,
        },
        "loadavg_start": round(os.getloadavg()[0], 2),
        "runs": {},
    }
    scratch = Path(tempfile.mkdtemp(prefix="rotator-memory-"))
    aws = LocalAws().start()
    try:
        for give_back in (True, False):
            name = "give_back" if give_back else "no_give_back"
            if args.only and args.only != name:
                continue
            results["runs"][name] = series(
                aws,
                give_back=give_back,
                users=args.users,
                due_every=args.due_every,
                scans=args.scans,
                interval=args.interval,
                arenas=args.arenas,
                probe_every=args.probe_every,
                scratch=scratch,
            )
    finally:
        aws.stop()
    results["total_s"] = round(time.perf_counter() - began, 1)
    results["loadavg_end"] = round(os.getloadavg()[0], 2)
    results["targets"] = evaluate(results["runs"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.out / "memory.md").write_text(text)
    if args.keep:
        log(f"scratch kept: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    print(text)
    return 0 if all(t["pass"] for t in results["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
