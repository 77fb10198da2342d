"""deploy/prometheus: promtool checks the configs and rules (and runs the alert unit tests), and
a real Prometheus (Debian's binary) scrapes a real packserve with a copy of the shipped scrape
config, evaluates the shipped alert rules and every dashboard query."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "packserve.json"
PACKING_EFFICIENCY = (
    "sum(rate(packserve:prefill_tokens_real_total[1m])) "
    "/ sum(rate(packserve:prefill_tokens_padded_total[1m]))"
)
# Grafana's variables, as the dashboard would expand them with "All" selected.
GRAFANA_VARIABLES = {"$model_name": ".*", "$instance": ".*", "$__rate_interval": "1m"}


def promtool_run(promtool: str, *args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# -- promtool -------------------------------------------------------------------------------


def test_promtool_accepts_the_scrape_config_and_its_rules(tool):
    result = promtool_run(tool("promtool"), "check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout + result.stderr  # the rule file was found and checked


def test_promtool_accepts_the_kubernetes_variant(tool, tmp_path):
    """prometheus-k8s.yml discovers pods. Debian builds Prometheus without Kubernetes
    discovery, so when promtool does not know kubernetes_sd_configs the rest of the file is
    checked with the discovery swapped for a static target."""
    promtool = tool("promtool")
    config = yaml.safe_load((PROM / "prometheus-k8s.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    relabel = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod"} <= relabel, "prometheus-adapter needs namespace and pod labels"
    result = promtool_run(promtool, "check", "config", "prometheus-k8s.yml")
    output = result.stdout + result.stderr
    if result.returncode != 0 and "kubernetes_sd_configs not found" in output:
        del job["kubernetes_sd_configs"]
        job["static_configs"] = [{"targets": ["localhost:8000"]}]
        config["rule_files"] = [str(PROM / f) for f in config["rule_files"]]
        copy = tmp_path / "prometheus-k8s.yml"
        copy.write_text(yaml.safe_dump(config))
        result = promtool_run(promtool, "check", "config", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules(tool):
    result = promtool_run(tool("promtool"), "check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"][0]["rules"]
    alerts = {r["alert"] for r in rules}
    assert {
        "PackserveQueueGrowing",
        "PackserveTTFTHigh",
        "PackserveKVCacheHigh",
        "PackserveErrorRate",
    } <= alerts
    error_rate = next(r for r in rules if r["alert"] == "PackserveErrorRate")["expr"]
    assert 'packserve:request_success_total{finished_reason="error"}' in error_rate


def test_alert_unit_tests_pass(tool):
    """alerts_test.yml feeds synthetic series and expects each alert to fire (or not)."""
    result = promtool_run(tool("promtool"), "test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "alerts_test.yml").read_text()))
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"][0]["rules"]
    assert tested == {r["alert"] for r in rules}, "every alert has a unit test"


# -- a real Prometheus ----------------------------------------------------------------------


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables expanded) for every dashboard target."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"unexpanded variable in {panel['title']}: {expr}"
            out.append((panel["title"], expr))
    return out


class PrometheusAPI:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        r = httpx.get(self.url + path, params=params, timeout=10.0)
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=promql)
        assert data["resultType"] == "vector", data
        return data["result"]


@pytest.fixture(scope="module")
def prometheus(tool, replica, start_process, port, wait, tmp_path_factory) -> PrometheusAPI:
    """Debian's prometheus with a copy of deploy/prometheus/prometheus.yml: the shared
    replica as the only target, 1 s scrape and rule evaluation, the shipped alerts.yml."""
    binary = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "packserve"
    job["scrape_timeout"] = "1s"
    job["static_configs"] = [{"targets": [replica.address]}]
    config["rule_files"] = [str(PROM / f) for f in config["rule_files"]]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    last_logs = ""
    for attempt in range(3):  # the free port may be taken before prometheus binds it
        listen = f"127.0.0.1:{port()}"
        proc = start_process(
            "prometheus",
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / f'data-{attempt}'}",
                f"--web.listen-address={listen}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
        )
        api = PrometheusAPI(f"http://{listen}")

        def ready(api: PrometheusAPI = api, proc: Any = proc) -> bool:
            if not proc.alive():
                raise RuntimeError("exited")
            return httpx.get(api.url + "/-/ready", timeout=2.0).status_code == 200

        try:
            wait(ready, 30, interval=0.2, what="prometheus /-/ready")
            return api
        except AssertionError:
            last_logs = proc.logs()
            proc.stop(timeout=5)
    pytest.fail(f"prometheus did not start:\n{last_logs}")


def completions(url: str, rounds: int = 3, per_round: int = 3) -> None:
    """Rounds of concurrent completions (different prompt lengths, so prefill packs several
    prompts per row), 1.2 s apart so several scrapes see the counters move."""
    prompts = ["Hello", "Once upon a time there was a", "The license grants you " * 8]

    def one(prompt: str) -> None:
        body = {"prompt": prompt, "max_tokens": 16, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60.0)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 16

    with ThreadPoolExecutor(per_round) as pool:
        for n in range(rounds):
            if n:
                time.sleep(1.2)
            list(pool.map(one, (prompts * per_round)[:per_round]))


def test_real_prometheus_scrapes_packserve_and_evaluates_everything(prometheus, replica, wait):
    # The target is up before any traffic.
    up = wait(
        lambda: prometheus.query('up{job="packserve"} == 1'), 30, interval=0.5, what="target up"
    )
    assert up[0]["metric"]["instance"] == replica.address
    completions(replica.url)

    running = wait(
        lambda: prometheus.query("packserve:num_requests_running"),
        20,
        interval=0.5,
        what="packserve:num_requests_running series",
    )
    assert running[0]["metric"]["job"] == "packserve"
    assert running[0]["metric"]["model_name"]

    def efficiency() -> float | None:
        result = prometheus.query(PACKING_EFFICIENCY)
        if not result:
            return None
        value = float(result[0]["value"][1])
        return value if math.isfinite(value) else None

    ratio = wait(efficiency, 30, interval=0.5, what="packing efficiency to be a number")
    assert 0 < ratio <= 1, ratio

    # Every dashboard query parses and evaluates on real data; all but the error ratio
    # (no request failed, so no finished_reason="error" series) return series.
    empty = []
    for title, expr in dashboard_queries():
        if not prometheus.query(expr):
            empty.append(title)
    assert set(empty) <= {"Error ratio"}, empty

    # Prometheus loaded every shipped alert rule and evaluates it without error.
    def rules_ok() -> list[dict[str, Any]] | None:
        groups = prometheus.get("/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else None

    rules = wait(rules_ok, 20, interval=0.5, what="every alert rule to evaluate with health ok")
    shipped = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["name"] for r in rules} == {r["alert"] for r in shipped}
