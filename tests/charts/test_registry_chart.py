"""The registry workload chart (helm/registry): lint, schema, valid objects, and equality with
the objects registry-addon renders itself (src/render/registry.rs)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import helm_python
import pytest
import yaml

from helpers import REGISTRY_CHART, REPO, first_difference, key, render, validate

NAMESPACE = "registry-system"
BASE = {"serviceIP": "10.96.0.20", "certificateHash": "0123abcd"}


def test_lint_is_clean():
    report = helm_python.lint(REGISTRY_CHART, BASE, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_with_the_ci_values_is_clean():
    """`helm lint helm/registry` as chart-testing runs it: with ci/default-values.yaml."""
    values = yaml.safe_load((Path(REGISTRY_CHART) / "ci" / "default-values.yaml").read_text())
    report = helm_python.lint(REGISTRY_CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    "values",
    [
        BASE,
        {**BASE, "replicas": 1, "storage": {"size": "5Gi", "storageClassName": "fast"}},
        {**BASE, "serviceIP": "fd00:10:96::14", "replicas": 7, "controlPlane": {"tolerate": False, "prefer": True}},
    ],
    ids=["defaults", "one-replica", "ipv6-seven"],
)
def test_rendered_objects_are_valid(values):
    objects = render(REGISTRY_CHART, values, NAMESPACE)
    assert [key(o) for o in objects] == [
        "ClusterRole /registry-node-agent",
        "ClusterRoleBinding /registry-node-agent",
        "DaemonSet registry-system/registry-node-agent",
        "PodDisruptionBudget registry-system/registry",
        "Role registry-system/registry-node-agent",
        "RoleBinding registry-system/registry-node-agent",
        "Service registry-system/registry",
        "Service registry-system/registry-headless",
        "ServiceAccount registry-system/registry-node-agent",
        "StatefulSet registry-system/registry",
    ]
    for obj in objects:
        validate(obj)


def test_statefulset_follows_values():
    values = {**BASE, "replicas": 3, "syncInterval": "45s", "storage": {"size": "20Gi", "storageClassName": "fast"}}
    sts = next(o for o in render(REGISTRY_CHART, values, NAMESPACE) if o["kind"] == "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    pod = sts["spec"]["template"]
    assert pod["metadata"]["annotations"]["registry-addon/certificate-hash"] == "0123abcd"
    registry, front, sync = pod["spec"]["containers"]
    env = {e["name"]: e for e in registry["env"]}
    # Distribution only on the pod's loopback, behind the front, with the shared HTTP secret.
    assert env["REGISTRY_HTTP_ADDR"]["value"] == "127.0.0.1:5001"
    assert env["REGISTRY_HTTP_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "registry-auth", "key": "http.secret"}
    assert "ports" not in registry
    assert front["args"][0] == "front"
    assert [p["containerPort"] for p in front["ports"]] == [5000, 9442]
    args = sync["args"]
    assert args[args.index("--local") + 1] == "http://127.0.0.1:5001"
    assert args[args.index("--replicas") + 1] == "3"
    assert args[args.index("--interval") + 1] == "45s"
    claim = sts["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["storageClassName"] == "fast"
    assert claim["resources"]["requests"]["storage"] == "20Gi"
    assert pod["spec"]["tolerations"][0]["key"] == "node-role.kubernetes.io/control-plane"


def test_sync_state_is_on_the_registry_volume():
    """The syncer's memory of agreed digests survives restarts: it lies on the PVC, in a
    directory of its own beside Distribution's tree, writable by the sidecar."""
    sts = next(o for o in render(REGISTRY_CHART, BASE, NAMESPACE) if o["kind"] == "StatefulSet")
    registry, _front, sync = sts["spec"]["template"]["spec"]["containers"]
    assert [c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]] == ["data"]
    state = sync["args"][sync["args"].index("--state-file") + 1]
    mount = next(m for m in sync["volumeMounts"] if m["name"] == "data")
    assert state.startswith(mount["mountPath"] + "/")
    assert not mount.get("readOnly", False)
    assert mount["subPath"] and not mount["subPath"].startswith("docker")
    registry_mount = next(m for m in registry["volumeMounts"] if m["name"] == "data")
    assert "subPath" not in registry_mount


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"replicas": 2}, "/serviceIP"),
        ({**BASE, "replicas": 0}, "/replicas"),
        ({**BASE, "replicas": 8}, "/replicas"),
        ({**BASE, "replicas": "2"}, "/replicas"),
        ({**BASE, "serviceIP": "registry.local"}, "/serviceIP"),
        ({**BASE, "serviceIP": "10.96.0.256"}, "/serviceIP"),
        ({**BASE, "storage": {"size": "lots"}}, "/storage/size"),
        ({**BASE, "storage": {"size": "10Gi", "storageClassName": "Fast_SSD"}}, "/storage/storageClassName"),
        ({**BASE, "syncInterval": "soon"}, "/syncInterval"),
        ({**BASE, "imagePullPolicy": "Sometimes"}, "/imagePullPolicy"),
        ({**BASE, "replica": 3}, "replica"),
    ],
)
def test_schema_rejects_bad_values(values, complaint):
    with helm_python.Chart.load(REGISTRY_CHART) as chart:
        with pytest.raises(helm_python.HelmValuesError, match=complaint):
            chart.validate_schema(values)
        with pytest.raises(helm_python.HelmValuesError):
            chart.render(values, name="registry", namespace=NAMESPACE)


