//! The controller's [`Reconciler`]: the converge steps of [`crate::addon::converge`] run for
//! one Cluster between hooks, and what they found as a `ClusterRegistry` status.
//!
//! - addon off: the addon's workload objects are removed (never PVCs), no `ClusterRegistry`;
//! - invalid variable: `Ready=False`, reason `InvalidConfiguration`, nothing written;
//! - control plane not initialized: only the management-side steps;
//! - no `<cluster>-kubeconfig` yet: a waiting condition, looked at again later;
//! - otherwise what BeforeClusterUpgrade does, without waiting for readiness: the status shows
//!   it, and the cluster is reconciled again when its certificate's renewal window opens.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use time::OffsetDateTime;

use crate::addon::converge::{
    Converge, ConvergeError, Deployed, ModeDecision, Readiness, Scope, SwitchState,
};
use crate::addon::rollout::{self, Progress, RolloutState};
use crate::addon::switch::TargetCheck;
use crate::controller::clock::{Clock, to_k8s_time};
use crate::controller::status::{
    CERTIFICATE_READY, CertificateStatus, ClusterRegistryStatus, ConditionStatus, Conditions,
    MODE_READY, NODES_CONFIGURED, NODES_MIRROR_READY, NodesStatus, READY, REGISTRY_READY,
    TARGET_READY,
};
use crate::controller::{ClusterEvent, ReconcileError, ReconcileOutcome, Reconciler, StatusReport};
use crate::hooks::{HookContext, Management};
use crate::k8s::Place;
use crate::names;
use crate::wire::cluster::Cluster;
use crate::wire::variable::registry_from_config;

/// The effective mode while only the in-cluster registry exists.
pub const MODE_LOCAL: &str = "Local";
/// How long one reconcile may take.
const BUDGET: Duration = Duration::from_secs(30);
/// How soon a cluster waiting for its control plane or kubeconfig is looked at again: CAPI
/// changes those in the Cluster's status, which does not queue it.
pub const WAIT_REQUEUE: Duration = Duration::from_secs(30);
/// How soon a registry that is not ready yet is looked at again.
pub const READINESS_REQUEUE: Duration = Duration::from_secs(15);
/// How soon a node rollout is looked at again: the nodes' acks do not queue the Cluster.
pub const ROLLOUT_REQUEUE: Duration = Duration::from_secs(5);

/// Reconciles Clusters with the hooks' context: the same configuration, management client,
/// per-cluster locks and workload clients.
pub struct AddonReconciler {
    ctx: Arc<HookContext>,
    clock: Arc<dyn Clock>,
}

impl AddonReconciler {
    pub fn new(ctx: Arc<HookContext>, clock: Arc<dyn Clock>) -> AddonReconciler {
        AddonReconciler { ctx, clock }
    }
}

impl Reconciler for AddonReconciler {
    async fn reconcile(&self, object: &Value) -> Result<ReconcileOutcome, ReconcileError> {
        let cluster = Cluster::from_value(object).map_err(|e| anyhow::anyhow!("{e}"))?;
        let key = cluster.key();
        let client = match &self.ctx.management {
            Management::Client(client) => client.clone(),
            Management::Unavailable(reason) => {
                return Err(anyhow::anyhow!(
                    "cluster {key}: management cluster unreachable: {reason}"
                )
                .into());
            }
        };
        let lock = self.ctx.state.cluster_lock(&key);
        let work = async {
            let _guard = lock.lock().await;
            let scope = Scope::new(
                &self.ctx.config,
                &self.ctx.state,
                client,
                &cluster,
                self.ctx.config.addon.deployer,
                BUDGET,
            );
            self.run(object, scope).await
        };
        match tokio::time::timeout(BUDGET, work).await {
            Ok(result) => result,
            Err(_) => Err(anyhow::anyhow!(
                "cluster {key}: reconcile did not finish within {}s",
                BUDGET.as_secs()
            )
            .into()),
        }
    }
}

