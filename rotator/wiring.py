"""The composition root: builds every adapter from the settings, for `rotator.app`.

Each adapter is built on first use, once, whichever thread asks first: `plan` never opens
the state store, `leak-event` never talks to Vault before a replacement needs it, and the
daemon's threads share one set of clients. A build that raises is tried again on the
next use.

Tests hand in a fake or a wrapper for any adapter instead of the one the settings
describe. What is handed in belongs to the caller: `close` closes only what the wiring
built itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Generic, TypeVar, cast

from rotator.aws import (
    AwsEmail,
    AwsIam,
    AwsQueue,
    AwsTopic,
    assumed_session,
    organization_accounts,
)
from rotator.config import Settings
from rotator.digests import is_email_address
from rotator.errors import NotFound, PermissionDenied, RotatorError
from rotator.metrics import Metrics
from rotator.model import NewKey, StoredPassword, StoredSecret
from rotator.notify import Dispatcher, EmailSender, Message, TopicSender, WebhookSender
from rotator.ports import (
    Clock,
    IamPort,
    LeakQueue,
    Notifier,
    OwnerNotifier,
    SecretStore,
    StateStore,
)
from rotator.ratelimit import TokenBucket
from rotator.state import SqliteStateStore, lease_owner
from rotator.vault import VaultStore, build_auth

T = TypeVar("T")


class _Once(Generic[T]):
    """A value built on first use, once, whichever thread asks first."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._value: T | None = None
        self._done = False

    def get(self) -> T:
        if not self._done:
            with self._lock:
                if not self._done:
                    self._value = self._build()
                    self._done = True
        return cast(T, self._value)

    def built(self) -> T | None:
        """The value when it was built, else None: closing must not build anything."""
        return self._value if self._done else None


def build_secrets(settings: Settings) -> VaultStore:
    auth = settings.vault.auth
    return VaultStore(
        str(settings.vault.url),
        settings.vault.mount,
        settings.vault.path_template,
        console_path_template=settings.vault.console_path_template,
        auth=build_auth(
            auth.method,
            token=auth.token,
            token_file=str(auth.token_file) if auth.token_file else None,
            role_id=auth.role_id,
            secret_id_file=str(auth.secret_id_file) if auth.secret_id_file else None,
        ),
        connections=settings.aws.concurrency,
        timeout=settings.vault.timeout.total_seconds(),
    )


