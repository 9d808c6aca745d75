//! The day-2 controller in `serve`: watches Clusters, and reconciles each one on every change
//! of its spec and every resync, one at a time per cluster, only on the replica holding the
//! Lease. What "reconcile" means is injected ([`Reconciler`]); this module owns when it runs,
//! the `ClusterRegistry` it shows, the events and the metrics.
//!
//! - [`clusters`]: the Cluster watch (metadata only) and the served version;
//! - [`queue`]: per-cluster work queue with dedupe, bounded concurrency and backoff;
//! - [`lease`]: leader election;
//! - [`status`]: the `ClusterRegistry` types, condition builder and writer;
//! - [`metrics`]: the controller's metrics;
//! - [`clock`]: the injected clock.

pub mod clock;
pub mod clusters;
pub mod lease;
pub mod metrics;
pub mod queue;
pub mod status;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, DynamicObject};
use kube::core::ApiResource;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::controller::clock::Clock;
use crate::controller::lease::{LeaderElector, LeaseConfig};
use crate::controller::metrics::ControllerMetrics;
use crate::controller::queue::{Next, QueueConfig, WorkQueue};
use crate::controller::status::{ClusterRef, ClusterRegistryStatus, StatusWriter};

/// Name of the Lease in the extension's namespace.
pub const LEASE_NAME: &str = "registry-addon";
/// `reportingController` of the controller's Events.
pub const EVENT_REPORTER: &str = "registry-addon";

/// A Cluster, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterKey {
    pub namespace: String,
    pub name: String,
}

impl ClusterKey {
    pub fn new(namespace: &str, name: &str) -> ClusterKey {
        ClusterKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl std::fmt::Display for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Makes one Cluster's registry match its variable. The addon's converge path implements it;
/// the controller calls it for each Cluster, never twice at once for the same one.
pub trait Reconciler: Send + Sync + 'static {
    /// `cluster` is the whole Cluster object as the API server returned it (with
    /// `apiVersion` and `kind`), fetched just before the call. A Cluster being deleted is not
    /// passed: BeforeClusterDelete owns it.
    fn reconcile(
        &self,
        cluster: &Value,
    ) -> impl Future<Output = Result<ReconcileOutcome, ReconcileError>> + Send;
}

/// What the `ClusterRegistry` of a cluster should become.
#[derive(Debug, Clone, PartialEq)]
pub enum StatusReport {
    /// The addon is on: keep a `ClusterRegistry` showing this (written only on a difference).
    Present(ClusterRegistryStatus),
    /// The addon is off for this cluster: no `ClusterRegistry`.
    Absent,
    /// Leave the `ClusterRegistry` as it is.
    Unchanged,
}

/// An action the reconcile took, published as an Event on the Cluster ("certificate
/// renewed", "deployed", "removed", "switch refused").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEvent {
    pub warning: bool,
    /// CamelCase: `CertificateRenewed`, `Deployed`, `Removed`, `SwitchRefused`.
    pub reason: String,
    /// CamelCase verb of what was done: `Renew`, `Deploy`, `Remove`, `Switch`.
    pub action: String,
    pub message: String,
}

/// The result of one successful reconcile.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconcileOutcome {
    pub status: StatusReport,
    /// Reconcile again after this long at the latest, e.g. when the certificate's renewal
    /// window opens; the resync period applies when it is longer or absent.
    pub requeue_after: Option<Duration>,
    pub events: Vec<ClusterEvent>,
}

impl ReconcileOutcome {
    pub fn new(status: StatusReport) -> ReconcileOutcome {
        ReconcileOutcome {
            status,
            requeue_after: None,
            events: Vec::new(),
        }
    }
}

/// A reconcile that failed and is retried with this cluster's backoff. `status`, when given,
/// is written first (e.g. `Ready=False` saying what failed).
#[derive(Debug)]
pub struct ReconcileError {
    pub error: anyhow::Error,
    pub status: Option<ClusterRegistryStatus>,
}

impl ReconcileError {
    pub fn new(error: impl Into<anyhow::Error>) -> ReconcileError {
        ReconcileError {
            error: error.into(),
            status: None,
        }
    }

