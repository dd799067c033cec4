"""Rules at scale: does a scan with ten policy rules cost more IAM calls than one with none?

    python benchmarks/rules.py            # 10,000 users, each configuration 3 times
    python benchmarks/rules.py --quick    # 1,000 users
    python benchmarks/rules.py --users 5000 --repeat 5 --rev HEAD --keep

One moto server (LocalAws, in this process) behind the counting proxy (proxy.py) is
seeded with N users: a spread of kinds (tag `type`: human, ci, service; some untagged),
paths (/ and /ci/), groups (admins, with AdministratorAccess attached to the group, and
deployers), one or two keys each with varied ages and last use. Then `rotator plan
--json` runs as a child process (wall time and peak RSS as in run.py: `measure`) under
three configurations that differ only in `rules`:

- none: no rules (the baseline, 1.00x);
- ten rules, policy's thresholds: ten rules matching on attached_policy, tag, path,
  user glob, group, account and a last catch-all `match: {}`, each setting the
  `policy` section's own max_age and warn_age. Every user is matched by a rule, every
  decision is the same as with none: the IAM calls by action must be equal (the target);
- ten rules, own thresholds: the same matches with their own max_age, warn_age, overlap
  and unused_after. Decisions change, and with them the users whose key ids the scan
  must list (one `ListAccessKeys` each: the credential report names no key ids); every
  other action must be equal to the baseline, and in every run ListAccessKeys must be
  one per user with a key that needs action in that run's plan.

The configurations are interleaved (none, same, own, none, ...) `--repeat` times; the
table shows the median wall time and the highest peak RSS of each. rotator runs from a
snapshot of rotator/ taken at the start (containment.snapshot_code), so edits made to
the tree meanwhile change nothing. Results: benchmarks/results/rules.md and rules.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from containment import check_code, child_env, snapshot_code  # noqa: E402
from proxy import CountingProxy  # noqa: E402
from run import (  # noqa: E402
    MIB,
    RESULTS,
    Measured,
    _ratio,
    forget_credential_report,
    log,
    measure,
    write_config,
)

from rotator.model import KeyStatus  # noqa: E402
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey  # noqa: E402

ADMIN_POLICY = "arn:aws:iam::aws:policy/AdministratorAccess"
MAX_AGE, WARN_AGE = "90d", "80d"  # the policy section of every configuration
SEED = 20261202
# A user needs its key ids listed (ListAccessKeys) when any of its keys is not ok or
# exempt (rotator.policy.needs_action; no rule here sets inactive_delete_after).
QUIET = {"ok", "exempt"}

# (name, match, own thresholds). The same ten matches in both rule sets; first match wins.
RULES: list[tuple[str, dict[str, Any], dict[str, str]]] = [
    ("break-glass", {"user": "breakglass-*"}, {"max_age": "365d", "warn_age": "330d"}),
    ("admins", {"attached_policy": "AdministratorAccess"}, {"max_age": "30d", "warn_age": "23d"}),
    (
        "payments",
        {"account": ACCOUNT_ID, "tag": {"team": "payments"}},
        {"max_age": "60d", "warn_age": "50d"},
    ),
    (
        "ci-deployers",
        {"path": "/ci/", "group": "deployers"},
        {"max_age": "180d", "warn_age": "150d", "overlap": "48h"},
    ),
    ("ci", {"path": "/ci/"}, {"max_age": "120d", "warn_age": "100d"}),
    ("ci-named", {"user": "ci-*"}, {"max_age": "120d", "warn_age": "100d"}),
    ("deployers", {"group": "deployers"}, {"max_age": "60d", "warn_age": "50d"}),
    ("humans", {"tag": {"type": "human"}}, {"unused_after": "45d", "unused_action": "deactivate"}),
    ("services", {"tag": {"type": "service"}}, {"max_age": "180d", "warn_age": "160d"}),
    ("everyone-else", {}, {"unused_after": "90d"}),
]
CONFIGS = ("none", "same", "own")
LABEL = {
    "none": "no rules (baseline)",
    "same": "ten rules, policy's thresholds",
    "own": "ten rules, own thresholds",
}


# `python -m rotator ...` that writes its own VmHWM (KiB) to argv[1] as it exits. The
# ru_maxrss os.wait4 reports is no measure here: Linux carries the parent's high-water
# RSS over into the child's at exec (fork or vfork alike), and this parent holds moto
# with every seeded user (a `python -c pass` child "peaks" at the parent's VmHWM).
HWM_WRAPPER = """
import atexit, runpy, sys
out = sys.argv.pop(1)
def hwm():
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(out, "w") as f:
        f.write(kib)