impl AddonReconciler {
    async fn run(
        &self,
        object: &Value,
        scope: Scope<'_>,
    ) -> Result<ReconcileOutcome, ReconcileError> {
        let key = scope.key.clone();
        let now = self.clock.now();
        let generation = object["metadata"]["generation"].as_i64();
        let mut report = Report {
            generation,
            now,
            mode: MODE_LOCAL.to_string(),
        };
        let variable = &self.ctx.config.addon.variable_name;
        let registry = match registry_from_config(scope.cluster.variable(variable)) {
            Ok(Some(registry)) => registry,
            // Nothing can have been deployed before the control plane answered: no request.
            Ok(None) if !control_plane_initialized(object) => {
                return Ok(ReconcileOutcome::new(StatusReport::Absent));
            }
            Ok(None) => {
                let removed = scope
                    .remove()
                    .await
                    .map_err(|e| anyhow::anyhow!("cluster {key}: {e}"))?;
                let mut outcome = ReconcileOutcome::new(StatusReport::Absent);
                if !removed.objects.is_empty() {
                    outcome.events.push(ClusterEvent {
                        warning: false,
                        reason: "Removed".into(),
                        action: "Remove".into(),
                        message: format!(
                            "registry addon turned off: deleted {}; PersistentVolumeClaims are kept",
                            removed.objects.join(", ")
                        ),
                    });
                }
                return Ok(outcome);
            }
            Err(e) => {
                let message = format!("cluster {key}: invalid variable {variable}: {e}");
                let mut conditions = report.conditions();
                conditions.set(READY, false, "InvalidConfiguration", message);
                return Ok(ReconcileOutcome::new(StatusReport::Present(
                    report.status(conditions),
                )));
            }
        };
        report.mode = registry.mode.as_str().to_string();
        let mut converge = Converge::new(scope, &registry, OffsetDateTime::from(now));
        match self.converge(&mut converge, object, &report).await {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                let status = report.failed(&key, &e);
                Err(ReconcileError::new(anyhow::anyhow!("cluster {key}: {e}")).with_status(status))
            }
        }
    }

    async fn converge(
        &self,
        converge: &mut Converge<'_>,
        object: &Value,
        report: &Report,
    ) -> Result<ReconcileOutcome, ConvergeError> {
        let ca = converge.ensure_root_ca().await?;
        converge.ensure_cluster_ca(&ca).await?;
        let users = converge.ensure_users().await?;
        if !control_plane_initialized(object) {
            // No registry yet, so no switch either: the variable's mode.
            converge.ensure_bootstrap_hosts(&users).await?;
            let mut conditions = report.conditions();
            conditions
                .set(
                    REGISTRY_READY,
                    false,
                    "WaitingForControlPlane",
                    "waiting for the control plane to be initialized (Cluster condition \
                     ControlPlaneInitialized); the CA and the registry users are in place, the \
                     registry is deployed once the control plane answers",
                )
                .summarize();
            let mut outcome =
                ReconcileOutcome::new(StatusReport::Present(report.status(conditions)));
            outcome.requeue_after = Some(WAIT_REQUEUE);
            return Ok(outcome);
        }
        let workload = match converge.workload().await {
            Ok(workload) => workload,
            Err(ConvergeError::NoKubeconfig(message)) => {
                converge.ensure_bootstrap_hosts(&users).await?;
                let mut conditions = report.conditions();
                conditions
                    .set(REGISTRY_READY, false, "WaitingForKubeconfig", message)
                    .summarize();
                let mut outcome =
                    ReconcileOutcome::new(StatusReport::Present(report.status(conditions)));
                outcome.requeue_after = Some(WAIT_REQUEUE);
                return Ok(outcome);
            }
            Err(e) => return Err(e),
        };
        if let Some(deployer) = converge.deployed_by(&workload).await? {
            converge.scope.deployer = deployer;
        }
        let desired = converge.registry.clone().into_owned();
        let decision = converge.decide_mode(&workload, &desired).await?;
        converge.apply_decision(&decision);
        converge.ensure_bootstrap_hosts(&users).await?;
        let fraction = converge.config.addon.renew_fraction;
        let plan = converge.node_plan(&workload, &ca, &users).await?;
        let deployed = converge
            .deploy(&ca, &workload, &users, Some(fraction), &plan)
            .await?;
        let readiness = converge.readiness(&workload, &deployed.hash).await?;
        let registry = converge.registry_now(&plan, &readiness);
        let progress = converge.roll_nodes(&workload, &plan, registry).await?;
        let complete = readiness.waiting.is_none() && progress.settled();
        converge.record_mode(&workload, &decision, complete).await?;
        let found = Converged {
            deployed: &deployed,
            readiness: &readiness,
            progress: &progress,
            nodes: &plan.nodes,
            decision: &decision,
            complete,
        };
        Ok(report.converged(converge, found, fraction))
    }
}

