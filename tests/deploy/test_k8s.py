"""deploy/k8s, offline: built-in kinds validated (strict) against the Kubernetes 1.30 schemas by
kubernetes-validate; the ServiceMonitor CRD, the kustomization and the prometheus-adapter rules
checked structurally; and the objects checked against each other and against the server."""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30.0"
BUILTIN_FILES = ("configmap.yaml", "deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml")
LABELS = {"app.kubernetes.io/name": "packserve", "app.kubernetes.io/component": "server"}


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(name: str) -> dict[str, Any]:
    docs = load_yaml_docs(K8S / name)
    assert len(docs) == 1, f"{name}: expected one object"
    return docs[0]


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    """kind -> the object, for every file the kustomization applies."""
    out = {}
    for name in one("kustomization.yaml")["resources"]:
        obj = one(name)
        assert obj["kind"] not in out, f"two {obj['kind']} objects"
        out[obj["kind"]] = obj
    return out


@pytest.fixture(scope="module")
def validate():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

    def check(obj: dict[str, Any]) -> None:
        kv.validate(obj, KUBERNETES_VERSION, strict=True)

    return check


@pytest.fixture(scope="module")
def container(objects) -> dict[str, Any]:
    (c,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def serve_flags() -> dict[str, argparse.Action]:
    """PACKSERVE_<FLAG> -> the argparse action of `packserve serve --flag`."""
    from packserve.server.settings import Settings, add_config_flags

    parser = argparse.ArgumentParser()
    add_config_flags(parser, Settings)
    out = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and not option.startswith("--no-") and option != "--help":
                out["PACKSERVE_" + option[2:].upper().replace("-", "_")] = action
    return out


# -- schema validation ---------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_FILES)
def test_builtin_kinds_validate_strictly_against_kubernetes_1_30(validate, name):
    for obj in load_yaml_docs(K8S / name):
        validate(obj)


def test_the_validator_does_reject_a_broken_manifest(validate):
    """The strict schemas catch a misspelled field and a wrong type, so passing means
    something."""
    import jsonschema

    deployment = one("deployment.yaml")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbee"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "long"
    for broken in (typo, wrong_type):
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


def test_kustomization_applies_every_manifest():
    kustomization = one("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    manifests = {p.name for p in K8S.glob("*.yaml")} - {
        "kustomization.yaml",
        "prometheus-adapter-values.yaml",  # Helm values for the adapter, not an object
    }
    assert listed == manifests


def test_every_object_carries_the_app_labels(objects):
    for kind, obj in objects.items():
        assert LABELS.items() <= obj["metadata"]["labels"].items(), kind
        # The namespace comes from `kubectl -n` or the kustomization.
        assert "namespace" not in obj["metadata"], kind


# -- the Deployment ------------------------------------------------------------------------


def test_probes_readiness_on_ready_and_liveness_on_health(container):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/ready" and ready["port"] == "http"
    assert live["path"] == "/health" and live["port"] == "http"
    # Readiness reacts within seconds (draining), liveness tolerates a busy moment.
    r, probe = container["readinessProbe"], container["livenessProbe"]
    assert r["periodSeconds"] * r["failureThreshold"] <= 15
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 20


def test_grace_period_covers_prestop_and_the_drain(objects, container):
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0].endswith("sleep")
    pre_stop = float(command[1])
    assert pre_stop >= 5, "endpoint removal needs a few seconds to reach every proxy"
    drain = float(objects["ConfigMap"]["data"]["PACKSERVE_SHUTDOWN_TIMEOUT"])
    uvicorn_shutdown = 5  # server/app.py: timeout_graceful_shutdown
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + uvicorn_shutdown


def test_resources_and_security(objects, container):
    res = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= res[kind].keys(), kind
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # The writable places are emptyDirs: the cache under the image's HOME, and /tmp.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts) == {"/home/packserve/.cache", "/tmp"}
    for name in mounts.values():
        assert "emptyDir" in volumes[name]
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    assert "HOME=/home/packserve" in dockerfile


