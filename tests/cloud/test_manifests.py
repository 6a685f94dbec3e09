"""The Kubernetes manifests agree with the server they deploy: flags exist, probes hit the
health endpoints, and the HPA's metric is one the server exports."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.cloud.conftest import TANDEM, ServerProcess, http_get
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"


def documents() -> dict[tuple[str, str], dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "metadata" in doc:  # kustomization.yaml has none
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_deployment_args_probes_and_ports_match_the_server(server: ServerProcess) -> None:
    docs = documents()
    deployment = docs[("Deployment", "tandem-serve")]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    help_text = subprocess.run(
        [str(TANDEM), "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    ).stdout
    assert container["args"][0] == "serve"
    for arg in container["args"][1:]:
        assert arg.split("=")[0] in help_text, arg
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 8001, "http": 8000, "metrics": 8002}
    for probe in ("startupProbe", "readinessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert http_get(f"{server.http_url}{path}")[0] == 200, path
    assert container["livenessProbe"]["grpc"]["port"] == ports["grpc"]
    drain = next(int(a.split("=")[1]) for a in container["args"] if a.startswith("--drain-timeout"))
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain + 5
    selector = deployment["spec"]["selector"]["matchLabels"]
    for name in ("tandem-serve", "tandem-serve-headless"):
        assert docs[("Service", name)]["spec"]["selector"] == selector


def test_hpa_scales_on_a_metric_the_server_exports(server: ServerProcess) -> None:
    hpa = documents()[("HorizontalPodAutoscaler", "tandem-serve")]
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names == ["tandem_inference_queue_depth"]
    assert "\ntandem_inference_queue_depth{" in server.metrics_text()
    rules = documents()[("ConfigMap", "prometheus-adapter-tandem")]["data"]["config.yaml"]
    assert "tandem_inference_queue_depth" in rules
    assert Path(K8S / "kustomization.yaml").is_file()