atexit.register(hwm)
sys.argv[0] = "rotator"
runpy.run_module("rotator", run_name="__main__", alter_sys=True)
"""


# --- seeding ----------------------------------------------------------------------------


def user_spec(i: int) -> tuple[str, str, dict[str, str], list[str]]:
    """(name, path, tags, groups) of user i: 50% people, 25% CI, 20% services, 5% others
    (break-glass accounts, old CI users outside /ci/, untagged leftovers)."""
    team = ("payments", "platform", "data", "web", "mobile", "search")[i % 6]
    kind = i % 20
    if kind < 10:
        groups = ["admins"] if i % 200 == 0 else (["deployers"] if i % 7 == 0 else [])
        tags = {"type": "human", "team": team, "owner": f"owner-{i % 300}"}
        return f"human-{i:05d}", "/", tags, groups
    if kind < 15:
        groups = ["deployers"] if i % 3 else []
        return f"ci-{i:05d}", "/ci/", {"type": "ci", "team": team}, groups
    if kind < 19:
        groups = ["admins"] if i % 100 == 15 else []
        tags = {"type": "service", "team": team, "owner": f"owner-{i % 300}"}
        return f"svc-{i:05d}", "/", tags, groups
    if i % 100 == 19:
        return f"breakglass-{i:05d}", "/", {}, ["admins"]
    if i % 40 == 39:
        return f"ci-old-{i:05d}", "/", {"team": team}, ["deployers"]
    return f"legacy-{i:05d}", "/", {}, []


def key_spec(rnd: random.Random, *, first: bool) -> SeedKey:
    """Ages: 60% under 60 days, 27% 60-79, 6% 80-89 (warn), 7% 90-399 (due from 91);
    last use: 12% never, else some time after creation, a fifth of them over 45 days ago.
    A second key is Inactive two times in three. Every age is whole days + 12 h and
    every last use whole days + 6 h ago: no key crosses a threshold (all whole days)
    while the runs go on, so every run sees the same decisions."""
    roll = rnd.random()
    if roll < 0.60:
        days = rnd.randint(1, 59)
    elif roll < 0.87:
        days = rnd.randint(60, 79)
    elif roll < 0.93:
        days = rnd.randint(80, 89)
    else:
        days = rnd.randint(90, 399)
    if rnd.random() < 0.12:
        used = None
    elif rnd.random() < 0.2:
        used = timedelta(days=min(days, rnd.randint(46, 200)), hours=6)
    else:
        used = timedelta(days=rnd.randint(0, min(days, 45) - 1), hours=6)
    status = KeyStatus.ACTIVE if first or rnd.random() < 1 / 3 else KeyStatus.INACTIVE
    # A second key 7 minutes younger than the whole-day age: two keys created in the
    # same second get each other's last use in rotator.inventory.merge_keys (it matches
    # the report's rows by creation second), which this benchmark does not measure.
    age = timedelta(days=days, hours=12, minutes=0 if first else -7)
    return SeedKey(age=age, status=status, last_used_ago=used)


def seed(aws: LocalAws, n: int, now: datetime) -> dict[str, Any]:
    """n users through moto's backend objects (no API call); what was seeded."""
    rnd = random.Random(SEED)
    aws.add_group("admins", policies=[ADMIN_POLICY])
    aws.add_group("deployers")
    kinds: Counter[str] = Counter()
    keys = 0
    for i in range(n):
        name, path, tags, groups = user_spec(i)
        specs = [key_spec(rnd, first=True)]
        if rnd.random() < 0.25:
            specs.append(key_spec(rnd, first=False))
        aws.add_user(name, path=path, tags=tags, keys=specs, now=now)
        for group in groups:
            aws.add_user_to_group(group, name)
        kinds[tags.get("type", name.split("-")[0])] += 1
        kinds[f"group {groups[0]}" if groups else "no group"] += 1
        keys += len(specs)
    return {"users": n, "keys": keys, "spread": dict(sorted(kinds.items()))}


# --- configurations ---------------------------------------------------------------------


def rules_config(which: str) -> list[dict[str, Any]]:
    if which == "none":
        return []
    out = []
    for name, match, own in RULES:
        values = own if which == "own" else {"max_age": MAX_AGE, "warn_age": WARN_AGE}
        out.append({"name": name, "match": match, **values})
    return out


