"""rotator's benchmark suite: one command, a Markdown and a JSON table.

    python benchmarks/run.py            # full: N = 1,000 and 10,000 users, 200 rotations
    python benchmarks/run.py --quick    # smoke: N = 1,000 only, 40 rotations

What runs (benchmarks/README.md says why and how to read the table):

1. plan comparison, for each N: a moto server (LocalAws, in this process) is seeded with N
   users, one key each, 1% of them older than max_age (90d). Three tools scan it, one
   after the other, each as a child process: `rotator plan --json`, the naive per-user
   boto3 loop (benchmarks/naive.py, the baseline) and Cloud Custodian (`iam-user` +
   `credential` filter, in its own virtualenv). For each: wall time, peak RSS (the
   child's own ru_maxrss from os.wait4), and the AWS calls it sent, counted by a proxy
   (benchmarks/proxy.py) that every tool reaches through AWS_ENDPOINT_URL.
2. rotation throughput: R due users, 50 ms added to every AWS call by the proxy,
   `rotator run --once` against an OpenBao dev server, with aws.concurrency 1 (the
   serial baseline) and then 16, each on a fresh seeding.
3. idle daemon: `rotator daemon` (one process) on a 1,000-user seeding and on none;
   its VmRSS once started, after its first scan and idle after it, and the peak while
   that scan ran. (`benchmarks/memory.py` follows the daemon over many scans.)
4. where the daemon's memory goes (benchmarks/memprobe.py) and which imports are slow.

Results: benchmarks/results/latest.json and latest.md; targets printed as PASS/FAIL.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from memory import DaemonWatch, proc_status  # noqa: E402
from proxy import CountingProxy  # noqa: E402

from rotator.sandbox import (  # noqa: E402
    ACCOUNT_ID,
    FAKE_AWS_ENV,
    LocalAws,
    LocalVault,
    SeedKey,
    free_port,
)

RESULTS = BENCH / "results"
CUSTODIAN_VENV = BENCH / ".venv-custodian"
CUSTODIAN_POLICY = BENCH / "custodian-policy.yml"
CUSTODIAN_POLICY_NAME = "iam-keys-older-than-90d"
MAX_AGE_DAYS = 90
DUE_EVERY = 100  # 1% of the users are due
DUE_AGE = timedelta(days=120)
ROTATION_DELAY = 0.050  # seconds added to every AWS call in the throughput runs
CONCURRENT = 16
MIB = 1024.0

# The targets of issue 6 (benchmark targets, not unit tests).
TARGET_CALL_SHARE = 0.01  # plan at 10,000 users: <= 1% of the naive loop's IAM calls
TARGET_IAM_PER_ROTATION = 6
TARGET_STS_PER_ROTATION = 1
TARGET_SPEEDUP = 5.0
TARGET_PLAN_RSS_MIB = 250
# The daemon is one process that holds boto3 and hvac (issue 6's 60 MB was for a daemon
# that left them to short-lived worker processes). MiB, idle after its first scan.
TARGET_DAEMON_RSS_MIB = 100


def log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


# --- child processes --------------------------------------------------------------------


@dataclass
class Measured:
    """One tool run as a child process."""

    tool: str
    wall_s: float
    maxrss_kib: int
    exit_code: int
    timed_out: bool
    calls: dict[str, int]
    upstream_s: dict[str, float]
    cpu_s: float  # the child's own user + system CPU time
    server_cpu_s: float  # CPU time of this process (moto + proxy) during the run
    loadavg: float  # 1-minute load average when the run ended (other work on the machine)
    stdout: str = field(repr=False)
    stderr_tail: str = field(repr=False)
    stderr_full: str = field(repr=False, default="")
    started_at: datetime = field(repr=False, default_factory=lambda: datetime.now(UTC))

    def count(self, service: str) -> int:
        return sum(n for k, n in self.calls.items() if k.startswith(service + ":"))

    @property
    def iam_calls(self) -> int:
        return self.count("iam")

    @property
    def sts_calls(self) -> int:
        return self.count("sts")

    @property
    def rss_mib(self) -> float:
        return self.maxrss_kib / MIB

    def summary(self) -> dict[str, Any]:
        doc = asdict(self)
        for private in ("stdout", "stderr_full", "started_at"):
            doc.pop(private)
        doc["iam_calls"] = self.iam_calls
        doc["sts_calls"] = self.sts_calls
        doc["peak_rss_mib"] = round(self.rss_mib, 1)
        doc["wall_s"] = round(self.wall_s, 3)
        doc["cpu_s"] = round(self.cpu_s, 2)
        doc["server_cpu_s"] = round(self.server_cpu_s, 2)
        return doc


def rotator_cmd() -> list[str]:
    beside = Path(sys.executable).with_name("rotator")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "rotator"]


def base_env(proxy_url: str, scratch: Path) -> dict[str, str]:
    """The environment of every child: fake credentials, the proxy as the endpoint,
    and nothing of the caller's AWS/Vault/rotator settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "VAULT_", "ROTATOR_", "BOTO_", "CUSTODIAN_"))
    }
    env.update(FAKE_AWS_ENV)
    env.update(
        {
            "AWS_ENDPOINT_URL": proxy_url,
            "AWS_CONFIG_FILE": str(scratch / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def measure(
    tool: str,
    cmd: Sequence[str],
    env: Mapping[str, str],
    *,
    proxy: CountingProxy,
    scratch: Path,
    timeout: float,
    cwd: Path | None = None,
) -> Measured:
    """Run `cmd`, wait for it with os.wait4 and keep the child's own peak RSS."""
    proxy.reset()
    out_path = scratch / f"{tool}.stdout"
    err_path = scratch / f"{tool}.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        server_before = _self_cpu()
        started_at = datetime.now(UTC)
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
        )
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
        server_cpu = _self_cpu() - server_before
        proc.returncode = os.waitstatus_to_exitcode(status)
    calls = proxy.snapshot()
    upstream = proxy.upstream_seconds()
    stderr = err_path.read_text(errors="replace")
    return Measured(
        tool=tool,
        wall_s=wall,
        maxrss_kib=int(usage.ru_maxrss),  # KiB on Linux
        exit_code=proc.returncode,
        timed_out=killed.is_set(),
        calls=calls,
        upstream_s=upstream,
        cpu_s=usage.ru_utime + usage.ru_stime,
        server_cpu_s=server_cpu,
        loadavg=round(os.getloadavg()[0], 2),
        stdout=out_path.read_text(errors="replace"),
        stderr_tail=stderr[-2000:],
        stderr_full=stderr,
        started_at=started_at,
    )


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- seeding ----------------------------------------------------------------------------


def seed_users(
    aws: LocalAws, start: int, stop: int, now: datetime, *, prefix: str = "bench"
) -> set[str]:
    """Users `prefix-<i>` for i in [start, stop): one active key each; every 100th is
    due (120 days old), the others are 5 to 74 days old. Seeded through moto's backend
    objects (no API calls): 10,000 users take seconds. Returns the due names."""
    due = set()
    for i in range(start, stop):
        name = f"{prefix}-{i:05d}"
        is_due = i % DUE_EVERY == 0
        age = DUE_AGE if is_due else timedelta(days=5 + (i * 7) % 70, hours=i % 24)
        aws.add_user(
            name,
            path="/bench/",
            tags={"team": f"team-{i % 25:02d}", "owner": f"owner-{i % 300}"},
            keys=[SeedKey(age=age, last_used_ago=timedelta(hours=1 + i % 48))],
            now=now,
        )
        if is_due:
            due.add(name)
    return due


def seed_due(aws: LocalAws, count: int, now: datetime, prefix: str) -> set[str]:
    names = set()
    for i in range(count):
        name = f"{prefix}-{i:04d}"
        aws.add_user(name, keys=[SeedKey(age=DUE_AGE, last_used_ago=timedelta(days=1))], now=now)
        names.add(name)
    return names


def forget_credential_report(aws: LocalAws) -> None:
    # Every tool starts without a ready credential report, as after a quiet day.
    aws.backend.credential_report = None


def remove_all_users(aws: LocalAws) -> None:
    aws.reset()


# --- configuration ----------------------------------------------------------------------


def write_config(path: Path, settings: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(settings), sort_keys=False))
    return path


def plan_config(scratch: Path, proxy_url: str) -> dict[str, Any]:
    return {
        "aws": {"region": "us-east-1", "endpoint_url": proxy_url},
        # plan never talks to Vault, so it needs no Vault settings; and it never opens
        # the state store when the file does not exist.
        "state": {"path": str(scratch / "plan-state.db")},
        "policy": {"max_age": f"{MAX_AGE_DAYS}d"},
    }


# --- 1. plan comparison -----------------------------------------------------------------


def due_from_plan(doc_text: str) -> set[str]:
    doc = json.loads(doc_text)
    return {i["user_name"] for i in doc["items"] if i["decision"] == "rotate"}


def due_from_naive(doc_text: str) -> set[str]:
    return set(json.loads(doc_text)["due"])


def due_from_custodian(outdir: Path) -> set[str] | None:
    found = list(outdir.glob(f"**/{CUSTODIAN_POLICY_NAME}/resources.json"))
    if not found:
        return None
    return {r["UserName"] for r in json.loads(found[0].read_text())}


def ensure_custodian() -> tuple[Path | None, str | None, str | None]:
    """Cloud Custodian in its own virtualenv, created on first use.
    Returns (custodian executable, version, error)."""
    exe = CUSTODIAN_VENV / "bin" / "custodian"
    if not exe.exists():
        log(f"creating {CUSTODIAN_VENV.relative_to(ROOT)} and installing c7n (first run only)")
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", str(CUSTODIAN_VENV)],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [str(CUSTODIAN_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "c7n"],
                check=True,
                capture_output=True,
            )
        except subprocess.CalledProcessError as exc:
            tail = (exc.stderr or b"").decode(errors="replace")[-500:]
            return None, None, f"installing c7n failed: {tail}"
    version = subprocess.run(
        [str(CUSTODIAN_VENV / "bin" / "python"), "-c", "import c7n.version as v; print(v.version)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return exe, version or None, None


def plan_comparison(
    aws: LocalAws,
    proxy: CountingProxy,
    n: int,
    due: set[str],
    scratch: Path,
    custodian: Path | None,
    timeout: float,
) -> dict[str, Any]:
    work = scratch / f"plan-{n}"
    work.mkdir()
    env = base_env(proxy.url, work)
    config = write_config(work / "rotator.yaml", plan_config(work, proxy.url))
    runs: dict[str, Measured] = {}
    found: dict[str, set[str] | None] = {}
    notes: dict[str, str] = {}

    log(f"N={n}: rotator plan --json")
    forget_credential_report(aws)
    runs["rotator"] = measure(
        "rotator",
        [*rotator_cmd(), "--config", str(config), "--log-level", "WARNING", "plan", "--json"],
        env,
        proxy=proxy,
        scratch=work,
        timeout=timeout,
    )
    found["rotator"] = _safe(due_from_plan, runs["rotator"].stdout)

    log(f"N={n}: naive per-user loop")
    forget_credential_report(aws)
    runs["naive"] = measure(
        "naive",
        [sys.executable, str(BENCH / "naive.py"), "--max-age-days", str(MAX_AGE_DAYS)],
        env,
        proxy=proxy,
        scratch=work,
        timeout=timeout,
    )
    found["naive"] = _safe(due_from_naive, runs["naive"].stdout)

    if custodian is not None:
        log(f"N={n}: cloud custodian")
        forget_credential_report(aws)
        outdir = work / "custodian-out"
        runs["custodian"] = measure(
            "custodian",
            [
                str(custodian),
                "run",
                "--cache-period",
                "0",
                "-s",
                str(outdir),
                str(CUSTODIAN_POLICY),
            ],
            env,
            proxy=proxy,
            scratch=work,
            timeout=timeout,
            cwd=work,
        )
        found["custodian"] = due_from_custodian(outdir)
        generated = runs["custodian"].calls.get("iam:GenerateCredentialReport", 0)
        if generated:
            # c7n sleeps `report_delay` (default 10 s) after asking for a report; moto
            # always dates its report 2015-02-02, so c7n always finds it stale and asks.
            notes["custodian"] = (
                f"includes {generated} x 10 s report_delay sleep after "
                "GenerateCredentialReport (c7n default; moto's report is always 'stale')"
            )

    tools: dict[str, Any] = {}
    for name, run in runs.items():
        got = found.get(name)
        entry = run.summary()
        entry["due_found"] = len(got) if got is not None else None
        entry["due_expected"] = len(due)
        entry["due_correct"] = got == due
        if got is not None and got != due:
            entry["due_missing"] = sorted(due - got)[:10]
            entry["due_extra"] = sorted(got - due)[:10]
        if name in notes:
            entry["note"] = notes[name]
        tools[name] = entry
    if "custodian" in runs:
        sleeps = 10.0 * runs["custodian"].calls.get("iam:GenerateCredentialReport", 0)
        tools["custodian"]["wall_s_without_report_delay"] = round(
            runs["custodian"].wall_s - sleeps, 3
        )
    base = runs["naive"]
    for name, run in runs.items():
        tools[name]["vs_naive"] = {
            "wall": _ratio(run.wall_s, base.wall_s),
            "peak_rss": _ratio(run.maxrss_kib, base.maxrss_kib),
            "iam_calls": _ratio(run.iam_calls, base.iam_calls),
        }
    return {"users": n, "due": len(due), "tools": tools}


def _safe(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except (ValueError, KeyError, TypeError):
        return None


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


# --- 2. rotation throughput -------------------------------------------------------------


def rotation_run(
    aws: LocalAws,
    proxy: CountingProxy,
    count: int,
    concurrency: int,
    scratch: Path,
    iam_rate: float | None,
    timeout: float,
) -> dict[str, Any]:
    work = scratch / f"rotate-c{concurrency}"
    work.mkdir()
    remove_all_users(aws)
    now = datetime.now(UTC)
    prefix = f"rot-c{concurrency}"
    users = seed_due(aws, count, now, prefix)
    original = {name: set(aws.keys(name)) for name in users}
    vault = LocalVault(log_path=work / "bao.log").start()
    try:
        aws_section: dict[str, Any] = {
            "region": "us-east-1",
            "endpoint_url": proxy.url,
            "concurrency": concurrency,
        }
        if iam_rate is not None:
            aws_section["iam_calls_per_second"] = float(iam_rate)
        settings = {
            "aws": aws_section,
            "vault": {
                "url": vault.addr,
                "auth": {"method": "token", "token": vault.token},
                "mount": "secret",
            },
            "state": {"path": str(work / "state.db")},
            "policy": {"max_age": f"{MAX_AGE_DAYS}d", "overlap": "0s", "delete_after": "0s"},
        }
        config = write_config(work / "rotator.yaml", settings)
        env = base_env(proxy.url, work)
        proxy.delay = ROTATION_DELAY
        try:
            log(f"rotation c={concurrency}: plan (the scan's own calls)")
            forget_credential_report(aws)
            scan = measure(
                "plan",
                [*rotator_cmd(), "--config", str(config), "--log-level", "WARNING", "plan"],
                env,
                proxy=proxy,
                scratch=work,
                timeout=timeout,
            )
            log(f"rotation c={concurrency}: run --once ({count} due users, 50 ms/call)")
            forget_credential_report(aws)
            run = measure(
                "run",
                [*rotator_cmd(), "--config", str(config), "run", "--once", "--json"],
                env,
                proxy=proxy,
                scratch=work,
                timeout=timeout,
            )
        finally:
            proxy.delay = 0.0
        states: dict[str, int] = {}
        try:
            doc = json.loads(run.stdout)
            states = doc.get("states", {})
        except ValueError:
            doc = None
        done = states.get("DONE", 0)
        vault_entries = _vault_list(vault, f"secret/metadata/aws/{ACCOUNT_ID}")
    finally:
        vault.stop()
    # Invariant check from the backend: one key per user, and not the original one.
    replaced = sum(
        1
        for name in users
        if (keys := set(aws.keys(name))) and len(keys) == 1 and not keys & original[name]
    )
    rotation_calls = {
        k: run.calls.get(k, 0) - scan.calls.get(k, 0)
        for k in sorted(set(run.calls) | set(scan.calls))
        if run.calls.get(k, 0) - scan.calls.get(k, 0)
    }
    iam = sum(n for k, n in rotation_calls.items() if k.startswith("iam:"))
    sts = sum(n for k, n in rotation_calls.items() if k.startswith("sts:"))
    phases = _phases(run)
    return {
        **phases,
        "concurrency": concurrency,
        "due_users": count,
        "wall_s": round(run.wall_s, 3),
        "exit_code": run.exit_code,
        "timed_out": run.timed_out,
        "peak_rss_mib": round(run.rss_mib, 1),
        "cpu_s": round(run.cpu_s, 2),
        "server_cpu_s": round(run.server_cpu_s, 2),
        "loadavg": run.loadavg,
        "states": states,
        "completed": done,
        "vault_secrets": vault_entries,
        "users_with_only_a_new_key": replaced,
        "scan": {"wall_s": round(scan.wall_s, 3), "calls": scan.calls},
        "run_calls": run.calls,
        "rotation_calls": rotation_calls,
        "iam_per_rotation": round(iam / done, 3) if done else None,
        "sts_per_rotation": round(sts / done, 3) if done else None,
        "stderr_tail": run.stderr_tail[-600:] if run.exit_code else "",
    }


def _phases(run: Measured) -> dict[str, float | None]:
    """Split the run's wall time with its JSON log lines: until the first rotation is
    opened (start-up and scan), and from the last one opened to the last event (the
    rotations). Wall-clock stamps of the child against the parent's: good to ~10 ms."""
    opened: list[datetime] = []
    last: datetime | None = None
    for line in run.stderr_full.splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
            at = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
        except (ValueError, KeyError):
            continue
        last = at if last is None or at > last else last
        if event.get("event") == "rotation.opened":
            opened.append(at)
    if not opened or last is None:
        return {"startup_and_scan_s": None, "rotations_s": None}
    return {
        "startup_and_scan_s": round((min(opened) - run.started_at).total_seconds(), 2),
        "rotations_s": round((last - max(opened)).total_seconds(), 2),
    }


def _vault_list(vault: LocalVault, path: str) -> int | None:
    try:
        answer = vault.request("LIST", f"/v1/{path}")
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return len(answer.get("data", {}).get("keys", [])) if answer else 0


# --- 3. idle daemon ---------------------------------------------------------------------


def idle_daemon(aws: LocalAws, proxy: CountingProxy, n: int, scratch: Path) -> dict[str, Any]:
    """`rotator daemon` (one process) on `n` users with a scan every hour: its VmRSS
    once started (before its first scan), after that scan, and idle 5 and 10 s later;
    the peak while the scan ran (sampled every 50 ms)."""
    work = scratch / f"daemon-{n}"
    work.mkdir()
    remove_all_users(aws)
    forget_credential_report(aws)
    seed_users(aws, 0, n, datetime.now(UTC))
    vault = LocalVault(log_path=work / "bao.log").start()
    settings = {
        "aws": {"region": "us-east-1", "endpoint_url": proxy.url},
        "vault": {
            "url": vault.addr,
            "auth": {"method": "token", "token": vault.token},
            "mount": "secret",
        },
        "state": {"path": str(work / "state.db")},
        "schedule": {"scan": "1h"},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
    }
    config = write_config(work / "rotator.yaml", settings)
    cmd = [*rotator_cmd(), "--config", str(config), "--log-format", "json", "daemon"]
    watch = DaemonWatch(cmd, base_env(proxy.url, work), work / "daemon.stderr")
    result: dict[str, Any] = {"users": n}
    try:
        watch.start()
        started = watch.wait_for("daemon.backends_ok", timeout=120)
        ready = watch.wait_for("daemon.ready", timeout=60)
        scanned = watch.wait_for("daemon.scan_done", timeout=300)
        if started and ready:
            result["ready_after_s"] = round(ready[0].at - watch.started, 2)
            result["startup_mib"] = round(started[0].rss_kib / MIB, 1)
        if scanned:
            done = scanned[0]
            began = done.at - float(done.fields.get("seconds", 0.0))
            result["scan_s"] = done.fields.get("seconds")
            result["after_scan_mib"] = round(done.rss_kib / MIB, 1)
            result["peak_mib"] = round(watch.peak_kib(began, done.at) / MIB, 1)
            time.sleep(5)
            status = proc_status(watch.pid)
            result["vmrss_mib"] = round(status.get("VmRSS", 0) / MIB, 1)
            result["vmhwm_mib"] = round(status.get("VmHWM", 0) / MIB, 1)
            result["threads"] = status.get("Threads")
            time.sleep(5)
            result["vmrss_mib_10s"] = round(watch.rss_kib() / MIB, 1)
    finally:
        result["exit_code"], result["stop_s"] = watch.stop()
        vault.stop()
    if result.get("vmrss_mib") is None:
        result["stderr_tail"] = watch.tail()
    return result


# --- 4. diagnostics ---------------------------------------------------------------------

ISOLATED_MODULES = (
    "boto3",
    "hvac",
    "pydantic",
    "apscheduler.schedulers.background",
    "prometheus_client",
    "structlog",
    "click",
    "yaml",
)


def memory_diagnostics() -> dict[str, Any]:
    probe = [sys.executable, str(BENCH / "memprobe.py")]

    def run(*args: str) -> Any:
        done = subprocess.run([*probe, *args], capture_output=True, text=True, cwd=ROOT)
        return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}

    isolated = []
    for module in ISOLATED_MODULES:
        got = run("only", module)
        if "rss_kib" in got:
            isolated.append(
                {
                    "module": module,
                    "adds_mib": round((got["rss_kib"] - got["baseline_kib"]) / MIB, 1),
                }
            )
    return {
        "steps": [
            {"step": s["step"], "rss_mib": round(s["rss_kib"] / MIB, 1)} for s in run("steps")
        ],
        "isolated_imports": sorted(isolated, key=lambda x: -x["adds_mib"]),
        "tracemalloc_top": run("tracemalloc"),
        "import_time": import_time(),
    }


def import_time() -> list[dict[str, Any]]:
    """Top-level packages by cumulative import time for the daemon's imports (each
    package's first import, its own dependencies included): what every start pays."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import rotator.cli, rotator.daemon"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    per_top: dict[str, int] = {}
    total = 0
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)", line)
        if not m:
            continue
        cumulative, name = int(m.group(2)), m.group(4)
        if name in ("rotator.cli", "rotator.daemon"):
            total += cumulative
        if "." not in name and name != "rotator":
            per_top[name] = max(per_top.get(name, 0), cumulative)
    ranked = sorted(per_top.items(), key=lambda kv: -kv[1])
    out = [
        {"package": "(all: rotator.cli + rotator.daemon)", "cumulative_ms": round(total / 1000, 1)}
    ]
    return out + [{"package": k, "cumulative_ms": round(v / 1000, 1)} for k, v in ranked[:10]]


# --- targets and report -----------------------------------------------------------------


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    plans = results["plan"]
    if plans:
        largest = plans[-1]
        n = largest["users"]
        tools = largest["tools"]
        r, nv = tools["rotator"], tools["naive"]
        share = r["iam_calls"] / nv["iam_calls"] if nv["iam_calls"] else None
        targets.append(
            {
                "target": f"plan at N={n:,}: <= 1% of the naive loop's IAM calls",
                "measured": f"{r['iam_calls']} vs {nv['iam_calls']} ({share * 100:.3f}%)"
                if share is not None
                else "n/a",
                "pass": share is not None and share <= TARGET_CALL_SHARE and not nv["timed_out"],
            }
        )
        peers = [("naive", nv["wall_s"])]
        if "custodian" in tools:
            c = tools["custodian"]
            # The stricter comparison: custodian without its fixed report_delay sleep.
            peers.append(("custodian", c.get("wall_s_without_report_delay", c["wall_s"])))
        faster = all(r["wall_s"] < w for _, w in peers) and r["exit_code"] == 0
        targets.append(
            {
                "target": f"plan at N={n:,}: less wall time than both peers",
                "measured": f"rotator {r['wall_s']:.1f} s; "
                + "; ".join(f"{name} {w:.1f} s" for name, w in peers)
                + ("" if "custodian" in tools else " (custodian not run)"),
                "pass": faster and "custodian" in tools,
            }
        )
        targets.append(
            {
                "target": f"plan at N={n:,}: peak RSS < {TARGET_PLAN_RSS_MIB} MB",
                "measured": f"{r['peak_rss_mib']:.1f} MiB",
                "pass": r["peak_rss_mib"] * MIB * 1024 < TARGET_PLAN_RSS_MIB * 1_000_000,
            }
        )
    rot = results["rotation"]
    if rot:
        fast = rot["concurrent"]
        iam, sts = fast["iam_per_rotation"], fast["sts_per_rotation"]
        targets.append(
            {
                "target": f"<= {TARGET_IAM_PER_ROTATION} IAM + {TARGET_STS_PER_ROTATION} STS "
                "calls per completed rotation",
                "measured": f"{iam} IAM + {sts} STS (c={fast['concurrency']}, "
                f"{fast['completed']} completed)",
                "pass": iam is not None
                and sts is not None
                and iam <= TARGET_IAM_PER_ROTATION
                and sts <= TARGET_STS_PER_ROTATION,
            }
        )
        speedup = rot["speedup"]
        complete = rot["serial"]["completed"] == rot["serial"]["due_users"] and (
            fast["completed"] == fast["due_users"]
        )
        targets.append(
            {
                "target": f"{fast['due_users']} rotations at 50 ms/call: >= {TARGET_SPEEDUP:g}x "
                "faster than serial",
                "measured": f"{speedup}x ({rot['serial']['wall_s']:.1f} s -> "
                f"{fast['wall_s']:.1f} s)" + ("" if complete else " (not all completed)"),
                "pass": speedup is not None and speedup >= TARGET_SPEEDUP and complete,
            }
        )
    daemon = results["daemon"]
    if daemon:
        rss = daemon.get("vmrss_mib")
        targets.append(
            {
                "target": f"idle daemon < {TARGET_DAEMON_RSS_MIB} MiB RSS",
                "measured": f"{rss} MiB VmRSS 5 s after its first scan of "
                f"{daemon['users']:,} users ({daemon.get('startup_mib')} MiB before it)"
                if rss is not None
                else "the daemon never completed a scan",
                "pass": rss is not None and rss < TARGET_DAEMON_RSS_MIB,
            }
        )
    return targets


def fmt_ratio(x: float | None, *, percent: bool = False) -> str:
    if x is None:
        return "n/a"
    if percent:
        return f"{x * 100:.2f}%" if x < 0.1 else f"{x * 100:.0f}%"
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Run {results['generated_at']} ({'quick' if results['quick'] else 'full'}), "
        f"{m['cpus']} CPUs, Python {m['python']}, moto {m['moto']}, boto3 {m['boto3']}, "
        f"c7n {m['c7n'] or 'not installed'}, rotator at {m['rotator_commit']}"
        f"{' + uncommitted changes' if m['rotator_dirty'] else ''} "
        f"(sources sha256 {m['rotator_sources_sha256']}). Total {results['total_s']:.0f} s; "
        f"1-min load average {results['loadavg_start']} at the start, "
        f"{results['loadavg_end']} at the end."
        + (
            " **rotator/ changed during the run: the figures mix two versions.**"
            if results["rotator_sources_sha256_end"] != m["rotator_sources_sha256"]
            else ""
        ),
        "",
        "### Scan: `rotator plan --json` vs the naive loop (baseline) vs Cloud Custodian",
        "",
        "| users | tool | wall | vs naive | peak RSS | vs naive | IAM calls | vs naive "
        "| STS calls | due found |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for plan in results["plan"]:
        for name in ("rotator", "naive", "custodian"):
            t = plan["tools"].get(name)
            if t is None:
                continue
            label = {"rotator": "rotator plan", "naive": "naive loop", "custodian": "custodian"}
            wall = f"{t['wall_s']:.1f} s" + (" (timeout)" if t["timed_out"] else "")
            if name == "custodian" and "wall_s_without_report_delay" in t:
                wall += f" ({t['wall_s_without_report_delay']:.1f} s w/o sleep)"
            found = (
                f"{t['due_found']}/{t['due_expected']}" + ("" if t["due_correct"] else " (wrong)")
                if t["due_found"] is not None
                else "n/a"
            )
            v = t["vs_naive"]
            lines.append(
                f"| {plan['users']:,} | {label[name]} | {wall} | {fmt_ratio(v['wall'])} "
                f"| {t['peak_rss_mib']:.0f} MiB | {fmt_ratio(v['peak_rss'])} | {t['iam_calls']:,} "
                f"| {fmt_ratio(v['iam_calls'], percent=True)} | {t['sts_calls']} | {found} |"
            )
    lines.append("")
    lines.append("IAM calls by action:")
    lines.append("")
    for plan in results["plan"]:
        for name, t in plan["tools"].items():
            calls = ", ".join(f"{k} {v:,}" for k, v in t["calls"].items())
            lines.append(f"- N={plan['users']:,} {name}: {calls or 'none'}")
    rot = results["rotation"]
    if rot:
        s, c = rot["serial"], rot["concurrent"]
        lines += [
            "",
            f"### Rotation throughput: {s['due_users']} due users, "
            f"{ROTATION_DELAY * 1000:.0f} ms per AWS call",
            "",
            "| concurrency | wall | speed-up | start-up + scan | rotations | completed "
            "| IAM calls / rotation | STS calls / rotation | CPU (rotator / moto+proxy) "
            "| peak RSS |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        phase_speedup = rot.get("rotations_phase_speedup")
        for row, speed in ((s, "1x (baseline)"), (c, fmt_ratio(rot["speedup"]))):
            phase = f"{row['rotations_s']:.1f} s" if row.get("rotations_s") is not None else "n/a"
            if row is c and phase_speedup is not None:
                phase += f" ({fmt_ratio(phase_speedup)})"
            scan = (
                f"{row['startup_and_scan_s']:.1f} s"
                if row.get("startup_and_scan_s") is not None
                else "n/a"
            )
            lines.append(
                f"| {row['concurrency']} | {row['wall_s']:.1f} s | {speed} | {scan} | {phase} "
                f"| {row['completed']}/{row['due_users']} | {row['iam_per_rotation']} "
                f"| {row['sts_per_rotation']} | {row['cpu_s']:.0f} s / {row['server_cpu_s']:.0f} s "
                f"| {row['peak_rss_mib']:.0f} MiB |"
            )
        lines += [
            "",
            f"Calls per rotation = (calls of `run --once`) - (calls of `plan` on the same "
            f"seeding, each starting without a credential report), divided by completed "
            f"rotations. `aws.iam_calls_per_second` was {rot['iam_rate']}. "
            "Per action (c={}): {}.".format(
                c["concurrency"],
                ", ".join(f"{k} {v}" for k, v in c["rotation_calls"].items()),
            ),
        ]
    d = results["daemon"]
    if d:
        lines += [
            "",
            f"### Idle daemon ({d['users']:,} users, scan every 1h)",
            "",
            f"One process. VmRSS {d.get('startup_mib')} MiB once started (before its first "
            f"scan), {d.get('after_scan_mib')} MiB when the first scan ended, "
            f"{d.get('vmrss_mib')} MiB 5 s later and {d.get('vmrss_mib_10s')} MiB 5 s after "
            f"that (VmHWM {d.get('vmhwm_mib')} MiB, {d.get('threads')} threads). The scan "
            f"took {d.get('scan_s')} s and peaked at {d.get('peak_mib')} MiB. Ready after "
            f"{d.get('ready_after_s')} s; SIGTERM -> exit {d.get('exit_code')} in "
            f"{d.get('stop_s')} s. `benchmarks/memory.py` follows the daemon over many scans.",
        ]
        e = results.get("daemon_empty")
        if e:
            lines += [
                "",
                f"The same daemon on an account with no users (the fixed cost): VmRSS "
                f"{e.get('startup_mib')} MiB once started, {e.get('vmrss_mib')} MiB after "
                f"its first scan.",
            ]
    diag = results.get("diagnostics")
    if diag:
        lines += [
            "",
            "### Where the daemon's memory goes",
            "",
            "Cumulative VmRSS in one interpreter, step by step:",
            "",
            "| step | VmRSS |",
            "|---|---:|",
        ]
        for step in diag["steps"]:
            lines.append(f"| {step['step']} | {step['rss_mib']} MiB |")
        lines += ["", "Each import alone, in a fresh interpreter (RSS added):", ""]
        lines.append(
            ", ".join(f"{i['module']} +{i['adds_mib']} MiB" for i in diag["isolated_imports"])
        )
        if isinstance(diag.get("tracemalloc_top"), list):
            lines += ["", "Python heap of the daemon's imports + AwsIam, by package:", ""]
            lines.append(
                ", ".join(
                    f"{t['package']} {t['kib'] / 1024:.1f} MiB" for t in diag["tracemalloc_top"][:8]
                )
            )
        lines += ["", "Slowest imports of the daemon (`-X importtime`, cumulative):", ""]
        lines.append(
            ", ".join(f"{t['package']} {t['cumulative_ms']} ms" for t in diag["import_time"][:8])
        )
    lines += ["", "### Targets", ""]
    for t in results["targets"]:
        lines.append(f"- **{'PASS' if t['pass'] else 'FAIL'}** {t['target']}: {t['measured']}")
    return "\n".join(lines) + "\n"


def sources_digest() -> str:
    digest = hashlib.sha256()
    for source in sorted((ROOT / "rotator").glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def machine_info(c7n_version: str | None) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
        return done.stdout.strip()

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "moto": version("moto"),
        "boto3": version("boto3"),
        "c7n": c7n_version,
        "rotator_commit": git("rev-parse", "--short", "HEAD"),
        "rotator_dirty": bool(git("status", "--porcelain", "--", "rotator")),
        # The working tree changes under parallel work: this names the code measured.
        "rotator_sources_sha256": sources_digest(),
    }


# --- main -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="rotator's benchmarks (see benchmarks/README.md)")
    parser.add_argument("--quick", action="store_true", help="N=1,000 only and 40 rotations")
    parser.add_argument("--rotations", type=int, help="due users in the throughput runs")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per tool run (default 600)"
    )
    parser.add_argument("--no-custodian", action="store_true", help="skip Cloud Custodian")
    parser.add_argument(
        "--iam-rate",
        type=float,
        default=1000.0,
        help="aws.iam_calls_per_second for the throughput runs (default 1000: high enough "
        "not to bind, so the runs measure concurrency; 0 = leave the rotator's default)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)

    sizes = [1_000] if args.quick else [1_000, 10_000]
    rotations = args.rotations or (40 if args.quick else 200)
    began = time.perf_counter()
    custodian: Path | None = None
    c7n_version: str | None = None
    c7n_error: str | None = "skipped (--no-custodian)"
    if not args.no_custodian:
        custodian, c7n_version, c7n_error = ensure_custodian()
        if c7n_error:
            log(c7n_error)

    results: dict[str, Any] = {
        "generated_at": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "quick": args.quick,
        "machine": machine_info(c7n_version),
        "custodian_error": c7n_error if custodian is None else None,
        "plan": [],
        "rotation": None,
        "daemon": None,
        "daemon_empty": None,
        "loadavg_start": round(os.getloadavg()[0], 2),
    }
    scratch = Path(tempfile.mkdtemp(prefix="rotator-bench-"))
    aws = LocalAws().start()
    proxy = CountingProxy(aws.endpoint_url).start()
    try:
        log(f"moto at {aws.endpoint_url}, counting proxy at {proxy.url}, scratch {scratch}")
        now = datetime.now(UTC)
        due: set[str] = set()
        seeded = 0
        for n in sizes:
            started = time.perf_counter()
            due |= seed_users(aws, seeded, n, now)
            seeded = n
            log(f"seeded {n:,} users ({len(due)} due) in {time.perf_counter() - started:.1f} s")
            results["plan"].append(
                plan_comparison(aws, proxy, n, due, scratch, custodian, args.timeout)
            )

        rate = args.iam_rate if args.iam_rate > 0 else None
        serial = rotation_run(aws, proxy, rotations, 1, scratch, rate, args.timeout)
        fast = rotation_run(aws, proxy, rotations, CONCURRENT, scratch, rate, args.timeout)
        results["rotation"] = {
            "serial": serial,
            "concurrent": fast,
            "speedup": _ratio(serial["wall_s"], fast["wall_s"]),
            "rotations_phase_speedup": _ratio(serial["rotations_s"] or 0, fast["rotations_s"] or 0)
            if fast.get("rotations_s")
            else None,
            "delay_ms": ROTATION_DELAY * 1000,
            "iam_rate": rate if rate is not None else "rotator default",
            "attribution": "subtraction: calls of run --once minus calls of plan on the same "
            "seeding (both start without a credential report)",
        }
        log("idle daemon (1,000 users)")
        results["daemon"] = idle_daemon(aws, proxy, 1_000, scratch)
        log("idle daemon (no users: the fixed cost)")
        results["daemon_empty"] = idle_daemon(aws, proxy, 0, scratch)
    finally:
        proxy.stop()
        aws.stop()
    log("memory diagnostics")
    results["diagnostics"] = memory_diagnostics()
    results["total_s"] = round(time.perf_counter() - began, 1)
    results["loadavg_end"] = round(os.getloadavg()[0], 2)
    results["rotator_sources_sha256_end"] = sources_digest()
    if results["rotator_sources_sha256_end"] != results["machine"]["rotator_sources_sha256"]:
        log("warning: rotator/ changed while the benchmark ran; the figures mix two versions")
    results["targets"] = evaluate(results)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.out / "latest.md").write_text(text)
    if args.keep:
        log(f"scratch kept: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    print(text)
    for t in results["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
