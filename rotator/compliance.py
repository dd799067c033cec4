"""The compliance report (`rotator report`): every key of every scanned account with its
owner, rule, status, age, last use and decision, and the counts two controls of the CIS
AWS Foundations Benchmark ask about. Pure: a scan's inventories and `now` in, text out.

The controls, counted on Active keys only (an Inactive key cannot sign a request: it is
neither an unrotated nor an unused credential), whatever the rotator decided for the key
(an exempt user's old key fails the control all the same), with ages in whole days
(floor, as `plan` shows them):

  CIS 1.14 "Ensure access keys are rotated every 90 days or less" (Security Hub IAM.3):
      an Active key older than 90 whole days, i.e. from its 91st day on;
  CIS 1.12 "Ensure credentials unused for 45 days or greater are disabled" (Security
      Hub IAM.22): an Active key not used for more than 45 whole days, counted from
      its last use, or from its creation when it was never used.

These thresholds are the benchmark's, not the configured `policy`/`rules`: the report
says where the account stands against the control, `plan` what the rotator will do.

Console passwords get rows of their own (kind "console"): every user with a console
password (a login profile, as the credential report tells it) with the password's age,
the last sign-in, MFA, and the decision `plan` shows (none for a user whose rule says
`console: off` or that `selection` leaves out), and one more control:

  CIS 1.10 "Ensure multi-factor authentication (MFA) is enabled for all IAM users that
      have a console password" (Security Hub IAM.5): a console user without an active
      MFA device, whatever the rotator decided for it.

Formats: CSV (one row per key, a header row, no totals: a spreadsheet sums them), JSON
(`{"generated_at", "accounts", "failed_accounts", "totals", "keys"}`, for scripts) and
HTML (one self-contained page: no external resource, a Content-Security-Policy that
forbids every script, the totals, an inline SVG chart of key ages per account and the
table of keys; every string from IAM escaped).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from rotator.inventory import Inventory
from rotator.model import ConsoleAccess, ConsoleDecision, Decision, IamUser, KeyDecision, KeyStatus
from rotator.policy import age_days
from rotator.render import iso

# The default of `notify.owner_tag`, the tag naming a user's owner (the setting's
# default is this constant; `rotator report` reads the setting).
OWNER_TAG = "owner"

CIS_MAX_AGE_DAYS = 90  # CIS 1.14
CIS_UNUSED_DAYS = 45  # CIS 1.12

_DAY = 86400.0


class ReportFormat(StrEnum):
    CSV = "csv"
    JSON = "json"
    HTML = "html"


@dataclass(frozen=True)
class AgeBucket:
    """Keys whose age in whole days is within [low, high] (`high` None: no upper end)."""

    label: str
    low: int
    high: int | None

    def holds(self, days: int) -> bool:
        return days >= self.low and (self.high is None or days <= self.high)


# The chart's bars. The boundary between the third and the fourth is CIS 1.14's 90 days:
# the active keys of the last two bars are exactly those the control counts.
AGE_BUCKETS = (
    AgeBucket("0-30", 0, 30),
    AgeBucket("31-60", 31, 60),
    AgeBucket("61-90", 61, 90),
    AgeBucket("91-180", 91, 180),
    AgeBucket(">180", 181, None),
)


def _whole_days(start: datetime, now: datetime) -> int:
    return max(0, math.floor((now - start).total_seconds() / _DAY))


@dataclass(frozen=True)
class ReportRow:
    """One key. `access_key_id` is None for a key the scan read from the credential
    report only (IAM's report names no key ids; the scan lists them only for users
    whose keys need action)."""

    account_id: str
    user_name: str
    owner: str | None
    rule: str
    access_key_id: str | None
    status: KeyStatus
    created_at: datetime
    age_days: int
    last_used_at: datetime | None
    # Whole days since the last use, or since creation for a key never used.
    days_since_last_use: int
    decision: Decision
    reason: str

    @property
    def active(self) -> bool:
        return self.status is KeyStatus.ACTIVE

    @property
    def over_max_age(self) -> bool:
        """Counted by CIS 1.14: Active and older than 90 whole days."""
        return self.active and self.age_days > CIS_MAX_AGE_DAYS

    @property
    def unused(self) -> bool:
        """Counted by CIS 1.12: Active and not used for more than 45 whole days."""
        return self.active and self.days_since_last_use > CIS_UNUSED_DAYS


def row_for(decision: KeyDecision, now: datetime, owner_tag: str = OWNER_TAG) -> ReportRow:
    key, user = decision.key, decision.user
    owner = _owner(user, owner_tag)
    return ReportRow(
        account_id=user.account_id,
        user_name=user.user_name,
        owner=owner,
        rule=decision.rule,
        access_key_id=key.access_key_id,
        status=key.status,
        created_at=key.created_at,
        age_days=age_days(key, now),
        last_used_at=key.last_used_at,
        days_since_last_use=_whole_days(key.last_used_at or key.created_at, now),
        decision=decision.decision,
        reason=decision.reason,
    )


def _owner(user: IamUser, owner_tag: str) -> str | None:
    return (user.tags.get(owner_tag) or "").strip() or None


@dataclass(frozen=True)
class ConsoleRow:
    """One user's console password. `decision` and `rule` are None for a password the
    rotator does not judge (`console: off`, or a user `selection` leaves out); the age
    counts as `plan` counts it (from the later of the report's date and the rotator's
    own last rotation), None when unknown."""

    account_id: str
    user_name: str
    owner: str | None
    rule: str | None
    password_last_changed: datetime | None
    password_age_days: int | None
    last_sign_in: datetime | None
    mfa_active: bool
    decision: Decision | None
    reason: str

    kind = "console"

    @property
    def no_mfa(self) -> bool:
        """Counted by CIS 1.10: console access without an active MFA device."""
        return not self.mfa_active


def console_row_for(
    user: IamUser,
    access: ConsoleAccess,
    decision: ConsoleDecision | None,
    now: datetime,
    owner_tag: str = OWNER_TAG,
) -> ConsoleRow:
    if decision is not None and decision.password_age is not None:
        age: int | None = max(0, math.floor(decision.password_age.total_seconds() / _DAY))
    elif access.password_last_changed is not None:
        age = _whole_days(access.password_last_changed, now)
    else:
        age = None
    return ConsoleRow(
        account_id=user.account_id,
        user_name=user.user_name,
        owner=_owner(user, owner_tag),
        rule=None if decision is None else decision.rule,
        password_last_changed=access.password_last_changed,
        password_age_days=age,
        last_sign_in=access.password_last_used,
        mfa_active=access.mfa_active,
        decision=None if decision is None else decision.decision,
        reason=(
            "not judged: console off for the user's rule, or outside selection"
            if decision is None
            else decision.reason
        ),
    )


@dataclass(frozen=True)
class ConsoleTotals:
    users: int  # users with a console password
    no_mfa: int  # CIS 1.10

    @classmethod
    def of(cls, rows: Iterable[ConsoleRow]) -> ConsoleTotals:
        listed = list(rows)
        return cls(users=len(listed), no_mfa=sum(r.no_mfa for r in listed))

    def as_dict(self) -> dict[str, int]:
        return {"console_users": self.users, "cis_1_10_console_without_mfa": self.no_mfa}


@dataclass(frozen=True)
class Totals:
    keys: int
    active_keys: int
    over_max_age: int  # CIS 1.14
    unused: int  # CIS 1.12

    @classmethod
    def of(cls, rows: Iterable[ReportRow]) -> Totals:
        listed = list(rows)
        return cls(
            keys=len(listed),
            active_keys=sum(r.active for r in listed),
            over_max_age=sum(r.over_max_age for r in listed),
            unused=sum(r.unused for r in listed),
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "keys": self.keys,
            "active_keys": self.active_keys,
            "cis_1_14_over_90_days": self.over_max_age,
            "cis_1_12_unused_over_45_days": self.unused,
        }


@dataclass(frozen=True)
class BucketCount:
    bucket: AgeBucket
    active: int
    inactive: int

    @property
    def total(self) -> int:
        return self.active + self.inactive


@dataclass(frozen=True)
class AccountReport:
    account_id: str
    rows: tuple[ReportRow, ...]
    totals: Totals
    ages: tuple[BucketCount, ...]
    console_rows: tuple[ConsoleRow, ...] = ()
    console_totals: ConsoleTotals = ConsoleTotals(0, 0)


def age_distribution(rows: Iterable[ReportRow]) -> tuple[BucketCount, ...]:
    listed = list(rows)
    out: list[BucketCount] = []
    for bucket in AGE_BUCKETS:
        inside = [r for r in listed if bucket.holds(r.age_days)]
        active = sum(r.active for r in inside)
        out.append(BucketCount(bucket, active, len(inside) - active))
    return tuple(out)


@dataclass(frozen=True)
class ComplianceReport:
    generated_at: datetime
    accounts: tuple[AccountReport, ...]
    totals: Totals
    # Accounts that could not be scanned (id -> why): the report is incomplete.
    failed_accounts: Mapping[str, str] = field(default_factory=dict)
    console_totals: ConsoleTotals = ConsoleTotals(0, 0)

    @property
    def rows(self) -> tuple[ReportRow, ...]:
        return tuple(r for a in self.accounts for r in a.rows)

    @property
    def console_rows(self) -> tuple[ConsoleRow, ...]:
        return tuple(r for a in self.accounts for r in a.console_rows)


def build_report(
    inventories: Sequence[Inventory],
    now: datetime,
    *,
    owner_tag: str = OWNER_TAG,
    failed_accounts: Mapping[str, str] | None = None,
) -> ComplianceReport:
    """The report of a scan: accounts in the scan's order, keys by user then age, then
    console passwords by user."""
    accounts: list[AccountReport] = []
    for inv in inventories:
        rows = sorted(
            (row_for(d, now, owner_tag) for d in inv.decisions),
            key=lambda r: (r.user_name, r.created_at, r.access_key_id or ""),
        )
        decided = {c.user.user_name: c for c in inv.console}
        console = tuple(
            console_row_for(u, u.console, decided.get(u.user_name), now, owner_tag)
            for u in sorted(inv.users, key=lambda u: u.user_name)
            if u.console is not None
        )
        accounts.append(
            AccountReport(
                inv.account_id,
                tuple(rows),
                Totals.of(rows),
                age_distribution(rows),
                console,
                ConsoleTotals.of(console),
            )
        )
    return ComplianceReport(
        generated_at=now,
        accounts=tuple(accounts),
        totals=Totals.of(r for a in accounts for r in a.rows),
        failed_accounts=dict(failed_accounts or {}),
        console_totals=ConsoleTotals.of(r for a in accounts for r in a.console_rows),
    )


# --- CSV --------------------------------------------------------------------------------

CSV_COLUMNS = (
    "account_id",
    "user_name",
    "owner",
    "rule",
    "access_key_id",
    "status",
    "created_at",
    "age_days",
    "last_used_at",
    "days_since_last_use",
    "decision",
    "reason",
    "cis_1_14_over_90_days",
    "cis_1_12_unused_over_45_days",
    # Appended, so that the columns above keep their places: "key" or "console", and a
    # console password's columns (empty in a key's row, as a key's are in its row).
    "kind",
    "password_age_days",
    "password_last_changed",
    "last_sign_in",
    "mfa_active",
    "cis_1_10_console_without_mfa",
)

# A spreadsheet runs a cell that starts with one of these as a formula (OWASP "CSV
# injection"). Tag values are free text anyone allowed to tag a user can set, so the
# owner and the reason (which may quote a tag) get a leading apostrophe then.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _inert(text: str) -> str:
    return "'" + text if text.startswith(_FORMULA_START) else text


def _flag(value: bool) -> str:
    return "true" if value else "false"


def csv_row(row: ReportRow) -> list[str]:
    return [
        row.account_id,
        row.user_name,
        _inert(row.owner or ""),
        row.rule,
        row.access_key_id or "",
        row.status.value,
        iso(row.created_at) or "",
        str(row.age_days),
        iso(row.last_used_at) or "never",
        str(row.days_since_last_use),
        row.decision.value,
        _inert(row.reason),
        _flag(row.over_max_age),
        _flag(row.unused),
        "key",
        "",
        "",
        "",
        "",
        "",
    ]


def console_csv_row(row: ConsoleRow) -> list[str]:
    return [
        row.account_id,
        row.user_name,
        _inert(row.owner or ""),
        row.rule or "",
        "",
        "",
        "",
        "",
        "",
        "",
        row.decision.value if row.decision is not None else "",
        _inert(row.reason),
        "",
        "",
        row.kind,
        "" if row.password_age_days is None else str(row.password_age_days),
        iso(row.password_last_changed) or "",
        iso(row.last_sign_in) or "never",
        _flag(row.mfa_active),
        _flag(row.no_mfa),
    ]


def to_csv(report: ComplianceReport) -> str:
    """RFC 4180: CRLF line ends, fields quoted when they hold a comma, a quote or a line
    break; a header row, then one row per key, then one per console password, and
    nothing else (no totals row)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(csv_row(r) for r in report.rows)
    writer.writerows(console_csv_row(r) for r in report.console_rows)
    return out.getvalue()


