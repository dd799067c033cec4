"""Rendering for people and scripts: the plan as a JSON document and as a table.

Pure functions from values to text; the CLI prints what they return.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from rotator.console_policy import CONSOLE_DECISIONS
from rotator.model import KEY_DECISIONS, ConsoleDecision, Decision, KeyDecision, Rotation
from rotator.policy import age_days

# Most urgent first: the order people read a plan in.
DECISION_ORDER = (
    Decision.LEAKED,
    Decision.BLOCKED,
    Decision.ROTATE,
    Decision.UNUSED,
    Decision.WARN,
    Decision.OK,
    Decision.EXEMPT,
)


def iso(moment: datetime | None) -> str | None:
    """UTC, second precision, `Z` suffix; None stays None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def plan_item(decision: KeyDecision, as_of: datetime) -> dict[str, Any]:
    key, user = decision.key, decision.user
    return {
        "kind": "key",
        "account_id": user.account_id,
        "user_name": user.user_name,
        "access_key_id": key.access_key_id,
        "status": key.status.value,
        "created_at": iso(key.created_at),
        "age_days": age_days(key, as_of),
        "last_used_at": iso(key.last_used_at),
        "decision": decision.decision.value,
        "reason": decision.reason,
        "suspect": decision.suspect,
        # The rule the user falls under ("default": none matched, `policy` decides)
        # and why it matched (null for the default).
        "rule": decision.rule,
        "rule_match": decision.rule_match,
    }


def _whole_days(delta: timedelta) -> int:
    return max(0, math.floor(delta.total_seconds() / 86400))


def console_item(decision: ConsoleDecision) -> dict[str, Any]:
    """A console password in `plan --json` (`"kind": "console"`). `account` and `user`
    are repeated as `account_id` and `user_name`, the keys key items use, so that a
    script reading every item by user finds them. Never a password: there is none."""
    user, access = decision.user, decision.access
    age = decision.password_age
    return {
        "kind": "console",
        "account": user.account_id,
        "user": user.user_name,
        "account_id": user.account_id,
        "user_name": user.user_name,
        "rule": decision.rule,
        "rule_match": decision.rule_match,
        "decision": decision.decision.value,
        "reason": decision.reason,
        "password_age_days": None if age is None else _whole_days(age),
        "password_last_changed": iso(access.password_last_changed),
        "last_sign_in": iso(access.password_last_used),  # null: never signed in
        "mfa_active": access.mfa_active,
        "mode": decision.mode.value,  # off | report | rotate
        "due_at": iso(decision.due_at),
    }


def summary(decisions: Iterable[KeyDecision]) -> dict[str, int]:
    """Keys per decision (every decision a key can get, zeros included)."""
    counts = Counter(d.decision for d in decisions)
    return {d.value: counts.get(d, 0) for d in KEY_DECISIONS}


def console_summary(decisions: Iterable[ConsoleDecision]) -> dict[str, int]:
    """Console passwords per decision (every decision one can get, zeros included)."""
    counts = Counter(d.decision for d in decisions)
    return {d.value: counts.get(d, 0) for d in CONSOLE_DECISIONS}


def plan_document(
    decisions: Sequence[KeyDecision],
    *,
    generated_at: datetime,
    as_of: datetime,
    notes: Sequence[str] = (),
    source: str | None = None,
    console: Sequence[ConsoleDecision] = (),
) -> dict[str, Any]:
    """The `plan --json` document of INTERFACE.md: key items (`"kind": "key"`), then
    console items (`"kind": "console"`); `summary` counts keys, `console_summary`
    console passwords."""
    doc: dict[str, Any] = {
        "generated_at": iso(generated_at),
        "as_of": iso(as_of),
        "items": [plan_item(d, as_of) for d in decisions] + [console_item(c) for c in console],
        "summary": summary(decisions),
        "console_summary": console_summary(console),
    }
    if source is not None:
        doc["source"] = source
    if notes:
        doc["notes"] = list(notes)
    return doc


