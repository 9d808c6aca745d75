//! The registry workload (SPEC §6) as Kubernetes objects, and the same inputs as the values
//! of the registry Helm chart under `helm/registry`. The chart renders the same objects from
//! these values; a test holds the two together.

use std::net::IpAddr;

use serde::Serialize;
use serde_json::Value;

use crate::cli::AddonOptions;
use crate::wire::variable::RegistryConfig;

/// The registry chart's values, exactly as `helm/registry/values.yaml` names them.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryValues {
    pub replicas: u8,
    pub service_ip: String,
    /// SHA-256 of the server certificate: a pod-template annotation, so a renewal rolls the pods.
    pub certificate_hash: String,
}

impl RegistryValues {
    pub fn new(
        _options: &AddonOptions,
        registry: &RegistryConfig,
        service_ip: IpAddr,
        certificate_hash: String,
    ) -> Self {
        RegistryValues {
            replicas: registry.replicas,
            service_ip: service_ip.to_string(),
            certificate_hash,
        }
    }
}

/// Every object of the registry workload in namespace `registry-system`, in apply order
/// (not the Namespace and not the `registry-tls` Secret, which the hooks manage).
pub fn registry_objects(_values: &RegistryValues) -> Vec<Value> {
    Vec::new()
}
