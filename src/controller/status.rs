//! The `ClusterRegistry` status object (`clusterregistries.registry-addon.io/v1alpha1`): its
//! Rust types, the one builder of its conditions, and the writer that changes it only when
//! what it shows differs.

use std::time::SystemTime;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::controller::clock::to_k8s_time;
use crate::names;

pub const GROUP: &str = "registry-addon.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "ClusterRegistry";
pub const PLURAL: &str = "clusterregistries";

/// Condition types. `Ready` sums up the others.
pub const READY: &str = "Ready";
pub const CERTIFICATE_READY: &str = "CertificateReady";
pub const REGISTRY_READY: &str = "RegistryReady";
/// Every node carries the current node configuration (SPEC §9.4).
pub const NODES_CONFIGURED: &str = "NodesConfigured";
/// Every node reaches the mirror, as its agent reports in `RegistryMirrorReady`.
pub const NODES_MIRROR_READY: &str = "NodesMirrorReady";
/// The mode the variable asks for is the one deployed (False while a switch waits or is
/// refused, with reason `TransitionNotSupported` for the latter).
pub const MODE_READY: &str = "ModeReady";
/// The target of a switch serves every image in use that it will be asked for.
pub const TARGET_READY: &str = "TargetReady";

/// The API resource of `ClusterRegistry`.
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
}

/// What a `ClusterRegistry` shows. Nothing in it changes unless the cluster's registry does:
/// no timestamps but the conditions' transition times.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRegistryStatus {
    /// The Cluster generation this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The effective mode (`Local`, `Proxy`, `Direct`, `Unmanaged`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The mode the variable asks for, while a switch to it is under way or refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_mode: Option<String>,
    /// Desired replicas of the workload StatefulSet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Ready replicas of the workload StatefulSet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// `ready/desired`, for the REPLICAS column (a printer column shows one JSONPath).
    /// Derived from the two fields above by the writer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_ready: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Box<NodesStatus>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The workload cluster's nodes and their mirror configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodesStatus {
    pub total: i32,
    /// `carrying/total`: nodes that applied the current node configuration.
    pub configured: String,
    /// `transition` or `final`.
    pub phase: String,
    /// Nodes whose `RegistryMirrorReady` is True.
    pub mirror_ready: i32,
}

/// The registry's serving certificate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Time>,
    /// When the renewal window opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_after: Option<Time>,
}

impl ClusterRegistryStatus {
    /// The condition of a type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// `True`, `False` or `Unknown`: the `Ready` condition's status.
    pub fn ready(&self) -> &str {
        self.condition(READY)
            .map_or("Unknown", |c| c.status.as_str())
    }

    fn with_derived_fields(mut self) -> Self {
        self.replicas_ready = match (self.ready_replicas, self.replicas) {
            (ready, Some(desired)) => Some(format!("{}/{desired}", ready.unwrap_or(0))),
            _ => None,
        };
        self
    }
}

/// A condition's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(ok: bool) -> Self {
        if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    }
}

/// The one builder of a `ClusterRegistry`'s conditions.
///
/// Reasons are CamelCase (`CertificateValid`, `InvalidConfiguration`); messages say what is
/// wrong and what to do ("certificate expires 2027-03-01; renewal starts 2026-11-30"). Each
/// type appears once: setting it again replaces it. The transition times are settled by
/// [`keep_transition_times`] against what the object already shows.
#[derive(Debug, Clone)]
pub struct Conditions {
    observed_generation: Option<i64>,
    now: SystemTime,
    items: Vec<Condition>,
}

impl Conditions {
    pub fn new(observed_generation: Option<i64>, now: SystemTime) -> Conditions {
        Conditions {
            observed_generation,
            now,
            items: Vec::new(),
        }
    }

    /// Sets a condition. A reason that is not CamelCase is reduced to its letters and digits:
    /// the API server would refuse it.
    pub fn set(
        &mut self,
        type_: &str,
        status: impl Into<ConditionStatus>,
        reason: &str,
        message: impl Into<String>,
    ) -> &mut Self {
        debug_assert!(
            is_reason(reason),
            "condition reason {reason:?} is not CamelCase"
        );
        let reason = if is_reason(reason) {
            reason.to_string()
        } else {
            let cleaned: String = reason.chars().filter(char::is_ascii_alphanumeric).collect();
            if cleaned.starts_with(|c: char| c.is_ascii_alphabetic()) {
                cleaned
            } else {
                "Unknown".to_string()
            }
        };
        let condition = Condition {
            type_: type_.to_string(),
            status: status.into().as_str().to_string(),
            reason,
            message: message.into(),
            observed_generation: self.observed_generation,
            last_transition_time: to_k8s_time(self.now),
        };
        match self.items.iter_mut().find(|c| c.type_ == type_) {
            Some(existing) => *existing = condition,
            None => self.items.push(condition),
        }
        self
    }

