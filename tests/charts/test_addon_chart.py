"""The extension's own chart (helm/registry-addon): lint, schema, valid objects, RBAC and the
command line it gives the binary."""

from __future__ import annotations

import base64
import os
import re
import subprocess

import helm_python
import jsonschema
import pytest
import yaml

from helpers import ADDON_CHART, REGISTRY_CHART, REPO, key, render, validate, validate_with_crd

NAMESPACE = "registry-addon-system"
MODES = [{}, {"certManager": {"enabled": False}}, {"createNamespace": True, "deployer": "direct", "extensionConfig": {"namespaceSelector": {"matchLabels": {"registry": "on"}}, "settings": {"foo": "bar"}}}]


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.parametrize("values", MODES, ids=["cert-manager", "helm-certificate", "direct"])
def test_lint_is_clean(values):
    report = helm_python.lint(ADDON_CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", MODES, ids=["cert-manager", "helm-certificate", "direct"])
def test_rendered_objects_are_valid(values):
    objects = render(ADDON_CHART, values, NAMESPACE)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ExtensionConfig"} <= kinds
    for obj in objects:
        validate(obj)


def test_serving_certificate_from_cert_manager():
    objects = render(ADDON_CHART, {}, NAMESPACE)
    certificate = by_kind(objects, "Certificate")[0]
    assert certificate["spec"]["secretName"] == "registry-addon-webhook-tls"
    assert "registry-addon-webhook.registry-addon-system.svc" in certificate["spec"]["dnsNames"]
    assert by_kind(objects, "Issuer")
    config = by_kind(objects, "ExtensionConfig")[0]
    assert config["metadata"]["annotations"]["runtime.cluster.x-k8s.io/inject-ca-from-secret"] == "registry-addon-system/registry-addon-webhook-tls"
    assert "caBundle" not in config["spec"]["clientConfig"]
    assert config["spec"]["clientConfig"]["service"] == {"name": "registry-addon-webhook", "namespace": NAMESPACE, "port": 443}


def test_serving_certificate_without_cert_manager():
    objects = render(ADDON_CHART, {"certManager": {"enabled": False}}, NAMESPACE)
    assert not by_kind(objects, "Certificate") and not by_kind(objects, "Issuer")
    secret = by_kind(objects, "Secret")[0]
    assert secret["type"] == "kubernetes.io/tls"
    config = by_kind(objects, "ExtensionConfig")[0]
    assert config["spec"]["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    for field in ("ca.crt", "tls.crt", "tls.key"):
        assert base64.b64decode(secret["data"][field]).startswith(b"-----BEGIN")


def test_extension_config_settings_and_selector():
    config = by_kind(render(ADDON_CHART, MODES[2], NAMESPACE), "ExtensionConfig")[0]
    assert config["spec"]["settings"] == {"deployer": "direct", "foo": "bar"}
    assert config["spec"]["namespaceSelector"] == {"matchLabels": {"registry": "on"}}


def test_rbac_is_least_privilege():
    objects = render(ADDON_CHART, {}, NAMESPACE)
    for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{key(role)}: {rule}"
            assert "nonResourceURLs" not in rule
    rules = {(g, r): set(rule["verbs"]) for rule in by_kind(objects, "ClusterRole")[0]["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules[("", "secrets")] == {"get", "create", "patch", "delete"}
    assert rules[("addons.cluster.x-k8s.io", "helmchartproxies")] >= {"get", "create", "patch", "delete"}
    assert rules[("cluster.x-k8s.io", "clusters")] == {"get", "list", "watch"}
    assert rules[("registry-addon.io", "clusterregistries")] == {"get", "create", "patch", "delete"}
    assert rules[("registry-addon.io", "clusterregistries/status")] == {"patch"}
    assert rules[("events.k8s.io", "events")] == {"create", "patch"}
    # Leases only in the extension's own namespace (a Role, not the ClusterRole).
    assert not any(g == "coordination.k8s.io" for g, _ in rules)
    lease_role = [r for r in by_kind(objects, "Role") if r["metadata"]["name"].endswith("leader-election")][0]
    assert lease_role["metadata"]["namespace"] == NAMESPACE
    assert lease_role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}]


def test_cluster_registry_crd_is_installed_with_the_binding_names(tmp_path):
    crd = [o for o in by_kind(render(ADDON_CHART, {}, NAMESPACE), "CustomResourceDefinition")]
    assert [c["metadata"]["name"] for c in crd] == ["clusterregistries.registry-addon.io"]
    spec = crd[0]["spec"]
    assert spec["scope"] == "Namespaced" and spec["names"]["shortNames"] == ["creg"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Mode", "Ready", "Replicas", "Nodes", "Cert-Expires", "Age"]
    example = {
        "apiVersion": "registry-addon.io/v1alpha1",
        "kind": "ClusterRegistry",
        "metadata": {"name": "c1", "namespace": "default"},
        "status": {
            "observedGeneration": 2, "mode": "Local", "replicas": 3, "readyReplicas": 2, "replicasReady": "2/3",
            "certificate": {"notAfter": "2028-11-16T15:06:40Z", "renewAfter": "2028-03-21T15:06:40Z"},
            "conditions": [{"type": "Ready", "status": "False", "reason": "ReplicasNotReady", "message": "2 of 3 replicas ready",
                            "lastTransitionTime": "2026-12-01T09:00:00Z", "observedGeneration": 2}],
        },
    }
    path = tmp_path / "clusterregistries.yaml"
    path.write_text(yaml.safe_dump(crd[0]))
    validate_with_crd(example, path)
    bad = {**example, "status": {**example["status"], "mode": "Sideways"}}
    with pytest.raises(jsonschema.ValidationError):
        validate_with_crd(bad, path)


def test_deployment_is_hardened_and_probed():
    deployment = by_kind(render(ADDON_CHART, {}, NAMESPACE), "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["containerPort"] for p in container["ports"]} == {9443, 9440}
    services = {s["metadata"]["name"]: s for s in by_kind(render(ADDON_CHART, {}, NAMESPACE), "Service")}
    assert services["registry-addon-webhook"]["spec"]["ports"][0]["port"] == 443
    assert services["registry-addon-metrics"]["spec"]["ports"][0]["port"] == 9440


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"deployer": "kubectl"}, "/deployer"),
        ({"keyAlgorithm": "dsa"}, "/keyAlgorithm"),
        ({"replicas": 0}, "/replicas"),
        ({"registryChart": {"repository": "ftp://charts", "name": "registry"}}, "/registryChart/repository"),
        ({"certManager": {"enabled": "yes"}}, "/certManager/enabled"),
        ({"extensionConfig": {"settings": {"deployer": 1}}}, "/extensionConfig/settings"),
        ({"logFormat": "xml"}, "/logFormat"),
        ({"replica": 2}, "replica"),
    ],
)
def test_schema_rejects_bad_values(values, complaint):
    with helm_python.Chart.load(ADDON_CHART) as chart:
        with pytest.raises(helm_python.HelmValuesError, match=complaint):
            chart.validate_schema(values)


