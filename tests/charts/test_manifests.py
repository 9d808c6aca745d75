"""manifests/ is what hack/gen-manifests.py makes of the chart today."""

from __future__ import annotations

import subprocess
import sys

import yaml

from helpers import REPO, validate


def test_manifests_are_up_to_date(tmp_path):
    subprocess.run([sys.executable, str(REPO / "hack" / "gen-manifests.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in (REPO / "manifests").iterdir())
    assert generated == committed
    for name in generated:
        assert (tmp_path / name).read_text() == (REPO / "manifests" / name).read_text(), (
            f"manifests/{name} is out of date: run hack/gen-manifests.sh"
        )


def test_manifests_are_valid():
    docs = [d for d in yaml.safe_load_all((REPO / "manifests" / "registry-addon.yaml").read_text()) if d]
    assert docs[0]["kind"] == "Namespace"
    for obj in docs:
        validate(obj)
        if obj["kind"] not in ("CustomResourceDefinition", "Namespace", "ClusterRole", "ClusterRoleBinding", "ExtensionConfig"):
            assert obj["metadata"]["namespace"] == "registry-addon-system", obj["metadata"]["name"]


def test_clusterctl_metadata_names_the_release():
    metadata = yaml.safe_load((REPO / "metadata.yaml").read_text())
    assert metadata["apiVersion"] == "clusterctl.cluster.x-k8s.io/v1alpha3"
    assert metadata["kind"] == "Metadata"
    chart = yaml.safe_load((REPO / "helm" / "registry-addon" / "Chart.yaml").read_text())
    major, minor, _ = chart["appVersion"].split(".")
    assert {"major": int(major), "minor": int(minor), "contract": "v1beta1"} in metadata["releaseSeries"]
