//! ValidateTopology and DiscoverVariables: the `addons.registry` variable's checks and schema.

use crate::hooks::HookContext;
use crate::wire::runtime::{
    ClusterClassVariable, Hook, Response, ValidateTopologyRequest, Variable, VariableSchema,
};
use crate::wire::variable::{registry_from_config, variable_schema};

/// Rejects a topology whose addon variable (cluster-wide or in any per-topology override)
/// is invalid, naming the field.
pub fn validate_topology(ctx: &HookContext, request: &ValidateTopologyRequest) -> Response {
    let hook = Hook::ValidateTopology;
    let name = &ctx.config.addon.variable_name;
    let check = |vars: &[Variable], scope: &str| -> Result<(), String> {
        let value = vars.iter().find(|v| &v.name == name).map(|v| &v.value);
        registry_from_config(value)
            .map(|_| ())
            .map_err(|e| format!("{scope}variable {name}: {e}"))
    };
    let mut result = check(&request.variables, "");
    for item in &request.items {
        if result.is_err() {
            break;
        }
        let holder = &item.holder_reference;
        result = check(
            &item.variables,
            &format!("{} {}/{}: ", holder.kind, holder.namespace, holder.name),
        );
    }
    match result {
        Ok(()) => Response::success(hook, ""),
        Err(message) => Response::failure(hook, message),
    }
}

/// Publishes the schema of the config variable.
pub fn discover_variables(ctx: &HookContext) -> Response {
    let mut response = Response::success(Hook::DiscoverVariables, "");
    response.variables = Some(vec![ClusterClassVariable {
        name: ctx.config.addon.variable_name.clone(),
        required: false,
        schema: VariableSchema {
            open_api_v3_schema: variable_schema(),
        },
    }]);
    response
}
