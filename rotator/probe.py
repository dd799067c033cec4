"""Readiness probes the daemon runs itself, with the standard library only.

The daemon does not load hvac (its jobs run in worker processes), so `/readyz` asks
Vault's unauthenticated `sys/health` endpoint directly: is Vault reachable, initialised
and unsealed. Whether the token may read and write the mount is what the `check` worker
and every scan find out; they report it, and `/readyz` shows it in its vault check. A
Vault that cannot be used makes the daemon degraded, never unready: containing a leaked
key needs IAM only.
"""

from __future__ import annotations

import os
import ssl
import urllib.error
import urllib.request

# sys/health answers with a status code per condition (Vault API documentation).
_HEALTH = {
    200: "ok",  # initialised, unsealed, active
    429: "ok",  # unsealed standby
    472: "ok",  # disaster-recovery secondary, active
    473: "ok",  # performance standby
    501: "not initialised",
    503: "sealed",
}


def vault_health(url: str, timeout: float = 3.0) -> str:
    """ "ok", or why Vault at `url` cannot serve. TLS is verified against the system
    store, or the bundle in VAULT_CACERT when set (as the Vault CLI does)."""
    target = url.rstrip("/") + "/v1/sys/health"
    context = ssl.create_default_context(cafile=os.environ.get("VAULT_CACERT") or None)
    try:
        with urllib.request.urlopen(target, timeout=timeout, context=context) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"vault unreachable at {url}: {reason}"
    return _HEALTH.get(status, f"vault answered HTTP {status} on sys/health")
