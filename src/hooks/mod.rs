//! Hook handlers: each is a function of (context, request) → response. `dispatch` decodes the
//! request for a hook, checks what every hook needs, and calls the hook's handler.

pub mod lifecycle;
pub mod patches;
pub mod variables;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::cli::{AddonOptions, Deployer};
use crate::wire::cluster::Cluster;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::wire::runtime::{Hook, LifecycleRequest, Response};
use crate::wire::variable::{RegistryConfig, registry_from_config};

/// What the hooks need from `serve`'s configuration.
#[derive(Debug, Clone)]
pub struct HookConfig {
    /// Namespace of the extension; holds the root CA.
    pub namespace: String,
    pub addon: AddonOptions,
}

/// The management cluster's API, or why it cannot be reached.
#[derive(Clone)]
pub enum Management {
    Client(kube::Client),
    Unavailable(String),
}

/// Shared state of every hook call.
pub struct HookContext {
    pub config: HookConfig,
    pub management: Management,
    pub state: Arc<lifecycle::State>,
}

impl HookContext {
    pub fn new(config: HookConfig, management: Management) -> Self {
        HookContext {
            config,
            management,
            state: Arc::new(lifecycle::State::default()),
        }
    }

    /// The deployer for a request: the ExtensionConfig setting `deployer`, else `--deployer`.
    pub fn deployer(
        &self,
        settings: &std::collections::BTreeMap<String, String>,
    ) -> Result<Deployer, String> {
        match settings.get("deployer") {
            Some(value) => value
                .parse()
                .map_err(|e: String| format!("settings.deployer: {e}")),
            None => Ok(self.config.addon.deployer),
        }
    }
}

/// Decodes and answers one hook request. `budget` is how long the caller waits (`?timeout=`).
///
/// The body is decoded straight into typed structs; fields the addon does not read are skipped
/// without being built, which keeps large Cluster objects cheap.
pub async fn dispatch(ctx: &HookContext, hook: Hook, body: &[u8], budget: Duration) -> Response {
    let envelope = match serde_json::from_slice::<Envelope>(body) {
        Ok(envelope) => envelope,
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            return Response::failure(
                hook,
                format!("request body must be a {} object: {e}", hook.request_kind()),
            );
        }
        Err(e) => return Response::failure(hook, format!("request body is not valid JSON: {e}")),
    };
    if let Err(message) = envelope.check(hook) {
        return Response::failure(hook, message);
    }
    match hook {
        Hook::BeforeClusterCreate
        | Hook::AfterControlPlaneInitialized
        | Hook::BeforeClusterUpgrade
        | Hook::BeforeClusterDelete => lifecycle_request(ctx, hook, body, envelope, budget).await,
        Hook::GeneratePatches => match serde_json::from_slice(body) {
            Ok(request) => patches::generate_patches(ctx, &request).await,
            Err(e) => Response::failure(hook, format!("malformed GeneratePatchesRequest: {e}")),
        },
        Hook::ValidateTopology => match serde_json::from_slice(body) {
            Ok(request) => variables::validate_topology(ctx, &request),
            Err(e) => Response::failure(hook, format!("malformed ValidateTopologyRequest: {e}")),
        },
        Hook::DiscoverVariables => variables::discover_variables(ctx),
    }
}

/// The fields checked before a request is decoded for its hook.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    #[serde(default)]
    api_version: Option<Value>,
    #[serde(default)]
    kind: Option<Value>,
    #[serde(default, borrow)]
    cluster: Option<&'a RawValue>,
}

impl Envelope<'_> {
    /// `apiVersion` and `kind` may be absent; when present they must name this hook's request.
    fn check(&self, hook: Hook) -> Result<(), String> {
        let field = |name: &str, value: &Option<Value>| match value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{name}: must be a string")),
        };
        if let Some(api_version) = field("apiVersion", &self.api_version)?
            && api_version != crate::names::HOOKS_API_VERSION
        {
            return Err(format!(
                "apiVersion {api_version:?} is not {:?}",
                crate::names::HOOKS_API_VERSION
            ));
        }
        if let Some(kind) = field("kind", &self.kind)?
            && kind != hook.request_kind()
        {
            return Err(format!(
                "kind {kind:?} sent to the {hook} handler, expected {:?}",
                hook.request_kind()
            ));
        }
        Ok(())
    }
}

/// A parsed lifecycle request whose cluster has the addon on.
pub struct LifecycleCall<'a> {
    pub hook: Hook,
    pub request: &'a LifecycleRequest,
    pub cluster: &'a Cluster,
    pub registry: &'a RegistryConfig,
    pub budget: Duration,
}

async fn lifecycle_request(
    ctx: &HookContext,
    hook: Hook,
    body: &[u8],
    envelope: Envelope<'_>,
    budget: Duration,
) -> Response {
    let cluster = match envelope.cluster.map(|raw| raw.get()) {
        None | Some("null") => return Response::failure(hook, "cluster: required"),
        Some(raw) => match Cluster::from_json(raw) {
            Ok(cluster) => cluster,
            Err(message) => return Response::failure(hook, message),
        },
    };
    let request = match serde_json::from_slice::<LifecycleRequest>(body) {
        Ok(request) => request,
        Err(e) => {
            return Response::failure(hook, format!("malformed {}: {e}", hook.request_kind()));
        }
    };
    let variable = &ctx.config.addon.variable_name;
    let registry = match registry_from_config(cluster.variable(variable)) {
        Ok(Some(registry)) => registry,
        Ok(None) => {
            return Response::success(
                hook,
                format!("registry addon is off for cluster {}", cluster.key()),
            );
        }
        Err(e) => {
            return Response::failure(
                hook,
                format!(
                    "cluster {}: invalid variable {variable}: {e}",
                    cluster.key()
                ),
            );
        }
    };
    let call = LifecycleCall {
        hook,
        request: &request,
        cluster: &cluster,
        registry: &registry,
        budget,
    };
    lifecycle::handle(ctx, call).await
}
