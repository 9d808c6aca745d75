//! BeforeClusterCreate, AfterControlPlaneInitialized, BeforeClusterUpgrade and
//! BeforeClusterDelete (SPEC §4): which converge steps each hook runs, and how their results
//! and errors become Runtime SDK responses. The steps themselves are in
//! [`crate::addon::converge`], shared with the controller.
//!
//! Calls for one cluster are serialized by the per-cluster lock the controller takes too.

use std::time::Duration;

use time::OffsetDateTime;

use crate::addon::converge::{Converge, ConvergeError, Scope};
use crate::addon::rollout::RegistryNow;
use crate::hooks::{HookContext, LifecycleCall, Management};
use crate::k8s::Place;
use crate::names;
use crate::wire::runtime::{Hook, Response};

pub use crate::addon::converge::State;

/// How long BeforeClusterUpgrade asks CAPI to wait before calling again.
pub const RETRY_AFTER_SECONDS: i32 = 15;
/// Budget used when the caller gives none.
const DEFAULT_BUDGET: Duration = Duration::from_secs(10);

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
    let scope = Scope::new(
        &ctx.config,
        &ctx.state,
        client,
        call.cluster,
        deployer,
        deadline,
    );
    let mut converge = Converge::new(scope, call.registry, OffsetDateTime::now_utc());
    let lock = ctx.state.cluster_lock(&key);
    let work = async {
        let _guard = lock.lock().await;
        run(&mut converge, hook).await
    };
    match tokio::time::timeout(deadline, work).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => error_response(hook, &key, e),
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

async fn run(converge: &mut Converge<'_>, hook: Hook) -> Result<Response, ConvergeError> {
    let key = &converge.key.clone();
    match hook {
        Hook::BeforeClusterCreate => {
            let ca = converge.ensure_root_ca().await?;
            converge.ensure_cluster_ca(&ca).await?;
            let users = converge.ensure_users().await?;
            // Before the control plane: nothing deployed, no switch, the variable's mode.
            converge.ensure_bootstrap_hosts(&users).await?;
            Ok(Response::success(
                hook,
                format!(
                    "cluster {key}: CA Secret {}/{} and registry users are in place",
                    converge.cluster.namespace(),
                    names::cluster_ca_secret(converge.cluster.name())
                ),
            ))
        }
        Hook::AfterControlPlaneInitialized => {
            let ca = converge.ensure_root_ca().await?;
            converge.ensure_cluster_ca(&ca).await?;
            let users = converge.ensure_users().await?;
            let workload = converge.workload().await?;
            let decision = switch_mode(converge, &workload).await?;
            converge.ensure_bootstrap_hosts(&users).await?;
            let plan = converge.node_plan(&workload, &ca, &users).await?;
            converge.deploy(&ca, &workload, &users, None, &plan).await?;
            converge.record_mode(&workload, &decision, false).await?;
            // The registry has just been (re)deployed: the rollout may start, not finish.
            converge
                .roll_nodes(&workload, &plan, RegistryNow::NotReady)
                .await?;
            Ok(Response::success(
                hook,
                format!(
                    "cluster {key}: registry deployed ({})",
                    converge.deployer_name()
                ),
            ))
        }
        Hook::BeforeClusterUpgrade => {
            let ca = converge.ensure_root_ca().await?;
            converge.ensure_cluster_ca(&ca).await?;
            let users = converge.ensure_users().await?;
            let workload = converge.workload().await?;
            let fraction = converge.config.addon.renew_fraction;
            let decision = switch_mode(converge, &workload).await?;
            converge.ensure_bootstrap_hosts(&users).await?;
            let plan = converge.node_plan(&workload, &ca, &users).await?;
            let deployed = converge
                .deploy(&ca, &workload, &users, Some(fraction), &plan)
                .await?;
            let readiness = converge.readiness(&workload, &deployed.hash).await?;
            let registry = converge.registry_now(&plan, &readiness);
            let progress = converge.roll_nodes(&workload, &plan, registry).await?;
            let complete = readiness.waiting.is_none() && progress.settled();
            converge.record_mode(&workload, &decision, complete).await?;
            let workload_name = crate::addon::reconcile::workload_name(converge.registry.mode);
            // During a switch to Local or Proxy, replicas are ready only once they serve the
            // images in use.
            let images = deployed
                .images_required
                .map(|n| format!(" (its replicas are ready once they serve all {n} images in use)"))
                .unwrap_or_default();
            Ok(match readiness.waiting {
                None => Response::success(
                    hook,
                    format!(
                        "cluster {key}: registry is ready ({} replicas)",
                        readiness.wanted
                    ),
                ),
                Some(why) => Response::retry(
                    hook,
                    RETRY_AFTER_SECONDS,
                    format!(
                        "cluster {key}: waiting for {workload_name} on the workload cluster to be ready: {why}{images}"
                    ),
                ),
            })
        }
        Hook::BeforeClusterDelete => {
            converge.cleanup().await?;
            Ok(Response::success(
                hook,
                format!("cluster {key}: registry addon cleaned up"),
            ))
        }
        other => Ok(Response::failure(
            other,
            format!("{other} is not a lifecycle hook"),
        )),
    }
}

fn error_response(hook: Hook, key: &str, e: ConvergeError) -> Response {
    let message = match &e {
        ConvergeError::Kube(k) if k.place == Place::Management && k.is_unreachable() => {
            format!("cluster {key}: management cluster unreachable: {e}")
        }
        _ => format!("cluster {key}: {e}"),
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

/// The mode to deploy: the variable's, or the one deployed while a switch to it waits or is
/// refused (the controller shows why on the ClusterRegistry).
async fn switch_mode(
    converge: &mut Converge<'_>,
    workload: &crate::k8s::ClusterApi,
) -> Result<crate::addon::converge::ModeDecision, ConvergeError> {
    let desired = converge.registry.clone().into_owned();
    let decision = converge.decide_mode(workload, &desired).await?;
    converge.apply_decision(&decision);
    Ok(decision)
}
