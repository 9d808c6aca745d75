//! The objects the lifecycle hooks write, built once for the hooks and for `render`: the root
//! CA Secret, the cluster's CA copy, the registry Namespace, the registry TLS Secret, the
//! HelmChartProxy and the registry objects as the direct deployer applies them. Every object
//! carries only the fields the addon owns.

use base64::Engine;
use serde_json::{Value, json};

use crate::certs::{CertificateAuthority, CertifiedKey};
use crate::cli::AddonOptions;
use crate::names;
use crate::render::registry::{RegistryValues, registry_objects};
use crate::wire::cluster::Cluster;

pub use crate::names::{
    DEFAULT_CLUSTER_API_VERSION, HELM_CHART_PROXY_API_VERSION, MANAGED_BY_LABEL,
};

pub fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The text of a Secret's `data` key, if present and valid base64/UTF-8.
pub fn secret_data(secret: &Value, key: &str) -> Option<String> {
    let encoded = secret["data"][key].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    String::from_utf8(bytes).ok()
}

fn managed_labels() -> Value {
    json!({ MANAGED_BY_LABEL: names::FIELD_MANAGER })
}

fn cluster_labels(cluster: &Cluster) -> Value {
    json!({
        MANAGED_BY_LABEL: names::FIELD_MANAGER,
        names::CLUSTER_NAME_LABEL: cluster.name(),
    })
}

/// ownerReference to the Cluster, so the object goes when the Cluster goes.
pub fn cluster_owner_reference(cluster: &Cluster) -> Value {
    let api_version = cluster
        .api_version
        .as_deref()
        .filter(|v| v.starts_with("cluster.x-k8s.io/"))
        .unwrap_or(DEFAULT_CLUSTER_API_VERSION);
    json!({
        "apiVersion": api_version,
        "kind": "Cluster",
        "name": cluster.name(),
        "uid": cluster.metadata.uid,
    })
}

/// `registry-addon-root-ca` in the extension's namespace.
pub fn root_ca_secret(namespace: &str, ca: &CertificateAuthority) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": names::ROOT_CA_SECRET,
            "namespace": namespace,
            "labels": managed_labels(),
        },
        "type": "kubernetes.io/tls",
        "data": {
            "ca.crt": b64(ca.cert_pem()),
            "tls.crt": b64(ca.cert_pem()),
            "tls.key": b64(ca.key_pem().expose()),
        },
    })
}

/// `<cluster>-registry-addon-ca` in the Cluster's namespace: the CA nodes trust, `ca.crt` only.
pub fn cluster_ca_secret(cluster: &Cluster, ca_pem: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": names::cluster_ca_secret(cluster.name()),
            "namespace": cluster.namespace(),
            "labels": cluster_labels(cluster),
            "ownerReferences": [cluster_owner_reference(cluster)],
        },
        "type": "Opaque",
        "data": { "ca.crt": b64(ca_pem) },
    })
}

/// `<cluster>-registry-addon-containerd` in the Cluster's namespace: the node's `_default`
/// `hosts.toml`, which carries the `ro` credentials; the bootstrap templates read it with
/// `contentFrom`, so the password never appears in them.
pub fn containerd_hosts_secret(cluster: &Cluster, hosts_toml: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": names::containerd_hosts_secret(cluster.name()),
            "namespace": cluster.namespace(),
            "labels": cluster_labels(cluster),
            "ownerReferences": [cluster_owner_reference(cluster)],
        },
        "type": "Opaque",
        "data": { names::CONTAINERD_HOSTS_SECRET_KEY: b64(hosts_toml) },
    })
}

/// Namespace `registry-system` on the workload cluster.
pub fn registry_namespace() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": names::REGISTRY_NAMESPACE,
            "labels": managed_labels(),
        },
    })
}

