"""Rendering and validation shared by the chart tests: the real Helm engine (helm-python-sdk),
kubernetes-validate for built-in kinds, and the CRDs beside the repository for the rest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
REGISTRY_CHART = REPO / "helm" / "registry"
ADDON_CHART = REPO / "helm" / "registry-addon"
# CAPI reference CRDs: `shared/capi` next to the repository, or $CAPI_REFERENCE_DIR.
CAPI_DIR = Path(os.environ.get("CAPI_REFERENCE_DIR", REPO.parent / "shared" / "capi"))

# The oldest Kubernetes the charts support and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]

# Kinds defined by CRDs: checked against the CRD schema when it is at hand.
CRD_FILES = {
    ("runtime.cluster.x-k8s.io", "ExtensionConfig"): "runtime.cluster.x-k8s.io_extensionconfigs.yaml",
    ("addons.cluster.x-k8s.io", "HelmChartProxy"): "addons.cluster.x-k8s.io_helmchartproxies.yaml",
}
# cert-manager ships no CRD in this repository; its objects are checked structurally.
CERT_MANAGER_KINDS = {"Issuer", "Certificate"}


def render(chart: Path, values: dict[str, Any] | None, namespace: str, name: str = "release") -> list[dict[str, Any]]:
    """Every object the chart renders, in a stable order (kind, name)."""
    with helm_python.Chart.load(chart) as loaded:
        manifests = loaded.render(values, name=name, namespace=namespace, is_install=True)
    objects = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return sort_objects(objects)


def sort_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(objects, key=lambda o: (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]))


def key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f'{obj["kind"]} {meta.get("namespace", "")}/{meta["name"]}'


def validate(obj: dict[str, Any]) -> None:
    """Strict schema validation of one object; raises on the first error."""
    group = obj["apiVersion"].rpartition("/")[0]
    crd_file = CRD_FILES.get((group, obj["kind"]))
    if crd_file is not None:
        validate_with_crd(obj, CAPI_DIR / crd_file)
        return
    if obj["kind"] in CERT_MANAGER_KINDS:
        assert obj["apiVersion"] == "cert-manager.io/v1", key(obj)
        assert isinstance(obj.get("spec"), dict), key(obj)
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def validate_with_crd(obj: dict[str, Any], crd_path: Path) -> None:
    assert crd_path.exists(), f"CRD {crd_path} not found: the tests need ../shared/capi beside the repository"
    crd = yaml.safe_load(crd_path.read_text())
    version = obj["apiVersion"].rpartition("/")[2]
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in served, f"{key(obj)}: {obj['apiVersion']} is not served by {crd_path.name}"
    schema = strict_schema(served[version]["schema"]["openAPIV3Schema"])
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    schema = {**schema, "properties": {k: v for k, v in schema["properties"].items() if k not in ("apiVersion", "kind", "metadata")}}
    jsonschema.validate(body, schema)


def strict_schema(schema: Any) -> Any:
    """The structural schema with unknown fields refused, as the API server prunes them."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if out.get("type") == "object" and "properties" in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two JSON-like values first differ, for readable failures."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}: {a.get(k, '<absent>')!r} != {b.get(k, '<absent>')!r}"
            found = first_difference(a[k], b[k], f"{path}.{k}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    if a != b or type(a) is not type(b):
        return f"{path}: {a!r} != {b!r}"
    return None
