"""Crash soak: rotator under SIGKILL and SIGSTOP never locks a consumer out and never
loses a secret.

    python benchmarks/soak.py               # 200 SIGKILLs, 20 SIGSTOPs, waves of 24 users
    python benchmarks/soak.py --quick       # 20 SIGKILLs, 3 SIGSTOPs, waves of 8 users
    python benchmarks/soak.py --seed 7 --kills 500 --stops 40 --workers 6
    python benchmarks/soak.py --rev HEAD    # the committed code instead of the working tree

A benchmark script, not a test: it runs for minutes (the quick run 2-3 on 2 cores, the
full run about 13), prints a summary table, every violation with the history that led
to it and the command that reproduces the run, and exits 1 on any violation or when the
rotations do not settle.

What runs, all on this machine, in a scratch directory:

- rotator, from a snapshot of `rotator/` taken at start (the working tree, or `--rev`),
  so that edits made while the soak runs cannot mix two versions of the code.
- a moto server (`rotator.sandbox.LocalAws`, in this process), an OpenBao dev server
  (`LocalVault`), and a config with zero overlap and retirement and a short
  `state.lease_ttl` (4s; when the code refuses a lease too short to cover a backend call,
  the shortest one `rotator config check` accepts). rotator reaches both servers through
  a relay that makes its IAM/STS writes and Vault writes slow (`--call-delay`): a process
  killed in a call dies before or after the call took effect, its request still lands
  after it died, and every rotation lasts long enough for faults to land at each stage.
- `--workers` loops, each running `python -m rotator --config CFG run --once` over and
  over, all on the same SQLite state file (fake AWS credentials, no AWS config file).
- a fault driver, seeded by `--seed`: SIGKILLs a running `run --once` at a random moment
  (an age, a number of transitions it has logged, or a delay) until `--kills` hit;
  SIGSTOPs one for 1.2 to 1.8 lease TTLs, then SIGCONTs it, `--stops` times (at most half
  the workers stopped at once); seeds due users (one Active key 120 days old; max_age is
  90d) in `--waves` waves spread over the faults, and more waves whenever every rotation
  has settled; and adds `--operator-keys` keys "of an operator" (boto3 straight to moto,
  some then set Inactive) to users holding fewer than two keys, mostly mid-rotation.
- a checker, after every kill and continuously in between, reading what IAM (boto3,
  straight to moto) and Vault (KV v2 HTTP API, root token) hold, never what rotator says.
  For every seeded user:

  1. Vault's latest version names a key of the user that exists and is Active;
  2. the user has at least one Active key;
  3. no operator key was deleted or changed status;
  4. the old (seeded) key is Inactive or gone only while Vault serves an Active
     replacement;
  5. at most two keys.

  IAM and Vault cannot be read in one atomic step, so a finding of 1 or 4 counts only
  when a second Vault read confirms it; then a consumer reading at that instant was
  locked out. Findings are kept with when they were first and last seen.

After the faults, the stopped processes continue, the loops finish, and `run --once` runs
alone until a pass opens nothing and every rotation is terminal or BLOCKED (at most
`--settle-timeout` seconds: retries back off). Then 1 to 5 are checked again, plus:

  6. no orphan: every key is the old one, an operator's, or the one Vault serves;
  7. every seeded user was rotated (old key gone, Vault serves an Active key), or is
     BLOCKED because an operator key holds the slot (listed, with rotator's reason).

For each violation the report shows the user's rotations (`rotator status --json
--user`) and a timeline merged from the logs of every `run --once` that touched the
user, the faults those processes received, and the operator's actions. The scratch
directory (every run's log, `report.txt`, `soak.json`, the state file) is kept when
something was found, or with `--keep`.

The seed fixes every choice the driver makes (users, moments, victims among the running
processes, operator keys); the interleaving of processes is the machine's, not the
seed's, so a rerun explores the same plan, not the same race.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import yaml
from botocore.exceptions import ClientError

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from rotator.sandbox import ACCOUNT_ID, FAKE_AWS_ENV, LocalAws, LocalVault, SeedKey  # noqa: E402

MOUNT = "kv"
DUE_AGE = timedelta(days=120)  # policy.max_age is 90d: every seeded user is due
ACTIVE, INACTIVE = "Active", "Inactive"
TERMINAL = frozenset({"DONE", "FAILED", "ROLLED_BACK", "CANCELLED"})
SETTLED = TERMINAL | {"BLOCKED"}  # nothing more happens without an operator
# Short backend timeouts keep the shortest acceptable lease short (code that bounds a
# call's deadline by them requires the lease to cover it); dropped if the code does
# not know these settings.
TUNING: dict[str, dict[str, str]] = {"aws": {"call_timeout": "2s"}, "vault": {"timeout": "2s"}}

INVARIANTS = {
    1: "Vault's latest version names an Active key of the user",
    2: "every seeded user has at least one Active key",
    3: "no operator key deleted or set Inactive",
    4: "old key retired only while Vault serves an Active replacement",
    5: "at most two keys per user",
    6: "no orphan key (final)",
    7: "every due user rotated, or BLOCKED by an operator key (final)",
}

FULL = {
    "kills": 200,
    "stops": 20,
    "waves": 5,
    "users_per_wave": 24,
    "operator_keys": 15,
    "settle_timeout": 900.0,
}
QUICK = {
    "kills": 20,
    "stops": 3,
    "waves": 3,
    "users_per_wave": 8,
    "operator_keys": 4,
    "settle_timeout": 300.0,
}


def log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def now_utc() -> datetime:
    return datetime.now(UTC)


def hms(moment: datetime) -> str:
    return moment.strftime("%H:%M:%S.%f")[:-3]


def keys_text(keys: dict[str, str]) -> str:
    return ", ".join(f"{k} {s}" for k, s in sorted(keys.items())) or "no keys"


# --- the code under test -----------------------------------------------------------------


def snapshot_code(dest: Path, rev: str | None) -> str:
    """Copy `rotator/` (the working tree, or `rev` from git) to `dest`; describe it."""
    if rev is None:
        shutil.copytree(
            ROOT / "rotator", dest / "rotator", ignore=shutil.ignore_patterns("__pycache__")
        )
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "rotator")
        what = f"working tree at {head}" + (" + uncommitted changes" if dirty else "")
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


def child_env(code: Path) -> dict[str, str]:
    """Fake AWS credentials, no AWS config, no caller's Vault/rotator settings, and the
    code snapshot first on the import path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VAULT_", "ROTATOR_"))}
    env.update(FAKE_AWS_ENV)
    env.update(
        {
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@dataclass
class Rotator:
    """`python -m rotator --config CFG ...` with the snapshot's code. It runs in `cwd`,
    never in the repository: `python -m` puts the working directory first on the path,
    before PYTHONPATH, and would import the live tree instead."""

    config: Path
    env: dict[str, str]
    cwd: Path

    def check_code(self, code: Path) -> None:
        """Refuse to run unless a child imports rotator from the snapshot at `code`."""
        done = subprocess.run(
            [sys.executable, "-c", "import rotator; print(rotator.__file__)"],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.cwd,
        )
        found = Path(done.stdout.strip() or ".").resolve()
        if not found.is_relative_to(code.resolve()):
            raise SystemExit(f"children import rotator from {found}, not from {code}")

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "rotator", "--config", str(self.config), *args]

    def call(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )

    def status(self, user: str | None = None) -> list[dict[str, Any]]:
        args = ["status", "--json", "--limit", "1000000"]
        done = self.call(*args, *(["--user", user] if user else []))
        # The exit code says whether something needs attention; the JSON is the answer.
        try:
            rotations: list[dict[str, Any]] = json.loads(done.stdout)["rotations"]
        except (ValueError, KeyError) as exc:
            raise RuntimeError(f"rotator status exited {done.returncode}: {done.stderr}") from exc
        return rotations


def write_config(
    path: Path,
    aws_url: str,
    vault_url: str,
    token: str,
    db: Path,
    opts: argparse.Namespace,
    lease: int,
) -> None:
    doc: dict[str, Any] = {
        "aws": {"endpoint_url": aws_url, "region": "us-east-1", "concurrency": opts.concurrency},
        "vault": {"url": vault_url, "mount": MOUNT, "auth": {"token": token}},
        "state": {"path": str(db), "lease_ttl": f"{lease}s"},
        "policy": {
            "max_age": "90d",
            "warn_age": "80d",
            "overlap": "0s",
            "delete_after": "0s",
            "verify_timeout": "10s",
        },
    }
    for section, values in (TUNING if opts.tuning else {}).items():
        doc[section].update(values)
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)  # it holds the Vault root token


