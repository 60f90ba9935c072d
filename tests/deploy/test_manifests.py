"""Offline checks of what deploy/ and the Dockerfile say: linted, schema-valid, consistent."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CORE_MANIFESTS = [
    "pvc.yaml",
    "deployment.yaml",
    "service.yaml",
    "pdb.yaml",
    "hpa.yaml",
    "prometheus-adapter-rules.yaml",
]


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.fail(f"{name} is not installed: `make install` installs the [test] extra")
    return path


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_dockerfile_passes_hadolint():
    done = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_has_the_promised_shape():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M) and "FROM ${BASE_IMAGE} AS gpu" in text
    assert "AS cpu" in text and '".[gpu,structured]"' in text and '".[structured]"' in text and "HEALTHCHECK" in text
    assert 'ENTRYPOINT ["cogserve", "serve"]' in text
    assert re.search(r"^USER 10001$", text, re.M)  # non-root
    assert "/models" in text and "COPY checkpoints" not in text  # weights are mounted, never baked in


def test_core_manifests_validate_strictly_against_the_kubernetes_schemas():
    files = [str(DEPLOY / name) for name in CORE_MANIFESTS]
    done = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", *files], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_kustomization_lists_files_that_exist():
    kustomization = load("kustomization.yaml")
    for name in kustomization["resources"]:
        assert (DEPLOY / name).is_file(), name
    for generator in kustomization["configMapGenerator"]:
        for name in generator["files"]:
            assert (DEPLOY / name).is_file(), name


def test_manifests_agree_with_each_other_and_with_the_server():
    deployment, service = load("deployment.yaml"), load("service.yaml")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a 35 GB load takes minutes
    shutdown = int(next(a.split("=")[1] for a in container["args"] if a.startswith("--shutdown-timeout=")))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + shutdown
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > shutdown  # no restart mid-drain
    weights = next(v for v in pod["spec"]["volumes"] if v["name"] == "weights")
    assert weights["persistentVolumeClaim"]["readOnly"] is True
    monitor = load("servicemonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    hpa = load("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    rules = yaml.safe_load(load("prometheus-adapter-rules.yaml")["data"]["config.yaml"])["rules"][0]
    served_name = re.sub(
        rules["name"]["matches"], rules["name"]["as"].replace("${1}", r"\1"), "cogserve:num_requests_waiting"
    )
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == served_name
    keda = load("keda/scaledobject.yaml")
    assert keda["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "cogserve:num_requests_waiting" in keda["spec"]["triggers"][0]["metadata"]["query"]


def test_compose_file_wires_cogserve_prometheus_and_grafana():
    compose = load("compose.yaml")
    assert {"cogserve", "prometheus", "grafana"} <= set(compose["services"])
    assert compose["services"]["cogserve"]["build"]["target"] == "cpu"
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["cogserve:8000"]


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "cogserve-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 12
    return {name for expr in exprs for name in re.findall(r"cogserve:[a-z_]+", expr)}


def test_dashboard_references_only_metrics_the_server_exports(tiny_checkpoints):
    import httpx

    from server.config import ServeConfig
    from tests.server.live_server import MODEL_NAME, running_engine, serve

    with (
        running_engine(tiny_checkpoints[1], num_kv_blocks=128) as (_, processor, engine),
        serve(ServeConfig(), engine, processor) as live,
    ):
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        httpx.post(f"{live.url}/v1/chat/completions", json=body)
        httpx.post(f"{live.url}/v1/chat/completions", json={**body, "model": "nope"})  # a 404 for the errors panel
        exposition = httpx.get(f"{live.url}/metrics").text
    exported = set(re.findall(r"^(cogserve:[a-z_]+)", exposition, re.M))
    missing = dashboard_metric_names() - exported
    assert not missing, f"the dashboard queries metrics the server does not export: {sorted(missing)}"
