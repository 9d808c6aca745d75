//! GeneratePatches: containerd mirror configuration for bootstrap templates (SPEC §7).
//!
//! Each KubeadmControlPlaneTemplate and KubeadmConfigTemplate gets the files of
//! [`containerd::node_files`] and a `preKubeadmCommands` entry running the script among them.
//! The JSON patches keep the user's files and commands, apply whether the lists exist or not,
//! and add nothing twice when the template already carries the addon's entries.

pub mod containerd;

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::hooks::HookContext;
use crate::names;
use crate::wire::runtime::{
    GeneratePatchesRequest, GeneratePatchesRequestItem, GeneratePatchesResponseItem, Hook,
    PatchType, Response, Variable,
};
use crate::wire::variable::registry_from_config;

/// The bootstrap templates the addon patches, and where their KubeadmConfigSpec lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Template {
    ControlPlane,
    Worker,
}

impl Template {
    fn of(object: &Value) -> Option<Template> {
        let api_version = object.get("apiVersion")?.as_str()?;
        let group = api_version.split('/').next()?;
        match (group, object.get("kind")?.as_str()?) {
            ("controlplane.cluster.x-k8s.io", "KubeadmControlPlaneTemplate") => {
                Some(Template::ControlPlane)
            }
            ("bootstrap.cluster.x-k8s.io", "KubeadmConfigTemplate") => Some(Template::Worker),
            _ => None,
        }
    }

    /// Path of the KubeadmConfigSpec inside the template.
    fn config_spec(self) -> &'static [&'static str] {
        match self {
            Template::ControlPlane => &["spec", "template", "spec", "kubeadmConfigSpec"],
            Template::Worker => &["spec", "template", "spec"],
        }
    }
}

/// The parts of the `builtin` variable the addon reads.
#[derive(Debug, Default, Deserialize)]
struct Builtin {
    #[serde(default)]
    cluster: BuiltinCluster,
}

#[derive(Debug, Default, Deserialize)]
struct BuiltinCluster {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    network: BuiltinNetwork,
}

#[derive(Debug, Default, Deserialize)]
struct BuiltinNetwork {
    #[serde(default)]
    services: Vec<String>,
}

pub async fn generate_patches(ctx: &HookContext, request: &GeneratePatchesRequest) -> Response {
    let hook = Hook::GeneratePatches;
    let mut items = Vec::new();
    for item in &request.items {
        let Some(template) = Template::of(&item.object) else {
            continue;
        };
        match patch_item(ctx, request, item, template).await {
            Ok(Some(patch)) => items.push(patch),
            Ok(None) => {}
            Err(message) => return Response::failure(hook, message),
        }
    }
    let mut response = Response::success(hook, "");
    response.items = Some(items);
    response
}

async fn patch_item(
    ctx: &HookContext,
    request: &GeneratePatchesRequest,
    item: &GeneratePatchesRequestItem,
    template: Template,
) -> Result<Option<GeneratePatchesResponseItem>, String> {
    let variables = merge_variables(&request.variables, &item.variables);
    let variable = &ctx.config.addon.variable_name;
    let holder = describe_holder(item);
    let config = variables
        .iter()
        .find(|v| &v.name == variable)
        .map(|v| &v.value);
    let Some(registry) = registry_from_config(config)
        .map_err(|e| format!("{holder}: invalid variable {variable}: {e}"))?
    else {
        return Ok(None);
    };
    let builtin: Builtin = variables
        .iter()
        .find(|v| v.name == "builtin")
        .map(|v| serde_json::from_value(v.value.clone()))
        .transpose()
        .map_err(|e| format!("{holder}: malformed builtin variable: {e}"))?
        .unwrap_or_default();
    let cluster = &builtin.cluster;
    if cluster.name.is_empty() {
        return Err(format!("{holder}: builtin.cluster.name is missing"));
    }
    let namespace = if cluster.namespace.is_empty() {
        item.holder_reference.namespace.as_str()
    } else {
        cluster.namespace.as_str()
    };
    let key = format!("cluster {namespace}/{}", cluster.name);
    let service_ip: IpAddr = registry
        .resolve_service_ip(&cluster.network.services)
        .map_err(|e| format!("{key}: {e}"))?;
    // The same files in every mode and across CA rotations: see `node_files`.
    let files = containerd::node_files(
        service_ip,
        &names::cluster_ca_secret(&cluster.name),
        &names::containerd_hosts_secret(&cluster.name),
    )
    .into_iter()
    .map(|f| serde_json::to_value(f).expect("a file always serializes"))
    .collect();
    let spec = template.config_spec();
    let mut ops = Vec::new();
    merge_list(
        &item.object,
        &[spec, &["files"]].concat(),
        files,
        same_path,
        &mut ops,
    )
    .map_err(|e| format!("{holder}: {e}"))?;
    let command = vec![Value::String(containerd::pre_kubeadm_command())];
    merge_list(
        &item.object,
        &[spec, &["preKubeadmCommands"]].concat(),
        command,
        |a, b| a == b,
        &mut ops,
    )
    .map_err(|e| format!("{holder}: {e}"))?;
    if ops.is_empty() {
        return Ok(None);
    }
    Ok(Some(GeneratePatchesResponseItem {
        uid: item.uid.clone(),
        patch_type: PatchType::JSONPatch,
        patch: serde_json::to_vec(&ops).expect("a patch always serializes"),
    }))
}