def fit_config(
    rotator: Rotator, write: Callable[[int], None], opts: argparse.Namespace
) -> tuple[int, list[str]]:
    """Write the config that `rotator config check` accepts: the wanted lease TTL, or
    the shortest one accepted; the short backend timeouts only if the code knows them.
    Returns the lease TTL in seconds and notes on what was changed."""

    def problems(lease: int) -> list[str]:
        write(lease)
        done = rotator.call("config", "check")
        return [] if done.returncode == 0 else [ln.strip() for ln in done.stderr.splitlines()]

    def lease_refused(found: list[str]) -> bool:
        return any(p.startswith("state.lease_ttl") for p in found)

    notes = []
    wanted = opts.lease_ttl_wanted
    found = problems(wanted)
    tuning = tuple(f"{section}.{key}" for section, keys in TUNING.items() for key in keys)
    if opts.tuning and any(p.startswith(tuning) for p in found):
        opts.tuning = False
        notes.append(f"this code does not know {' / '.join(tuning)}: left out")
        found = problems(wanted)
    if not lease_refused(found):
        if found:
            raise SystemExit("rotator refuses the soak's configuration:\n  " + "\n  ".join(found))
        return wanted, notes
    low, high = wanted, wanted * 2
    while lease_refused(problems(high)):
        low, high = high, high * 2
        if high > 24 * 3600:
            raise SystemExit("no lease TTL up to a day is accepted: " + "; ".join(found))
    while high - low > 1:
        middle = (low + high) // 2
        if lease_refused(problems(middle)):
            low = middle
        else:
            high = middle
    write(high)
    why = next(p for p in found if p.startswith("state.lease_ttl"))
    notes.append(
        f"lease_ttl raised from {wanted}s to {high}s, the shortest the code accepts ({why})"
    )
    return high, notes


# --- slow links -------------------------------------------------------------------------


@dataclass(frozen=True)
class LateCall:
    """A call that took effect after its caller was killed."""

    at: datetime  # when the server had answered
    name: str
    user: str
    detail: str


class SlowLink:
    """An HTTP relay in front of moto or Vault that makes the calls `slow` names take
    `delay` seconds: half before the server sees the request, half after it answered.

    A process killed inside such a call dies either before the call took effect or
    after it took effect without learning so (a key created whose secret it never got, a
    Vault version it never recorded), and a request it had sent still reaches the
    server after it died, as on a real network: the moments recovery exists for. It
    also makes each rotation last long enough for faults to land at every stage of it.
    `late` lists the calls whose answer found their caller gone (`subject` says whose
    they were)."""

    def __init__(
        self,
        target: str,
        delay: float,
        slow: Callable[[str, str, bytes], str | None],
        subject: Callable[[str, bytes, bytes], tuple[str, str]],
    ) -> None:
        host, port = target.removeprefix("http://").split(":")
        link = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as boto3 and hvac expect
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                name = slow(self.command, self.path, body)
                pause = link.delay / 2 if name else 0.0
                time.sleep(pause)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream = http.client.HTTPConnection(host, int(port), timeout=300)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    answer = upstream.getresponse()
                    payload = answer.read()
                finally:
                    upstream.close()
                answered = now_utc()
                time.sleep(pause)
                try:
                    self.send_response(answer.status, answer.reason)
                    for key, value in answer.getheaders():
                        if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    self.wfile.flush()
                except OSError:
                    if name and answer.status < 300:
                        user, detail = subject(self.path, body, payload)
                        with link.lock:
                            link.late.append(LateCall(answered, name, user, detail))
                    raise

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_LIST = relay

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                return None  # a client killed mid-call: that is the point, not news

        self.delay = delay
        self.late: list[LateCall] = []
        self.lock = threading.Lock()
        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="slow-link", daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# Rotation steps, not reads: the scan stays quick, so a pass soon reaches the rotations.
_SLOW_AWS = re.compile(
    rb"(?:^|&)Action=(CreateAccessKey|UpdateAccessKey|DeleteAccessKey|GetCallerIdentity)(?:&|$)"
)


def slow_aws(method: str, path: str, body: bytes) -> str | None:
    found = _SLOW_AWS.search(body)
    return found[1].decode() if found else None


def aws_subject(path: str, body: bytes, payload: bytes) -> tuple[str, str]:
    form = urllib.parse.parse_qs(body.decode(errors="replace"))
    key = form.get("AccessKeyId") or re.findall(r"<AccessKeyId>(\w+)<", payload.decode())
    return (form.get("UserName") or ["?"])[0], f"key {key[0]}" if key else ""


def slow_vault(method: str, path: str, body: bytes) -> str | None:
    if method in ("POST", "PUT", "PATCH") and path.startswith(f"/v1/{MOUNT}/"):
        return f"Vault {path.split('/')[3]} write"  # data or metadata
    return None


def vault_subject(path: str, body: bytes, payload: bytes) -> tuple[str, str]:
    version = re.findall(r'"version":\s*(\d+)', payload.decode(errors="replace"))
    return path.rstrip("/").rsplit("/", 1)[-1], f"version {version[0]}" if version else ""