class CountedSecrets:
    """A SecretStore that counts its failures in `rotator_vault_errors_total`."""

    def __init__(self, inner: SecretStore, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def _counted(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except RotatorError as exc:
            self._metrics.vault_error(type(exc).__name__)
            raise

    def path_for(self, account_id: str, user_name: str) -> str:
        return self._inner.path_for(account_id, user_name)

    def read(self, path: str) -> StoredSecret | None:
        return self._counted(lambda: self._inner.read(path))

    def write(self, path: str, key: NewKey, metadata: Mapping[str, str], cas: int) -> int:
        return self._counted(lambda: self._inner.write(path, key, metadata, cas))

    def current_version(self, path: str) -> int:
        return self._counted(lambda: self._inner.current_version(path))

    def set_metadata(self, path: str, metadata: Mapping[str, str]) -> None:
        self._counted(lambda: self._inner.set_metadata(path, metadata))

    def console_path_for(self, account_id: str, user_name: str) -> str:
        return self._inner.console_path_for(account_id, user_name)

    def read_password(self, path: str) -> StoredPassword | None:
        return self._counted(lambda: self._inner.read_password(path))

    def write_password(
        self,
        path: str,
        password: str,
        rotation_id: str,
        metadata: Mapping[str, str],
        cas: int,
    ) -> int:
        return self._counted(
            lambda: self._inner.write_password(path, password, rotation_id, metadata, cas)
        )

    def check(self) -> None:
        self._counted(self._inner.check)


class Wiring:
    """Settings -> adapters: IAM per account (rate-limited and counted), the account
    list, the secret store, the state store, the notifier and the leak queue.

    Overrides, for tests: `iam` is one IamPort for every configured account (with no
    `aws.accounts` or organization, its account is the one looked after) or a factory
    `account id -> IamPort`; `default_iam` is a prebuilt AwsIam for the credentials' own
    account (a test's shared boto3 session); `secrets`, `store`, `notifier`,
    `owner_notifier` and `queue` replace what the settings describe. A handed-in secret
    store is counted in the metrics like the built one; a handed-in IAM is neither
    rate-limited nor counted
    (both belong to the AWS adapter built here)."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        iam: Callable[[str], IamPort] | IamPort | None = None,
        default_iam: AwsIam | None = None,
        secrets: SecretStore | None = None,
        store: StateStore | None = None,
        notifier: Notifier | None = None,
        owner_notifier: OwnerNotifier | None = None,
        queue: LeakQueue | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or (lambda: datetime.now(UTC))
        self.metrics = metrics
        self._iam_port: IamPort | None = None
        self._iam_factory: Callable[[str], IamPort] | None = None
        if callable(iam):
            self._iam_factory = iam
        else:
            self._iam_port = iam
        self._given_secrets = secrets
        self._given_store = store
        self._given_notifier = notifier
        self._given_owner_notifier = owner_notifier
        self._given_queue = queue
        self._default = _Once(lambda: self._aws_iam() if default_iam is None else default_iam)
        self._accounts = _Once(self._find_accounts)
        self._iams: dict[str, _Once[IamPort]] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()  # the two dicts above
        self._vault = _Once(lambda: build_secrets(settings))
        self._secrets = _Once(self._build_secrets)
        self._store = _Once(self._build_store)
        self._dispatcher = _Once(self._dispatch)
        self._queue = _Once(self._build_queue)

    @staticmethod
    def lease_owner() -> str:
        """A lease owner name for one engine: unique to this process and call."""
        return lease_owner()

    # --- AWS --------------------------------------------------------------------------

    def _endpoint(self) -> str | None:
        url = self.settings.aws.endpoint_url
        return str(url) if url else None

    def _aws_iam(self, account_id: str | None = None, session: object = None) -> AwsIam:
        """The AWS adapter for one account (None: the credentials' own), its IAM calls
        held to `aws.iam_calls_per_second` and every call counted in the metrics."""
        aws = self.settings.aws
        return AwsIam(
            region=aws.region,
            endpoint_url=self._endpoint(),
            session=session,
            account_id=account_id,
            before_call=lambda operation: self._before_call(operation, account_id),
            connections=aws.concurrency,
            call_timeout=aws.call_timeout.total_seconds(),
        )

    def _before_call(self, operation: str, account_id: str | None) -> None:
        if operation.startswith("iam:"):
            # One bucket per account, shared by every thread that calls IAM there.
            with self._lock:
                bucket = self._buckets.get(account_id or "")
                if bucket is None:
                    bucket = TokenBucket(self.settings.aws.iam_calls_per_second)
                    self._buckets[account_id or ""] = bucket
            bucket.acquire()
        if self.metrics is not None:
            self.metrics.aws_call(operation)

    def default_iam(self) -> AwsIam:
        """IAM for the credentials' own account."""
        return self._default.get()

    def accounts(self) -> list[str]:
        """The account ids this rotator looks after: `aws.accounts`, the organization's
        active accounts (`aws.organization`), or the credentials' own account."""
        return self._accounts.get()

    def _find_accounts(self) -> list[str]:
        aws = self.settings.aws
        if aws.accounts:
            return [a.id for a in aws.accounts]
        if aws.organization is not None:
            org = aws.organization
            found = organization_accounts(region=aws.region, endpoint_url=self._endpoint())
            return [
                a for a in found if (not org.include or a in org.include) and a not in org.exclude
            ]
        own = self._iam_port if self._iam_port is not None else self.default_iam()
        return [own.account_id()]

    def iam(self, account_id: str) -> IamPort:
        """IAM for one configured account, reached through its role when it has one.
        Raises `NotFound` for an account that is not configured."""
        with self._lock:
            once = self._iams.get(account_id)
        if once is None:
            if account_id not in self.accounts():
                raise NotFound(f"account {account_id} is not configured")
            with self._lock:
                once = self._iams.setdefault(account_id, _Once(lambda: self._build_iam(account_id)))
        return once.get()

    def _build_iam(self, account_id: str) -> IamPort:
        if self._iam_factory is not None:
            return self._iam_factory(account_id)
        if self._iam_port is not None:
            return self._iam_port
        role_arn, external_id = self._role_for(account_id)
        if role_arn is None:
            own = self.default_iam()
            if own.account_id() != account_id:
                raise PermissionDenied(
                    "sts:AssumeRole",
                    account_id,
                    f"account {account_id} has no role_arn and is not the credentials' "
                    f"own account ({own.account_id()})",
                )
            return own
        session = assumed_session(
            role_arn,
            region=self.settings.aws.region,
            endpoint_url=self._endpoint(),
            external_id=external_id,
        )
        return self._aws_iam(account_id, session)

    def _role_for(self, account_id: str) -> tuple[str | None, str | None]:
        """The role (and external id) to reach a configured account through; none for
        the credentials' own account."""
        aws = self.settings.aws
        for account in aws.accounts or ():
            if account.id == account_id:
                return account.role_arn, account.external_id
        if aws.organization is not None:
            arn = f"arn:aws:iam::{account_id}:role/{aws.organization.role_name}"
            return arn, aws.organization.external_id
        return None, None

    # --- the other adapters -------------------------------------------------------------

    @property
    def secrets(self) -> SecretStore:
        return self._secrets.get()

    def secrets_on_demand(self) -> SecretStore:
        """The secret store, built at its first use rather than now: a leaked key is
        contained and its replacement recorded even when Vault cannot be configured
        (no token yet); the replacement's first Vault step says what is missing."""
        return _SecretsOnDemand(self)

    def _build_secrets(self) -> SecretStore:
        built = self._given_secrets if self._given_secrets is not None else self._vault.get()
        if self.metrics is not None:
            built = CountedSecrets(built, self.metrics)
        return built

    @property
    def store(self) -> StateStore:
        return self._store.get()

    def _build_store(self) -> StateStore:
        if self._given_store is not None:
            return self._given_store
        state = self.settings.state
        if state.url is not None:
            # Imported here: a rotator on SQLite never loads the PostgreSQL driver.
            from rotator.state.postgres import PostgresStateStore

            # No clock: leases between daemons on several hosts are judged by the
            # database's clock, the one clock they all share.
            return PostgresStateStore(state.url)
        return SqliteStateStore(state.path, clock=self.clock)

    @property
    def notifier(self) -> Notifier:
        if self._given_notifier is not None:
            return self._given_notifier
        return self._dispatcher.get()

    @property
    def owner_notifier(self) -> OwnerNotifier:
        """Where owners' warning digests go: the notifier's channels, plus SES email
        when `notify.email.from` is set."""
        if self._given_owner_notifier is not None:
            return self._given_owner_notifier
        return self._dispatcher.get()

    def _dispatch(self) -> Dispatcher:
        notify = self.settings.notify
        senders: list[Callable[[Message], None]] = []
        if notify.webhook_url:
            senders.append(WebhookSender(str(notify.webhook_url)))
        if notify.sns_topic_arn:
            topic = AwsTopic(
                notify.sns_topic_arn, region=self.settings.aws.region, endpoint_url=self._endpoint()
            )
            senders.append(TopicSender(topic.publish))
        if notify.email.from_:
            ses = AwsEmail(
                notify.email.from_,
                region=notify.email.region or self.settings.aws.region,
                endpoint_url=self._endpoint(),
            )
            senders.append(EmailSender(ses.send, is_email_address))
        return Dispatcher(senders)

    @property
    def queue(self) -> LeakQueue | None:
        """The leak queue (`leaks.sqs_queue_url`); None when there is none."""
        return self._queue.get()

    def _build_queue(self) -> LeakQueue | None:
        if self._given_queue is not None:
            return self._given_queue
        url = self.settings.leaks.sqs_queue_url
        if url is None:
            return None
        return AwsQueue(str(url), region=self.settings.aws.region, endpoint_url=self._endpoint())

    def close(self) -> None:
        """Close what this wiring built (the notifier's sender thread, the state store,
        Vault's connections); what was handed in stays open."""
        dispatcher = self._dispatcher.built()
        if dispatcher is not None:
            dispatcher.close()
        store = self._store.built()
        if store is not None and self._given_store is None:
            store.close()
        vault = self._vault.built()
        if vault is not None:
            vault.close()


class _SecretsOnDemand:
    """A SecretStore that asks the Wiring for the real one at each call."""

    def __init__(self, wiring: Wiring) -> None:
        self._wiring = wiring

    def path_for(self, account_id: str, user_name: str) -> str:
        return self._wiring.secrets.path_for(account_id, user_name)

    def read(self, path: str) -> StoredSecret | None:
        return self._wiring.secrets.read(path)

    def write(self, path: str, key: NewKey, metadata: Mapping[str, str], cas: int) -> int:
        return self._wiring.secrets.write(path, key, metadata, cas)

    def current_version(self, path: str) -> int:
        return self._wiring.secrets.current_version(path)

    def set_metadata(self, path: str, metadata: Mapping[str, str]) -> None:
        self._wiring.secrets.set_metadata(path, metadata)

    def console_path_for(self, account_id: str, user_name: str) -> str:
        return self._wiring.secrets.console_path_for(account_id, user_name)

    def read_password(self, path: str) -> StoredPassword | None:
        return self._wiring.secrets.read_password(path)

    def write_password(
        self,
        path: str,
        password: str,
        rotation_id: str,
        metadata: Mapping[str, str],
        cas: int,
    ) -> int:
        return self._wiring.secrets.write_password(path, password, rotation_id, metadata, cas)

    def check(self) -> None:
        self._wiring.secrets.check()
