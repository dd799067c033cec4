"""The AWS adapter: IAM and STS through boto3. The only module that imports boto3/botocore.

Clients are built once per account from the standard credential chain and
`aws.endpoint_url`. Every list call goes through a paginator. `ClientError` is
translated by code into the project's own errors here, so no botocore type reaches
the core; `AccessDenied` in particular is raised, never turned into "no results" —
for a rotator an empty answer means "nothing is due", which would be a silent failure.
"""

from __future__ import annotations

import email.utils
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.client import responses as HTTP_REASONS
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers
import botocore.session

from rotator.deadlines import IAM_WRITE_ATTEMPTS, iam_connect_timeout
from rotator.errors import (
    BackendUnavailable,
    CapConflict,
    NotFound,
    PasswordRefused,
    PermissionDenied,
    RotatorError,
    Transient,
)
from rotator.model import (
    AccessKey,
    IamGroup,
    IamUser,
    KeyStatus,
    LoginProfile,
    NewKey,
    PasswordPolicy,
)
from rotator.passwords import IAM_DEFAULT
from rotator.ports import KeyLastUsed, QueueMessage

T = TypeVar("T")

_TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ServiceUnavailable",
        "ServiceFailure",
        "InternalFailure",
        "InternalError",
        "RequestTimeout",
        "ConcurrentModification",
    }
)
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnauthorizedOperation",
        "InvalidClientTokenId",
        "ExpiredToken",
        "ExpiredTokenException",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
_REPORT_NOT_READY = frozenset({"ReportNotPresent", "ReportInProgress", "ReportExpired"})
# Statuses below 500 worth another try whatever the code says (a proxy or a load balancer
# in front of AWS may answer them with a body botocore cannot read): the request timed
# out before it was taken, or was throttled.
_RETRYABLE_4XX = frozenset({408, 429})
# IAM returns at most 1000 entries per page; fewer pages means fewer calls.
_PAGE = {"PaginationConfig": {"PageSize": 1000}}


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _readable_error(response_dict: Any = None, operation_model: Any = None, **_: Any) -> None:
    """botocore `before-parse` hook. An error answer that is not XML (a proxy's or load
    balancer's page, an empty body) makes botocore's XML parsers raise
    `ResponseParserError`, which keeps no status: a 429 or a 504 would read like a 418.
    Give such an answer AWS's error document with its status as the code, as botocore
    does itself for an empty or HTML 5xx, so that `translate` can judge it by status."""
    if response_dict is None or operation_model is None:
        return
    status = response_dict.get("status_code", 0)
    protocol = operation_model.service_model.resolved_protocol
    if status < 300 or protocol not in ("query", "rest-xml", "ec2"):
        return  # JSON protocols already turn any body into an error with the status
    try:
        # botocore parses this same body with the same parser right after.
        ElementTree.fromstring(response_dict.get("body") or b"")  # noqa: S314
        return
    except ElementTree.ParseError:
        pass
    reason = HTTP_REASONS.get(status, "")
    response_dict["body"] = (
        f"<ErrorResponse><Error><Code>{status}</Code><Message>{reason}</Message></Error>"
        "</ErrorResponse>"
    ).encode()


def _readable_errors(client: Any) -> None:
    """Hook `_readable_error` into `client`."""
    client.meta.events.register("before-parse", _readable_error)


def translate(
    exc: Exception, service: str, operation: str, resource: str | None = None
) -> Exception:
    """Map a botocore exception to the project's error family."""
    action = f"{service}:{operation}"
    if isinstance(exc, botocore.exceptions.ClientError):
        translated = _translate_answer(exc, action, resource)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        # IAM answered with an error document: below 500 it refused, so nothing happened.
        translated.answered = True
        translated.not_applied = isinstance(status, int) and 400 <= status < 500
        return translated
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return BackendUnavailable(
            "no AWS credentials found (set AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "or run where an instance role is available)"
        )
    if isinstance(
        exc,
        botocore.exceptions.EndpointConnectionError
        | botocore.exceptions.ConnectTimeoutError
        | botocore.exceptions.ConnectionClosedError,
    ):
        return BackendUnavailable(f"cannot reach AWS for {action}: {exc}")
    if isinstance(exc, botocore.exceptions.ReadTimeoutError):
        return Transient(f"{action}: read timeout")
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        # botocore refused to send the request (a value IAM cannot take): a bug or bad
        # input, never worth retrying; and nothing was sent, so nothing was applied.
        refused = RotatorError(f"{action}: refused before sending: {exc}")
        refused.answered = refused.not_applied = True
        return refused
    if isinstance(exc, botocore.exceptions.BotoCoreError | botocore.parsers.ResponseParserError):
        # A ResponseParserError left now is a success answer that could not be read (an
        # error answer is made readable by `_readable_error`): botocore says further
        # retries may succeed.
        return Transient(f"{action}: {type(exc).__name__}")
    return exc