# --- what IAM and Vault really hold -------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """The latest version of a user's secret in Vault."""

    key_id: str
    version: int


class Cloud:
    """IAM through its API (boto3 against moto) and Vault through its HTTP API (root
    token): what consumers and operators see, not what rotator says it did."""

    def __init__(self, aws: LocalAws, vault: LocalVault) -> None:
        self._vault = vault

        def client() -> Any:
            return boto3.client(
                "iam",
                endpoint_url=aws.endpoint_url,
                region_name="us-east-1",
                aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                aws_session_token=FAKE_AWS_ENV["AWS_SESSION_TOKEN"],
            )

        self._reader = client()  # the checker's
        self._operator = client()  # the operator's (another thread)

    def keys(self, user: str) -> dict[str, str]:
        listed = self._reader.list_access_keys(UserName=user)["AccessKeyMetadata"]
        return {k["AccessKeyId"]: k["Status"] for k in listed}

    def served(self, user: str) -> Held | None:
        """What a consumer reads now at the user's path (None: nothing there)."""
        try:
            doc = self._vault.request("GET", f"/v1/{MOUNT}/data/aws/{ACCOUNT_ID}/{user}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return Held(
            doc["data"]["data"]["aws_access_key_id"], int(doc["data"]["metadata"]["version"])
        )

    def add_operator_key(self, user: str, status: str) -> tuple[str, str] | None:
        """Create a key as an operator would (and set it Inactive when asked); None when
        IAM refused a third key. Returns (key id, the status the operator left it in)."""
        try:
            created = self._operator.create_access_key(UserName=user)["AccessKey"]
        except ClientError:
            return None
        key_id = created["AccessKeyId"]
        if status == INACTIVE:
            try:
                self._operator.update_access_key(UserName=user, AccessKeyId=key_id, Status=status)
            except ClientError:
                # Deleted in the instant between: by rotator, while it was Active.
                return key_id, ACTIVE
        return key_id, status


def rotation_states(db: Path) -> dict[str, str]:
    """Each user's latest rotation state, read-only from the state file ({} before it
    exists). WAL readers never wait for a writer, even one that is SIGSTOPped."""
    if not db.exists():
        return {}
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return {}
    try:
        rows = conn.execute(
            "SELECT user_name, state FROM rotations ORDER BY created_at, rowid"
        ).fetchall()
    except sqlite3.Error:
        return {}
    finally:
        conn.close()
    return {str(user): str(state) for user, state in rows}


# --- the ledger: what was seeded, done and found -------------------------------------------


@dataclass
class Seeded:
    user: str
    old_key: str
    wave: int
    at: datetime


@dataclass
class OperatorKey:
    user: str
    key_id: str
    status: str
    at: datetime


@dataclass
class Fault:
    kind: str  # SIGKILL | SIGSTOP
    run: str
    pid: int
    at: datetime
    moment: str  # how the moment was chosen
    age: float  # seconds the victim had been running
    transitions: int  # rotation.transition lines it had logged
    in_flight: int  # rotations open and not BLOCKED in the state store at that moment
    resumed_at: datetime | None = None  # SIGCONT, for a stop


@dataclass
class Violation:
    invariant: int
    user: str
    detail: str
    phase: str  # run | final
    first_at: datetime
    last_at: datetime
    sightings: int = 1


@dataclass
class Ledger:
    seeded: dict[str, Seeded] = field(default_factory=dict)
    waves: int = 0
    operator_keys: list[OperatorKey] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    violations: dict[tuple[str, int, str, str], Violation] = field(default_factory=dict)
    sweeps: Counter[str] = field(default_factory=Counter)
    late_calls: list[LateCall] = field(default_factory=list)  # from the slow links, at the end
    lock: threading.Lock = field(default_factory=threading.Lock)

    def found(self, phase: str, invariant: int, user: str, what: str, detail: str) -> bool:
        """Record a sighting; True when it is a new violation."""
        key = (phase, invariant, user, what)
        moment = now_utc()
        with self.lock:
            seen = self.violations.get(key)
            if seen is not None:
                seen.last_at = moment
                seen.sightings += 1
                return False
            self.violations[key] = Violation(invariant, user, detail, phase, moment, moment)
            return True


# --- the rotator processes ------------------------------------------------------------------


@dataclass
class Run:
    """One `rotator run --once` child process."""

    label: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)
    started_at: datetime = field(default_factory=now_utc)
    rc: int | None = None
    ended_at: datetime | None = None
    stopped_until: float | None = None
    _read: int = 0
    _transitions: int = 0

    def age(self) -> float:
        return time.monotonic() - self.started

    def running(self) -> bool:
        return self.rc is None and self.stopped_until is None

    def transitions(self) -> int:
        """How many `rotation.transition` lines it has logged so far (read incrementally)."""
        with contextlib.suppress(OSError), open(self.log, "rb") as f:
            f.seek(self._read)
            chunk = f.read()
            whole = chunk.rfind(b"\n") + 1
            self._transitions += chunk[:whole].count(b'"rotation.transition"')
            self._read += whole
        return self._transitions


class Fleet:
    """`--workers` loops, each running `run --once` again as soon as the last one ended."""

    def __init__(self, rotator: Rotator, logs: Path, workers: int) -> None:
        self._rotator = rotator
        self._logs = logs
        self.runs: list[Run] = []  # every one, in start order
        self._live: dict[str, Run] = {}
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(n,), name=f"worker-{n}", daemon=True)
            for n in range(1, workers + 1)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _loop(self, worker: int) -> None:
        argv = self._rotator.argv("--log-format", "json", "run", "--once")
        seq = 0
        while not self.closing.is_set():
            seq += 1
            label = f"w{worker}#{seq:04d}"
            path = self._logs / f"w{worker}-{seq:04d}.log"
            with open(path, "wb") as sink:
                proc = subprocess.Popen(
                    argv,
                    stdout=subprocess.DEVNULL,
                    stderr=sink,
                    stdin=subprocess.DEVNULL,
                    env=self._rotator.env,
                    cwd=self._rotator.cwd,
                    start_new_session=True,
                )
            run = Run(label, proc, path)
            with self.lock:
                self.runs.append(run)
                self._live[label] = run
            rc = proc.wait()
            run.ended_at = now_utc()
            run.rc = rc
            with self.lock:
                del self._live[label]
            if rc == 3:
                # A backend refused: typically the state store, locked by a stopped process.
                self.closing.wait(0.5)

    def live(self) -> list[Run]:
        with self.lock:
            return list(self._live.values())

    def stopped(self) -> list[Run]:
        return [r for r in self.live() if r.stopped_until is not None]

    def resume(self, run: Run, ledger: Ledger) -> None:
        with contextlib.suppress(ProcessLookupError):
            run.proc.send_signal(signal.SIGCONT)
        run.stopped_until = None
        for fault in reversed(ledger.faults):
            if fault.run == run.label and fault.kind == "SIGSTOP" and fault.resumed_at is None:
                fault.resumed_at = now_utc()
                break

    def resume_due(self, ledger: Ledger, everyone: bool = False) -> None:
        for run in self.stopped():
            assert run.stopped_until is not None
            if everyone or run.stopped_until <= time.monotonic():
                self.resume(run, ledger)

    def close(self, ledger: Ledger, timeout: float) -> None:
        """Let the running processes finish (killing what is left after `timeout`)."""
        self.closing.set()
        self.resume_due(ledger, everyone=True)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for run in self.live():
            log(f"{run.label} still running after {timeout:.0f}s: SIGKILL (not counted)")
            with contextlib.suppress(ProcessLookupError):
                run.proc.send_signal(signal.SIGKILL)
        for thread in self._threads:
            thread.join(10)

    def kill_all(self) -> None:
        """Emergency stop: every child still running, by its pid."""
        self.closing.set()
        for run in self.live():
            with contextlib.suppress(ProcessLookupError):
                run.proc.send_signal(signal.SIGCONT)
                run.proc.send_signal(signal.SIGKILL)


