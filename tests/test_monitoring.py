"""Monitoring as code: the Prometheus alerting rules and their promtool unit tests, the
Grafana dashboard and the README's alert table, held to the metrics rotator exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from rotator.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rotator-alerts.yml"
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "rotator.json"
README = ROOT / "README.md"

# Labels Prometheus attaches to every scraped series (the target's), not the exporter's.
TARGET_LABELS = frozenset({"instance", "job"})
SEVERITIES = frozenset({"warning", "critical"})
# `x and on (instance, account) (rotator_scan_lease_held == 1)`: x as the daemon holding
# the account's scan lease saw it (the others keep what their own last scan saw).
HOLDER_FILTER = "rotator_scan_lease_held"


# --- the metrics rotator exports ----------------------------------------------------------


def exported_series(registry: CollectorRegistry, owner: object) -> dict[str, frozenset[str]]:
    """Every series name the registry exposes, with the labels it may carry: a counter
    `x` as `x_total` (and `x_created`), a histogram as `_bucket` (with `le`), `_sum`,
    `_count` and `_created`. `owner` is the object holding the metric wrappers:
    prometheus_client offers no public accessor for a metric's label names."""
    wrappers = {
        wrapper._name: wrapper
        for wrapper in vars(owner).values()
        if isinstance(wrapper, MetricWrapperBase)
    }
    series: dict[str, frozenset[str]] = {}
    for family in registry.collect():
        assert family.name in wrappers, f"{family.name}: no metric wrapper to read labels from"
        labels = frozenset(wrappers[family.name]._labelnames)
        suffixes: dict[str, Mapping[str, frozenset[str]]] = {
            "gauge": {"": frozenset()},
            "counter": {"_total": frozenset(), "_created": frozenset()},
            "histogram": {
                "_bucket": frozenset({"le"}),
                "_sum": frozenset(),
                "_count": frozenset(),
                "_created": frozenset(),
            },
        }
        assert family.type in suffixes, f"{family.name}: metric type {family.type} not handled"
        for suffix, extra in suffixes[family.type].items():
            series[family.name + suffix] = labels | extra
    return series


@pytest.fixture(scope="module")
def exported() -> dict[str, frozenset[str]]:
    """The series rotator's `/metrics` can show, from `Metrics().registry`."""
    metrics = Metrics()
    return exported_series(metrics.registry, metrics)


def test_exported_series_names_counters_and_histograms_by_their_suffixes(
    exported: dict[str, frozenset[str]],
) -> None:
    """The catalogue the checks below use has counters under `_total`, histogram
    buckets with `le`, and gauges with their labels, and not a counter's bare name."""
    assert exported["rotator_fenced_writes_total"] == frozenset()
    assert "rotator_fenced_writes" not in exported
    assert exported["rotator_scan_duration_seconds_bucket"] == {"le"}
    assert "rotator_scan_duration_seconds_count" in exported
    assert exported["rotator_keys"] == {"account", "decision"}
    assert exported["rotator_rotations_finished_total"] == {"account", "kind", "reason", "result"}


