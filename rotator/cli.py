"""The `rotator` command line. Parses commands, loads settings, builds the app, and exits
with the code `rotator.outcome` derives from what the command did:

  0  success; nothing needs attention
  1  needs attention now: a rotation this command opened or advanced moved into FAILED or
     BLOCKED (for `rotate` and `leak-event`: their rotation is FAILED or BLOCKED), or an
     account could not be scanned
  2  bad configuration or usage (a user name that cannot be one, a malformed event: both
     checked before any backend is touched)
  3  a backend could not be reached or refused the credentials; also when a rotation
     this command advanced now waits to retry before its new key was stored
  4  nothing new, but a rotation reported earlier is still unresolved: an open rotation
     is BLOCKED, or a user's latest rotation is FAILED (`run --once`, `status`)
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from rotator import __version__, log
from rotator.compliance import ReportFormat, build_report, render
from rotator.config import Settings, config_path, load_settings, parse_settings
from rotator.durations import parse_duration
from rotator.errors import BadInput, ConfigError, RotatorError
from rotator.leaks import MAX_EVENT_BYTES, parse_event
from rotator.machine import State
from rotator.model import (
    Event,
    ForcedRotation,
    KeyDecision,
    Rotation,
    RotationKind,
    is_user_name,
)
from rotator.outcome import (
    ExitCode,
    exit_code,
    for_error,
    newly_troubled,
    unresolved,
    waiting,
)
from rotator.policy import Proposal, Rules, idle_rules
from rotator.render import iso, plan_document, plan_text, rotation_json, rotations_text

if TYPE_CHECKING:
    from rotator.app import App

F = TypeVar("F", bound=Callable[..., Any])


def check_user_name(name: str, what: str = "USER") -> str:
    """`name` when it can be an IAM user name; else `BadInput` (exit 2). Checked before
    any backend is touched, so a mistyped name is a usage error, not a round trip."""
    if not is_user_name(name):
        raise BadInput(
            f"{what} {name!r} is not an IAM user name (1 to 64 letters, digits and +=,.@_-)"
        )
    return name


def _die(code: ExitCode, message: str) -> NoReturn:
    click.echo(f"rotator: {message}", err=True)
    sys.exit(int(code))


def handle_errors(fn: F) -> F:
    """Turn the project's errors into a one-line message and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            click.echo("rotator: invalid configuration:", err=True)
            for problem in exc.problems:
                click.echo(f"  {problem}", err=True)
            sys.exit(int(for_error(exc)))
        except RotatorError as exc:
            _die(for_error(exc), str(exc))

    return wrapper  # type: ignore[return-value]


def _finish(code: ExitCode) -> NoReturn:
    sys.exit(int(code))