# --- JSON -------------------------------------------------------------------------------


def key_json(row: ReportRow) -> dict[str, Any]:
    return {
        "kind": "key",
        "account_id": row.account_id,
        "user_name": row.user_name,
        "owner": row.owner,
        "rule": row.rule,
        "access_key_id": row.access_key_id,
        "status": row.status.value,
        "created_at": iso(row.created_at),
        "age_days": row.age_days,
        "last_used_at": iso(row.last_used_at),  # null: never used
        "days_since_last_use": row.days_since_last_use,
        "decision": row.decision.value,
        "reason": row.reason,
        "cis_1_14_over_90_days": row.over_max_age,
        "cis_1_12_unused_over_45_days": row.unused,
    }


def console_json(row: ConsoleRow) -> dict[str, Any]:
    return {
        "kind": row.kind,
        "account_id": row.account_id,
        "user_name": row.user_name,
        "owner": row.owner,
        "rule": row.rule,  # null: not judged (console off, or outside selection)
        "password_last_changed": iso(row.password_last_changed),
        "password_age_days": row.password_age_days,
        "last_sign_in": iso(row.last_sign_in),  # null: never signed in
        "mfa_active": row.mfa_active,
        "decision": row.decision.value if row.decision is not None else None,
        "reason": row.reason,
        "cis_1_10_console_without_mfa": row.no_mfa,
    }