# --- reading PromQL -----------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<range>\[[^\]]*\])
    | (?P<number>(?:\d+(?:ms|[smhdwy]))+(?![\w:])
                 |0x[0-9a-fA-F]+
                 |(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}])
    | (?P<space>\s+)
    """,
    re.VERBOSE,
)
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})
# Aggregations may put their by/without list before the "(" of their arguments.
_AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile", "limitk", "limit_ratio"}
)


@dataclass(frozen=True)
class Selector:
    """One series selector: a metric name and its label matchers (label, op, value)."""

    name: str
    matchers: tuple[tuple[str, str, str], ...] = ()

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(label for label, _, _ in self.matchers)


@dataclass(frozen=True)
class Query:
    selectors: tuple[Selector, ...]
    grouping: tuple[str, ...]  # labels named in by/without/on/ignoring/group_*


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[position : position + 30]!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
        position = match.end()
    return tokens


def parse_query(expr: str) -> Query:
    """The selectors and grouping labels of a PromQL expression. An identifier followed by
    "(" is a function or an aggregation, label lists after by/on/... are grouping labels,
    strings and [ranges] are skipped; every other identifier is a metric name."""
    tokens = _tokens(expr)
    selectors: list[Selector] = []
    grouping: list[str] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind == "op" and text == "{":
            raise ValueError(f"a selector without a metric name cannot be checked: {expr}")
        if kind != "ident":
            i += 1
            continue
        if text.lower() in _LABEL_LISTS:
            i += 1
            if following == "(":
                close = next(j for j in range(i, len(tokens)) if tokens[j][1] == ")")
                grouping += [t for k, t in tokens[i + 1 : close] if k == "ident"]
                i = close + 1
            continue
        if text.lower() in _KEYWORDS | _AGGREGATIONS or following == "(":
            i += 1
            continue
        matchers: list[tuple[str, str, str]] = []
        i += 1
        if following == "{":
            close = next(j for j in range(i, len(tokens)) if tokens[j][1] == "}")
            inside = tokens[i + 1 : close]
            # name op "value" [, name op "value"]...
            for position in range(0, len(inside), 4):
                name, op, value = inside[position : position + 3]
                assert (name[0], op[0], value[0]) == ("ident", "op", "string"), inside
                matchers.append((name[1], op[1], value[1][1:-1]))
            i = close + 1
        selectors.append(Selector(text, tuple(matchers)))
    return Query(tuple(selectors), tuple(grouping))


def unknown_references(expr: str, exported: Mapping[str, frozenset[str]]) -> list[str]:
    """What `expr` names that rotator does not export: metric names, labels in a metric's
    matchers, and grouping labels that none of the expression's metrics carries."""
    query = parse_query(expr)
    problems: list[str] = []
    carried = set(TARGET_LABELS)
    for selector in query.selectors:
        labels = exported.get(selector.name)
        if labels is None:
            problems.append(f"no metric {selector.name}")
            continue
        carried |= labels
        problems += [
            f"{selector.name} has no label {label}"
            for label in selector.labels
            if label not in labels | TARGET_LABELS
        ]
    problems += [f"no metric here has the label {g}" for g in query.grouping if g not in carried]
    return problems


def test_parse_query_finds_metrics_in_functions_and_skips_strings_ranges_and_label_lists() -> None:
    """Metric names inside functions and aggregations are found with their matchers'
    labels; grouping lists, strings, durations, offsets and keywords are not metrics."""
    query = parse_query(
        "histogram_quantile(0.9, sum by (le) (rate(rotator_scan_duration_seconds_bucket[5m])))"
        " > on () group_left () 2 * max(rotator_scan_period_seconds offset 1h)"
        ' unless ignoring (backend) (rotator_backend_up{backend=~"state|aws", job!="x"} == 0)'
        ' or absent(rotator_ready) and label_replace(rotator_keys, "a", "$1", "account", "(.*)")'
    )
    assert query.selectors == (
        Selector("rotator_scan_duration_seconds_bucket"),
        Selector("rotator_scan_period_seconds"),
        Selector("rotator_backend_up", (("backend", "=~", "state|aws"), ("job", "!=", "x"))),
        Selector("rotator_ready"),
        Selector("rotator_keys"),
    )
    assert query.grouping == ("le", "backend")


def test_unknown_references_flags_made_up_metrics_and_labels() -> None:
    """The check that guards the rules and the dashboard fails on a metric rotator does
    not export (a counter without `_total`, another exporter's metric), a matcher on a
    label the metric lacks, and a grouping label no metric in the query carries."""
    exported = {"rotator_keys": frozenset({"account", "decision"}), "rotator_x_total": frozenset()}
    assert unknown_references('sum by (decision) (rotator_keys{account="1"})', exported) == []
    assert unknown_references("increase(rotator_x_total[5m]) > 0", exported) == []
    assert unknown_references("rotator_x > 0", exported) == ["no metric rotator_x"]
    assert unknown_references("up == 0", exported) == ["no metric up"]
    assert unknown_references('rotator_keys{acount="1"}', exported) == [
        "rotator_keys has no label acount"
    ]
    assert unknown_references("max by (acount) (rotator_keys)", exported) == [
        "no metric here has the label acount"
    ]
    assert unknown_references('rotator_keys{instance="a:9464"}', exported) == []


# --- the rules and their promtool tests ---------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    alerts = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    assert len(alerts) == len(_rules()), "only alerting rules, each name once"
    return alerts


def _rule_test_cases() -> Iterator[tuple[str, dict[str, Any]]]:
    """(file name, test) for every test in deploy/prometheus/tests/*.yml."""
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            yield path.name, case