# --- the checker --------------------------------------------------------------------------


class Checker:
    """Checks invariants 1 to 5 for every seeded user on what IAM and Vault hold."""

    def __init__(self, cloud: Cloud, ledger: Ledger) -> None:
        self._cloud = cloud
        self._ledger = ledger
        self._lock = threading.Lock()  # one sweep at a time

    def sweep(self, phase: str, why: str) -> int:
        """Check every seeded user once; returns how many new violations were found."""
        with self._lock:
            # Copied first: an operator key is recorded once the operator is done with
            # it, so every key in this copy was in its final status before IAM is read.
            with self._ledger.lock:
                seeded = list(self._ledger.seeded.values())
                ops = list(self._ledger.operator_keys)
            by_user: dict[str, list[OperatorKey]] = defaultdict(list)
            for op in ops:
                by_user[op.user].append(op)
            new = 0
            for user in seeded:
                for invariant, what, detail in self.check_user(user, by_user[user.user]):
                    if self._ledger.found(phase, invariant, user.user, what, detail):
                        new += 1
                        log(f"VIOLATION ({phase}) invariant {invariant} {user.user}: {detail}")
            self._ledger.sweeps[why] += 1
            return new

    def check_user(self, user: Seeded, ops: list[OperatorKey]) -> list[tuple[int, str, str]]:
        served = self._cloud.served(user.user)  # read before IAM: see below
        keys = self._cloud.keys(user.user)
        found: list[tuple[int, str, str]] = []
        if len(keys) > 2:
            found.append((5, "count", f"{len(keys)} keys: {keys_text(keys)}"))
        if ACTIVE not in keys.values():
            found.append((2, "active", f"no Active key: {keys_text(keys)}"))
        for op in ops:
            if op.key_id not in keys:
                found.append((3, op.key_id, f"operator key {op.key_id} ({op.status}) deleted"))
            elif keys[op.key_id] != op.status:
                found.append(
                    (
                        3,
                        op.key_id,
                        f"operator key {op.key_id} was {op.status}, is {keys[op.key_id]}",
                    )
                )

        def live(held: Held | None) -> bool:
            return held is not None and keys.get(held.key_id) == ACTIVE

        def replaced(held: Held | None) -> bool:
            return live(held) and held is not None and held.key_id != user.old_key

        dead_served = served is not None and not live(served)
        retired_early = keys.get(user.old_key) != ACTIVE and not replaced(served)
        if dead_served or retired_early:
            # The reads are not atomic. Vault read before IAM: a key it named can only
            # have gone meanwhile if a newer version replaced it. Vault read after IAM:
            # an old key found retired had its replacement served already.
            again = self._cloud.served(user.user)
            if dead_served and served is not None and again is not None:
                dead_served = not (again.version != served.version and live(again))
            if dead_served and served is not None:
                state = keys.get(served.key_id, "deleted")
                found.append(
                    (
                        1,
                        served.key_id,
                        f"Vault v{served.version} names {served.key_id}, which is {state} in "
                        f"IAM ({keys_text(keys)})",
                    )
                )
            if retired_early and not replaced(again):
                state = keys.get(user.old_key, "deleted")
                what = f"v{again.version} names {again.key_id}" if again else "nothing"
                found.append(
                    (
                        4,
                        user.old_key,
                        f"old key {user.old_key} is {state} while Vault serves {what} "
                        f"({keys_text(keys)})",
                    )
                )
        return found


# --- the fault driver ----------------------------------------------------------------------