/// `registry-system/registry-tls` on the workload cluster.
pub fn registry_tls_secret(cert: &CertifiedKey, ca_pem: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": names::REGISTRY_TLS_SECRET,
            "namespace": names::REGISTRY_NAMESPACE,
            "labels": managed_labels(),
        },
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": b64(&cert.cert_pem),
            "tls.key": b64(cert.key_pem.expose()),
            "ca.crt": b64(ca_pem),
        },
    })
}

/// Helm release the HelmChartProxy installs the registry chart as (`spec.releaseName`), in
/// namespace [`names::REGISTRY_NAMESPACE`] (`spec.namespace`).
pub const HELM_RELEASE_NAME: &str = names::REGISTRY_NAME;
/// The label value and annotations Helm 3 requires on an existing object before it adopts the
/// object into a release, and sets on every object it installs.
pub const HELM_MANAGED_BY: &str = "Helm";
pub const HELM_RELEASE_NAME_ANNOTATION: &str = "meta.helm.sh/release-name";
pub const HELM_RELEASE_NAMESPACE_ANNOTATION: &str = "meta.helm.sh/release-namespace";

/// Marks `object` as part of the Helm release the HelmChartProxy installs: label
/// `app.kubernetes.io/managed-by: Helm`, annotations `meta.helm.sh/release-name` and
/// `meta.helm.sh/release-namespace`. Helm refuses to install over an existing object that
/// lacks them ("invalid ownership metadata"), so without them a cluster could not move from the
/// direct deployer to a HelmChartProxy.
pub fn mark_helm_release_member(object: &mut Value) {
    let metadata = &mut object["metadata"];
    metadata["labels"][MANAGED_BY_LABEL] = json!(HELM_MANAGED_BY);
    metadata["annotations"][HELM_RELEASE_NAME_ANNOTATION] = json!(HELM_RELEASE_NAME);
    metadata["annotations"][HELM_RELEASE_NAMESPACE_ANNOTATION] = json!(names::REGISTRY_NAMESPACE);
}

/// The registry objects as the direct deployer applies them: those of the chart, each marked
/// as a member of the HelmChartProxy's release (see [`mark_helm_release_member`]).
pub fn direct_registry_objects(values: &RegistryValues) -> Vec<Value> {
    let mut objects = registry_objects(values);
    objects.iter_mut().for_each(mark_helm_release_member);
    objects
}

/// Name of the cluster's HelmChartProxy.
pub fn helm_chart_proxy_name(cluster: &Cluster) -> String {
    names::helm_chart_proxy(cluster.name())
}

/// Whether a HelmChartProxy is the one the addon creates for `cluster`: it carries the
/// addon's labels for that cluster. Only the name says nothing: anyone may have taken it.
pub fn is_own_helm_chart_proxy(proxy: &Value, cluster: &Cluster) -> bool {
    let labels = &proxy["metadata"]["labels"];
    cluster_labels(cluster)
        .as_object()
        .is_some_and(|wanted| wanted.iter().all(|(key, value)| &labels[key] == value))
}

