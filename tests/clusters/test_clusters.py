"""Every cluster definition parses and matches the installed Ray."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"
LAUNCHER = sorted(CLUSTERS.glob("*.yaml"))
KUBERAY = sorted((CLUSTERS / "kuberay").glob("*.yaml"))


def _image_ok(image: str) -> bool:
    return image.startswith(f"rayproject/ray:{ray.__version__}-") and image.endswith("-gpu")


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_matches_rays_schema(path):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, schema)
    assert _image_ok(config["docker"]["image"])
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["trial_driver"] > 0
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] >= t.get("min_workers", 0) for t in gpu_types)
    # Credentials come from the cloud's secret store into every node's shell, never from the file.
    secrets = [c for c in config["setup_commands"] if "HF_TOKEN" in c or "MLFLOW_TRACKING_PASSWORD" in c]
    assert len(secrets) == 2 and all("secret" in c for c in secrets)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in ("RayCluster", "RayJob")
    cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = _containers(cluster["headGroupSpec"]["template"])
    assert all(_image_ok(c["image"]) for c in head)
    # Every node takes its credentials from the Secret, as env vars (no value in the manifest).
    every = head + [c for g in cluster["workerGroupSpecs"] for c in _containers(g["template"])]
    assert all({"secretRef": {"name": "peft-sweep-secrets", "optional": True}} in c["envFrom"] for c in every)
    assert not [e for c in every for e in c.get("env", []) if "TOKEN" in e["name"] or "PASSWORD" in e["name"]]
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in head)
    for group in cluster["workerGroupSpecs"]:
        for c in _containers(group["template"]):
            assert _image_ok(c["image"])
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert group["maxReplicas"] >= group["minReplicas"]
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].startswith("sweep run ")
        volumes = cluster["headGroupSpec"]["template"]["spec"]["volumes"]
        assert any("configMap" in v for v in volumes)


def test_every_cluster_file_is_checked():
    assert len(LAUNCHER) >= 2 and len(KUBERAY) >= 2
