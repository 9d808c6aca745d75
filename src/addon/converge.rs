//! Makes one cluster's registry match its variable: the root CA, the cluster's CA copy, the
//! registry users, the workload client, `registry-auth`, the serving certificate (kept while
//! usable, renewed inside its window), the deployment by either deployer, readiness, and
//! removal. The lifecycle hooks and the controller call these steps; each step reads first and
//! writes only what differs, so a call on an up-to-date cluster sends no write.
//!
//! Calls for one cluster are serialized by a per-cluster lock in [`State`], which the hooks and
//! the controller share; the root CA is created with create-if-absent so two extension
//! replicas cannot each generate one.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tracing::info;

use crate::addon::modes;
use crate::addon::rollout::{self, Plan, Progress, RegistryNow, RolloutState, Signer};
use crate::addon::switch::{self, ModeRecord};
use crate::addon::users::{self, Credentials, RegistryAuth, StoredUser};
use crate::certs::{self, CertInfo, CertificateAuthority, CertifiedKey, PrivateKeyPem};
use crate::cli::Deployer;
use crate::hooks::HookConfig;
use crate::hooks::patches::containerd::{self, MirrorSide};
use crate::k8s::{self, ClusterApi, Outcome, Place};
use crate::names;
use crate::render::objects::{self, secret_data};
use crate::render::registry::RegistryValues;
use crate::wire::cluster::Cluster;
use crate::wire::variable::{Mode, RegistryConfig, registry_from_config};

/// Workload clients kept at most. Each holds its TLS configuration and its pooled
/// connection (about 60 KiB); a resync of 1,000 clusters would otherwise keep 1,000 of them
/// for good. The controller converges 16 clusters at once, so this covers those and the hooks
/// in flight; a client dropped is rebuilt from the kubeconfig in about a millisecond, and
/// with the default resync its pooled connection would have gone idle long before anyway.
pub const CACHED_WORKLOAD_CLIENTS: usize = 64;

/// State shared by every converge of every cluster: per-cluster locks, cached workload
/// clients, and the clusters known to have nothing of the addon left on them.
#[derive(Default)]
pub struct State {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    workloads: Mutex<HashMap<String, CachedWorkload>>,
    /// Counts cache uses: the least recently used client is the one dropped.
    uses: AtomicU64,
    root_ca: tokio::sync::Mutex<()>,
    removed: Mutex<HashSet<String>>,
    /// The mode each cluster was last deployed in by this process: while it stays, the
    /// objects of other modes are known to be gone and are not looked for again.
    modes: Mutex<HashMap<String, Mode>>,
}

struct CachedWorkload {
    /// SHA-256 of the kubeconfig the client was built from.
    fingerprint: [u8; 32],
    client: kube::Client,
    last_use: u64,
}

