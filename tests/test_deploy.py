"""Deployment files under deploy/: the IAM and Vault policies against what the code
really calls, the systemd units, the Kubernetes manifests, the container file and cron."""

from __future__ import annotations

import ast
import fcntl
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
import botocore
import botocore.session
import pytest
import yaml

from rotator.config import DEFAULT_CONFIG_PATH, HttpSettings, StateSettings, parse_settings
from rotator.model import NewKey
from rotator.outcome import ExitCode
from rotator.sandbox import LocalAws, LocalVault
from rotator.vault import AppRoleAuth, VaultStore

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
AWS_MODULE = ROOT / "rotator" / "aws.py"
IAM_DIR = DEPLOY / "iam"
SYSTEMD_DIR = DEPLOY / "systemd"
K8S_DIR = DEPLOY / "kubernetes"

# Attributes of a boto3 client that are not API operations.
_CLIENT_HELPERS = frozenset(
    {"meta", "exceptions", "get_paginator", "get_waiter", "can_paginate", "close"}
)
# Needs no permission, and no policy can deny it (AWS documents this for the action).
_NO_PERMISSION_NEEDED = frozenset({"sts:GetCallerIdentity"})
# Where a call to each service other than IAM must be granted.
_OPTIONAL_POLICY_FOR = {
    "sts": "rotator-assume-role-policy.json",
    "organizations": "rotator-assume-role-policy.json",
    "sqs": "rotator-leaks-policy.json",
    "sns": "rotator-leaks-policy.json",
    "ses": "rotator-policy.json",  # owner warnings by email (notify.email)
}


# --- IAM: the actions the code calls, read from rotator/aws.py ---------------------------


def _bound_name(node: ast.AST) -> str | None:
    """`self._iam` -> "_iam", `client` -> "client", anything else -> None."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def _client_services(tree: ast.AST) -> dict[str, str]:
    """Names bound to boto3 clients: `self._iam = self._client("iam", ...)` or
    `client = session.client("sts", ...)` give {"_iam": "iam", "client": "sts"}."""
    clients: dict[str, str] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        call = node.value
        func = call.func
        maker = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if maker not in ("_client", "client") or not call.args:
            continue
        first = call.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            for target in node.targets:
                name = _bound_name(target)
                if name is not None:
                    clients[name] = first.value
    return clients


def _called_methods(tree: ast.AST, clients: dict[str, str]) -> set[tuple[str, str]]:
    """(service, snake_case method) for every operation used on a client: a call or a
    bound method passed along (`self._do(..., self._iam.generate_credential_report)`),
    and every `get_paginator("<operation>")`."""
    found: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            service = clients.get(_bound_name(node.value) or "")
            if service is not None and node.attr not in _CLIENT_HELPERS:
                found.add((service, node.attr))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get_paginator"
        ):
            service = clients.get(_bound_name(node.func.value) or "")
            arg = node.args[0] if node.args else None
            assert service is not None, f"get_paginator on an unknown client: {ast.unparse(node)}"
            assert isinstance(arg, ast.Constant), f"paginator name is not a literal: {arg}"
            found.add((service, str(arg.value)))
    return found


def _action(service: str, method: str) -> str:
    """boto3's snake_case method as the IAM action name, e.g. iam:ListAccessKeys."""
    model = botocore.session.get_session().get_service_model(service)
    by_method = {botocore.xform_name(op): op for op in model.operation_names}
    assert method in by_method, f"{service}.{method} is not an operation of {service}"
    return f"{model.signing_name}:{by_method[method]}"


@pytest.fixture(scope="module")
def code_actions() -> set[str]:
    """Every AWS action rotator/aws.py calls, derived from its source."""
    tree = ast.parse(AWS_MODULE.read_text(encoding="utf-8"))
    clients = _client_services(tree)
    return {_action(service, method) for service, method in _called_methods(tree, clients)}


def _statements(path: Path) -> list[dict[str, Any]]:
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["Version"] == "2012-10-17"
    statements: list[dict[str, Any]] = document["Statement"]
    return statements


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _allowed_actions(path: Path) -> set[str]:
    return {
        action
        for statement in _statements(path)
        if statement["Effect"] == "Allow"
        for action in _as_list(statement["Action"])
    }


def test_code_action_parser_sees_the_calls_aws_py_is_known_to_make(code_actions: set[str]) -> None:
    """The source parser finds direct calls, bound-method references, paginators and the
    once-only client, so an empty or partial result cannot pass the policy checks."""
    assert {
        "iam:CreateAccessKey",  # self._iam_once.create_access_key(...)
        "iam:GenerateCredentialReport",  # passed as self._iam.generate_credential_report
        "iam:GetAccountAuthorizationDetails",  # a paginator
        "iam:ListAccessKeys",
        "sts:GetCallerIdentity",  # on a client built inside a method
    } <= code_actions


def test_iam_policy_grants_every_iam_action_the_code_calls(code_actions: set[str]) -> None:
    """Each IAM operation called in rotator/aws.py is allowed by rotator-policy.json: a
    call added to the code without a policy update fails here."""
    granted = _allowed_actions(IAM_DIR / "rotator-policy.json")
    called = {a for a in code_actions if a.startswith("iam:")}
    assert sorted(called - granted) == []


def test_iam_policy_grants_no_iam_action_the_code_does_not_call(code_actions: set[str]) -> None:
    """rotator-policy.json is least privilege: it allows nothing rotator/aws.py never calls."""
    granted = _allowed_actions(IAM_DIR / "rotator-policy.json")
    assert sorted(granted - code_actions) == []


def test_iam_writes_are_limited_to_users_and_account_reads_are_the_only_star_resources() -> None:
    """Key and console password writes apply to IAM users only; "*" is used only for the
    account-wide reads that support no resource ARN."""
    account_wide = {
        "iam:GetAccountAuthorizationDetails",
        "iam:GenerateCredentialReport",
        "iam:GetCredentialReport",
        "iam:GetAccountPasswordPolicy",
    }
    for statement in _statements(IAM_DIR / "rotator-policy.json"):
        actions = set(_as_list(statement["Action"]))
        resources = _as_list(statement["Resource"])
        if "*" in resources:
            assert actions <= account_wide, statement["Sid"]
        elif actions == {"ses:SendEmail"}:
            assert resources == ["arn:aws:ses:*:*:identity/*"], statement["Sid"]
        else:
            assert resources == ["arn:aws:iam::*:user/*"], statement["Sid"]
    writes = {
        "iam:CreateAccessKey",
        "iam:UpdateAccessKey",
        "iam:DeleteAccessKey",
        "iam:UpdateLoginProfile",
        "iam:CreateLoginProfile",
    }
    assert writes <= _allowed_actions(IAM_DIR / "rotator-policy.json")


