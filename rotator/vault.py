"""The Vault adapter: stores new access keys in a KV version 2 mount.

`VaultStore` implements `rotator.ports.SecretStore` with hvac; this is the only module
that imports hvac. It owns three concerns the core must not see:

- authentication (`VaultAuth`: a static token, a token file kept fresh by Vault Agent,
  or an AppRole login) and the token's lifetime (look up, renew at 2/3 of the TTL,
  log in again or re-read the file when Vault stops accepting the token);
- check-and-set writes plus custom metadata, in the layout consumers rely on
  (INTERFACE.md, "What consumers read from Vault");
- translating hvac and requests errors into `rotator.errors`, chained with `from exc`.

No token or secret value is ever put into an exception message, a log event or a repr.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import hvac
import hvac.adapters
import hvac.exceptions
import requests
import requests.adapters
import structlog

from rotator.errors import (
    BackendUnavailable,
    BadInput,
    CasConflict,
    ConfigError,
    NotFound,
    PermissionDenied,
    RotatorError,
    Transient,
)
from rotator.model import NewKey, StoredPassword, StoredSecret
from rotator.paths import (
    ACCESS_KEY_FIELD,
    DEFAULT_CONSOLE_PATH_TEMPLATE,
    PASSWORD_FIELD,
    ROTATION_ID_FIELD,
    SECRET_KEY_FIELD,
    secret_path,
)
from rotator.ports import Clock
from rotator.secretfile import read_secret_file

__all__ = [
    "AppRoleAuth",
    "TokenAuth",
    "TokenFileAuth",
    "VaultAuth",
    "VaultStore",
    "build_auth",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Vault's answer (HTTP 400) when `options.cas` differs from the current version.
_CAS_MISMATCH = "check-and-set parameter did not match the current version"

_AUTH_METHODS = ("token", "token_file", "approle")


# --------------------------------------------------------------------------- auth


class VaultAuth(Protocol):
    """Where the Vault token comes from."""

    def token(self, login_client: Any, *, force: bool = False) -> str:
        """The token to send now. `force`: Vault refused the last one (or it expired):
        log in again / re-read the source. `login_client` is an hvac client that
        carries no token, for login calls."""
        ...


class TokenAuth:
    """A static token (config or `VAULT_TOKEN`). It cannot be replaced once it dies."""

    def __init__(self, token: str) -> None:
        token = token.strip()
        if not token:
            raise ConfigError(["vault.auth.token: the token is empty"])
        self._token = token

    def token(self, login_client: Any, *, force: bool = False) -> str:
        return self._token

    def __repr__(self) -> str:
        return "TokenAuth(token=<hidden>)"


class TokenFileAuth:
    """A token read from a file that Vault Agent (or another sink) rewrites.

    The file is read again whenever its inode, size or mtime changes: Vault Agent
    replaces it atomically with a new token after re-authenticating, so a stale cached
    token would be refused. A file that vanishes or is empty for a moment does not
    discard a token already read, unless Vault has refused that token."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._token: str | None = None

    def token(self, login_client: Any, *, force: bool = False) -> str:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._token is not None and not force:
                return self._token
            raise ConfigError(
                [f"vault.auth.token_file: cannot read {self.path} ({exc.strerror})"]
            ) from exc
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._token is not None and stamp == self._stamp and not force:
            return self._token
        try:
            text = read_secret_file(self.path)
        except BadInput as exc:
            raise ConfigError([f"vault.auth.token_file: {exc}"]) from exc
        except (OSError, UnicodeDecodeError) as exc:
            if self._token is not None and not force:
                return self._token
            raise ConfigError([f"vault.auth.token_file: cannot read {self.path}"]) from exc
        if not text:
            if self._token is not None and not force:
                return self._token
            raise ConfigError([f"vault.auth.token_file: {self.path} is empty"])
        if self._token is not None and text != self._token:
            log.info("vault.token_file_reloaded", path=str(self.path))
        self._token, self._stamp = text, stamp
        return text

    def __repr__(self) -> str:
        return f"TokenFileAuth(path={str(self.path)!r})"