def _translate_answer(
    exc: botocore.exceptions.ClientError, action: str, resource: str | None
) -> RotatorError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    message = str(error.get("Message", ""))
    if code in _TRANSIENT_CODES:
        return Transient(f"{action}: {code}: {message}")
    if code in _DENIED_CODES:
        return PermissionDenied(action, resource, code)
    if code == "NoSuchEntity":
        return NotFound(f"{action}: {message or 'no such entity'}")
    if code == "LimitExceeded":
        return CapConflict(f"{action}: {message}")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if isinstance(status, int) and (status >= 500 or status in _RETRYABLE_4XX):
        return Transient(f"{action}: {code}: {message}")
    # An error this code does not know: a bug or a refusal. Stop and say so.
    return RotatorError(f"{action}: refused: {code}: {message}")


_BOTO_ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    botocore.parsers.ResponseParserError,
)


class AwsIam:
    """`rotator.ports.IamPort` for one account.

    `calls` counts every API call sent by operation name (retries included), for the
    metrics and for tests that hold the scan to its call budget.
    """

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None = None,
        session: Any = None,
        account_id: str | None = None,
        max_attempts: int = 5,
        before_call: Callable[[str], None] | None = None,
        connections: int = 10,
        call_timeout: float = 15.0,
    ) -> None:
        self._session = session or boto3.session.Session()
        self._region = region
        self._endpoint_url = endpoint_url
        self._account_id = account_id
        self._before_call = before_call
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server_clock: tuple[datetime, float] | None = None
        retrying = botocore.config.Config(
            region_name=region,
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=10,
            read_timeout=30,
            # One pooled connection per concurrent rotation (botocore's default is 10).
            max_pool_connections=max(10, connections),
        )
        # Writes run under a rotation's lease, which must outlast them: a bounded number
        # of attempts with short timeouts (rotator.deadlines derives the total).
        writing = retrying.merge(
            botocore.config.Config(
                retries={"mode": "standard", "total_max_attempts": IAM_WRITE_ATTEMPTS},
                connect_timeout=iam_connect_timeout(
                    timedelta(seconds=call_timeout)
                ).total_seconds(),
                read_timeout=call_timeout,
            )
        )
        # CreateAccessKey is not idempotent: a retry after a lost response can mint a
        # second key whose secret nobody ever sees. This client sends each call once.
        once = writing.merge(botocore.config.Config(retries={"total_max_attempts": 1}))
        self._iam = self._client("iam", retrying)
        self._iam_write = self._client("iam", writing)
        self._iam_once = self._client("iam", once)
        self._sts = self._client("sts", retrying)

    def _client(self, service: str, config: botocore.config.Config, **creds: str) -> Any:
        session: Any = self._session
        client = session.client(service, endpoint_url=self._endpoint_url, config=config, **creds)
        _readable_errors(client)
        client.meta.events.register("before-send", self._count)
        client.meta.events.register("after-call", self._observe_clock)
        return client

    def _observe_clock(self, http_response: Any = None, **kwargs: Any) -> None:
        # Every answer, errors included, carries the server's Date: remember it with the
        # local monotonic time, so that `iam_time` can tell IAM's clock at any moment.
        date = getattr(http_response, "headers", {}).get("Date") if http_response else None
        if not date:
            return
        try:
            seen = email.utils.parsedate_to_datetime(str(date)).astimezone(UTC)
        except (TypeError, ValueError):
            return
        with self._lock:
            self._server_clock = (seen, time.monotonic())

    def iam_time(self) -> datetime | None:
        """IAM's clock now (to the second), from the Date header of the latest answer
        plus the time elapsed since; None before any answer. IAM stamps a key's
        CreateDate with this clock, which may differ from this host's."""
        with self._lock:
            seen = self._server_clock
        if seen is None:
            return None
        return seen[0] + timedelta(seconds=time.monotonic() - seen[1])

    def _count(self, request: Any = None, **kwargs: Any) -> None:
        name = str(kwargs.get("event_name", "")).split(".")
        # event name: before-send.<service>.<Operation>
        operation = f"{name[1]}:{name[2]}" if len(name) >= 3 else "unknown"
        with self._lock:
            self.calls[operation] += 1
        if self._before_call is not None:
            self._before_call(operation)

    def _do(self, operation: str, fn: Callable[[], T], resource: str | None = None) -> T:
        try:
            return fn()
        except _BOTO_ERRORS as exc:
            raise translate(exc, "iam", operation, resource) from exc

    # --- identity -------------------------------------------------------------------

    def account_id(self) -> str:
        if self._account_id is None:
            try:
                ident = self._sts.get_caller_identity()
            except _BOTO_ERRORS as exc:
                raise translate(exc, "sts", "GetCallerIdentity") from exc
            self._account_id = str(ident["Account"])
        return self._account_id

    def caller_arn(self, key: NewKey) -> str:
        config = botocore.config.Config(
            region_name=self._region,
            retries={"mode": "standard", "total_max_attempts": 2},
            connect_timeout=10,
            read_timeout=20,
        )
        client = self._client(
            "sts",
            config,
            aws_access_key_id=key.access_key_id,
            aws_secret_access_key=key.secret_access_key,
        )
        try:
            ident = client.get_caller_identity()
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _DENIED_CODES:
                # A new key is eventually consistent: IAM may refuse it for a while.
                raise Transient(
                    f"sts:GetCallerIdentity: new key not accepted yet ({code})"
                ) from exc
            raise translate(exc, "sts", "GetCallerIdentity") from exc
        except (botocore.exceptions.BotoCoreError, botocore.parsers.ResponseParserError) as exc:
            raise translate(exc, "sts", "GetCallerIdentity") from exc
        return str(ident["Arn"])

    # --- users ----------------------------------------------------------------------

    def iter_users_with_details(self) -> Iterator[IamUser]:
        account = self.account_id()
        paginator = self._iam.get_paginator("get_account_authorization_details")
        # Groups come in the same pages (GroupDetailList, with the managed policies
        # attached to each): a user's groups and what they attach cost no extra call.
        # A group may come on a later page than its members, so every page is read
        # before the first user is given out.
        pages = paginator.paginate(Filter=["User", "Group"], **_PAGE)
        items: list[dict[str, Any]] = []
        groups: dict[str, IamGroup] = {}
        for page in self._pages("GetAccountAuthorizationDetails", pages):
            items += page.get("UserDetailList", [])
            for group in page.get("GroupDetailList", []):
                groups[group["GroupName"]] = IamGroup(
                    name=group["GroupName"],
                    attached_policy_arns=frozenset(
                        p["PolicyArn"] for p in group.get("AttachedManagedPolicies", [])
                    ),
                )
        for item in items:
            # A group missing from the listing (deleted between two pages) attaches
            # nothing we know of; the user is still in it by name.
            member_of = tuple(
                groups.get(name, IamGroup(name)) for name in sorted(item.get("GroupList", []))
            )
            yield _user_from(account, item, item.get("AttachedManagedPolicies", []), member_of)

    def user_details(self, user_name: str) -> IamUser:
        account = self.account_id()
        item = self._do("GetUser", lambda: self._iam.get_user(UserName=user_name), user_name)
        user = item["User"]
        tags_pages = self._iam.get_paginator("list_user_tags").paginate(UserName=user_name)
        tags = [t for p in self._pages("ListUserTags", tags_pages, user_name) for t in p["Tags"]]
        pol_pages = self._iam.get_paginator("list_attached_user_policies").paginate(
            UserName=user_name
        )
        policies = [
            p
            for page in self._pages("ListAttachedUserPolicies", pol_pages, user_name)
            for p in page["AttachedPolicies"]
        ]
        return _user_from(account, {**user, "Tags": tags}, policies)

    def _pages(self, operation: str, pages: Any, resource: str | None = None) -> Iterator[Any]:
        iterator = iter(pages)
        while True:
            try:
                page = next(iterator)
            except StopIteration:
                return
            except _BOTO_ERRORS as exc:
                raise translate(exc, "iam", operation, resource) from exc
            yield page

    # --- credential report ----------------------------------------------------------

    def generate_credential_report(self) -> str:
        answer = self._do("GenerateCredentialReport", self._iam.generate_credential_report)
        return str(answer.get("State", ""))

    def get_credential_report(self) -> bytes | None:
        try:
            answer = self._iam.get_credential_report()
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _REPORT_NOT_READY:
                return None
            raise translate(exc, "iam", "GetCredentialReport") from exc
        except (botocore.exceptions.BotoCoreError, botocore.parsers.ResponseParserError) as exc:
            raise translate(exc, "iam", "GetCredentialReport") from exc
        content = answer["Content"]
        return content if isinstance(content, bytes) else str(content).encode()

    # --- keys -----------------------------------------------------------------------

    def list_access_keys(self, user_name: str) -> list[AccessKey]:
        pages = self._iam.get_paginator("list_access_keys").paginate(UserName=user_name)
        return [
            AccessKey(
                access_key_id=item["AccessKeyId"],
                status=KeyStatus(item["Status"]),
                created_at=_aware(item["CreateDate"]),
            )
            for page in self._pages("ListAccessKeys", pages, user_name)
            for item in page["AccessKeyMetadata"]
        ]

    def key_last_used(self, access_key_id: str) -> KeyLastUsed:
        answer = self._do(
            "GetAccessKeyLastUsed",
            lambda: self._iam.get_access_key_last_used(AccessKeyId=access_key_id),
            access_key_id,
        )
        used = answer.get("AccessKeyLastUsed", {}).get("LastUsedDate")
        return KeyLastUsed(answer.get("UserName"), _aware(used) if used else None)

    def create_access_key(self, user_name: str) -> NewKey:
        answer = self._do(
            "CreateAccessKey",
            lambda: self._iam_once.create_access_key(UserName=user_name),
            user_name,
        )
        key = answer["AccessKey"]
        return NewKey(key["AccessKeyId"], key["SecretAccessKey"])

    def set_key_status(self, user_name: str, access_key_id: str, status: KeyStatus) -> None:
        self._do(
            "UpdateAccessKey",
            lambda: self._iam_write.update_access_key(
                UserName=user_name, AccessKeyId=access_key_id, Status=status.value
            ),
            f"{user_name}/{access_key_id}",
        )

    def delete_access_key(self, user_name: str, access_key_id: str) -> None:
        self._do(
            "DeleteAccessKey",
            lambda: self._iam_write.delete_access_key(
                UserName=user_name, AccessKeyId=access_key_id
            ),
            f"{user_name}/{access_key_id}",
        )

    # --- console access ---------------------------------------------------------------

    def login_profile(self, user_name: str) -> LoginProfile | None:
        try:
            answer = self._do(
                "GetLoginProfile",
                lambda: self._iam.get_login_profile(UserName=user_name),
                user_name,
            )
        except NotFound:
            # IAM says NoSuchEntity for a user without a login profile and for no user;
            # which one matters (a rotation of a deleted user ends, of a user without
            # console access asks for --create).
            self.user_details(user_name)
            return None
        profile = answer["LoginProfile"]
        return LoginProfile(
            created_at=_aware(profile["CreateDate"]),
            reset_required=bool(profile.get("PasswordResetRequired", False)),
        )

    def password_policy(self) -> PasswordPolicy:
        try:
            answer = self._do("GetAccountPasswordPolicy", self._iam.get_account_password_policy)
        except NotFound:
            return IAM_DEFAULT
        policy = answer["PasswordPolicy"]
        return PasswordPolicy(
            minimum_length=int(policy.get("MinimumPasswordLength", IAM_DEFAULT.minimum_length)),
            require_symbols=bool(policy.get("RequireSymbols", False)),
            require_numbers=bool(policy.get("RequireNumbers", False)),
            require_uppercase=bool(policy.get("RequireUppercaseCharacters", False)),
            require_lowercase=bool(policy.get("RequireLowercaseCharacters", False)),
        )

    def set_password(self, user_name: str, password: str, *, create: bool = False) -> None:
        try:
            self._set_password(user_name, password, create=create)
        except RotatorError as exc:
            # Never a password in an error: botocore's parameter errors quote values.
            if password in str(exc):
                raise type(exc)(str(exc).replace(password, "[REDACTED]")) from None
            raise

    def _set_password(self, user_name: str, password: str, *, create: bool) -> None:
        def update() -> None:
            self._do(
                "UpdateLoginProfile",
                lambda: self._iam_write.update_login_profile(
                    UserName=user_name, Password=password, PasswordResetRequired=True
                ),
                user_name,
            )

        try:
            if not create:
                update()
                return
            # Not idempotent (a retry after a lost answer says EntityAlreadyExists): sent
            # once. A profile that exists already is never replaced here: the engine
            # decides whether it is its own (an earlier attempt) or someone else's.
            self._do(
                "CreateLoginProfile",
                lambda: self._iam_once.create_login_profile(
                    UserName=user_name, Password=password, PasswordResetRequired=True
                ),
                user_name,
            )
        except RotatorError as exc:
            if "PasswordPolicyViolation" in str(exc):
                raise PasswordRefused(
                    f"IAM refused the new console password of {user_name}: {exc}"
                ) from None
            raise


