//! BeforeClusterCreate, AfterControlPlaneInitialized, BeforeClusterUpgrade and
//! BeforeClusterDelete (SPEC §4).

use crate::hooks::{HookContext, LifecycleCall, Management};
use crate::wire::runtime::Response;

/// State shared by lifecycle calls (e.g. cached workload clients).
#[derive(Default)]
pub struct State {}

pub async fn handle(ctx: &HookContext, call: LifecycleCall<'_>) -> Response {
    if let Management::Unavailable(reason) = &ctx.management {
        return Response::failure(
            call.hook,
            format!("cluster {}: management cluster unreachable: {reason}", call.cluster.key()),
        );
    }
    Response::failure(
        call.hook,
        format!("cluster {}: {} is not implemented yet", call.cluster.key(), call.hook),
    )
}
