"""The compliance report's pure part: rows, CIS totals and their boundaries, the CSV, JSON
and HTML renderings, on hand-built decisions."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta

from rotator.compliance import (
    CSV_COLUMNS,
    OWNER_TAG,
    Totals,
    build_report,
    to_csv,
    to_html,
    to_json,
)
from rotator.inventory import Inventory
from rotator.model import AccessKey, Decision, IamUser, KeyDecision, KeyStatus

NOW = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
D = timedelta(days=1)
ACCOUNT = "111122223333"
OTHER = "444455556666"


def decided(
    name: str,
    age: timedelta,
    *,
    last_used: timedelta | None = None,
    status: KeyStatus = KeyStatus.ACTIVE,
    tags: dict[str, str] | None = None,
    account: str = ACCOUNT,
    decision: Decision = Decision.OK,
    reason: str = "younger than warn_age",
    rule: str = "default",
    key_id: str | None = None,
) -> KeyDecision:
    """A decision for one key of `name`, `age` old at NOW, last used `last_used` ago."""
    user = IamUser(account, name, f"arn:aws:iam::{account}:user/{name}", tags=tags or {})
    key = AccessKey(
        key_id or f"AKIA{name.upper():X<12}"[:16],
        status,
        NOW - age,
        None if last_used is None else NOW - last_used,
    )
    return KeyDecision(user, key, decision, reason, rule=rule)


def inventory(*decisions: KeyDecision, account: str = ACCOUNT) -> Inventory:
    return Inventory(account, [], list(decisions), "credential_report")


def totals_of(*decisions: KeyDecision) -> Totals:
    return build_report([inventory(*decisions)], NOW).totals


# --- CIS 1.14: older than 90 days ---------------------------------------------------------


def test_a_key_exactly_90_days_old_is_not_counted_by_cis_1_14() -> None:
    """CIS 1.14 allows 90 days: a key exactly 90 days old (and one 90 days and 23 hours
    old, still 90 whole days) is compliant; one 91 days old is counted."""
    assert totals_of(decided("a", 90 * D, last_used=D)).over_max_age == 0
    assert totals_of(decided("a", 90 * D + timedelta(hours=23), last_used=D)).over_max_age == 0
    assert totals_of(decided("a", 91 * D, last_used=D)).over_max_age == 1


def test_inactive_keys_are_left_out_of_both_cis_totals() -> None:
    """An Inactive key, however old and unused, is counted as a key but by neither
    control: it cannot sign a request."""
    totals = totals_of(decided("a", 400 * D, status=KeyStatus.INACTIVE))
    assert totals == Totals(keys=1, active_keys=0, over_max_age=0, unused=0)


def test_exempt_keys_are_counted_by_the_controls_all_the_same() -> None:
    """The rotator's decision does not excuse a key from the benchmark: an exempt user's
    old, unused key is counted by both controls."""
    totals = totals_of(decided("a", 200 * D, decision=Decision.EXEMPT, reason="tag"))
    assert (totals.over_max_age, totals.unused) == (1, 1)


# --- CIS 1.12: unused beyond 45 days ------------------------------------------------------


def test_a_key_last_used_exactly_45_days_ago_is_not_counted_by_cis_1_12() -> None:
    """45 days without use is still allowed; from 46 whole days on the key is counted."""
    assert totals_of(decided("a", 60 * D, last_used=45 * D)).unused == 0
    assert totals_of(decided("a", 60 * D, last_used=45 * D + timedelta(hours=23))).unused == 0
    assert totals_of(decided("a", 60 * D, last_used=46 * D)).unused == 1


def test_a_never_used_key_counts_as_unused_from_its_creation() -> None:
    """A key never used is unused once it was created more than 45 days ago, and not
    before; its days since last use are its age."""
    young = build_report([inventory(decided("a", 45 * D))], NOW)
    old = build_report([inventory(decided("a", 46 * D))], NOW)
    assert young.totals.unused == 0
    assert old.totals.unused == 1
    assert old.rows[0].days_since_last_use == 46
    assert old.rows[0].last_used_at is None


def test_a_recently_used_old_key_is_over_age_but_not_unused() -> None:
    """The two controls are independent: a 200-day-old key used yesterday fails 1.14
    only, a 50-day-old key unused for 47 days fails 1.12 only."""
    report = build_report(
        [
            inventory(
                decided("old", 200 * D, last_used=D), decided("idle", 50 * D, last_used=47 * D)
            )
        ],
        NOW,
    )
    flags = {r.user_name: (r.over_max_age, r.unused) for r in report.rows}
    assert flags == {"old": (True, False), "idle": (False, True)}


# --- grouping ---------------------------------------------------------------------------


def test_totals_are_per_account_and_overall() -> None:
    """Each account gets its own totals, and the overall totals are their sums."""
    first = inventory(
        decided("a", 100 * D, last_used=D),
        decided("b", 10 * D),
        decided("c", 300 * D, status=KeyStatus.INACTIVE),
    )
    second = inventory(decided("d", 120 * D, account=OTHER), account=OTHER)
    report = build_report([first, second], NOW)
    by_account = {a.account_id: a.totals for a in report.accounts}
    assert by_account == {
        ACCOUNT: Totals(keys=3, active_keys=2, over_max_age=1, unused=0),
        OTHER: Totals(keys=1, active_keys=1, over_max_age=1, unused=1),
    }
    assert report.totals == Totals(keys=4, active_keys=3, over_max_age=2, unused=1)


def test_age_distribution_puts_the_90_day_boundary_between_buckets() -> None:
    """Ages 30/31, 60/61, 90/91 and 180/181 fall on either side of a bucket boundary;
    inactive keys are counted apart from active ones."""
    report = build_report(
        [
            inventory(
                *(decided(f"u{n}", n * D, last_used=D) for n in (0, 30, 31, 60, 61, 90, 91)),
                decided("u180", 180 * D, last_used=D),
                decided("u181", 181 * D, status=KeyStatus.INACTIVE),
            )
        ],
        NOW,
    )
    ages = {b.bucket.label: (b.active, b.inactive) for b in report.accounts[0].ages}
    assert ages == {
        "0-30": (2, 0),
        "31-60": (2, 0),
        "61-90": (2, 0),
        "91-180": (2, 0),
        ">180": (0, 1),
    }


def test_owner_comes_from_the_owner_tag() -> None:
    """The owner is the value of the `owner` tag; a user without it has none, and
    another tag name can be asked for."""
    tagged = decided("a", D, tags={OWNER_TAG: "alice@example.com", "team": "data"})
    bare = decided("b", D)
    report = build_report([inventory(tagged, bare)], NOW)
    assert [r.owner for r in report.rows] == ["alice@example.com", None]
    by_team = build_report([inventory(tagged)], NOW, owner_tag="team")
    assert by_team.rows[0].owner == "data"


# --- CSV --------------------------------------------------------------------------------


def test_csv_quotes_commas_quotes_and_line_breaks_per_rfc_4180() -> None:
    """A reason holding a comma, a double quote and a line break, and an owner holding a
    comma, come back intact through the csv module; lines end with CRLF."""
    reason = 'older than max_age 90d, "rotate"\nnow'
    report = build_report(
        [inventory(decided("a", 100 * D, tags={"owner": "Doe, Jane"}, reason=reason))], NOW
    )
    text = to_csv(report)
    assert '"older than max_age 90d, ""rotate""\nnow"' in text
    assert text.endswith("\r\n")
    assert text.split("\r\n")[0] == ",".join(CSV_COLUMNS)
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(rows) == 1
    assert rows[0]["reason"] == reason
    assert rows[0]["owner"] == "Doe, Jane"


def test_csv_has_one_row_per_key_and_no_totals_row() -> None:
    """Header, then exactly one row per key, every row with every column; a key never
    used says "never"."""
    report = build_report(
        [inventory(decided("a", 100 * D), decided("b", 10 * D, last_used=D, key_id=None))], NOW
    )
    rows = list(csv.reader(io.StringIO(to_csv(report), newline="")))
    assert rows[0] == list(CSV_COLUMNS)
    assert len(rows) == 3
    assert all(len(r) == len(CSV_COLUMNS) for r in rows)
    by_user = {r[1]: dict(zip(CSV_COLUMNS, r, strict=True)) for r in rows[1:]}
    assert by_user["a"]["last_used_at"] == "never"
    assert by_user["a"]["cis_1_14_over_90_days"] == "true"
    assert by_user["a"]["cis_1_12_unused_over_45_days"] == "true"
    assert by_user["b"]["cis_1_14_over_90_days"] == "false"
    assert by_user["b"]["access_key_id"].startswith("AKIAB")


def test_csv_makes_a_formula_in_a_tag_inert() -> None:
    """An owner tag a spreadsheet would run as a formula gets a leading apostrophe;
    an ordinary value is left as it is."""
    report = build_report(
        [
            inventory(
                decided("a", D, tags={"owner": '=HYPERLINK("http://evil.example","x")'}),
                decided("b", D, tags={"owner": "bob@example.com"}),
            )
        ],
        NOW,
    )
    rows = list(csv.DictReader(io.StringIO(to_csv(report), newline="")))
    assert [r["owner"] for r in rows] == [
        '\'=HYPERLINK("http://evil.example","x")',
        "bob@example.com",
    ]


# --- JSON -------------------------------------------------------------------------------


def test_json_document_has_totals_accounts_and_keys() -> None:
    """The JSON names the controls in its totals, per account and overall, and lists
    every key with null for a last use that never happened."""
    report = build_report(
        [inventory(decided("a", 100 * D, rule="humans"), decided("b", 10 * D, last_used=D))],
        NOW,
        failed_accounts={OTHER: "AccessDenied"},
    )
    doc = json.loads(to_json(report))
    assert set(doc) == {
        "generated_at",
        "accounts",
        "failed_accounts",
        "totals",
        "keys",
        "console_totals",
        "console",
    }
    expected = {
        "keys": 2,
        "active_keys": 2,
        "cis_1_14_over_90_days": 1,
        "cis_1_12_unused_over_45_days": 1,
    }
    assert doc["totals"] == expected
    assert doc["accounts"][0]["totals"] == expected
    assert doc["failed_accounts"] == {OTHER: "AccessDenied"}
    assert doc["generated_at"] == "2026-11-28T09:00:00Z"
    first = doc["keys"][0]
    assert (first["user_name"], first["rule"], first["last_used_at"]) == ("a", "humans", None)
    assert first["age_days"] == 100


# --- HTML -------------------------------------------------------------------------------

HOSTILE = "<script>alert(1)</script>"


def test_html_escapes_every_string_from_iam() -> None:
    """A script in an owner tag, in a reason and in a rule name appears as text, never
    as markup: the page holds no <script> element at all."""
    report = build_report(
        [inventory(decided("a", D, tags={"owner": HOSTILE}, reason=f'x"{HOSTILE}', rule=HOSTILE))],
        NOW,
    )
    page = to_html(report)
    assert "<script" not in page.lower()
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 3
    assert "x&quot;&lt;script&gt;" in page


def test_html_is_self_contained() -> None:
    """No external stylesheet, script, image, font or link: nothing is fetched, and a
    Content-Security-Policy forbids anything but the inline style."""
    page = to_html(build_report([inventory(decided("a", 100 * D))], NOW))
    assert not re.search(r"<(script|link|img|iframe|object)\b", page, re.IGNORECASE)
    assert not re.search(r"(src|href)\s*=", page, re.IGNORECASE)
    assert not re.search(r"url\((?!#)", page), "a url() other than a fragment of the page"
    assert "@import" not in page
    assert "default-src 'none'; style-src 'unsafe-inline'" in page
    assert "<style>" in page


def test_html_draws_one_chart_per_account_with_bars_proportional_to_counts() -> None:
    """Each account gets its own SVG chart; each bar's height is its count times one
    scale, the bar beyond 90 days is marked, and every bar carries a <title>."""
    first = inventory(
        decided("a", 10 * D, last_used=D),
        decided("b", 100 * D, last_used=D),
        decided("c", 120 * D, last_used=D),
        decided("d", 200 * D, status=KeyStatus.INACTIVE),
    )
    second = inventory(decided("e", 40 * D, account=OTHER), account=OTHER)
    page = to_html(build_report([first, second], NOW))
    charts = re.findall(r"<svg .*?</svg>", page, re.DOTALL)
    assert [re.findall(r'data-account="(\d+)"', c) for c in charts] == [[ACCOUNT], [OTHER]]
    bars = re.findall(r'<g class="bar" data-bucket="([^"]+)".*?>(.*?)</g>', charts[0], re.DOTALL)
    heights = {
        (cls, bucket): float(h)
        for bucket, body in bars
        for cls, h in re.findall(r'<rect class="(\w+)"[^>]*height="([\d.]+)"', body)
    }
    assert heights[("active", "91-180")] == 2 * heights[("active", "0-30")]
    assert heights[("inactive", "&gt;180")] == heights[("active", "0-30")]
    assert ("active", "31-60") not in heights
    assert charts[0].count("<title") == 1 + 5  # the chart's, then one per bar
    assert "90 days (CIS 1.14)" in charts[0]