def json_document(report: ComplianceReport) -> dict[str, Any]:
    return {
        "generated_at": iso(report.generated_at),
        "accounts": [
            {
                "account_id": a.account_id,
                "totals": a.totals.as_dict(),
                "age_days_distribution": [
                    {
                        "bucket": b.bucket.label,
                        "min_days": b.bucket.low,
                        "max_days": b.bucket.high,
                        "active": b.active,
                        "inactive": b.inactive,
                    }
                    for b in a.ages
                ],
                "console_totals": a.console_totals.as_dict(),
            }
            for a in report.accounts
        ],
        "failed_accounts": dict(report.failed_accounts),
        "totals": report.totals.as_dict(),
        "console_totals": report.console_totals.as_dict(),
        "keys": [key_json(r) for r in report.rows],
        "console": [console_json(r) for r in report.console_rows],
    }


def to_json(report: ComplianceReport) -> str:
    return json.dumps(json_document(report), indent=2) + "\n"


# --- HTML -------------------------------------------------------------------------------


def _e(text: object) -> str:
    """Escaped for HTML text and attribute values (quotes too)."""
    return html.escape(str(text), quote=True)


# Chart geometry (SVG user units = CSS pixels).
_W, _H = 520, 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 16, 50, 50
_PLOT_W, _PLOT_H = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
_BAR_W = 56
_ACTIVE = "#2b6cb0"
_ACTIVE_OLD = "#b7312c"  # active keys beyond CIS 1.14's 90 days
_INK = "#1a1a1a"


