//! Leader election with a `coordination.k8s.io/v1` Lease, so that one replica of the
//! extension reconciles.
//!
//! The leader renews the Lease every `retry_period`; it stops leading when it could not renew
//! for `renew_deadline`, which is shorter than the lease duration, so it has stopped before
//! anyone may take over. A follower takes over when it has seen the Lease unchanged for its
//! whole duration, measured on its own clock from when it saw the record change (as client-go
//! does), so clock skew between replicas does not matter. Every write carries the
//! resourceVersion that was read: of two replicas racing for an expired Lease, one gets a 409
//! and stays a follower.
//!
//! The existing crates were considered: `kube-leader-election` needs kube 4, and
//! `kube-lease-manager` reads the system clock directly, so expiry could not be tested
//! without waiting for it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

use crate::controller::clock::{Clock, to_micro_time};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name (`registry-addon`).
    pub name: String,
    /// The extension's namespace.
    pub namespace: String,
    /// This replica: the pod name, or host name and a random suffix.
    pub identity: String,
    pub lease_duration: Duration,
    /// Give up leading when renewals have failed for this long.
    pub renew_deadline: Duration,
    /// How often to renew, or to try to acquire.
    pub retry_period: Duration,
}

impl LeaseConfig {
    pub fn new(name: &str, namespace: &str, identity: String) -> LeaseConfig {
        LeaseConfig {
            name: name.to_string(),
            namespace: namespace.to_string(),
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(5),
        }
    }
}

/// This replica's name in the Lease: `$POD_NAME`, else the host name with a random suffix
/// (two processes on one host must not share an identity).
pub fn default_identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "registry-addon".to_string());
    format!("{host}-{}", random_suffix())
}

fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{:08x}", hasher.finish() as u32)
}

/// What a follower last saw of the Lease, and when (on its own clock).
#[derive(Debug, Clone)]
struct Observed {
    resource_version: String,
    at: SystemTime,
}

/// One replica's side of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    clock: Arc<dyn Clock>,
    observed: Option<Observed>,
    last_renewal: Option<SystemTime>,
    leading: bool,
}

impl LeaderElector {
    pub fn new(client: kube::Client, config: LeaseConfig, clock: Arc<dyn Clock>) -> LeaderElector {
        LeaderElector {
            api: Api::namespaced(client, &config.namespace),
            config,
            clock,
            observed: None,
            last_renewal: None,
            leading: false,
        }
    }

    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    pub fn is_leading(&self) -> bool {
        self.leading
    }

    /// One round: acquire, renew, or observe. Returns whether this replica leads now.
    pub async fn step(&mut self) -> bool {
        let now = self.clock.now();
        match self.try_step(now).await {
            Ok(leading) => {
                if leading {
                    self.last_renewal = Some(now);
                }
                if leading != self.leading {
                    tracing::info!(
                        identity = %self.config.identity,
                        lease = %format!("{}/{}", self.config.namespace, self.config.name),
                        leading,
                        "leadership changed"
                    );
                }
                self.leading = leading;
            }
            Err(e) => {
                let lease = format!("{}/{}", self.config.namespace, self.config.name);
                tracing::warn!(%lease, error = %e, "cannot read or renew the Lease");
                if self.leading && !self.within_deadline(now) {
                    tracing::warn!(%lease, identity = %self.config.identity, "renewal deadline passed: no longer leading");
                    self.leading = false;
                }
            }
        }
        self.leading
    }

    fn within_deadline(&self, now: SystemTime) -> bool {
        self.last_renewal.is_some_and(|at| {
            now.duration_since(at)
                .is_ok_and(|elapsed| elapsed < self.config.renew_deadline)
        })
    }

    async fn try_step(&mut self, now: SystemTime) -> Result<bool, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.config.name).await? else {
            return self.create(now).await;
        };
        let resource_version = lease.metadata.resource_version.clone().unwrap_or_default();
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if self
            .observed
            .as_ref()
            .is_none_or(|o| o.resource_version != resource_version)
        {
            self.observed = Some(Observed {
                resource_version: resource_version.clone(),
                at: now,
            });
        }
        if holder.as_deref() == Some(self.config.identity.as_str()) {
            if !self.leading {
                // Our own identity from an earlier life (a restarted container): nobody
                // else holds it, take it back.
                return self.take_over(lease, spec, now).await;
            }
            let mut renewed = lease;
            let mut spec = spec;
            spec.renew_time = Some(to_micro_time(now));
            spec.lease_duration_seconds = Some(self.duration_seconds());
            renewed.spec = Some(spec);
            return self.replace(renewed).await;
        }
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.config.lease_duration);
        let expired = holder.is_none()
            || self.observed.as_ref().is_some_and(|o| {
                now.duration_since(o.at)
                    .is_ok_and(|elapsed| elapsed >= duration)
            });
        if !expired {
            return Ok(false);
        }
        self.take_over(lease, spec, now).await
    }

    async fn take_over(
        &mut self,
        mut lease: Lease,
        mut spec: LeaseSpec,
        now: SystemTime,
    ) -> Result<bool, kube::Error> {
        spec.holder_identity = Some(self.config.identity.clone());
        spec.acquire_time = Some(to_micro_time(now));
        spec.renew_time = Some(to_micro_time(now));
        spec.lease_duration_seconds = Some(self.duration_seconds());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        lease.spec = Some(spec);
        self.replace(lease).await
    }

    async fn create(&mut self, now: SystemTime) -> Result<bool, kube::Error> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.config.name.clone()),
                namespace: Some(self.config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.config.identity.clone()),
                acquire_time: Some(to_micro_time(now)),
                renew_time: Some(to_micro_time(now)),
                lease_duration_seconds: Some(self.duration_seconds()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(created) => {
                self.observe_own(&created);
                Ok(true)
            }
            // Another replica created it first.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A write with the resourceVersion read: a 409 means someone else wrote first.
    async fn replace(&mut self, lease: Lease) -> Result<bool, kube::Error> {
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observe_own(&written);
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn observe_own(&mut self, lease: &Lease) {
        self.observed = Some(Observed {
            resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
            at: self.clock.now(),
        });
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// Gives the Lease up (on shutdown) so that another replica takes over at once.
    pub async fn release(&mut self) {
        if !self.leading {
            return;
        }
        self.leading = false;
        let lease = format!("{}/{}", self.config.namespace, self.config.name);
        let Ok(Some(mut current)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let mut spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = Some(to_micro_time(self.clock.now()));
        spec.lease_duration_seconds = Some(1);
        current.spec = Some(spec);
        if let Err(e) = self
            .api
            .replace(&self.config.name, &PostParams::default(), &current)
            .await
        {
            tracing::warn!(%lease, error = %e, "cannot release the Lease; another replica takes over once it expires");
        }
    }

    /// Runs the election until `shutdown` turns true, publishing whether this replica leads.
    /// Releases the Lease on the way out.
    pub async fn run(mut self, leading: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let now_leading = self.step().await;
            leading.send_if_modified(|l| std::mem::replace(l, now_leading) != now_leading);
            tokio::select! {
                _ = tokio::time::sleep(self.config.retry_period) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        leading.send_replace(false);
        self.release().await;
    }
}