def test_other_namespace_is_refused():
    with pytest.raises(helm_python.HelmRenderError, match="registry-system"):
        render(REGISTRY_CHART, BASE, "default")


@pytest.fixture(scope="module")
def rust_cases(tmp_path_factory) -> Path:
    """Values and objects written by `cargo test --test chart_values`."""
    given = os.environ.get("CHART_CHECK_DIR")
    if given and any(Path(given).glob("*/objects.json")):
        return Path(given)
    out = tmp_path_factory.mktemp("chart-check")
    subprocess.run(
        ["cargo", "test", "--quiet", "--test", "chart_values"],
        cwd=REPO,
        env={**os.environ, "CHART_CHECK_DIR": str(out)},
        check=True,
    )
    return out


def test_rust_objects_equal_chart_objects(rust_cases):
    cases = sorted(p.parent for p in rust_cases.glob("*/objects.json"))
    assert len(cases) >= 3, f"no cases written to {rust_cases}"
    for case in cases:
        values = helm_python.values_from_yaml((case / "values.yaml").read_text())
        chart_objects = {key(o): o for o in render(REGISTRY_CHART, values, NAMESPACE)}
        rust_objects = {key(o): o for o in json.loads((case / "objects.json").read_text())}
        assert sorted(rust_objects) == sorted(chart_objects), case.name
        for name, obj in rust_objects.items():
            difference = first_difference(obj, chart_objects[name])
            assert difference is None, f"{case.name}: {name}: Rust != chart at {difference}"


def test_chart_defaults_equal_rust_defaults(rust_cases):
    """The defaults of values.yaml and of RegistryValues::new give the same release."""
    rust = helm_python.values_from_yaml((rust_cases / "defaults" / "values.yaml").read_text())
    fixed = {field: rust[field] for field in ("serviceIP", "certificateHash")}
    with helm_python.Chart.load(REGISTRY_CHART) as chart:
        assert without_nulls(chart.merge_values(rust)) == without_nulls(chart.merge_values(fixed))


def without_nulls(value):
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    return value


