"""The notification sender against a real HTTP webhook on a loopback port: what it
retries (a passing failure), what it does not (a refusal), and how long it pauses."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from structlog.testing import capture_logs

from rotator.engine import new_rotation
from rotator.errors import RotatorError, Transient
from rotator.model import RotationReason
from rotator.notify import Dispatcher, WebhookSender, message_for
from rotator.sandbox import ACCOUNT_ID, free_port


class Webhook:
    """A webhook receiver that answers each POST with the next status of `statuses`
    (the last one for ever after) and keeps the bodies it was sent."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.bodies: list[dict[str, object]] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                hook.bodies.append(json.loads(self.rfile.read(length)))
                status = hook.statuses.pop(0) if len(hook.statuses) > 1 else hook.statuses[0]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


StartWebhook = Callable[..., Webhook]


@pytest.fixture
def webhook() -> Iterator[StartWebhook]:
    """Starts webhook receivers (`webhook(503, 200)`); stops them all."""
    started: list[Webhook] = []

    def start(*statuses: int) -> Webhook:
        hook = Webhook(*statuses)
        started.append(hook)
        return hook

    yield start
    for hook in started:
        hook.close()


ROTATION = new_rotation(
    ACCOUNT_ID, "alice", RotationReason.AGE, datetime(2026, 3, 2, tzinfo=UTC), old_key_id="AKIAOLD"
)


def deliver(
    url: str, *, tries: int = 4, first_pause: float = 1.0, max_pause: float = 30.0
) -> tuple[list[float], list[dict[str, object]]]:
    """Send one notification through a Dispatcher with a recording sleep; the pauses it
    slept and the log events it wrote."""
    slept: list[float] = []
    sender = Dispatcher(
        [WebhookSender(url, timeout=5)],
        tries=tries,
        first_pause=first_pause,
        max_pause=max_pause,
        sleep=slept.append,
    )
    with capture_logs() as logs:
        sender.notify("done", ROTATION, "alice: key rotated")
        sender.close()
    return slept, logs


def test_a_webhook_answering_5xx_is_retried_with_doubling_pauses_until_it_takes_it(
    webhook: StartWebhook,
) -> None:
    """503, 502, then 200: the message is sent three times, 1 s then 2 s apart, and
    logged as sent."""
    hook = webhook(503, 502, 200)
    slept, logs = deliver(hook.url)
    assert len(hook.bodies) == 3
    assert slept == [1.0, 2.0]
    assert [e["event"] for e in logs] == ["notify.retry", "notify.retry", "notify.sent"]


@pytest.mark.parametrize("status", [408, 429])
def test_a_webhook_answering_408_or_429_is_retried(webhook: StartWebhook, status: int) -> None:
    """A timed-out or throttled request is worth another try, although it is a 4xx."""
    hook = webhook(status, 200)
    slept, logs = deliver(hook.url)
    assert len(hook.bodies) == 2
    assert slept == [1.0]
    assert logs[-1]["event"] == "notify.sent"


@pytest.mark.parametrize("status", [400, 403, 404, 410])
def test_a_webhook_refusing_with_another_4xx_is_not_retried(
    webhook: StartWebhook, status: int
) -> None:
    """A wrong or revoked webhook answers 4xx: sending again cannot help, so it is sent
    once, with no pause, and the refusal is logged as an error naming the status."""
    hook = webhook(status)
    slept, logs = deliver(hook.url)
    assert len(hook.bodies) == 1
    assert slept == []
    [refused] = logs
    assert refused["event"] == "notify.refused"
    assert refused["log_level"] == "error"
    assert f"HTTP {status}" in str(refused["error"])


def test_a_webhook_that_never_takes_the_message_is_given_up_after_its_tries(
    webhook: StartWebhook,
) -> None:
    """Always 500: `tries` sends, pauses doubling from `first_pause` up to `max_pause`,
    then one error saying it gave up."""
    hook = webhook(500)
    slept, logs = deliver(hook.url, tries=6, first_pause=1.0, max_pause=4.0)
    assert len(hook.bodies) == 6
    assert slept == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert logs[-1]["event"] == "notify.gave_up"


def test_an_unreachable_webhook_is_retried() -> None:
    """Nobody listening: a passing failure (Transient), retried `tries` times."""
    slept, logs = deliver(f"http://127.0.0.1:{free_port()}/hook")
    assert slept == [1.0, 2.0, 4.0]
    assert [e["event"] for e in logs].count("notify.retry") == 4
    assert logs[-1]["event"] == "notify.gave_up"


@pytest.mark.parametrize(
    ("status", "retryable"), [(500, True), (504, True), (429, True), (404, False), (422, False)]
)
def test_webhook_sender_raises_transient_only_when_another_try_may_work(
    webhook: StartWebhook, status: int, retryable: bool
) -> None:
    """WebhookSender's errors speak the project's retry vocabulary: Transient for a 5xx,
    408 or 429 answer; any other 4xx a refusal, marked answered and not applied."""
    hook = webhook(status)
    with pytest.raises(RotatorError) as info:
        WebhookSender(hook.url, timeout=5)(message_for("done", ROTATION, "text"))
    assert isinstance(info.value, Transient) is retryable
    assert info.value.answered
    assert info.value.not_applied is (status < 500)
