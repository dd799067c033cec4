"""Rendering for people and scripts: the plan as a JSON document and as a table.

Pure functions from values to text; the CLI prints what they return.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from rotator.model import Decision, KeyDecision, Rotation
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


def summary(decisions: Iterable[KeyDecision]) -> dict[str, int]:
    counts = Counter(d.decision for d in decisions)
    return {d.value: counts.get(d, 0) for d in Decision}


def plan_document(
    decisions: Sequence[KeyDecision],
    *,
    generated_at: datetime,
    as_of: datetime,
    notes: Sequence[str] = (),
    source: str | None = None,
) -> dict[str, Any]:
    """The `plan --json` document of INTERFACE.md."""
    doc: dict[str, Any] = {
        "generated_at": iso(generated_at),
        "as_of": iso(as_of),
        "items": [plan_item(d, as_of) for d in decisions],
        "summary": summary(decisions),
    }
    if source is not None:
        doc["source"] = source
    if notes:
        doc["notes"] = list(notes)
    return doc


def rule_text(decision: KeyDecision) -> str:
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


def plan_text(
    decisions: Sequence[KeyDecision],
    *,
    as_of: datetime,
    notes: Sequence[str] = (),
) -> str:
    """The plan for people: one group per decision, most urgent first, with counts."""
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
    return "\n".join(out)


def rotation_json(r: Rotation) -> dict[str, Any]:
    return {
        "id": r.id,
        "account_id": r.account_id,
        "user_name": r.user_name,
        "old_key_id": r.old_key_id,
        "new_key_id": r.new_key_id,
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
    header = ("ID", "ACCOUNT", "USER", "STATE", "REASON", "OLD KEY", "NEW KEY", "NEXT", "NOTE")
    rows = [
        (
            r.id[:8],
            r.account_id,
            r.user_name,
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