impl State {
    /// The lock a caller holds while it converges the cluster `key` (`namespace/name`).
    pub fn cluster_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(key.to_string()).or_default().clone()
    }

    fn cached_workload(&self, key: &str, fingerprint: &[u8; 32]) -> Option<kube::Client> {
        let mut workloads = self.workloads.lock().unwrap_or_else(|e| e.into_inner());
        let cached = workloads
            .get_mut(key)
            .filter(|cached| &cached.fingerprint == fingerprint)?;
        cached.last_use = self.uses.fetch_add(1, Ordering::Relaxed);
        Some(cached.client.clone())
    }

    fn cache_workload(&self, key: &str, fingerprint: [u8; 32], client: kube::Client) {
        let mut workloads = self.workloads.lock().unwrap_or_else(|e| e.into_inner());
        workloads.insert(
            key.to_string(),
            CachedWorkload {
                fingerprint,
                client,
                last_use: self.uses.fetch_add(1, Ordering::Relaxed),
            },
        );
        while workloads.len() > CACHED_WORKLOAD_CLIENTS {
            let Some(oldest) = workloads
                .iter()
                .min_by_key(|(_, cached)| cached.last_use)
                .map(|(key, _)| key.clone())
            else {
                break;
            };
            workloads.remove(&oldest);
        }
    }

    /// Whether the cluster `key` was last deployed in `mode` by this process.
    pub fn deployed_in(&self, key: &str, mode: Mode) -> bool {
        let modes = self.modes.lock().unwrap_or_else(|e| e.into_inner());
        modes.get(key) == Some(&mode)
    }

    fn set_deployed_in(&self, key: &str, mode: Option<Mode>) {
        let mut modes = self.modes.lock().unwrap_or_else(|e| e.into_inner());
        match mode {
            Some(mode) => modes.insert(key.to_string(), mode),
            None => modes.remove(key),
        };
    }

    /// Drops what is kept for a deleted cluster.
    pub fn forget(&self, key: &str) {
        self.set_deployed_in(key, None);
        self.workloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        self.set_removed(key, false);
    }

    fn is_removed(&self, key: &str) -> bool {
        self.removed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }

    fn set_removed(&self, key: &str, removed: bool) {
        let mut set = self.removed.lock().unwrap_or_else(|e| e.into_inner());
        if removed {
            set.insert(key.to_string());
        } else {
            set.remove(key);
        }
    }

    /// Number of cached workload clients (for tests and metrics).
    pub fn cached_workload_clients(&self) -> usize {
        self.workloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// Why a cluster's registry could not be made to match its variable.
#[derive(Debug, thiserror::Error)]
pub enum ConvergeError {
    #[error(transparent)]
    Kube(#[from] k8s::Error),
    #[error("{0}")]
    Invalid(String),
    /// `<cluster>-kubeconfig` does not exist (yet): the workload cluster cannot be reached.
    #[error("{0}")]
    NoKubeconfig(String),
    #[error("{0}")]
    CaMismatch(String),
    /// The direct deployer would share the registry with a HelmChartProxy's release.
    #[error("{0}")]
    DeployerConflict(String),
    /// The root CA Secret is gone while clusters trust the CA it held.
    #[error("{0}")]
    RootCaMissing(String),
}

impl ConvergeError {
    /// Worth retrying soon: an API was unreachable, overloaded or failed internally.
    pub fn is_transient(&self) -> bool {
        match self {
            ConvergeError::Kube(e) => e.is_transient(),
            ConvergeError::Invalid(_)
            | ConvergeError::NoKubeconfig(_)
            | ConvergeError::CaMismatch(_)
            | ConvergeError::DeployerConflict(_)
            | ConvergeError::RootCaMissing(_) => false,
        }
    }

    /// A request to the workload cluster failed.
    pub fn on_workload(&self) -> bool {
        match self {
            ConvergeError::Kube(e) => e.place == Place::Workload,
            _ => false,
        }
    }
}

/// The root CA: read from `registry-addon-root-ca`, generated when absent. An existing
/// Secret (cert-manager's or the operator's) is used as is, never regenerated. Creation is
/// create-if-absent, so concurrent callers (and extension replicas) end up with one CA.
pub async fn ensure_root_ca(
    config: &HookConfig,
    state: &State,
    management: &ClusterApi,
    cluster_key: &str,
    now: OffsetDateTime,
) -> Result<CertificateAuthority, ConvergeError> {
    let namespace = config.namespace.as_str();
    let describe = || {
        format!(
            "secret {namespace}/{} on the management cluster",
            names::ROOT_CA_SECRET
        )
    };
    let _guard = state.root_ca.lock().await;
    let existing = management
        .get("v1", "Secret", Some(namespace), names::ROOT_CA_SECRET)
        .await?;
    let secret = match existing {
        Some(secret) => secret,
        None => {
            if let Some((holder, fingerprint)) = earlier_root_ca(management, cluster_key).await? {
                return Err(ConvergeError::RootCaMissing(format!(
                    "{} is missing, but cluster {holder} trusts a root CA (SHA-256 fingerprint \
                     {fingerprint}): restore that Secret (tls.crt, tls.key, ca.crt) from a \
                     backup or from the management cluster the clusters were created on; a new \
                     root CA is generated only while no cluster holds a copy of an earlier one",
                    describe()
                )));
            }
            let algorithm = config.addon.key_algorithm;
            let ca = CertificateAuthority::generate(algorithm, now)
                .map_err(|e| ConvergeError::Invalid(format!("{}: {e}", describe())))?;
            let object = objects::root_ca_secret(namespace, &ca);
            match management.create_or_get(&object).await? {
                None => {
                    info!(cluster = %cluster_key, secret = %describe(), "generated the root CA");
                    return Ok(ca);
                }
                // Another caller created it first: use theirs.
                Some(secret) => secret,
            }
        }
    };
    let cert = secret_data(&secret, "tls.crt");
    let key = secret_data(&secret, "tls.key");
    let (Some(cert), Some(key)) = (cert, key) else {
        return Err(ConvergeError::Invalid(format!(
            "{}: keys tls.crt and tls.key are required",
            describe()
        )));
    };
    let ca = CertificateAuthority::from_pem(&cert, &key)
        .map_err(|e| ConvergeError::Invalid(format!("{}: {e}", describe())))?;
    // During a rotation `ca.crt` lists the previous root CA after the new one.
    Ok(match secret_data(&secret, "ca.crt") {
        Some(bundle) => ca.with_previous(&bundle),
        None => ca,
    })
}

/// A cluster holding a copy of a root CA (its `<cluster>-registry-addon-ca`), with that CA's
/// fingerprint: the calling cluster first, then every Cluster of the management cluster.
/// Looked at only while the root CA Secret is missing.
async fn earlier_root_ca(
    management: &ClusterApi,
    cluster_key: &str,
) -> Result<Option<(String, String)>, ConvergeError> {
    let copy = |namespace: String, name: String| async move {
        let secret = management
            .get(
                "v1",
                "Secret",
                Some(&namespace),
                &names::cluster_ca_secret(&name),
            )
            .await?;
        let fingerprint = secret
            .and_then(|s| secret_data(&s, "ca.crt"))
            .and_then(|pem| CertInfo::from_pem(&pem).ok())
            .map(|info| colon_hex(&info.sha256_hex()));
        Ok::<_, ConvergeError>(fingerprint.map(|f| (format!("{namespace}/{name}"), f)))
    };
    if let Some((namespace, name)) = cluster_key.split_once('/')
        && let Some(found) = copy(namespace.to_string(), name.to_string()).await?
    {
        return Ok(Some(found));
    }
    for api_version in ["cluster.x-k8s.io/v1beta2", "cluster.x-k8s.io/v1beta1"] {
        let clusters = management.list(api_version, "Cluster", None).await?;
        if clusters.is_empty() {
            continue;
        }
        for cluster in clusters {
            let metadata = &cluster["metadata"];
            let (Some(namespace), Some(name)) =
                (metadata["namespace"].as_str(), metadata["name"].as_str())
            else {
                continue;
            };
            if let Some(found) = copy(namespace.to_string(), name.to_string()).await? {
                return Ok(Some(found));
            }
        }
        break;
    }
    Ok(None)
}

/// `ab:cd:…`, as `openssl x509 -fingerprint` prints it.
fn colon_hex(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).to_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

/// The registry users of a cluster, as their management Secrets hold them.
pub struct Users {
    ro: StoredUser,
    rw: StoredUser,
}

/// What [`Converge::decide_mode`] allows.
#[derive(Debug, Clone)]
pub struct ModeDecision {
    /// What to render and deploy now.
    pub effective: RegistryConfig,
    /// What to record once it is deployed.
    pub record: ModeRecord,
    /// The record's ConfigMap as read.
    pub stored: Option<serde_json::Value>,
    pub state: SwitchState,
    /// The target check that let a switch start, when one ran.
    pub check: Option<switch::TargetCheck>,
}

/// Where a switch of modes stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchState {
    /// The variable's mode is the one deployed.
    Settled,
    /// The variable asks for a switch that is not supported; nothing changes.
    Refused { target: Mode, message: String },
    /// The target does not serve what is in use yet; the effective mode keeps serving.
    Waiting {
        target: Mode,
        check: switch::TargetCheck,
    },
    /// The variable's mode is deployed; the switch from `from` completes once its registry is
    /// ready and every node carries the final configuration.
    Switching { from: String },
}

/// What the deploy step did.
#[derive(Debug, Clone)]
pub struct Deployed {
    /// SHA-256 of the serving certificate, as the pods carry it in an annotation.
    pub hash: String,
    /// The serving certificate now in `registry-tls`.
    pub certificate: CertInfo,
    /// Why a certificate was issued over an existing `registry-tls`, if one was.
    pub renewed: Option<&'static str>,
    /// Objects written: on the workload cluster, and the HelmChartProxy.
    pub applied: usize,
    /// During a switch to Local or Proxy: the number of images in use its replicas must serve.
    pub images_required: Option<usize>,
}

/// The StatefulSet `registry-system/registry` against the replicas wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub wanted: u64,
    /// `spec.replicas` of the StatefulSet, when it exists.
    pub replicas: Option<u64>,
    /// `status.readyReplicas`.
    pub ready_replicas: u64,
    /// Why it is not ready, or `None` when it runs every replica of the current spec.
    pub waiting: Option<String>,
}

/// What was removed from a cluster whose addon was turned off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    /// `kind namespace/name` of each deleted object.
    pub objects: Vec<String>,
}

/// One cluster's converge context, without its variable: what deleting and removing need.
pub struct Scope<'a> {
    pub config: &'a HookConfig,
    pub state: &'a State,
    pub management: ClusterApi,
    pub cluster: &'a Cluster,
    /// `namespace/name`.
    pub key: String,
    pub deployer: Deployer,
    /// Time left for the whole call; the workload client's timeout is derived from it.
    pub budget: Duration,
}