class Driver:
    """Kills and stops `run --once` processes at random moments, seeds waves of due users
    and adds operator keys, all decided by one seeded RNG."""

    def __init__(
        self,
        opts: argparse.Namespace,
        aws: LocalAws,
        cloud: Cloud,
        fleet: Fleet,
        checker: Checker,
        ledger: Ledger,
        db: Path,
    ) -> None:
        self._opts = opts
        self._aws = aws
        self._cloud = cloud
        self._fleet = fleet
        self._checker = checker
        self._ledger = ledger
        self._db = db
        self._rng = random.Random(opts.seed)
        self.extra_waves = 0

    def seed_wave(self) -> None:
        wave = self._ledger.waves
        moment = now_utc()
        for n in range(self._opts.users_per_wave):
            name = f"soak-{wave}-{n:03d}"
            [key] = self._aws.add_user(name, keys=[SeedKey(DUE_AGE)], now=moment)
            with self._ledger.lock:
                self._ledger.seeded[name] = Seeded(name, key.access_key_id, wave, moment)
        self._ledger.waves += 1
        log(f"wave {wave}: {self._opts.users_per_wave} due users seeded")

    def idle(self) -> bool:
        """Every seeded user has a rotation, and every latest one has settled."""
        states = rotation_states(self._db)
        return all(states.get(user) in SETTLED for user in self._ledger.seeded)

    def in_flight(self) -> int:
        return sum(1 for s in rotation_states(self._db).values() if s not in SETTLED)

    def run(self) -> None:
        opts, rng = self._opts, self._rng
        kills_left, stops_left = opts.kills, opts.stops
        total = kills_left + stops_left
        operator_at = Counter(rng.randrange(total) for _ in range(opts.operator_keys))
        operator_due = 0  # put off until a user is due or mid-rotation
        step = 0
        while kills_left or stops_left:
            self._fleet.resume_due(self._ledger)
            self._seed_due(step, total, kills_left)
            operator_due += operator_at.pop(step, 0)
            while operator_due and self.add_operator_key(busy_only=True):
                operator_due -= 1
            coin = rng.random()
            slot_free = len(self._fleet.stopped()) < opts.workers // 2
            if stops_left and not kills_left and not slot_free:
                self._pause(0.1)
                continue
            stop = bool(stops_left) and slot_free and coin < stops_left / (stops_left + kills_left)
            victim = self._pick_victim()
            moment = self._await_moment(victim)
            if moment is None:
                continue  # it ended first: draw again
            if stop:
                self._stop(victim, moment)
                stops_left -= 1
                step += 1
            elif self._kill(victim, moment):
                kills_left -= 1
                step += 1
                done = opts.kills - kills_left
                if done % 10 == 0 or not kills_left:
                    log(f"{done}/{opts.kills} kills, {opts.stops - stops_left} stops")
                self._checker.sweep("run", "after a kill")
        for _ in range(operator_due):
            if not self.add_operator_key(busy_only=False):
                log("operator key: no user has a free slot")
        while self._fleet.stopped():  # the last stops run their full course
            self._pause(0.1)

    def _seed_due(self, step: int, total: int, kills_left: int) -> None:
        planned = self._opts.waves
        seeded = self._ledger.waves
        if seeded < planned and (step >= seeded * total / planned or self.idle()):
            self.seed_wave()
        elif seeded >= planned and kills_left and self.extra_waves < 3 * planned and self.idle():
            # The work ran out before the kills: more due users, so faults keep landing
            # on rotations rather than on empty passes.
            self.extra_waves += 1
            self.seed_wave()

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._fleet.resume_due(self._ledger)
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

    def _pick_victim(self) -> Run:
        while True:
            running = sorted((r for r in self._fleet.live() if r.running()), key=lambda r: r.label)
            if running:
                return self._rng.choice(running)
            self._pause(0.02)

    def _await_moment(self, run: Run) -> str | None:
        """Wait for a random moment of `run`'s life; None when it ended first."""
        kind = self._rng.choice(("age", "work", "delay"))
        if kind == "age":
            age = self._rng.uniform(0.5, 6.0)
            moment = f"at age {age:.1f}s"

            def reached() -> bool:
                return run.age() >= age

        elif kind == "work":
            count = self._rng.randint(1, 6)
            base = run.transitions()
            deadline = time.monotonic() + 6  # the work may end first; strike anyway
            moment = f"after {count} more transition(s)"

            def reached() -> bool:
                return run.transitions() >= base + count or time.monotonic() >= deadline

        else:
            delay = self._rng.uniform(0.1, 2.5)
            deadline = time.monotonic() + delay
            moment = f"{delay:.1f}s after it was picked"

            def reached() -> bool:
                return time.monotonic() >= deadline

        while not reached():
            if run.rc is not None or run.proc.poll() is not None or run.stopped_until:
                return None
            self._pause(0.005)
        return moment

    def _fault(self, kind: str, run: Run, moment: str) -> Fault:
        fault = Fault(
            kind,
            run.label,
            run.proc.pid,
            now_utc(),
            moment,
            round(run.age(), 3),
            run.transitions(),
            self.in_flight(),
        )
        with self._ledger.lock:
            self._ledger.faults.append(fault)
        return fault

    def _kill(self, run: Run, moment: str) -> bool:
        """SIGKILL `run`; True when it died of it (not when it had exited just before)."""
        if run.proc.poll() is not None:
            return False
        fault = self._fault("SIGKILL", run, moment)
        with contextlib.suppress(ProcessLookupError):
            run.proc.send_signal(signal.SIGKILL)
        while run.rc is None:
            self._pause(0.005)
        if run.rc != -signal.SIGKILL:
            with self._ledger.lock:
                self._ledger.faults.remove(fault)  # it had exited by itself just before
            return False
        return True

    def _stop(self, run: Run, moment: str) -> None:
        held = self._rng.uniform(1.2, 1.8) * self._opts.lease_ttl
        self._fault("SIGSTOP", run, moment)
        run.stopped_until = time.monotonic() + held
        with contextlib.suppress(ProcessLookupError):
            run.proc.send_signal(signal.SIGSTOP)
        log(f"SIGSTOP {run.label} for {held:.0f}s (lease {self._opts.lease_ttl}s)")

    def add_operator_key(self, busy_only: bool) -> bool:
        """An operator adds a key to a user holding fewer than two keys; with `busy_only`,
        only to a user due or mid-rotation, where a stranger's key is hardest to tell from
        the rotation's own. False when no such user has a free slot now."""
        status = INACTIVE if self._rng.random() < 0.4 else ACTIVE
        order = sorted(self._ledger.seeded)
        self._rng.shuffle(order)
        taken = {op.user for op in self._ledger.operator_keys}
        states = rotation_states(self._db)
        for user in order:
            busy = states.get(user) not in SETTLED  # None: due, no rotation opened yet
            if user in taken or (busy_only and not busy) or len(self._cloud.keys(user)) >= 2:
                continue
            added = self._cloud.add_operator_key(user, status)
            if added is None:
                continue  # rotator took the slot first
            key_id, left = added
            with self._ledger.lock:
                self._ledger.operator_keys.append(OperatorKey(user, key_id, left, now_utc()))
            where = states.get(user, "no rotation yet")
            log(f"operator key {key_id} ({left}) added to {user} ({where})")
            return True
        return False


# --- the end: settle, check strictly, report ----------------------------------------------------


def settle(rotator: Rotator, logs: Path, timeout: float) -> tuple[int, bool]:
    """`run --once` alone until a pass opens nothing and every rotation has settled."""
    deadline = time.monotonic() + timeout
    passes = 0
    while True:
        passes += 1
        with open(logs / f"settle-{passes:03d}.log", "wb") as sink:
            done = subprocess.run(
                rotator.argv("--log-format", "json", "run", "--once", "--json"),
                stdout=subprocess.PIPE,
                stderr=sink,
                stdin=subprocess.DEVNULL,
                env=rotator.env,
                cwd=rotator.cwd,
                timeout=max(60.0, timeout),
            )
        try:
            opened = json.loads(done.stdout)["opened"]
        except (ValueError, KeyError):
            opened = ["?"]  # no summary (a backend refused): not settled
        busy = [r for r in rotator.status() if r["state"] not in SETTLED]
        if not opened and not busy:
            return passes, True
        if time.monotonic() >= deadline:
            return passes, False
        due = [datetime.fromisoformat(r["next_action_at"]) for r in busy if r["next_action_at"]]
        wait = (min(due) - now_utc()).total_seconds() if due and len(due) == len(busy) else 0
        time.sleep(min(max(wait, 0.5), 30.0, max(0.0, deadline - time.monotonic())))