def config(work: Path, proxy_url: str, which: str) -> dict[str, Any]:
    return {
        # The token bucket would pace the per-user ListAccessKeys (20/s by default) and
        # make wall time a count of calls; out of the way here, as in run.py's rotations.
        "aws": {"region": "us-east-1", "endpoint_url": proxy_url, "iam_calls_per_second": 1000},
        "state": {"path": str(work / "plan-state.db")},  # plan opens no state file
        "policy": {"max_age": MAX_AGE, "warn_age": WARN_AGE},
        "rules": rules_config(which),
    }


class Listed:
    """The users whose keys a run listed (`ListAccessKeys` requests, via the proxy's
    on_call hook)."""

    def __init__(self) -> None:
        self.users: set[str] = set()

    def on_call(self, name: str, body: bytes) -> None:
        if name == "iam:ListAccessKeys":
            self.users.update(parse_qs(body.decode(errors="replace")).get("UserName", []))


# --- one plan ---------------------------------------------------------------------------


def summarize(doc: Mapping[str, Any]) -> dict[str, Any]:
    """From a plan --json document: keys per rule, decisions, users needing action."""
    items = doc["items"]
    per_rule: dict[str, Counter[str]] = {}
    users: dict[str, str] = {}
    needing: set[str] = set()
    for item in items:
        per_rule.setdefault(item["rule"], Counter())[item["decision"]] += 1
        users[item["user_name"]] = item["rule"]
        if item["decision"] not in QUIET:
            needing.add(item["user_name"])
    return {
        "keys": len(items),
        "decisions": doc["summary"],
        "users_needing_action": len(needing),
        "needing": sorted(needing),
        "keys_per_rule": {r: sum(c.values()) for r, c in per_rule.items()},
        "users_per_rule": dict(Counter(users.values())),
        "decisions_per_rule": {r: dict(c) for r, c in per_rule.items()},
        "fingerprint": sorted(
            (i["user_name"], i["access_key_id"] or "", i["decision"]) for i in items
        ),
    }


def plan_once(
    aws: LocalAws,
    proxy: CountingProxy,
    which: str,
    attempt: int,
    work: Path,
    env: Mapping[str, str],
    configs: Mapping[str, Path],
    timeout: float,
) -> tuple[Measured, dict[str, Any] | None]:
    forget_credential_report(aws)  # every run asks for a report, as after a quiet day
    hwm_file = work / f"{which}-{attempt}.vmhwm"
    run = measure(
        f"{which}-{attempt}",
        [
            sys.executable,
            "-c",
            HWM_WRAPPER,
            str(hwm_file),
            "--config",
            str(configs[which]),
            "--log-level",
            "WARNING",
            "plan",
            "--json",
        ],
        env,
        proxy=proxy,
        scratch=work,
        timeout=timeout,
        cwd=work,
    )
    try:
        run.maxrss_kib = int(hwm_file.read_text())  # the child's own mm, not ru_maxrss
    except (OSError, ValueError):
        log(f"{which}: no VmHWM recorded; keeping ru_maxrss")
    try:
        return run, summarize(json.loads(run.stdout))
    except (ValueError, KeyError, TypeError):
        log(f"{which}: no plan document (exit {run.exit_code}): {run.stderr_tail[-500:]}")
        return run, None


# --- report -----------------------------------------------------------------------------


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    c = results["configs"]
    none, same, own = c["none"], c["same"], c["own"]
    targets = []
    equal = none["calls_equal_across_repeats"] and same["calls_equal_across_repeats"]
    targets.append(
        {
            "target": f"ten rules (policy's thresholds) make the same IAM calls, by action, "
            f"as no rules at {results['users']:,} users",
            "measured": f"{same['iam_calls']:,} vs {none['iam_calls']:,}; "
            + ("equal by action" if same["calls"] == none["calls"] else "differ by action")
            + ("" if equal else " (calls varied between repeats)"),
            "pass": same["calls"] == none["calls"] and equal and none["iam_calls"] > 0,
        }
    )
    targets.append(
        {
            "target": "ten rules (policy's thresholds) decide every key as no rules do",
            "measured": "the same decisions"
            if same["same_decisions_as_none"]
            else "decisions differ",
            "pass": bool(same["same_decisions_as_none"]),
        }
    )
    others = {k: v for k, v in own["calls"].items() if k != "iam:ListAccessKeys"}
    base = {k: v for k, v in none["calls"].items() if k != "iam:ListAccessKeys"}
    targets.append(
        {
            "target": "ten rules (own thresholds): every action but ListAccessKeys as with no "
            "rules",
            "measured": ", ".join(f"{k} {v}" for k, v in sorted(others.items()))
            + (" (equal)" if others == base else " vs " + json.dumps(base)),
            "pass": others == base and own["calls_equal_across_repeats"],
        }
    )
    rows = [
        f"{name} {c[name]['calls'].get('iam:ListAccessKeys', 0):,} "
        f"= {c[name]['users_needing_action']:,}"
        for name in CONFIGS
    ]
    targets.append(
        {
            "target": "every run: one ListAccessKeys per user whose keys need action "
            "(decision not ok/exempt)",
            "measured": "; ".join(rows),
            "pass": all(
                c[name]["calls"].get("iam:ListAccessKeys", 0) == c[name]["users_needing_action"]
                for name in CONFIGS
            ),
        }
    )
    return targets


