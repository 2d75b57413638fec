"""The Grafana dashboard asks only for metrics and labels a running gateway really exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningGateway

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "video-gateway.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Rows the issue asks for, and metrics each must show.
REQUIRED_ROWS = {
    "Requests": {"gateway_http_requests_total"},
    "Latency": {
        "gateway_http_request_duration_seconds_bucket",
        "gateway_upstream_request_duration_seconds_bucket",
        "gateway_overhead_seconds_bucket",
    },
    "Concurrency": {"gateway_http_requests_in_flight", "gateway_upstream_requests_in_flight"},
    "Upstream errors": {"gateway_upstream_errors_total"},
    "Bytes": {"gateway_request_body_bytes_total", "gateway_response_body_bytes_total"},
    "Videos": {"gateway_videos_created_total", "gateway_videos_finished_total"},
    "Config reloads": {
        "gateway_config_reloads_total",
        "gateway_config_last_reload_success_timestamp_seconds",
    },
    "Process": {"process_resident_memory_bytes", "process_open_fds"},
}
RELOAD_METRICS = ("gateway_config_reloads_total", "gateway_config_last_reload_success_timestamp_seconds")

# Labels Prometheus adds to every scraped series; a scrape of the gateway itself cannot show them.
TARGET_LABELS = {"job", "instance"}

PROMQL_FUNCTIONS = {
    # aggregations
    "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk",
    "quantile", "count_values", "limitk", "limit_ratio",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
    "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta",
    "increase", "irate", "label_join", "label_replace", "ln", "log2", "log10", "minute", "month",
    "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt",
    "time", "timestamp", "vector", "year", "avg_over_time", "min_over_time", "max_over_time",
    "sum_over_time", "count_over_time", "quantile_over_time", "stddev_over_time",
    "stdvar_over_time", "last_over_time", "present_over_time",
}  # fmt: skip
PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2",
    "by", "without", "on", "ignoring", "group_left", "group_right",
}  # fmt: skip

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHERS = re.compile(r"\{[^}]*\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(
    r"^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{([^}]*)\})?\s*,\s*([a-zA-Z_]\w*)\s*\)$"
)
_SERIES = re.compile(r"\b((?:gateway|process)_[a-z_]+)(\{job=~\"\$job\")?")
_VARIABLE = re.compile(r"\$\{?(\w+)")


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and panels nested in (collapsed) rows included."""
    for panel in panels:
        yield panel
        yield from walk(panel.get("panels", []))