    /// Sets `Ready` from the other conditions: `True` when all are, else `False` with the
    /// first one that is not (its reason and message), unless `Ready` was set explicitly.
    pub fn summarize(&mut self) -> &mut Self {
        if self.items.iter().any(|c| c.type_ == READY) {
            return self;
        }
        let first_bad = self
            .items
            .iter()
            .find(|c| c.status != "True")
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
        let (status, reason, message) = match first_bad {
            Some((status, reason, message)) => {
                let status = if status == "Unknown" {
                    ConditionStatus::Unknown
                } else {
                    ConditionStatus::False
                };
                (status, reason, message)
            }
            None => (
                ConditionStatus::True,
                "RegistryAvailable".to_string(),
                "the registry is deployed, ready and serving a valid certificate".to_string(),
            ),
        };
        self.set(READY, status, &reason, message);
        // Ready first, as `kubectl describe` readers look for it.
        if let Some(index) = self.items.iter().position(|c| c.type_ == READY) {
            let ready = self.items.remove(index);
            self.items.insert(0, ready);
        }
        self
    }

    pub fn build(&self) -> Vec<Condition> {
        self.items.clone()
    }
}

/// `metav1.Condition.reason`: `^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$`, and CamelCase here.
pub fn is_reason(reason: &str) -> bool {
    let mut chars = reason.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase()) && chars.all(|c| c.is_ascii_alphanumeric())
}

/// A condition whose status did not change keeps the transition time it has on the object,
/// so that an unchanged cluster's status stays byte-for-byte the same.
pub fn keep_transition_times(conditions: &mut [Condition], previous: &[Condition]) {
    for condition in conditions {
        if let Some(before) = previous.iter().find(|p| p.type_ == condition.type_)
            && before.status == condition.status
        {
            condition.last_transition_time = before.last_transition_time.clone();
        }
    }
}

/// The Cluster a `ClusterRegistry` belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `cluster.x-k8s.io/v1beta2` or `…/v1beta1`, as served.
    pub api_version: String,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Unchanged,
    Created,
    Updated,
    Deleted,
}

/// Keeps one `ClusterRegistry` per Cluster in step with what the reconciler reports, making
/// write requests only for a difference.
#[derive(Clone)]
pub struct StatusWriter {
    client: kube::Client,
    resource: ApiResource,
}

impl StatusWriter {
    pub fn new(client: kube::Client) -> StatusWriter {
        StatusWriter {
            client,
            resource: api_resource(),
        }
    }