def test_no_policy_file_grants_a_wildcard_action() -> None:
    """No action in any deploy/iam policy contains "*", and none uses NotAction."""
    files = sorted(IAM_DIR.glob("*.json"))
    assert len(files) == 4
    for path in files:
        for statement in _statements(path):
            assert "NotAction" not in statement, path.name
            for action in _as_list(statement["Action"]):
                assert "*" not in action, f"{path.name}: {action}"
                assert re.fullmatch(r"[a-z0-9-]+:[A-Za-z0-9]+", action), f"{path.name}: {action}"


def test_calls_outside_iam_are_in_the_optional_policies_and_get_caller_identity_in_none(
    code_actions: set[str],
) -> None:
    """sts:GetCallerIdentity (called, needs no permission) is listed nowhere and the IAM
    README says why; any other non-IAM call must be in its optional policy file."""
    assert "sts:GetCallerIdentity" in code_actions
    every_file = {a for p in IAM_DIR.glob("*.json") for a in _allowed_actions(p)}
    assert not _NO_PERMISSION_NEEDED & every_file
    readme = (IAM_DIR / "README.md").read_text(encoding="utf-8")
    assert "`sts:GetCallerIdentity`" in readme
    assert "needs no permission" in readme
    for action in sorted(code_actions - _NO_PERMISSION_NEEDED):
        service = action.split(":")[0]
        if service == "iam":
            continue
        assert service in _OPTIONAL_POLICY_FOR, f"no policy file covers {action}"
        assert action in _allowed_actions(IAM_DIR / _OPTIONAL_POLICY_FOR[service])


def test_optional_policies_grant_the_leak_queue_topic_and_assume_role_actions() -> None:
    """The leaks policy allows the SQS polling and SNS publishing the daemon does; the
    multi-account policy allows assuming the rotator role and listing accounts; the trust
    policy demands an external id."""
    assert _allowed_actions(IAM_DIR / "rotator-leaks-policy.json") == {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
        "sns:Publish",
    }
    assume = _statements(IAM_DIR / "rotator-assume-role-policy.json")
    by_action = {a: s for s in assume for a in _as_list(s["Action"])}
    assert set(by_action) == {"sts:AssumeRole", "organizations:ListAccounts"}
    assert by_action["sts:AssumeRole"]["Resource"] == "arn:aws:iam::*:role/rotator"
    (trust,) = _statements(IAM_DIR / "target-account-trust-policy.json")
    assert trust["Action"] == "sts:AssumeRole"
    assert trust["Condition"]["StringEquals"]["sts:ExternalId"]
    assert "111122223333" in trust["Principal"]["AWS"]


def test_policy_documents_are_accepted_by_an_iam_endpoint(aws: LocalAws) -> None:
    """Each permission policy is a valid IAM policy document and the trust policy a valid
    trust policy, as the (moto) IAM API's validation judges them."""
    iam = boto3.client("iam", endpoint_url=aws.endpoint_url, region_name="us-east-1")
    suffix = uuid.uuid4().hex[:8]
    for name in ("rotator-policy", "rotator-leaks-policy", "rotator-assume-role-policy"):
        text = (IAM_DIR / f"{name}.json").read_text(encoding="utf-8")
        created = iam.create_policy(PolicyName=f"{name}-{suffix}", PolicyDocument=text)
        assert created["Policy"]["Arn"].endswith(f"{name}-{suffix}")
    trust = (IAM_DIR / "target-account-trust-policy.json").read_text(encoding="utf-8")
    role = iam.create_role(RoleName=f"rotator-{suffix}", AssumeRolePolicyDocument=trust)
    assert role["Role"]["RoleName"] == f"rotator-{suffix}"
    # The same endpoint refuses a malformed document, so the acceptance above means something.
    broken = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow"}]})
    with pytest.raises(iam.exceptions.MalformedPolicyDocumentException):
        iam.create_policy(PolicyName=f"broken-{suffix}", PolicyDocument=broken)


# --- Vault --------------------------------------------------------------------------------

_HCL_PATH = re.compile(r'path\s+"([^"]+)"\s*\{\s*capabilities\s*=\s*\[([^\]]*)\]\s*\}', re.S)


def _hcl_rules(path: Path) -> dict[str, set[str]]:
    """path -> capabilities of a Vault policy written as `path "…" { capabilities = […] }`
    blocks (comments aside, nothing else may appear in the file)."""
    text = "\n".join(
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if not line.lstrip().startswith("#")
    )
    rules = {
        m.group(1): set(re.findall(r'"([a-z]+)"', m.group(2))) for m in _HCL_PATH.finditer(text)
    }
    leftover = _HCL_PATH.sub("", text).strip()
    assert leftover == "", f"{path.name}: unparsed policy text {leftover[:80]!r}"
    return rules


def _default_secret_path(user_name: str) -> tuple[str, str]:
    """(mount, path inside it) of a user's secret under the default configuration."""
    vault = parse_settings(None, {"VAULT_TOKEN": "unused"}).vault
    return vault.mount, vault.secret_path("111122223333", user_name)


def test_vault_policy_covers_the_default_kv_paths_and_grants_no_delete_destroy_or_sudo() -> None:
    """rotator-policy.hcl gives create/read/update on the data and metadata paths of the
    default mount and template, and no delete, destroy or sudo anywhere."""
    rules = _hcl_rules(DEPLOY / "vault" / "rotator-policy.hcl")
    mount, path = _default_secret_path("alice")
    top = path.split("/")[0]
    assert rules[f"{mount}/data/{top}/*"] == {"create", "read", "update"}
    assert rules[f"{mount}/metadata/{top}/*"] == {"create", "read", "update"}
    assert rules["auth/token/lookup-self"] == {"read"}
    assert rules["auth/token/renew-self"] == {"update"}
    assert rules[f"sys/internal/ui/mounts/{mount}"] == {"read"}
    for rule_path, capabilities in rules.items():
        assert not capabilities & {"delete", "destroy", "sudo"}, rule_path
        assert not re.match(rf"{mount}/(delete|destroy|undelete)/", rule_path), rule_path


