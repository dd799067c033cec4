"""Time to containment: from the moment a leak is known to the moment IAM receives the
`UpdateAccessKey` call that sets the leaked key Inactive.

    python benchmarks/containment.py            # 100 leaks per row (about 6 minutes)
    python benchmarks/containment.py --quick    # 20 leaks per row (about 2 minutes)

One moto server (LocalAws, in this process) behind the counting proxy
(benchmarks/proxy.py), which timestamps every call it receives: the first
`UpdateAccessKey` with `Status=Inactive` for a key id is the containment of that key.
Each leak is a fresh user with one Active key, in an account of `--users` users (100).
Rows, each with Vault up (an OpenBao dev server) and with Vault down (`vault.url` is a
loopback port nothing listens on):

- file: `rotator leak-event FILE`, a new process per event; available = just before
  the process is started.
- file, in process: `App.handle_event(bytes)` on a new App, in a process that has
  imported rotator and read the configuration already (the CLI's difference is
  interpreter start-up, imports and the configuration file); available = just before
  `App(settings)`.
- SQS: the event sent to a moto queue that a running `rotator daemon` long-polls
  (`leaks.sqs_queue_url`); available = when SendMessage returned. Three ways: one leak
  at a time (at least PACE apart, so that the daemon's IAM token bucket is full again);
  `--leaks` messages sent back to back; and one leak at a time, each sent B_AFTER after
  the previous one was contained while the previous one's replacement is in VERIFY,
  which the proxy makes take VERIFY_DELAY (it holds the new key's first call,
  sts:GetCallerIdentity): a stand-in for AWS accepting a new key only after seconds.
- HTTP: `POST /v1/rotations` with `leaked: true` to a running daemon, one at a time
  and at least PACE apart; available = just before the request is sent.
- quarantine policy: `AWSCompromisedKeyQuarantineV2` attached to the user, then one
  `App.scan_and_open()` on a new App; available = when AttachUserPolicy returned. It
  includes the scan of the whole account; in the daemon the wait for the next
  `schedule.scan` (hourly by default) comes on top.

Unless a row says otherwise, leaks are sent one at a time: the next one only once the
previous one's handling has finished (the CLI exited, the daemon's queue poller polls
again, the daemon logged the trigger's end). Every timestamp is `time.monotonic()`,
CLOCK_MONOTONIC on Linux: one clock for every process of the machine, so a start taken
in one process and an arrival taken by the proxy compare directly. The events have the
plain AWS Health shape (key id only, no `eventMetadata.userName`), so rotator looks each
owner up with GetAccessKeyLastUsed. A daemon that never polls the queue while Vault is
down (a rotator that waits for Vault before it starts) gets "n/a (daemon waits for
Vault)" in its SQS rows instead of figures.

Results: a Markdown table on stdout, benchmarks/results/containment.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import io
import json
import math
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs

import boto3
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
# Last, not first: a `--serve` child must import rotator from the snapshot on its
# PYTHONPATH, not from the tree beside this file.
sys.path.append(str(ROOT))

from proxy import CountingProxy  # noqa: E402

from rotator.sandbox import (  # noqa: E402
    FAKE_AWS_ENV,
    QUARANTINE_V2,
    LocalAws,
    LocalVault,
    SeedKey,
    bao_binary,
    free_port,
)

RESULTS = BENCH / "results"
FULL_LEAKS = 100
QUICK_LEAKS = 20
DEFAULT_USERS = 100
KEY_AGE = timedelta(days=10)  # not due: only the leak makes rotator act
WAIT = 30.0  # seconds one leak may take to be contained before it counts as missed
SETTLE = 60.0  # seconds the handling after a containment may take before the next leak
DAEMON_START = 30.0  # seconds a daemon may take to poll the queue / serve HTTP
NA_VAULT = "n/a (daemon waits for Vault)"
# A long-lived rotator (the daemon) keeps its IAM token bucket (default 20 calls/s, as
# many in a burst): one leak with its replacement takes 5 IAM calls.
PACE = 0.3  # seconds from one leak to the next, at least, for the daemon's rows
BURST_WAIT = 180.0  # seconds the last leak of a burst may take to be contained
VERIFY_LEAKS = 10  # leaks measured in the sqs-verify row (at most --leaks)
VERIFY_DELAY = 3.0  # seconds the proxy holds a new key's verification call
B_AFTER = 0.1  # seconds after leak A's containment that leak B is sent


def log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


# --- what the proxy saw ---------------------------------------------------------------------


class Arrivals:
    """Receive times (time.monotonic) of the calls the benchmark waits on, recorded by
    the proxy's thread the moment a call's body has arrived."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inactive: dict[str, float] = {}  # key id -> first UpdateAccessKey Inactive
        self._receives: list[float] = []  # sqs:ReceiveMessage
        self._calls: list[tuple[float, str]] = []  # every call: (time, service:Action)
        # Seconds sts:GetCallerIdentity is held before it is forwarded (0: not held).
        self.verify_delay = 0.0
        self._held: list[tuple[float, float]] = []  # (from, until) of each held call

    def on_call(self, name: str, body: bytes) -> None:
        now = time.monotonic()
        with self._cond:
            self._calls.append((now, name))
        delay = self.verify_delay
        if name == "sts:GetCallerIdentity" and delay > 0:
            with self._cond:
                self._held.append((now, now + delay))
            time.sleep(delay)  # this proxy thread's call only
        if name == "iam:UpdateAccessKey":
            form = parse_qs(body.decode("utf-8", "replace"))
            if form.get("Status") == ["Inactive"] and form.get("AccessKeyId"):
                with self._cond:
                    self._inactive.setdefault(form["AccessKeyId"][0], now)
                    self._cond.notify_all()
        elif name == "sqs:ReceiveMessage":
            with self._cond:
                self._receives.append(now)
                self._cond.notify_all()

    def contained_at(self, key_id: str, timeout: float) -> float | None:
        with self._cond:
            self._cond.wait_for(lambda: key_id in self._inactive, timeout)
            return self._inactive.get(key_id)

    def holding(self, moment: float) -> bool:
        """Whether a held sts:GetCallerIdentity was in the proxy at `moment`."""
        with self._cond:
            return any(start <= moment < end for start, end in self._held)

    def between(self, start: float, end: float) -> list[str]:
        """The calls received in [start, end), in order."""
        with self._cond:
            return [name for at, name in self._calls if start <= at < end]

    def polled_after(self, moment: float, timeout: float) -> float | None:
        """The first queue poll received after `moment`, waiting up to `timeout`."""

        def found() -> float | None:
            return min((t for t in self._receives if t > moment), default=None)

        with self._cond:
            self._cond.wait_for(lambda: found() is not None, timeout)
            return found()