class AppRoleAuth:
    """AppRole login. The secret id is read from its file at every login, so an
    operator (or an orchestrator) can replace it without restarting the daemon."""

    def __init__(
        self, role_id: str, secret_id_file: Path | str, mount_point: str = "approle"
    ) -> None:
        role_id = role_id.strip()
        if not role_id:
            raise ConfigError(["vault.auth.role_id: the role id is empty"])
        self._role_id = role_id
        self.secret_id_file = Path(secret_id_file)
        self.mount_point = mount_point.strip("/")
        self._token: str | None = None

    def _secret_id(self) -> str:
        try:
            text = read_secret_file(self.secret_id_file)
        except BadInput as exc:
            raise ConfigError([f"vault.auth.secret_id_file: {exc}"]) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                [f"vault.auth.secret_id_file: cannot read {self.secret_id_file}"]
            ) from exc
        if not text:
            raise ConfigError([f"vault.auth.secret_id_file: {self.secret_id_file} is empty"])
        return text

    def token(self, login_client: Any, *, force: bool = False) -> str:
        if self._token is not None and not force:
            return self._token
        secret_id = self._secret_id()
        resource = f"auth/{self.mount_point}/login"
        try:
            # use_token=False: the login client must stay token-less; the store
            # installs the token on its own client.
            resp = login_client.auth.approle.login(
                role_id=self._role_id,
                secret_id=secret_id,
                mount_point=self.mount_point,
                use_token=False,
            )
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Unauthorized) as exc:
            # Vault answers a wrong role id or secret id with 400, not 403.
            raise PermissionDenied("vault:login", resource, "role id or secret id refused") from exc
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise _translate(exc, login_client.url, "vault:login", resource) from exc
        try:
            token = str(resp["auth"]["client_token"])
        except (KeyError, TypeError) as exc:
            raise RotatorError(
                f"Vault at {login_client.url}: {resource} returned no token"
            ) from exc
        log.info("vault.approle_login", mount_point=self.mount_point)
        self._token = token
        return token

    def __repr__(self) -> str:
        return (
            f"AppRoleAuth(role_id=<hidden>, secret_id_file={str(self.secret_id_file)!r}, "
            f"mount_point={self.mount_point!r})"
        )


def build_auth(
    method: str,
    *,
    token: str | None,
    token_file: str | None,
    role_id: str | None,
    secret_id_file: str | None,
) -> VaultAuth:
    """The `VaultAuth` for a `vault.auth` config section; `ConfigError` names what is
    missing. Files are not read here: they are read when a token is first needed."""
    if method == "token":
        if not token:
            raise ConfigError(["vault.auth.token: required for method token (or set VAULT_TOKEN)"])
        return TokenAuth(token)
    if method == "token_file":
        if not token_file:
            raise ConfigError(["vault.auth.token_file: required for method token_file"])
        return TokenFileAuth(Path(token_file))
    if method == "approle":
        problems = []
        if not role_id:
            problems.append("vault.auth.role_id: required for method approle")
        if not secret_id_file:
            problems.append("vault.auth.secret_id_file: required for method approle")
        if problems or role_id is None or secret_id_file is None:
            raise ConfigError(problems)
        return AppRoleAuth(role_id, Path(secret_id_file))
    raise ConfigError([f"vault.auth.method: {method!r} is not one of {', '.join(_AUTH_METHODS)}"])


# ---------------------------------------------------------------------- errors


class _StatusAdapter(hvac.adapters.JSONAdapter):  # type: ignore[misc]
    """hvac's JSON adapter, except that an error raised for an answer keeps its HTTP
    status in `status_code`. hvac's exceptions carry none, and one class,
    `UnexpectedError`, stands for every status hvac has no class for: a 504 from a load
    balancer (worth a retry) and a 405 (a refusal) would read alike."""

    def _raise_for_error(self, method: str, url: str, response: requests.Response) -> None:
        try:
            super()._raise_for_error(method, url, response)
        except hvac.exceptions.VaultError as exc:
            exc.status_code = response.status_code
            raise


# Vault's answers below 500 that are worth another try: the request timed out (408, a
# proxy's), a performance standby has not caught up yet (412: Vault's documentation says
# to retry it, with a little backoff), or a rate limit quota was hit (429).
_RETRYABLE_4XX = frozenset({408, 412, 429})