UPSTREAM = {"url": "https://upstream.example:5443", "credentials": True, "ca": True}


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("Proxy", ["PodDisruptionBudget registry-system/registry", "Service registry-system/registry",
                   "Service registry-system/registry-headless", "StatefulSet registry-system/registry"]),
        ("Direct", ["Deployment registry-system/registry-direct", "PodDisruptionBudget registry-system/registry-direct",
                    "Service registry-system/registry"]),
        ("Unmanaged", []),
    ],
)
def test_each_mode_renders_its_objects(mode, expected):
    values = {**BASE, "mode": mode, "upstream": UPSTREAM} if mode != "Unmanaged" else {**BASE, "mode": mode}
    objects = render(REGISTRY_CHART, values, NAMESPACE)
    node_agent = {key(o) for o in objects if "node-agent" in o["metadata"]["name"]}
    # The node agent stays in every mode: in Unmanaged it removes the addon's node files.
    assert len(node_agent) == 6
    assert [key(o) for o in objects if key(o) not in node_agent] == expected
    for obj in objects:
        validate(obj)


@pytest.mark.parametrize("mode", ["Local", "Proxy", "Direct"])
def test_a_mode_change_keeps_the_previous_workload_for_the_addon_to_remove(mode):
    """Helm leaves what a change of mode drops from the release (the previous mode serves until
    the switch completes, then the addon deletes it); the node agent is in every mode."""
    objects = render(REGISTRY_CHART, {**BASE, "mode": mode, "upstream": UPSTREAM}, NAMESPACE)
    for obj in objects:
        annotations = obj["metadata"].get("annotations") or {}
        kept = annotations.get("helm.sh/resource-policy") == "keep"
        assert kept == ("node-agent" not in obj["metadata"]["name"]), key(obj)


def serving_pods(objects):
    return [o["spec"]["template"]["metadata"]["labels"] for o in objects if o["kind"] in ("StatefulSet", "Deployment")]


@pytest.mark.parametrize("mode", ["Local", "Proxy", "Direct"])
def test_the_service_keeps_its_address_and_selects_the_serving_pods(mode):
    objects = render(REGISTRY_CHART, {**BASE, "mode": mode, "upstream": UPSTREAM}, NAMESPACE)
    service = next(o for o in objects if key(o) == "Service registry-system/registry")
    assert service["spec"]["clusterIP"] == BASE["serviceIP"]
    selector = service["spec"]["selector"]
    pods = serving_pods(objects)
    assert len(pods) == 1
    assert selector.items() <= pods[0].items()
    # Nothing else is selected: the node agent's pods lack the serving labels.
    agent = next(o for o in objects if o["kind"] == "DaemonSet")
    assert not selector.items() <= agent["spec"]["template"]["metadata"]["labels"].items()


def test_statefulset_selector_does_not_match_direct_pods():
    local = render(REGISTRY_CHART, BASE, NAMESPACE)
    direct = render(REGISTRY_CHART, {**BASE, "mode": "Direct", "upstream": UPSTREAM}, NAMESPACE)
    sts = next(o for o in local if o["kind"] == "StatefulSet")
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert not sts["spec"]["selector"]["matchLabels"].items() <= serving_pods(direct)[0].items()