def final_checks(
    checker: Checker, cloud: Cloud, ledger: Ledger, rotations: list[dict[str, Any]]
) -> dict[str, dict[str, str]]:
    """Invariants 1-5 strictly, then 6 and 7. Returns {outcome: {user: why}}."""
    checker.sweep("final", "final")
    latest: dict[str, dict[str, Any]] = {}
    for r in sorted(rotations, key=lambda r: r["created_at"]):
        latest[r["user_name"]] = r
    outcomes: dict[str, dict[str, str]] = defaultdict(dict)
    ops = defaultdict(list)
    for op in ledger.operator_keys:
        ops[op.user].append(op)
    for user in ledger.seeded.values():
        keys = cloud.keys(user.user)
        held = cloud.served(user.user)
        mine = {op.key_id for op in ops[user.user]}
        known = {user.old_key, *mine, *([held.key_id] if held else [])}
        for key_id in sorted(set(keys) - known):
            ledger.found(
                "final",
                6,
                user.user,
                key_id,
                f"key {key_id} ({keys[key_id]}) is neither the old key, an operator's, nor "
                f"what Vault serves ({held.key_id if held else 'nothing'})",
            )
        r = latest.get(user.user) or {}
        state = r.get("state", "no rotation")
        why = r.get("last_error") or ""
        rotated = (
            user.old_key not in keys
            and held is not None
            and held.key_id != user.old_key
            and keys.get(held.key_id) == ACTIVE
        )
        if rotated:
            outcomes["rotated"][user.user] = ""
        elif state == "BLOCKED" and mine & set(keys):
            # The operator's key holds the slot the rotation needs and must not be touched.
            outcomes["blocked by an operator key"][user.user] = why or "no explanation given"
        else:
            outcomes["not rotated"][user.user] = why
            ledger.found(
                "final",
                7,
                user.user,
                "outcome",
                f"not rotated: latest rotation {state}{f' ({why})' if why else ''}; IAM "
                f"{keys_text(keys)}; Vault serves {held.key_id if held else 'nothing'}",
            )
    return outcomes


def user_timeline(
    user: str, rotation_ids: list[str], ledger: Ledger, runs: list[Run], logs: Path
) -> list[tuple[datetime, str, str]]:
    """Everything that happened to `user`, merged: the log lines of every process that
    touched it or its rotations, the faults those processes received, seeding and
    operator actions."""
    entries: list[tuple[datetime, str, str]] = []
    seeded = ledger.seeded[user]
    entries.append((seeded.at, "soak", f"seeded, old key {seeded.old_key} (wave {seeded.wave})"))
    for op in ledger.operator_keys:
        if op.user == user:
            entries.append((op.at, "operator", f"added key {op.key_id} ({op.status})"))
    labels = {r.log.name: r.label for r in runs}
    touched: set[str] = set()
    needles = [f'"user": "{user}"'.encode()]
    needles += [f'"rotation_id": "{rid}"'.encode() for rid in rotation_ids]
    for path in sorted(logs.glob("*.log")):
        label = labels.get(path.name, path.stem)
        for line in path.read_bytes().splitlines():
            if not any(needle in line for needle in needles):
                continue
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                at = datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00"))
                entries.append((at, label, describe(doc)))
                touched.add(label)
    for call in ledger.late_calls:
        if call.user == user:
            text = f"{call.name} ({call.detail}) took effect after its caller was killed"
            entries.append((call.at, "relay", text))
    for fault in ledger.faults:
        if fault.run in touched:
            entries.append((fault.at, fault.run, f"{fault.kind} ({fault.moment})"))
            if fault.resumed_at:
                entries.append((fault.resumed_at, fault.run, "SIGCONT"))
    for run in runs:
        if run.label in touched and run.ended_at and run.rc != -signal.SIGKILL:
            entries.append((run.ended_at, run.label, f"exited {run.rc}"))
    for v in ledger.violations.values():
        if v.user == user:
            entries.append((v.first_at, "checker", f"invariant {v.invariant} broken ({v.phase})"))
    return sorted(entries, key=lambda e: e[0])


def describe(doc: dict[str, Any]) -> str:
    event = str(doc.get("event", "?"))
    if event == "rotation.transition":
        return f"{doc.get('from')} -> {doc.get('to')}: {doc.get('reason')}"
    fields = {k: v for k, v in doc.items() if k in ("reason", "error", "key_id", "state")}
    return f"{event} {json.dumps(fields)}" if fields else event


@dataclass
class Results:
    """What the run came to, besides the ledger."""

    rotations: list[dict[str, Any]]  # rotator status --json
    outcomes: dict[str, dict[str, str]]  # outcome -> user -> why
    times: dict[str, float]
    settle_passes: int
    settled: bool
    notes: list[str]


