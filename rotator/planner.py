"""Decisions -> rotation proposals: at most one per user. Pure; no I/O."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from rotator.model import Decision, KeyDecision, RotationReason


@dataclass(frozen=True)
class Proposal:
    account_id: str
    user_name: str
    reason: RotationReason
    old_key_id: str | None
    leaked: bool
    why: str


def propose(decisions: Iterable[KeyDecision]) -> list[Proposal]:
    """One proposal per user whose keys are leaked, due, or due but blocked.

    A leaked key wins over a due one (containment first); among several keys of the same
    kind the oldest goes first. A blocked user gets a proposal too: its rotation stops in
    BLOCKED, where operators see it and where it resumes once a slot can be freed."""
    by_user: dict[tuple[str, str], list[KeyDecision]] = defaultdict(list)
    for d in decisions:
        by_user[(d.user.account_id, d.user.user_name)].append(d)
    out: list[Proposal] = []
    for (account, user), items in sorted(by_user.items()):
        for kind, reason in (
            (Decision.LEAKED, RotationReason.LEAKED),
            (Decision.ROTATE, RotationReason.AGE),
            (Decision.BLOCKED, RotationReason.AGE),
        ):
            chosen = sorted(
                (d for d in items if d.decision is kind), key=lambda d: d.key.created_at
            )
            if chosen:
                first = chosen[0]
                out.append(
                    Proposal(
                        account,
                        user,
                        reason,
                        first.key.access_key_id,
                        kind is Decision.LEAKED,
                        first.reason,
                    )
                )
                break
    return out
