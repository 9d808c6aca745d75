//! Switching a running cluster between modes (SPEC §9.5), decided in one place for the hooks
//! and the controller.
//!
//! The mode a cluster is deployed in (its *effective* mode, with the upstream that mode uses)
//! is recorded on the workload cluster in the ConfigMap `registry-system/registry-mode`. When
//! the variable asks for another one:
//!
//! - Local↔Proxy directly is refused (`TransitionNotSupported`): both keep a store of their
//!   own, and going through Direct or Unmanaged is what keeps nodes served meanwhile. Nothing
//!   changes.
//! - A switch to Proxy or Direct waits until the upstream answers `/v2/` with its credentials
//!   and every image in use in the workload cluster that the new mode routes to the upstream
//!   (its host's images) resolves there (a manifest HEAD). Until then the effective mode keeps
//!   serving, and `TargetReady=False` says how many are missing and names the first.
//! - Then the target mode is deployed; the node files follow through the node agent's two
//!   phases (their route changes). The switch is complete, and `status.mode` changes, once the
//!   registry of the new mode is ready and every node carries the final configuration.
//! - Asking for the effective mode again before that returns to it.
//!
//! The fixed address (the Service) and the PersistentVolumeClaims are never touched by a
//! switch: Local's data survives a round trip through Direct.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::addon::modes::UpstreamSecrets;
use crate::names;
use crate::oci::Credentials;
use crate::oci::client::{ClientOptions, Registry, build_remote_http_clients};
use crate::oci::reference::ImageReference;
use crate::wire::variable::{Mode, RegistryConfig, registry_from_config};

/// Name of the workload ConfigMap recording the effective mode.
pub const MODE_CONFIGMAP: &str = "registry-mode";
/// Its key: the mode fields of `addons.registry` as the mode was deployed with them.
pub const MODE_KEY: &str = "mode.json";
/// How many manifest HEADs a target check sends at once.
const CHECK_CONCURRENCY: usize = 16;

/// The mode fields of `addons.registry`, as recorded: enough to render that mode again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModeRecord {
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Value>,
    /// The mode a switch under way started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switching_from: Option<String>,
}

impl ModeRecord {
    /// The record of `registry`'s mode, as its variable gave it.
    pub fn of(registry: &RegistryConfig) -> ModeRecord {
        let upstream = registry.upstream.as_ref().map(|u| {
            let mut value = json!({"url": u.url});
            if let Some(name) = &u.credentials_secret {
                value["credentialsSecretRef"] = json!({"name": name});
            }
            if let Some(name) = &u.ca_secret {
                value["caSecretRef"] = json!({"name": name});
            }
            value
        });
        ModeRecord {
            mode: registry.mode.as_str().to_string(),
            upstream,
            cache: registry.cache_ttl.as_ref().map(|ttl| json!({"ttl": ttl})),
            switching_from: None,
        }
    }

    /// The same mode and upstream URL: what differs otherwise (the Secrets referenced, the
    /// cache TTL) is applied at once, without a switch.
    pub fn same_mode(&self, other: &ModeRecord) -> bool {
        let url = |r: &ModeRecord| r.upstream.as_ref().map(|u| u["url"].clone());
        self.mode == other.mode && url(self) == url(other)
    }

    /// `desired` with this record's mode fields: the configuration the effective mode is
    /// rendered from. `None` when the record no longer parses (it is then replaced).
    pub fn apply_to(&self, desired: &RegistryConfig) -> Option<RegistryConfig> {
        let mut fields = serde_json::Map::new();
        fields.insert("mode".into(), json!(self.mode));
        if let Some(upstream) = &self.upstream {
            fields.insert("upstream".into(), upstream.clone());
        }
        if let Some(cache) = &self.cache {
            fields.insert("cache".into(), cache.clone());
        }
        let parsed = registry_from_config(Some(&json!({"addons": {"registry": fields}})))
            .ok()
            .flatten()?;
        let mut effective = desired.clone();
        effective.mode = parsed.mode;
        effective.upstream = parsed.upstream;
        effective.cache_ttl = parsed.cache_ttl;
        Some(effective)
    }
}

/// The recorded effective mode, from the ConfigMap (if any).
pub fn read_record(configmap: Option<&Value>) -> Option<ModeRecord> {
    let text = configmap?["data"][MODE_KEY].as_str()?;
    serde_json::from_str(text).ok()
}