impl<'a> Scope<'a> {
    pub fn new(
        config: &'a HookConfig,
        state: &'a State,
        management: kube::Client,
        cluster: &'a Cluster,
        deployer: Deployer,
        budget: Duration,
    ) -> Scope<'a> {
        Scope {
            config,
            state,
            management: ClusterApi::new(management, Place::Management),
            cluster,
            key: cluster.key(),
            deployer,
            budget,
        }
    }

    pub fn deployer_name(&self) -> &'static str {
        match self.deployer {
            Deployer::Helmchartproxy => "HelmChartProxy",
            Deployer::Direct => "applied directly",
        }
    }

    /// The workload cluster's API, from `<cluster>-kubeconfig`; the client is cached until
    /// the kubeconfig changes.
    pub async fn workload(&self) -> Result<ClusterApi, ConvergeError> {
        let cluster = self.cluster;
        let name = names::kubeconfig_secret(cluster.name());
        let describe = format!(
            "secret {}/{name} on the management cluster",
            cluster.namespace()
        );
        let secret = self
            .management
            .get("v1", "Secret", Some(cluster.namespace()), &name)
            .await?
            .ok_or_else(|| {
                ConvergeError::NoKubeconfig(format!(
                    "{describe}: not found; the workload cluster cannot be reached without it"
                ))
            })?;
        let kubeconfig = secret_data(&secret, names::KUBECONFIG_SECRET_KEY).ok_or_else(|| {
            ConvergeError::Invalid(format!(
                "{describe}: key {} is missing or not UTF-8",
                names::KUBECONFIG_SECRET_KEY
            ))
        })?;
        let fingerprint: [u8; 32] = Sha256::digest(kubeconfig.as_bytes()).into();
        if let Some(client) = self.state.cached_workload(&self.key, &fingerprint) {
            return Ok(ClusterApi::new(client, Place::Workload));
        }
        let timeout = self.budget.mul_f64(0.5).max(Duration::from_secs(1));
        let client = k8s::client_from_kubeconfig(&kubeconfig, timeout)
            .await
            .map_err(|e| ConvergeError::Invalid(format!("{describe}: {e}")))?;
        self.state
            .cache_workload(&self.key, fingerprint, client.clone());
        info!(cluster = %self.key, "built a client for the workload cluster");
        Ok(ClusterApi::new(client, Place::Workload))
    }

    /// The HelmChartProxy named as the addon's for the cluster, if any (also `None` on a
    /// management cluster without the add-on provider: no HelmChartProxy API at all).
    async fn helm_chart_proxy(&self) -> Result<Option<serde_json::Value>, ConvergeError> {
        let cluster = self.cluster;
        Ok(self
            .management
            .get(
                objects::HELM_CHART_PROXY_API_VERSION,
                "HelmChartProxy",
                Some(cluster.namespace()),
                &objects::helm_chart_proxy_name(cluster),
            )
            .await?)
    }

    /// Deletes the addon's own HelmChartProxy, unless it is already being deleted; a foreign
    /// one holding the name is left alone. True when a delete was sent.
    async fn delete_own_helm_chart_proxy(&self) -> Result<bool, ConvergeError> {
        let cluster = self.cluster;
        let name = objects::helm_chart_proxy_name(cluster);
        let proxy = self.helm_chart_proxy().await?;
        if let Some(proxy) = &proxy
            && !objects::is_own_helm_chart_proxy(proxy, cluster)
        {
            // Not ours: its owner removes it, or garbage collection with the Cluster.
            info!(cluster = %self.key, helmchartproxy = %format!("{}/{name}", cluster.namespace()), "left a HelmChartProxy that is not the addon's");
        } else if let Some(proxy) = &proxy
            && proxy["metadata"]["deletionTimestamp"].is_null()
        {
            self.management
                .delete(
                    objects::HELM_CHART_PROXY_API_VERSION,
                    "HelmChartProxy",
                    Some(cluster.namespace()),
                    &name,
                )
                .await?;
            info!(cluster = %self.key, helmchartproxy = %format!("{}/{name}", cluster.namespace()), "deleted the HelmChartProxy");
            return Ok(true);
        }
        Ok(false)
    }

    /// The deployer of the registry already on the cluster: the HelmChartProxy's while the
    /// addon's own exists, direct while there is none but the StatefulSet exists; `None`
    /// when nothing tells (nothing deployed yet, or a foreign HelmChartProxy holds the name).
    /// The controller keeps a cluster on its deployer: switching is left to the hooks, whose
    /// ExtensionConfig setting may differ from `--deployer`.
    pub async fn deployed_by(
        &self,
        workload: &ClusterApi,
    ) -> Result<Option<Deployer>, ConvergeError> {
        match self.helm_chart_proxy().await? {
            Some(proxy) if objects::is_own_helm_chart_proxy(&proxy, self.cluster) => {
                Ok(Some(Deployer::Helmchartproxy))
            }
            Some(_) => Ok(None),
            // Without a HelmChartProxy, only the direct deployer can have put it there.
            None if self.deployer == Deployer::Direct => Ok(Some(Deployer::Direct)),
            None => {
                let statefulset = registry_statefulset(workload).await?;
                Ok(statefulset.map(|_| Deployer::Direct))
            }
        }
    }

    /// For a cluster being deleted: deletes the HelmChartProxy (its Helm release is
    /// uninstalled while the workload cluster still exists) and forgets the cluster. The
    /// cluster CA Secret goes with its ownerReference.
    pub async fn cleanup(&self) -> Result<(), ConvergeError> {
        self.delete_own_helm_chart_proxy().await?;
        self.state.forget(&self.key);
        Ok(())
    }

    /// For a running cluster whose addon was turned off: removes the addon's workload
    /// objects: the HelmChartProxy (its release is uninstalled), or with the direct deployer
    /// the registry objects; and `registry-tls` and `registry-auth`. Never a
    /// PersistentVolumeClaim nor the Namespace that holds them: turning the addon off keeps
    /// the registry's data. Once nothing is left, later calls send no request at all until
    /// the addon is converged again.
    pub async fn remove(&self) -> Result<Removed, ConvergeError> {
        let mut removed = Removed::default();
        if self.state.is_removed(&self.key) {
            return Ok(removed);
        }
        // Whichever deployer is configured now: a HelmChartProxy holding the addon's name
        // means the registry is a Helm release (or someone else's), else it was applied
        // directly.
        let proxy = self.helm_chart_proxy().await?;
        if proxy.is_some() && self.delete_own_helm_chart_proxy().await? {
            removed.objects.push(format!(
                "helmchartproxy {}/{}",
                self.cluster.namespace(),
                objects::helm_chart_proxy_name(self.cluster)
            ));
        }
        let workload = match self.workload().await {
            Ok(workload) => Some(workload),
            // Without a kubeconfig nothing of the addon can be on the workload cluster.
            Err(ConvergeError::NoKubeconfig(_)) => None,
            Err(e) => return Err(e),
        };
        if let Some(workload) = workload {
            // With a HelmChartProxy too: Helm's uninstall leaves the workload objects it keeps.
            let mut targets: Vec<(String, String, String)> = Vec::new();
            for id in removal_targets(&self.config.addon) {
                targets.push((id.api_version, id.kind, id.name));
            }
            for secret in [
                names::REGISTRY_TLS_SECRET,
                names::REGISTRY_AUTH_SECRET,
                names::REGISTRY_UPSTREAM_SECRET,
            ] {
                targets.push(("v1".into(), "Secret".into(), secret.into()));
            }
            // Left by a switch to Local or Proxy that did not complete; and the mode record,
            // so that turning the addon on again starts from the variable's mode.
            for configmap in [names::IMAGES_IN_USE_CONFIGMAP, switch::MODE_CONFIGMAP] {
                targets.push(("v1".into(), "ConfigMap".into(), configmap.into()));
            }
            let ns = names::REGISTRY_NAMESPACE;
            for (api_version, kind, name) in targets {
                if workload
                    .get(&api_version, &kind, Some(ns), &name)
                    .await?
                    .is_none()
                {
                    continue;
                }
                if workload
                    .delete(&api_version, &kind, Some(ns), &name)
                    .await?
                {
                    let object = k8s::object_name(&kind, Some(ns), &name);
                    info!(cluster = %self.key, %object, "deleted a registry object from the workload cluster: the addon is off");
                    removed.objects.push(object);
                }
            }
        }
        self.state.set_removed(&self.key, true);
        self.state.set_deployed_in(&self.key, None);
        Ok(removed)
    }
}