    fn api(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &self.resource)
    }

    /// Makes the `ClusterRegistry` of `cluster` show `desired`: created with an ownerRef to
    /// the Cluster when absent, its status patched only when it differs.
    pub async fn write(
        &self,
        cluster: &ClusterRef,
        desired: ClusterRegistryStatus,
    ) -> Result<Written, kube::Error> {
        let api = self.api(&cluster.namespace);
        let mut desired = desired.with_derived_fields();
        let existing = api.get_opt(&cluster.name).await?;
        let mut written = Written::Unchanged;
        let current = match &existing {
            Some(object) if owned_by(object, cluster) => {
                object.data.get("status").cloned().unwrap_or_default()
            }
            _ => {
                api.patch(
                    &cluster.name,
                    &PatchParams::apply(names::FIELD_MANAGER).force(),
                    &Patch::Apply(self.skeleton(cluster)),
                )
                .await?;
                written = Written::Created;
                existing
                    .as_ref()
                    .and_then(|o| o.data.get("status").cloned())
                    .unwrap_or_default()
            }
        };
        // A status this writer cannot read is rewritten whole.
        let current: ClusterRegistryStatus = serde_json::from_value(current).unwrap_or_default();
        keep_transition_times(&mut desired.conditions, &current.conditions);
        if current == desired && written == Written::Unchanged {
            return Ok(Written::Unchanged);
        }
        if current != desired {
            let body = json!({
                "apiVersion": self.resource.api_version,
                "kind": KIND,
                "metadata": {"name": cluster.name, "namespace": cluster.namespace},
                "status": desired,
            });
            api.patch_status(
                &cluster.name,
                &PatchParams::apply(names::FIELD_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await?;
            if written == Written::Unchanged {
                written = Written::Updated;
            }
        }
        Ok(written)
    }

    /// Removes the `ClusterRegistry` of a cluster whose addon is off; no request beyond the
    /// GET when there is none.
    pub async fn remove(&self, cluster: &ClusterRef) -> Result<Written, kube::Error> {
        let api = self.api(&cluster.namespace);
        match api.get_metadata_opt(&cluster.name).await? {
            None => Ok(Written::Unchanged),
            Some(_) => match api.delete(&cluster.name, &DeleteParams::default()).await {
                Ok(_) => Ok(Written::Deleted),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(Written::Unchanged),
                Err(e) => Err(e),
            },
        }
    }

    /// The object without status: name, labels and the ownerRef to its Cluster. Spec is
    /// absent: the Cluster's variable is the one source of truth.
    fn skeleton(&self, cluster: &ClusterRef) -> serde_json::Value {
        json!({
            "apiVersion": self.resource.api_version,
            "kind": KIND,
            "metadata": {
                "name": cluster.name,
                "namespace": cluster.namespace,
                "labels": {names::CLUSTER_NAME_LABEL: cluster.name},
                "ownerReferences": [{
                    "apiVersion": cluster.api_version,
                    "kind": "Cluster",
                    "name": cluster.name,
                    "uid": cluster.uid,
                    "controller": true,
                }],
            },
        })
    }
}

fn owned_by(object: &DynamicObject, cluster: &ClusterRef) -> bool {
    object
        .metadata
        .owner_references
        .as_ref()
        .is_some_and(|refs| {
            refs.iter()
                .any(|r| r.uid == cluster.uid && r.kind == "Cluster")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    #[test]
    fn ready_sums_up_the_first_condition_that_is_not_true() {
        let mut conditions = Conditions::new(Some(3), at(0));
        conditions
            .set(
                CERTIFICATE_READY,
                true,
                "CertificateValid",
                "certificate expires 2027-03-01; renewal starts 2026-11-30",
            )
            .set(
                REGISTRY_READY,
                false,
                "ReplicasNotReady",
                "2 of 3 replicas ready; registry-2: ImagePullBackOff",
            )
            .summarize();
        let built = conditions.build();
        assert_eq!(built[0].type_, READY);
        assert_eq!(built[0].status, "False");
        assert_eq!(built[0].reason, "ReplicasNotReady");
        assert_eq!(built[0].observed_generation, Some(3));
        assert_eq!(built.len(), 3);

        let mut all_good = Conditions::new(Some(3), at(0));
        all_good
            .set(CERTIFICATE_READY, true, "CertificateValid", "ok")
            .summarize();
        assert_eq!(all_good.build()[0].status, "True");
    }

    #[test]
    fn setting_a_type_again_replaces_it_and_bad_reasons_are_cleaned() {
        let mut conditions = Conditions::new(None, at(0));
        conditions.set(REGISTRY_READY, false, "Deploying", "first");
        conditions.set(REGISTRY_READY, true, "ReplicasReady", "second");
        let built = conditions.build();
        assert_eq!(built.len(), 1);
        assert_eq!(built[0].message, "second");
        assert!(is_reason("InvalidConfiguration"));
        assert!(!is_reason("invalid configuration"));
        assert!(!is_reason("9Lives"));
    }

    #[test]
    fn transition_time_moves_only_when_the_status_does() {
        let mut before = Conditions::new(Some(1), at(0));
        before.set(CERTIFICATE_READY, true, "CertificateValid", "a");
        before.set(REGISTRY_READY, false, "ReplicasNotReady", "1 of 2");
        let previous = before.build();

        let mut after = Conditions::new(Some(2), at(600));
        after.set(CERTIFICATE_READY, true, "CertificateValid", "a, reworded");
        after.set(REGISTRY_READY, true, "ReplicasReady", "2 of 2");
        let mut next = after.build();
        keep_transition_times(&mut next, &previous);
        assert_eq!(
            next[0].last_transition_time,
            previous[0].last_transition_time
        );
        assert_eq!(next[1].last_transition_time, to_k8s_time(at(600)));
    }

    #[test]
    fn replicas_column_is_derived_and_status_round_trips() {
        let status = ClusterRegistryStatus {
            observed_generation: Some(4),
            mode: Some("Local".into()),
            replicas: Some(3),
            ready_replicas: Some(2),
            certificate: Some(CertificateStatus {
                not_after: Some(to_k8s_time(at(86_400))),
                renew_after: Some(to_k8s_time(at(3_600))),
            }),
            ..Default::default()
        }
        .with_derived_fields();
        assert_eq!(status.replicas_ready.as_deref(), Some("2/3"));
        let value = serde_json::to_value(&status).unwrap();
        assert_eq!(value["readyReplicas"], 2);
        assert_eq!(value["certificate"]["notAfter"], "2027-01-16T08:00:00Z");
        assert!(value.get("targetMode").is_none());
        let back: ClusterRegistryStatus = serde_json::from_value(value).unwrap();
        assert_eq!(back, status);
    }
}