def _n(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _keys(n: int) -> str:
    return f"{n} key" if n == 1 else f"{n} keys"


def age_chart(account: AccountReport, index: int) -> str:
    """An inline SVG bar chart of the account's key ages: one bar per `AGE_BUCKETS`
    entry, active keys solid (red beyond 90 days), inactive keys hatched on top, the
    count above each bar, a `<title>` on each bar and a dashed line at 90 days, so
    it reads without colour and without hovering."""
    hatch = f"hatch-{index}"
    peak = max([b.total for b in account.ages] + [1])
    scale = _PLOT_H / peak
    slot = _PLOT_W / len(account.ages)
    base = _TOP + _PLOT_H
    summary = ", ".join(f"{b.bucket.label} days: {b.total}" for b in account.ages)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="age-chart" '
        f'data-account="{_e(account.account_id)}" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img" aria-labelledby="chart-title-{index}">',
        f'<title id="chart-title-{index}">Age of access keys in account '
        f"{_e(account.account_id)}: {_e(summary)}</title>",
        f'<defs><pattern id="{hatch}" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#e8e8e8"/>'
        '<line x1="0" y1="0" x2="0" y2="6" stroke="#555" stroke-width="2"/></pattern></defs>',
        # Axes: the baseline, the y axis, and ticks at 0 and at the tallest bar.
        f'<line x1="{_LEFT}" y1="{base}" x2="{_W - _RIGHT}" y2="{base}" stroke="{_INK}"/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{base}" stroke="{_INK}"/>',
        f'<text x="{_LEFT - 6}" y="{base + 4}" text-anchor="end" class="tick">0</text>',
        f'<text x="{_LEFT - 6}" y="{_TOP + 4}" text-anchor="end" class="tick">{peak}</text>',
        f'<text x="12" y="{_TOP + _PLOT_H / 2}" class="axis-label" text-anchor="middle" '
        f'transform="rotate(-90 12 {_TOP + _PLOT_H / 2})">keys</text>',
        f'<text x="{_LEFT + _PLOT_W / 2}" y="{_H - 8}" text-anchor="middle" '
        'class="axis-label">age in days</text>',
    ]
    for i, count in enumerate(account.ages):
        x = _LEFT + slot * i + (slot - _BAR_W) / 2
        old = count.bucket.low > CIS_MAX_AGE_DAYS
        active_h, inactive_h = count.active * scale, count.inactive * scale
        tip = (
            f"{count.bucket.label} days: {_keys(count.total)} "
            f"({count.active} active, {count.inactive} inactive)"
        )
        bar = [
            f'<g class="bar" data-bucket="{_e(count.bucket.label)}" '
            f'data-active="{count.active}" data-inactive="{count.inactive}">',
            f"<title>{_e(tip)}</title>",
        ]
        if count.active:
            bar.append(
                f'<rect class="active" x="{_n(x)}" y="{_n(base - active_h)}" '
                f'width="{_BAR_W}" height="{_n(active_h)}" '
                f'fill="{_ACTIVE_OLD if old else _ACTIVE}"/>'
            )
        if count.inactive:
            bar.append(
                f'<rect class="inactive" x="{_n(x)}" y="{_n(base - active_h - inactive_h)}" '
                f'width="{_BAR_W}" height="{_n(inactive_h)}" fill="url(#{hatch})" '
                'stroke="#555"/>'
            )
        top = base - active_h - inactive_h
        bar.append(
            f'<text class="count" x="{_n(x + _BAR_W / 2)}" y="{_n(top - 6)}" '
            f'text-anchor="middle">{count.total}</text>'
        )
        bar.append(
            f'<text class="label" x="{_n(x + _BAR_W / 2)}" y="{base + 18}" '
            f'text-anchor="middle">{_e(count.bucket.label)}</text>'
        )
        bar.append("</g>")
        parts.append("".join(bar))
    # CIS 1.14's limit sits between the "61-90" and the "91-180" bars.
    limit_x = _LEFT + slot * next(i for i, b in enumerate(AGE_BUCKETS) if b.low > CIS_MAX_AGE_DAYS)
    parts.append(
        f'<g class="limit"><line x1="{_n(limit_x)}" y1="22" x2="{_n(limit_x)}" '
        f'y2="{base}" stroke="{_INK}" stroke-dasharray="5 4" stroke-width="1.5"/>'
        f'<text x="{_n(limit_x)}" y="16" text-anchor="middle">90 days (CIS 1.14)</text></g>'
    )
    parts.append("</svg>")
    return "\n".join(parts)