def fmt_calls(calls: Mapping[str, int]) -> str:
    return ", ".join(
        f"{k.split(':', 1)[1]} {v:,}" for k, v in sorted(calls.items()) if k[:4] == "iam:"
    )


def markdown(results: dict[str, Any]) -> str:
    c = results["configs"]
    n = results["users"]
    lines = [
        results["run"],
        "",
        f"Seeded: {n:,} users, {results['seeded']['keys']:,} keys ("
        + ", ".join(f"{k} {v:,}" for k, v in results["seeded"]["spread"].items())
        + "). `aws.iam_calls_per_second: 1000`; every run starts without a credential report.",
        "",
        f"| `rotator plan --json`, {n:,} users | IAM calls | IAM calls by action "
        "| users listed (need action) | wall (median) | vs none | peak RSS (max) | vs none "
        "| STS calls |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in CONFIGS:
        r = c[name]
        lines.append(
            f"| {LABEL[name]} | {r['iam_calls']:,} | {fmt_calls(r['calls'])} "
            f"| {r['users_needing_action']:,} | {r['wall_s']:.2f} s "
            f"| {r['wall_vs_none']:.2f}x | {r['peak_rss_mib']:.0f} MiB "
            f"| {r['rss_vs_none']:.2f}x | {r['sts_calls']} |"
        )
    lines += [
        "",
        f"Wall times of the {results['repeat']} runs of each: "
        + "; ".join(
            f"{name} " + ", ".join(f"{w:.2f}" for w in c[name]["walls"]) for name in CONFIGS
        )
        + " s. Peak RSS is the child's VmHWM as it exits (its ru_maxrss from os.wait4 "
        "would include this process's RSS: moto and the seeded users).",
        "",
        "Keys per rule (first match wins; `default`: no rule matched):",
        "",
        "| rule | match | users | keys, policy's thresholds | keys, own thresholds "
        "| decisions, own thresholds |",
        "|---|---|---:|---:|---:|---|",
    ]
    same, own = c["same"], c["own"]
    names = [r[0] for r in RULES] + ["default"]
    for rule in names:
        match = next((json.dumps(m, separators=(", ", ": ")) for r, m, _ in RULES if r == rule), "")
        decisions = ", ".join(
            f"{d} {k:,}" for d, k in sorted(own["decisions_per_rule"].get(rule, {}).items())
        )
        lines.append(
            f"| {rule} | `{match or '-'}` | {own['users_per_rule'].get(rule, 0):,} "
            f"| {same['keys_per_rule'].get(rule, 0):,} | {own['keys_per_rule'].get(rule, 0):,} "
            f"| {decisions or '-'} |"
        )
    lines += [
        "",
        "Decisions: "
        + "; ".join(
            f"{name} " + ", ".join(f"{d} {k:,}" for d, k in c[name]["decisions"].items() if k)
            for name in CONFIGS
        )
        + ".",
        "",
        "Targets:",
        "",
    ]
    lines += [
        f"- **{'PASS' if t['pass'] else 'FAIL'}** {t['target']}: {t['measured']}"
        for t in results["targets"]
    ]
    return "\n".join(lines) + "\n"


def describe_run(quick: bool, code: str, wall: float, load: tuple[float, float]) -> str:
    return (
        f"Run {datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')} "
        f"({'quick' if quick else 'full'}), {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, moto {metadata.version('moto')}, "
        f"boto3 {metadata.version('boto3')}, rotator: {code}. Total {wall:.0f} s; "
        f"1-min load average {load[0]:.2f} at the start, {load[1]:.2f} at the end."
    )


# --- main -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 users")
    parser.add_argument("--users", type=int, help="users to seed (10,000; --quick 1,000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each configuration")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per plan run")
    parser.add_argument("--rev", help="run this git revision of rotator/ (default: the tree)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    users = args.users or (1_000 if args.quick else 10_000)

    began = time.perf_counter()
    load_start = os.getloadavg()[0]
    scratch = Path(tempfile.mkdtemp(prefix="rotator-rules-"))
    code = snapshot_code(scratch / "code", args.rev)
    log(f"rotator: {code}; scratch {scratch}")
    aws = LocalAws().start()
    listed = Listed()
    proxy = CountingProxy(aws.endpoint_url, on_call=listed.on_call).start()
    runs: dict[str, list[tuple[Measured, dict[str, Any] | None]]] = {k: [] for k in CONFIGS}
    try:
        work = scratch / "work"
        work.mkdir()
        env = child_env(proxy.url, work, scratch / "code")
        check_code(env, work, scratch / "code")
        configs = {
            k: write_config(work / f"rules-{k}.yaml", config(work, proxy.url, k)) for k in CONFIGS
        }
        started = time.perf_counter()
        seeded = seed(aws, users, datetime.now(UTC))
        log(
            f"seeded {users:,} users, {seeded['keys']:,} keys "
            f"in {time.perf_counter() - started:.1f} s"
        )
        for attempt in range(1, args.repeat + 1):
            for which in CONFIGS:
                listed.users.clear()
                run, doc = plan_once(aws, proxy, which, attempt, work, env, configs, args.timeout)
                if doc is not None:
                    # Users listed although their final decisions are all ok/exempt.
                    doc["listed_but_quiet"] = sorted(listed.users - set(doc["needing"]))
                    doc["needing_not_listed"] = sorted(set(doc["needing"]) - listed.users)
                log(
                    f"{which} #{attempt}: exit {run.exit_code}, {run.wall_s:.2f} s, "
                    f"{run.rss_mib:.0f} MiB, {run.iam_calls:,} IAM calls"
                )
                runs[which].append((run, doc))
    finally:
        proxy.stop()
        aws.stop()

    results: dict[str, Any] = {"users": users, "repeat": args.repeat, "seeded": seeded}
    configs_out: dict[str, Any] = {}
    for which in CONFIGS:
        measured = [m for m, _ in runs[which]]
        docs = [d for _, d in runs[which]]
        first = docs[0] or {}
        walls = [round(m.wall_s, 3) for m in measured]
        configs_out[which] = {
            "label": LABEL[which],
            "rules": rules_config(which),
            "exit_codes": [m.exit_code for m in measured],
            "calls": measured[0].calls,
            "calls_equal_across_repeats": all(m.calls == measured[0].calls for m in measured),
            "iam_calls": measured[0].iam_calls,
            "sts_calls": measured[0].sts_calls,
            "walls": walls,
            "wall_s": statistics.median(walls),
            "peak_rss_mib": round(max(m.maxrss_kib for m in measured) / MIB, 1),
            "cpu_s": [round(m.cpu_s, 2) for m in measured],
            "server_cpu_s": [round(m.server_cpu_s, 2) for m in measured],
            "runs": [m.summary() for m in measured],
            "same_plan_across_repeats": all(
                d is not None and d["fingerprint"] == first.get("fingerprint") for d in docs
            ),
            **{k: v for k, v in first.items() if k not in ("fingerprint", "needing")},
        }
        configs_out[which]["users_needing_action"] = first.get("users_needing_action", -1)
        configs_out[which]["_fingerprint"] = first.get("fingerprint")
    base = configs_out["none"]
    for which in CONFIGS:
        r = configs_out[which]
        r["wall_vs_none"] = _ratio(r["wall_s"], base["wall_s"])
        r["rss_vs_none"] = _ratio(r["peak_rss_mib"], base["peak_rss_mib"])
        r["same_decisions_as_none"] = (
            r["_fingerprint"] is not None and r["_fingerprint"] == base["_fingerprint"]
        )
    for which in CONFIGS:
        configs_out[which].pop("_fingerprint")
    results["configs"] = configs_out
    results["targets"] = evaluate(results)
    results["total_s"] = round(time.perf_counter() - began, 1)
    results["run"] = describe_run(
        args.quick, code, results["total_s"], (load_start, os.getloadavg()[0])
    )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rules.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    text = markdown(results)
    (args.out / "rules.md").write_text(text)
    if args.keep:
        log(f"scratch kept: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    print(text)
    for t in results["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['measured']}")
    return 0 if all(t["pass"] for t in results["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