/// The registry objects the direct deployer applies in any mode, rendered with default
/// values: only their apiVersion, kind and name are used.
fn removal_targets(options: &crate::cli::AddonOptions) -> Vec<k8s::ObjectId> {
    let defaults = serde_json::json!({"addons": {"registry": {}}});
    let Ok(Some(registry)) = registry_from_config(Some(&defaults)) else {
        return Vec::new();
    };
    let values = RegistryValues::new(
        options,
        &registry,
        IpAddr::from([10, 96, 0, 10]),
        String::new(),
    );
    modes::removal_targets(&values)
}

/// One cluster's converge with its variable.
pub struct Converge<'a> {
    pub scope: Scope<'a>,
    pub registry: Cow<'a, RegistryConfig>,
    /// The time certificates are checked and issued at.
    pub now: OffsetDateTime,
    /// Where a switch of modes under way started: the previous mode's workload keeps serving
    /// beside the new one until the switch completes.
    switching_from: Option<String>,
}

impl<'a> std::ops::Deref for Converge<'a> {
    type Target = Scope<'a>;
    fn deref(&self) -> &Scope<'a> {
        &self.scope
    }
}

impl<'a> Converge<'a> {
    pub fn new(scope: Scope<'a>, registry: &'a RegistryConfig, now: OffsetDateTime) -> Self {
        Converge {
            scope,
            registry: Cow::Borrowed(registry),
            now,
            switching_from: None,
        }
    }

    pub async fn ensure_root_ca(&self) -> Result<CertificateAuthority, ConvergeError> {
        ensure_root_ca(
            self.config,
            self.state,
            &self.management,
            &self.key,
            self.now,
        )
        .await
    }

    /// Applies `<cluster>-registry-addon-ca`; fails when it holds another CA than the root.
    pub async fn ensure_cluster_ca(&self, ca: &CertificateAuthority) -> Result<(), ConvergeError> {
        let cluster = self.cluster;
        let desired = objects::cluster_ca_secret(cluster, ca.cert_pem());
        let name = names::cluster_ca_secret(cluster.name());
        let existing = self
            .management
            .get("v1", "Secret", Some(cluster.namespace()), &name)
            .await?;
        if let Some(existing) = &existing {
            if let Some(current) = secret_data(existing, "ca.crt").filter(|c| !c.trim().is_empty())
                && !ca.is_in_bundle(&current)
                && !ca.trusts_bundle(&current)
            {
                return Err(ConvergeError::CaMismatch(format!(
                    "CA mismatch: secret {}/{name} holds a CA certificate that is not the root CA \
                     in secret {}/{} (was the cluster moved to another management cluster? copy \
                     its original root CA Secret there); no certificate was issued",
                    cluster.namespace(),
                    self.config.namespace,
                    names::ROOT_CA_SECRET
                )));
            }
            // It still holds an earlier root CA: the node rollout replaces it once every node
            // trusts the new one (see `roll_nodes`).
            if let Some(current) = secret_data(existing, "ca.crt")
                && ca.bundle_has_previous(&current)
            {
                return Ok(());
            }
        }
        if self
            .management
            .converge(existing.as_ref(), &desired)
            .await?
            == Outcome::Applied
        {
            info!(cluster = %self.key, secret = %format!("{}/{name}", cluster.namespace()), "applied the cluster CA Secret");
        }
        Ok(())
    }

    /// The users `ro` and `rw`, from their management Secrets, each generated once when absent
    /// (create-if-absent: concurrent calls end with one password); and the node's `hosts.toml`
    /// Secret carrying `ro`. A Secret edited into an unusable state is an error naming it:
    /// generating over it would lock out every node and client that uses it.
    pub async fn ensure_users(&self) -> Result<Users, ConvergeError> {
        let cluster = self.cluster;
        let ns = cluster.namespace();
        let mut read = Vec::with_capacity(2);
        for user in [names::READ_ONLY_USER, names::READ_WRITE_USER] {
            let name = names::user_secret(cluster.name(), user);
            let describe = format!("secret {ns}/{name} on the management cluster");
            let secret = match self.management.get("v1", "Secret", Some(ns), &name).await? {
                Some(secret) => secret,
                None => {
                    let credentials = Credentials {
                        username: user.to_string(),
                        password: users::generate_password(),
                    };
                    let secret = self
                        .management
                        .create_or_read(&users::user_secret(cluster, &credentials))
                        .await?;
                    info!(cluster = %self.key, secret = %format!("{ns}/{name}"), "created registry user {user}");
                    secret
                }
            };
            let stored = users::read_user_secret(&secret).map_err(|e| {
                ConvergeError::Invalid(format!(
                    "{describe}: {e}; restore it, or delete it to have a new password generated"
                ))
            })?;
            read.push((describe, stored));
        }
        let (rw_describe, rw) = read.pop().expect("two users");
        let (_, ro) = read.pop().expect("two users");
        if ro.credentials.username == rw.credentials.username
            || [&ro, &rw]
                .iter()
                .any(|u| u.credentials.username == names::SYNC_USER)
        {
            return Err(ConvergeError::Invalid(format!(
                "{rw_describe}: the users of the ro and rw Secrets must have different names, \
                 neither {:?}",
                names::SYNC_USER
            )));
        }
        Ok(Users { ro, rw })
    }

    /// The node's bootstrap `hosts.toml` Secret, carrying `ro`, for the mode deployed (the
    /// effective one while a switch waits).
    pub async fn ensure_bootstrap_hosts(&self, users: &Users) -> Result<(), ConvergeError> {
        let service_ip = self.service_ip()?;
        let hosts = objects::containerd_hosts_secret(
            self.cluster,
            &containerd::bootstrap_hosts_toml(
                containerd::Route::of(&self.registry).as_ref(),
                service_ip,
                &users.ro.credentials,
            ),
        );
        if self.management.ensure(&hosts).await? == Outcome::Applied {
            info!(cluster = %self.key, secret = %k8s::ObjectId::of(&hosts), "applied the node containerd hosts Secret");
        }
        Ok(())
    }

    /// Deploys what `decision` allows: the mode the cluster is deployed in rather than the
    /// variable's while a switch waits, and the previous mode's workload kept while a switch
    /// is under way (see [`switch`]).
    pub fn apply_decision(&mut self, decision: &ModeDecision) {
        self.registry = Cow::Owned(decision.effective.clone());
        // Also while a newer request waits or is refused: the switch under way goes on.
        self.switching_from = decision.record.switching_from.clone();
    }

    /// A switch of modes is under way.
    fn switching(&self) -> bool {
        self.switching_from.is_some()
    }

    /// The switch under way goes back to the mode it started from, whose workload never
    /// stopped serving.
    fn returning(&self) -> bool {
        self.switching_from.as_deref() == Some(self.registry.mode.as_str())
    }