def rule_text(decision: KeyDecision | ConsoleDecision) -> str:
    """The rule and why it matched, for people: `admins (AdministratorAccess attached
    through group admins)`, or `default`."""
    if decision.rule_match is None:
        return decision.rule
    return f"{decision.rule} ({decision.rule_match})"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain left-aligned text table."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def console_text(console: Sequence[ConsoleDecision]) -> list[str]:
    """The console passwords of a plan for people: a section after the keys, one group
    per decision, most urgent first, and a summary line."""
    if not console:
        return []
    out = ["", f"CONSOLE PASSWORDS ({len(console)})"]
    header = ("ACCOUNT", "USER", "AGE", "LAST SIGN-IN", "MFA", "MODE", "DUE", "RULE", "REASON")
    for kind in CONSOLE_DECISIONS:
        group = [c for c in console if c.decision is kind]
        if not group:
            continue
        out.append("")
        out.append(f"console {kind.value.upper()} ({len(group)})")
        rows = [
            (
                c.user.account_id,
                c.user.user_name,
                "?" if c.password_age is None else f"{_whole_days(c.password_age)}d",
                (iso(c.access.password_last_used) or "never")[:10],
                "yes" if c.access.mfa_active else "NO",
                c.mode.value,
                (iso(c.due_at) or "-")[:10],
                rule_text(c),
                c.reason,
            )
            for c in group
        ]
        out.append(table(rows, header))
    counts = console_summary(console)
    out.append("")
    out.append(
        "Console summary: "
        + ", ".join(f"{counts[k.value]} {k.value}" for k in CONSOLE_DECISIONS)
        + f" ({len(console)} console passwords)"
    )
    return out


def plan_text(
    decisions: Sequence[KeyDecision],
    *,
    as_of: datetime,
    notes: Sequence[str] = (),
    console: Sequence[ConsoleDecision] = (),
) -> str:
    """The plan for people: one group per decision, most urgent first, with counts;
    then the console passwords (`console_text`), when there are any."""
    out: list[str] = [f"Plan as of {iso(as_of)}"]
    out += [f"note: {n}" for n in notes]
    header = ("ACCOUNT", "USER", "KEY", "STATUS", "AGE", "LAST USED", "RULE", "REASON")
    for kind in DECISION_ORDER:
        group = [d for d in decisions if d.decision is kind]
        if not group:
            continue
        out.append("")
        out.append(f"{kind.value.upper()} ({len(group)})")
        rows = [
            (
                d.user.account_id,
                d.user.user_name,
                d.key.access_key_id or "-",
                d.key.status.value,
                f"{age_days(d.key, as_of)}d",
                (iso(d.key.last_used_at) or "never")[:10],
                rule_text(d),
                d.reason,
            )
            for d in group
        ]
        out.append(table(rows, header))
    counts = summary(decisions)
    out.append("")
    out.append(
        "Summary: "
        + ", ".join(f"{counts[k.value]} {k.value}" for k in DECISION_ORDER)
        + f" ({len(decisions)} keys)"
    )
    out += console_text(console)
    return "\n".join(out)


def rotation_json(r: Rotation) -> dict[str, Any]:
    return {
        "id": r.id,
        "account_id": r.account_id,
        "user_name": r.user_name,
        "kind": r.kind.value,
        "old_key_id": r.old_key_id,
        "new_key_id": r.new_key_id,
        "vault_version": r.vault_version,
        "reason": r.reason.value,
        "leaked": r.leaked,
        "note": r.note,
        "state": r.state.value,
        "next_action_at": iso(r.next_action_at),
        "attempts": r.attempts,
        "last_error": r.last_error,
        "waiting_on": r.waiting_on,
        "stored_at": iso(r.stored_at),
        "verified_at": iso(r.verified_at),
        "deactivated_at": iso(r.deactivated_at),
        "created_at": iso(r.created_at),
        "updated_at": iso(r.updated_at),
    }


def rotations_text(rotations: Sequence[Rotation]) -> str:
    if not rotations:
        return "no rotations"
    header = (
        "ID", "ACCOUNT", "USER", "KIND", "STATE", "REASON", "OLD KEY", "NEW KEY", "NEXT", "NOTE"
    )  # fmt: skip
    rows = [
        (
            r.id[:8],
            r.account_id,
            r.user_name,
            r.kind.value,
            r.state.value,
            r.reason.value,
            r.old_key_id or "-",
            r.new_key_id or "-",
            (iso(r.next_action_at) or "-"),
            r.waiting_on or r.last_error or "",
        )
        for r in rotations
    ]
    return table(rows, header)