def _capabilities(server: LocalVault, token: str, paths: list[str]) -> dict[str, set[str]]:
    answer = server.request("POST", "/v1/sys/capabilities", {"token": token, "paths": paths})
    return {p: set(answer[p]) for p in paths}


def test_vault_policy_alone_lets_the_adapter_check_store_and_read_via_approle(
    local_vault: LocalVault, tmp_path: Path
) -> None:
    """With only rotator-policy.hcl (no default policy), an AppRole set up as the Vault
    README says logs in, passes the mount check, writes two CAS versions with custom
    metadata and reads them back; delete and destroy stay denied."""
    suffix = uuid.uuid4().hex[:8]
    policy = f"rotator-{suffix}"
    hcl = (DEPLOY / "vault" / "rotator-policy.hcl").read_text(encoding="utf-8")
    local_vault.request("PUT", f"/v1/sys/policies/acl/{policy}", {"policy": hcl})
    auth_mount = f"approle-{suffix}"
    local_vault.request("POST", f"/v1/sys/auth/{auth_mount}", {"type": "approle"})
    role = f"/v1/auth/{auth_mount}/role/rotator"
    local_vault.request(
        "POST",
        role,
        {
            "token_policies": [policy],
            "token_no_default_policy": True,
            "token_ttl": "1h",
            "token_max_ttl": "24h",
            "secret_id_ttl": "720h",
            "secret_id_num_uses": 0,
        },
    )
    role_id = local_vault.request("GET", f"{role}/role-id")["data"]["role_id"]
    secret_id = local_vault.request("POST", f"{role}/secret-id", {})["data"]["secret_id"]
    secret_file = tmp_path / "vault-secret-id"
    secret_file.write_text(secret_id + "\n", encoding="utf-8")
    secret_file.chmod(0o600)

    # The dev server's "secret/" is KV version 2, like the default vault.mount.
    defaults = parse_settings(None, {"VAULT_TOKEN": "unused"}).vault
    mount = defaults.mount
    auth = AppRoleAuth(role_id, secret_file, mount_point=auth_mount)
    store = VaultStore(local_vault.addr, defaults.mount, defaults.path_template, auth, timeout=5)
    try:
        store.check()
        assert store.kv_version() == 2
        path = store.path_for("111122223333", f"deploy-{suffix}")
        meta = {"access_key_id": "AKIAEXAMPLE1", "rotation_id": "r1", "rotated_at": "now"}
        assert store.write(path, NewKey("AKIAEXAMPLE1", "s1-" + suffix), meta, cas=0) == 1
        assert store.write(path, NewKey("AKIAEXAMPLE2", "s2-" + suffix), meta, cas=1) == 2
        stored = store.read(path)
        assert stored is not None
        assert (stored.access_key_id, stored.version) == ("AKIAEXAMPLE2", 2)
        assert stored.metadata == meta
        token = auth.token(None)
    finally:
        store.close()

    got = _capabilities(
        local_vault,
        token,
        [
            f"{mount}/data/{path}",
            f"{mount}/metadata/{path}",
            f"{mount}/delete/{path}",
            f"{mount}/destroy/{path}",
            "auth/token/renew-self",
            "sys/policies/acl/anything",
        ],
    )
    assert got[f"{mount}/data/{path}"] == {"create", "read", "update"}
    assert got[f"{mount}/metadata/{path}"] == {"create", "read", "update"}
    assert got["auth/token/renew-self"] == {"update"}
    for denied in (
        f"{mount}/delete/{path}",
        f"{mount}/destroy/{path}",
        "sys/policies/acl/anything",
    ):
        assert got[denied] == {"deny"}, denied


def test_consumer_policy_reads_its_own_user_secret_and_nothing_else(
    local_vault: LocalVault,
) -> None:
    """A token with consumer-policy.hcl may read app-deployer's key, not write it, and not
    read another user's key."""
    rules = _hcl_rules(DEPLOY / "vault" / "consumer-policy.hcl")
    assert rules
    assert all(capabilities == {"read"} for capabilities in rules.values())
    name = f"consumer-{uuid.uuid4().hex[:8]}"
    hcl = (DEPLOY / "vault" / "consumer-policy.hcl").read_text(encoding="utf-8")
    local_vault.request("PUT", f"/v1/sys/policies/acl/{name}", {"policy": hcl})
    created = local_vault.request(
        "POST", "/v1/auth/token/create", {"policies": [name], "no_default_policy": True}
    )
    token = created["auth"]["client_token"]
    mount, own = _default_secret_path("app-deployer")
    _, other = _default_secret_path("someone-else")
    got = _capabilities(local_vault, token, [f"{mount}/data/{own}", f"{mount}/data/{other}"])
    assert got[f"{mount}/data/{own}"] == {"read"}
    assert got[f"{mount}/data/{other}"] == {"deny"}


def test_console_reader_policy_reads_one_users_console_password_and_not_its_key(
    local_vault: LocalVault,
) -> None:
    """A token with console-reader-policy.hcl may read break-glass-admin's console
    password at the default console path, not write it, and read neither that user's
    access key nor another user's console password."""
    rules = _hcl_rules(DEPLOY / "vault" / "console-reader-policy.hcl")
    assert rules
    assert all(capabilities == {"read"} for capabilities in rules.values())
    name = f"console-{uuid.uuid4().hex[:8]}"
    hcl = (DEPLOY / "vault" / "console-reader-policy.hcl").read_text(encoding="utf-8")
    local_vault.request("PUT", f"/v1/sys/policies/acl/{name}", {"policy": hcl})
    created = local_vault.request(
        "POST", "/v1/auth/token/create", {"policies": [name], "no_default_policy": True}
    )
    token = created["auth"]["client_token"]
    mount, key_path = _default_secret_path("break-glass-admin")
    template = parse_settings(None, {"VAULT_TOKEN": "unused"}).vault.console_path_template
    console = f"{mount}/data/" + template.format(
        account_id="111122223333", user_name="break-glass-admin"
    )
    other = f"{mount}/data/" + template.format(account_id="111122223333", user_name="someone-else")
    got = _capabilities(local_vault, token, [console, f"{mount}/data/{key_path}", other])
    assert got[console] == {"read"}
    assert got[f"{mount}/data/{key_path}"] == {"deny"}
    assert got[other] == {"deny"}