    /// What a switch of modes allows now: the variable's mode, or the effective one while a
    /// switch to the variable's is refused or its target not ready. Reads the recorded mode and,
    /// only while a switch waits, the Pods and the target.
    pub async fn decide_mode(
        &self,
        workload: &ClusterApi,
        desired: &RegistryConfig,
    ) -> Result<ModeDecision, ConvergeError> {
        // Before any request reaches the workload cluster (see `deploy`).
        if self.deployer == Deployer::Direct {
            self.check_no_helm_chart_proxy().await?;
        }
        let stored = workload
            .get(
                "v1",
                "ConfigMap",
                Some(names::REGISTRY_NAMESPACE),
                switch::MODE_CONFIGMAP,
            )
            .await?;
        let wanted = ModeRecord::of(desired);
        let record = switch::read_record(stored.as_ref());
        let effective = record
            .as_ref()
            .and_then(|r| r.apply_to(desired).map(|config| (r.clone(), config)));
        let decision =
            |effective: RegistryConfig, record: ModeRecord, state: SwitchState| ModeDecision {
                effective,
                record,
                stored: stored.clone(),
                state,
                check: None,
            };
        let effective = match effective {
            Some(found) => Some(found),
            None => self.unrecorded_local(workload, desired).await?,
        };
        let Some((record, current)) = effective else {
            // Nothing recorded and nothing deployed: a first deploy.
            return Ok(decision(desired.clone(), wanted, SwitchState::Settled));
        };
        if record.same_mode(&wanted) {
            let state = match &record.switching_from {
                Some(from) => SwitchState::Switching { from: from.clone() },
                None => SwitchState::Settled,
            };
            let record = ModeRecord {
                switching_from: record.switching_from.clone(),
                ..wanted
            };
            return Ok(decision(desired.clone(), record, state));
        }
        // A switch under way counts as from where it started too: Proxy → Direct, then Local
        // before Direct serves, would rewrite Proxy's StatefulSet into Local's in place.
        let started = record
            .switching_from
            .as_deref()
            .and_then(|from| Mode::ALL.into_iter().find(|m| m.as_str() == from));
        let refusal = switch::refused(current.mode, desired.mode).or_else(|| {
            let from = started?;
            switch::refused(from, desired.mode).map(|message| {
                format!(
                    "{message}; the switch from {from} to {} under way must complete first",
                    current.mode
                )
            })
        });
        if let Some(message) = refusal {
            return Ok(decision(
                current,
                record,
                SwitchState::Refused {
                    target: desired.mode,
                    message,
                },
            ));
        }
        let check = match (&desired.upstream, desired.mode) {
            (Some(upstream), Mode::Proxy | Mode::Direct) => {
                let secrets = modes::read_upstream_secrets(&self.management, self.cluster, desired)
                    .await?
                    .unwrap_or(modes::UpstreamSecrets {
                        credentials: None,
                        ca_pem: None,
                    });
                let pods = workload.list("v1", "Pod", None).await?;
                let images = switch::images_in_use(&pods);
                let routed = switch::routed_to(&images, &upstream.host);
                let timeout = self.budget.mul_f64(0.25).max(Duration::from_secs(2));
                switch::check_upstream(&upstream.origin(), &secrets, &routed, timeout).await
            }
            // The local store does not run before the switch: its replicas check themselves.
            (_, Mode::Local) => switch::TargetCheck::AtReplicas,
            _ => switch::TargetCheck::Ready { checked: 0 },
        };
        if matches!(
            check,
            switch::TargetCheck::Ready { .. } | switch::TargetCheck::AtReplicas
        ) {
            let from = record
                .switching_from
                .clone()
                .unwrap_or_else(|| record.mode.clone());
            let mut record = wanted;
            // Back to where a switch started, before it completed, is under way too: the
            // abandoned target's workload may serve, and nodes may carry its route, until the
            // nodes are back (`from` is then the mode itself).
            record.switching_from = Some(from.clone());
            let state = SwitchState::Switching { from };
            return Ok(ModeDecision {
                check: Some(check),
                ..decision(desired.clone(), record, state)
            });
        }
        Ok(decision(
            current,
            record,
            SwitchState::Waiting {
                target: desired.mode,
                check,
            },
        ))
    }