/// Whether the Cluster's control plane is initialized: v1beta2
/// `status.initialization.controlPlaneInitialized` or v1beta1 `status.controlPlaneReady`, or a
/// `ControlPlaneInitialized` condition that is `True` (either version's conditions).
pub fn control_plane_initialized(cluster: &Value) -> bool {
    let status = &cluster["status"];
    let condition_true = |conditions: &Value| {
        conditions.as_array().is_some_and(|items| {
            items
                .iter()
                .any(|c| c["type"] == "ControlPlaneInitialized" && c["status"] == "True")
        })
    };
    status["initialization"]["controlPlaneInitialized"] == true
        || status["controlPlaneReady"] == true
        || condition_true(&status["conditions"])
        || condition_true(&status["v1beta2"]["conditions"])
}

/// What a converge found, for the status.
#[derive(Clone, Copy)]
struct Converged<'x> {
    deployed: &'x Deployed,
    readiness: &'x Readiness,
    progress: &'x Progress,
    nodes: &'x [rollout::NodeView],
    decision: &'x ModeDecision,
    /// A switch of modes, if one is under way, is complete.
    complete: bool,
}

/// Builds the statuses of one reconcile.
struct Report {
    generation: Option<i64>,
    now: SystemTime,
    /// The mode shown until the converge tells which one is deployed: the variable's.
    mode: String,
}

impl Report {
    fn conditions(&self) -> Conditions {
        Conditions::new(self.generation, self.now)
    }

    fn status(&self, conditions: Conditions) -> ClusterRegistryStatus {
        ClusterRegistryStatus {
            observed_generation: self.generation,
            mode: Some(self.mode.clone()),
            conditions: conditions.build(),
            ..ClusterRegistryStatus::default()
        }
    }

    /// `Ready=False` saying what failed, with the hooks' message.
    fn failed(&self, key: &str, error: &ConvergeError) -> ClusterRegistryStatus {
        let (type_, reason) = match error {
            ConvergeError::RootCaMissing(_) => (CERTIFICATE_READY, "RootCAMissing"),
            ConvergeError::CaMismatch(_) => (CERTIFICATE_READY, "CAMismatch"),
            ConvergeError::DeployerConflict(_) => (REGISTRY_READY, "DeployerConflict"),
            ConvergeError::Invalid(_) => (REGISTRY_READY, "InvalidConfiguration"),
            ConvergeError::NoKubeconfig(_) => (REGISTRY_READY, "WaitingForKubeconfig"),
            ConvergeError::Kube(e) if e.place == Place::Workload && e.is_unreachable() => {
                (REGISTRY_READY, "WorkloadClusterUnreachable")
            }
            ConvergeError::Kube(_) => (REGISTRY_READY, "APIError"),
        };
        let mut conditions = self.conditions();
        conditions
            .set(type_, false, reason, format!("cluster {key}: {error}"))
            .summarize();
        self.status(conditions)
    }