    pub fn with_status(mut self, status: ClusterRegistryStatus) -> ReconcileError {
        self.status = Some(status);
        self
    }
}

impl From<anyhow::Error> for ReconcileError {
    fn from(error: anyhow::Error) -> Self {
        ReconcileError::new(error)
    }
}

impl From<kube::Error> for ReconcileError {
    fn from(error: kube::Error) -> Self {
        ReconcileError::new(error)
    }
}

impl std::fmt::Display for ReconcileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Watched namespaces; empty: all.
    pub namespaces: Vec<String>,
    /// Every cluster is reconciled at least this often.
    pub resync: Duration,
    pub queue: QueueConfig,
    pub lease: LeaseConfig,
}

impl ControllerConfig {
    pub fn new(extension_namespace: &str, namespaces: Vec<String>, resync: Duration) -> Self {
        ControllerConfig {
            namespaces,
            resync,
            queue: QueueConfig::default(),
            lease: LeaseConfig::new(LEASE_NAME, extension_namespace, lease::default_identity()),
        }
    }
}

/// A started controller.
pub struct Controller {
    /// Whether this replica leads (and so reconciles).
    pub leading: watch::Receiver<bool>,
    shutdown: watch::Sender<bool>,
    election: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl Controller {
    /// Starts leader election, the Cluster watch and the work queue. Fails only when no
    /// Cluster version is served (Cluster API is not installed) or the API server cannot be
    /// asked.
    pub async fn start<R: Reconciler>(
        client: kube::Client,
        config: ControllerConfig,
        reconciler: Arc<R>,
        metrics: Arc<ControllerMetrics>,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Controller> {
        let resource = clusters::served_cluster_resource(&client, &config.namespaces)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot list Clusters ({}.{} {}): {e}",
                    "clusters",
                    clusters::CLUSTER_GROUP,
                    clusters::CLUSTER_VERSIONS.join(" or ")
                )
            })?;
        tracing::info!(
            version = %resource.api_version,
            namespaces = ?config.namespaces,
            resync = ?config.resync,
            identity = %config.lease.identity,
            "controller starting"
        );
        let (leading_tx, leading) = watch::channel(false);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let elector = LeaderElector::new(client.clone(), config.lease.clone(), clock.clone());
        let election = tokio::spawn(elector.run(leading_tx, shutdown_rx));