@pytest.fixture(scope="module")
def binary():
    subprocess.run(["cargo", "build", "--quiet", "--bin", "registry-addon"], cwd=REPO, check=True)
    # Where cargo put it: CARGO_TARGET_DIR (relative to the repository) or target/.
    return REPO / os.environ.get("CARGO_TARGET_DIR", "target") / "debug" / "registry-addon"


def flags_of(binary, command):
    text = subprocess.run([binary, command, "--help"], check=True, capture_output=True, text=True).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", text))


def test_deployment_args_are_real_serve_flags(binary):
    for values in MODES:
        deployment = by_kind(render(ADDON_CHART, values, NAMESPACE), "Deployment")[0]
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[0] == "serve"
        used = {a.split("=", 1)[0] for a in args[1:]}
        assert used <= flags_of(binary, "serve"), used - flags_of(binary, "serve")


def test_registry_sidecar_args_are_real_sync_flags(binary):
    objects = render(REGISTRY_CHART, {"serviceIP": "10.96.0.20"}, "registry-system")
    sts = by_kind(objects, "StatefulSet")[0]
    sync = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "sync")
    assert sync["args"][0] == "sync"
    used = {a for a in sync["args"][1:] if a.startswith("--")}
    assert used <= flags_of(binary, "sync"), used - flags_of(binary, "sync")