def _status(exc: hvac.exceptions.VaultError) -> int | None:
    """The HTTP status of Vault's answer (`_StatusAdapter` records it)."""
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def _refused(error: RotatorError) -> RotatorError:
    """Mark `error` as Vault's refusal: it answered, and the call had no effect."""
    error.answered = error.not_applied = True
    return error


def _vault_errors(exc: hvac.exceptions.VaultError) -> str:
    """Vault's own error strings, flattened. Only `errors` is used: hvac puts the whole
    response body in the message when `errors` is absent, and a body can hold data."""
    errors = exc.errors if isinstance(exc.errors, list) else []
    # Vault wraps multierrors as "1 error occurred:\n\t* permission denied\n\n".
    parts: list[str] = []
    for raw in errors:
        text = re.sub(r"^\d+ errors? occurred:", "", str(raw))
        parts.extend(p.strip(" *\t") for p in text.splitlines() if p.strip(" *\t"))
    return "; ".join(parts)


def _reason(exc: requests.RequestException) -> str:
    # requests nests urllib3's reason deep in its message; "[Errno 111] Connection
    # refused" is what an operator needs, the pool repr around it is noise.
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    if found:
        return found.group(1).strip()
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return type(exc).__name__


def _translate(exc: Exception, url: str, action: str, resource: str) -> RotatorError:
    """One hvac/requests error as the project's own. The caller chains it `from exc`.
    An hvac error is Vault's own answer (`answered`); a 4xx one refused the call.

    Retry vocabulary: `Transient` for a sealed, unavailable or overloaded Vault (5xx,
    408, 412, 429), a timeout or a connection error; a 4xx this module does not know is
    a refusal, a plain `RotatorError`: a bug or a misconfiguration, never retried."""
    translated = _translate_kind(exc, url, action, resource)
    if isinstance(exc, hvac.exceptions.VaultError):
        translated.answered = True
        status = _status(exc)
        translated.not_applied = status is not None and 400 <= status < 500
    return translated


def _translate_kind(exc: Exception, url: str, action: str, resource: str) -> RotatorError:
    if isinstance(exc, requests.ConnectionError):
        # Includes ConnectTimeout, but also a connection closed before the answer came:
        # then Vault may have applied the request. Callers never read this as "not done".
        return BackendUnavailable(f"Vault at {url} is unreachable: {_reason(exc)}")
    if isinstance(exc, requests.Timeout):
        # A read timeout: Vault got the request and may have applied it.
        return Transient(f"Vault at {url} did not answer in time ({action} on {resource})")
    if isinstance(exc, requests.RequestException):
        return BackendUnavailable(f"Vault at {url} could not be used: {_reason(exc)}")
    if not isinstance(exc, hvac.exceptions.VaultError):
        return RotatorError(f"Vault at {url}: {action} on {resource} failed ({type(exc).__name__})")
    detail = _vault_errors(exc)
    status = _status(exc)
    if isinstance(exc, hvac.exceptions.VaultDown):
        # 503: sealed, or no active node (leader election): nothing works until it ends.
        return BackendUnavailable(f"Vault at {url} is sealed or unavailable: {detail or '503'}")
    if isinstance(exc, hvac.exceptions.VaultNotInitialized):
        return BackendUnavailable(f"Vault at {url} is not initialized")
    if isinstance(
        exc,
        (
            hvac.exceptions.RateLimitExceeded,
            hvac.exceptions.InternalServerError,
            hvac.exceptions.BadGateway,
        ),
    ) or (status is not None and (status >= 500 or status in _RETRYABLE_4XX)):
        return Transient(
            f"Vault at {url}: {action} on {resource} failed: "
            f"{detail or status or type(exc).__name__}"
        )
    if isinstance(exc, (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized)):
        return PermissionDenied(action, resource)
    if isinstance(exc, hvac.exceptions.InvalidPath):
        return NotFound(f"Vault at {url}: {resource} not found: {detail or '404'}")
    # A 4xx this module does not know (405, 409, 413...): a bug or a refusal. Stop and
    # say so.
    return RotatorError(
        f"Vault at {url}: {action} on {resource} refused: {detail or status or type(exc).__name__}"
    )


# ----------------------------------------------------------------------- store


