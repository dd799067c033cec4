"""`rotator report` as a user runs it: a subprocess against the moto server, two accounts,
every format; and the HTML page opened in a real headless browser (Debian's chromium).

The browser test is skipped, saying why, when `chromium` is not on PATH, unless
ROTATOR_REQUIRE_CHROMIUM=1 (as in CI): then it fails instead."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotator.model import KeyStatus, NewKey
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey, free_port
from tests.faultproxy import FaultProxy, aws_error
from tests.rig import rotator

D = timedelta(days=1)
OTHER = "222233334444"
BROKEN = "333344445555"
HOSTILE = "<script>alert(1)</script>"
REQUIRE_CHROMIUM = "ROTATOR_REQUIRE_CHROMIUM"

# What the seed below gives, worked out by hand from the ages and last uses.
TOTALS = {
    ACCOUNT_ID: {
        "keys": 6,
        "active_keys": 5,
        "cis_1_14_over_90_days": 2,  # bob (120d), carol (100d)
        "cis_1_12_unused_over_45_days": 2,  # carol (never used, 100d), dave (50d)
    },
    OTHER: {
        "keys": 1,
        "active_keys": 1,
        "cis_1_14_over_90_days": 1,  # frank (400d, used yesterday)
        "cis_1_12_unused_over_45_days": 0,
    },
}
OVERALL = {
    "keys": 7,
    "active_keys": 6,
    "cis_1_14_over_90_days": 3,
    "cis_1_12_unused_over_45_days": 2,
}
# Per account, per age bucket: (active, inactive).
AGES = {
    ACCOUNT_ID: {
        "0-30": (2, 0),
        "31-60": (1, 0),
        "61-90": (0, 0),
        "91-180": (2, 0),
        ">180": (0, 1),
    },
    OTHER: {"0-30": (0, 0), "31-60": (0, 0), "61-90": (0, 0), "91-180": (0, 0), ">180": (1, 0)},
}


@pytest.fixture
def seeded(aws: LocalAws) -> list[NewKey]:
    """Two accounts: six keys in the first (one inactive), one in the second reached by
    AssumeRole. Returns every key with its secret."""
    now = datetime.now(UTC)
    aws.add_role(OTHER, "rotator")
    keys = [
        *aws.add_user(
            "alice",
            tags={"owner": "alice@example.com", "type": "human"},
            keys=[SeedKey(10 * D, last_used_ago=D)],
            now=now,
        ),
        *aws.add_user(
            "bob", tags={"owner": HOSTILE}, keys=[SeedKey(120 * D, last_used_ago=3 * D)], now=now
        ),
        *aws.add_user("carol", keys=[SeedKey(100 * D)], now=now),
        *aws.add_user("dave", keys=[SeedKey(60 * D, last_used_ago=50 * D)], now=now),
        *aws.add_user(
            "erin",
            keys=[
                SeedKey(200 * D, status=KeyStatus.INACTIVE),
                SeedKey(30 * D, last_used_ago=2 * D),
            ],
            now=now,
        ),
        *aws.add_user("frank", keys=[SeedKey(400 * D, last_used_ago=D)], now=now, account_id=OTHER),
    ]
    return keys


def write_config(aws: LocalAws, tmp_path: Path, *extra_accounts: dict[str, str]) -> Path:
    path = tmp_path / "rotator.yaml"
    data = {
        "aws": {
            "endpoint_url": aws.endpoint_url,
            "region": "us-east-1",
            "accounts": [
                {"id": ACCOUNT_ID},
                {"id": OTHER, "role_arn": f"arn:aws:iam::{OTHER}:role/rotator"},
                *extra_accounts,
            ],
        },
        "state": {"path": str(tmp_path / "state.db")},
        "rules": [{"name": "humans", "match": {"tag": {"type": "human"}}, "max_age": "180d"}],
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def config(aws: LocalAws, seeded: list[NewKey], tmp_path: Path) -> Path:
    return write_config(aws, tmp_path)


def report(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return rotator("--config", str(config), "report", *args)


# --- the formats ------------------------------------------------------------------------


def test_report_json_totals_match_the_seeded_keys(
    aws: LocalAws, seeded: list[NewKey], config: Path
) -> None:
    """The JSON counts 3 active keys older than 90 days (CIS 1.14) and 2 unused beyond 45
    days (CIS 1.12), per account and overall, lists every key with its owner and rule,
    and changes nothing in IAM."""
    before = {u: aws.keys(u) for u in ("alice", "bob", "carol", "dave", "erin")}
    done = report(config, "--format", "json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["totals"] == OVERALL
    assert {a["account_id"]: a["totals"] for a in doc["accounts"]} == TOTALS
    assert doc["failed_accounts"] == {}
    assert len(doc["keys"]) == 7
    by_user = {k["user_name"]: k for k in doc["keys"] if k["status"] == "Active"}
    assert by_user["alice"]["owner"] == "alice@example.com"
    assert by_user["alice"]["rule"] == "humans"
    assert by_user["bob"]["owner"] == HOSTILE
    assert by_user["bob"]["rule"] == "default"
    assert by_user["carol"]["owner"] is None
    assert by_user["carol"]["last_used_at"] is None
    assert by_user["carol"]["days_since_last_use"] == 100
    assert by_user["frank"]["account_id"] == OTHER
    assert by_user["frank"]["age_days"] == 400
    ages = {
        a["account_id"]: {
            b["bucket"]: (b["active"], b["inactive"]) for b in a["age_days_distribution"]
        }
        for a in doc["accounts"]
    }
    assert ages == AGES
    assert {u: aws.keys(u) for u in before} == before, "report must not change IAM"


def test_report_csv_has_one_row_per_key(seeded: list[NewKey], config: Path) -> None:
    """The CSV parses with the csv module: a header, then one row per seeded key (seven,
    in both accounts) and no totals row; the hostile owner tag is kept verbatim."""
    done = report(config, "--format", "csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout, newline="")))
    assert len(rows) == len(seeded) == 7
    assert sorted((r["account_id"], r["user_name"]) for r in rows) == sorted(
        [(ACCOUNT_ID, u) for u in ("alice", "bob", "carol", "dave", "erin", "erin")]
        + [(OTHER, "frank")]
    )
    ids = {k.access_key_id for k in seeded}
    assert {r["access_key_id"] for r in rows} <= ids | {""}
    assert sum(r["cis_1_14_over_90_days"] == "true" for r in rows) == 3
    assert sum(r["cis_1_12_unused_over_45_days"] == "true" for r in rows) == 2
    assert next(r["owner"] for r in rows if r["user_name"] == "bob") == HOSTILE


def test_report_html_escapes_a_script_in_an_owner_tag(
    seeded: list[NewKey], config: Path, tmp_path: Path
) -> None:
    """The owner tag `<script>alert(1)</script>` appears escaped in the page, which holds
    no script element; the page has one chart per account."""
    done = report(config, "--format", "html")
    assert done.returncode == 0, done.stderr
    page = done.stdout
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page.lower()
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg" class="age-chart"') == 2


def test_report_output_file_is_replaced_with_mode_0640(config: Path, tmp_path: Path) -> None:
    """--output writes the file (nothing on stdout), mode 0640, replacing an older one,
    and leaves no temporary file beside it."""
    target = tmp_path / "out" / "report.json"
    target.parent.mkdir()
    target.write_text("old")
    target.chmod(0o644)
    done = report(config, "--format", "json", "--output", str(target))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert json.loads(target.read_text())["totals"] == OVERALL
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_report_holds_no_secret_in_any_format(seeded: list[NewKey], config: Path) -> None:
    """The secrets of every seeded key appear in no format (a scan reads none; this
    guards that nothing ever adds one)."""
    for fmt in ("csv", "json", "html"):
        done = report(config, "--format", fmt)
        assert done.returncode == 0, done.stderr
        shown = [k.access_key_id for k in seeded if k.access_key_id in done.stdout]
        assert shown, f"{fmt}: no key id at all, so the check below would prove nothing"
        for key in seeded:
            assert key.secret_access_key not in done.stdout, fmt
            assert key.secret_access_key not in done.stderr, fmt


# --- exit codes -------------------------------------------------------------------------


def test_report_with_an_account_that_cannot_be_scanned_exits_1_and_names_it(
    aws: LocalAws, seeded: list[NewKey], tmp_path: Path
) -> None:
    """An account whose role cannot be assumed: the report covers the others, lists it
    under failed_accounts (the HTML says it is incomplete), names it on stderr, exit 1."""
    broken_role = f"arn:aws:iam::{BROKEN}:role/missing"
    config = write_config(aws, tmp_path, {"id": BROKEN, "role_arn": broken_role})
    # moto accepts any AssumeRole; real AWS refuses a role that is missing.
    with FaultProxy(aws.endpoint_url) as proxy:
        proxy.add(
            lambda request: request.form.get("RoleArn") == broken_role,
            aws_error("AccessDenied", 403, "User is not authorized to perform: sts:AssumeRole"),
        )
        config.write_text(config.read_text().replace(aws.endpoint_url, proxy.url))
        done = report(config, "--format", "json")
        page = report(config, "--format", "html")
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert list(doc["failed_accounts"]) == [BROKEN]
    assert "sts:AssumeRole" in doc["failed_accounts"][BROKEN]
    assert doc["totals"] == OVERALL
    assert BROKEN in done.stderr
    assert page.returncode == 1, page.stderr
    assert f"account {BROKEN}: " in page.stdout
    assert "Incomplete" in page.stdout


def test_report_to_a_missing_directory_exits_2_before_any_backend(tmp_path: Path) -> None:
    """An --output whose directory does not exist is a usage error (2), found before AWS
    is asked: the AWS endpoint here answers nobody, which would be exit 3."""
    config = tmp_path / "rotator.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "aws": {"endpoint_url": f"http://127.0.0.1:{free_port()}"},
                "state": {"path": str(tmp_path / "state.db")},
            }
        )
    )
    missing = tmp_path / "nowhere" / "report.html"
    done = rotator(
        "--config", str(config), "report", "--format", "html", "--output", str(missing),
        env={"AWS_MAX_ATTEMPTS": "1"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "does not exist" in done.stderr
    unreached = rotator(
        "--config", str(config), "report", "--format", "html", env={"AWS_MAX_ATTEMPTS": "1"}
    )
    assert unreached.returncode == 3, unreached.stderr


def test_report_refuses_an_unknown_format(config: Path) -> None:
    """--format pdf is a usage error naming the choices."""
    done = report(config, "--format", "pdf")
    assert done.returncode == 2
    assert "csv" in done.stderr
    assert "html" in done.stderr


def test_report_help_explains_formats_and_controls() -> None:
    """`rotator report --help` says what each format is for and which CIS controls the
    totals count."""
    done = rotator("report", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for phrase in (
        "CIS 1.14 older than 90 days",
        "CIS 1.12 not used for more than 45 days",
        "csv a header row",
        "json {",
        "html one self-contained page",
        "Active keys only",
    ):
        assert phrase in text, phrase


# --- in a real browser --------------------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    """The `chromium` executable; skips (or fails, with ROTATOR_REQUIRE_CHROMIUM=1)
    without it."""
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get(REQUIRE_CHROMIUM) == "1":
            pytest.fail(f"chromium is not on PATH, and {REQUIRE_CHROMIUM}=1 requires it")
        pytest.skip(
            "chromium is not on PATH (apt-get install chromium); "
            f"set {REQUIRE_CHROMIUM}=1 to fail instead of skipping"
        )
    return found


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with a throw-away profile (root needs --no-sandbox)."""
    return subprocess.run(
        [
            binary,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


class ChartReader(HTMLParser):
    """The charts of a DOM as Chromium serialised it: per `svg.age-chart`, its account
    and per bar its data and the heights of its rectangles; plus the page's text and
    how many script elements it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: list[dict[str, Any]] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "script":
            self.scripts += 1
        elif tag == "svg" and "age-chart" in a.get("class", "").split():
            self.charts.append({"account": a["data-account"], "bars": {}})
        elif tag == "g" and a.get("class") == "bar":
            self.charts[-1]["bars"][a["data-bucket"]] = {
                "counts": (int(a["data-active"]), int(a["data-inactive"])),
                "heights": {},
            }
        elif tag == "rect" and a.get("class") in ("active", "inactive"):
            bars = self.charts[-1]["bars"]
            bars[list(bars)[-1]]["heights"][a["class"]] = float(a["height"])

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def png_rows(data: bytes) -> Iterator[bytes]:
    """The RGB(A) rows of an 8-bit, non-interlaced PNG (what Chromium's --screenshot
    writes), decoded with zlib and PNG's five row filters."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = bpp = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, colour in (2, 6), interlace) == (8, True, 0), "unexpected PNG format"
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = prev[i]
            corner = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                guess = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + guess) & 0xFF
        yield bytes(line[i] for i in range(stride) if bpp == 3 or i % 4 != 3)
        prev = line


def count_colours(
    png: bytes, colours: list[tuple[int, int, int]], tolerance: int = 12
) -> list[int]:
    """How many pixels of the screenshot are within `tolerance` of each of `colours`."""
    found = [0] * len(colours)
    for row in png_rows(png):
        for x in range(0, len(row), 3):
            for n, rgb in enumerate(colours):
                if all(abs(row[x + c] - rgb[c]) <= tolerance for c in range(3)):
                    found[n] += 1
    return found


# The bars' fills in rotator/compliance.py: active keys up to 90 days, and beyond.
BLUE = (0x2B, 0x6C, 0xB0)
RED = (0xB7, 0x31, 0x2C)


def test_html_report_in_headless_chromium_shows_one_chart_per_account(
    config: Path, tmp_path: Path, chromium: str
) -> None:
    """Chromium renders the page: its DOM holds one SVG chart per account whose bars
    carry the seeded counts with heights proportional to them, no script element, and
    the hostile owner as text; the screenshot shows the bars' colours (not a blank
    page)."""
    page = tmp_path / "report.html"
    done = report(config, "--format", "html", "--output", str(page))
    assert done.returncode == 0, done.stderr

    dumped = run_chromium(chromium, tmp_path / "profile", "--dump-dom", page.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = ChartReader()
    dom.feed(dumped.stdout)
    assert dom.scripts == 0
    assert HOSTILE in "".join(dom.text)
    assert [c["account"] for c in dom.charts] == [ACCOUNT_ID, OTHER]
    for chart in dom.charts:
        bars = chart["bars"]
        assert {b: bar["counts"] for b, bar in bars.items()} == AGES[chart["account"]]
        # One scale per chart: every rectangle is its count times the same height.
        per_key = {
            round(bar["heights"][cls] / count, 2)
            for bar in bars.values()
            for cls, count in zip(("active", "inactive"), bar["counts"], strict=True)
            if count
        }
        assert len(per_key) == 1, per_key
        assert per_key.pop() > 0
        for bar in bars.values():
            drawn = {cls for cls, n in zip(("active", "inactive"), bar["counts"], strict=True) if n}
            assert set(bar["heights"]) == drawn

    shot = tmp_path / "report.png"
    taken = run_chromium(
        chromium,
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1200,900",
        page.as_uri(),
    )
    assert taken.returncode == 0, taken.stderr[-2000:]
    png = shot.read_bytes()
    # A 56-pixel-wide bar of one key is about 56 x 90 pixels at these counts.
    blue, red = count_colours(png, [BLUE, RED])
    assert blue > 2000, "no bar of young active keys on screen"
    assert red > 2000, "no bar of active keys older than 90 days on screen"
