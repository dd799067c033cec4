"""The composition root: adapters built lazily, once, from the settings; handed-in
adapters used as they are and left open; the service takes what its wiring holds."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

import pytest

from rotator.app import App
from rotator.config import Settings, parse_settings
from rotator.errors import NotFound
from rotator.model import Rotation
from rotator.ports import IamPort, StateStore
from rotator.wiring import Wiring

OWN = "111111111111"
OTHER = "222222222222"


def settings(tmp_path: Path, **aws: Any) -> Settings:
    data = {"aws": aws, "state": {"path": str(tmp_path / "state.db")}}
    return parse_settings(data, {"VAULT_TOKEN": "not-used"})


class OneAccount:
    """An IamPort stand-in that knows its account and nothing else."""

    def __init__(self, account_id: str) -> None:
        self._account_id = account_id

    def account_id(self) -> str:
        return self._account_id


class ClosedCount:
    """A StateStore stand-in that counts `close` calls."""

    closed = 0

    def close(self) -> None:
        self.closed += 1


class Silent:
    def notify(self, event: str, rotation: Rotation, text: str) -> None:
        return None


def test_nothing_is_built_until_asked(tmp_path: Path) -> None:
    """Asking for IAM and the accounts opens no state store and no Vault client, and
    closing builds nothing either (`plan` runs without a state store)."""
    iam: Any = OneAccount(OWN)
    wiring = Wiring(settings(tmp_path), iam=iam)
    assert wiring.accounts() == [OWN]
    assert wiring.iam(OWN) is iam
    wiring.close()
    assert not (tmp_path / "state.db").exists()


def test_an_account_that_is_not_configured_is_not_found(tmp_path: Path) -> None:
    """IAM for an account the settings do not name raises NotFound, naming it."""
    iam: Any = OneAccount(OWN)
    wiring = Wiring(settings(tmp_path), iam=iam)
    with pytest.raises(NotFound, match=OTHER):
        wiring.iam(OTHER)


def test_an_iam_factory_is_asked_once_per_configured_account(tmp_path: Path) -> None:
    """A handed-in factory builds each configured account's IAM once, however many
    threads ask at the same moment."""
    asked: list[str] = []

    def factory(account_id: str) -> IamPort:
        asked.append(account_id)
        return cast(IamPort, OneAccount(account_id))

    wiring = Wiring(settings(tmp_path, accounts=[{"id": OWN}, {"id": OTHER}]), iam=factory)
    got: list[IamPort] = []

    def ask(account_id: str) -> None:
        got.append(wiring.iam(account_id))

    threads = [threading.Thread(target=ask, args=(a,)) for a in [OWN, OTHER] * 8]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(asked) == [OWN, OTHER]
    assert len({id(i) for i in got}) == 2


def test_each_adapter_is_built_once_whichever_thread_asks_first(tmp_path: Path) -> None:
    """Sixteen threads asking for the state store and the secret store at once get one
    of each; closing the wiring closes the store it built."""
    wiring = Wiring(settings(tmp_path))
    stores: list[StateStore] = []
    secrets: list[object] = []

    def ask() -> None:
        stores.append(wiring.store)
        secrets.append(wiring.secrets)

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s) for s in stores}) == 1
    assert len({id(s) for s in secrets}) == 1
    wiring.close()
    assert (tmp_path / "state.db").exists()


def test_handed_in_adapters_are_used_and_left_open(tmp_path: Path) -> None:
    """The service runs on the store and notifier its wiring was given, and closing it
    leaves them open: they belong to whoever handed them in."""
    store = ClosedCount()
    notifier = Silent()
    s = settings(tmp_path)
    handed_in = cast(StateStore, store)
    app = App(s, wiring=Wiring(s, store=handed_in, notifier=notifier))
    assert app.store is handed_in
    assert app.notifier is notifier
    app.close()
    assert store.closed == 0
    assert not (tmp_path / "state.db").exists()


def test_the_service_takes_clock_metrics_and_notifier_from_its_wiring(tmp_path: Path) -> None:
    """Given a wiring, App refuses a clock (or other settings) of its own: the two
    could disagree."""
    s = settings(tmp_path)
    with pytest.raises(ValueError, match="from it"):
        App(s, wiring=Wiring(s), notifier=Silent())
    with pytest.raises(ValueError, match="from it"):
        App(s, wiring=Wiring(settings(tmp_path)))