def test_proxy_is_a_pull_through_cache_without_sync():
    values = {**BASE, "mode": "Proxy", "upstream": {**UPSTREAM, "cacheTTL": "72h"}}
    sts = next(o for o in render(REGISTRY_CHART, values, NAMESPACE) if o["kind"] == "StatefulSet")
    local = next(o for o in render(REGISTRY_CHART, BASE, NAMESPACE) if o["kind"] == "StatefulSet")
    assert sts["spec"]["volumeClaimTemplates"] == local["spec"]["volumeClaimTemplates"]
    containers = sts["spec"]["template"]["spec"]["containers"]
    # The front first, its postStart hook holding the registry back until its relay listens.
    assert [c["name"] for c in containers] == ["front", "registry"]
    front, registry = containers
    assert front["lifecycle"]["postStart"]["exec"]["command"] == ["/usr/local/bin/registry-addon", "wait", "--tcp", "127.0.0.1:5003"]
    assert [c["name"] for c in local["spec"]["template"]["spec"]["containers"]] == ["registry", "front", "sync"]
    env = {e["name"]: e for e in registry["env"]}
    # The registry reaches the upstream through the front's relay on the pod's loopback and
    # holds neither the upstream's credentials nor its CA; the front's relay does.
    assert env["REGISTRY_PROXY_REMOTEURL"]["value"] == "http://127.0.0.1:5003"
    assert env["REGISTRY_PROXY_TTL"]["value"] == "72h"
    assert {"REGISTRY_PROXY_USERNAME", "REGISTRY_PROXY_PASSWORD", "SSL_CERT_FILE"}.isdisjoint(env)
    assert "upstream" not in {m["name"] for m in registry["volumeMounts"]}
    assert not any(name.startswith("REGISTRY_NOTIFICATIONS") for name in env)
    args = front["args"]
    assert "--pull-only" in args
    assert args[args.index("--remote") + 1] == "https://upstream.example:5443"
    assert args[args.index("--remote-credentials") + 1] == "/etc/registry-upstream"
    assert args[args.index("--remote-ca") + 1] == "/etc/registry-upstream/ca.crt"
    assert args[args.index("--relay-listen") + 1] == "127.0.0.1:5003"
    mounts = {m["name"]: m for m in front["volumeMounts"]}
    assert mounts["upstream"]["mountPath"] == "/etc/registry-upstream"
    # The spool: the relay's own directory of the replica's volume.
    assert mounts["data"] == {"name": "data", "mountPath": args[args.index("--relay-spool") + 1], "subPath": "registry-addon-relay"}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert "sync-auth" not in volumes
    assert volumes["upstream"]["secret"]["items"] == [{"key": "username", "path": "username"}, {"key": "password", "path": "password"}, {"key": "ca.crt", "path": "ca.crt"}]
    # Without credentials nor CA: no reference to a Secret that is not there.
    plain = {**BASE, "mode": "Proxy", "upstream": {"url": "https://upstream.example"}}
    sts = next(o for o in render(REGISTRY_CHART, plain, NAMESPACE) if o["kind"] == "StatefulSet")
    front = sts["spec"]["template"]["spec"]["containers"][0]
    assert "--remote-credentials" not in front["args"] and "--remote-ca" not in front["args"]
    assert "upstream" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}


@pytest.mark.parametrize("replicas, expected", [(1, 2), (2, 2), (5, 5)])
def test_direct_runs_the_front_alone_with_two_replicas_or_more(replicas, expected):
    values = {**BASE, "mode": "Direct", "replicas": replicas, "upstream": UPSTREAM}
    deployment = next(o for o in render(REGISTRY_CHART, values, NAMESPACE) if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == expected
    pod = deployment["spec"]["template"]["spec"]
    [front] = pod["containers"]
    args = front["args"]
    assert args[args.index("--remote") + 1] == "https://upstream.example:5443"
    assert args[args.index("--remote-credentials") + 1] == "/etc/registry-upstream"
    assert args[args.index("--remote-ca") + 1] == "/etc/registry-upstream/ca.crt"
    assert "--upstream" not in args
    assert not any("persistentVolumeClaim" in v or "emptyDir" in v for v in pod["volumes"])
    upstream = next(v for v in pod["volumes"] if v["name"] == "upstream")
    assert upstream["secret"]["items"] == [{"key": "username", "path": "username"}, {"key": "password", "path": "password"}, {"key": "ca.crt", "path": "ca.crt"}]


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({**BASE, "mode": "Proxy"}, "upstream"),
        ({**BASE, "mode": "Direct", "upstream": {"url": ""}}, "url"),
        ({**BASE, "mode": "Remote"}, "/mode"),
        ({**BASE, "mode": "Proxy", "upstream": {"url": "http://upstream.example"}}, "/upstream/url"),
        ({**BASE, "mode": "Proxy", "upstream": {"url": "https://upstream.example/path"}}, "/upstream/url"),
        ({**BASE, "mode": "Proxy", "upstream": {"url": "https://u.example", "cacheTTL": "a week"}}, "/upstream/cacheTTL"),
    ],
)
def test_schema_rejects_bad_mode_values(values, complaint):
    with helm_python.Chart.load(REGISTRY_CHART) as chart:
        with pytest.raises(helm_python.HelmValuesError, match=complaint):
            chart.validate_schema(values)