    fn converged(
        &self,
        converge: &Converge<'_>,
        found: Converged<'_>,
        fraction: f64,
    ) -> ReconcileOutcome {
        let Converged {
            deployed,
            readiness,
            progress,
            nodes,
            decision,
            complete,
        } = found;
        let certificate = &deployed.certificate;
        let not_after = certificate.not_after;
        let renew_after = not_after - certificate.lifetime() * fraction;
        let mut conditions = self.conditions();
        conditions.set(
            CERTIFICATE_READY,
            true,
            "CertificateValid",
            format!(
                "certificate expires {}; renewal starts {}",
                day(not_after),
                day(renew_after)
            ),
        );
        let ready = readiness.ready_replicas;
        let wanted = readiness.wanted;
        let (status, reason, message) = match &readiness.waiting {
            None => (
                ConditionStatus::True,
                "ReplicasReady",
                format!("{ready} of {wanted} replicas ready"),
            ),
            Some(why) => (
                ConditionStatus::False,
                if readiness.replicas.is_none() {
                    "Deploying"
                } else {
                    "ReplicasNotReady"
                },
                format!(
                    "{ready} of {wanted} replicas ready; {} on the workload cluster: {why}",
                    workload_name(decision.effective.mode)
                ),
            ),
        };
        conditions.set(REGISTRY_READY, status, reason, message);
        let settled = progress.settled();
        let (healthy, health) = rollout::describe_health(nodes);
        let failing = nodes
            .iter()
            .any(|n| n.mirror.as_ref().is_some_and(|(ok, _)| !ok));
        // Ready answers "can the cluster pull through the registry": nodes reporting that they
        // cannot make it False; a rollout under way or agents not reporting yet do not.
        if failing {
            conditions.set(
                NODES_MIRROR_READY,
                false,
                "MirrorUnreachable",
                health.clone(),
            );
        }
        conditions.summarize();
        let (status, reason) = match (&progress.state, settled) {
            (_, true) => (true, "NodesConfigured"),
            (RolloutState::Transition { .. }, _) => (false, "TransitionPhase"),
            (
                RolloutState::Final {
                    retiring: Some(_), ..
                },
                _,
            ) => (false, "FinalPhase"),
            (RolloutState::Final { .. }, _) => (false, "WaitingForNodes"),
        };
        conditions.set(
            NODES_CONFIGURED,
            status,
            reason,
            rollout::describe(progress),
        );
        if !failing {
            let (status, reason) = if healthy {
                (ConditionStatus::True, "MirrorReachable")
            } else {
                (ConditionStatus::Unknown, "NotReported")
            };
            conditions.set(NODES_MIRROR_READY, status, reason, health);
        }
        let effective = decision.effective.mode.as_str().to_string();
        // A switch still under way while a newer request waits or is refused: its start is
        // the mode shown.
        let under_way = decision.record.switching_from.clone().filter(|_| !complete);
        let (mode, target_mode) = match &decision.state {
            SwitchState::Settled => (effective.clone(), None),
            SwitchState::Switching { .. } if complete => (effective.clone(), None),
            SwitchState::Switching { from } => (from.clone(), Some(effective.clone())),
            SwitchState::Refused { target, .. } | SwitchState::Waiting { target, .. } => (
                under_way.unwrap_or_else(|| effective.clone()),
                Some(target.as_str().to_string()),
            ),
        };
        match &decision.state {
            SwitchState::Settled => {
                conditions.set(
                    MODE_READY,
                    true,
                    "ModeActive",
                    format!("mode {mode} is deployed"),
                );
            }
            SwitchState::Switching { .. } if complete => {
                conditions.set(
                    MODE_READY,
                    true,
                    "ModeActive",
                    format!("mode {mode} is deployed; the switch is complete"),
                );
            }
            SwitchState::Switching { from } if from == &effective => {
                conditions.set(
                    MODE_READY,
                    false,
                    "Switching",
                    format!(
                        "returning to {effective} before the switch from it completed: \
                         complete once {effective} is ready and every node carries the final \
                         node configuration"
                    ),
                );
            }
            SwitchState::Switching { from } => {
                conditions.set(
                    MODE_READY,
                    false,
                    "Switching",
                    format!(
                        "switching from {from} to {effective}: the {effective} registry is deployed \
                         beside {from}; complete once it is ready and every node carries the final \
                         node configuration"
                    ),
                );
            }
            SwitchState::Refused { message, .. } => {
                conditions.set(
                    MODE_READY,
                    false,
                    "TransitionNotSupported",
                    format!("{message}; mode {mode} keeps serving, nothing was changed"),
                );
            }
            SwitchState::Waiting { target, check } => {
                conditions.set(
                    MODE_READY,
                    false,
                    "WaitingForTarget",
                    format!(
                        "the switch to {target} waits for its target; mode {mode} keeps serving"
                    ),
                );
                let reason = match check {
                    TargetCheck::Unavailable(_) => "TargetUnavailable",
                    _ => "ImagesMissing",
                };
                conditions.set(
                    TARGET_READY,
                    false,
                    reason,
                    check.message(&format!("the {target} target")),
                );
            }
        }
        if let (SwitchState::Switching { .. }, Some(images)) =
            (&decision.state, deployed.images_required)
        {
            // A switch to Local or Proxy: its replicas check themselves (`front
            // --require-images`).
            let what = if effective == "Local" {
                "hold"
            } else {
                "fetch from the upstream"
            };
            if readiness.waiting.is_none() {
                conditions.set(
                    TARGET_READY,
                    true,
                    "TargetServesImagesInUse",
                    format!(
                        "the {effective} target serves all {images} images in use routed to it: \
                         every replica is ready"
                    ),
                );
            } else {
                let hint = if effective == "Local" {
                    "; push what is missing to one replica (kubectl -n registry-system \
                     port-forward pod/registry-0 5000, then registry-addon mirror push --to \
                     https://127.0.0.1:5000), its peers sync it"
                } else {
                    ""
                };
                conditions.set(
                    TARGET_READY,
                    false,
                    "WaitingForImages",
                    format!(
                        "the {effective} target's replicas are ready only once they {what} all \
                         {images} images in use routed to it: {ready} of {wanted} ready (each \
                         front's log names the first it lacks){hint}; mode {mode} keeps serving"
                    ),
                );
            }
        } else if let (Some(check), SwitchState::Switching { .. }) =
            (&decision.check, &decision.state)
        {
            conditions.set(
                TARGET_READY,
                true,
                "TargetServesImagesInUse",
                check.message(&format!("the {effective} target")),
            );
        }
        let mut registry = self.status(conditions);
        registry.mode = Some(mode);
        registry.target_mode = target_mode;
        registry.nodes = Some(Box::new(NodesStatus {
            total: clamp(progress.acks.total as u64),
            configured: format!("{}/{}", progress.acks.acked, progress.acks.total),
            phase: progress.state.phase().to_string(),
            mirror_ready: clamp(
                nodes
                    .iter()
                    .filter(|n| n.mirror.as_ref().is_some_and(|(ok, _)| *ok))
                    .count() as u64,
            ),
        }));
        registry.replicas = Some(clamp(readiness.replicas.unwrap_or(wanted)));
        registry.ready_replicas = Some(clamp(ready));
        registry.certificate = Some(CertificateStatus {
            not_after: Some(to_k8s_time(SystemTime::from(not_after))),
            renew_after: Some(to_k8s_time(SystemTime::from(renew_after))),
        });

        let mut outcome = ReconcileOutcome::new(StatusReport::Present(registry));
        let until_renewal = (SystemTime::from(renew_after))
            .duration_since(self.now)
            .unwrap_or(Duration::ZERO)
            // Just past the window's start, so the next reconcile renews.
            + Duration::from_secs(1);
        // Only a rollout has a next step that waits on nodes; a final configuration that some
        // nodes lack is shown, and looked at again on the usual schedule.
        // A final state another change still waits to replace moves on at the next step too.
        let rolling = !matches!(progress.state, RolloutState::Final { retiring: None, .. })
            || !progress.desired;
        outcome.requeue_after = Some(if rolling {
            until_renewal.min(ROLLOUT_REQUEUE)
        } else if readiness.waiting.is_some() {
            until_renewal.min(READINESS_REQUEUE)
        } else {
            until_renewal
        });
        if progress.written {
            outcome.events.push(ClusterEvent {
                warning: false,
                reason: "NodeConfigUpdated".into(),
                action: "RollOut".into(),
                message: rollout::describe(progress),
            });
        }
        if let Some(why) = deployed.renewed {
            outcome.events.push(ClusterEvent {
                warning: false,
                reason: "CertificateRenewed".into(),
                action: "Renew".into(),
                message: format!(
                    "issued a new registry certificate: the previous one {why}; it expires {}",
                    day(not_after)
                ),
            });
        }
        if deployed.applied > 0 {
            outcome.events.push(ClusterEvent {
                warning: false,
                reason: "Deployed".into(),
                action: "Deploy".into(),
                message: format!(
                    "registry deployed ({}): {} object(s) written",
                    converge.deployer_name(),
                    deployed.applied
                ),
            });
        }
        outcome
    }
}

