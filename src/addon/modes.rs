//! What the registry modes (SPEC §9.5) add to a converge: the upstream's Secrets of Proxy and
//! Direct, read and checked on the management cluster and copied to the workload cluster as
//! `registry-system/registry-upstream`; the removal, with the direct deployer, of the objects
//! another mode rendered (Helm does this itself for a HelmChartProxy); and the readiness of
//! Direct's Deployment. Each step reads first and writes only what differs.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tracing::info;

use crate::addon::converge::ConvergeError;
use crate::k8s::{self, ClusterApi, ObjectId, Outcome};
use crate::names;
use crate::render::objects::{b64, secret_data};
use crate::render::registry::{self, RegistryValues};
use crate::wire::cluster::Cluster;
use crate::wire::variable::{Mode, RegistryConfig};

/// What the upstream's Secrets hold, as the workload Secret carries it.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamSecrets {
    /// `(username, password)` from `credentialsSecretRef`.
    pub credentials: Option<(String, String)>,
    /// PEM bundle from `caSecretRef`.
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for UpstreamSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSecrets")
            .field("username", &self.credentials.as_ref().map(|(u, _)| u))
            .field("password", &self.credentials.as_ref().map(|_| "<redacted>"))
            .field("ca_pem", &self.ca_pem.is_some())
            .finish()
    }
}

/// Reads and checks the Secrets the variable's `upstream` names, in the Cluster's namespace on
/// the management cluster; `None` for the modes without an upstream. Nothing is written: a
/// missing or malformed Secret fails the converge before anything is applied. Errors name the
/// Secret and the key, never a value.
pub async fn read_upstream_secrets(
    management: &ClusterApi,
    cluster: &Cluster,
    registry: &RegistryConfig,
) -> Result<Option<UpstreamSecrets>, ConvergeError> {
    let Some(upstream) = registry
        .upstream
        .as_ref()
        .filter(|_| registry.mode.needs_upstream())
    else {
        return Ok(None);
    };
    let ns = cluster.namespace();
    let read = |field: &'static str, name: String| async move {
        let describe = format!(
            "secret {ns}/{name} on the management cluster (addons.registry.upstream.{field})"
        );
        let secret = management
            .get("v1", "Secret", Some(ns), &name)
            .await?
            .ok_or_else(|| ConvergeError::Invalid(format!("{describe}: not found")))?;
        Ok::<_, ConvergeError>((describe, secret))
    };
    let mut secrets = UpstreamSecrets {
        credentials: None,
        ca_pem: None,
    };
    if let Some(name) = &upstream.credentials_secret {
        let (describe, secret) = read("credentialsSecretRef", name.clone()).await?;
        secrets.credentials = Some(
            credentials_of(&secret)
                .map_err(|problem| ConvergeError::Invalid(format!("{describe}: {problem}")))?,
        );
    }
    if let Some(name) = &upstream.ca_secret {
        let (describe, secret) = read("caSecretRef", name.clone()).await?;
        let pem = secret_data(&secret, "ca.crt").ok_or_else(|| {
            ConvergeError::Invalid(format!("{describe}: key ca.crt is missing or not UTF-8"))
        })?;
        crate::certs::check_pem_certificates(&pem).map_err(|problem| {
            ConvergeError::Invalid(format!("{describe}: key ca.crt {problem}"))
        })?;
        secrets.ca_pem = Some(pem);
    }
    Ok(Some(secrets))
}

/// `username` and `password` of a `kubernetes.io/basic-auth` Secret, or of any Secret with
/// both keys.
fn credentials_of(secret: &Value) -> Result<(String, String), String> {
    let key = |key: &str| {
        secret_data(secret, key).ok_or_else(|| {
            let kind = secret["type"].as_str().unwrap_or("Opaque");
            format!(
                "key {key} is missing or not UTF-8 (type {kind}; expected kubernetes.io/basic-auth \
                 or keys username and password)"
            )
        })
    };
    let username = key("username")?;
    let password = key("password")?;
    if username.is_empty() || username.contains(['\n', '\r']) {
        return Err("key username is empty or spans lines".into());
    }
    if password.contains(['\n', '\r']) {
        return Err("key password spans lines".into());
    }
    Ok((username, password))
}

/// `registry-system/registry-upstream`: `username` and `password` (the files Direct's front
/// reads, the variables Proxy's registry gets), and `ca.crt`; only the keys there is
/// something for.
pub fn upstream_secret(secrets: &UpstreamSecrets) -> Value {
    let mut data = BTreeMap::new();
    if let Some((username, password)) = &secrets.credentials {
        data.insert("username", b64(username));
        data.insert("password", b64(password));
    }
    if let Some(ca) = &secrets.ca_pem {
        data.insert("ca.crt", b64(ca));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": names::REGISTRY_UPSTREAM_SECRET,
            "namespace": names::REGISTRY_NAMESPACE,
            "labels": {names::MANAGED_BY_LABEL: names::FIELD_MANAGER},
        },
        "type": "Opaque",
        "data": data,
    })
}