class Context:
    def __init__(self, config: str | None, log_format: str | None, log_level: str) -> None:
        self.config = config
        self.log_format = log_format
        self.log_level = log_level
        self._settings: Settings | None = None

    def settings(self, *, need_vault: bool = True) -> Settings:
        """The validated settings. Commands that never talk to Vault pass
        `need_vault=False`, so that a missing Vault token does not stop them."""
        if self._settings is None:
            path, explicit = config_path(self.config, os.environ)
            if explicit or path.exists():
                self._settings = load_settings(path, os.environ, need_vault=need_vault)
            else:
                self._settings = parse_settings(None, os.environ, need_vault=need_vault)
        return self._settings

    def settings_loader(self) -> Callable[[], Settings]:
        """Loads the settings afresh on each call (the daemon re-reads them on SIGHUP)."""

        def load() -> Settings:
            self._settings = None
            return self.settings()

        return load

    def app(self, *, need_vault: bool = True) -> App:
        # Imported here: `rotator daemon` never loads the AWS and Vault adapters.
        from rotator.app import App

        return App(self.settings(need_vault=need_vault))


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    metavar="PATH",
    help="Configuration file. Default: $ROTATOR_CONFIG, else /etc/rotator/rotator.yaml "
    "(when missing, built-in defaults and the environment are used).",
)
@click.option(
    "--log-format",
    type=click.Choice(["json", "console"]),
    help="Log format on stderr. Default: console on a terminal, json otherwise.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.version_option(__version__, prog_name="rotator")
@click.pass_context
def cli(ctx: click.Context, config: str | None, log_format: str | None, log_level: str) -> None:
    """Keep AWS IAM access keys young and kill leaked ones, without locking a consumer
    out or losing a secret.

    \b
    Start with:
      rotator demo               the whole job on a local AWS and Vault, no account needed
      rotator config check       validate the configuration
      rotator plan               what is due, leaked or blocked (changes nothing)
      rotator run --once         rotate what is due, then exit
      rotator status             open and recent rotations
      rotator daemon             run as a service (systemd, container)
    \b
    When a key leaks:
      rotator rotate USER --key KEY_ID --leaked --reason INC-123
      rotator leak-event health-event.json
    \b
    When a key deactivated as unused is needed after all:
      rotator reactivate USER --key KEY_ID

    \b
    Exit codes (every command):
      0  success; nothing needs attention
      1  needs attention now: a rotation this command opened or advanced moved into
         FAILED or BLOCKED, or an account could not be scanned
      2  bad configuration or usage (a user name that cannot be one, a malformed event)
      3  a backend could not be reached or refused the credentials (also: a rotation
         now waits to retry before its new key was stored; the next pass continues it)
      4  nothing new, but a rotation reported earlier is still unresolved (an open
         rotation is BLOCKED, or a user's latest rotation is FAILED)
    """
    log.configure(log_format, log_level)
    ctx.obj = Context(config, log_format, log_level)


# --- config ---------------------------------------------------------------------------


@cli.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@click.option("--show", is_flag=True, help="Print the effective settings (secrets masked).")
@pass_ctx
@handle_errors
def config_check(obj: Context, show: bool) -> None:
    """Validate the configuration file and report every problem at once.

    Each problem is named by its path in the file, e.g.
    `policy.max_age: "9x" is not a duration`. Exit 0 when valid, 2 otherwise.
    """
    settings = obj.settings()
    path, explicit = config_path(obj.config, os.environ)
    source = str(path) if explicit or path.exists() else "built-in defaults (no file)"
    if show:
        click.echo(json.dumps(settings.redacted_dict(), indent=2))
    click.echo(f"configuration ok: {source}")


# --- plan -----------------------------------------------------------------------------


def parse_as_of(text: str | None, now: datetime) -> datetime:
    """`--as-of`: ISO 8601 (UTC when no offset is given) or `+N<s|m|h|d>` from now."""
    if not text:
        return now
    text = text.strip()
    if text.startswith("+"):
        try:
            return now + parse_duration(text[1:])
        except ValueError as exc:
            raise BadInput(f"--as-of {text!r}: {exc}") from exc
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadInput(
            f"--as-of {text!r} is neither ISO 8601 (2026-12-01T00:00:00Z) nor +N<s|m|h|d> (+30d)"
        ) from exc
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document for scripts.")
@click.option(
    "--as-of",
    metavar="TIME",
    help="Judge ages as of another moment: ISO 8601 or +Nd (e.g. +30d).",
)
@pass_ctx
@handle_errors
def plan(obj: Context, as_json: bool, as_of: str | None) -> None:
    """Scan IAM and print a decision for every key. Changes nothing.

    Decisions: ok, warn (older than warn_age), rotate (older than max_age), unused
    (active, idle longer than its rule's unused_after), leaked (active, and created
    before a scan first saw the user's quarantine policy), blocked (due, but both keys
    are active), exempt (excluded by path, name pattern or tag; a tag dated in the past
    has lapsed, and the reason says so). Each key shows the rule that decided and why it
    matched ("default": no rule matched, `policy` decides; --json: "rule",
    "rule_match"). Keys created before the quarantine was first seen are marked suspect
    (--json: "suspect": true); users still quarantined are listed in the notes, and so
    is every rule that matched no scanned user. A key an open rotation tracks is
    described by it: its old key "rotate" ("being rotated: ..."), its new key "ok".

    Then every console password (a user's login profile) whose rule does not say
    `console: off`, from the same credential report: its age, last sign-in, MFA and a
    decision: rotate (at least password_max_age old), no_mfa, stale_console (no sign-in
    for console_unused_after), warn, ok or exempt (--json: "kind": "console").
    """
    app = obj.app(need_vault=False)
    now = app.now()
    moment = parse_as_of(as_of, now)
    with_state = app.settings.state.url is not None or Path(app.settings.state.path).exists()
    try:
        scanned = app.scan(as_of=moment, with_state=with_state, record=False)
    finally:
        app.close()
    inventories = scanned.inventories
    decisions = [d for inv in inventories for d in inv.decisions]
    console = [c for inv in inventories for c in inv.console]
    notes = [n for inv in inventories for n in inv.notes]
    notes += [f"account {a} could not be scanned: {e}" for a, e in scanned.failures.items()]
    # A rule whose match holds for nobody (a mistyped account, path or tag) is silent
    # otherwise: its users fall to a later rule or to the policy.
    decided = {d.rule for d in decisions} | {c.rule for c in console}
    users = [u for inv in inventories for u in inv.users]
    notes += idle_rules(Rules.from_settings(app.settings), users, decided)
    if as_json:
        doc = plan_document(
            decisions,
            generated_at=now,
            as_of=moment,
            notes=notes,
            source=",".join(sorted({inv.source for inv in inventories})),
            console=console,
        )
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(plan_text(decisions, as_of=moment, notes=notes, console=console))
    if scanned.failures:
        click.echo("rotator: could not scan account(s): " + ", ".join(scanned.failures), err=True)
    _finish(exit_code(started=now, now=app.now(), failed_accounts=scanned.failures))


# --- report ---------------------------------------------------------------------------

# A report names users and owners, not secrets: readable by the owner's group (an
# auditors' group, a web server's), by no one else.
REPORT_MODE = 0o640


def _report_target(output: str) -> Path:
    """`--output` FILE, checked before any backend is touched: its directory must exist
    and FILE must not be a directory."""
    path = Path(output)
    if path.is_dir():
        raise BadInput(f"--output {output}: is a directory")
    if not path.parent.is_dir():
        raise BadInput(f"--output {output}: directory {path.parent} does not exist")
    return path


def write_atomically(path: Path, text: str, mode: int = REPORT_MODE) -> None:
    """Replace `path` with `text` in one step (a temporary file beside it, then a
    rename): a reader never sees half a report, and a failed write leaves the old one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise BadInput(f"cannot write {path}: {exc.strerror}") from exc


@cli.command()
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice([f.value for f in ReportFormat]),
    help="csv for a spreadsheet, json for scripts, html to look at.",
)
@click.option(
    "--output",
    metavar="FILE",
    help=f"Write to FILE (replaced atomically, mode {REPORT_MODE:04o}) instead of stdout.",
)
@pass_ctx
@handle_errors
def report(obj: Context, fmt: str, output: str | None) -> None:
    """Write a compliance report of every access key in every account. Changes nothing.

    Each key with its account, user, owner (the user's `owner` tag), rule, key id,
    status, creation, age, last use, days since last use, decision and reason; and the
    totals, per account and overall, of the two CIS AWS Foundations Benchmark controls
    on access keys. Both count Active keys only (an Inactive key cannot sign a
    request), exempt users' keys included, in whole days, whatever `policy` and `rules`
    say (`plan` tells what the rotator will do about them):

    \b
      CIS 1.14  older than 90 days ("access keys rotated every 90 days or less")
      CIS 1.12  not used for more than 45 days, counted from creation when never used
                ("credentials unused for 45 days or greater are disabled")

    Then every user with a console password (kind "console"): its age, last sign-in,
    MFA and plan's decision, with the total of CIS 1.10 (console users without MFA).

    \b
    Formats:
      csv   a header row, then one row per key and per console password (RFC 4180),
            for a spreadsheet; no totals row: the cis_* columns are true/false, sum them
      json  {"generated_at", "accounts" (totals and age distribution of each),
            "failed_accounts", "totals", "console_totals", "keys", "console"}, for
            scripts
      html  one self-contained page to look at or mail around: the totals, a chart of
            key ages per account (inline SVG, the 90-day limit marked) and the keys;
            no external resource, no script

    Key ids are empty for keys read from IAM's credential report only (it names no
    key ids; the scan lists them only for users whose keys need action).
    Without --output the report goes to stdout. Exit 1 when an account could not be
    scanned (the report covers the others and names it), 2 for bad usage (FILE's
    directory missing), 3 when no account could be scanned.
    """
    target = _report_target(output) if output is not None else None
    app = obj.app(need_vault=False)
    now = app.now()
    with_state = app.settings.state.url is not None or Path(app.settings.state.path).exists()
    try:
        scanned = app.scan(as_of=now, with_state=with_state, record=False)
    finally:
        app.close()
    owner_tag = app.settings.notify.owner_tag
    built = build_report(
        scanned.inventories, now, owner_tag=owner_tag, failed_accounts=scanned.failures
    )
    text = render(built, ReportFormat(fmt))
    if target is None:
        click.echo(text, nl=False)
    else:
        write_atomically(target, text)
    if scanned.failures:
        click.echo(
            "rotator: could not scan account(s), the report lacks them: "
            + ", ".join(scanned.failures),
            err=True,
        )
    _finish(exit_code(started=now, now=app.now(), failed_accounts=scanned.failures))


# --- run / status / rotate / rollback --------------------------------------------------


def _key_json(d: KeyDecision) -> dict[str, Any]:
    """A key a pass acted on without a rotation (deactivated as unused, deleted as idle)."""
    return {
        "account_id": d.user.account_id,
        "user_name": d.user.user_name,
        "access_key_id": d.key.access_key_id,
        "rule": d.rule,
        "reason": d.reason,
    }


def _proposal_json(p: Proposal) -> dict[str, Any]:
    """A rotation a dry run would open (or would not, with `why_not` added)."""
    return {
        "account_id": p.account_id,
        "user_name": p.user_name,
        "reason": p.reason.value,
        "old_key_id": p.old_key_id,
        "why": p.why,
    }


# What a dry run leaves to the real pass: the last look before it touches a key.
DRY_RUN_RECHECK = (
    "dry run: the real pass looks again just before it acts: an unused key is deactivated "
    "only if GetAccessKeyLastUsed still finds it unused, an inactive key deleted only if it "
    "is still Inactive"
)


def _trails(app: App, rotations: Iterable[Rotation]) -> dict[str, list[Event]]:
    """The event trail of each rotation, by id."""
    return {r.id: app.store.events(r.id) for r in rotations}


def _report_waiting(rotations: Iterable[Rotation]) -> None:
    """One line per rotation that must wait for a backend before its new key is stored."""
    for r in rotations:
        click.echo(
            f"rotator: rotation {r.id} of {r.user_name} ({r.account_id}) waits in "
            f"{r.state.value} until {iso(r.next_action_at)}: its new key is not stored yet; "
            f"the next pass (or `rotator run --once`) continues it. "
            f"Last error: {r.last_error}",
            err=True,
        )


def _exit_for_handled(
    rotations: Sequence[Rotation],
    trails: dict[str, list[Event]],
    started: datetime,
    finished: datetime,
) -> NoReturn:
    """Exit for `rotate` and `leak-event`: they answer for their own rotations' state."""
    code = exit_code(
        started=started,
        now=finished,
        handled=rotations,
        trails=trails,
        own_state_counts=True,
    )
    if code is ExitCode.BACKEND:
        _report_waiting(waiting(rotations, started, finished))
    _finish(code)


def _report_troubled(rotations: Iterable[Rotation]) -> None:
    for r in rotations:
        click.echo(
            f"rotator: needs attention: rotation {r.id} of {r.user_name} ({r.account_id}) "
            f"is {r.state.value}: {r.last_error}",
            err=True,
        )


def _report_unresolved(rotations: Sequence[Rotation], limit: int = 10) -> None:
    names = [f"{r.user_name} ({r.state.value})" for r in rotations[:limit]]
    more = f" and {len(rotations) - limit} more" if len(rotations) > limit else ""
    click.echo(
        "rotator: nothing new; reported earlier and still unresolved: "
        + ", ".join(names)
        + more
        + " (rotator status)",
        err=True,
    )


def _standing(app: App, users: Iterable[tuple[str, str, RotationKind]]) -> list[Rotation]:
    """What exit code 4 looks at: every open rotation, and the latest rotation of each
    (account, user, kind) in `users` that has none of that kind open."""
    standing = app.store.list_open()
    has_open = {(r.account_id, r.user_name, r.kind) for r in standing}
    for account_id, user_name, kind in dict.fromkeys(users):
        if (account_id, user_name, kind) in has_open:
            continue
        latest = app.store.latest_for(account_id, user_name, kind)
        if latest is not None:
            standing.append(latest)
    return standing


@cli.command()
@click.option("--once", is_flag=True, required=True, help="One full pass, then exit.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Scan and show what the pass would open, deactivate and delete; change nothing.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@pass_ctx
@handle_errors
def run(obj: Context, once: bool, dry_run: bool, as_json: bool) -> None:
    """One pass: scan, open rotations for due and leaked keys, advance every open
    rotation as far as it can go now, print a summary.

    With --dry-run nothing changes: it lists the rotations the pass would open (not for
    a user whose rotation is open, or whose latest FAILED within retry_failed_after),
    and the keys it would deactivate as unused and delete as idle (--json:
    "would_open", "would_not_open", "would_deactivate_unused", "would_delete_inactive").

    Rotations that must wait (the overlap, the retirement of an old key) are picked up
    by the next pass. Exit 1 when a rotation moved into FAILED or BLOCKED during this
    pass or an account could not be scanned; 3 when a rotation waits for a backend
    before its new key is stored; 4 when nothing is new but a rotation is still BLOCKED
    or a user's latest rotation is FAILED (reported by an earlier pass).
    """
    app = obj.app(need_vault=not dry_run)
    try:
        started = app.now()
        result = app.run_once(dry_run=dry_run)
        # A dry run changes nothing: it handles no rotation, only looks at what stands.
        handled = {} if dry_run else {r.id: r for r in [*result.opened, *result.rotations]}
        trails = _trails(app, handled.values())
        # Every scanned user's key rotations; console ones for users with console access.
        scanned = (
            (u.account_id, u.user_name, kind)
            for inv in result.inventories
            for u in inv.users
            for kind in RotationKind
            if kind is RotationKind.KEY or u.console is not None
        )
        standing = _standing(app, scanned)
        finished = app.now()
    finally:
        app.close()
    counts: dict[str, int] = {}
    for r in result.rotations:
        counts[r.state.value] = counts.get(r.state.value, 0) + 1
    notes = [n for inv in result.inventories for n in inv.notes]
    if dry_run and (result.deactivated or result.deleted):
        notes.append(DRY_RUN_RECHECK)
    if as_json:
        doc: dict[str, Any] = {
            "dry_run": dry_run,
            "rotations": [rotation_json(r) for r in result.rotations],
            "states": counts,
            "notes": notes,
            "failed_accounts": result.failures,
        }
        if dry_run:
            # "would_...": nothing was done; the real pass does these, chosen alike.
            doc["would_open"] = [_proposal_json(p) for p in result.would_open]
            doc["would_not_open"] = [
                {**_proposal_json(p), "why_not": why} for p, why in result.held_back
            ]
            doc["would_deactivate_unused"] = [_key_json(d) for d in result.deactivated]
            doc["would_delete_inactive"] = [_key_json(d) for d in result.deleted]
            doc["would_rotate_console"] = [
                {
                    "account_id": c.user.account_id,
                    "user_name": c.user.user_name,
                    "rule": c.rule,
                    "reason": c.reason,
                }
                for c in result.would_rotate_console
            ]
        else:
            doc["opened"] = [r.id for r in result.opened]
            doc["deactivated_unused"] = [_key_json(d) for d in result.deactivated]
            doc["deleted_inactive"] = [_key_json(d) for d in result.deleted]
        click.echo(json.dumps(doc, indent=2))
    else:
        for note in notes:
            click.echo(f"note: {note}")
        if dry_run:
            click.echo(f"dry run: {len(result.would_open)} rotation(s) would be opened")
            for p in result.would_open:
                click.echo(f"  {p.account_id} {p.user_name}: {p.reason.value} ({p.why})")
            if result.held_back:
                held = len(result.held_back)
                click.echo(f"dry run: {held} due user(s) would get no new rotation")
                for p, why in result.held_back:
                    click.echo(f"  {p.account_id} {p.user_name}: {why}")
            for c in result.would_rotate_console:
                click.echo(
                    f"dry run: would rotate the console password of {c.user.user_name} "
                    f"({c.user.account_id}): {c.reason}"
                )
            for d in result.deactivated:
                click.echo(
                    f"dry run: would deactivate unused key {d.key.access_key_id} of "
                    f"{d.user.user_name} ({d.user.account_id}), rule {d.rule}: {d.reason}"
                )
            for d in result.deleted:
                click.echo(
                    f"dry run: would delete inactive key {d.key.access_key_id} of "
                    f"{d.user.user_name} ({d.user.account_id}), rule {d.rule}: {d.reason}"
                )
        else:
            click.echo(f"opened {len(result.opened)} rotation(s)")
            for d in result.deactivated:
                click.echo(
                    f"deactivated unused key {d.key.access_key_id} of {d.user.user_name} "
                    # The reason without what it says a pass will do: this one did it.
                    f"({d.user.account_id}): {d.reason.rsplit(': ', 1)[0]}"
                )
            for d in result.deleted:
                click.echo(
                    f"deleted inactive key {d.key.access_key_id} of {d.user.user_name} "
                    f"({d.user.account_id}), rule {d.rule}: {d.reason}"
                )
        click.echo(rotations_text(result.rotations))
        if counts:
            click.echo("states: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for account, error in result.failures.items():
        click.echo(f"rotator: account {account} failed: {error}", err=True)
    code = exit_code(
        started=started,
        now=finished,
        handled=list(handled.values()),
        trails=trails,
        failed_accounts=result.failures,
        standing=standing,
    )
    if result.vault_error is not None:
        click.echo(
            f"rotator: Vault cannot be used ({result.vault_error}); leaked keys were "
            "contained, every other rotation waits for Vault (the next pass resumes them)",
            err=True,
        )
        if code is not ExitCode.ATTENTION:
            _finish(for_error(result.vault_error))
    if code is ExitCode.ATTENTION:
        _report_troubled(newly_troubled(handled.values(), trails, started))
    elif code is ExitCode.BACKEND:
        _report_waiting(waiting(handled.values(), started, finished))
    elif code is ExitCode.UNRESOLVED:
        _report_unresolved(unresolved(standing))
    _finish(code)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--user", "user_name", metavar="NAME", help="Only this user's rotations.")
@click.option("--limit", default=50, show_default=True, help="How many closed rotations to show.")
@pass_ctx
@handle_errors
def status(obj: Context, as_json: bool, user_name: str | None, limit: int) -> None:
    """Open and recent rotations with their state. Reads only the state store.

    Exit 4 when a rotation it shows is BLOCKED or is a user's latest and FAILED, else 0
    (status changes nothing, so it never exits 1).
    """
    if user_name is not None:
        check_user_name(user_name, "--user")
    app = obj.app(need_vault=False)
    try:
        started = app.now()
        rotations = app.store.list_recent(limit=limit, user_name=user_name)
        events = {r.id: app.store.events(r.id) for r in rotations} if user_name else {}
        dead = app.store.dead_letters()
    finally:
        app.close()
    code = exit_code(started=started, now=started, standing=rotations)
    if as_json:
        docs = [rotation_json(r) for r in rotations]
        if user_name:
            for doc in docs:
                doc["events"] = [
                    {
                        "at": iso(e.at),
                        "from": e.from_state.value if e.from_state else None,
                        "to": e.to_state.value,
                        "reason": e.reason,
                    }
                    for e in events[doc["id"]]
                ]
        kept = [
            {"source": src, "message_id": mid, "received_at": iso(at), "error": err}
            for src, mid, at, err in dead
        ]
        click.echo(json.dumps({"rotations": docs, "dead_letters": kept}, indent=2))
        _finish(code)
    click.echo(rotations_text(rotations))
    if dead:
        click.echo(
            f"\n{len(dead)} leak event(s) could not be used and are kept in the state store "
            "(table dead_letters); the latest:"
        )
        for src, mid, at, err in dead[-5:]:
            click.echo(f"  {iso(at)}  {src} {mid}: {err}")
    for r in rotations:
        if r.waiting_on:
            click.echo(f"{r.user_name}: {r.waiting_on}")
    for rid, trail in events.items():
        click.echo(f"\nevents of {rid}:")
        for e in trail:
            origin = e.from_state.value if e.from_state else "-"
            click.echo(f"  {iso(e.at)}  {origin} -> {e.to_state.value}  {e.reason}")
    _finish(code)


@cli.command()
@click.argument("user")
@click.option("--account", "account_id", metavar="ID", help="Account id (default: the first).")
@click.option(
    "--key", "key_id", metavar="KEY_ID", help="The key to replace (default: the active one)."
)
@click.option("--leaked", is_flag=True, help="Contain first: deactivate that key at once.")
@click.option(
    "--force",
    is_flag=True,
    help="Rotate a user that selection exempts or excludes (a leak is contained regardless).",
)
@click.option("--reason", metavar="TEXT", help="Why (kept in the event trail), e.g. a ticket id.")
@click.option(
    "--overlap",
    metavar="DURATION",
    help="Keep the old key active this long instead of policy.overlap (e.g. 0s, 2h).",
)
@click.option(
    "--console",
    is_flag=True,
    help="Rotate the console password instead: a new one into Vault "
    "(vault.console_path_template), then into IAM with a reset required at the next sign-in.",
)
@click.option(
    "--create",
    is_flag=True,
    help="With --console: give a user without console access a login profile.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the rotation as JSON.")
@pass_ctx
@handle_errors
def rotate(
    obj: Context,
    user: str,
    account_id: str | None,
    key_id: str | None,
    leaked: bool,
    force: bool,
    reason: str | None,
    overlap: str | None,
    console: bool,
    create: bool,
    as_json: bool,
) -> None:
    """Force a rotation of USER's key now and advance it at once (incident response).

    A user with no key gets a first key, stored in Vault. With --leaked the key is
    deactivated first, whatever the overlap. A user that `selection` exempts or excludes
    is refused (exit 2, saying why) unless --force is given; a leak is contained whatever
    the selection says. Exit 1 if the rotation ends FAILED or
    BLOCKED; 2 for a USER that is not an IAM user name (checked before anything is
    touched) or that IAM does not know; 3 when a backend is down, also when the rotation
    now waits to retry before its new key was stored (the next pass continues it).

    With --console the console password is rotated instead (a password seen in a ticket,
    a person leaving): a new random one that the account's password policy accepts is
    written to Vault, then set in IAM with a reset required at the next sign-in. A user
    without console access is refused (exit 2) unless --create is given (and one that has
    it, with --create). The command prints where the new password is and how to read it
    (`bao kv get -mount=<mount> -field=password <console path>`).
    """
    check_user_name(user)
    if console and (leaked or key_id or overlap):
        raise BadInput(
            "--console replaces the password: --leaked, --key and --overlap are for keys"
        )
    if create and not console:
        raise BadInput("--create gives console access: use it with --console")
    overlap_td: timedelta | None = None
    if overlap is not None:
        try:
            overlap_td = parse_duration(overlap)
        except ValueError as exc:
            raise BadInput(f"--overlap: {exc}") from exc
    app = obj.app(need_vault=not leaked)  # containment needs IAM only
    try:
        started = app.now()
        request = ForcedRotation(
            user,
            account_id,
            key_id,
            leaked,
            reason,
            overlap_td,
            force=force,
            kind=RotationKind.CONSOLE if console else RotationKind.KEY,
            create=create,
        )
        rotation = app.force(request)
        # A leak may also have reset the user's console password (leaks.reset_console_password).
        reset = None
        if leaked:
            latest = app.store.latest_for(rotation.account_id, user, RotationKind.CONSOLE)
            if latest is not None and latest.created_at >= started:
                reset = latest
        handled = [rotation] if reset is None else [rotation, reset]
        trails = _trails(app, handled)
        hints = [_console_hint(app, r) for r in handled]
        finished = app.now()
    finally:
        app.close()
    if as_json:
        doc = rotation_json(rotation)
        if reset is not None:
            doc["console_reset"] = rotation_json(reset)
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(rotations_text(handled))
        for hint in hints:
            if hint:
                click.echo(hint)
    _exit_for_handled(handled, trails, started, finished)


def _console_hint(app: App, r: Rotation) -> str | None:
    """For a console rotation that is DONE: where the new password is, and the command
    that reads it (never the password itself)."""
    if r.kind is not RotationKind.CONSOLE or r.state is not State.DONE:
        return None
    mount = app.settings.vault.mount
    path = app.secrets.console_path_for(r.account_id, r.user_name)
    return (
        f"{r.user_name}: the new console password is in Vault at {mount}/{path} (version "
        f"{r.vault_version}); read it with: bao kv get -mount={mount} -field=password {path}"
    )


@cli.command()
@click.argument("user")
@click.option("--account", "account_id", metavar="ID", help="Account id (default: the first).")
@click.option("--reason", metavar="TEXT", default="operator rollback", show_default=True)
@pass_ctx
@handle_errors
def rollback(obj: Context, user: str, account_id: str | None, reason: str) -> None:
    """Reactivate the old key of USER's latest rotation while it still exists, and
    mark the rotation ROLLED_BACK. The new key stays in Vault and active. Exit 2 when
    there is nothing to roll back."""
    check_user_name(user)
    app = obj.app()
    try:
        account = account_id or app.accounts()[0]
        latest = app.store.latest_for(account, user)
        if latest is None:
            raise BadInput(f"no rotation recorded for {user} in {account}")
        rotation = app.engine.rollback(latest, reason)
    finally:
        app.close()
    click.echo(
        f"{user}: old key {rotation.old_key_id} is active again; rotation {rotation.id} ROLLED_BACK"
    )


@cli.command("leak-event")
@click.argument("source", metavar="PATH|-")
@click.option("--json", "as_json", is_flag=True, help="Print the rotations as JSON.")
@pass_ctx
@handle_errors
def leak_event(obj: Context, source: str, as_json: bool) -> None:
    """Contain and rotate every key an AWS Health event names.

    SOURCE is a file holding the event as EventBridge delivers it (source aws.health,
    service RISK, e.g. AWS_RISK_CREDENTIALS_EXPOSED), or - for stdin. Each key is
    deactivated at once, then replaced; the user is found with GetAccessKeyLastUsed.
    Malformed input exits 2 with a one-line message, before any backend is touched.
    Exit 1 if a rotation it handled is FAILED or BLOCKED; 3 when a backend is down, also
    when a rotation now waits to retry before its new key was stored.
    """
    try:
        if source == "-":
            raw = sys.stdin.buffer.read(MAX_EVENT_BYTES + 1)
        else:
            with open(source, "rb") as handle:
                raw = handle.read(MAX_EVENT_BYTES + 1)
    except OSError as exc:
        raise BadInput(f"cannot read {source}: {exc.strerror}") from exc
    parse_event(raw)  # malformed input fails here, before any backend is touched
    # Containment needs IAM only: a Vault token that is missing or refused must not
    # stop it (the replacements then fail, saying why, after every key is off).
    app = obj.app(need_vault=False)
    try:
        started = app.now()
        handled = app.handle_event(raw)
        rotations = handled.rotations
        trails = _trails(app, rotations)
        finished = app.now()
    finally:
        app.close()
    if as_json:
        doc = {"rotations": [rotation_json(r) for r in rotations], "notes": handled.notes}
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(rotations_text(rotations))
        for note in handled.notes:
            click.echo(f"note: {note}")
    _exit_for_handled(rotations, trails, started, finished)


@cli.command()
@click.argument("user")
@click.option("--key", "key_id", metavar="KEY_ID", required=True, help="The key to turn on.")
@click.option("--account", "account_id", metavar="ID", help="Account id (default: the first).")
@click.option("--reason", metavar="TEXT", default="operator reactivation", show_default=True)
@pass_ctx
@handle_errors
def reactivate(obj: Context, user: str, key_id: str, account_id: str | None, reason: str) -> None:
    """Set USER's key KEY_ID Active again, e.g. one a pass deactivated as unused.

    Its idle clock restarts now: a rule's unused_after counts from this moment, so the
    next pass does not switch it off again (`status --user USER` shows the record).
    Refused (exit 2, saying why) for a key the rotator contained as leaked and for a key
    an open rotation tracks (`rollback` turns a rotation's old key back on); exit 2 too
    for a user or key IAM does not know. A key that is Active already is left as it is
    (exit 0). Needs IAM and the state store, not Vault.
    """
    check_user_name(user)
    app = obj.app(need_vault=False)
    try:
        record = app.reactivate(user, key_id, account_id=account_id, reason=reason)
    finally:
        app.close()
    if record is None:
        click.echo(f"{user}: key {key_id} is Active already; nothing changed")
    else:
        click.echo(
            f"{user}: key {key_id} is Active again (recorded as {record.id}); its idle "
            "clock restarts now"
        )
    _finish(ExitCode.OK)


@cli.command()
@pass_ctx
@handle_errors
def daemon(obj: Context) -> None:
    """Run as a service: scheduled scans and ticks, HTTP health and metrics, until SIGTERM.

    \b
    GET  /healthz   alive
    GET  /readyz    200 when the state store answers and an account was scanned (by
                    any daemon sharing the store) within two scan periods: status
                    "ok", or "degraded" while Vault cannot be used; else 503
    GET  /metrics   Prometheus text format
    POST /v1/rotations   rotation trigger (only with http.trigger_token_file)

    Ready (READY=1) once the state store and AWS answer; Vault is not waited for. While
    Vault cannot be used, scans and the leak queue still contain every leaked key (IAM
    only) and every other rotation waits for Vault; the log, STATUS= and /readyz say so.

    Speaks systemd's notify protocol (READY, WATCHDOG, STATUS, STOPPING) when run as a
    Type=notify unit. SIGHUP re-reads the configuration; an invalid file keeps the old one.

    One process: scans and ticks run on a small thread pool, the leak-queue poller (with
    leaks.sqs_queue_url) on a thread of its own that retries with a growing pause, and
    triggered rotations advance on a pool of four. Memory a scan allocated is given
    back to the operating system when it ends.

    Several daemons may share one state store (state.url: PostgreSQL; see the README,
    "Running several daemons"): each account is scanned by the daemon holding its scan
    lease, each rotation advanced by the daemon holding its lease, and a daemon that
    dies is replaced within the lease times. While the state store cannot be reached a
    daemon does nothing (no scan, tick or leak-queue poll), is not ready, and resumes by
    itself.
    """
    from rotator.daemon import Daemon

    sys.exit(Daemon(obj.settings_loader()).run())


@cli.command()
@click.option("--keep", is_flag=True, help="Leave both servers running until Ctrl-C.")
@click.pass_context
def demo(ctx: click.Context, keep: bool) -> None:
    """Run the whole job on a built-in local AWS (moto) and a local Vault (OpenBao).

    Starts both servers on free loopback ports, seeds about twenty IAM users (fresh,
    aging, overdue, leaked, exempt, blocked), shows the plan, rotates, and shows where
    in Vault each new key now lives. Needs no AWS account and no configuration file.
    """
    from rotator.demo import run as run_demo

    if ctx.parent is not None and ctx.parent.get_parameter_source("log_level") in (
        click.core.ParameterSource.DEFAULT,
        None,
    ):
        obj: Context = ctx.find_object(Context)  # type: ignore[assignment]
        log.configure(obj.log_format, "WARNING")
    try:
        code = run_demo(keep, click.echo)
    except RotatorError as exc:
        _die(ExitCode.BACKEND, str(exc))
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="rotator")