def rows(dashboard: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Row title -> its panels: nested ones when collapsed, else those that follow it."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] | None = None
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            current = grouped.setdefault(panel["title"], [])
            current.extend(panel.get("panels", []))
        elif current is not None:
            current.append(panel)
    return grouped


def exprs(panels: list[dict[str, Any]]) -> list[str]:
    return [t["expr"] for p in walk(panels) for t in p.get("targets", []) if "expr" in t]


def parse_expr(expr: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """Metric names, label names matched per metric, and grouping labels of one PromQL expression."""
    text = _RANGE.sub("", _STRING.sub('""', expr))
    matched: dict[str, set[str]] = {}
    for metric, matchers in _SELECTOR.findall(text):
        matched.setdefault(metric, set()).update(_MATCHER_LABEL.findall(matchers))
    grouping = {label.strip() for group in _GROUPING.findall(text) for label in group.split(",")}
    grouping.discard("")
    text = _GROUPING.sub(" ", _MATCHERS.sub(" ", text))
    metrics: set[str] = set()
    for name, call in _IDENT.findall(text):
        if call:
            assert name in PROMQL_FUNCTIONS, f"unknown PromQL function {name!r} in: {expr}"
        elif name not in PROMQL_KEYWORDS and name not in PROMQL_FUNCTIONS:
            metrics.add(name)
    return metrics, matched, grouping


def metric_names(expr: str) -> set[str]:
    return parse_expr(expr)[0]


def test_expression_parser() -> None:
    metrics, matched, grouping = parse_expr(
        'histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{route!~"/x|{y}", m=~"$model"}'
        "[$__rate_interval]))) / on (route) group_left sum without (code) (b_total) * 60 "
        "+ time() - c_seconds offset 5m and bool d"
    )
    assert metrics == {"a_bucket", "b_total", "c_seconds", "d"}
    assert matched == {"a_bucket": {"route", "m"}}
    assert grouping == {"le", "route", "code"}


def test_dashboard_is_portable() -> None:
    dashboard = load_dashboard()
    text = DASHBOARD.read_text(encoding="utf-8")
    assert dashboard["schemaVersion"] >= 38
    assert "__inputs" not in dashboard and "${DS_" not in text
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "provider"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DATASOURCE

    ids = [p["id"] for p in walk(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in walk(dashboard["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            assert "targets" not in panel and panel.get("datasource", DATASOURCE) == DATASOURCE
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_rows_show_what_the_issue_asks_for() -> None:
    dashboard = load_dashboard()
    grouped = rows(dashboard)
    for title, required in REQUIRED_ROWS.items():
        assert title in grouped, f"row {title!r} is missing (rows: {sorted(grouped)})"
        shown = set().union(*(metric_names(e) for e in exprs(grouped[title])))
        assert required <= shown, f"row {title!r} lacks {sorted(required - shown)}"

    # Every panel's title names a metric it shows (the _bucket suffix aside).
    for panel in walk(dashboard["panels"]):
        if panel["type"] != "row":
            names = set().union(*(metric_names(t["expr"]) for t in panel["targets"]))
            bases = {re.sub(r"_bucket$", "", n) for n in names}
            assert any(b in panel["title"] for b in bases), f"{panel['title']!r} names none of {bases}"

    # Latency: p50, p95 and p99 of each of total, upstream and gateway time.
    latency = exprs(grouped["Latency"])
    for histogram in REQUIRED_ROWS["Latency"]:
        quantiles = {
            float(q)
            for e in latency
            if histogram in metric_names(e)
            for q in re.findall(r"histogram_quantile\(\s*([0-9.]+)", e)
        }
        assert {0.5, 0.95, 0.99} <= quantiles, f"{histogram}: quantiles {quantiles}"
        assert all("le" in parse_expr(e)[2] for e in latency if histogram in metric_names(e))

    # Error ratios: 5xx and 4xx, each over all requests, by route.
    requests = exprs(grouped["Requests"])
    for klass in ("5", "4"):
        assert any(f'code=~"{klass}.."' in e and "/" in e and "route" in parse_expr(e)[2] for e in requests)

    # Rates use Grafana's $__rate_interval (or the whole range), never a hard-coded window.
    for expr in exprs(dashboard["panels"]):
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window in ("$__rate_interval", "$__range"), expr


def test_variables_are_defined_and_used() -> None:
    dashboard = load_dashboard()
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    builtin = {"__rate_interval", "__range", "__interval"}
    for expr in exprs(dashboard["panels"]):
        for name in _VARIABLE.findall(expr):
            assert name in defined | builtin, f"undefined variable ${name} in: {expr}"
    grouped = rows(dashboard)
    for title, variable in [
        ("Videos", "$model"),
        ("Videos", "$provider"),
        ("Latency", "$provider"),
        ("Concurrency", "$provider"),
        ("Upstream errors", "$provider"),
    ]:
        assert any(variable in e for e in exprs(grouped[title])), f"{variable} unused in row {title!r}"
    # One Prometheus often scrapes staging and production: every series follows the $job choice.
    for expr in exprs(dashboard["panels"]):
        for metric, scoped in _SERIES.findall(expr):
            assert scoped, f"{metric} is not filtered by $job in: {expr}"


def test_promtool_parses_every_expression(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    rules = []
    for i, expr in enumerate(exprs(load_dashboard()["panels"])):
        concrete = re.sub(r"\$__\w+", "5m", expr)
        concrete = re.sub(r"\$\{?\w+\}?", ".*", concrete)
        rules.append({"record": f"dashboard:expr_{i}", "expr": concrete})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def traffic(gw: RunningGateway) -> None:
    """A video made by the local provider, one by the fake upstream, and some errors."""
    client = gw.sdk()
    done = await client.videos.create_and_poll(
        model="sora-2", prompt="dashboard", size="320x240", seconds="1"
    )
    assert done.status == "completed"
    await client.videos.download_content(done.id)
    remote = await client.videos.create(model="sora-remote", prompt="dashboard upstream")
    await client.videos.retrieve(remote.id)
    with pytest.raises(openai.APIStatusError):
        await client.videos.create(model="sora-remote", prompt="[500]")
    with pytest.raises(openai.NotFoundError):
        await client.videos.create(model="no-such-model", prompt="dashboard")
    with pytest.raises(openai.AuthenticationError):
        await gw.sdk(key="sk-not-a-key-at-all").videos.list()


def exported(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Series names a scrape declares or holds, and the label names seen on each."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("_count", "_sum"),
        "info": ("_info",),
    }
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
        for sample in family.samples:
            names.add(sample.name)
            labels.setdefault(sample.name, set()).update(set(sample.labels) - {"le"})
    return names, labels


def label_names(metric: str, seen: dict[str, set[str]]) -> set[str]:
    """Labels of a series: those seen in the scrape, else those its collector declares."""
    collector = REGISTRY._names_to_collectors.get(metric)
    declared = set(getattr(collector, "_labelnames", ()))
    return seen.get(metric, set()) | declared | TARGET_LABELS


async def test_every_dashboard_metric_is_exported(dialect_gateway: RunningGateway) -> None:
    await traffic(dialect_gateway)
    async with (
        aiohttp.ClientSession() as session,
        session.get(dialect_gateway.url + "/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    names, seen = exported(text)

    dashboard = load_dashboard()
    used: set[str] = set()
    problems: list[str] = []
    for expr in exprs(dashboard["panels"]):
        metrics, matched, grouping = parse_expr(expr)
        used |= metrics
        problems += [f"not exported: {m} in: {expr}" for m in sorted(metrics - names)]
        for metric, matcher_labels in matched.items():
            unknown = matcher_labels - label_names(metric, seen)
            if unknown:
                problems.append(f"{metric} has no label {sorted(unknown)}: {expr}")
        available = set().union(*(label_names(m, seen) for m in metrics)) | {"le"}
        if not grouping <= available:
            problems.append(f"grouping by {sorted(grouping - available)}, which no metric has: {expr}")

    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = _LABEL_VALUES.match(variable["query"]["query"])
        assert match and variable["definition"] == variable["query"]["query"], variable["name"]
        metric, matchers, label = match.groups()
        assert matchers == (None if label == "job" else 'job=~"$job"'), "choices follow the chosen jobs"
        used.add(metric)
        assert label == variable["name"]
        if metric not in names:
            problems.append(f"${label}: {metric} is not exported")
        elif label not in label_names(metric, seen):
            problems.append(f"${label}: {metric} has no label {label}")
        elif label not in TARGET_LABELS and label not in seen.get(metric, set()):
            problems.append(f"${label}: no {metric} series carries it after traffic")

    print(f"\nreload metrics exported: { {m: m in names for m in RELOAD_METRICS} }")
    assert used >= set(RELOAD_METRICS)
    assert not problems, "\n".join(problems)


def test_every_gateway_metric_is_on_the_dashboard() -> None:
    """A metric added to the code gets a panel (tests/test_readme_metrics.py makes it a README row)."""
    import gateway.app  # noqa: F401  (registers every gateway_* metric)

    dashboard = load_dashboard()
    shown = set().union(*(metric_names(e) for e in exprs(dashboard["panels"])))
    shown |= {re.sub(r"_(bucket|count|sum)$", "", name) for name in shown}
    suffix = {"counter": "_total", "info": "_info"}
    defined = {
        family.name + suffix.get(family.type, "")
        for family in REGISTRY.collect()
        if family.name.startswith("gateway_")
    }
    assert not defined - shown, f"metrics with no panel: {sorted(defined - shown)}"


def test_latency_panels_leave_out_what_is_no_request_to_the_api() -> None:
    """Probes, scrapes, scanners' unknown paths and bytes that were no HTTP (recorded at 0 s) would
    pull every latency quantile towards nothing: the latency panels leave them out."""
    latency = [
        e
        for e in exprs(load_dashboard()["panels"])
        if "histogram_quantile" in e and ("duration" in e or "overhead" in e)
    ]
    assert latency
    for expr in latency:
        if "gateway_upstream" in expr:
            continue
        assert 'route!~"/healthz|/readyz|/metrics|unmatched|malformed"' in expr, expr