        let worker = Arc::new(Worker {
            clusters: resource.clone(),
            client: client.clone(),
            writer: StatusWriter::new(client.clone()),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: EVENT_REPORTER.into(),
                    instance: Some(config.lease.identity.clone()),
                },
            ),
            reconciler,
            metrics: metrics.clone(),
            resync: config.resync,
        });
        let (queue, queue_task) = WorkQueue::start(config.queue.clone(), leading.clone(), {
            let worker = worker.clone();
            move |key: ClusterKey| {
                let worker = worker.clone();
                async move { worker.run(&key).await }
            }
        });
        let watch_task = tokio::spawn(clusters::watch_clusters(
            client,
            resource,
            config.namespaces.clone(),
            queue,
            move |key: &ClusterKey| metrics.forget_cluster(key),
        ));
        Ok(Controller {
            leading,
            shutdown,
            election,
            tasks: vec![queue_task, watch_task],
        })
    }

    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Stops reconciling and releases the Lease, so that another replica takes over at once.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in &self.tasks {
            task.abort();
        }
        let _ = self.election.await;
    }

    /// Stops everything without releasing the Lease, as a crash would.
    pub fn abort(self) {
        self.election.abort();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One cluster's run: GET the Cluster, reconcile, write the status, publish the events.
struct Worker<R> {
    clusters: ApiResource,
    client: kube::Client,
    writer: StatusWriter,
    recorder: Recorder,
    reconciler: Arc<R>,
    metrics: Arc<ControllerMetrics>,
    resync: Duration,
}

impl<R: Reconciler> Worker<R> {
    async fn run(&self, key: &ClusterKey) -> Next {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &key.namespace, &self.clusters);
        let cluster = match api.get_opt(&key.name).await {
            Ok(Some(cluster)) => cluster,
            // Deleted since it was queued: the watch forgets it.
            Ok(None) => return Next::Idle,
            Err(e) => {
                tracing::warn!(cluster = %key, error = %e, "cannot read the Cluster");
                return Next::Retry;
            }
        };
        if cluster.metadata.deletion_timestamp.is_some() {
            return Next::Idle;
        }
        let cluster_ref = ClusterRef {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            uid: cluster.metadata.uid.clone().unwrap_or_default(),
            api_version: self.clusters.api_version.clone(),
        };
        let reference = ObjectReference {
            api_version: Some(self.clusters.api_version.clone()),
            kind: Some("Cluster".into()),
            name: Some(key.name.clone()),
            namespace: Some(key.namespace.clone()),
            uid: cluster.metadata.uid.clone(),
            ..ObjectReference::default()
        };
        let object = match serde_json::to_value(&cluster) {
            Ok(object) => object,
            Err(e) => {
                tracing::error!(cluster = %key, error = %e, "cannot encode the Cluster");
                return Next::Retry;
            }
        };
        drop(cluster);
        let started = Instant::now();
        let result = self.reconciler.reconcile(&object).await;
        drop(object);
        let next = match result {
            Ok(outcome) => {
                let written = self.write(key, &cluster_ref, outcome.status).await;
                for event in &outcome.events {
                    self.publish(key, &reference, event).await;
                }
                if written {
                    let after = outcome
                        .requeue_after
                        .map_or(self.resync, |d| d.min(self.resync));
                    Next::After(after)
                } else {
                    Next::Retry
                }
            }
            Err(e) => {
                tracing::warn!(cluster = %key, error = %e, "reconcile failed; retrying with backoff");
                if let Some(status) = e.status {
                    self.write(key, &cluster_ref, StatusReport::Present(status))
                        .await;
                }
                Next::Retry
            }
        };
        self.metrics.observe_reconcile(
            matches!(next, Next::After(_)),
            started.elapsed().as_secs_f64(),
        );
        next
    }

    /// Writes the ClusterRegistry; false when that failed.
    async fn write(&self, key: &ClusterKey, cluster: &ClusterRef, report: StatusReport) -> bool {
        let result = match &report {
            StatusReport::Present(status) => {
                let not_after = status
                    .certificate
                    .as_ref()
                    .and_then(|c| c.not_after.as_ref())
                    .map(|t| {
                        SystemTime::UNIX_EPOCH + Duration::from_secs(t.0.as_second().max(0) as u64)
                    });
                self.metrics
                    .set_cluster(key, Some(status.ready()), not_after);
                self.writer.write(cluster, status.clone()).await
            }
            StatusReport::Absent => {
                self.metrics.set_cluster(key, None, None);
                self.writer.remove(cluster).await
            }
            StatusReport::Unchanged => return true,
        };
        match result {
            Ok(written) => {
                if written != status::Written::Unchanged {
                    tracing::debug!(cluster = %key, ?written, "ClusterRegistry written");
                }
                true
            }
            Err(e) => {
                tracing::warn!(cluster = %key, error = %e, "cannot write the ClusterRegistry {key}");
                false
            }
        }
    }

    async fn publish(&self, key: &ClusterKey, reference: &ObjectReference, event: &ClusterEvent) {
        let published = KubeEvent {
            type_: if event.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: event.reason.clone(),
            note: Some(event.message.clone()),
            action: event.action.clone(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&published, reference).await {
            tracing::warn!(cluster = %key, reason = %event.reason, error = %e, "cannot publish an Event on the Cluster");
        }
    }
}

/// `serve`'s controller: started once Cluster API answers (retried every 30 s until then),
/// stopped with the Lease released when `shutdown` turns true.
pub async fn run_until<R: Reconciler>(
    client: kube::Client,
    config: ControllerConfig,
    reconciler: Arc<R>,
    metrics: Arc<ControllerMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let clock: Arc<dyn Clock> = Arc::new(clock::SystemClock);
    let controller = loop {
        match Controller::start(
            client.clone(),
            config.clone(),
            reconciler.clone(),
            metrics.clone(),
            clock.clone(),
        )
        .await
        {
            Ok(controller) => break controller,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "controller not started; retrying in 30s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        }
    };
    let _ = shutdown.wait_for(|stop| *stop).await;
    controller.shutdown().await;
}