def report(
    opts: argparse.Namespace,
    ledger: Ledger,
    fleet: Fleet,
    rotator: Rotator,
    results: Results,
    logs: Path,
) -> list[str]:
    """The summary table, then every violation with the history of its user."""
    times, outcomes = results.times, results.outcomes
    kills = [f for f in ledger.faults if f.kind == "SIGKILL"]
    stops = [f for f in ledger.faults if f.kind == "SIGSTOP"]
    exits = Counter("killed" if r.rc == -signal.SIGKILL else f"exit {r.rc}" for r in fleet.runs)
    states = Counter(r["state"] for r in results.rotations)
    by_phase = Counter((v.phase, v.invariant) for v in ledger.violations.values())
    ops = ledger.operator_keys
    refused = refusals(fleet.runs)
    worst = max(refused.items(), key=lambda item: item[1], default=(("-", "-"), 0))
    late_count = Counter(call.name for call in ledger.late_calls)
    late = ", ".join(f"{n} {k}" for k, n in sorted(late_count.items())) or "none"
    rows = {
        "wall time": f"{times['total']:.0f} s (faults {times['faults']:.0f} s, settle "
        f"{times['settle']:.0f} s in {results.settle_passes} pass(es)"
        f"{'' if results.settled else ', NOT settled'})",
        "rotator": f"{opts.workers} loops of `run --once`, lease_ttl {opts.lease_ttl}s, "
        f"aws.concurrency {opts.concurrency}, rotation calls take {opts.call_delay:g}s",
        "users": f"{len(ledger.seeded)} due users in {ledger.waves} waves",
        "SIGKILL": f"{len(kills)}: {sum(1 for k in kills if k.in_flight)} with rotations in "
        f"flight, {sum(1 for k in kills if k.transitions)} after the victim logged a "
        f"transition; median victim age {_median([k.age for k in kills])} s",
        "SIGSTOP": f"{len(stops)}: held {_span([_held(f) for f in stops])} s, "
        f"{sum(1 for s in stops if s.in_flight)} with rotations in flight",
        "operator keys": f"{len(ops)}: {sum(1 for o in ops if o.status == ACTIVE)} Active, "
        f"{sum(1 for o in ops if o.status == INACTIVE)} Inactive",
        "run --once": f"{len(fleet.runs)} processes: "
        + ", ".join(f"{n} {k}" for k, n in sorted(exits.items())),
        "rotations": ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none",
        "completed": f"{states.get('DONE', 0)} rotations DONE; users: "
        + ", ".join(f"{len(v)} {k}" for k, v in sorted(outcomes.items())),
        "late calls": f"{late} took effect after their caller was killed",
        "LimitExceeded": f"IAM refused {sum(refused.values())} CreateAccessKey call(s); at "
        f"most {worst[1]} for one rotation in one process ({worst[0][0]}, {worst[0][1]})",
        "checks": ", ".join(f"{n} sweeps {k}" for k, n in sorted(ledger.sweeps.items())),
    }
    out = ["", f"rotator crash soak, seed {opts.seed}", f"code: {opts.code}"]
    out += [f"note: {note}" for note in results.notes]
    width = max(map(len, rows))
    out += [f"  {key:<{width}}  {value}" for key, value in rows.items()]
    out += ["", f"  {'violations by invariant':<72} {'run':>5} {'final':>5}"]
    for number, text in INVARIANTS.items():
        run = "-" if number >= 6 else str(by_phase[("run", number)])
        out.append(f"  {number} {text:<70} {run:>5} {by_phase[('final', number)]:>5}")
    blocked = outcomes.get("blocked by an operator key", {})
    if blocked:
        out += ["", "  BLOCKED because of an operator key (expected; what rotator says):"]
        out += [f"    {user}: {why[:200]}" for user, why in sorted(blocked.items())]
    # Exit codes are answers (0, 1, 3, 4); a traceback or a usage error (2) is a crash.
    crashed = [r for r in fleet.runs if r.rc == 2 or b"Traceback (most" in r.log.read_bytes()]
    if crashed:
        out += ["", f"  {len(crashed)} run(s) crashed (traceback or exit 2); the first ends:"]
        tail = crashed[0].log.read_text(errors="replace").splitlines()[-5:]
        out += [f"    {crashed[0].label}: {line[:200]}" for line in tail]

    by_user: dict[str, list[Violation]] = defaultdict(list)
    for v in sorted(ledger.violations.values(), key=lambda v: (v.first_at, v.invariant)):
        by_user[v.user].append(v)
    if by_user:
        out += ["", f"VIOLATIONS: {len(ledger.violations)}, of {len(by_user)} user(s)"]
    for user, found in by_user.items():
        out.append("")
        for v in found:
            out += [
                f"- {user}: invariant {v.invariant} ({v.phase}) {v.detail}",
                f"    first seen {hms(v.first_at)} UTC, last {hms(v.last_at)}, "
                f"{v.sightings} sighting(s)",
            ]
        out += history(user, found[0].first_at, ledger, fleet.runs, rotator, logs)
    out += ["", "reproduce:", f"  {reproduce(opts)}"]
    return out


def refusals(runs: list[Run]) -> Counter[tuple[str, str]]:
    """CreateAccessKey calls IAM refused for a full user, by (process, user), from the
    logs. One can be a race with an operator; many by one process for one rotation is a
    loop that keeps provoking LimitExceeded (DESIGN invariant 1 says never)."""
    found: Counter[tuple[str, str]] = Counter()
    for run in runs:
        for line in run.log.read_bytes().splitlines():
            if b"IAM refused a new key" in line:
                with contextlib.suppress(ValueError):
                    found[(run.label, json.loads(line).get("user", "?"))] += 1
    return found


def history(
    user: str, first: datetime, ledger: Ledger, runs: list[Run], rotator: Rotator, logs: Path
) -> list[str]:
    """The user's rotations (`rotator status --json --user`) and its merged timeline up to
    a little after the violation was first seen; loops folded."""
    out = []
    try:
        trail = rotator.status(user)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        trail = []
        out.append(f"  rotator status --json --user {user}: {exc}")
    for r in reversed(trail):  # oldest first
        error = f" ({r['last_error']})" if r["last_error"] else ""
        out.append(
            f"  rotation {r['id'][:8]} {r['state']}: old {r['old_key_id']}, new "
            f"{r['new_key_id']}{error}"
        )
        events = [
            (
                f"{e['from']}{e['to']}{e['reason']}",
                f"    {e['at']}  {e['from'] or '-'} -> {e['to']}: {e['reason'][:160]}",
            )
            for e in r.get("events", [])
        ]
        out += collapse(events)
    entries = user_timeline(user, [r["id"] for r in trail], ledger, runs, logs)
    faults = [e for e in entries if e[0] <= first and e[2].startswith(("SIGKILL", "SIGSTOP"))]
    if faults:
        at, run, what = faults[-1]
        out.append(f"  the last fault before, on a process that touched it: {run} {what} {hms(at)}")
    shown = [e for e in entries if e[0] <= first] + [e for e in entries if e[0] > first][:5]
    lines = collapse(
        [(f"{src}{text}", f"    {hms(at)}  {src:<10} {text[:160]}") for at, src, text in shown]
    )
    if len(lines) > 60:
        lines = [*lines[:30], f"    ... {len(lines) - 50} line(s) ...", *lines[-20:]]
    out.append("  timeline, UTC (what the processes that touched it logged, and their faults):")
    return out + lines


def collapse(items: list[tuple[str, str]]) -> list[str]:
    """The lines, with a loop folded: a line whose key is one of the two kept before it
    (A B A B ...) is counted, not shown."""
    out: list[str] = []
    kept: list[str] = []
    folded = 0
    for key, line in items:
        if key in kept[-2:]:
            folded += 1
            continue
        if folded:
            out.append(f"      ... and {folded} more line(s) repeating the ones above")
            folded = 0
        out.append(line)
        kept.append(key)
    if folded:
        out.append(f"      ... and {folded} more line(s) repeating the ones above")
    return out


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"


def _held(fault: Fault) -> float:
    return (fault.resumed_at - fault.at).total_seconds() if fault.resumed_at else 0.0


def _span(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}" if values else "-"


def reproduce(opts: argparse.Namespace) -> str:
    args = ["python", "benchmarks/soak.py", "--seed", str(opts.seed)]
    for name in (*FULL, "workers", "concurrency", "call_delay"):
        args += [f"--{name.replace('_', '-')}", f"{getattr(opts, name):g}"]
    args += ["--lease-ttl", f"{opts.lease_ttl_wanted}s"]
    if opts.rev:
        args += ["--rev", opts.rev]
    if not opts.tuning:
        args.append("--no-tuning")
    return shlex.join(args)


