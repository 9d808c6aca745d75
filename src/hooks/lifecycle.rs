//! BeforeClusterCreate, AfterControlPlaneInitialized, BeforeClusterUpgrade and
//! BeforeClusterDelete (SPEC §4).
//!
//! Every handler reads first and writes only what differs, so CAPI's repeated calls converge
//! and a call on an up-to-date cluster sends no write. Calls for one cluster are serialized by
//! a per-cluster lock; the root CA is created with create-if-absent so two extension replicas
//! cannot each generate one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tracing::info;

use crate::addon::users::{self, Credentials, RegistryAuth, StoredUser};
use crate::certs::{self, CertInfo, CertificateAuthority, CertifiedKey, PrivateKeyPem};
use crate::cli::Deployer;
use crate::hooks::patches::containerd;
use crate::hooks::{HookContext, LifecycleCall, Management};
use crate::k8s::{self, ClusterApi, Outcome, Place};
use crate::names;
use crate::render::objects::{self, secret_data};
use crate::render::registry::RegistryValues;
use crate::wire::cluster::Cluster;
use crate::wire::runtime::{Hook, Response};

/// How long BeforeClusterUpgrade asks CAPI to wait before calling again.
pub const RETRY_AFTER_SECONDS: i32 = 15;
/// Budget used when the caller gives none.
const DEFAULT_BUDGET: Duration = Duration::from_secs(10);

/// State shared by lifecycle calls: per-cluster locks and cached workload clients.
#[derive(Default)]
pub struct State {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    workloads: Mutex<HashMap<String, CachedWorkload>>,
    root_ca: tokio::sync::Mutex<()>,
}

struct CachedWorkload {
    /// SHA-256 of the kubeconfig the client was built from.
    fingerprint: [u8; 32],
    client: kube::Client,
}