# --- results --------------------------------------------------------------------------------


def nearest_rank(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


@dataclass
class Row:
    source: str
    vault: str  # "up" or "down"
    planned: int = 0
    samples: list[float] = field(default_factory=list)  # seconds, one per contained leak
    missed: int = 0  # leaks never contained within WAIT
    na: str | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # The AWS calls received between "available" and the containment, by sequence.
    before: Counter[str] = field(default_factory=Counter)

    def stat(self, share: float) -> float | None:
        return nearest_rank(self.samples, share) if self.samples else None

    def doc(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "vault": self.vault,
            "leaks": self.planned,
            "contained": len(self.samples),
            "missed": self.missed,
            "na": self.na,
            "p50_ms": _ms(self.stat(0.50)),
            "p99_ms": _ms(self.stat(0.99)),
            "max_ms": _ms(max(self.samples) if self.samples else None),
            "min_ms": _ms(min(self.samples) if self.samples else None),
            "samples_ms": [_ms(s) for s in self.samples],
            "notes": self.notes,
            "calls_before_containment": dict(self.before.most_common()),
            **self.extra,
        }


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 1) if seconds is not None else None


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.1f} ms"


# --- the rig --------------------------------------------------------------------------------


def rotator_cmd() -> list[str]:
    beside = Path(sys.executable).with_name("rotator")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "rotator"]


