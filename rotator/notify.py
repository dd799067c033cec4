"""Notifications: a Slack-compatible webhook and an SNS topic, on done, failed,
blocked, leaked_contained and consumers_not_switched; and the owners' warning digests
(`owner_warning`), which go to the webhook and the topic naming the owner, and by email
(SES) to an owner that is an email address.

Sending happens on a background thread, so a slow or broken receiver never blocks a
rotation. A send that failed for a passing reason (`Transient`: a 5xx, 408 or 429
answer, a timeout, an unreachable receiver) is retried with backoff; a refusal (any
other 4xx: a wrong URL, a revoked webhook) is not, since sending again cannot help.
Texts are built from user names, key ids and states only, and pass through the log
scrubber once more before they leave: no secret is ever sent.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rotator import log
from rotator.backoff import retry_pause
from rotator.errors import BackendUnavailable, RotatorError, Transient
from rotator.model import Rotation

_log = log.get_logger("rotator.notify")

EVENTS = frozenset({"done", "failed", "blocked", "leaked_contained", "consumers_not_switched"})
_ICONS = {
    "done": ":white_check_mark:",
    "failed": ":x:",
    "blocked": ":no_entry:",
    "leaked_contained": ":rotating_light:",
    "consumers_not_switched": ":hourglass:",
    "owner_warning": ":bell:",
}
OWNER_WARNING = "owner_warning"


@dataclass(frozen=True)
class Message:
    event: str
    subject: str
    text: str
    fields: dict[str, str]
    # Whom an owner warning is for (an email address or a chat handle); None for the
    # rotation events, which go to the operators' channels only.
    owner: str | None = None


def message_for(event: str, rotation: Rotation, text: str) -> Message:
    fields = {
        "event": event,
        "account_id": rotation.account_id,
        "user_name": rotation.user_name,
        "rotation_id": rotation.id,
        "state": rotation.state.value,
        "old_key_id": rotation.old_key_id or "",
        "new_key_id": rotation.new_key_id or "",
    }
    subject = f"rotator: {event.replace('_', ' ')}: {rotation.user_name} ({rotation.account_id})"
    return Message(event, log.scrub(subject), log.scrub(text), fields)


def owner_message(owner: str, subject: str, text: str, key_ids: Sequence[str]) -> Message:
    """An owner's warning digest as a message; the owner is named in the subject, so a
    shared channel shows whom it is for."""
    fields = {"event": OWNER_WARNING, "owner": owner, "key_ids": ",".join(key_ids)}
    return Message(
        OWNER_WARNING, log.scrub(f"{subject} ({owner})"), log.scrub(text), fields, owner=owner
    )


class WebhookSender:
    """POSTs `{"text": ..., ...}`: the shape Slack, Mattermost and Teams incoming
    webhooks accept. Raises `Transient` when sending again later may work, and a
    plain `RotatorError` when the receiver refused the message."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self._url = url
        self._timeout = timeout

    def __call__(self, message: Message) -> None:
        text = f"{_ICONS.get(message.event, '')} {message.subject}\n{message.text}".strip()
        body = json.dumps({"text": text, "rotator": message.fields}).encode()
        request = urllib.request.Request(
            self._url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            raise _answered(exc.code) from exc
        except OSError as exc:  # URLError, a timeout, a connection reset
            raise BackendUnavailable(f"webhook unreachable: {exc.__class__.__name__}") from exc


# Answers below 500 that are worth another try: the request timed out, or was throttled.
_RETRYABLE_4XX = frozenset({408, 429})


def _answered(status: int) -> RotatorError:
    """The error for a webhook's non-2xx answer. Any 4xx but 408 and 429 is a refusal
    (a wrong or revoked URL, a body it does not take): retrying cannot help."""
    error: RotatorError
    if status >= 500 or status in _RETRYABLE_4XX:
        error = Transient(f"webhook answered HTTP {status}")
    else:
        error = RotatorError(f"webhook refused the message: HTTP {status}")
    error.answered = True
    error.not_applied = 400 <= status < 500
    return error


class TopicSender:
    def __init__(self, publish: Callable[[str, str], None]) -> None:
        self._publish = publish

    def __call__(self, message: Message) -> None:
        self._publish(message.subject, f"{message.text}\n\n{json.dumps(message.fields, indent=2)}")


class EmailSender:
    """Sends owner warnings by email (`send(to, subject, text)`: SES) to owners that
    are email addresses; every other message is not for it."""

    def __init__(
        self, send: Callable[[str, str, str], None], is_address: Callable[[str], bool]
    ) -> None:
        self._send = send
        self._is_address = is_address

    def accepts(self, message: Message) -> bool:
        return message.owner is not None and self._is_address(message.owner)

    def __call__(self, message: Message) -> None:
        if message.owner is not None and self.accepts(message):
            self._send(message.owner, message.subject, message.text)


def _accepts(sender: Callable[[Message], None], message: Message) -> bool:
    """Whether `sender` sends `message` (only the email sender picks)."""
    return not isinstance(sender, EmailSender) or sender.accepts(message)


class Dispatcher:
    """`rotator.ports.Notifier`: queues messages and sends them from one background
    thread. A sender that fails with `Transient` is tried up to `tries` times, pausing
    `retry_pause` seconds between tries (from `first_pause`, doubling, at most
    `max_pause`: 1, 2, 4 s by default); any other failure, a refusal or a bug, is
    given up at once. Either way an error is logged, and nothing reaches a rotation."""

    def __init__(
        self,
        senders: Sequence[Callable[[Message], None]],
        *,
        tries: int = 4,
        first_pause: float = 1.0,
        max_pause: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._senders = list(senders)
        self._tries = tries
        self._first_pause = first_pause
        self._max_pause = max_pause
        self._sleep = sleep
        self._queue: queue.Queue[Message | None] = queue.Queue(maxsize=1000)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def notify(self, event: str, rotation: Rotation, text: str) -> None:
        if not self._senders:
            return
        self._start()
        try:
            self._queue.put_nowait(message_for(event, rotation, text))
        except queue.Full:
            _log.error("notify.dropped", event=event, user=rotation.user_name, why="queue full")

    def warn_owner(self, owner: str, subject: str, text: str, key_ids: Sequence[str]) -> bool:
        """`rotator.ports.OwnerNotifier`: queue one owner's digest for every sender; True
        once it is queued for a channel that takes it (sending, and retrying, is the
        sending thread's concern)."""
        message = owner_message(owner, subject, text, key_ids)
        if not any(_accepts(sender, message) for sender in self._senders):
            return False  # e.g. only email is set up and the owner is a chat handle
        self._start()
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            _log.error("notify.dropped", event=OWNER_WARNING, owner=owner, why="queue full")
            return False
        return True

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="rotator-notify", daemon=True
                )
                self._thread.start()

    def _work(self) -> None:
        while True:
            message = self._queue.get()
            try:
                if message is None:
                    return
                for sender in self._senders:
                    if _accepts(sender, message):
                        self._send(sender, message)
            finally:
                self._queue.task_done()

    def _send(self, sender: Callable[[Message], None], message: Message) -> None:
        user = message.fields.get("user_name") or message.owner or ""
        for attempt in range(1, self._tries + 1):
            try:
                sender(message)
            except Transient as exc:
                _log.warning(
                    "notify.retry", notify_event=message.event, attempt=attempt, error=str(exc)
                )
                if attempt < self._tries:
                    self._sleep(retry_pause(attempt, base=self._first_pause, cap=self._max_pause))
                continue
            except Exception as exc:  # a receiver's failure must never reach a rotation
                error = str(exc)
                if not isinstance(exc, RotatorError):
                    error = f"unexpected {type(exc).__name__}: {exc}"  # a bug: say so
                _log.error("notify.refused", notify_event=message.event, user=user, error=error)
                return
            _log.info("notify.sent", notify_event=message.event, user=user)
            return
        _log.error("notify.gave_up", notify_event=message.event, user=user)

    def close(self, timeout: float = 30.0) -> None:
        """Send what is queued (up to `timeout` seconds), then stop the sending thread."""
        with self._lock:
            thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        thread.join(timeout)