@dataclass(frozen=True)
class _Lifetime:
    """When the current token expires and when to renew it (None: never)."""

    expires_at: datetime | None
    renew_at: datetime | None


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _checked_template(name: str, template: str) -> str:
    """`template` when it may serve as a path template, else `ConfigError` naming it."""
    try:
        sample = template.format(account_id="123456789012", user_name="alice")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            [f"{name}: {template!r} may use only {{account_id}} and {{user_name}}"]
        ) from exc
    if not sample.strip("/"):
        raise ConfigError([f"{name}: empty"])
    return template


class VaultStore:
    """`SecretStore` on a Vault (or OpenBao) KV version 2 mount.

    Safe to share between threads: token bookkeeping is serialized, requests are not.
    """

    def __init__(
        self,
        url: str,
        mount: str,
        path_template: str,
        auth: VaultAuth,
        *,
        console_path_template: str = DEFAULT_CONSOLE_PATH_TEMPLATE,
        timeout: float = 10.0,
        clock: Clock | None = None,
        connections: int = 10,
    ) -> None:
        self.url = url.rstrip("/")
        self.mount = mount.strip("/")
        if not self.mount:
            raise ConfigError(["vault.mount: empty"])
        self.path_template = _checked_template("vault.path_template", path_template)
        self.console_path_template = _checked_template(
            "vault.console_path_template", console_path_template
        )
        self._auth = auth
        self._clock: Clock = clock or _utc_now
        # token="" (not None): hvac would otherwise pick up VAULT_TOKEN or
        # ~/.vault-token behind the configured auth method's back.
        # As many pooled connections as rotations run at once: a smaller pool makes
        # urllib3 open and drop extra connections (and warn) under load.
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(10, connections))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._client: Any = hvac.Client(
            url=self.url, token="", timeout=timeout, session=session, adapter=_StatusAdapter
        )
        self._login_client: Any = hvac.Client(
            url=self.url, token="", timeout=timeout, adapter=_StatusAdapter
        )
        self._lock = threading.RLock()
        self._token: str | None = None
        self._lifetime: _Lifetime | None = None

    def __repr__(self) -> str:
        return f"VaultStore(url={self.url!r}, mount={self.mount!r}, auth={self._auth!r})"

    # ---- SecretStore

    def path_for(self, account_id: str, user_name: str) -> str:
        return secret_path(self.path_template, account_id, user_name)

    def console_path_for(self, account_id: str, user_name: str) -> str:
        return secret_path(self.console_path_template, account_id, user_name)

    def read(self, path: str) -> StoredSecret | None:
        found = self._read_data(path)
        if found is None:
            return None
        data, version, custom = found
        key_id, secret = data.get(ACCESS_KEY_FIELD), data.get(SECRET_KEY_FIELD)
        if not isinstance(key_id, str) or not isinstance(secret, str) or not key_id or not secret:
            unusable = BadInput(
                f"Vault secret {self.mount}/data/{path} (version {version}) lacks "
                f"{ACCESS_KEY_FIELD} and {SECRET_KEY_FIELD}"
            )
            raise _refused(unusable)  # Vault answered the read
        return StoredSecret(
            access_key_id=key_id, secret_access_key=secret, version=version, metadata=custom
        )

    def read_password(self, path: str) -> StoredPassword | None:
        found = self._read_data(path)
        if found is None:
            return None
        data, version, custom = found
        password, rotation_id = data.get(PASSWORD_FIELD), data.get(ROTATION_ID_FIELD)
        if not isinstance(password, str) or not password:
            unusable = BadInput(
                f"Vault secret {self.mount}/data/{path} (version {version}) lacks {PASSWORD_FIELD}"
            )
            raise _refused(unusable)
        return StoredPassword(
            password=password,
            rotation_id=rotation_id if isinstance(rotation_id, str) else None,
            version=version,
            metadata=custom,
        )

    def write(self, path: str, key: NewKey, metadata: Mapping[str, str], cas: int) -> int:
        payload = {ACCESS_KEY_FIELD: key.access_key_id, SECRET_KEY_FIELD: key.secret_access_key}
        return self._write_data(path, payload, metadata, cas)

    def write_password(
        self,
        path: str,
        password: str,
        rotation_id: str,
        metadata: Mapping[str, str],
        cas: int,
    ) -> int:
        payload = {PASSWORD_FIELD: password, ROTATION_ID_FIELD: rotation_id}
        return self._write_data(path, payload, metadata, cas)

    def _read_data(self, path: str) -> tuple[dict[str, Any], int, dict[str, str]] | None:
        """The latest version's data, number and the path's custom metadata; None when
        nothing (or a deleted version) is there."""
        resource = f"{self.mount}/data/{path}"

        def op() -> Any:
            try:
                return self._client.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=self.mount, raise_on_deleted_version=True
                )
            except hvac.exceptions.InvalidPath as exc:
                # KV v2 answers 404 both for "no such secret" (errors: []) and for a
                # deleted/destroyed latest version (a body with metadata, no errors).
                # A 404 *with* an error ("no handler for route") is a missing mount:
                # that must not read as "no secret here".
                if _vault_errors(exc):
                    raise
                return None

        try:
            resp = self._call(op, action="vault:read", resource=resource)
        except NotFound as exc:
            # Only a 404 with an error gets here: no KV engine answers at the mount.
            raise ConfigError([f"vault.mount: {self.mount!r}: {exc}"]) from exc
        if not isinstance(resp, dict):
            return None
        body = resp.get("data") or {}
        data = body.get("data")
        meta = body.get("metadata") or {}
        if data is None:
            return None
        version = int(meta.get("version") or 0)
        custom = meta.get("custom_metadata") or {}
        return (
            data if isinstance(data, dict) else {},
            version,
            {str(k): str(v) for k, v in custom.items()},
        )

    def _write_data(
        self, path: str, payload: Mapping[str, str], metadata: Mapping[str, str], cas: int
    ) -> int:
        resource = f"{self.mount}/data/{path}"

        def op() -> Any:
            try:
                return self._client.secrets.kv.v2.create_or_update_secret(
                    path=path, secret=payload, cas=cas, mount_point=self.mount
                )
            except hvac.exceptions.InvalidRequest as exc:
                if _CAS_MISMATCH in _vault_errors(exc):
                    conflict = CasConflict(
                        f"Vault secret {resource} is no longer at version {cas}: "
                        "someone else wrote it"
                    )
                    raise _refused(conflict) from exc
                raise

        resp = self._call(op, action="vault:create/update", resource=resource)
        try:
            version = int(resp["data"]["version"])
        except (KeyError, TypeError, ValueError) as exc:
            # A KV v1 mount accepts the same request with 204 and stores the payload
            # under a literal "data/..." key: the mount is not what we were told.
            raise ConfigError(
                [f"vault.mount: {self.mount!r} did not answer as a KV version 2 engine"]
            ) from exc
        self._set_custom_metadata(path, version, metadata)
        return version

    def check(self) -> None:
        self._check_health()
        self._ensure_token()
        version = self.kv_version()
        if version is not None and version != 2:
            raise ConfigError([f"vault.mount: {self.mount!r} is KV version {version}, not 2"])

    # ---- extras

    def kv_version(self) -> int | None:
        """The KV version of the mount, or None when this token may not see it.

        Uses `sys/internal/ui/mounts/<mount>` (what the Vault CLI uses for the same
        question): unlike `sys/mounts`, any token with a capability under the mount
        may read it. Vault answers 403 both for "no access" and "no such mount".
        """
        resource = f"sys/internal/ui/mounts/{self.mount}"
        try:
            resp = self._call(
                lambda: self._client.adapter.get(f"/v1/{resource}"),
                action="vault:read",
                resource=resource,
            )
        except PermissionDenied:
            log.info("vault.mount_version_unknown", mount=self.mount)
            return None
        data = resp.get("data") if isinstance(resp, dict) else None
        if not isinstance(data, dict):
            return None
        if data.get("type") not in ("kv", "generic"):
            raise ConfigError(
                [f"vault.mount: {self.mount!r} is a {data.get('type')!r} engine, not KV"]
            )
        options = data.get("options") or {}
        return int(options.get("version") or 1)

    def close(self) -> None:
        self._client.adapter.close()
        self._login_client.adapter.close()

    # ---- internals

    def current_version(self, path: str) -> int:
        """`current_version` from the path's metadata: a deleted latest version still
        counts for check-and-set, although `read` shows nothing there."""
        resource = f"{self.mount}/metadata/{path}"

        def op() -> Any:
            try:
                return self._client.secrets.kv.v2.read_secret_metadata(
                    path=path, mount_point=self.mount
                )
            except hvac.exceptions.InvalidPath as exc:
                if _vault_errors(exc):
                    raise  # a missing mount, not a missing secret
                return None

        resp = self._call(op, action="vault:read", resource=resource)
        data = resp.get("data") if isinstance(resp, dict) else None
        if not isinstance(data, dict):
            return 0
        try:
            return int(data.get("current_version") or 0)
        except (TypeError, ValueError):
            return 0

    def set_metadata(self, path: str, metadata: Mapping[str, str]) -> None:
        """Replace the custom metadata at `path` (a repair when a write's second call was
        lost). Raises like every other call."""
        resource = f"{self.mount}/metadata/{path}"
        custom = {str(k): str(v) for k, v in metadata.items()}
        self._call(
            lambda: self._client.secrets.kv.v2.update_metadata(
                path=path, custom_metadata=custom, mount_point=self.mount
            ),
            action="vault:update",
            resource=resource,
        )

    def _set_custom_metadata(self, path: str, version: int, metadata: Mapping[str, str]) -> None:
        """Custom metadata lives on the path, not the version, so it can only be set
        after the CAS write. The data write is the commitment: if this second call
        fails, the key *is* stored, and raising would invite the caller to delete a
        key that consumers may already be reading. It is logged instead, and the engine
        repairs it when it verifies the key."""
        try:
            self.set_metadata(path, metadata)
        except RotatorError as exc:
            log.warning(
                "vault.custom_metadata_failed",
                path=path,
                version=version,
                error=str(exc),
            )

    def _check_health(self) -> None:
        # standbyok: a standby forwards requests to the active node, so it is usable.
        try:
            resp = self._client.sys.read_health_status(method="GET", standby_ok=True)
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise _translate(exc, self.url, "vault:read", "sys/health") from exc
        if isinstance(resp, dict):
            if resp.get("sealed"):
                raise BackendUnavailable(f"Vault at {self.url} is sealed")
            return
        status = getattr(resp, "status_code", 0)
        if status == 503:
            raise BackendUnavailable(f"Vault at {self.url} is sealed")
        if status == 501:
            raise BackendUnavailable(f"Vault at {self.url} is not initialized")
        if status == 473:
            return  # a performance standby: it serves reads and forwards writes
        if status == 472:
            raise BackendUnavailable(
                f"Vault at {self.url} is a disaster-recovery secondary, which serves no "
                "secrets: point vault.url at the primary cluster"
            )
        raise Transient(f"Vault at {self.url} reports health status {status}")

    def _call(self, op: Callable[[], T], *, action: str, resource: str) -> T:
        """Run `op` with a live token; translate errors. A 403 caused by a dead token
        (not by policy) gets one fresh token and one retry."""
        for attempt in (1, 2):
            token = self._ensure_token()
            try:
                return op()
            except hvac.exceptions.Forbidden as exc:
                verdict = self._after_refusal(token) if attempt == 1 else "policy"
                if verdict == "retry":
                    continue
                detail = "the Vault token is invalid or expired" if verdict == "dead" else ""
                raise _refused(PermissionDenied(action, resource, detail)) from exc
            except (hvac.exceptions.VaultError, requests.RequestException) as exc:
                raise _translate(exc, self.url, action, resource) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _ensure_token(self) -> str:
        """Install a token from the auth method, look it up once, renew it when 2/3
        of its TTL has passed, replace it when it has expired. Returns the token in use."""
        with self._lock:
            token = self._auth.token(self._login_client)
            if token != self._token or self._lifetime is None:
                if not self._adopt(token):
                    fresh = self._auth.token(self._login_client, force=True)
                    if fresh == token or not self._adopt(fresh):
                        self._dead_token()
                assert self._token is not None
                return self._token
            now = self._clock()
            life = self._lifetime
            if life.expires_at is not None and now >= life.expires_at:
                # Nothing new from the auth method (a static token, or a file that
                # Vault Agent renews in place): learn the token's real lifetime again.
                if not self._refresh("expired") and not self._adopt(token):
                    self._dead_token()
            elif life.renew_at is not None and now >= life.renew_at:
                self._renew()
            assert self._token is not None
            return self._token

    def _adopt(self, token: str) -> bool:
        """Use `token` from now on and learn its lifetime; False when Vault refuses it."""
        self._token = token
        self._client.token = token
        self._lifetime = None
        try:
            resp = self._client.auth.token.lookup_self()
        except hvac.exceptions.Forbidden:
            return False
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise _translate(exc, self.url, "vault:read", "auth/token/lookup-self") from exc
        data = (resp.get("data") or {}) if isinstance(resp, dict) else {}
        # Never keep or log `data`: lookup-self echoes the token itself in `id`.
        ttl = int(data.get("ttl") or 0)
        total = max(int(data.get("creation_ttl") or 0), ttl)
        self._lifetime = self._lifetime_from(ttl, total, bool(data.get("renewable")))
        return True

    def _lifetime_from(self, ttl: int, total: int, renewable: bool) -> _Lifetime:
        if ttl <= 0:
            # ttl 0: a token that never expires (root, or no TTL); nothing to renew.
            return _Lifetime(expires_at=None, renew_at=None)
        now = self._clock()
        expires_at = now + timedelta(seconds=ttl)
        renew_at = expires_at - timedelta(seconds=total / 3) if renewable else None
        return _Lifetime(expires_at=expires_at, renew_at=renew_at)

    def _renew(self) -> None:
        assert self._lifetime is not None
        old_expiry = self._lifetime.expires_at
        try:
            resp = self._client.auth.token.renew_self()
        except hvac.exceptions.Forbidden:
            # The token died before we renewed it (revoked, or past its max TTL), or
            # its policy lacks renew-self. Either way, stop asking.
            if not self._refresh("renewal refused"):
                self._lifetime = replace(self._lifetime, renew_at=None)
            return
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise _translate(exc, self.url, "vault:update", "auth/token/renew-self") from exc
        auth = (resp.get("auth") or {}) if isinstance(resp, dict) else {}
        lease = int(auth.get("lease_duration") or 0)
        self._lifetime = self._lifetime_from(lease, lease, bool(auth.get("renewable")))
        new_expiry = self._lifetime.expires_at
        log.info("vault.token_renewed", ttl_seconds=lease)
        extended = new_expiry is not None and (
            old_expiry is None or new_expiry > old_expiry + timedelta(seconds=1)
        )
        # A renewal that does not extend the token means it has reached its max TTL:
        # get a new one now if the auth method can; otherwise stop asking and run it out.
        if not extended and not self._refresh("max TTL reached"):
            self._lifetime = _Lifetime(expires_at=new_expiry, renew_at=None)

    def _refresh(self, why: str) -> bool:
        """Ask the auth method for a new token; True when a different, valid one is in use."""
        fresh = self._auth.token(self._login_client, force=True)
        if fresh == self._token:
            return False
        if not self._adopt(fresh):
            self._dead_token()
        log.info("vault.token_replaced", reason=why)
        return True

    def _after_refusal(self, refused: str) -> str:
        """After a 403, decide: "retry" (the token was dead and a new one is in use),
        "dead" (the token is dead and cannot be replaced) or "policy" (the token is
        fine; its policy forbids the action). Vault says just "permission denied" in
        all cases, so ask it whether the token itself is still alive."""
        with self._lock:
            if self._token != refused:
                return "retry"  # another thread replaced it meanwhile
            try:
                self._client.auth.token.lookup_self()
            except hvac.exceptions.Forbidden:
                return "retry" if self._refresh("token refused") else "dead"
            except (hvac.exceptions.VaultError, requests.RequestException):
                return "policy"
            return "policy"

    def _dead_token(self) -> NoReturn:
        self._lifetime = None
        # Vault refused the token: the call it was for is not sent, or was refused.
        raise _refused(
            PermissionDenied(
                "vault:read",
                "auth/token/lookup-self",
                "the Vault token is invalid or expired (or lacks the default policy)",
            )
        )
