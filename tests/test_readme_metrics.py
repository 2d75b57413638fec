"""The README's Observability section lists exactly the metrics and access-log fields the code has."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from prometheus_client import REGISTRY

import gateway.api
import gateway.app
import gateway.metrics  # the core metrics; gateway.app imports the feature modules with theirs

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# How a family of each type is named in a scrape, and so in PromQL and the README.
EXPOSED_SUFFIX = {"counter": "_total", "info": "_info"}
# Fields every log line gets from gateway.logs.configure's processors.
PROCESSOR_FIELDS = {"timestamp", "level", "event"}

Row = tuple[str, str, frozenset[str]]


def observability_section() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Observability\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "README.md has no '## Observability' section"
    return match.group(1)


def table(section: str, first_header: str) -> list[list[str]]:
    """Cells of the Markdown table whose header starts with ``first_header``, header excluded."""
    lines = section.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(rf"^\|\s*{first_header}\s*\|", line)), None)
    assert start is not None, f"no table with a {first_header!r} column"
    assert re.match(r"^\|[\s|:-]+\|$", lines[start + 1]), "header separator row missing"
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def readme_metrics() -> list[Row]:
    rows = []
    for cells in table(observability_section(), "Metric"):
        assert len(cells) == 4, f"metric row needs 4 cells: {cells}"
        name, kind, labels, meaning = cells
        (metric,) = code_spans(name)
        assert meaning, f"{metric}: meaning is empty"
        rows.append((metric, kind.split()[0], frozenset(code_spans(labels))))
    return rows


def code_metrics() -> set[Row]:
    """Every ``gateway_*`` family registered once the app is importable, as a scrape names it."""
    rows = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("gateway_"):
            continue
        collector = REGISTRY._names_to_collectors[family.name]
        labels = set(getattr(collector, "_labelnames", ()))
        if family.type == "info":  # an Info's labels are its keys
            labels |= {label for sample in family.samples for label in sample.labels}
        name = family.name + EXPOSED_SUFFIX.get(family.type, "")
        rows.add((name, family.type, frozenset(labels)))
    return rows


def test_metric_table_matches_the_code() -> None:
    documented = readme_metrics()
    names = [name for name, _, _ in documented]
    assert len(names) == len(set(names)), "a metric is listed twice"
    defined = code_metrics()
    assert len(defined) >= 12, "the registry looks empty: were the metrics modules imported?"
    by_name = {row[0]: row for row in defined}
    missing = sorted(by_name.keys() - set(names))
    stale = sorted(set(names) - by_name.keys())
    assert not missing and not stale, f"README lacks {missing}; README lists unknown {stale}"
    for row in documented:
        assert row == by_name[row[0]], f"README says {row}, the code says {by_name[row[0]]}"


def access_log_fields() -> set[str]:
    """Keyword arguments of the ``log.info("request", ...)`` call in gateway/app.py's ``_observe``."""
    tree = ast.parse(Path(gateway.app.__file__).read_text(encoding="utf-8"))
    (observe,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_observe"]
    calls = [
        n
        for n in ast.walk(observe)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "info"
        and n.args
        and isinstance(n.args[0], ast.Constant)
        and n.args[0].value == "request"
    ]
    (call,) = calls
    return {k.arg for k in call.keywords if k.arg is not None}


def test_access_log_fields_match_the_code() -> None:
    rows = table(observability_section(), "Field")
    fields = [code_spans(cells[0])[0] for cells in rows]
    assert all(cells[1] for cells in rows), "every field needs a meaning"
    assert len(fields) == len(set(fields))
    assert set(fields) == access_log_fields() | PROCESSOR_FIELDS


def test_section_tells_how_to_open_the_dashboard() -> None:
    section = observability_section()
    for needed in (
        "docker compose up",
        "http://localhost:3000",
        "http://localhost:9090",
        "--log-format json",
    ):
        assert needed in section, f"the Observability section should mention {needed!r}"
    assert "grafana/dashboards/video-gateway.json" in section
    assert (ROOT / "grafana" / "dashboards" / "video-gateway.json").is_file()


def operations_passed_by_the_api() -> set[str]:
    """The operation names gateway/api.py gives its upstream calls: the string passed to each
    ``_call``, ``_changing_call``, ``_start``, ``_read`` and ``_from_video`` in its place."""
    places = {"_call": 2, "_changing_call": 2, "_start": 1, "_read": 2, "_from_video": 1}
    tree = ast.parse(Path(gateway.api.__file__).read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in places:
            argument = node.args[places[node.func.id]]
            if isinstance(argument, ast.Constant):
                names.add(argument.value)
            else:  # passed through from the caller's own parameter
                assert isinstance(argument, ast.Name), ast.unparse(node)
                assert argument.id in ("name", "operation"), ast.unparse(node)
    return names


def test_upstream_operations_are_the_documented_ones() -> None:
    """The ``operation`` label takes only the values README lists for it, and all of them occur."""
    (row,) = [
        cells
        for cells in table(observability_section(), "Metric")
        if code_spans(cells[0]) == ["gateway_upstream_request_duration_seconds"]
    ]
    documented = code_spans(row[3].partition("`operation` is what the call served:")[2].partition(";")[0])
    assert documented == list(gateway.metrics.UPSTREAM_OPERATIONS)
    assert operations_passed_by_the_api() == set(gateway.metrics.UPSTREAM_OPERATIONS)
