"""Leak reports from outside: AWS Health events about exposed keys (EventBridge form,
delivered as a file, on stdin, or through SQS, bare or in an SNS envelope). Pure
parsing; no I/O.

An event names keys: `detail.affectedEntities[].entityValue` holds the key ids. Some
events also carry `detail.eventMetadata` with `publicKey` and `userName` (the key and
its owner); without it, `GetAccessKeyLastUsed` tells whose key each one is.

Two AWS quirks the callers must know:
- Organizational view: an event received in the management or delegated-administrator
  account has that account in the top-level `account`; the account whose key leaked is
  `detail.affectedAccount`.
- The same event arrives more than once: EventBridge delivers at least once, account
  events are also sent to a backup Region, and an event whose entity list exceeds
  256 KB is split into pages (`detail.page`, `detail.totalPages`) that share one
  `eventArn`, each naming other keys. Deduplicate by (event_id, key_id), never by the
  event alone.

Input is untrusted: whatever arrives, `parse_event` returns a `LeakEvent` or raises
`BadInput` with a one-line message; no other exception escapes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from rotator.errors import BadInput
from rotator.model import is_user_name

RISK_CODES = frozenset(
    {
        "AWS_RISK_CREDENTIALS_EXPOSED",
        "AWS_RISK_CREDENTIALS_EXPOSURE_SUSPECTED",
        "AWS_RISK_CREDENTIALS_COMPROMISED",
        "AWS_RISK_CREDENTIALS_COMPROMISE_SUSPECTED",
        "AWS_RISK_IAM_QUARANTINE",
    }
)
# Long-term IAM user keys start with AKIA, then upper-case letters and digits (IAM
# allows ids of 16 to 128 characters in all).
_KEY_ID = re.compile(r"AKIA[A-Z0-9]{12,124}")
# Keys from STS start with ASIA: they expire on their own and no IAM user owns them.
_TEMPORARY_KEY_ID = re.compile(r"ASIA[A-Z0-9]{12,124}")
_ACCOUNT = re.compile(r"[0-9]{12}")
# Shown back in a note; anything else (a secret pasted by mistake) is only described.
_SHOWABLE = re.compile(r"arn:[A-Za-z0-9:/+=,.@_-]{1,200}|[A-Z0-9]{1,128}")

MAX_EVENT_BYTES = 256 * 1024  # EventBridge's own limit per event
# A Health event nests 5 levels (event, detail, affectedEntities, entity, tags); the
# margin is for fields AWS may add. Deeper input is an attack on the JSON parser.
MAX_JSON_DEPTH = 32
# EventBridge -> SNS -> SQS wraps the event once; a topic that forwards to a topic in
# another account wraps it twice. Any deeper is not a delivery path.
MAX_SNS_ENVELOPES = 2
MAX_NOTES = 20
_MAX_EVENT_ID = 1600  # the longest eventArn the Health API allows


@dataclass(frozen=True)
class LeakedKey:
    """One key an event says leaked; `user_name` when the event names its owner."""

    key_id: str
    user_name: str | None = None


@dataclass(frozen=True)
class LeakEvent:
    """A validated key-exposure event. `keys` in the event's order, each once;
    `skipped` says, one line each, what in the event was ignored and why."""

    account_id: str | None
    event_code: str
    event_id: str | None
    keys: tuple[LeakedKey, ...]
    skipped: tuple[str, ...] = ()

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(k.key_id for k in self.keys)

    @property
    def reason(self) -> str:
        ref = f" ({self.event_id})" if self.event_id else ""
        return f"AWS Health {self.event_code}{ref}"


# --- bounded JSON ---------------------------------------------------------------------

_ESCAPE = re.compile(r"\\.", re.DOTALL)
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _nesting(text: str) -> int:
    """The deepest nesting of arrays and objects in `text`, exact for valid JSON
    (brackets inside strings do not count). Linear, and done by `re` in C: the
    point is to measure before `json.loads` recurses."""
    # Escapes go first, so that what remains of each string is quote..quote.
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", _ESCAPE.sub("", text)))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def load_json(
    raw: bytes | bytearray | str, *, max_bytes: int, name: str, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """`raw` (UTF-8 bytes or text) as a JSON value, within `max_bytes` and `max_depth`.
    Raises only `BadInput`, whose one-line message calls the input `name`. Shared by
    every parser of untrusted input (events here, the HTTP trigger's body)."""
    try:
        if isinstance(raw, str):
            # len() counts characters, never more than the UTF-8 bytes: cheap first.
            size = len(raw)
            if size <= max_bytes:
                size = len(raw.encode("utf-8", "surrogatepass"))
        else:
            size = len(raw)
        if size > max_bytes:
            raise BadInput(f"{name} larger than {max_bytes} bytes")
        if isinstance(raw, str):
            text = raw
        else:
            try:
                text = bytes(raw).decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise BadInput(
                    f"not JSON: the {name} is not UTF-8 (byte {exc.start} is invalid)"
                ) from exc
        if _nesting(text) > max_depth:
            raise BadInput(f"the {name} nests deeper than {max_depth} levels")
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(
                f"not JSON: the {name} fails at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from exc
    except BadInput:
        raise
    except Exception as exc:  # e.g. ValueError for a number of more than 4300 digits
        raise BadInput(f"not JSON the rotator can read: the {name} ({type(exc).__name__})") from exc


# --- the event ------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A short, single-line rendering of an unexpected value for a message."""
    try:
        return json.dumps(value)[:60]
    except Exception:
        return type(value).__name__


_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}


def _describe(value: Any) -> str:
    """What an entity value is, echoing it only when it cannot be a secret."""
    if isinstance(value, str):
        if _SHOWABLE.fullmatch(value):
            return json.dumps(value)
        return f"a string of {len(value)} characters"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _unwrap_sns(data: Any) -> Any:
    """The event inside SNS envelopes (SNS -> SQS without raw message delivery)."""
    for _ in range(MAX_SNS_ENVELOPES + 1):
        if not isinstance(data, dict) or "detail" in data or not isinstance(data.get("Type"), str):
            return data
        kind = data["Type"]
        if kind in ("SubscriptionConfirmation", "UnsubscribeConfirmation"):
            # A topic in another account must be confirmed by the queue's owner: SNS puts
            # the request (with a SubscribeURL to visit) on the queue, like an event.
            raise BadInput(
                f"an SNS {kind}, not an event: the queue's owner confirms a subscription "
                "from another account with its SubscribeURL"
            )
        if kind != "Notification":
            return data
        message = data.get("Message")
        if not isinstance(message, str):
            raise BadInput("the SNS notification's Message must be a string")
        data = load_json(message, max_bytes=MAX_EVENT_BYTES, name="SNS Message")
    raise BadInput(f"more than {MAX_SNS_ENVELOPES} SNS envelopes around the event")


def parse_event(raw: bytes | str) -> LeakEvent:
    """Validate an AWS Health event (EventBridge form) about exposed keys, bare or in
    SNS envelopes. One entity that is not an access key id is noted in `skipped` and
    the others are kept; an event naming no key at all is `BadInput`. `BadInput` is
    the only exception, with a one-line message."""
    try:
        data = _unwrap_sns(load_json(raw, max_bytes=MAX_EVENT_BYTES, name="event"))
        return _event(data)
    except BadInput:
        raise
    except Exception as exc:  # a bug here must not turn a poison message into a crash
        raise BadInput(f"unreadable event ({type(exc).__name__})") from exc


def _event(data: Any) -> LeakEvent:
    if not isinstance(data, dict):
        raise BadInput(f"the event must be a JSON object, not {_describe(data)}")
    source = data.get("source")
    if source != "aws.health":
        raise BadInput(f'source must be "aws.health", not {_show(source)}')
    detail = data.get("detail")
    if not isinstance(detail, dict):
        raise BadInput("detail must be a JSON object")
    service = detail.get("service")
    if service != "RISK":
        raise BadInput(f'detail.service must be "RISK", not {_show(service)}')
    code = detail.get("eventTypeCode")
    if not isinstance(code, str) or code not in RISK_CODES:
        raise BadInput(
            f"detail.eventTypeCode {_show(code)} is not a key exposure code "
            f"({', '.join(sorted(RISK_CODES))})"
        )
    account = _account(data, detail)
    notes: list[str] = []
    key_ids = _entity_keys(detail.get("affectedEntities"), notes.append)
    owner = _metadata_owner(detail.get("eventMetadata"), notes.append)
    if owner is not None and owner[0] not in key_ids:
        key_ids.append(owner[0])
    if not key_ids:
        why = f": {'; '.join(notes[:3])}" if notes else ""
        raise BadInput(f"the event names no access key id{why}")
    keys = tuple(
        LeakedKey(k, owner[1] if owner is not None and owner[0] == k else None) for k in key_ids
    )
    if len(notes) > MAX_NOTES:
        notes[MAX_NOTES:] = [f"... and {len(notes) - MAX_NOTES} more"]
    return LeakEvent(account, code, _event_id(data, detail), keys, tuple(notes))


def _account(data: dict[str, Any], detail: dict[str, Any]) -> str | None:
    """The account whose keys leaked: `detail.affectedAccount` when present (in
    organizational view the top-level `account` is the one that received the event)."""
    if detail.get("affectedAccount") is not None:
        field, account = "detail.affectedAccount", detail["affectedAccount"]
    else:
        field, account = "account", data.get("account")
    if account is not None and not (isinstance(account, str) and _ACCOUNT.fullmatch(account)):
        raise BadInput(f"{field} must be a 12-digit string, not {_describe(account)}")
    return account


def _as_key_id(value: Any) -> tuple[str | None, str]:
    """(the key id, "") when `value` is one; else (None, why not)."""
    if not isinstance(value, str):
        return None, f"not a key id but {_describe(value)}"
    value = value.strip()
    if _KEY_ID.fullmatch(value):
        return value, ""
    if _TEMPORARY_KEY_ID.fullmatch(value):
        return None, f"{value} is a temporary key: it expires on its own, nothing to rotate"
    return None, f"not an access key id: {_describe(value)}"


def _entity_keys(entities: Any, note: Callable[[str], None]) -> list[str]:
    if entities is None:
        return []
    if not isinstance(entities, list):
        note(f"detail.affectedEntities is not a list but {_describe(entities)}")
        return []
    keys: list[str] = []
    for i, entity in enumerate(entities):
        where = f"detail.affectedEntities[{i}]"
        if not isinstance(entity, dict):
            note(f"{where} is not an object but {_describe(entity)}")
            continue
        if "entityValue" not in entity:
            note(f"{where} has no entityValue")
            continue
        key, why = _as_key_id(entity["entityValue"])
        if key is None:
            note(f"{where}.entityValue: {why}")
        elif key not in keys:
            keys.append(key)
    return keys


def _metadata_owner(metadata: Any, note: Callable[[str], None]) -> tuple[str, str | None] | None:
    """(key id, user name or None) from `detail.eventMetadata.publicKey`/`userName`,
    the shape of the notify-and-remediate-exposed-access-key sample."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        note(f"detail.eventMetadata is not an object but {_describe(metadata)}")
        return None
    if "publicKey" not in metadata:
        return None
    key, why = _as_key_id(metadata["publicKey"])
    if key is None:
        note(f"detail.eventMetadata.publicKey: {why}")
        return None
    user = metadata.get("userName")
    if user is None:
        return key, None
    if not is_user_name(user):
        note(f"detail.eventMetadata.userName is not an IAM user name: {_describe(user)}")
        return key, None
    return key, user


def _event_id(data: dict[str, Any], detail: dict[str, Any]) -> str | None:
    """`detail.eventArn` (the same in every copy and page of one event), else the
    EventBridge `id` (different in every copy)."""
    for value in (detail.get("eventArn"), data.get("id")):
        if isinstance(value, str) and 0 < len(value) <= _MAX_EVENT_ID and value.isprintable():
            return value
    return None