def snapshot_code(dest: Path, rev: str | None) -> str:
    """Copy `rotator/` (the working tree, or `rev` from git) to `dest`, so that edits
    made while the benchmark runs change nothing; describe what was copied."""
    if rev is None:
        shutil.copytree(
            ROOT / "rotator", dest / "rotator", ignore=shutil.ignore_patterns("__pycache__")
        )
        dirty = _git("status", "--porcelain", "--", "rotator")
        what = f"the working tree at {_git('rev-parse', '--short', 'HEAD') or '?'}"
        what += " + uncommitted changes in rotator/" if dirty else ""
    else:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "rotator"],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
        what = f"{rev} ({_git('rev-parse', '--short', rev + '^{commit}')})"
    digest = hashlib.sha256()
    for path in sorted((dest / "rotator").rglob("*.py")):
        digest.update(path.relative_to(dest).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{what}, sources sha256 {digest.hexdigest()[:16]}"


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return done.stdout.strip()


def check_code(env: dict[str, str], cwd: Path, code: Path) -> None:
    """Refuse to run unless a child imports rotator from the snapshot at `code`."""
    done = subprocess.run(
        [sys.executable, "-c", "import rotator; print(rotator.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )
    found = Path(done.stdout.strip() or ".").resolve()
    if not found.is_relative_to(code.resolve()):
        raise SystemExit(f"children import rotator from {found}, not from {code}")


def child_env(proxy_url: str, scratch: Path, code: Path) -> dict[str, str]:
    """Fake credentials, the proxy as the endpoint, none of the caller's AWS, Vault or
    rotator settings, and the code snapshot first on the import path. Children run in
    the scratch directory, never in the repository: `python -m` puts the working
    directory first on the path, before PYTHONPATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "VAULT_", "ROTATOR_", "BOTO_"))
    }
    env.update(FAKE_AWS_ENV)
    env.update(
        {
            "AWS_ENDPOINT_URL": proxy_url,
            "AWS_CONFIG_FILE": str(scratch / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def health_event(key_id: str, serial: str) -> bytes:
    """An AWS Health key-exposure event in its plain EventBridge shape (as in
    tests/fixtures/health/aws-health-tools-risk-credentials-exposed.json), one key."""
    return json.dumps(
        {
            "version": "0",
            "id": f"bench-{serial}",
            "detail-type": "AWS Health Event",
            "source": "aws.health",
            "account": "123456789012",
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": "us-east-1",
            "resources": [],
            "detail": {
                "eventArn": "arn:aws:health:us-east-1::event/RISK/AWS_RISK_CREDENTIALS_EXPOSED/"
                f"AWS_RISK_CREDENTIALS_EXPOSED-bench{serial}",
                "service": "RISK",
                "eventTypeCode": "AWS_RISK_CREDENTIALS_EXPOSED",
                "eventTypeCategory": "issue",
                "startTime": "Wed, 12 Feb 2025 00:37:54 GMT",
                "eventDescription": [{"language": "en_US", "latestDescription": "benchmark leak"}],
                "affectedEntities": [{"entityValue": key_id}],
            },
        }
    ).encode()


class Rig:
    """moto behind the recording proxy, one OpenBao dev server, a closed port."""

    def __init__(
        self, scratch: Path, cleanup: contextlib.ExitStack, users: int, code: Path
    ) -> None:
        self.scratch = scratch
        self.users = users
        self.aws = LocalAws().start()
        cleanup.callback(self.aws.stop)
        self.arrivals = Arrivals()
        self.proxy = CountingProxy(self.aws.endpoint_url, on_call=self.arrivals.on_call).start()
        cleanup.callback(self.proxy.stop)
        self.vault = LocalVault(log_path=scratch / "bao.log").start()
        cleanup.callback(self.vault.stop)
        self.closed_port = free_port()  # nothing listens here: "Vault is down"
        self.env = child_env(self.proxy.url, scratch, code)
        check_code(self.env, scratch, code)
        # Set-up calls go straight to moto, unrecorded.
        session = boto3.session.Session(
            aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            aws_session_token=FAKE_AWS_ENV["AWS_SESSION_TOKEN"],
            region_name="us-east-1",
        )
        self.iam = session.client("iam", endpoint_url=self.aws.endpoint_url)
        self.sqs = session.client("sqs", endpoint_url=self.aws.endpoint_url)

    def fresh_account(self, prefix: str, leaks: int) -> list[tuple[str, str]]:
        """An account with `self.users` users `prefix-NNNN` (at least `leaks`), one
        Active key each (10 days old, used an hour ago): (user, key id) of the first
        `leaks`, the ones that leak."""
        self.aws.reset()
        now = datetime.now(UTC)
        found = []
        for i in range(max(leaks, self.users)):
            name = f"{prefix}-{i:04d}"
            [key] = self.aws.add_user(
                name, keys=[SeedKey(age=KEY_AGE, last_used_ago=timedelta(hours=1))], now=now
            )
            found.append((name, key.access_key_id))
        return found[:leaks]

    def config(self, work: Path, vault_up: bool, **sections: dict[str, Any]) -> Path:
        vault: dict[str, Any]
        if vault_up:
            vault = {"url": self.vault.addr, "auth": {"token": self.vault.token}}
        else:
            vault = {
                "url": f"http://127.0.0.1:{self.closed_port}",
                "auth": {"token": "no-vault-here"},
            }
        data: dict[str, Any] = {
            "aws": {"region": "us-east-1", "endpoint_url": self.proxy.url},
            "vault": {**vault, "mount": "secret"},
            "state": {"path": str(work / "state.db")},
        }
        for name, values in sections.items():
            data[name] = {**data.get(name, {}), **values}
        path = work / "rotator.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def workdir(self, name: str) -> Path:
        path = self.scratch / name
        path.mkdir()
        return path


def contained(rig: Rig, row: Row, key_id: str, available: float) -> float | None:
    """Wait for the key's containment; record its latency. The arrival time, or None."""
    at = rig.arrivals.contained_at(key_id, WAIT)
    if at is None:
        row.missed += 1
    else:
        row.samples.append(at - available)
        before = [c for c in rig.arrivals.between(available, at) if c != "sqs:ReceiveMessage"]
        row.before[", ".join(before) or "none"] += 1
    return at


# --- 1. file: the CLI -----------------------------------------------------------------------


def file_cli(rig: Rig, leaks: int, vault_up: bool) -> Row:
    row = Row("file: `rotator leak-event FILE`, a new process", "up" if vault_up else "down", leaks)
    work = rig.workdir(f"file-cli-{row.vault}")
    pairs = rig.fresh_account(f"cli-{row.vault}", leaks)
    config = rig.config(work, vault_up)
    events = []
    for i, (_, key_id) in enumerate(pairs):
        path = work / f"event-{i:04d}.json"
        path.write_bytes(health_event(key_id, f"cli{row.vault}{i}"))
        events.append(path)
    exits: Counter[int] = Counter()
    walls: list[float] = []
    with open(work / "cli.log", "ab") as err:
        for (_, key_id), path in zip(pairs, events, strict=True):
            available = time.monotonic()
            proc = subprocess.run(
                [*rotator_cmd(), "--config", str(config), "leak-event", str(path)],
                env=rig.env,
                cwd=rig.scratch,
                stdout=subprocess.DEVNULL,
                stderr=err,
                stdin=subprocess.DEVNULL,
                timeout=120,
            )
            walls.append(time.monotonic() - available)
            exits[proc.returncode] += 1
            contained(rig, row, key_id, available)
    row.notes.append("exit " + ", ".join(f"{c}: {n}" for c, n in sorted(exits.items())))
    row.notes.append(f"process p50 {fmt_ms(nearest_rank(walls, 0.5))}")
    row.extra["exit_codes"] = {str(c): n for c, n in exits.items()}
    row.extra["process_wall_ms"] = [_ms(w) for w in walls]
    return row


# --- a long-lived process with one App: the in-process rows ---------------------------------


def serve(config: Path, log_path: Path) -> int:
    """`--serve CONFIG LOG`: read the settings once, then run what stdin asks, one JSON
    line each, on a new App (as a CLI process or a daemon worker builds one):
    {"op": "event", "path": P} -> App.handle_event(bytes of P);
    {"op": "scan"} -> App.scan_and_open(). Answers a JSON line each."""
    import rotator
    from rotator import log as rotator_log
    from rotator.app import App
    from rotator.config import load_settings
    from rotator.errors import RotatorError

    with open(log_path, "a", encoding="utf-8") as out:
        rotator_log.configure("json", "INFO", stream=out)
        settings = load_settings(config, need_vault=False)
        print(json.dumps({"ready": True, "rotator": rotator.__file__}), flush=True)
        for line in sys.stdin:
            order = json.loads(line)
            answer: dict[str, Any] = {}
            raw = Path(order["path"]).read_bytes() if order["op"] == "event" else b""
            started = time.monotonic()
            app = App(settings)
            try:
                if order["op"] == "event":
                    answer["contained"] = app.handle_event(raw).contained
                else:
                    passed = app.scan_and_open()
                    answer["contained"] = len(passed.opened)
                    answer["vault_error"] = passed.vault_error is not None
            except RotatorError as exc:
                answer["error"] = type(exc).__name__
            finally:
                app.close()
            answer["started"] = started
            answer["seconds"] = time.monotonic() - started
            print(json.dumps(answer), flush=True)
    return 0


class Server:
    """The `--serve` process, spoken to over its stdin and stdout."""

    def __init__(self, rig: Rig, config: Path, work: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(config), str(work / "app.log")],
            env=rig.env,
            cwd=rig.scratch,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(work / "serve.stderr", "ab"),  # noqa: SIM115 - the child keeps it
            text=True,
        )
        self._stdout: IO[str] = self.proc.stdout  # type: ignore[assignment]
        self._stdin: IO[str] = self.proc.stdin  # type: ignore[assignment]
        ready = self._stdout.readline()
        if not ready:
            raise RuntimeError(f"the --serve process failed; see {work / 'serve.stderr'}")
        found = Path(json.loads(ready)["rotator"]).resolve()
        if not found.is_relative_to((rig.scratch / "code").resolve()):
            self.close()
            raise SystemExit(f"the --serve process imports rotator from {found}")

    def ask(self, order: dict[str, Any]) -> dict[str, Any]:
        self._stdin.write(json.dumps(order) + "\n")
        self._stdin.flush()
        line = self._stdout.readline()
        if not line:
            raise RuntimeError("the --serve process exited")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def file_in_process(rig: Rig, leaks: int, vault_up: bool) -> Row:
    row = Row(
        "file: `App.handle_event`, in process, a new App", "up" if vault_up else "down", leaks
    )
    work = rig.workdir(f"file-app-{row.vault}")
    pairs = rig.fresh_account(f"app-{row.vault}", leaks)
    config = rig.config(work, vault_up)
    server = Server(rig, config, work)
    errors: Counter[str] = Counter()
    try:
        for i, (_, key_id) in enumerate(pairs):
            path = work / f"event-{i:04d}.json"
            path.write_bytes(health_event(key_id, f"app{row.vault}{i}"))
            answer = server.ask({"op": "event", "path": str(path)})
            if "error" in answer:
                errors[answer["error"]] += 1
            # From just before App(settings): the file and the pipe are not counted.
            contained(rig, row, key_id, float(answer["started"]))
    finally:
        server.close()
    row.notes.append("a new App per event")
    if errors:
        row.notes.append("raised " + ", ".join(f"{k} x{n}" for k, n in errors.items()))
    return row


# --- 4. quarantine policy, then a scan ------------------------------------------------------


def quarantine_scan(rig: Rig, leaks: int, vault_up: bool) -> Row:
    row = Row(
        f"quarantine policy, then `App.scan_and_open` of {max(leaks, rig.users):,} users",
        "up" if vault_up else "down",
        leaks,
    )
    work = rig.workdir(f"quarantine-{row.vault}")
    pairs = rig.fresh_account(f"qua-{row.vault}", leaks)
    config = rig.config(work, vault_up)
    server = Server(rig, config, work)
    passes: list[float] = []
    try:
        for user, key_id in pairs:
            rig.iam.attach_user_policy(UserName=user, PolicyArn=QUARANTINE_V2)
            available = time.monotonic()
            answer = server.ask({"op": "scan"})
            passes.append(float(answer["seconds"]))
            contained(rig, row, key_id, available)
            # Reviewed: the next pass sees one quarantined user again, not a growing list.
            rig.aws.backend.detach_user_policy(QUARANTINE_V2, user)
    finally:
        server.close()
    whole = fmt_ms(nearest_rank(passes, 0.5))
    row.notes.append(f"whole pass p50 {whole}")
    row.extra["pass_ms"] = [_ms(p) for p in passes]
    return row


# --- 2 and 3: a running daemon --------------------------------------------------------------


class Daemon:
    """`rotator --log-format json daemon`; its stderr is kept and its events counted."""

    def __init__(self, rig: Rig, config: Path, work: Path) -> None:
        self.started = time.monotonic()
        self.events: Counter[str] = Counter()
        self.last_error: str | None = None
        self._cond = threading.Condition()
        self._log = open(work / "daemon.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*rotator_cmd(), "--config", str(config), "--log-format", "json", "daemon"],
            env=rig.env,
            cwd=rig.scratch,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="daemon-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._log.write(line)
            if not line.startswith(b"{"):  # not a log line: an error message, a traceback
                self.last_error = line.decode(errors="replace").strip()[:300] or self.last_error
            with contextlib.suppress(ValueError, AttributeError):
                entry = json.loads(line)
                name = entry.get("event")
                if entry.get("level") in ("error", "critical"):
                    self.last_error = f"{name}: {entry.get('error') or ''}"[:300]
                if isinstance(name, str):
                    with self._cond:
                        self.events[name] += 1
                        self._cond.notify_all()

    def why_not(self) -> str:
        """The daemon's exit code, if it exited, and its last error line."""
        code = self.proc.poll()
        said = self.last_error or "no error logged"
        return (f"exited with code {code}: " if code is not None else "running: ") + said

    def wait_for(self, check: Callable[[Counter[str]], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: check(self.events) or self.proc.poll() is not None, timeout
            ) and check(self.events)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(timeout=10)
        self._log.close()
        return self.proc.returncode


def waits_for_vault(daemon: Daemon) -> bool:
    return daemon.events["daemon.backend_unavailable"] > 0 and not daemon.events["daemon.ready"]


def first_scan(daemon: Daemon) -> None:
    """Let the daemon's first scan (at start) finish before the first leak."""
    daemon.wait_for(
        lambda e: e["daemon.scan_done"] + e["daemon.scan_failed"] > 0 or waits_for_vault(daemon),
        DAEMON_START,
    )


@contextlib.contextmanager
def running(rig: Rig, config: Path, work: Path) -> Iterator[Daemon]:
    daemon = Daemon(rig, config, work)
    try:
        yield daemon
    finally:
        daemon.stop()


def sqs_daemon(rig: Rig, leaks: int, vault_up: bool) -> Row:
    """One leak at a time, each once the daemon's queue worker polls again after the
    previous one and at least PACE after it."""
    row = Row("SQS: one message, `rotator daemon` polling", "up" if vault_up else "down", leaks)
    with sqs_rig(rig, row, "sqs") as (daemon, queue, pairs):
        if daemon is None:
            return row
        idle: list[float] = []
        previous = 0.0
        for i, (_, key_id) in enumerate(pairs):
            # The worker's App lives on, and with it its IAM token bucket: leave it
            # time to refill, so each leak meets an idle rotator.
            time.sleep(max(0.0, previous + PACE - time.monotonic()))
            rig.sqs.send_message(
                QueueUrl=queue, MessageBody=health_event(key_id, f"sqs{row.vault}{i}").decode()
            )
            available = previous = time.monotonic()
            at = contained(rig, row, key_id, available)
            # The worker handles the message, advances the replacement, then polls again.
            back = rig.arrivals.polled_after(at or available, SETTLE)
            if back is not None:
                idle.append(back - available)
        if idle:
            row.notes.append(f"polls again after p50 {fmt_ms(nearest_rank(idle, 0.5))}")
            row.extra["polls_again_ms"] = [_ms(t) for t in idle]
    return row


def sqs_burst(rig: Rig, leaks: int, vault_up: bool) -> Row:
    """Every leak at once: `leaks` messages sent back to back."""
    row = Row(
        f"SQS: {leaks} messages at once, `rotator daemon` polling",
        "up" if vault_up else "down",
        leaks,
    )
    with sqs_rig(rig, row, "burst") as (daemon, queue, pairs):
        if daemon is None:
            return row
        sent: list[tuple[str, float]] = []
        for i, (_, key_id) in enumerate(pairs):
            body = health_event(key_id, f"burst{row.vault}{i}").decode()
            rig.sqs.send_message(QueueUrl=queue, MessageBody=body)
            sent.append((key_id, time.monotonic()))
        for key_id, available in sent:
            at = rig.arrivals.contained_at(key_id, BURST_WAIT)
            if at is None:
                row.missed += 1
            else:
                row.samples.append(at - available)
        if row.samples:
            row.notes.append(f"last contained {fmt_ms(max(row.samples))} after its message")
    return row


def sqs_verify(rig: Rig, leaks: int, vault_up: bool) -> Row:
    """Each leak arrives B_AFTER seconds after the previous one was contained, while
    that one's replacement is in VERIFY: the new key's first use (sts:GetCallerIdentity),
    which the proxy holds VERIFY_DELAY seconds, a stand-in for a new IAM key that AWS
    accepts only after a few seconds (eventual consistency)."""
    count = min(leaks, VERIFY_LEAKS)
    row = Row(
        f"SQS: one message while the previous leak's new key verifies ({VERIFY_DELAY:.0f} s)",
        "up" if vault_up else "down",
        count,
    )
    # A warm-up leak, the first one (not measured), then `count` measured ones.
    with sqs_rig(rig, row, "verify", count + 2) as (daemon, queue, pairs):
        if daemon is None:
            return row

        def send(i: int) -> float:
            body = health_event(pairs[i][1], f"verify{row.vault}{i}").decode()
            rig.sqs.send_message(QueueUrl=queue, MessageBody=body)
            return time.monotonic()

        # The worker's first event asks STS for its account id: that call is not held.
        warm = send(0)
        rig.arrivals.polled_after(rig.arrivals.contained_at(pairs[0][1], WAIT) or warm, SETTLE)
        rig.arrivals.verify_delay = VERIFY_DELAY
        during = 0  # leaks sent while a verification call was held
        try:
            previous = send(1)
            previous = rig.arrivals.contained_at(pairs[1][1], WAIT) or previous
            for i in range(2, count + 2):
                time.sleep(max(0.0, previous + B_AFTER - time.monotonic()))
                available = send(i)
                during += rig.arrivals.holding(available)
                previous = contained(rig, row, pairs[i][1], available) or available
            rig.arrivals.polled_after(previous, SETTLE + VERIFY_DELAY)
        finally:
            rig.arrivals.verify_delay = 0.0
    row.notes.append(f"{during} of {count} sent while a new key's verification was held")
    row.extra["sent_during_verify"] = during
    return row


@contextlib.contextmanager
def sqs_rig(
    rig: Rig, row: Row, name: str, leaks: int | None = None
) -> Iterator[tuple[Daemon | None, str, list[tuple[str, str]]]]:
    """A fresh account with `leaks` (default: the row's) users that will leak, a queue
    and a daemon polling it (None, with `row.na` set, when it never polls)."""
    work = rig.workdir(f"{name}-{row.vault}")
    pairs = rig.fresh_account(f"{name}-{row.vault}", leaks or row.planned)
    queue = rig.sqs.create_queue(QueueName=f"health-{name}-{row.vault}")["QueueUrl"]
    config = rig.config(
        work,
        row.vault == "up",
        leaks={"sqs_queue_url": queue},
        schedule={"scan": "1h"},
        http={"listen": f"127.0.0.1:{free_port()}"},
    )
    with running(rig, config, work) as daemon:
        polling = rig.arrivals.polled_after(daemon.started, DAEMON_START)
        if polling is None:
            row.na = NA_VAULT if waits_for_vault(daemon) else "n/a (the daemon never polled)"
            row.notes.append(f"no ReceiveMessage within {DAEMON_START:.0f} s of the start")
            if not waits_for_vault(daemon):
                row.notes.append(daemon.why_not())
            yield None, queue, pairs
            return
        row.extra["first_poll_after_start_s"] = round(polling - daemon.started, 2)
        first_scan(daemon)
        yield daemon, queue, pairs
        row.extra["daemon_events"] = _interesting(daemon.events)


def http_daemon(rig: Rig, leaks: int, vault_up: bool) -> Row:
    row = Row("HTTP: `POST /v1/rotations`, `rotator daemon`", "up" if vault_up else "down", leaks)
    work = rig.workdir(f"http-{row.vault}")
    pairs = rig.fresh_account(f"http-{row.vault}", leaks)
    token = secrets.token_hex(24)
    token_file = work / "trigger-token"
    token_file.touch(mode=0o600)  # rotator refuses a token file others can read
    token_file.write_text(token)
    port = free_port()
    config = rig.config(
        work,
        vault_up,
        schedule={"scan": "1h"},
        http={"listen": f"127.0.0.1:{port}", "trigger_token_file": str(token_file)},
    )
    statuses: Counter[int] = Counter()
    answered: list[float] = []
    with running(rig, config, work) as daemon:
        if not _serving(port, daemon):
            row.na = "n/a (the daemon's HTTP endpoint never answered)"
            row.notes.append(daemon.why_not())
            return row
        first_scan(daemon)
        if waits_for_vault(daemon):
            row.notes.append("daemon not ready (waits for Vault); its HTTP trigger answers")
        previous = 0.0
        for i, (user, key_id) in enumerate(pairs):
            body = json.dumps(
                {"user_name": user, "access_key_id": key_id, "leaked": True, "reason": "bench"}
            )
            # A daemon that serves triggers with one App keeps one IAM token bucket.
            time.sleep(max(0.0, previous + PACE - time.monotonic()))
            available = previous = time.monotonic()
            status = _post(port, token, body)
            answered.append(time.monotonic() - available)
            statuses[status] += 1
            if status == 202:
                contained(rig, row, key_id, available)
            else:
                row.missed += 1
            # The trigger worker goes on with the replacement; wait until it reports.
            daemon.wait_for(partial(_triggers_done, count=i + 1), SETTLE)
        row.extra["daemon_events"] = _interesting(daemon.events)
    row.notes.append("HTTP " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))
    row.notes.append(f"202 after p50 {fmt_ms(nearest_rank(answered, 0.5))}")
    row.extra["http_status"] = {str(s): n for s, n in statuses.items()}
    row.extra["answered_ms"] = [_ms(a) for a in answered]
    if statuses and not statuses.get(202):
        row.na = "n/a (the trigger never answered 202)"
    return row


def _triggers_done(events: Counter[str], count: int) -> bool:
    return events["daemon.trigger_done"] + events["daemon.trigger_advance_failed"] >= count


def _serving(port: int, daemon: Daemon) -> bool:
    deadline = time.monotonic() + DAEMON_START
    while time.monotonic() < deadline and daemon.proc.poll() is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return True
        except OSError:
            time.sleep(0.1)
        finally:
            conn.close()
    return False


def _post(port: int, token: str, body: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST",
            "/v1/rotations",
            body=body.encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return 0
    finally:
        conn.close()


def _interesting(events: Counter[str]) -> dict[str, int]:
    return {k: n for k, n in sorted(events.items()) if k.startswith(("daemon.", "leak"))}


# --- main -----------------------------------------------------------------------------------

SOURCES: dict[str, Callable[[Rig, int, bool], Row]] = {
    "file": file_cli,
    "app": file_in_process,
    "sqs": sqs_daemon,
    "sqs-burst": sqs_burst,
    "sqs-verify": sqs_verify,
    "http": http_daemon,
    "quarantine": quarantine_scan,
}


def table(rows: list[Row]) -> list[str]:
    out = [
        "| source | Vault | leaks | p50 | p99 | max | notes |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.na:
            cells = [r.na, "", ""]
        else:
            p99 = r.stat(0.99)
            cells = [fmt_ms(r.stat(0.5)), fmt_ms(p99), fmt_ms(max(r.samples, default=None))]
        count = f"{len(r.samples)}/{r.planned}"
        notes = "; ".join(r.notes + ([f"{r.missed} not contained"] if r.missed else []))
        out.append(f"| {r.source} | {r.vault} | {count} | {' | '.join(cells)} | {notes} |")
    return out


def bao_version() -> str:
    done = subprocess.run([bao_binary(), "version"], capture_output=True, text=True)
    words = done.stdout.split()
    return words[1] if len(words) > 1 else "?"


def calls_before(rows: list[Row]) -> list[str]:
    """The AWS calls each row's rotator made between "available" and the containment."""
    out = ["AWS calls received after the leak was available and before its containment:", ""]
    for r in rows:
        if not r.before:
            continue
        calls, n = r.before.most_common(1)[0]
        others = sum(r.before.values()) - n
        more = f" ({others} leak(s): another sequence)" if others else ""
        out.append(f"- {r.source}, Vault {r.vault}: {calls} + UpdateAccessKey{more}")
    return out


def describe_run(opts: argparse.Namespace, wall: float, load: tuple[float, float]) -> str:
    return (
        f"Run {datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')} "
        f"({'quick' if opts.quick else 'full'}, {opts.leaks} leaks per row), "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"moto {metadata.version('moto')}, OpenBao {opts.bao}, rotator: {opts.code}. "
        f"Total {wall:.0f} s; 1-min load average {load[0]:.2f} at the start, "
        f"{load[1]:.2f} at the end."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LEAKS} leaks per row")
    parser.add_argument("--leaks", type=int, help=f"leaks per row ({FULL_LEAKS})")
    parser.add_argument(
        "--users",
        type=int,
        default=DEFAULT_USERS,
        help=f"users in the account of every row, at least --leaks ({DEFAULT_USERS})",
    )
    parser.add_argument(
        "--only",
        default=",".join(SOURCES),
        help=f"comma-separated sources to run ({','.join(SOURCES)})",
    )
    parser.add_argument("--vault", choices=("both", "up", "down"), default="both")
    parser.add_argument("--rev", help="run this git revision of rotator/ (default: the tree)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--serve", nargs=2, metavar=("CONFIG", "LOG"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.leaks is None:
        opts.leaks = QUICK_LEAKS if opts.quick else FULL_LEAKS
    if opts.leaks < 1:
        parser.error("--leaks: at least 1")
    opts.sources = [s.strip() for s in opts.only.split(",") if s.strip()]
    unknown = set(opts.sources) - set(SOURCES)
    if unknown:
        parser.error(f"--only: unknown source(s) {', '.join(sorted(unknown))}")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.serve:
        return serve(Path(opts.serve[0]), Path(opts.serve[1]))
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "VAULT_ADDR"):
        os.environ.pop(var, None)
    os.environ.update(FAKE_AWS_ENV)
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    scratch = Path(tempfile.mkdtemp(prefix="rotator-containment-"))
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    rows: list[Row] = []
    vaults = {"both": (True, False), "up": (True,), "down": (False,)}[opts.vault]
    opts.code = snapshot_code(scratch / "code", opts.rev)
    opts.bao = bao_version()
    log(f"rotator: {opts.code}; scratch directory {scratch}")
    try:
        with contextlib.ExitStack() as cleanup:
            rig = Rig(scratch, cleanup, opts.users, scratch / "code")
            for source in opts.sources:
                for vault_up in vaults:
                    log(f"{source}, Vault {'up' if vault_up else 'down'}: {opts.leaks} leaks")
                    row = SOURCES[source](rig, opts.leaks, vault_up)
                    rows.append(row)
                    summary = row.na or (
                        f"p50 {fmt_ms(row.stat(0.5))}, p99 {fmt_ms(row.stat(0.99))}, "
                        f"max {fmt_ms(max(row.samples, default=None))}"
                    )
                    log(f"  {summary}{f'; {row.missed} missed' if row.missed else ''}")
    except KeyboardInterrupt:
        log("interrupted")
        opts.keep = True
    wall = time.monotonic() - started
    header = describe_run(opts, wall, (load_start, os.getloadavg()[0]))
    lines = [header, "", *table(rows), "", *calls_before(rows)]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "containment.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "containment.json").write_text(
        json.dumps({"run": header, "rows": [r.doc() for r in rows]}, indent=1)
    )
    if opts.keep:
        print(f"\nscratch directory kept: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if any(r.missed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