fn describe_holder(item: &GeneratePatchesRequestItem) -> String {
    let kind = item
        .object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("template");
    let h = &item.holder_reference;
    if h.name.is_empty() {
        format!("{kind} (item {})", item.uid)
    } else {
        format!("{kind} of {} {}/{}", h.kind, h.namespace, h.name)
    }
}

/// Request-level variables overridden by the item's, as CAPI merges them for inline patches:
/// `builtin` is merged key by key (the item adds e.g. `builtin.machineDeployment`), any other
/// variable is replaced.
fn merge_variables(global: &[Variable], item: &[Variable]) -> Vec<Variable> {
    let mut merged: Vec<Variable> = global.to_vec();
    for var in item {
        match merged.iter_mut().find(|v| v.name == var.name) {
            Some(existing) if var.name == "builtin" => deep_merge(&mut existing.value, &var.value),
            Some(existing) => existing.value = var.value.clone(),
            None => merged.push(var.clone()),
        }
    }
    merged
}

fn deep_merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(into), Value::Object(from)) => {
            for (k, v) in from {
                match into.get_mut(k) {
                    Some(existing) => deep_merge(existing, v),
                    None => {
                        into.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (into, from) => *into = from.clone(),
    }
}

fn same_path(a: &Value, b: &Value) -> bool {
    a.get("path").is_some_and(|p| Some(p) == b.get("path"))
}

fn pointer(segments: &[&str]) -> String {
    segments
        .iter()
        .map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1")))
        .collect()
}

/// JSON patch operations putting `items` into the list at `path` of `object`: the whole list
/// (with any missing parents) when there is none, else each item appended, or replaced in
/// place when an entry that is `same` differs, or left alone when it is already there.
fn merge_list(
    object: &Value,
    path: &[&str],
    items: Vec<Value>,
    same: impl Fn(&Value, &Value) -> bool,
    ops: &mut Vec<Value>,
) -> Result<(), String> {
    let mut current = object;
    for (depth, segment) in path.iter().enumerate() {
        let here = pointer(&path[..depth]);
        let Value::Object(map) = current else {
            return Err(format!("{} is not an object", display(&here)));
        };
        match map.get(*segment) {
            None | Some(Value::Null) => {
                let value = path[depth + 1..]
                    .iter()
                    .rev()
                    .fold(Value::Array(items), |inner, key| {
                        Value::Object(Map::from_iter([(key.to_string(), inner)]))
                    });
                ops.push(json!({"op": "add", "path": pointer(&path[..=depth]), "value": value}));
                return Ok(());
            }
            Some(next) => current = next,
        }
    }
    let list_path = pointer(path);
    let Value::Array(existing) = current else {
        return Err(format!("{list_path} is not a list"));
    };
    for item in items {
        match existing.iter().position(|e| same(e, &item)) {
            Some(i) if existing[i] == item => {}
            Some(i) => ops
                .push(json!({"op": "replace", "path": format!("{list_path}/{i}"), "value": item})),
            None => ops.push(json!({"op": "add", "path": format!("{list_path}/-"), "value": item})),
        }
    }
    Ok(())
}

fn display(pointer: &str) -> &str {
    if pointer.is_empty() {
        "the object"
    } else {
        pointer
    }
}