    /// Without a mode record: Local when its StatefulSet runs (a registry deployed before modes
    /// were recorded, which could only be Local, or a record deleted by hand), so that a
    /// change of mode is a switch with its checks rather than taken as is.
    async fn unrecorded_local(
        &self,
        workload: &ClusterApi,
        desired: &RegistryConfig,
    ) -> Result<Option<(ModeRecord, RegistryConfig)>, ConvergeError> {
        let statefulset = registry_statefulset(workload).await?;
        let Some(statefulset) = statefulset else {
            return Ok(None);
        };
        let ours =
            statefulset["metadata"]["labels"]["app.kubernetes.io/part-of"] == "registry-addon";
        let proxy = statefulset["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["env"].as_array().into_iter().flatten())
            .any(|e| e["name"] == "REGISTRY_PROXY_REMOTEURL");
        if !ours || proxy {
            return Ok(None);
        }
        let record = ModeRecord {
            mode: Mode::Local.as_str().to_string(),
            upstream: None,
            cache: None,
            switching_from: None,
        };
        Ok(record.apply_to(desired).map(|config| (record, config)))
    }

    /// Records the mode deployed: at the start of a switch, and with `complete` (its registry
    /// ready, every node on the final configuration) at its end. Written only when it changes.
    pub async fn record_mode(
        &self,
        workload: &ClusterApi,
        decision: &ModeDecision,
        complete: bool,
    ) -> Result<(), ConvergeError> {
        let mut record = decision.record.clone();
        if complete {
            // The new mode serves and every node is off the old one: its workload goes, before
            // the record says the switch is over (a crash in between prunes again).
            if record.switching_from.is_some() {
                let values = RegistryValues::new(
                    &self.config.addon,
                    &self.registry,
                    self.service_ip()?,
                    String::new(),
                );
                modes::prune_other_modes(workload, &values, &self.key).await?;
                if matches!(self.registry.mode, Mode::Local | Mode::Proxy) {
                    self.delete_images_in_use(workload).await?;
                }
                if self.registry.upstream.is_none() {
                    modes::ensure_upstream_secret(workload, None, &self.key).await?;
                }
            }
            record.switching_from = None;
        }
        if switch::read_record(decision.stored.as_ref()).as_ref() == Some(&record) {
            return Ok(());
        }
        let configmap = switch::record_configmap(&record);
        workload
            .converge(decision.stored.as_ref(), &configmap)
            .await?;
        info!(cluster = %self.key, mode = %record.mode, switching_from = ?record.switching_from, "recorded the registry mode on the workload cluster");
        Ok(())
    }

    /// `registry-system/registry-auth`: the hashes of `ro` and `rw`, the sync identity and the
    /// shared HTTP secret, re-hashed only when a user Secret changed. The number of objects
    /// written.
    async fn ensure_registry_auth(
        &self,
        workload: &ClusterApi,
        users: &Users,
        plan: &Plan,
    ) -> Result<usize, ConvergeError> {
        let ns = names::REGISTRY_NAMESPACE;
        let name = names::REGISTRY_AUTH_SECRET;
        let mut applied = 0;
        if workload.ensure(&objects::registry_namespace()).await? == Outcome::Applied {
            applied += 1;
            info!(cluster = %self.key, namespace = ns, "applied the registry Namespace on the workload cluster");
        }
        let existing = workload.get("v1", "Secret", Some(ns), name).await?;
        let auth = RegistryAuth::desired_accepting(
            existing.as_ref(),
            &users.ro,
            &users.rw,
            &plan.registry_state(self.now).accepted_ro(),
        )
        .map_err(ConvergeError::Invalid)?;
        if workload.converge(existing.as_ref(), &auth.secret()).await? == Outcome::Applied {
            applied += 1;
            info!(cluster = %self.key, secret = %format!("{ns}/{name}"), "applied the registry auth Secret on the workload cluster");
        }
        Ok(applied)
    }

    fn service_ip(&self) -> Result<IpAddr, ConvergeError> {
        self.registry
            .resolve_service_ip(self.cluster.service_cidrs())
            .map_err(|e| ConvergeError::Invalid(e.to_string()))
    }

    /// The node rollout as it stands: the workload's node-config Secret, the side the nodes
    /// should have (the Service address, the root CA, `ro`), and the Nodes. Read before the
    /// registry is deployed, since the registry side follows the rollout: which credentials
    /// it accepts, which CAs it trusts and which CA's certificate it serves.
    pub async fn node_plan(
        &self,
        workload: &ClusterApi,
        ca: &CertificateAuthority,
        users: &Users,
    ) -> Result<Plan, ConvergeError> {
        let host = containerd::mirror_host(self.service_ip()?);
        let desired = MirrorSide {
            host: host.clone(),
            ca_pem: ca.cert_pem().to_string(),
            ro: users.ro.credentials.clone(),
            route: containerd::Route::of(&self.registry),
        };
        let secret = workload
            .get(
                "v1",
                "Secret",
                Some(names::REGISTRY_NAMESPACE),
                names::NODE_CONFIG_SECRET,
            )
            .await?;
        let has_state = secret
            .as_ref()
            .and_then(|s| secret_data(s, rollout::STATE_KEY))
            .is_some();
        // Without a rollout state the nodes carry their bootstrap files, made from the
        // cluster's CA copy: an earlier root CA there means a rotation must roll out.
        let mut fallback = desired.clone();
        if !has_state {
            let cluster = self.cluster;
            let copy = self
                .management
                .get(
                    "v1",
                    "Secret",
                    Some(cluster.namespace()),
                    &names::cluster_ca_secret(cluster.name()),
                )
                .await?
                .and_then(|s| secret_data(&s, "ca.crt"));
            if let Some(copy) = copy
                && ca.bundle_has_previous(&copy)
            {
                fallback.ca_pem = copy;
            }
        }
        let nodes = workload.list("v1", "Node", None).await?;
        Ok(Plan::new(
            secret.as_ref(),
            &desired,
            &fallback,
            &nodes,
            self.now,
            self.config.addon.node_rollout_timeout,
        ))
    }

    /// Moves the node rollout on, after the registry was deployed: writes the node-config
    /// Secret when its state changes (the first one included), and the cluster's CA copy
    /// that bootstraps new machines. `registry` tells what the replicas run: nodes need every
    /// replica on the current certificate before a rotated CA's predecessor is dropped from
    /// their trust, and the new mode's registry ready before they are routed to it.
    pub async fn roll_nodes(
        &self,
        workload: &ClusterApi,
        plan: &Plan,
        registry: RegistryNow,
    ) -> Result<Progress, ConvergeError> {
        let (next, waiting_for_registry) = plan.next(self.now, registry);
        let written = !plan.stored || next != plan.current;
        if written {
            let secret = rollout::node_config_secret(&next);
            workload.converge(plan.secret.as_ref(), &secret).await?;
            info!(cluster = %self.key, secret = %k8s::ObjectId::of(&secret), phase = next.phase(), "applied the desired node configuration on the workload cluster");
        }
        let trusted = next.trusted_cas();
        if written || trusted.len() > 1 {
            let copy = objects::cluster_ca_secret(self.cluster, &trusted.concat());
            if self.management.ensure(&copy).await? == Outcome::Applied {
                info!(cluster = %self.key, secret = %k8s::ObjectId::of(&copy), "applied the cluster CA copy for the node rollout");
            }
        }
        let hash = next.node_config().hash;
        let acks = rollout::acks(&plan.nodes, &hash, next.since(), self.now, plan.timeout);
        let desired = matches!(&next, RolloutState::Final { side, .. } if *side == plan.desired);
        Ok(Progress {
            state: next,
            hash,
            acks,
            waiting_for_registry,
            written,
            desired,
        })
    }

    /// What the registry runs for the node rollout: whether every replica runs the current
    /// spec, and serves the certificate of the root CA deployed just now.
    pub fn registry_now(&self, plan: &Plan, readiness: &Readiness) -> RegistryNow {
        match (
            readiness.waiting.is_none(),
            plan.signer(self.now) == Signer::Root,
        ) {
            (false, _) => RegistryNow::NotReady,
            (true, false) => RegistryNow::Ready,
            (true, true) => RegistryNow::ServesNew,
        }
    }

    /// Namespace, `registry-auth`, `registry-tls` (kept while usable, renewed inside the
    /// renewal window when `renew_fraction` is set) and the registry itself, as the node
    /// rollout `plan` allows: see [`rollout`]. [`Converge::decide_mode`] comes first: it
    /// also refuses the direct deployer beside a HelmChartProxy.
    pub async fn deploy(
        &self,
        ca: &CertificateAuthority,
        workload: &ClusterApi,
        users: &Users,
        renew_fraction: Option<f64>,
        plan: &Plan,
    ) -> Result<Deployed, ConvergeError> {
        // Proxy's and Direct's upstream Secrets, checked before anything is written.
        let upstream =
            modes::read_upstream_secrets(&self.management, self.cluster, &self.registry).await?;
        // From here on the addon's objects exist again: a later removal must look.
        self.state.set_removed(&self.key, false);
        // What another mode left needs looking for only when the mode may have changed.
        let settled = self.state.deployed_in(&self.key, self.registry.mode);
        let mut applied = self.ensure_registry_auth(workload, users, plan).await?;
        // A switch to a mode without an upstream keeps the Secret for the previous mode's
        // pods (they mount it) until it completes (see `record_mode`).
        if upstream.is_some() || (!settled && !self.switching()) {
            applied +=
                modes::ensure_upstream_secret(workload, upstream.as_ref(), &self.key).await?;
        }
        let service_ip = self.service_ip()?;
        let subject = certs::registry_subject_names(self.registry.replicas, service_ip);

        let tls_name = names::REGISTRY_TLS_SECRET;
        let ns = names::REGISTRY_NAMESPACE;
        let existing = workload.get("v1", "Secret", Some(ns), tls_name).await?;
        let now = self.now;
        let signer = plan.signer(now);
        let kept = match &existing {
            None => Err("it does not exist"),
            Some(secret) => usable_certificate(secret, ca, &signer, &subject, now, renew_fraction),
        };
        let mut renewed = None;
        let cert = match kept {
            Ok(cert) => cert,
            Err(reason) => {
                let algorithm = self.config.addon.key_algorithm;
                let cert = ca.issue_server(&subject, algorithm, now).map_err(|e| {
                    ConvergeError::Invalid(format!("issuing the registry certificate: {e}"))
                })?;
                info!(cluster = %self.key, secret = %format!("{ns}/{tls_name}"), reason, "issued a registry server certificate");
                if existing.is_some() {
                    renewed = Some(reason);
                }
                cert
            }
        };
        // The type of a Secret is immutable: replace one that is not kubernetes.io/tls.
        if let Some(secret) = &existing
            && secret["type"].as_str() != Some("kubernetes.io/tls")
        {
            workload.delete("v1", "Secret", Some(ns), tls_name).await?;
            info!(cluster = %self.key, secret = %format!("{ns}/{tls_name}"), "deleted a registry TLS Secret of the wrong type");
        }
        // The sync sidecars trust what the nodes trust: both CAs during a rotation.
        let trust = plan.registry_state(now).trusted_cas().concat();
        let secret = objects::registry_tls_secret(&cert, &trust);
        if workload.converge(existing.as_ref(), &secret).await? == Outcome::Applied {
            applied += 1;
            info!(cluster = %self.key, secret = %format!("{ns}/{tls_name}"), "applied the registry TLS Secret on the workload cluster");
        }

        let images_required = self.ensure_images_in_use(workload, settled).await?;
        let certificate = CertInfo::from_pem(&cert.cert_pem)
            .map_err(|e| ConvergeError::Invalid(format!("registry certificate: {e}")))?;
        let hash = pod_hash(&certificate, &trust, ca);
        let mut values =
            RegistryValues::new(&self.config.addon, &self.registry, service_ip, hash.clone());
        if self.registry.mode == Mode::Proxy
            && let Some(secrets) = &upstream
        {
            values.upstream.secret_hash = modes::secret_hash(secrets);
        }
        match self.deployer {
            Deployer::Helmchartproxy => {
                let proxy = objects::helm_chart_proxy(self.cluster, &self.config.addon, &values)
                    .map_err(|e| {
                        ConvergeError::Invalid(format!("rendering the HelmChartProxy values: {e}"))
                    })?;
                // One GET, as `ensure` would do, that also tells a foreign object holding the
                // name: force-applying over it would take over someone else's release.
                let current = self.helm_chart_proxy().await?;
                if let Some(current) = &current
                    && !objects::is_own_helm_chart_proxy(current, self.cluster)
                {
                    return Err(ConvergeError::DeployerConflict(format!(
                        "{}; the addon does not apply over it: rename or delete it and call again",
                        foreign_proxy(self.cluster)
                    )));
                }
                if self.management.converge(current.as_ref(), &proxy).await? == Outcome::Applied {
                    applied += 1;
                    info!(cluster = %self.key, helmchartproxy = %k8s::ObjectId::of(&proxy), "applied the HelmChartProxy");
                }
                // Helm leaves the workload objects a release upgrade drops (they are kept, see
                // the chart): as with the direct deployer, they go here.
                if !settled && !self.switching() {
                    applied += modes::prune_other_modes(workload, &values, &self.key).await?;
                }
            }
            Deployer::Direct => {
                for object in objects::direct_registry_objects(&values) {
                    if workload.ensure(&object).await? == Outcome::Applied {
                        applied += 1;
                        info!(cluster = %self.key, object = %k8s::ObjectId::of(&object), "applied a registry object on the workload cluster");
                    }
                }
                // While a switch is under way the previous mode's workload keeps serving at the
                // address beside the new one (the Service selects both); it goes once the switch
                // completes (see `record_mode`).
                if !settled && !self.switching() {
                    applied += modes::prune_other_modes(workload, &values, &self.key).await?;
                }
            }
        }
        self.state
            .set_deployed_in(&self.key, Some(self.registry.mode));
        Ok(Deployed {
            hash,
            certificate,
            renewed,
            applied,
            images_required,
        })
    }

    /// During a switch to Local or Proxy, lists the images in use (Proxy: those routed to the
    /// upstream) in the ConfigMap the StatefulSet's fronts read (`front --require-images`),
    /// before the StatefulSet is applied, so that its replicas start with it; otherwise, when
    /// the mode may have changed, removes it. The number of images listed.
    async fn ensure_images_in_use(
        &self,
        workload: &ClusterApi,
        settled: bool,
    ) -> Result<Option<usize>, ConvergeError> {
        let ns = names::REGISTRY_NAMESPACE;
        let name = names::IMAGES_IN_USE_CONFIGMAP;
        // Not when going back: the replicas of the mode a switch started from serve already,
        // and a list they fail would take them out of the Service.
        let to_store = matches!(self.registry.mode, Mode::Local | Mode::Proxy);
        if to_store && self.switching() && !self.returning() {
            let pods = workload.list("v1", "Pod", None).await?;
            let mut images = switch::images_in_use(&pods);
            // The StatefulSet's own images are in use as soon as its pods exist; listed from
            // the start, since a replica may be ready before the list is written again.
            for own in [
                &self.config.addon.registry_image,
                &self.config.addon.sync_image,
            ] {
                if let Ok(own) = crate::oci::ImageReference::parse(own)
                    && !images.contains(&own)
                {
                    images.push(own);
                }
            }
            // Proxy is asked only for the upstream's images.
            if let (Mode::Proxy, Some(upstream)) = (self.registry.mode, &self.registry.upstream) {
                let routed: Vec<_> = switch::routed_to(&images, &upstream.host)
                    .into_iter()
                    .cloned()
                    .collect();
                images = routed;
            }
            let desired = switch::images_in_use_configmap(&images);
            let existing = workload.get("v1", "ConfigMap", Some(ns), name).await?;
            if workload.converge(existing.as_ref(), &desired).await? == Outcome::Applied {
                info!(cluster = %self.key, configmap = %format!("{ns}/{name}"), images = images.len(), "listed the images in use the local store must hold");
            }
            return Ok(Some(images.len()));
        }
        if !settled || self.returning() {
            self.delete_images_in_use(workload).await?;
        }
        Ok(None)
    }

    async fn delete_images_in_use(&self, workload: &ClusterApi) -> Result<(), ConvergeError> {
        let ns = names::REGISTRY_NAMESPACE;
        let name = names::IMAGES_IN_USE_CONFIGMAP;
        // Read first: a repeat that finds nothing to do sends no write.
        if workload
            .get("v1", "ConfigMap", Some(ns), name)
            .await?
            .is_some()
            && workload.delete("v1", "ConfigMap", Some(ns), name).await?
        {
            info!(cluster = %self.key, configmap = %format!("{ns}/{name}"), "deleted the list of images the local store must hold");
        }
        Ok(())
    }

    /// Fails, before anything is applied to the workload cluster, while the HelmChartProxy
    /// named as the addon's for this cluster exists (even while it is being deleted). With
    /// it, CAAPH and the direct deployer would own the same objects, and its deletion makes
    /// CAAPH uninstall the release, taking the objects applied directly with it. It is never
    /// deleted here: that uninstalls the registry, the operator's call.
    async fn check_no_helm_chart_proxy(&self) -> Result<(), ConvergeError> {
        match self.helm_chart_proxy().await? {
            None => Ok(()),
            Some(proxy) => Err(ConvergeError::DeployerConflict(direct_deployer_blocked(
                &proxy,
                self.cluster,
            ))),
        }
    }

    /// Whether the StatefulSet `registry-system/registry` runs every replica of the current
    /// spec (`certificate_hash` is the certificate its pods must carry), without waiting.
    pub async fn readiness(
        &self,
        workload: &ClusterApi,
        certificate_hash: &str,
    ) -> Result<Readiness, ConvergeError> {
        match self.registry.mode {
            // Nothing serves at the address: nothing to wait for.
            Mode::Unmanaged => {
                return Ok(Readiness {
                    wanted: 0,
                    replicas: None,
                    ready_replicas: 0,
                    waiting: None,
                });
            }
            Mode::Direct => {
                let deployment = workload
                    .get(
                        "apps/v1",
                        "Deployment",
                        Some(names::REGISTRY_NAMESPACE),
                        names::REGISTRY_DIRECT_NAME,
                    )
                    .await?;
                let wanted = u64::from(self.registry.replicas.max(2));
                let (replicas, ready_replicas, waiting) =
                    modes::deployment_not_ready(deployment.as_ref(), wanted, certificate_hash);
                return Ok(Readiness {
                    wanted,
                    replicas,
                    ready_replicas,
                    waiting,
                });
            }
            Mode::Local | Mode::Proxy => {}
        }
        let statefulset = registry_statefulset(workload).await?;
        let wanted = u64::from(self.registry.replicas);
        Ok(match &statefulset {
            None => Readiness {
                wanted,
                replicas: None,
                ready_replicas: 0,
                waiting: Some("it does not exist yet".to_string()),
            },
            Some(sts) => Readiness {
                wanted,
                replicas: Some(sts["spec"]["replicas"].as_u64().unwrap_or(1)),
                ready_replicas: sts["status"]["readyReplicas"].as_u64().unwrap_or(0),
                waiting: statefulset_not_ready(sts, wanted, certificate_hash),
            },
        })
    }
}

/// StatefulSet `registry-system/registry` (Local's and Proxy's), if it exists.
async fn registry_statefulset(
    workload: &ClusterApi,
) -> Result<Option<serde_json::Value>, ConvergeError> {
    Ok(workload
        .get(
            "apps/v1",
            "StatefulSet",
            Some(names::REGISTRY_NAMESPACE),
            names::REGISTRY_NAME,
        )
        .await?)
}

/// Names the HelmChartProxy holding the addon's name for `cluster` without its labels.
fn foreign_proxy(cluster: &Cluster) -> String {
    format!(
        "HelmChartProxy {}/{} exists but is not the registry addon's (it lacks the labels {}={} \
         and {}={})",
        cluster.namespace(),
        objects::helm_chart_proxy_name(cluster),
        names::MANAGED_BY_LABEL,
        names::FIELD_MANAGER,
        names::CLUSTER_NAME_LABEL,
        cluster.name()
    )
}

/// Why the direct deployer does not deploy beside an existing HelmChartProxy `proxy` named as
/// the addon's for `cluster`, and what the operator can do.
fn direct_deployer_blocked(proxy: &serde_json::Value, cluster: &Cluster) -> String {
    let name = format!(
        "{}/{}",
        cluster.namespace(),
        objects::helm_chart_proxy_name(cluster)
    );
    if !objects::is_own_helm_chart_proxy(proxy, cluster) {
        // Someone else's object under the addon's name: it may install a release into
        // registry-system too, and the helmchartproxy deployer would take it over.
        return format!(
            "{}; the direct deployer applies nothing while a HelmChartProxy holds the name the \
             addon uses for this cluster: rename or delete it and call again",
            foreign_proxy(cluster)
        );
    }
    if !proxy["metadata"]["deletionTimestamp"].is_null() {
        return format!(
            "HelmChartProxy {name} is being deleted (CAAPH uninstalls its release); the direct \
             deployer applies the registry once it is gone"
        );
    }
    format!(
        "HelmChartProxy {name} still deploys the registry; switching to the direct deployer \
         needs it gone first: delete it (CAAPH uninstalls its release) and call again"
    )
}

/// Why a StatefulSet is not ready for `wanted` replicas, or `None` when it is.
fn statefulset_not_ready(
    sts: &serde_json::Value,
    wanted: u64,
    certificate_hash: &str,
) -> Option<String> {
    let number = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let generation = number(&sts["metadata"]["generation"]);
    let observed = number(&sts["status"]["observedGeneration"]);
    let replicas = sts["spec"]["replicas"].as_u64().unwrap_or(1);
    let ready = number(&sts["status"]["readyReplicas"]);
    let updated = number(&sts["status"]["updatedReplicas"]);
    if replicas != wanted {
        return Some(format!("it has {replicas} replicas, {wanted} wanted"));
    }
    // With a HelmChartProxy the chart is upgraded asynchronously: wait until the pods carry
    // the current certificate.
    let annotation =
        &sts["spec"]["template"]["metadata"]["annotations"][names::CERTIFICATE_HASH_ANNOTATION];
    if let Some(applied) = annotation.as_str()
        && applied != certificate_hash
    {
        return Some("its pods do not carry the current certificate yet".into());
    }
    if observed < generation {
        return Some(format!(
            "generation {generation} not yet observed (observed {observed})"
        ));
    }
    if ready < replicas || updated < replicas {
        return Some(format!(
            "{ready}/{replicas} replicas ready, {updated}/{replicas} updated"
        ));
    }
    None
}

/// What the registry pods carry in [`names::CERTIFICATE_HASH_ANNOTATION`], so that they
/// restart when what they serve or trust changes: the certificate's SHA-256, and with a trust
/// bundle other than the root CA alone (a rotation), a hash of both.
fn pod_hash(certificate: &CertInfo, trust: &str, ca: &CertificateAuthority) -> String {
    let hash = certificate.sha256_hex();
    if trust == ca.cert_pem() {
        return hash;
    }
    let mut digest = Sha256::new();
    digest.update(hash.as_bytes());
    digest.update([0]);
    digest.update(trust.as_bytes());
    hex::encode(digest.finalize())
}

/// The certificate in a `registry-tls` Secret when it can stay, else why it must be replaced.
/// `signer` is the CA it must be signed by (during a rotation, the previous one until every
/// node trusts the new one); a certificate is always issued by `ca`.
fn usable_certificate(
    secret: &serde_json::Value,
    ca: &CertificateAuthority,
    signer: &Signer,
    subject: &certs::SubjectNames,
    now: OffsetDateTime,
    renew_fraction: Option<f64>,
) -> Result<CertifiedKey, &'static str> {
    let cert_pem = secret_data(secret, "tls.crt").ok_or("it has no tls.crt")?;
    let key_pem = secret_data(secret, "tls.key").ok_or("it has no tls.key")?;
    let info = CertInfo::from_pem(&cert_pem).map_err(|_| "its certificate cannot be read")?;
    if !info.key_matches(&key_pem) {
        return Err("its private key does not match the certificate");
    }
    let signed = match signer {
        Signer::Root => info.is_signed_by(ca),
        Signer::Keep(pem) => info.is_signed_by_pem(pem),
    };
    if !signed {
        return Err("it is not signed by the cluster's CA");
    }
    if info.names != *subject {
        return Err("its SANs do not match the replicas and Service IP");
    }
    if !info.is_valid_at(now) {
        return Err("it is expired or not yet valid");
    }
    if let Some(fraction) = renew_fraction
        && info.in_renewal_window(now, fraction)
    {
        return Err("it is inside its renewal window");
    }
    Ok(CertifiedKey {
        cert_pem,
        key_pem: PrivateKeyPem::new(key_pem),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> kube::Client {
        let config = kube::Config::new("http://127.0.0.1:1".parse().expect("url"));
        kube::Client::try_from(config).expect("client")
    }

    #[tokio::test]
    async fn workload_cache_keeps_the_most_recently_used_clients() {
        let state = State::default();
        let fingerprint = [7; 32];
        for i in 0..CACHED_WORKLOAD_CLIENTS {
            state.cache_workload(&format!("ns/c-{i}"), fingerprint, client());
        }
        // c-0 used again: c-1 is now the least recently used.
        assert!(state.cached_workload("ns/c-0", &fingerprint).is_some());
        state.cache_workload("ns/new", fingerprint, client());
        assert_eq!(state.cached_workload_clients(), CACHED_WORKLOAD_CLIENTS);
        assert!(state.cached_workload("ns/c-0", &fingerprint).is_some());
        assert!(state.cached_workload("ns/c-1", &fingerprint).is_none());
        assert!(state.cached_workload("ns/new", &fingerprint).is_some());
        // Another kubeconfig: not this client.
        assert!(state.cached_workload("ns/new", &[8; 32]).is_none());
    }
}