/// The ConfigMap recording `record`.
pub fn record_configmap(record: &ModeRecord) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": MODE_CONFIGMAP,
            "namespace": names::REGISTRY_NAMESPACE,
            "labels": {names::MANAGED_BY_LABEL: names::FIELD_MANAGER},
        },
        "data": {MODE_KEY: serde_json::to_string(record).expect("a mode record serializes")},
    })
}

/// Why a direct switch from `from` to `to` is refused, naming the allowed path.
pub fn refused(from: Mode, to: Mode) -> Option<String> {
    match (from, to) {
        (Mode::Local, Mode::Proxy) | (Mode::Proxy, Mode::Local) => Some(format!(
            "switching from {from} to {to} directly is not supported: switch to Direct or \
             Unmanaged first, then to {to}"
        )),
        _ => None,
    }
}

/// Every image the Pods run or will run (containers, init and ephemeral containers), once
/// each, in reference order. Pods that ended (`Succeeded`, `Failed`) pull nothing any more.
pub fn images_in_use(pods: &[Value]) -> Vec<ImageReference> {
    let mut seen = BTreeSet::new();
    let mut images = Vec::new();
    for pod in pods {
        if matches!(
            pod["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        ) {
            continue;
        }
        for list in ["initContainers", "containers", "ephemeralContainers"] {
            for container in pod["spec"][list].as_array().into_iter().flatten() {
                let Some(image) = container["image"].as_str() else {
                    continue;
                };
                let Ok(reference) = ImageReference::parse(image) else {
                    continue;
                };
                if seen.insert(reference.to_string()) {
                    images.push(reference);
                }
            }
        }
    }
    images.sort_by_key(|i| i.to_string());
    images
}

/// The ConfigMap listing what the local store must hold: each image in use as the `_default`
/// mirror is asked for it (`repository:tag`, `repository@digest`), read by Local's fronts
/// (`front --require-images`).
pub fn images_in_use_configmap(images: &[ImageReference]) -> Value {
    let mut lines = BTreeSet::new();
    for image in images {
        let path = image.mirror_path();
        let separator = if image.digest.is_some() { '@' } else { ':' };
        lines.insert(format!("{}{separator}{}", path.repository, path.reference));
    }
    let text: String = lines.into_iter().map(|l| l + "\n").collect();
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": names::IMAGES_IN_USE_CONFIGMAP,
            "namespace": names::REGISTRY_NAMESPACE,
            "labels": {names::MANAGED_BY_LABEL: names::FIELD_MANAGER},
        },
        "data": {names::IMAGES_IN_USE_KEY: text},
    })
}

/// The images of `images` that a mode routing `host`'s images to the mirror would send there.
pub fn routed_to<'a>(images: &'a [ImageReference], host: &str) -> Vec<&'a ImageReference> {
    images
        .iter()
        .filter(|i| i.registry == host || i.api_host() == host)
        .collect()
}

/// What a target check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetCheck {
    /// The target serves every image in use that it will be asked for.
    Ready { checked: usize },
    /// It does not answer, or refuses the credentials.
    Unavailable(String),
    /// Checked by the target's own replicas (the local store): each is ready only once it
    /// holds every image in use, and the switch completes only once all are.
    AtReplicas,
    /// Images in use it does not have.
    Missing {
        missing: usize,
        of: usize,
        first: String,
    },
}

impl TargetCheck {
    pub fn message(&self, target: &str) -> String {
        match self {
            TargetCheck::Ready { checked } => {
                format!("{target} serves all {checked} images in use routed to it")
            }
            TargetCheck::Unavailable(why) => format!("{target} cannot be used: {why}"),
            TargetCheck::AtReplicas => format!(
                "{target} is checked by its replicas: each is ready only once it holds every \
                 image in use"
            ),
            TargetCheck::Missing { missing, of, first } => {
                format!("{missing} of {of} images in use are missing at {target}; first: {first}")
            }
        }
    }
}

