//! GeneratePatches: containerd mirror configuration for bootstrap templates (SPEC §7).

use crate::hooks::HookContext;
use crate::wire::runtime::{GeneratePatchesRequest, Hook, Response};
use crate::wire::variable::registry_from_config;

pub async fn generate_patches(ctx: &HookContext, request: &GeneratePatchesRequest) -> Response {
    let hook = Hook::GeneratePatches;
    let name = &ctx.config.addon.variable_name;
    let value = request.variables.iter().find(|v| &v.name == name).map(|v| &v.value);
    match registry_from_config(value) {
        Ok(None) => {
            let mut response = Response::success(hook, "");
            response.items = Some(Vec::new());
            response
        }
        Ok(Some(_)) => Response::failure(hook, "GeneratePatches is not implemented yet"),
        Err(e) => Response::failure(hook, format!("invalid variable {name}: {e}")),
    }
}