def save_results(path: Path, opts: argparse.Namespace, ledger: Ledger, fleet: Fleet) -> None:
    doc = {
        "options": {k: v for k, v in vars(opts).items() if isinstance(v, str | int | float)},
        "seeded": [asdict(s) for s in ledger.seeded.values()],
        "operator_keys": [asdict(o) for o in ledger.operator_keys],
        "faults": [asdict(f) for f in ledger.faults],
        "late_calls": [asdict(c) for c in ledger.late_calls],
        "runs": [
            {
                "run": r.label,
                "pid": r.proc.pid,
                "started_at": r.started_at,
                "ended_at": r.ended_at,
                "rc": r.rc,
                "log": r.log.name,
            }
            for r in fleet.runs
        ],
        "violations": [asdict(v) for v in ledger.violations.values()],
    }
    path.write_text(json.dumps(doc, indent=1, default=str))


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Crash soak: run --once under SIGKILL/SIGSTOP; checks that no consumer "
        "is locked out and no secret lost.",
    )
    parser.add_argument("--quick", action="store_true", help="a short run for development")
    parser.add_argument("--seed", type=int, help="the driver's RNG seed (default: random)")

    def sized(name: str, what: str, kind: type = int) -> None:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag, type=kind, help=f"{what} ({FULL[name]:g}; --quick: {QUICK[name]:g})"
        )

    sized("kills", "SIGKILLs that must hit")
    sized("stops", "SIGSTOP/SIGCONT pairs")
    sized("waves", "waves of due users planned")
    sized("users_per_wave", "due users per wave")
    sized("operator_keys", "keys an operator adds")
    sized("settle_timeout", "seconds the final passes may take", float)
    parser.add_argument("--workers", type=int, default=4, help="run --once loops (4)")
    parser.add_argument("--lease-ttl", default="4s", help="state.lease_ttl wanted (4s)")
    parser.add_argument("--concurrency", type=int, default=1, help="aws.concurrency (1)")
    parser.add_argument(
        "--call-delay",
        type=float,
        default=0.8,
        help="seconds each IAM/STS write and Vault write takes (0.8)",
    )
    parser.add_argument("--rev", help="run this git revision of rotator/ (default: the tree)")
    parser.add_argument(
        "--no-tuning",
        dest="tuning",
        action="store_false",
        help="leave aws.call_timeout and vault.timeout at their defaults",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    opts = parser.parse_args(argv)
    for name, value in (QUICK if opts.quick else FULL).items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    if opts.seed is None:
        opts.seed = random.SystemRandom().randrange(1_000_000)
    match = re.fullmatch(r"(\d+)([smh])", opts.lease_ttl)
    if not match:
        parser.error("--lease-ttl: an integer and s, m or h, e.g. 4s")
    opts.lease_ttl_wanted = int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]
    if opts.workers < 2:
        parser.error("--workers: at least 2 (the point is concurrency)")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # Nothing in this process may reach a real AWS account either.
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "VAULT_ADDR"):
        os.environ.pop(var, None)
    os.environ.update(FAKE_AWS_ENV)
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    scratch = Path(tempfile.mkdtemp(prefix="rotator-soak-"))
    log(f"seed {opts.seed}; scratch directory {scratch}")
    try:
        failed = soak(opts, scratch)
    except KeyboardInterrupt:
        log("interrupted")
        failed = opts.keep = True
    if failed or opts.keep:
        print(f"\nscratch directory kept: {scratch} (report.txt, soak.json, logs/, state.db)")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


def soak(opts: argparse.Namespace, scratch: Path) -> bool:
    """The whole run, from the servers' start to the report; True when it found a
    violation or could not settle."""
    started = time.monotonic()
    logs = scratch / "logs"
    logs.mkdir()
    opts.code = snapshot_code(scratch / "code", opts.rev)
    log(f"rotator: {opts.code}")
    with contextlib.ExitStack() as cleanup:  # whatever happens, in reverse order
        aws = LocalAws().start()
        cleanup.callback(aws.stop)
        aws.backend.credential_report = True  # always fresh: moto builds reports live
        vault = LocalVault(log_path=scratch / "bao.log").start()
        cleanup.callback(vault.stop)
        vault.enable_kv2(MOUNT)
        # rotator reaches both through slow links; the checker and the operator do not.
        aws_link = SlowLink(aws.endpoint_url, opts.call_delay, slow_aws, aws_subject)
        cleanup.callback(aws_link.stop)
        vault_link = SlowLink(vault.addr, opts.call_delay, slow_vault, vault_subject)
        cleanup.callback(vault_link.stop)

        db, config = scratch / "state.db", scratch / "rotator.yaml"
        rotator = Rotator(config, child_env(scratch / "code"), cwd=scratch)
        rotator.check_code(scratch / "code")
        opts.lease_ttl, notes = fit_config(
            rotator,
            lambda lease: write_config(
                config, aws_link.url, vault_link.url, vault.token, db, opts, lease
            ),
            opts,
        )
        for note in notes:
            log(note)

        ledger = Ledger()
        fleet = Fleet(rotator, logs, opts.workers)
        cleanup.callback(fleet.kill_all)
        cloud = Cloud(aws, vault)
        checker = Checker(cloud, ledger)
        driver = Driver(opts, aws, cloud, fleet, checker, ledger, db)
        sampling = threading.Event()  # set: the sampler stops
        cleanup.callback(sampling.set)

        def sample() -> None:
            # Sweep again after a pause as long as the sweep: at most half a core.
            pause = 0.5
            while not sampling.wait(pause):
                began = time.monotonic()
                try:
                    checker.sweep("run", "between kills")
                except Exception as exc:  # a read that failed: say so, keep checking
                    log(f"checker: sweep failed: {exc!r}")
                pause = max(0.5, time.monotonic() - began)

        driver.seed_wave()
        sampler = threading.Thread(target=sample, name="sampler", daemon=True)
        fleet.start()
        sampler.start()
        faults_from = time.monotonic()
        driver.run()
        log("faults done; letting the running processes finish")
        fleet.close(ledger, timeout=120)
        sampling.set()
        sampler.join()
        if driver.extra_waves:
            notes.append(f"{driver.extra_waves} extra wave(s): the work ran out before the kills")
        times = {"faults": time.monotonic() - faults_from}

        log("settling: run --once without faults")
        settle_from = time.monotonic()
        passes, settled = settle(rotator, logs, opts.settle_timeout)
        times["settle"] = time.monotonic() - settle_from
        rotations = rotator.status()
        outcomes = final_checks(checker, cloud, ledger, rotations)
        times["total"] = time.monotonic() - started
        ledger.late_calls = sorted(aws_link.late + vault_link.late, key=lambda c: c.at)
        results = Results(
            rotations=rotations,
            outcomes=outcomes,
            times=times,
            settle_passes=passes,
            settled=settled,
            notes=notes,
        )
        save_results(scratch / "soak.json", opts, ledger, fleet)
        lines = report(opts, ledger, fleet, rotator, results, logs)
    print("\n".join(lines))
    (scratch / "report.txt").write_text("\n".join(lines) + "\n")
    return bool(ledger.violations) or not settled


if __name__ == "__main__":
    sys.exit(main())