/// Checks an upstream before a switch to it: `/v2/` with its credentials, then a manifest
/// HEAD of every image of `images`, at most [`CHECK_CONCURRENCY`] at once.
pub async fn check_upstream(
    origin: &str,
    secrets: &UpstreamSecrets,
    images: &[&ImageReference],
    timeout: Duration,
) -> TargetCheck {
    let clients = match build_remote_http_clients(secrets.ca_pem.as_deref().map(str::as_bytes)) {
        Ok(clients) => clients,
        Err(e) => return TargetCheck::Unavailable(format!("its CA: {e}")),
    };
    let options = ClientOptions {
        credentials: secrets
            .credentials
            .as_ref()
            .map(|(username, password)| Credentials {
                username: username.clone(),
                password: password.clone(),
            }),
        attempts: 1,
        ..ClientOptions::default()
    };
    let registry = match Registry::new(origin, clients, &options) {
        Ok(registry) => registry,
        Err(e) => return TargetCheck::Unavailable(e),
    };
    match tokio::time::timeout(timeout, registry.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return TargetCheck::Unavailable(e.to_string()),
        Err(_) => {
            return TargetCheck::Unavailable(format!(
                "/v2/ did not answer within {}s",
                timeout.as_secs()
            ));
        }
    }
    let registry = &registry;
    let lookups: Vec<(String, String, String)> = images
        .iter()
        .map(|image| {
            (
                image.to_string(),
                image.repository.clone(),
                image.reference(),
            )
        })
        .collect();
    let results: Vec<(String, bool)> = futures::stream::iter(lookups.into_iter().map(
        |(name, repository, reference)| async move {
            let found =
                tokio::time::timeout(timeout, registry.head_manifest(&repository, &reference))
                    .await;
            (name, matches!(found, Ok(Ok(Some(_)))))
        },
    ))
    .buffer_unordered(CHECK_CONCURRENCY)
    .collect()
    .await;
    let mut missing: Vec<String> = results
        .into_iter()
        .filter(|(_, found)| !found)
        .map(|(image, _)| image)
        .collect();
    missing.sort();
    match missing.first() {
        None => TargetCheck::Ready {
            checked: images.len(),
        },
        Some(first) => TargetCheck::Missing {
            missing: missing.len(),
            of: images.len(),
            first: first.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_proxy_switch_only_through_direct_or_unmanaged() {
        let message = refused(Mode::Local, Mode::Proxy).unwrap();
        assert!(message.contains("Direct or Unmanaged"), "{message}");
        assert!(refused(Mode::Proxy, Mode::Local).is_some());
        for (from, to) in [
            (Mode::Local, Mode::Direct),
            (Mode::Direct, Mode::Proxy),
            (Mode::Proxy, Mode::Unmanaged),
            (Mode::Unmanaged, Mode::Local),
            (Mode::Direct, Mode::Local),
        ] {
            assert_eq!(refused(from, to), None, "{from} → {to}");
        }
    }

    #[test]
    fn images_in_use_come_from_every_container_of_running_pods() {
        let pods = [
            json!({"spec": {
                "initContainers": [{"image": "registry.k8s.io/pause:3.10"}],
                "containers": [{"image": "nginx"}, {"image": "harbor.example.com/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000"}],
            }, "status": {"phase": "Running"}}),
            json!({"spec": {"containers": [{"image": "nginx:latest"}]}}),
            json!({"spec": {"containers": [{"image": "done.example.com/job:1"}]}, "status": {"phase": "Succeeded"}}),
        ];
        let images = images_in_use(&pods);
        let names: Vec<String> = images.iter().map(|i| i.to_string()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(
            names.iter().any(|n| n.contains("library/nginx:latest")),
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n.contains("done.example.com")));
        let routed = routed_to(&images, "harbor.example.com");
        assert_eq!(routed.len(), 1);
        assert_eq!(routed[0].repository, "team/app");
        // Docker Hub's images route to its API host as well as to docker.io.
        assert_eq!(routed_to(&images, "registry-1.docker.io").len(), 1);
    }

    #[test]
    fn a_record_renders_its_mode_again() {
        let desired = registry_from_config(Some(&json!({"addons": {"registry": {
            "mode": "Direct",
            "upstream": {"url": "https://harbor.example.com/proxy", "credentialsSecretRef": {"name": "creds"}},
            "replicas": 3,
        }}})))
        .unwrap()
        .unwrap();
        let record = ModeRecord::of(&desired);
        assert_eq!(record.mode, "Direct");
        let local = ModeRecord {
            mode: "Local".into(),
            upstream: None,
            cache: None,
            switching_from: None,
        };
        let effective = local.apply_to(&desired).unwrap();
        assert_eq!(effective.mode, Mode::Local);
        assert_eq!(effective.upstream, None);
        assert_eq!(effective.replicas, 3, "other fields come from the variable");
        assert_eq!(record.apply_to(&desired).unwrap(), desired);
        let text = record_configmap(&record)["data"][MODE_KEY].clone();
        let back = read_record(Some(&json!({"data": {MODE_KEY: text}}))).unwrap();
        assert_eq!(back, record);
    }
}