/// A hash of what `registry-upstream` holds for `secrets` (never the values themselves).
pub fn secret_hash(secrets: &UpstreamSecrets) -> String {
    use sha2::{Digest, Sha256};
    let data = upstream_secret(secrets)["data"].to_string();
    hex::encode(&Sha256::digest(data.as_bytes())[..16])
}

/// Makes `registry-system/registry-upstream` hold `secrets`, or removes it when the mode has
/// no upstream (`None`). The number of objects written: 0 when it already matches.
pub async fn ensure_upstream_secret(
    workload: &ClusterApi,
    secrets: Option<&UpstreamSecrets>,
    cluster_key: &str,
) -> Result<usize, ConvergeError> {
    let ns = names::REGISTRY_NAMESPACE;
    let name = names::REGISTRY_UPSTREAM_SECRET;
    // An anonymous upstream with a public certificate has nothing to copy.
    let secrets = secrets.filter(|s| s.credentials.is_some() || s.ca_pem.is_some());
    let existing = workload.get("v1", "Secret", Some(ns), name).await?;
    let Some(secrets) = secrets else {
        if existing.is_some() && workload.delete("v1", "Secret", Some(ns), name).await? {
            info!(cluster = %cluster_key, secret = %format!("{ns}/{name}"), "deleted the upstream Secret: the mode has no upstream");
            return Ok(1);
        }
        return Ok(0);
    };
    let desired = upstream_secret(secrets);
    // A key no longer wanted (a reference removed) must go too: compare the keys as well.
    let keys = |v: &Value| {
        v["data"]
            .as_object()
            .map(|m| m.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let current = existing.filter(|e| keys(e) == keys(&desired));
    if workload.converge(current.as_ref(), &desired).await? == Outcome::Applied {
        info!(cluster = %cluster_key, secret = %format!("{ns}/{name}"), "applied the upstream Secret on the workload cluster");
        return Ok(1);
    }
    Ok(0)
}

/// The objects of every mode's rendering, by identity, for the same options.
fn all_mode_objects(values: &RegistryValues) -> Vec<ObjectId> {
    let mut ids: Vec<ObjectId> = Vec::new();
    for mode in Mode::ALL {
        let mut values = values.clone();
        values.mode = mode;
        for object in registry::registry_objects(&values) {
            let id = ObjectId::of(&object);
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// Every registry object any mode renders: what turning the addon off removes.
pub fn removal_targets(values: &RegistryValues) -> Vec<ObjectId> {
    all_mode_objects(values)
}

/// Deletes the objects another mode rendered that `values`' mode does not: those the direct
/// deployer applied, and those a HelmChartProxy's release dropped on upgrade and Helm kept
/// (`helm.sh/resource-policy: keep`). Only objects carrying the addon's labels are deleted. Never a PersistentVolumeClaim: the StatefulSet's are kept
/// by its retention policy (`whenDeleted: Retain`), so Local's data survives Direct and
/// Unmanaged. The number of objects deleted.
pub async fn prune_other_modes(
    workload: &ClusterApi,
    values: &RegistryValues,
    cluster_key: &str,
) -> Result<usize, ConvergeError> {
    let wanted: Vec<ObjectId> = registry::registry_objects(values)
        .iter()
        .map(ObjectId::of)
        .collect();
    let mut deleted = 0;
    for id in all_mode_objects(values) {
        if wanted.contains(&id) || id.kind == "PersistentVolumeClaim" {
            continue;
        }
        let ns = id.namespace.as_deref();
        let Some(current) = workload
            .get(&id.api_version, &id.kind, ns, &id.name)
            .await?
        else {
            continue;
        };
        let labels = &current["metadata"]["labels"];
        if labels["app.kubernetes.io/part-of"] != "registry-addon" {
            continue;
        }
        if workload
            .delete(&id.api_version, &id.kind, ns, &id.name)
            .await?
        {
            deleted += 1;
            let object = k8s::object_name(&id.kind, ns, &id.name);
            info!(cluster = %cluster_key, %object, mode = %values.mode, "deleted a registry object the mode does not use");
        }
    }
    Ok(deleted)
}

/// Why Direct's Deployment does not serve yet with `wanted` ready replicas of the current
/// certificate, or `None` when it does. `(replicas, ready, waiting)`.
pub fn deployment_not_ready(
    deployment: Option<&Value>,
    wanted: u64,
    certificate_hash: &str,
) -> (Option<u64>, u64, Option<String>) {
    let Some(deployment) = deployment else {
        return (
            None,
            0,
            Some("Deployment registry-direct does not exist yet".into()),
        );
    };
    let number = |v: &Value| v.as_u64().unwrap_or(0);
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1);
    let ready = number(&deployment["status"]["readyReplicas"]);
    let updated = number(&deployment["status"]["updatedReplicas"]);
    let generation = number(&deployment["metadata"]["generation"]);
    let observed = number(&deployment["status"]["observedGeneration"]);
    let annotation = &deployment["spec"]["template"]["metadata"]["annotations"]
        [names::CERTIFICATE_HASH_ANNOTATION];
    let waiting = if replicas != wanted {
        Some(format!(
            "Deployment registry-direct has {replicas} replicas, {wanted} wanted"
        ))
    } else if annotation.as_str().is_some_and(|a| a != certificate_hash) {
        Some(
            "the pods of Deployment registry-direct do not carry the current certificate yet"
                .into(),
        )
    } else if observed < generation {
        Some(format!(
            "Deployment registry-direct: generation {generation} not yet observed (observed {observed})"
        ))
    } else if ready < replicas || updated < replicas {
        Some(format!(
            "Deployment registry-direct: {ready}/{replicas} replicas ready, {updated}/{replicas} updated"
        ))
    } else {
        None
    };
    (Some(replicas), ready, waiting)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> String {
        crate::certs::CertificateAuthority::generate(
            crate::cli::KeyAlgorithm::EcdsaP256,
            time::OffsetDateTime::now_utc(),
        )
        .unwrap()
        .cert_pem()
        .to_string()
    }

    fn secret(kind: &str, data: &[(&str, &str)]) -> Value {
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| (k.to_string(), json!(b64(v))))
            .collect();
        json!({"type": kind, "data": data})
    }

    #[test]
    fn credentials_come_from_basic_auth_or_plain_keys() {
        let both = [("username", "u"), ("password", "s3cret")];
        assert_eq!(
            credentials_of(&secret("kubernetes.io/basic-auth", &both)).unwrap(),
            ("u".to_string(), "s3cret".to_string())
        );
        assert!(credentials_of(&secret("Opaque", &both)).is_ok());
        let e = credentials_of(&secret("Opaque", &[("username", "u")])).unwrap_err();
        assert!(e.starts_with("key password is missing"), "{e}");
        let e = credentials_of(&secret("Opaque", &[("user", "u"), ("password", "s3cret")]))
            .unwrap_err();
        assert!(e.starts_with("key username is missing"), "{e}");
        assert!(!e.contains("s3cret"));
        assert!(credentials_of(&secret("Opaque", &[("username", ""), ("password", "p")])).is_err());
    }

    #[test]
    fn the_ca_must_be_pem_certificates() {
        assert!(crate::certs::check_pem_certificates(&ca()).is_ok());
        assert!(crate::certs::check_pem_certificates(&format!("{}{}", ca(), ca())).is_ok());
        assert_eq!(
            crate::certs::check_pem_certificates("hello").unwrap_err(),
            "holds no PEM certificate"
        );
        let broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(crate::certs::check_pem_certificates(broken).is_err());
    }

    #[test]
    fn the_workload_secret_holds_only_what_is_set() {
        let full = UpstreamSecrets {
            credentials: Some(("u".into(), "p:w".into())),
            ca_pem: Some("CA".into()),
        };
        let object = upstream_secret(&full);
        let keys: Vec<_> = object["data"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys, ["ca.crt", "password", "username"]);
        assert_eq!(secret_data(&object, "password").unwrap(), "p:w");
        let ca_only = upstream_secret(&UpstreamSecrets {
            credentials: None,
            ca_pem: Some("CA".into()),
        });
        assert_eq!(ca_only["data"].as_object().unwrap().len(), 1);
        assert!(!format!("{full:?}").contains("p:w"));
    }

    #[test]
    fn direct_readiness_names_what_it_waits_for() {
        let (_, _, waiting) = deployment_not_ready(None, 2, "h");
        assert!(waiting.unwrap().contains("does not exist"));
        let mut d = json!({
            "metadata": {"generation": 2},
            "spec": {"replicas": 2, "template": {"metadata": {"annotations": {names::CERTIFICATE_HASH_ANNOTATION: "h"}}}},
            "status": {"observedGeneration": 2, "readyReplicas": 1, "updatedReplicas": 2},
        });
        assert!(
            deployment_not_ready(Some(&d), 2, "h")
                .2
                .unwrap()
                .contains("1/2 replicas ready")
        );
        d["status"]["readyReplicas"] = json!(2);
        assert_eq!(deployment_not_ready(Some(&d), 2, "h"), (Some(2), 2, None));
        assert!(deployment_not_ready(Some(&d), 2, "other").2.is_some());
        assert!(deployment_not_ready(Some(&d), 3, "h").2.is_some());
    }
}