# --- systemd ------------------------------------------------------------------------------

UNIT_FILES = ("rotator.service", "rotator-once.service", "rotator-once.timer")


def _unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """Section -> (key, value) pairs in order; repeated keys kept (unlike configparser)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in (SYSTEMD_DIR / name).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{name}: {line!r} is not key=value"
        current.append((key.strip(), value.strip()))
    return sections


def _one(pairs: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in pairs if k == key]
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


_HARDENING = (
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "NoNewPrivileges",
    "RestrictAddressFamilies",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "RestrictNamespaces",
    "LockPersonality",
    "MemoryDenyWriteExecute",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "SystemCallArchitectures",
    "SystemCallFilter",
    "CapabilityBoundingSet",
    "UMask",
    "DynamicUser",
    "User",
    "StateDirectory",
    "StateDirectoryMode",
    "ConfigurationDirectory",
)


def test_daemon_unit_is_a_hardened_notify_service_with_the_secret_id_as_a_credential() -> None:
    """rotator.service: Type=notify with a watchdog, the daemon command, SIGHUP reload, a
    dynamic user with a private state directory, no capabilities, and the secret id passed
    with LoadCredential= whose literal path the comments give."""
    service = _unit("rotator.service")["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/usr/local/bin/rotator --log-format json daemon",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "60",
        "Restart": "on-failure",
        "TimeoutStopSec": "30",
        "DynamicUser": "yes",
        "StateDirectory": "rotator",
        "StateDirectoryMode": "0700",
        "ConfigurationDirectory": "rotator",
        "ProtectSystem": "strict",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "MemoryDenyWriteExecute": "yes",
        "LoadCredential": "vault-secret-id:/etc/rotator/vault-secret-id",
    }
    for key, value in expected.items():
        assert _one(service, key) == value, key
    environment = [v for k, v in service if k == "Environment"]
    assert f"ROTATOR_CONFIG={DEFAULT_CONFIG_PATH}" in environment
    assert ("SystemCallFilter", "@system-service") in service
    assert _one(_unit("rotator.service")["Install"], "WantedBy") == "multi-user.target"
    text = (SYSTEMD_DIR / "rotator.service").read_text(encoding="utf-8")
    assert "secret_id_file: /run/credentials/rotator.service/vault-secret-id" in text
    assert StateSettings().path.parent == PurePosixPath("/var/lib/rotator")


def test_once_unit_runs_one_hardened_pass_and_counts_exit_4_as_success() -> None:
    """rotator-once.service is a oneshot `run --once` with the same sandbox as the daemon;
    its only extra success status is 4 (still BLOCKED/FAILED, reported earlier), so a pass
    that needs attention (1), bad configuration (2) or a backend outage (3) still shows
    as a failed unit; the timer fires hourly, persistently, for that service."""
    daemon = _unit("rotator.service")["Service"]
    once = _unit("rotator-once.service")["Service"]
    assert _one(once, "Type") == "oneshot"
    assert _one(once, "ExecStart") == "/usr/local/bin/rotator --log-format json run --once"
    assert _one(once, "SuccessExitStatus").split() == [str(int(ExitCode.UNRESOLVED))]
    for key in _HARDENING:
        assert [v for k, v in once if k == key] == [v for k, v in daemon if k == key], key
    timer = _unit("rotator-once.timer")
    assert _one(timer["Timer"], "OnCalendar") == "hourly"
    assert _one(timer["Timer"], "RandomizedDelaySec") == "5m"
    assert _one(timer["Timer"], "Persistent") == "true"
    assert (SYSTEMD_DIR / _one(timer["Timer"], "Unit")).is_file()
    assert _one(timer["Install"], "WantedBy") == "timers.target"


def _require_systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    return tool


@pytest.fixture
def runnable_units(tmp_path: Path) -> Path:
    """The units copied to a temporary directory, with ExecStart pointing at this
    interpreter (`python -m rotator`), since verify checks that the binary exists."""
    for name in UNIT_FILES:
        text = (SYSTEMD_DIR / name).read_text(encoding="utf-8")
        text = text.replace("/usr/local/bin/rotator", f"{sys.executable} -m rotator")
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def _verify_problems(tool: str, directory: Path) -> list[str]:
    """What `systemd-analyze verify` reports about our unit files. It exits 0 on unknown
    keys and bad values (it only warns), so lines naming one of our units are the
    problems; lines about other units or the machine are not ours to fix."""
    units = sorted(directory.iterdir())
    result = subprocess.run(
        [tool, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = (result.stdout + result.stderr).splitlines()
    ours = [line for line in lines if any(unit.name in line for unit in units)]
    if result.returncode != 0 and not ours:
        pytest.skip(f"systemd-analyze verify cannot run here: {lines[-3:]}")
    if result.returncode != 0:
        ours.append(f"exit status {result.returncode}")
    return ours


def test_systemd_analyze_verify_accepts_the_units(runnable_units: Path) -> None:
    """`systemd-analyze verify` reports nothing about rotator.service, rotator-once.service
    or rotator-once.timer (unknown keys, bad values, missing binaries)."""
    tool = _require_systemd_analyze()
    assert _verify_problems(tool, runnable_units) == []


def test_systemd_analyze_check_flags_a_broken_unit(runnable_units: Path) -> None:
    """The verify check above is real: a misspelt key and a bad value in a copy of the
    daemon unit are reported."""
    tool = _require_systemd_analyze()
    unit = runnable_units / "rotator.service"
    text = unit.read_text(encoding="utf-8")
    text = text.replace("ProtectHome=yes", "ProtectHome=sometimes\nProtectHomes=yes")
    unit.write_text(text, encoding="utf-8")
    problems = _verify_problems(tool, runnable_units)
    assert any("ProtectHomes" in p for p in problems)
    assert any("sometimes" in p for p in problems)


def test_systemd_services_sandbox_exposure_is_low(runnable_units: Path) -> None:
    """`systemd-analyze security --offline` rates both services' exposure at most 2.0
    ("OK") on its 0-10 scale."""
    tool = _require_systemd_analyze()
    units = [str(runnable_units / n) for n in ("rotator.service", "rotator-once.service")]
    result = subprocess.run(
        [tool, "security", "--offline=true", "--threshold=20", "--no-pager", *units],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no offline security review")
    exposures = re.findall(r"Overall exposure level for (\S+): ([\d.]+)", result.stdout)
    assert len(exposures) == 2, result.stdout[-500:] + result.stderr
    assert result.returncode == 0, exposures


# --- Kubernetes ---------------------------------------------------------------------------


def _manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is not None:
                yield path.name, document


def _kind(kind: str) -> dict[str, Any]:
    (found,) = [doc for _, doc in _manifests() if doc["kind"] == kind]
    return found


def _embedded_config() -> Any:
    return yaml.safe_load(_kind("ConfigMap")["data"]["rotator.yaml"])


def test_kubernetes_manifests_parse_and_name_their_kind() -> None:
    """Every manifest parses as YAML and is one named object of the expected kinds."""
    kinds = {doc["kind"]: name for name, doc in _manifests()}
    assert kinds == {
        "ConfigMap": "configmap.yaml",
        "CronJob": "cronjob.yaml",
        "Deployment": "deployment.yaml",
        "PersistentVolumeClaim": "pvc.yaml",
        "ServiceAccount": "serviceaccount.yaml",
    }
    for _, doc in _manifests():
        assert doc["apiVersion"]
        assert doc["metadata"]["name"]


def _check_pod(pod: dict[str, Any], memory_floor_mib: int) -> dict[str, Any]:
    """Pod-level checks shared by the Deployment and the CronJob; returns the container."""
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["serviceAccountName"] == _kind("ServiceAccount")["metadata"]["name"]
    (container,) = pod["containers"]
    assert not container["image"].endswith(":latest")
    assert ":" in container["image"].rsplit("/", 1)[-1]
    csc = container["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    # The limit leaves room for the busiest moment measured (`memory_floor_mib`).
    requested = _mebibytes(container["resources"]["requests"]["memory"])
    limit = _mebibytes(container["resources"]["limits"]["memory"])
    assert 50 < requested <= limit
    assert limit >= memory_floor_mib

    # The mounts agree with the ConfigMap's config, the PVC and the Secret.
    settings = parse_settings(_embedded_config(), {})
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    config_file = PurePosixPath(env["ROTATOR_CONFIG"])
    config_volume = mounts[str(config_file.parent)]
    assert config_volume["configMap"]["name"] == _kind("ConfigMap")["metadata"]["name"]
    assert config_file.name in _kind("ConfigMap")["data"]
    state_volume = mounts[str(PurePosixPath(settings.state.path).parent)]
    claim = _kind("PersistentVolumeClaim")
    assert state_volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    secret_file = PurePosixPath(str(settings.vault.auth.secret_id_file))
    secret_volume = mounts[str(secret_file.parent)]["secret"]
    assert [i["path"] for i in secret_volume["items"]] == [secret_file.name]
    return dict(container)


def test_deployment_runs_one_non_root_daemon_with_health_probes() -> None:
    """One replica, Recreate (never two daemons), non-root and locked down, liveness on
    /healthz and readiness on /readyz at the port the config listens on."""
    deployment = _kind("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    # One process: benchmarks/memory.py measured a 20,000-user scan peaking near 210 MiB;
    # the limit must hold that and a fifth more.
    container = _check_pod(pod, memory_floor_mib=256)
    assert container["args"][-1] == "daemon"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = parse_settings(_embedded_config(), {})
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = container[probe]["httpGet"]
        assert http["path"] == path
        assert ports[http["port"]] == settings.http.port
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


def test_cronjob_runs_one_pass_hourly_never_concurrently() -> None:
    """The CronJob runs `run --once` with concurrencyPolicy Forbid and the same pod
    hardening and mounts as the Deployment."""
    cronjob = _kind("CronJob")
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    assert spec["schedule"].split()[1:] == ["*", "*", "*", "*"]
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = _check_pod(pod, memory_floor_mib=130)  # run --once: one process
    assert container["args"][-2:] == ["run", "--once"]


def _cronjob_wrapper(tmp_path: Path, rotator_body: str, **env: str) -> subprocess.Popen[str]:
    """The CronJob container's command and args, run under /bin/sh with a stand-in
    rotator on PATH."""
    _stub(tmp_path, "rotator", rotator_body)
    pod = _kind("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return subprocess.Popen(
        [*container["command"], *container["args"]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "STUB_DIR": str(tmp_path), **env},
    )


@pytest.mark.parametrize(("status", "job_status"), [(0, 0), (1, 1), (2, 2), (3, 3), (4, 0)])
def test_cronjob_counts_exit_4_as_a_succeeded_job_and_passes_the_others_on(
    tmp_path: Path, status: int, job_status: int
) -> None:
    """The CronJob's shell passes rotator's args and status on, except 4, which becomes 0."""
    body = (
        "import os, pathlib, sys\n"
        "pathlib.Path(os.environ['STUB_DIR'], 'args').write_text(' '.join(sys.argv[1:]))\n"
        "sys.exit(int(os.environ['STUB_STATUS']))\n"
    )
    job = _cronjob_wrapper(tmp_path, body, STUB_STATUS=str(status))
    assert job.wait(timeout=60) == job_status
    assert (tmp_path / "args").read_text() == "--log-format json run --once"


def test_cronjob_shell_passes_sigterm_on_to_rotator(tmp_path: Path) -> None:
    """SIGTERM to the CronJob's shell reaches rotator; the shell exits with its status."""
    body = (
        "import os, pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
        "pathlib.Path(os.environ['STUB_DIR'], 'ready').touch()\n"
        "time.sleep(60)\n"
    )
    job = _cronjob_wrapper(tmp_path, body)
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline, "the stand-in rotator never started"
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=30) == 7


