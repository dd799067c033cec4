"""Where the daemon's resident memory goes: RSS after each step.

Run by `benchmarks/run.py` as a child process (one fresh interpreter per mode):

    python benchmarks/memprobe.py steps        # cumulative VmRSS after each step
    python benchmarks/memprobe.py only MODULE  # VmRSS after importing MODULE alone
    python benchmarks/memprobe.py tracemalloc  # Python heap of the daemon's imports and
                                               # clients, grouped by top-level package

Prints one JSON document. The steps follow what `rotator daemon` loads, one process
doing every job: the command line and configuration, the scheduler and metrics, the AWS
SDK, the Vault client, the rest of rotator (app, engine, state store, HTTP server, the
daemon), then the boto3 clients an `AwsIam` builds (iam, iam without retries, sts; each
client loads and parses its service model) and the Vault client. What a scan allocates
on top is measured by `benchmarks/memory.py`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def steps() -> list[dict[str, Any]]:
    out = [{"step": "python interpreter", "rss_kib": rss_kib()}]

    def mark(step: str) -> None:
        out.append({"step": step, "rss_kib": rss_kib()})

    import click  # noqa: F401
    import structlog  # noqa: F401
    import yaml  # noqa: F401

    mark("daemon: click, structlog, yaml")
    import pydantic  # noqa: F401

    import rotator.config

    mark("daemon: pydantic + rotator.config")
    import apscheduler.schedulers.background  # noqa: F401
    import prometheus_client  # noqa: F401

    mark("daemon: apscheduler + prometheus_client")
    import boto3  # noqa: F401
    import botocore.session  # noqa: F401

    mark("daemon: + boto3/botocore")
    import hvac  # noqa: F401

    mark("daemon: + hvac (requests)")
    import sqlite3  # noqa: F401

    import rotator.cli
    import rotator.daemon  # noqa: F401

    mark("daemon: + the rest (app, engine, state, http, daemon) = all its imports")
    from rotator.aws import AwsIam

    AwsIam(region="us-east-1", endpoint_url="http://127.0.0.1:9", account_id="123456789012")
    mark("daemon: + AwsIam: 3 boto3 clients (iam, iam-once, sts)")
    from rotator.vault import VaultStore, build_auth

    auth = build_auth("token", token="x", token_file=None, role_id=None, secret_id_file=None)
    VaultStore("http://127.0.0.1:9", "secret", "aws/{account_id}/{user_name}", auth)
    mark("daemon: + VaultStore (hvac client)")
    return out


def only(module: str) -> dict[str, Any]:
    before = rss_kib()
    importlib.import_module(module)
    return {"module": module, "rss_kib": rss_kib(), "baseline_kib": before}


def traced() -> list[dict[str, Any]]:
    import tracemalloc

    tracemalloc.start(64)
    import rotator.cli
    import rotator.daemon  # noqa: F401
    from rotator.aws import AwsIam

    AwsIam(region="us-east-1", endpoint_url="http://127.0.0.1:9", account_id="123456789012")
    snapshot = tracemalloc.take_snapshot()
    per_package: dict[str, int] = {}
    for stat in snapshot.statistics("traceback"):
        # Charge each allocation to the most recent frame of a third-party package or of
        # rotator: code objects are unmarshalled in importlib's frozen frames and service
        # models are parsed by the stdlib json module, on behalf of whoever called them.
        package = "stdlib"
        for frame in reversed(stat.traceback):
            owner = _package_of(frame.filename)
            if owner != "stdlib" and not owner.startswith("<"):
                package = owner
                break
        per_package[package] = per_package.get(package, 0) + stat.size
    ranked = sorted(per_package.items(), key=lambda kv: -kv[1])
    return [{"package": k, "kib": round(v / 1024)} for k, v in ranked[:15]]


def _package_of(filename: str) -> str:
    parts = filename.split(os.sep)
    if "site-packages" in parts:
        rest = parts[parts.index("site-packages") + 1 :]
        return rest[0].removesuffix(".py") if rest else "site-packages"
    if "rotator" in parts:
        return "rotator"
    if filename.startswith("<"):
        return filename
    return "stdlib"


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "steps"
    if mode == "steps":
        result: Any = steps()
    elif mode == "only":
        result = only(argv[1])
    elif mode == "tracemalloc":
        result = traced()
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
