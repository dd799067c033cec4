"""`rotator demo`: the whole job on a local AWS (moto) and a local Vault (OpenBao).

Starts both servers on free loopback ports, seeds a small organisation, shows the plan,
runs the rotations with a progress line per user, and shows where in Vault each new key
now lives. Needs no AWS account and no configuration file.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rotator.app import App
from rotator.config import Settings, parse_settings
from rotator.machine import State
from rotator.model import KeyStatus, Rotation
from rotator.render import plan_text, rotations_text, table
from rotator.sandbox import ACCOUNT_ID, FAKE_AWS_ENV, QUARANTINE_V2, LocalAws, LocalVault, SeedKey

D = timedelta(days=1)
EXEMPT_TAG = "rotator:exempt"


@dataclass(frozen=True)
class Member:
    name: str
    keys: tuple[SeedKey, ...]
    path: str = "/"
    tags: tuple[tuple[str, str], ...] = ()
    quarantined: bool = False
    story: str = ""


def organisation() -> list[Member]:
    """About twenty users, one of each kind a real account has."""

    def used(age: int, ago: int | None = 1, status: KeyStatus = KeyStatus.ACTIVE) -> SeedKey:
        return SeedKey(age * D, status, None if ago is None else ago * D)

    return [
        Member("ana", (used(5),), story="fresh"),
        Member("ben", (used(12),), story="fresh"),
        Member("chen", (used(30, 2),), story="fresh"),
        Member("dara", (used(44, None),), story="fresh, never used"),
        Member("eli", (used(61),), path="/teams/data/", story="fresh, under a team path"),
        Member("fay", (used(70, 3),), story="fresh"),
        Member("gus", (used(82),), story="aging (warn)"),
        Member("hana", (used(86, 5),), story="aging (warn)"),
        Member("ivan", (used(89),), story="aging (warn)"),
        Member("ci-deployer", (used(95),), path="/ci/", story="overdue"),
        Member("jo", (used(120),), story="overdue"),
        Member("kai", (used(181, 40),), story="overdue, unused for 40 days"),
        Member("lee", (used(400, None),), story="overdue, never used"),
        Member(
            "mo",
            (used(210, 30, KeyStatus.INACTIVE), used(130)),
            story="overdue beside an inactive key",
        ),
        Member("nia", (used(99),), path="/teams/web/", story="overdue, under a team path"),
        Member("oz", (used(20),), quarantined=True, story="leaked: AWS quarantined it"),
        Member("pat", (used(300),), tags=((EXEMPT_TAG, "true"),), story="exempt by tag"),
        Member("break-glass-admin", (used(500, None),), story="excluded by name pattern"),
        Member("quinn", (used(150), used(120)), story="two active keys: blocked"),
        Member("ray", (used(1),), story="fresh"),
    ]


def seed(aws: LocalAws, members: list[Member], now: datetime) -> None:
    for m in members:
        aws.add_user(
            m.name,
            path=m.path,
            tags=dict(m.tags),
            policies=[QUARANTINE_V2] if m.quarantined else [],
            keys=m.keys,
            now=now,
        )


def demo_settings(aws: LocalAws, vault: LocalVault, workdir: Path) -> Settings:
    return parse_settings(
        {
            "aws": {"endpoint_url": aws.endpoint_url, "region": "us-east-1"},
            "vault": {"url": vault.addr, "mount": "secret", "auth": {"token": vault.token}},
            "state": {"path": str(workdir / "state.db")},
            "selection": {"exclude_users": ["break-glass-*"], "exempt_tag": EXEMPT_TAG},
            "policy": {"overlap": "0s", "delete_after": "0s", "verify_timeout": "30s"},
        },
        {},
    )


def write_config(settings: Settings, vault: LocalVault, path: Path) -> None:
    """A config file for the running demo, so every rotator command works against it."""
    s = settings
    path.write_text(
        "# Written by `rotator demo`: points at the demo's local servers.\n"
        f"aws:\n  endpoint_url: {s.aws.endpoint_url}\n  region: {s.aws.region}\n"
        f"vault:\n  url: {s.vault.url}\n  mount: {s.vault.mount}\n"
        f"  auth:\n    token: {vault.token}\n"
        f"state:\n  path: {s.state.path}\n"
        "selection:\n  exclude_users: ['break-glass-*']\n"
        "policy:\n  overlap: 0s\n  delete_after: 0s\n",
        encoding="utf-8",
    )
    path.chmod(0o600)


def run(keep: bool, echo: Callable[[str], None]) -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="rotator-demo-"))
    for name, value in FAKE_AWS_ENV.items():
        os.environ[name] = value
    echo("Starting a local AWS (moto) and a local Vault (OpenBao dev server)...")
    aws = LocalAws().start()
    vault = LocalVault(log_path=workdir / "bao.log")
    try:
        vault.start()
        os.environ["AWS_ENDPOINT_URL"] = aws.endpoint_url
        echo(f"  AWS   {aws.endpoint_url}   (account {ACCOUNT_ID})")
        echo(f"  Vault {vault.addr}   (KV v2 at secret/)")
        members = organisation()
        now = datetime.now(UTC)
        seed(aws, members, now)
        echo(f"Seeded {len(members)} IAM users.\n")
        settings = demo_settings(aws, vault, workdir)
        config = workdir / "rotator.yaml"
        write_config(settings, vault, config)
        app = App(settings)
        try:
            show_plan(app, echo)
            rotations = rotate(app, echo)
            show_results(app, rotations, aws, echo)
        finally:
            app.close()
        echo(f"\nDemo finished in {time.monotonic() - started:.1f}s.")
        if keep:
            keep_running(aws, vault, config, echo)
        return 0
    finally:
        vault.stop()
        aws.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def show_plan(app: App, echo: Callable[[str], None]) -> None:
    echo("== 1. The plan (rotator plan): a decision for every key, nothing changed yet ==\n")
    inventories = app.scan(with_state=False).inventories
    decisions = [d for inv in inventories for d in inv.decisions]
    echo(plan_text(decisions, as_of=app.now(), notes=[n for inv in inventories for n in inv.notes]))


def rotate(app: App, echo: Callable[[str], None]) -> list[Rotation]:
    echo("\n== 2. The rotations (rotator run --once) ==\n")
    result = app.scan_and_open()
    total = len(result.opened)
    echo(f"Opened {total} rotation(s); advancing them {app.settings.aws.concurrency} at a time.")
    done: list[Rotation] = []
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=app.settings.aws.concurrency) as pool:
        futures = {pool.submit(app.engine.advance, r.id): r for r in result.opened}
        for future in as_completed(futures):
            r = future.result()
            with lock:
                done.append(r)
                path = f"secret/{app.secrets.path_for(r.account_id, r.user_name)}"
                tail = {
                    State.DONE: f"{r.old_key_id or '-'} -> {r.new_key_id}  stored at {path}",
                    State.BLOCKED: r.last_error or "",
                }.get(r.state, r.last_error or r.waiting_on or "")
                label = "leaked" if r.leaked else r.reason.value
                count = f"[{len(done):>2}/{total}]"
                echo(f"  {count} {r.user_name:<12} {label:<7} {r.state.value:<8} {tail}")
    return sorted(done, key=lambda r: r.user_name)


def show_results(
    app: App, rotations: list[Rotation], aws: LocalAws, echo: Callable[[str], None]
) -> None:
    echo("\n== 3. Where each new key lives now (consumers read these paths) ==\n")
    rows = []
    for r in rotations:
        if r.state is not State.DONE:
            continue
        path = app.secrets.path_for(r.account_id, r.user_name)
        held = app.secrets.read(path)
        keys = aws.keys(r.user_name)
        works = held is not None and app.iam(r.account_id).caller_arn(held.as_new_key()).endswith(
            "/" + r.user_name
        )
        rows.append(
            (
                r.user_name,
                f"secret/data/{path}",
                f"v{held.version}" if held else "-",
                held.access_key_id if held else "-",
                f"{len(keys)} key(s), {sum(s is KeyStatus.ACTIVE for s in keys.values())} active",
                "yes" if works else "NO",
            )
        )
    echo(table(rows, ("USER", "VAULT PATH", "VERSION", "ACCESS KEY ID", "IAM NOW", "WORKS")))
    blocked = [r for r in rotations if r.state is State.BLOCKED]
    for r in blocked:
        echo(
            f"\n{r.user_name} is BLOCKED: {r.last_error}\n"
            "  (an operator deactivates the key no consumer uses; the next pass continues)"
        )
    echo("\n== 4. Status (rotator status) ==\n")
    echo(rotations_text(app.store.list_recent(limit=50)))


def keep_running(
    aws: LocalAws, vault: LocalVault, config: Path, echo: Callable[[str], None]
) -> None:
    echo(
        "\nThe servers keep running until you press Ctrl-C. In another shell:\n\n"
        f"  export AWS_ENDPOINT_URL={aws.endpoint_url}\n"
        "  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing\n"
        "  export AWS_DEFAULT_REGION=us-east-1\n"
        "  aws iam list-users\n"
        f"  aws iam list-access-keys --user-name jo\n\n"
        f"  export VAULT_ADDR={vault.addr} VAULT_TOKEN={vault.token}\n"
        f"  bao kv get -mount=secret aws/{ACCOUNT_ID}/jo\n"
        f"  bao kv metadata get -mount=secret aws/{ACCOUNT_ID}/jo\n\n"
        f"  rotator --config {config} status\n"
        f"  rotator --config {config} plan\n"
        f"  rotator --config {config} rotate ana --reason 'laptop lost'\n"
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    echo("Stopping the demo servers.")
