//! The objects the lifecycle hooks write, built once for the hooks and for `render`: the root
//! CA Secret, the cluster's CA copy, the registry Namespace, the registry TLS Secret and the
//! HelmChartProxy. Every object carries only the fields the addon owns.

use base64::Engine;
use serde_json::{Value, json};

use crate::certs::{CertificateAuthority, CertifiedKey};
use crate::cli::AddonOptions;
use crate::names;
use crate::render::registry::RegistryValues;
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

/// Name of the cluster's HelmChartProxy.
pub fn helm_chart_proxy_name(cluster: &Cluster) -> String {
    names::helm_chart_proxy(cluster.name())
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
            "releaseName": names::REGISTRY_NAME,
            "namespace": names::REGISTRY_NAMESPACE,
            "valuesTemplate": values_yaml,
        },
    }))
}