impl State {
    fn cluster_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(key.to_string()).or_default().clone()
    }

    fn cached_workload(&self, key: &str, fingerprint: &[u8; 32]) -> Option<kube::Client> {
        let workloads = self.workloads.lock().unwrap_or_else(|e| e.into_inner());
        workloads
            .get(key)
            .filter(|cached| &cached.fingerprint == fingerprint)
            .map(|cached| cached.client.clone())
    }

    fn cache_workload(&self, key: &str, fingerprint: [u8; 32], client: kube::Client) {
        let mut workloads = self.workloads.lock().unwrap_or_else(|e| e.into_inner());
        workloads.insert(
            key.to_string(),
            CachedWorkload {
                fingerprint,
                client,
            },
        );
    }

    /// Drops what is kept for a deleted cluster.
    fn forget(&self, key: &str) {
        self.workloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Number of cached workload clients (for tests and metrics).
    pub fn cached_workload_clients(&self) -> usize {
        self.workloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// Why a hook could not finish.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HookError {
    #[error(transparent)]
    Kube(#[from] k8s::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    CaMismatch(String),
    /// The direct deployer would share the registry with a HelmChartProxy's release.
    #[error("{0}")]
    DeployerConflict(String),
    /// The root CA Secret is gone while clusters trust the CA it held.
    #[error("{0}")]
    RootCaMissing(String),
}

impl HookError {
    fn is_transient(&self) -> bool {
        match self {
            HookError::Kube(e) => e.is_transient(),
            HookError::Invalid(_)
            | HookError::CaMismatch(_)
            | HookError::DeployerConflict(_)
            | HookError::RootCaMissing(_) => false,
        }
    }

    fn on_workload(&self) -> bool {
        match self {
            HookError::Kube(e) => e.place == Place::Workload,
            _ => false,
        }
    }
}

pub async fn handle(ctx: &HookContext, call: LifecycleCall<'_>) -> Response {
    let hook = call.hook;
    let key = call.cluster.key();
    let client = match &ctx.management {
        Management::Client(client) => client.clone(),
        Management::Unavailable(reason) => {
            return Response::failure(
                hook,
                format!("cluster {key}: management cluster unreachable: {reason}"),
            );
        }
    };
    let deployer = match ctx.deployer(&call.request.settings) {
        Ok(deployer) => deployer,
        Err(message) => return Response::failure(hook, format!("cluster {key}: {message}")),
    };
    let budget = if call.budget.is_zero() {
        DEFAULT_BUDGET
    } else {
        call.budget
    };
    // Answer well inside the caller's timeout, whatever the APIs do.
    let deadline = budget.mul_f64(0.8);
    let handler = Handler {
        ctx,
        call: &call,
        key: key.clone(),
        deployer,
        management: ClusterApi::new(client, Place::Management),
        budget: deadline,
    };
    let lock = ctx.state.cluster_lock(&key);
    let work = async {
        let _guard = lock.lock().await;
        handler.run().await
    };
    match tokio::time::timeout(deadline, work).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => handler.error_response(e),
        Err(_) => {
            let message = format!(
                "cluster {key}: {hook} did not finish within {:.1}s; it will be retried",
                deadline.as_secs_f64()
            );
            if is_blocking(hook) {
                Response::retry(hook, RETRY_AFTER_SECONDS, message)
            } else {
                Response::failure(hook, message)
            }
        }
    }
}

/// Hooks that may answer `retryAfterSeconds`: CAPI calls them again instead of failing.
fn is_blocking(hook: Hook) -> bool {
    matches!(hook, Hook::BeforeClusterCreate | Hook::BeforeClusterUpgrade)
}

/// The root CA: read from `registry-addon-root-ca`, generated when absent. An existing
/// Secret (cert-manager's or the operator's) is used as is, never regenerated. Creation is
/// create-if-absent, so concurrent callers (and extension replicas) end up with one CA.
pub(crate) async fn ensure_root_ca(
    ctx: &HookContext,
    management: &ClusterApi,
    cluster_key: &str,
) -> Result<CertificateAuthority, HookError> {
    let namespace = ctx.config.namespace.as_str();
    let describe = || {
        format!(
            "secret {namespace}/{} on the management cluster",
            names::ROOT_CA_SECRET
        )
    };
    let _guard = ctx.state.root_ca.lock().await;
    let existing = management
        .get("v1", "Secret", Some(namespace), names::ROOT_CA_SECRET)
        .await?;
    let secret = match existing {
        Some(secret) => secret,
        None => {
            if let Some((holder, fingerprint)) = earlier_root_ca(management, cluster_key).await? {
                return Err(HookError::RootCaMissing(format!(
                    "{} is missing, but cluster {holder} trusts a root CA (SHA-256 fingerprint \
                     {fingerprint}): restore that Secret (tls.crt, tls.key, ca.crt) from a \
                     backup or from the management cluster the clusters were created on; a new \
                     root CA is generated only while no cluster holds a copy of an earlier one",
                    describe()
                )));
            }
            let algorithm = ctx.config.addon.key_algorithm;
            let ca = CertificateAuthority::generate(algorithm, OffsetDateTime::now_utc())
                .map_err(|e| HookError::Invalid(format!("{}: {e}", describe())))?;
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
        return Err(HookError::Invalid(format!(
            "{}: keys tls.crt and tls.key are required",
            describe()
        )));
    };
    CertificateAuthority::from_pem(&cert, &key)
        .map_err(|e| HookError::Invalid(format!("{}: {e}", describe())))
}

/// The registry users of a cluster, as their management Secrets hold them.
struct Users {
    ro: StoredUser,
    rw: StoredUser,
}

/// A cluster holding a copy of a root CA (its `<cluster>-registry-addon-ca`), with that CA's
/// fingerprint: the calling cluster first, then every Cluster of the management cluster.
/// Looked at only while the root CA Secret is missing.
async fn earlier_root_ca(
    management: &ClusterApi,
    cluster_key: &str,
) -> Result<Option<(String, String)>, HookError> {
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
        Ok::<_, HookError>(fingerprint.map(|f| (format!("{namespace}/{name}"), f)))
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

struct Handler<'a> {
    ctx: &'a HookContext,
    call: &'a LifecycleCall<'a>,
    key: String,
    deployer: Deployer,
    management: ClusterApi,
    budget: Duration,
}

impl Handler<'_> {
    async fn run(&self) -> Result<Response, HookError> {
        let hook = self.call.hook;
        match hook {
            Hook::BeforeClusterCreate => {
                let ca = ensure_root_ca(self.ctx, &self.management, &self.key).await?;
                self.ensure_cluster_ca(&ca).await?;
                self.ensure_users().await?;
                Ok(Response::success(
                    hook,
                    format!(
                        "cluster {}: CA Secret {}/{} and registry users are in place",
                        self.key,
                        self.call.cluster.namespace(),
                        names::cluster_ca_secret(self.call.cluster.name())
                    ),
                ))
            }
            Hook::AfterControlPlaneInitialized => {
                let ca = ensure_root_ca(self.ctx, &self.management, &self.key).await?;
                self.ensure_cluster_ca(&ca).await?;
                let users = self.ensure_users().await?;
                let workload = self.workload().await?;
                self.deploy(&ca, &workload, &users, None).await?;
                Ok(Response::success(
                    hook,
                    format!(
                        "cluster {}: registry deployed ({})",
                        self.key,
                        self.deployer_name()
                    ),
                ))
            }
            Hook::BeforeClusterUpgrade => {
                let ca = ensure_root_ca(self.ctx, &self.management, &self.key).await?;
                self.ensure_cluster_ca(&ca).await?;
                let users = self.ensure_users().await?;
                let workload = self.workload().await?;
                let fraction = self.ctx.config.addon.renew_fraction;
                let hash = self.deploy(&ca, &workload, &users, Some(fraction)).await?;
                self.wait_ready(&workload, &hash).await
            }
            Hook::BeforeClusterDelete => self.cleanup().await,
            other => Ok(Response::failure(
                other,
                format!("{other} is not a lifecycle hook"),
            )),
        }
    }

    fn deployer_name(&self) -> &'static str {
        match self.deployer {
            Deployer::Helmchartproxy => "HelmChartProxy",
            Deployer::Direct => "applied directly",
        }
    }

    fn error_response(&self, e: HookError) -> Response {
        let hook = self.call.hook;
        let message = match &e {
            HookError::Kube(k) if k.place == Place::Management && k.is_unreachable() => {
                format!("cluster {}: management cluster unreachable: {e}", self.key)
            }
            _ => format!("cluster {}: {e}", self.key),
        };
        // An upgrade waits for the workload cluster rather than failing on a passing outage;
        // a create waits for the management cluster (an etcd restart, a throttled API).
        if hook == Hook::BeforeClusterUpgrade && e.is_transient() && e.on_workload() {
            return Response::retry(hook, RETRY_AFTER_SECONDS, message);
        }
        if hook == Hook::BeforeClusterCreate && e.is_transient() {
            return Response::retry(hook, RETRY_AFTER_SECONDS, message);
        }
        Response::failure(hook, message)
    }

    /// Applies `<cluster>-registry-addon-ca`; fails when it holds another CA than the root.
    async fn ensure_cluster_ca(&self, ca: &CertificateAuthority) -> Result<(), HookError> {
        let cluster = self.call.cluster;
        let desired = objects::cluster_ca_secret(cluster, ca.cert_pem());
        let name = names::cluster_ca_secret(cluster.name());
        let existing = self
            .management
            .get("v1", "Secret", Some(cluster.namespace()), &name)
            .await?;
        if let Some(existing) = &existing {
            if let Some(current) = secret_data(existing, "ca.crt").filter(|c| !c.trim().is_empty())
                && !ca.is_in_bundle(&current)
            {
                return Err(HookError::CaMismatch(format!(
                    "CA mismatch: secret {}/{name} holds a CA certificate that is not the root CA \
                     in secret {}/{} (was the cluster moved to another management cluster? copy \
                     its original root CA Secret there); no certificate was issued",
                    cluster.namespace(),
                    self.ctx.config.namespace,
                    names::ROOT_CA_SECRET
                )));
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
    async fn ensure_users(&self) -> Result<Users, HookError> {
        let cluster = self.call.cluster;
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
                HookError::Invalid(format!(
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
            return Err(HookError::Invalid(format!(
                "{rw_describe}: the users of the ro and rw Secrets must have different names, \
                 neither {:?}",
                names::SYNC_USER
            )));
        }
        let service_ip = self.service_ip()?;
        let hosts = objects::containerd_hosts_secret(
            cluster,
            &containerd::default_hosts_toml(service_ip, &ro.credentials),
        );
        if self.management.ensure(&hosts).await? == Outcome::Applied {
            info!(cluster = %self.key, secret = %k8s::ObjectId::of(&hosts), "applied the node containerd hosts Secret");
        }
        Ok(Users { ro, rw })
    }

    /// `registry-system/registry-auth`: the hashes of `ro` and `rw`, the sync identity and the
    /// shared HTTP secret, re-hashed only when a user Secret changed.
    async fn ensure_registry_auth(
        &self,
        workload: &ClusterApi,
        users: &Users,
    ) -> Result<(), HookError> {
        let ns = names::REGISTRY_NAMESPACE;
        let name = names::REGISTRY_AUTH_SECRET;
        if workload.ensure(&objects::registry_namespace()).await? == Outcome::Applied {
            info!(cluster = %self.key, namespace = ns, "applied the registry Namespace on the workload cluster");
        }
        let existing = workload.get("v1", "Secret", Some(ns), name).await?;
        let auth = RegistryAuth::desired(existing.as_ref(), &users.ro, &users.rw)
            .map_err(HookError::Invalid)?;
        if workload.converge(existing.as_ref(), &auth.secret()).await? == Outcome::Applied {
            info!(cluster = %self.key, secret = %format!("{ns}/{name}"), "applied the registry auth Secret on the workload cluster");
        }
        Ok(())
    }

    /// The workload cluster's API, from `<cluster>-kubeconfig`; the client is cached until
    /// the kubeconfig changes.
    async fn workload(&self) -> Result<ClusterApi, HookError> {
        let cluster = self.call.cluster;
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
                HookError::Invalid(format!(
                    "{describe}: not found; the workload cluster cannot be reached without it"
                ))
            })?;
        let kubeconfig = secret_data(&secret, names::KUBECONFIG_SECRET_KEY).ok_or_else(|| {
            HookError::Invalid(format!(
                "{describe}: key {} is missing or not UTF-8",
                names::KUBECONFIG_SECRET_KEY
            ))
        })?;
        let fingerprint: [u8; 32] = Sha256::digest(kubeconfig.as_bytes()).into();
        if let Some(client) = self.ctx.state.cached_workload(&self.key, &fingerprint) {
            return Ok(ClusterApi::new(client, Place::Workload));
        }
        let timeout = self.budget.mul_f64(0.5).max(Duration::from_secs(1));
        let client = k8s::client_from_kubeconfig(&kubeconfig, timeout)
            .await
            .map_err(|e| HookError::Invalid(format!("{describe}: {e}")))?;
        self.ctx
            .state
            .cache_workload(&self.key, fingerprint, client.clone());
        info!(cluster = %self.key, "built a client for the workload cluster");
        Ok(ClusterApi::new(client, Place::Workload))
    }

    fn service_ip(&self) -> Result<IpAddr, HookError> {
        self.call
            .registry
            .resolve_service_ip(self.call.cluster.service_cidrs())
            .map_err(|e| HookError::Invalid(e.to_string()))
    }

    /// Namespace, `registry-auth`, `registry-tls` (kept while usable, renewed inside the
    /// renewal window when `renew_fraction` is set) and the registry itself.
    async fn deploy(
        &self,
        ca: &CertificateAuthority,
        workload: &ClusterApi,
        users: &Users,
        renew_fraction: Option<f64>,
    ) -> Result<String, HookError> {
        if self.deployer == Deployer::Direct {
            self.check_no_helm_chart_proxy().await?;
        }
        self.ensure_registry_auth(workload, users).await?;
        let service_ip = self.service_ip()?;
        let subject = certs::registry_subject_names(self.call.registry.replicas, service_ip);

        let tls_name = names::REGISTRY_TLS_SECRET;
        let ns = names::REGISTRY_NAMESPACE;
        let existing = workload.get("v1", "Secret", Some(ns), tls_name).await?;
        let now = OffsetDateTime::now_utc();
        let kept = match &existing {
            None => Err("it does not exist"),
            Some(secret) => usable_certificate(secret, ca, &subject, now, renew_fraction),
        };
        let cert = match kept {
            Ok(cert) => cert,
            Err(reason) => {
                let algorithm = self.ctx.config.addon.key_algorithm;
                let cert = ca.issue_server(&subject, algorithm, now).map_err(|e| {
                    HookError::Invalid(format!("issuing the registry certificate: {e}"))
                })?;
                info!(cluster = %self.key, secret = %format!("{ns}/{tls_name}"), reason, "issued a registry server certificate");
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
        let secret = objects::registry_tls_secret(&cert, ca.cert_pem());
        if workload.converge(existing.as_ref(), &secret).await? == Outcome::Applied {
            info!(cluster = %self.key, secret = %format!("{ns}/{tls_name}"), "applied the registry TLS Secret on the workload cluster");
        }

        let hash = CertInfo::from_pem(&cert.cert_pem)
            .map_err(|e| HookError::Invalid(format!("registry certificate: {e}")))?
            .sha256_hex();
        let values = RegistryValues::new(
            &self.ctx.config.addon,
            self.call.registry,
            service_ip,
            hash.clone(),
        );
        match self.deployer {
            Deployer::Helmchartproxy => {
                let proxy =
                    objects::helm_chart_proxy(self.call.cluster, &self.ctx.config.addon, &values)
                        .map_err(|e| {
                        HookError::Invalid(format!("rendering the HelmChartProxy values: {e}"))
                    })?;
                // One GET, as `ensure` would do, that also tells a foreign object holding the
                // name: force-applying over it would take over someone else's release.
                let current = self.helm_chart_proxy().await?;
                if let Some(current) = &current
                    && !objects::is_own_helm_chart_proxy(current, self.call.cluster)
                {
                    return Err(HookError::DeployerConflict(format!(
                        "{}; the addon does not apply over it: rename or delete it and call again",
                        foreign_proxy(self.call.cluster)
                    )));
                }
                if self.management.converge(current.as_ref(), &proxy).await? == Outcome::Applied {
                    info!(cluster = %self.key, helmchartproxy = %k8s::ObjectId::of(&proxy), "applied the HelmChartProxy");
                }
            }
            Deployer::Direct => {
                for object in objects::direct_registry_objects(&values) {
                    if workload.ensure(&object).await? == Outcome::Applied {
                        info!(cluster = %self.key, object = %k8s::ObjectId::of(&object), "applied a registry object on the workload cluster");
                    }
                }
            }
        }
        Ok(hash)
    }

    /// Fails, before anything is applied to the workload cluster, while the HelmChartProxy
    /// named as the addon's for this cluster exists (even while it is being deleted). With
    /// it, CAAPH and the direct deployer would own the same objects, and its deletion makes
    /// CAAPH uninstall the release, taking the objects applied directly with it; lifecycle
    /// hooks are not called periodically, so nothing would put them back. It is never deleted
    /// here: that uninstalls the registry, the operator's call.
    async fn check_no_helm_chart_proxy(&self) -> Result<(), HookError> {
        match self.helm_chart_proxy().await? {
            None => Ok(()),
            Some(proxy) => Err(HookError::DeployerConflict(direct_deployer_blocked(
                &proxy,
                self.call.cluster,
            ))),
        }
    }

    /// The HelmChartProxy named as the addon's for the cluster, if any (also `None` on a
    /// management cluster without the add-on provider: no HelmChartProxy API at all).
    async fn helm_chart_proxy(&self) -> Result<Option<serde_json::Value>, HookError> {
        let cluster = self.call.cluster;
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

    /// Success once the StatefulSet `registry-system/registry` runs every replica of the
    /// current spec; otherwise a retry that says what is missing.
    async fn wait_ready(
        &self,
        workload: &ClusterApi,
        certificate_hash: &str,
    ) -> Result<Response, HookError> {
        let hook = self.call.hook;
        let ns = names::REGISTRY_NAMESPACE;
        let name = names::REGISTRY_NAME;
        let statefulset = workload
            .get("apps/v1", "StatefulSet", Some(ns), name)
            .await?;
        let wanted = u64::from(self.call.registry.replicas);
        let waiting = match &statefulset {
            None => Some("it does not exist yet".to_string()),
            Some(sts) => statefulset_not_ready(sts, wanted, certificate_hash),
        };
        Ok(match waiting {
            None => Response::success(
                hook,
                format!(
                    "cluster {}: registry is ready ({wanted} replicas)",
                    self.key
                ),
            ),
            Some(why) => Response::retry(
                hook,
                RETRY_AFTER_SECONDS,
                format!(
                    "cluster {}: waiting for statefulset {ns}/{name} on the workload cluster to be ready: {why}",
                    self.key
                ),
            ),
        })
    }

    /// Deletes the HelmChartProxy (its Helm release is uninstalled while the workload cluster
    /// still exists) and forgets the cluster. The cluster CA Secret goes with its ownerReference.
    async fn cleanup(&self) -> Result<Response, HookError> {
        let hook = self.call.hook;
        let cluster = self.call.cluster;
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
        }
        self.ctx.state.forget(&self.key);
        Ok(Response::success(
            hook,
            format!("cluster {}: registry addon cleaned up", self.key),
        ))
    }
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

/// The certificate in a `registry-tls` Secret when it can stay, else why it must be replaced.
fn usable_certificate(
    secret: &serde_json::Value,
    ca: &CertificateAuthority,
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
    if !info.is_signed_by(ca) {
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