def test_every_alert_says_how_long_how_bad_and_what_to_do() -> None:
    """Each alert has a `for:`, a severity of warning or critical, a summary, and a
    description that names a command or place to look in backquotes."""
    alerts = _alerts()
    assert len(alerts) >= 12
    for name, rule in alerts.items():
        assert name.startswith("Rotator"), name
        assert re.fullmatch(r"\d+[smhd]", str(rule["for"])), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"].strip(), name
        assert re.search(r"`[^`]+`", rule["annotations"]["description"]), name


def test_every_alert_has_a_promtool_case_where_it_fires_and_one_where_it_must_not() -> None:
    """The promtool tests cover each alert both ways: an evaluation that expects it
    firing, and one that expects it silent."""
    firing: set[str] = set()
    silent: set[str] = set()
    for _, case in _rule_test_cases():
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = set(_alerts())
    assert sorted(alerts - firing) == []
    assert sorted(alerts - silent) == []
    assert sorted((firing | silent) - alerts) == [], "a test names an alert that does not exist"


def test_rules_use_only_exported_metrics_and_labels(exported: dict[str, frozenset[str]]) -> None:
    """Every metric, matcher label and grouping label in the alert expressions exists in
    `Metrics().registry` (scrape labels aside)."""
    problems = {
        name: unknown_references(rule["expr"], exported) for name, rule in _alerts().items()
    }
    assert {name: found for name, found in problems.items() if found} == {}


def test_promtool_input_series_are_series_rotator_exports(
    exported: dict[str, frozenset[str]],
) -> None:
    """The series the promtool tests feed in are named and labelled as rotator exports
    them, so a test cannot pass on a metric the daemon never serves."""
    checked = 0
    for file_name, case in _rule_test_cases():
        for series in case.get("input_series", []):
            found = unknown_references(series["series"], exported)
            assert found == [], f"{file_name}: {case['name']}: {found}"
            checked += 1
    assert checked >= 30


def _promtool() -> str:
    """promtool's path; a skip that says why when it is missing, or a failure when the
    environment demands it (ROTATOR_REQUIRE_PROMTOOL=1, as in CI)."""
    tool = shutil.which("promtool")
    if tool is None:
        if os.environ.get("ROTATOR_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is not on PATH, and ROTATOR_REQUIRE_PROMTOOL=1 requires it")
        pytest.skip(
            "promtool is not on PATH (Debian: apt-get install prometheus); "
            "set ROTATOR_REQUIRE_PROMTOOL=1 to fail instead of skipping"
        )
    return tool


