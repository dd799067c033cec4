"""Leak reports from outside: AWS Health events about exposed keys (EventBridge form,
delivered as a file, on stdin, or through SQS). Pure parsing; no I/O.

An event names keys, not users: `detail.affectedEntities[].entityValue` holds the key
ids, and `GetAccessKeyLastUsed` tells whose key each one is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from rotator.errors import BadInput

RISK_CODES = frozenset(
    {
        "AWS_RISK_CREDENTIALS_EXPOSED",
        "AWS_RISK_CREDENTIALS_EXPOSURE_SUSPECTED",
        "AWS_RISK_CREDENTIALS_COMPROMISED",
        "AWS_RISK_CREDENTIALS_COMPROMISE_SUSPECTED",
        "AWS_RISK_IAM_QUARANTINE",
    }
)
# Long-term IAM user keys start with AKIA, then upper-case letters and digits.
_KEY_ID = re.compile(r"^AKIA[A-Z0-9]{12,124}$")
_ACCOUNT = re.compile(r"^\d{12}$")
MAX_EVENT_BYTES = 256 * 1024


@dataclass(frozen=True)
class LeakEvent:
    account_id: str | None
    event_code: str
    event_id: str | None
    key_ids: tuple[str, ...]

    @property
    def reason(self) -> str:
        ref = f" ({self.event_id})" if self.event_id else ""
        return f"AWS Health {self.event_code}{ref}"


def _get(mapping: Any, key: str, what: str) -> Any:
    if not isinstance(mapping, dict):
        raise BadInput(f"{what} must be a JSON object")
    return mapping.get(key)


def parse_event(raw: bytes | str) -> LeakEvent:
    """Validate an AWS Health event (EventBridge form) about exposed keys. A message that
    SNS wrapped on its way to SQS is unwrapped. `BadInput` says what is wrong in one line."""
    if len(raw) > MAX_EVENT_BYTES:
        raise BadInput(f"event larger than {MAX_EVENT_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(
            f"not JSON: {exc.__class__.__name__} at position {getattr(exc, 'pos', '?')}"
        ) from exc
    if (
        isinstance(data, dict)
        and data.get("Type") == "Notification"
        and isinstance(data.get("Message"), str)
    ):
        return parse_event(data["Message"])
    source = _get(data, "source", "the event")
    if source != "aws.health":
        raise BadInput(f'source must be "aws.health", not {json.dumps(source)[:60]}')
    detail = _get(data, "detail", "the event")
    if not isinstance(detail, dict):
        raise BadInput("detail must be a JSON object")
    service = detail.get("service")
    if service != "RISK":
        raise BadInput(f'detail.service must be "RISK", not {json.dumps(service)[:60]}')
    code = detail.get("eventTypeCode")
    if not isinstance(code, str) or code not in RISK_CODES:
        raise BadInput(
            f"detail.eventTypeCode {json.dumps(code)[:80]} is not a key exposure code "
            f"({', '.join(sorted(RISK_CODES))})"
        )
    entities = detail.get("affectedEntities")
    if not isinstance(entities, list) or not entities:
        raise BadInput("detail.affectedEntities must be a non-empty list")
    keys: list[str] = []
    for i, entity in enumerate(entities):
        value = _get(entity, "entityValue", f"detail.affectedEntities[{i}]")
        if not isinstance(value, str) or not _KEY_ID.match(value):
            raise BadInput(f"detail.affectedEntities[{i}].entityValue is not an access key id")
        if value not in keys:
            keys.append(value)
    account = data.get("account")
    if account is not None and (not isinstance(account, str) or not _ACCOUNT.match(account)):
        raise BadInput("account must be a 12-digit string")
    event_id = detail.get("eventArn") or data.get("id")
    return LeakEvent(account, str(code), str(event_id)[:200] if event_id else None, tuple(keys))
