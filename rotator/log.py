"""Logging: structlog for our events, the standard library's records routed through the
same processors, JSON lines for services and a readable console on a TTY.

Secrets must never reach a log line. Three layers keep them out:
  - the engine never passes a secret to a logger;
  - `redact` drops any field whose name says it holds a secret and scrubs every value
    registered with `register_secret` (each new key's secret, from CreateAccessKey until
    the rotation no longer holds it, `forget_secret`);
  - botocore's loggers (and the other libraries' in `_QUIET_LOGGERS`) are held at
    WARNING or above, whatever the configured level: at DEBUG botocore prints response
    bodies, and a `CreateAccessKey` body holds the secret.
Exceptions are rendered without local variables, which may hold a secret.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.types import Processor

REDACTED = "[REDACTED]"
_SECRET_FIELD = re.compile(r"secret|token|password|credential", re.IGNORECASE)
# Field names that match the pattern above but hold no secret.
_ALLOWED_FIELDS = frozenset({"token_file", "secret_id_file", "trigger_token_file"})
_QUIET_LOGGERS = (
    "botocore",
    "boto3",
    "urllib3",
    "s3transfer",
    "hvac",
    "werkzeug",
    # The pool logs every connection it lends at INFO; its DEBUG names the server.
    "psycopg",
)

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Scrub `value` from every log line written by this process from now on."""
    if len(value) >= 8:
        with _secrets_lock:
            _secrets.add(value)


def forget_secret(value: str) -> None:
    """Stop scrubbing `value`: the process no longer holds it (it is stored)."""
    with _secrets_lock:
        _secrets.discard(value)


def secrets_held() -> int:
    """How many secrets are registered for scrubbing now."""
    with _secrets_lock:
        return len(_secrets)


def scrub(text: str) -> str:
    """`text` with every registered secret replaced."""
    with _secrets_lock:
        known = list(_secrets)
    for value in known:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _clean_field(k, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_clean(v) for v in value)
    return value


def _clean_field(name: Any, value: Any) -> Any:
    if isinstance(name, str) and _SECRET_FIELD.search(name) and name not in _ALLOWED_FIELDS:
        return REDACTED if value is not None else None
    return _clean(value)


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop secret-named fields and scrub registered secrets."""
    for name in list(event_dict):
        event_dict[name] = _clean_field(name, event_dict[name])
    return event_dict


def configure(
    fmt: str | None = None,
    level: str = "INFO",
    stream: TextIO | None = None,
) -> None:
    """Set up structlog and the standard library. `fmt` is "json", "console", or None
    (console on a TTY, JSON otherwise)."""
    out = stream or sys.stderr
    if fmt is None:
        fmt = "console" if out.isatty() else "json"
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: Processor
    if fmt == "json":
        exc_processor: Processor = structlog.processors.ExceptionRenderer(
            ExceptionDictTransformer(show_locals=False, use_rich=False)
        )
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
        final: list[Processor] = [exc_processor, redact, renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        final = [redact, renderer]

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    # Library chatter stays at WARNING whatever --log-level says; botocore above all,
    # whose DEBUG output holds response bodies (a new key's secret among them).
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))


def get_logger(name: str) -> Any:
    return structlog.stdlib.get_logger(name)