def test_replicas_belong_to_the_hpa_and_updates_never_drop_capacity(objects):
    spec = objects["Deployment"]["spec"]
    assert "replicas" not in spec, "re-applying would reset the HPA's replica count"
    rolling = spec["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    assert spec["selector"]["matchLabels"] == LABELS
    assert LABELS.items() <= spec["template"]["metadata"]["labels"].items()


def test_image_is_pinned(container):
    image = container["image"]
    assert re.search(r"(:[\w][\w.-]*|@sha256:[0-9a-f]{64})$", image), image
    assert not image.endswith(":latest")


def test_configmap_holds_only_real_packserve_settings(objects, container):
    flags = serve_flags()
    data = objects["ConfigMap"]["data"]
    assert data
    for key, value in data.items():
        assert key in flags, f"{key} is not a packserve serve flag"
        action = flags[key]
        if isinstance(action, argparse.BooleanOptionalAction):
            assert value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off")
        elif action.type is not None:
            action.type(value)  # raises if the server could not parse it either
    assert {"configMapRef": {"name": objects["ConfigMap"]["metadata"]["name"]}} in container[
        "envFrom"
    ]
    assert int(data["PACKSERVE_PORT"]) == container["ports"][0]["containerPort"]
    # The image's baked-in model is what the ConfigMap serves by default.
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    assert f"PACKSERVE_MODEL={data['PACKSERVE_MODEL']}" in dockerfile
    env = {e["name"] for e in container.get("env", [])}
    assert env - {"OMP_NUM_THREADS"} <= set(flags), env


# -- Service, PDB, HPA, ServiceMonitor, adapter ----------------------------------------------


def test_service_and_pdb_select_the_pods(objects):
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = objects["Service"]["spec"]
    assert service["selector"].items() <= pod_labels.items()
    assert [p["targetPort"] for p in service["ports"]] == ["http"]
    pdb = objects["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") is not None


def test_hpa_scales_the_deployment_on_the_adapters_waiting_metric(objects):
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": objects["Deployment"]["metadata"]["name"],
    }
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert ":" not in name, "Kubernetes custom metric names cannot contain ':'"
    assert name in adapter_metric_names()["packserve:num_requests_waiting"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60


def adapter_metric_names() -> dict[str, set[str]]:
    """Prometheus series -> the custom metric names the adapter rules publish for it."""
    values = one("prometheus-adapter-values.yaml")
    assert values["rules"]["default"] is False
    out: dict[str, set[str]] = {}
    for rule in values["rules"]["custom"]:
        series = re.match(r"[\w:]+", rule["seriesQuery"].strip("'\""))
        assert series, rule["seriesQuery"]
        matches, as_ = rule["name"]["matches"], rule["name"].get("as", "")
        # The adapter uses Go's regexp: $1 / ${1} in `as`; an empty `as` means "$1", or the
        # whole name when there is no group.
        pattern = re.compile(matches)
        if not as_:
            as_ = "${1}" if pattern.groups else "${0}"
        go_to_python = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", as_)
        published = pattern.sub(go_to_python, series[0], count=1)
        out.setdefault(series[0], set()).add(published)
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"]
    return out


def test_adapter_publishes_the_waiting_queue_without_colons():
    names = adapter_metric_names()
    assert names["packserve:num_requests_waiting"] == {"packserve_num_requests_waiting"}


def test_servicemonitor_scrapes_the_service_port(objects):
    sm = objects["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert sm["metadata"]["name"]
    service = objects["Service"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert sm["spec"]["endpoints"]
    for endpoint in sm["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"
        durations = [endpoint.get(k, "10s") for k in ("interval", "scrapeTimeout")]
        seconds = [int(re.fullmatch(r"(\d+)s", d)[1]) for d in durations]  # type: ignore[index]
        assert seconds[1] <= seconds[0], "scrapeTimeout must not exceed interval"


def test_k8s_files_are_plain_yaml_documents():
    for path in sorted(Path(K8S).glob("*.yaml")):
        for doc in load_yaml_docs(path):
            assert isinstance(doc, dict), path