_STYLE = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1a1a1a;
  margin: 24px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.all td { font-weight: bold; }
.fail { color: #9b1c1c; font-weight: bold; }
.warning { border: 2px solid #9b1c1c; padding: 8px 12px; margin: 12px 0; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; border: 1px solid #ddd; padding: 8px; }
figcaption { font-size: 13px; max-width: 520px; }
svg text { font: 12px system-ui, sans-serif; fill: #1a1a1a; }
svg text.count { font-weight: bold; }
.keys-table { overflow-x: auto; }
.keys-table table { font-size: 12px; }
.muted { color: #555; }
"""


def _totals_row(name: str, totals: Totals, console: ConsoleTotals, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return (
        f"<tr{cls}><td>{_e(name)}</td><td class=num>{totals.keys}</td>"
        f"<td class=num>{totals.active_keys}</td><td class=num>{totals.over_max_age}</td>"
        f"<td class=num>{totals.unused}</td><td class=num>{console.users}</td>"
        f"<td class=num>{console.no_mfa}</td></tr>"
    )


def _console_row(row: ConsoleRow) -> str:
    muted_none = '<span class="muted">none</span>'
    cells = [
        _e(row.account_id),
        _e(row.user_name),
        _e(row.owner) if row.owner else muted_none,
        _e(row.rule) if row.rule else '<span class="muted">-</span>',
        "?" if row.password_age_days is None else f"{row.password_age_days}",
        _e((iso(row.password_last_changed) or "unknown")[:10]),
        _e((iso(row.last_sign_in) or "never")[:10]),
        "yes" if row.mfa_active else "no",
        _e(row.decision.value) if row.decision is not None else '<span class="muted">-</span>',
        _e(row.reason),
        '<span class="fail">no MFA</span>' if row.no_mfa else "",
    ]
    numeric = {4}
    return (
        "<tr>"
        + "".join(
            f"<td class=num>{c}</td>" if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(cells)
        )
        + "</tr>"
    )


def _key_row(row: ReportRow) -> str:
    cells = [
        _e(row.account_id),
        _e(row.user_name),
        _e(row.owner) if row.owner else '<span class="muted">none</span>',
        _e(row.rule),
        _e(row.access_key_id) if row.access_key_id else '<span class="muted">-</span>',
        _e(row.status.value),
        _e((iso(row.created_at) or "")[:10]),
        f"{row.age_days}",
        _e((iso(row.last_used_at) or "never")[:10]),
        f"{row.days_since_last_use}",
        _e(row.decision.value),
        _e(row.reason),
        '<span class="fail">over 90 days</span>' if row.over_max_age else "",
        '<span class="fail">unused over 45 days</span>' if row.unused else "",
    ]
    numeric = {7, 9}
    return (
        "<tr>"
        + "".join(
            f"<td class=num>{c}</td>" if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(cells)
        )
        + "</tr>"
    )


def to_html(report: ComplianceReport) -> str:
    """One self-contained page: no external resource of any kind, and a CSP that lets
    the inline style in and nothing else (no script, even if escaping ever failed)."""
    generated = iso(report.generated_at) or ""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>IAM access key compliance report, {_e(generated)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>IAM access key compliance report</h1>",
        f'<p class="muted">Generated {_e(generated)} by rotator; ages in whole days at '
        "that moment.</p>",
    ]
    if report.failed_accounts:
        out.append('<div class="warning"><strong>Incomplete:</strong> not scanned:<ul>')
        out += [f"<li>account {_e(a)}: {_e(why)}</li>" for a, why in report.failed_accounts.items()]
        out.append("</ul></div>")
    out += [
        '<h2 id="summary">Summary</h2>',
        "<table><thead><tr><th>account</th><th>keys</th><th>active keys</th>"
        "<th>active, older than 90 days (CIS 1.14)</th>"
        "<th>active, unused over 45 days (CIS 1.12)</th><th>console users</th>"
        "<th>console users without MFA (CIS 1.10)</th></tr></thead><tbody>",
    ]
    out += [_totals_row(a.account_id, a.totals, a.console_totals) for a in report.accounts]
    out.append(_totals_row("all accounts", report.totals, report.console_totals, "all"))
    out += [
        "</tbody></table>",
        '<p class="muted">CIS AWS Foundations Benchmark 1.14: access keys rotated every '
        "90 days or less; 1.12: credentials unused for 45 days or more disabled. Both count "
        "Active keys only (an Inactive key cannot sign a request), exempt users' keys "
        "included; unused counts from the last use, or from creation for a key never "
        "used. 1.10: MFA enabled for every IAM user with a console password.</p>",
        '<h2 id="ages">Age of keys per account</h2>',
        '<div class="charts">',
    ]
    for i, account in enumerate(report.accounts):
        out += [
            "<figure>",
            age_chart(account, i),
            f"<figcaption>Account {_e(account.account_id)}: {_keys(account.totals.keys)}. "
            "Solid: active keys (red once older than 90 days); hatched: inactive keys; the "
            "dashed line marks 90 days.</figcaption>",
            "</figure>",
        ]
    out.append("</div>")
    header = (
        "account",
        "user",
        "owner",
        "rule",
        "key",
        "status",
        "created",
        "age (days)",
        "last used",
        "days since last use",
        "decision",
        "reason",
        "CIS 1.14",
        "CIS 1.12",
    )
    out += [
        '<h2 id="keys">Keys</h2>',
        '<div class="keys-table"><table><thead><tr>'
        + "".join(f"<th>{_e(h)}</th>" for h in header)
        + "</tr></thead><tbody>",
    ]
    rows = report.rows
    out += [_key_row(r) for r in rows]
    if not rows:
        out.append(f'<tr><td colspan="{len(header)}">no keys</td></tr>')
    out.append("</tbody></table></div>")
    console_header = (
        "account",
        "user",
        "owner",
        "rule",
        "password age (days)",
        "password changed",
        "last sign-in",
        "MFA",
        "decision",
        "reason",
        "CIS 1.10",
    )
    out += [
        '<h2 id="console">Console passwords</h2>',
        '<div class="keys-table"><table><thead><tr>'
        + "".join(f"<th>{_e(h)}</th>" for h in console_header)
        + "</tr></thead><tbody>",
    ]
    console = report.console_rows
    out += [_console_row(r) for r in console]
    if not console:
        out.append(
            f'<tr><td colspan="{len(console_header)}">no user with a console password</td></tr>'
        )
    out += ["</tbody></table></div>", "</body></html>", ""]
    return "\n".join(out)


_RENDERERS: Mapping[ReportFormat, Callable[[ComplianceReport], str]] = {
    ReportFormat.CSV: to_csv,
    ReportFormat.JSON: to_json,
    ReportFormat.HTML: to_html,
}


def render(report: ComplianceReport, fmt: ReportFormat) -> str:
    """The report in `fmt`, as the text to write."""
    return _RENDERERS[fmt](report)
