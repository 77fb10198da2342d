"""Every packserve:* name the shipped dashboards, alerts, autoscaling rules and docs use is one
a real server exports: a histogram only through _bucket/_sum/_count, a counter through _total.
Also the Grafana dashboard's structure."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "packserve.json"
# A metric name as PromQL reads it: the prefix, then name characters (':' included).
NAME = re.compile(r"packserve:[A-Za-z_][A-Za-z0-9_:]*")
HISTOGRAM_SAMPLES = ("_bucket", "_sum", "_count")
USERS = [
    DASHBOARD,
    DEPLOY / "prometheus" / "alerts.yml",
    DEPLOY / "prometheus" / "alerts_test.yml",
    DEPLOY / "k8s" / "prometheus-adapter-values.yaml",
    DEPLOY / "k8s" / "hpa.yaml",
    DEPLOY / "README.md",
]


def names_used(path: Path) -> set[str]:
    return set(NAME.findall(path.read_text()))


@pytest.fixture(scope="module")
def exported(served_metrics, names_in_metrics) -> set[str]:
    names = names_in_metrics(served_metrics)
    assert "packserve:num_requests_waiting" in names
    return names


@pytest.mark.parametrize("path", USERS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_name_used_is_exported(path, exported):
    assert path.exists(), path
    unknown = sorted(n for n in names_used(path) if n not in exported or n.endswith("_created"))
    assert not unknown, f"{path.name} uses names the server does not export: {unknown}"


def test_counters_and_histograms_are_only_read_through_rate(served_metrics):
    """A counter's (or histogram sample's) raw value only grows and resets on restart: every
    query must take rate() or increase() of it over a range."""
    types = dict(re.findall(r"^# TYPE (packserve:\S+) (\w+)$", served_metrics, re.M))
    cumulative = {n for n, t in types.items() if t == "counter"}
    cumulative |= {
        n + suffix for n, t in types.items() if t == "histogram" for suffix in HISTOGRAM_SAMPLES
    }
    assert "packserve:prompt_tokens_total" in cumulative
    queries = [DEPLOY / "prometheus" / "alerts.yml", DASHBOARD, DEPLOY / "README.md"]
    for path in queries:
        text = path.read_text()
        for match in NAME.finditer(text):
            if match[0] not in cumulative:
                continue
            before, after = text[: match.start()], text[match.end() :]
            wrapped = re.search(r"\b(rate|increase)\(\s*$", before) and re.match(
                r"(\{[^}]*\})?\[[^\]]+\]\)", after
            )
            assert wrapped, f"{path.name}: {match[0]} read without rate()/increase()"


def test_the_dashboard_covers_the_key_signals():
    used = names_used(DASHBOARD)
    for name in (
        "packserve:num_requests_running",
        "packserve:num_requests_waiting",
        "packserve:kv_cache_usage_perc",
        "packserve:time_to_first_token_seconds_bucket",
        "packserve:inter_token_latency_seconds_bucket",
        "packserve:generation_tokens_total",
        "packserve:request_success_total",
        "packserve:prefill_tokens_real_total",
        "packserve:prefill_tokens_padded_total",
    ):
        assert name in used, name


def test_dashboard_structure():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            expr = target["expr"]
            assert NAME.search(expr), (panel["title"], expr)
            for var in re.findall(r"\$(\w+)", expr):
                assert var in variables or var.startswith("__"), (panel["title"], var)
            # Filters on the dashboard's variables, so "Model" and "Replica" work everywhere.
            assert 'model_name=~"$model_name"' in expr, (panel["title"], expr)