def _user_from(
    account: str,
    item: dict[str, Any],
    policies: list[dict[str, Any]],
    groups: tuple[IamGroup, ...] = (),
) -> IamUser:
    return IamUser(
        account_id=account,
        user_name=item["UserName"],
        arn=item["Arn"],
        path=item.get("Path", "/"),
        tags={t["Key"]: t.get("Value", "") for t in item.get("Tags", [])},
        attached_policy_arns=frozenset(p["PolicyArn"] for p in policies),
        groups=groups,
    )


class AwsQueue:
    """`rotator.ports.LeakQueue`: the SQS queue that AWS Health events arrive on
    (EventBridge -> SQS)."""

    def __init__(
        self,
        queue_url: str,
        *,
        region: str,
        endpoint_url: str | None = None,
        session: Any = None,
    ) -> None:
        self.url = queue_url
        config = botocore.config.Config(
            region_name=region,
            retries={"mode": "standard", "total_max_attempts": 5},
            connect_timeout=10,
            # A long poll holds the connection for up to 20 s.
            read_timeout=40,
        )
        boto: Any = session or boto3.session.Session()
        self._sqs = boto.client("sqs", endpoint_url=endpoint_url, config=config)
        _readable_errors(self._sqs)

    def _do(self, operation: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except _BOTO_ERRORS as exc:
            raise translate(exc, "sqs", operation, self.url) from exc

    def receive(self, *, max_messages: int = 10, wait_seconds: int = 20) -> list[QueueMessage]:
        answer = self._do(
            "ReceiveMessage",
            lambda: self._sqs.receive_message(
                QueueUrl=self.url,
                MaxNumberOfMessages=max_messages,
                WaitTimeSeconds=wait_seconds,
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            ),
        )
        return [
            QueueMessage(
                message_id=m["MessageId"],
                receipt=m["ReceiptHandle"],
                body=m.get("Body", ""),
                receive_count=int(m.get("Attributes", {}).get("ApproximateReceiveCount", "1")),
            )
            for m in answer.get("Messages", [])
        ]

    def delete(self, message: QueueMessage) -> None:
        self._do(
            "DeleteMessage",
            lambda: self._sqs.delete_message(QueueUrl=self.url, ReceiptHandle=message.receipt),
        )

    def postpone(self, message: QueueMessage, seconds: int) -> None:
        """Hide the message for `seconds` (a transient failure: try again later)."""
        self._do(
            "ChangeMessageVisibility",
            lambda: self._sqs.change_message_visibility(
                QueueUrl=self.url, ReceiptHandle=message.receipt, VisibilityTimeout=seconds
            ),
        )


class AwsTopic:
    """An SNS topic that notifications are published to."""

    def __init__(
        self,
        topic_arn: str,
        *,
        region: str,
        endpoint_url: str | None = None,
        session: Any = None,
    ) -> None:
        self.arn = topic_arn
        config = botocore.config.Config(
            region_name=region, retries={"mode": "standard", "total_max_attempts": 3}
        )
        boto: Any = session or boto3.session.Session()
        self._sns = boto.client("sns", endpoint_url=endpoint_url, config=config)
        _readable_errors(self._sns)

    def publish(self, subject: str, message: str) -> None:
        try:
            self._sns.publish(TopicArn=self.arn, Subject=subject[:100], Message=message)
        except _BOTO_ERRORS as exc:
            raise translate(exc, "sns", "Publish", self.arn) from exc


class AwsEmail:
    """Amazon SES (v2 API): the owner warnings sent by email, from one verified
    sender identity."""

    def __init__(
        self,
        sender: str,
        *,
        region: str,
        endpoint_url: str | None = None,
        session: Any = None,
    ) -> None:
        self.sender = sender
        config = botocore.config.Config(
            region_name=region, retries={"mode": "standard", "total_max_attempts": 3}
        )
        boto: Any = session or boto3.session.Session()
        self._ses = boto.client("sesv2", endpoint_url=endpoint_url, config=config)
        _readable_errors(self._ses)

    def send(self, to: str, subject: str, text: str) -> None:
        """One plain-text email to `to`. Raises `Transient` on throttling and the
        project's other errors for a refusal (an unverified sender, a bad address)."""
        try:
            self._ses.send_email(
                FromEmailAddress=self.sender,
                Destination={"ToAddresses": [to]},
                Content={
                    "Simple": {
                        "Subject": {"Data": subject[:200], "Charset": "UTF-8"},
                        "Body": {"Text": {"Data": text, "Charset": "UTF-8"}},
                    }
                },
            )
        except _BOTO_ERRORS as exc:
            raise translate(exc, "ses", "SendEmail", self.sender) from exc


def assumed_session(
    role_arn: str,
    *,
    region: str,
    endpoint_url: str | None = None,
    external_id: str | None = None,
    base: Any = None,
) -> Any:
    """A boto3 session whose credentials come from `sts:AssumeRole` on `role_arn` and
    are refreshed by botocore before they expire. The first AssumeRole happens here, so
    a role that cannot be assumed fails now, named, not at some later IAM call."""
    from botocore.credentials import AssumeRoleCredentialFetcher, RefreshableCredentials

    source = (base or boto3.session.Session())._session
    credentials = source.get_credentials()
    if credentials is None:
        raise translate(botocore.exceptions.NoCredentialsError(), "sts", "AssumeRole")

    def create_client(service: str, **kwargs: Any) -> Any:
        client = source.create_client(
            service, region_name=region, endpoint_url=endpoint_url, **kwargs
        )
        _readable_errors(client)
        return client

    extra: dict[str, Any] = {"RoleSessionName": "rotator"}
    if external_id:
        extra["ExternalId"] = external_id
    fetcher = AssumeRoleCredentialFetcher(
        client_creator=create_client,
        source_credentials=credentials,
        role_arn=role_arn,
        extra_args=extra,
    )
    try:
        first = fetcher.fetch_credentials()
    except _BOTO_ERRORS as exc:
        raise translate(exc, "sts", "AssumeRole", role_arn) from exc
    refreshable = RefreshableCredentials.create_from_metadata(
        metadata=first, refresh_using=fetcher.fetch_credentials, method="assume-role"
    )
    core: Any = botocore.session.Session()
    # botocore has no public setter for refreshable credentials; this is how its own
    # assume-role provider hands them to a session.
    core._credentials = refreshable
    return boto3.session.Session(botocore_session=core, region_name=region)


def organization_accounts(
    *, region: str, endpoint_url: str | None = None, session: Any = None
) -> list[str]:
    """Ids of the organization's ACTIVE accounts (`organizations:ListAccounts`)."""
    boto: Any = session or boto3.session.Session()
    orgs = boto.client(
        "organizations",
        region_name=region,
        endpoint_url=endpoint_url,
        config=botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 5}),
    )
    _readable_errors(orgs)
    out: list[str] = []
    try:
        for page in orgs.get_paginator("list_accounts").paginate():
            out.extend(a["Id"] for a in page["Accounts"] if a.get("Status") == "ACTIVE")
    except _BOTO_ERRORS as exc:
        raise translate(exc, "organizations", "ListAccounts") from exc
    return out