def _run(*args: str | Path, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def test_promtool_check_rules_accepts_the_alerting_rules() -> None:
    """`promtool check rules` finds every alert of rotator-alerts.yml valid."""
    done = _run(_promtool(), "check", "rules", RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in done.stdout


def test_promtool_check_rules_rejects_a_broken_expression(tmp_path: Path) -> None:
    """The check above is real: a rule whose expression does not parse is refused."""
    broken = RULES.read_text(encoding="utf-8").replace(
        "expr: absent(rotator_ready)", "expr: absent(rotator_ready"
    )
    assert broken != RULES.read_text(encoding="utf-8")
    (tmp_path / "rules.yml").write_text(broken, encoding="utf-8")
    done = _run(_promtool(), "check", "rules", tmp_path / "rules.yml")
    assert done.returncode != 0


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    """`promtool test rules` passes every test file in deploy/prometheus/tests."""
    assert len(RULE_TESTS) >= 5
    done = _run(_promtool(), "test", "rules", *(p.relative_to(PROMETHEUS_DIR) for p in RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_promtool_unit_tests_fail_when_blocked_rotations_are_summed_over_daemons(
    tmp_path: Path,
) -> None:
    """The unit tests hold the aggregation, not only the alert names: summing the
    BLOCKED count that three daemons each report (instead of max) fails them."""
    text = RULES.read_text(encoding="utf-8")
    summed = text.replace(
        'sum(max by (kind) (rotator_open_rotations{state="BLOCKED"}))',
        'sum(rotator_open_rotations{state="BLOCKED"})',
    )
    assert summed != text
    (tmp_path / "tests").mkdir()
    (tmp_path / RULES.name).write_text(summed, encoding="utf-8")
    shutil.copy(PROMETHEUS_DIR / "tests" / "rotations.yml", tmp_path / "tests")
    done = _run(_promtool(), "test", "rules", "tests/rotations.yml", cwd=tmp_path)
    assert done.returncode != 0
    assert "6 rotation(s) BLOCKED" in done.stdout + done.stderr


# --- the dashboard ------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def _queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query in the dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in _dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def _variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in _dashboard()["templating"]["list"]}


def test_dashboard_queries_use_only_exported_metrics_and_labels(
    exported: dict[str, frozenset[str]],
) -> None:
    """Every panel query and the account variable's query name only metrics and labels in
    `Metrics().registry`; legends only labels those metrics carry."""
    assert len(_queries()) >= 20
    for title, expr in _queries():
        assert unknown_references(expr, exported) == [], title
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            carried = set(TARGET_LABELS)
            for selector in parse_query(target["expr"]).selectors:
                carried |= exported[selector.name]
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend_labels <= carried, panel["title"]
    source = _variables()["account"]["query"]["query"]
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", source)
    assert match is not None, source
    assert unknown_references(match.group(1), exported) == []
    (selector,) = parse_query(match.group(1)).selectors
    assert match.group(2) in exported[selector.name]


def test_dashboard_shows_every_metric_rotator_exports(exported: dict[str, frozenset[str]]) -> None:
    """Each metric in the registry appears in some panel, so a new metric without a panel
    is noticed (a histogram by its buckets, a counter by `_total`)."""
    shown = {s.name for _, expr in _queries() for s in parse_query(expr).selectors}
    wanted = {name for name in exported if not name.endswith(("_created", "_sum", "_count"))}
    assert sorted(wanted - shown) == []


def test_dashboard_has_a_prometheus_datasource_and_an_account_variable(
    exported: dict[str, frozenset[str]],
) -> None:
    """schemaVersion 36 or later; a `datasource` variable of Prometheus data sources that
    every panel and query uses; an `account` variable (multi, with All) by which every
    per-account metric in a query is filtered (but the scan lease used to pick the
    holder's values of an already filtered metric)."""
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36
    variables = _variables()
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    account = variables["account"]
    assert account["type"] == "query"
    assert account["multi"] is True
    assert account["includeAll"] is True
    assert account["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    filtered = 0
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
            selectors = parse_query(target["expr"]).selectors
            for n, selector in enumerate(selectors):
                if "account" not in exported[selector.name]:
                    continue
                if selector == Selector(HOLDER_FILTER) and n > 0:
                    continue
                assert ("account", "=~", "$account") in selector.matchers, panel["title"]
                filtered += 1
    assert filtered >= 10


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    """Panel ids are unique and no two panels share a cell of the 24-column grid."""
    panels = _dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken.get((x, y))}"
                taken[(x, y)] = panel["title"]


def test_promtool_accepts_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, is valid PromQL (checked by
    promtool as a recording rule)."""
    tool = _promtool()
    rules = [
        {
            "record": f"dashboard:query_{n}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$account", ".*"),
        }
        for n, (_, expr) in enumerate(_queries())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = _run(tool, "check", "rules", path)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the README's alert table -------------------------------------------------------------


def _readme_alert_rows() -> dict[str, tuple[str, str, str]]:
    """alert -> (severity, for, expr) from the table in README.md's "What to alert on"."""
    text = README.read_text(encoding="utf-8")
    start = text.index("### What to alert on\n")
    end = text.index("\n#", start + 1)
    rows: dict[str, tuple[str, str, str]] = {}
    for line in text[start:end].splitlines():
        if not line.startswith("| `Rotator"):
            continue
        # A "|" inside a cell is written "\|" (GitHub's tables split on the others).
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        name, severity_for, expr = cells[0].strip("`"), cells[1], cells[2]
        severity, duration = (part.strip() for part in severity_for.split(","))
        assert re.fullmatch(r"`[^`]+`", expr), line
        assert name not in rows, f"{name} twice in the README"
        rows[name] = (severity, duration, expr[1:-1])
    return rows


def test_readme_alert_table_is_the_rules_file_alert_for_alert() -> None:
    """README's "What to alert on" lists exactly the alerts of rotator-alerts.yml, each
    with its severity, `for:` and expression (whitespace aside)."""
    shown = _readme_alert_rows()
    rules = {
        name: (rule["labels"]["severity"], str(rule["for"]), " ".join(rule["expr"].split()))
        for name, rule in _alerts().items()
    }
    assert sorted(set(shown) - set(rules)) == [], "in the README, not in the rules"
    assert sorted(set(rules) - set(shown)) == [], "in the rules, not in the README"
    for name, row in shown.items():
        assert row == rules[name], name
