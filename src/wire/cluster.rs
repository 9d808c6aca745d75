//! The Cluster embedded in lifecycle requests, v1beta1 or v1beta2, typed only where the addon
//! reads it. Everything else is ignored, so both API versions parse into the same struct.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub metadata: ClusterMeta,
    #[serde(default)]
    pub spec: ClusterSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    #[serde(default)]
    pub cluster_network: Option<ClusterNetwork>,
    #[serde(default)]
    pub topology: Option<Topology>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetwork {
    #[serde(default)]
    pub services: Option<NetworkRanges>,
    #[serde(default)]
    pub service_domain: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkRanges {
    #[serde(default)]
    pub cidr_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub variables: Vec<TopologyVariable>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TopologyVariable {
    pub name: String,
    #[serde(default)]
    pub value: Value,
}

impl Cluster {
    /// Parses the `cluster` of a request. The object must at least have a name, a namespace
    /// and a uid: every object the addon creates is named after and owned by it.
    pub fn from_value(value: &Value) -> Result<Cluster, String> {
        if !value.is_object() {
            return Err("cluster: must be an object".into());
        }
        let cluster = Cluster::deserialize(value).map_err(|e| format!("cluster: {e}"))?;
        cluster.check()?;
        Ok(cluster)
    }

    /// Like [`Cluster::from_value`], from the JSON text of the `cluster` field.
    pub fn from_json(json: &str) -> Result<Cluster, String> {
        if !json.trim_start().starts_with('{') {
            return Err("cluster: must be an object".into());
        }
        let cluster: Cluster = serde_json::from_str(json).map_err(|e| format!("cluster: {e}"))?;
        cluster.check()?;
        Ok(cluster)
    }

    /// Checks the fields the addon depends on.
    pub fn check(&self) -> Result<(), String> {
        let meta = &self.metadata;
        if meta.name.is_empty() {
            return Err("cluster.metadata.name: required".into());
        }
        if !is_dns1123_subdomain(&meta.name) {
            return Err(format!(
                "cluster.metadata.name: {:?} is not a DNS-1123 subdomain",
                meta.name
            ));
        }
        if meta.namespace.is_empty() {
            return Err("cluster.metadata.namespace: required".into());
        }
        if meta.uid.is_empty() {
            return Err("cluster.metadata.uid: required".into());
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    pub fn namespace(&self) -> &str {
        &self.metadata.namespace
    }

    /// `namespace/name`, for messages and logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// The value of a topology variable, if set.
    pub fn variable(&self, name: &str) -> Option<&Value> {
        self.spec
            .topology
            .as_ref()?
            .variables
            .iter()
            .find(|v| v.name == name)
            .map(|v| &v.value)
    }

    /// The service CIDR blocks of `spec.clusterNetwork.services`.
    pub fn service_cidrs(&self) -> &[String] {
        self.spec
            .cluster_network
            .as_ref()
            .and_then(|n| n.services.as_ref())
            .map(|s| s.cidr_blocks.as_slice())
            .unwrap_or(&[])
    }
}

/// A DNS-1123 label: lowercase alphanumerics and '-', starting and ending alphanumeric, ≤ 63.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain: dot-separated labels, ≤ 253.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/../shared/capi/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn parses_both_api_versions() {
        for file in ["cluster-v1beta1.json", "cluster-v1beta2.json"] {
            let cluster = Cluster::from_value(&fixture(file)).unwrap();
            assert_eq!(cluster.key(), "default/wl-1");
            assert_eq!(cluster.service_cidrs(), ["10.128.0.0/12"]);
            let config = cluster.variable("clusterConfig").unwrap();
            assert_eq!(config["addons"]["registry"]["replicas"], 3);
        }
    }

    #[test]
    fn names_the_missing_field() {
        let err = Cluster::from_value(&serde_json::json!({"metadata": {"name": "c"}})).unwrap_err();
        assert_eq!(err, "cluster.metadata.namespace: required");
        let err = Cluster::from_value(&serde_json::json!("x")).unwrap_err();
        assert_eq!(err, "cluster: must be an object");
        let err = Cluster::from_value(&serde_json::json!({"metadata": {"name": 5}})).unwrap_err();
        assert!(err.starts_with("cluster: "), "{err}");
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns1123_label("before-cluster-create"));
        assert!(!is_dns1123_label("Before"));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
    }
}