fn clamp(n: u64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// `2027-03-01`.
fn day(time: OffsetDateTime) -> String {
    let date = time.date();
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// `kind namespace/name` of the workload serving `mode`, for messages.
pub fn workload_name(mode: crate::wire::variable::Mode) -> String {
    let ns = names::REGISTRY_NAMESPACE;
    match mode {
        crate::wire::variable::Mode::Direct => {
            format!("deployment {ns}/{}", names::REGISTRY_DIRECT_NAME)
        }
        _ => format!("statefulset {ns}/{}", names::REGISTRY_NAME),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn control_plane_initialized_in_both_versions() {
        assert!(!control_plane_initialized(&json!({})));
        assert!(!control_plane_initialized(
            &json!({"status": {"controlPlaneReady": false}})
        ));
        assert!(control_plane_initialized(
            &json!({"status": {"controlPlaneReady": true}})
        ));
        assert!(control_plane_initialized(
            &json!({"status": {"initialization": {"controlPlaneInitialized": true}}})
        ));
        let condition = |status: &str| {
            json!({"status": {"conditions": [
                {"type": "InfrastructureReady", "status": "True"},
                {"type": "ControlPlaneInitialized", "status": status},
            ]}})
        };
        assert!(control_plane_initialized(&condition("True")));
        assert!(!control_plane_initialized(&condition("False")));
        assert!(control_plane_initialized(
            &json!({"status": {"v1beta2": {"conditions": [
                {"type": "ControlPlaneInitialized", "status": "True"}
            ]}}})
        ));
    }

    #[test]
    fn days_are_iso_dates() {
        let time = OffsetDateTime::from_unix_timestamp(1_803_600_000).unwrap();
        assert_eq!(day(time), "2027-02-26");
    }
}