def test_configmap_config_is_valid_and_listens_on_all_interfaces() -> None:
    """The ConfigMap's rotator.yaml passes parse_settings with an empty environment (no
    token: AppRole with a secret id file) and listens where probes can reach it."""
    settings = parse_settings(_embedded_config(), {})
    assert settings.http.listen == "0.0.0.0:9464"
    assert str(settings.state.path) == "/var/lib/rotator/state.db"
    assert settings.vault.auth.method == "approle"
    assert settings.vault.auth.token is None
    assert "rotator.example.invalid" in settings.vault.url


def test_serviceaccount_carries_a_placeholder_irsa_role() -> None:
    """The service account's IRSA annotation is an obvious placeholder ARN."""
    annotations = _kind("ServiceAccount")["metadata"]["annotations"]
    assert annotations["eks.amazonaws.com/role-arn"] == "arn:aws:iam::111122223333:role/rotator"


# --- container and cron -------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Containerfile, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def test_containerfile_runs_as_non_root_from_a_pinned_tag() -> None:
    """The image comes from an explicit python:3.11 tag (never latest), installs the
    project with pip, and runs `rotator daemon` as uid 10001 with the state volume, the
    config path, the HTTP port and a /healthz HEALTHCHECK."""
    steps = _instructions(DEPLOY / "container" / "Containerfile")
    values: dict[str, list[str]] = {}
    for instruction, args in steps:
        values.setdefault(instruction, []).append(args)
    for image in values["FROM"]:
        name = image.split()[0]
        assert name.startswith("python:3.11"), name
        assert "latest" not in name
    assert any("pip install --no-cache-dir ." in run for run in values["RUN"])
    user = values["USER"][-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == "10001"
    assert [i for i, _ in steps].index("USER") > max(
        n for n, (i, _) in enumerate(steps) if i == "RUN"
    ), "a RUN after USER would run as the service user, or USER was reset to root"
    assert json.loads(values["ENTRYPOINT"][-1]) == ["rotator"]
    assert json.loads(values["CMD"][-1]) == ["daemon"]
    assert f"ROTATOR_CONFIG={DEFAULT_CONFIG_PATH}" in values["ENV"][0].split()
    assert values["EXPOSE"] == [str(HttpSettings().port)]
    assert json.loads(values["VOLUME"][-1]) == [str(StateSettings().path.parent)]
    assert "/healthz" in values["HEALTHCHECK"][-1]


def _cron_command() -> tuple[list[str], str]:
    """The /etc/cron.d entry's five time fields and user, and its command."""
    text = (DEPLOY / "cron" / "rotator.cron").read_text(encoding="utf-8")
    entries = [
        line
        for line in text.splitlines()
        if line.strip() and not line.startswith("#") and "=" not in line.split()[0]
    ]
    (entry,) = entries
    fields = entry.split(None, 6)
    return fields[:6], fields[6]


def test_cron_entry_runs_one_pass_under_flock_as_a_system_user() -> None:
    """The /etc/cron.d example runs `rotator run --once` inside `flock -n` as user
    rotator, and says to install it without a dot in the file name."""
    text = (DEPLOY / "cron" / "rotator.cron").read_text(encoding="utf-8")
    fields, command = _cron_command()
    assert len(fields[:5]) == 5
    assert fields[5] == "rotator"
    locked = "flock -n -E 75 /run/lock/rotator.lock rotator --log-format json run --once"
    assert locked in command
    assert "/etc/cron.d/rotator" in text


def _stub(directory: Path, name: str, body: str) -> None:
    """An executable Python script `name` in `directory` (a stand-in on PATH)."""
    path = directory / name
    path.write_text(f"#!{sys.executable}\n{body}", encoding="utf-8")
    path.chmod(0o755)


@pytest.mark.parametrize("status", [0, 1, 2, 3, 4])
def test_cron_entry_mails_a_line_for_every_exit_status_but_0_and_4(
    tmp_path: Path, status: int
) -> None:
    """Under /bin/sh the cron entry logs to logger and prints a line only for 1, 2 and 3."""
    _stub(
        tmp_path,
        "rotator",
        "import os, sys\n"
        'print(\'{"event": "pass"}\')\n'
        "print('args', *sys.argv[1:], file=sys.stderr)\n"
        "sys.exit(int(os.environ['STUB_STATUS']))\n",
    )
    _stub(
        tmp_path,
        "logger",
        "import os, sys\n"
        "with open(os.environ['STUB_LOG'], 'a') as f:\n"
        "    f.write(' '.join(sys.argv[1:]) + ':' + sys.stdin.read())\n",
    )
    _, command = _cron_command()
    command = command.replace("/run/lock/rotator.lock", str(tmp_path / "lock"))
    done = subprocess.run(
        ["/bin/sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={
            "PATH": f"{tmp_path}:/usr/bin:/bin",
            "STUB_STATUS": str(status),
            "STUB_LOG": str(tmp_path / "log"),
        },
    )
    assert done.stderr == ""
    logged = (tmp_path / "log").read_text(encoding="utf-8")
    assert logged.startswith("-t rotator:")
    assert '{"event": "pass"}' in logged
    assert "args --log-format json run --once" in logged
    if status in (0, 4):
        assert done.stdout == ""
    else:
        assert done.stdout.splitlines() == [
            f"rotator run --once exited {status}: see syslog (tag rotator) and rotator status"
        ]


def test_cron_entry_mails_a_line_when_the_previous_pass_still_runs(tmp_path: Path) -> None:
    """While the lock is held, the cron entry prints that the pass exited 75."""
    _stub(tmp_path, "rotator", "raise SystemExit('rotator must not run')\n")
    _stub(tmp_path, "logger", "import sys\nsys.stdin.read()\n")
    lock = tmp_path / "lock"
    _, command = _cron_command()
    command = command.replace("/run/lock/rotator.lock", str(lock))
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = subprocess.run(
            ["/bin/sh", "-c", command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
        )
    assert done.stdout.startswith("rotator run --once exited 75:")


def _mebibytes(quantity: str) -> int:
    """A Kubernetes memory quantity in Mi or Gi, as MiB."""
    number, unit = quantity[:-2], quantity[-2:]
    return int(number) * {"Mi": 1, "Gi": 1024}[unit]


# --- several daemons on one PostgreSQL: Kubernetes fleet and the systemd drop-in --------

FLEET_DIR = K8S_DIR / "fleet"
FLEET_SECRET_TEMPLATE = FLEET_DIR / "database-secret.yaml.example"
POSTGRES_DROP_IN = "rotator.service.d/postgres.conf"
# postgresql://USER@HOST:PORT/DB: a user and no password (no ":" before the "@").
_PASSWORDLESS_URL = re.compile(r"postgresql://(?P<user>[^:@/\s]+)@(?P<host>[^:/@\s]+):5432/\w+")


def _fleet_manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every document of fleet/*.yaml and of the Secret template."""
    for path in [*sorted(FLEET_DIR.glob("*.yaml")), FLEET_SECRET_TEMPLATE]:
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is not None:
                yield path.name, document


def _fleet_kind(kind: str) -> dict[str, Any]:
    (found,) = [doc for _, doc in _fleet_manifests() if doc["kind"] == kind]
    return found


def _fleet_pod() -> dict[str, Any]:
    pod: dict[str, Any] = _fleet_kind("Deployment")["spec"]["template"]["spec"]
    return pod


def test_fleet_manifests_parse_and_name_their_kind() -> None:
    """fleet/ holds a ConfigMap, a Deployment, a PodDisruptionBudget and a Secret template,
    each a named object, and no PersistentVolumeClaim."""
    kinds = {doc["kind"]: name for name, doc in _fleet_manifests()}
    assert kinds == {
        "ConfigMap": "configmap.yaml",
        "Deployment": "deployment.yaml",
        "PodDisruptionBudget": "poddisruptionbudget.yaml",
        "Secret": "database-secret.yaml.example",
    }
    for _, doc in _fleet_manifests():
        assert doc["apiVersion"]
        assert doc["metadata"]["name"]


def test_fleet_deployment_runs_several_daemons_without_a_volume_claim() -> None:
    """replicas > 1 with rolling updates, no PVC among the volumes, and the single
    daemon's security contexts, probes, ports, resources and service account."""
    spec = _fleet_kind("Deployment")["spec"]
    assert spec["replicas"] > 1
    assert spec["strategy"]["type"] == "RollingUpdate"
    pod = _fleet_pod()
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    single_pod = _kind("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (single,) = single_pod["containers"]
    assert pod["securityContext"] == single_pod["securityContext"]
    assert pod["serviceAccountName"] == single_pod["serviceAccountName"]
    same = ("image", "args", "securityContext", "resources", "ports")
    for key in (*same, "livenessProbe", "readinessProbe"):
        assert container[key] == single[key], key
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert not [m for m in container["volumeMounts"] if m["mountPath"] == "/var/lib/rotator"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()


def test_fleet_takes_the_state_url_and_password_from_the_database_secret() -> None:
    """ROTATOR_STATE_URL and PGPASSWORD come from the Secret rotator-database (keys url and
    password, both in the template); no environment value is written in the manifest."""
    (container,) = _fleet_pod()["containers"]
    env = {e["name"]: e for e in container["env"]}
    secret = _fleet_kind("Secret")
    for name, key in (("ROTATOR_STATE_URL", "url"), ("PGPASSWORD", "password")):
        assert "value" not in env[name], name
        reference = env[name]["valueFrom"]["secretKeyRef"]
        assert reference == {"name": secret["metadata"]["name"], "key": key}
        assert key in secret["stringData"]
    assert secret["metadata"]["name"] == "rotator-database"
    literal = [e["value"] for e in container["env"] if "value" in e]
    assert not [v for v in literal if "postgres" in v.lower()]


def test_fleet_secret_template_holds_placeholders_only_and_is_not_applied_with_the_rest() -> None:
    """The template's URL names a user and a placeholder host with no password, its
    password is an obvious placeholder, and its file name is not *.yaml, so `kubectl
    apply -f fleet/` cannot overwrite the real Secret with it."""
    data = _fleet_kind("Secret")["stringData"]
    url = _PASSWORDLESS_URL.fullmatch(data["url"])
    assert url is not None, data["url"]
    assert (url["user"], url["host"]) == ("rotator", "HOST")
    assert data["password"].startswith("REPLACE-")
    assert "PLACEHOLDER" in FLEET_SECRET_TEMPLATE.read_text(encoding="utf-8")
    assert FLEET_SECRET_TEMPLATE.suffix not in (".yaml", ".yml", ".json")


def test_fleet_config_is_valid_and_leaves_the_state_store_to_the_environment() -> None:
    """The fleet ConfigMap's rotator.yaml sets neither state.url nor state.path (no volume
    holds an SQLite file) and validates with the Secret's ROTATOR_STATE_URL, which becomes
    state.url; it is mounted where ROTATOR_CONFIG points, and the secret id path agrees
    with the Vault Secret's mount."""
    configmap = _fleet_kind("ConfigMap")
    raw = yaml.safe_load(configmap["data"]["rotator.yaml"])
    assert "url" not in raw["state"]
    assert "path" not in raw["state"]
    url = _fleet_kind("Secret")["stringData"]["url"]
    settings = parse_settings(raw, {"ROTATOR_STATE_URL": url})
    assert settings.state.url == url
    assert parse_settings(raw, {}).state.url is None
    assert settings.http.listen == "0.0.0.0:9464"
    pod = _fleet_pod()
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    config_file = PurePosixPath(str(env["ROTATOR_CONFIG"]))
    assert mounts[str(config_file.parent)]["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_file.name in configmap["data"]
    secret_file = PurePosixPath(str(settings.vault.auth.secret_id_file))
    secret_volume = mounts[str(secret_file.parent)]["secret"]
    assert [i["path"] for i in secret_volume["items"]] == [secret_file.name]


def test_fleet_pods_spread_over_nodes_and_one_survives_voluntary_disruptions() -> None:
    """Pod anti-affinity prefers different nodes for pods of this Deployment, and a
    PodDisruptionBudget keeps at least one of them (selecting the same pods)."""
    pod_labels = _fleet_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    preferred = _fleet_pod()["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    by_topology = {term["podAffinityTerm"]["topologyKey"]: term for term in preferred}
    node = by_topology["kubernetes.io/hostname"]["podAffinityTerm"]
    assert node["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    budget = _fleet_kind("PodDisruptionBudget")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_postgres_drop_in_sets_the_url_and_hands_libpq_a_private_password_file() -> None:
    """The drop-in sets ROTATOR_STATE_URL to a password-less postgresql:// URL, loads
    /etc/rotator/pgpass as a credential and points PGPASSFILE at the service's copy; its
    comments give the file's mode (0600) and format."""
    service = _unit(POSTGRES_DROP_IN)["Service"]
    environment = dict(v.split("=", 1) for k, v in service if k == "Environment")
    assert _PASSWORDLESS_URL.fullmatch(environment["ROTATOR_STATE_URL"])
    assert _one(service, "LoadCredential") == "pgpass:/etc/rotator/pgpass"
    assert environment["PGPASSFILE"] == "%d/pgpass"
    assert "PGPASSWORD" not in environment
    text = (SYSTEMD_DIR / POSTGRES_DROP_IN).read_text(encoding="utf-8")
    assert "hostname:port:database:username:password" in text
    assert "install -m 0600 /dev/null /etc/rotator/pgpass" in text
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "rotator.service.d/postgres.conf" in readme


@pytest.fixture
def runnable_units_with_drop_in(runnable_units: Path) -> Path:
    """The runnable units plus the PostgreSQL drop-in in rotator.service.d/ beside them."""
    (runnable_units / "rotator.service.d").mkdir()
    shutil.copy(SYSTEMD_DIR / POSTGRES_DROP_IN, runnable_units / POSTGRES_DROP_IN)
    return runnable_units


def _verify_with_drop_in(tool: str, units: Path) -> list[str]:
    """What `systemd-analyze verify` reports about the daemon unit and its drop-in."""
    result = subprocess.run(
        [tool, "verify", "--man=no", str(units / "rotator.service")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = (result.stdout + result.stderr).splitlines()
    ours = [line for line in lines if "rotator.service" in line or "postgres.conf" in line]
    if result.returncode != 0 and not ours:
        pytest.skip(f"systemd-analyze verify cannot run here: {lines[-3:]}")
    return ours


def test_systemd_analyze_verify_accepts_the_daemon_with_its_postgres_drop_in(
    runnable_units_with_drop_in: Path,
) -> None:
    """`systemd-analyze verify` reports nothing about rotator.service with postgres.conf."""
    tool = _require_systemd_analyze()
    assert _verify_with_drop_in(tool, runnable_units_with_drop_in) == []


def test_systemd_analyze_reads_the_drop_in_and_flags_a_broken_one(
    runnable_units_with_drop_in: Path,
) -> None:
    """The verify above covers the drop-in: a misspelt key in it is reported."""
    tool = _require_systemd_analyze()
    drop_in = runnable_units_with_drop_in / POSTGRES_DROP_IN
    text = drop_in.read_text(encoding="utf-8")
    drop_in.write_text(text.replace("LoadCredential=", "LoadCredentials="), encoding="utf-8")
    problems = _verify_with_drop_in(tool, runnable_units_with_drop_in)
    assert any("LoadCredentials" in p for p in problems)


# A credential that must never be committed, by what gives it away.
_CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    "password in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"),
    "Vault token": re.compile(r"\bhv[sbr]\.[A-Za-z0-9_-]{20,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # A YAML key, an environment assignment or a unit's Environment= line (not prose).
    "password value": re.compile(
        r"(?im)^[\s-]*(?:Environment=)?(?:password|passwd|pgpassword)\s*[:=]\s*(?!REPLACE-)\S{4}"
    ),
    "password on a command line": re.compile(r"--from-literal=(?:password|passwd)=(?!REPLACE-)\S"),
    "pgpass line": re.compile(r"^[#\s]*[\w.-]+:\d+:[\w*-]+:[\w*-]+:(?!<)\S+", re.M),
}


def _credentials(text: str) -> list[str]:
    return [what for what, pattern in _CREDENTIAL_PATTERNS.items() if pattern.search(text)]


def test_credential_scan_finds_real_looking_secrets_and_passes_placeholders() -> None:
    """The scan below is real: it flags a key id, a password in a URL or a field, a Vault
    token, a private key and a pgpass line, and passes the placeholders the files use."""
    assert _credentials("aws_access_key_id = AKIAZZZZZZZZZZZZZZZZ") == ["AWS access key id"]
    assert _credentials("url: postgresql://rotator:s3cret@db:5432/rotator") == ["password in a URL"]
    assert _credentials("token: hvs.CAESIBwJ0m7Wbq1xYzAbCdEfGhIjKlMn") == ["Vault token"]
    assert _credentials("-----BEGIN RSA PRIVATE KEY-----") == ["private key"]
    assert _credentials("  password: hunter22") == ["password value"]
    assert _credentials("Environment=PGPASSWORD=hunter22") == ["password value"]
    assert _credentials("  - PGPASSWORD=hunter22") == ["password value"]
    assert _credentials("create secret generic x --from-literal=password=hunter22") == [
        "password on a command line"
    ]
    assert _credentials("db.internal:5432:rotator:rotator:hunter22") == ["pgpass line"]
    for placeholder in (
        "  password: REPLACE-WITH-THE-DATABASE-PASSWORD",
        "url: postgresql://rotator@HOST:5432/rotator",
        "#   postgres.example.invalid:5432:rotator:rotator:<the password>",
        "#   hostname:port:database:username:password",
        "libpq reads the password from PGPASSWORD when the URL has none.",
        "# password: PGPASSWORD, which libpq reads when the URL has no password.",
        "  --from-file=password=./rotator-db-password",
    ):
        assert _credentials(placeholder) == [], placeholder


def test_no_file_for_several_daemons_or_monitoring_holds_a_real_credential() -> None:
    """The fleet manifests and README, the Secret template, the PostgreSQL drop-in, the
    Prometheus rules and tests and the dashboard contain no credential."""
    files = [
        *sorted(p for p in FLEET_DIR.iterdir() if p.is_file()),
        SYSTEMD_DIR / POSTGRES_DROP_IN,
        *sorted(p for p in (DEPLOY / "prometheus").rglob("*") if p.is_file()),
        *sorted(p for p in (DEPLOY / "grafana").rglob("*") if p.is_file()),
    ]
    assert FLEET_SECRET_TEMPLATE in files
    assert len(files) >= 12
    found = {str(p.relative_to(DEPLOY)): _credentials(p.read_text(encoding="utf-8")) for p in files}
    assert {name: what for name, what in found.items() if what} == {}
