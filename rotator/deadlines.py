"""How long one backend call may take in total, from the timeouts it is configured with.

A rotation's side effects (deactivate, delete, create, a Vault write) run under a lease.
The engine starts one only when the lease has at least `call_deadline` left, so a call
that is still running when the lease would end is impossible by construction, not by
luck. These formulas are the one definition of that deadline: the adapters build their
clients from the same numbers, and the configuration check uses them to refuse a lease
too short to cover a call.
"""

from __future__ import annotations

from datetime import timedelta

# IAM writes (UpdateAccessKey, DeleteAccessKey) are idempotent and retried this often
# in all; CreateAccessKey is sent once (it is not idempotent).
IAM_WRITE_ATTEMPTS = 3
# botocore's "standard" retry mode sleeps a random fraction of 2**n seconds (n = 1, 2, …)
# between attempts; the worst case for two retries is 2 + 4 seconds.
_IAM_BACKOFF = timedelta(seconds=6)
# A connection either opens within this or not at all on a healthy network.
_IAM_CONNECT_TIMEOUT = timedelta(seconds=5)
# One Vault write is at most: a token look-up or renewal, a second one after a refusal,
# the data write and the custom-metadata write; each request has its own timeout (for
# connecting and again for reading).
_VAULT_REQUESTS_PER_WRITE = 4


def iam_connect_timeout(call_timeout: timedelta) -> timedelta:
    """The connect timeout of an IAM write: 5s, or the read timeout when that is shorter."""
    return min(_IAM_CONNECT_TIMEOUT, call_timeout)


def iam_call_deadline(call_timeout: timedelta) -> timedelta:
    """The longest an IAM write may take: every attempt's connect and read timeouts
    plus the retry pauses between them."""
    per_attempt = iam_connect_timeout(call_timeout) + call_timeout
    return IAM_WRITE_ATTEMPTS * per_attempt + _IAM_BACKOFF


def iam_create_deadline(call_timeout: timedelta) -> timedelta:
    """The longest CreateAccessKey may take: it is sent once, never retried."""
    return iam_connect_timeout(call_timeout) + call_timeout


def vault_call_deadline(timeout: timedelta) -> timedelta:
    """The longest a Vault write (with its token bookkeeping) may take."""
    return _VAULT_REQUESTS_PER_WRITE * 2 * timeout


def call_deadline(aws_call_timeout: timedelta, vault_timeout: timedelta) -> timedelta:
    """The deadline the engine keeps free on its lease before any side effect."""
    return max(iam_call_deadline(aws_call_timeout), vault_call_deadline(vault_timeout))


def lease_problem(
    lease_ttl: timedelta, aws_call_timeout: timedelta, vault_timeout: timedelta
) -> str | None:
    """Why `lease_ttl` cannot cover a call (None when it can). A lease must hold two
    deadlines: one for the call in flight and one of margin to renew it in time."""
    need = 2 * call_deadline(aws_call_timeout, vault_timeout)
    if lease_ttl >= need:
        return None
    return (
        f"{_seconds(lease_ttl)} cannot cover a backend call: it must be at least twice the "
        f"longest call deadline ({_seconds(need)} with aws.call_timeout "
        f"{_seconds(aws_call_timeout)} and vault.timeout {_seconds(vault_timeout)})"
    )


def _seconds(value: timedelta) -> str:
    return f"{value.total_seconds():g}s"