/// The HelmChartProxy that installs the registry chart into the cluster (SPEC §6), its
/// `valuesTemplate` the chart values as YAML.
pub fn helm_chart_proxy(
    cluster: &Cluster,
    options: &AddonOptions,
    values: &RegistryValues,
) -> Result<Value, serde_yaml::Error> {
    let values_yaml = serde_yaml::to_string(values)?;
    Ok(json!({
        "apiVersion": HELM_CHART_PROXY_API_VERSION,
        "kind": "HelmChartProxy",
        "metadata": {
            "name": helm_chart_proxy_name(cluster),
            "namespace": cluster.namespace(),
            "labels": cluster_labels(cluster),
            "ownerReferences": [cluster_owner_reference(cluster)],
        },
        "spec": {
            "clusterSelector": {
                "matchLabels": { names::CLUSTER_NAME_LABEL: cluster.name() },
            },
            "repoURL": options.chart_repository,
            "chartName": options.chart_name,
            "version": options.chart_version,
            "releaseName": HELM_RELEASE_NAME,
            "namespace": names::REGISTRY_NAMESPACE,
            "valuesTemplate": values_yaml,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::variable::registry_from_config;
    use clap::Parser;

    #[derive(Parser)]
    struct Options {
        #[command(flatten)]
        addon: AddonOptions,
    }

    fn options() -> AddonOptions {
        Options::parse_from(["test"]).addon
    }

    fn values() -> RegistryValues {
        let config = json!({"addons": {"registry": {}}});
        let registry = registry_from_config(Some(&config)).unwrap().unwrap();
        RegistryValues::new(
            &options(),
            &registry,
            "10.96.0.20".parse().unwrap(),
            "abc".into(),
        )
    }

    fn cluster() -> Cluster {
        Cluster::from_value(&json!({
            "metadata": {"name": "c1", "namespace": "ns", "uid": "u1"},
            "spec": {},
        }))
        .unwrap()
    }

    #[test]
    fn direct_objects_carry_what_helm_checks_before_adopting_them() {
        let proxy = helm_chart_proxy(&cluster(), &options(), &values()).unwrap();
        let plain = registry_objects(&values());
        let direct = direct_registry_objects(&values());
        assert_eq!(direct.len(), plain.len());
        for (direct, plain) in direct.iter().zip(&plain) {
            let metadata = &direct["metadata"];
            assert_eq!(metadata["labels"][MANAGED_BY_LABEL], "Helm");
            assert_eq!(
                metadata["annotations"]["meta.helm.sh/release-name"],
                proxy["spec"]["releaseName"]
            );
            assert_eq!(
                metadata["annotations"]["meta.helm.sh/release-namespace"],
                proxy["spec"]["namespace"]
            );
            // The chart's own labels and every other field stay as the chart renders them.
            let mut stripped = direct.clone();
            stripped["metadata"]["labels"]
                .as_object_mut()
                .unwrap()
                .remove(MANAGED_BY_LABEL);
            let metadata = stripped["metadata"].as_object_mut().unwrap();
            let annotations = metadata["annotations"].as_object_mut().unwrap();
            annotations.remove("meta.helm.sh/release-name");
            annotations.remove("meta.helm.sh/release-namespace");
            if annotations.is_empty() {
                metadata.remove("annotations");
            }
            assert_eq!(&stripped, plain);
        }
    }

    #[test]
    fn marking_overrides_another_manager_label_and_keeps_other_annotations() {
        let mut object = json!({
            "metadata": {
                "name": "x",
                "labels": {MANAGED_BY_LABEL: "someone", "a": "b"},
                "annotations": {"keep": "me"},
            },
        });
        mark_helm_release_member(&mut object);
        assert_eq!(
            object["metadata"],
            json!({
                "name": "x",
                "labels": {MANAGED_BY_LABEL: "Helm", "a": "b"},
                "annotations": {
                    "keep": "me",
                    "meta.helm.sh/release-name": "registry",
                    "meta.helm.sh/release-namespace": "registry-system",
                },
            })
        );
    }

    #[test]
    fn own_helm_chart_proxy_is_told_by_its_labels() {
        let cluster = cluster();
        let mut proxy = helm_chart_proxy(&cluster, &options(), &values()).unwrap();
        assert!(is_own_helm_chart_proxy(&proxy, &cluster));

        let other = Cluster::from_value(&json!({
            "metadata": {"name": "c2", "namespace": "ns", "uid": "u2"},
            "spec": {},
        }))
        .unwrap();
        assert!(!is_own_helm_chart_proxy(&proxy, &other));

        proxy["metadata"]["labels"][MANAGED_BY_LABEL] = json!("someone-else");
        assert!(!is_own_helm_chart_proxy(&proxy, &cluster));
        proxy["metadata"].as_object_mut().unwrap().remove("labels");
        assert!(!is_own_helm_chart_proxy(&proxy, &cluster));
    }
}
