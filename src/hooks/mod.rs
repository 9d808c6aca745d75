//! Hook handlers: each is a function of (context, request) → response. `dispatch` decodes the
//! request for a hook, checks what every hook needs, and calls the hook's handler.

pub mod lifecycle;
pub mod patches;
pub mod variables;

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use serde_json::Value;

use crate::cli::{AddonOptions, Deployer};
use crate::wire::cluster::Cluster;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::wire::runtime::{GeneratePatchesRequest, Hook, LifecycleRequest, Response};
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
pub async fn dispatch(ctx: &HookContext, hook: Hook, body: &[u8], budget: Duration) -> Response {
    match prepare(ctx, hook, body) {
        Prepared::Answer(response) => response,
        work => run(ctx, work, budget).await,
    }
}

/// A hook request after decoding: answered already, or work that needs the Kubernetes APIs.
pub enum Prepared {
    /// Malformed requests, clusters with the addon off, and the hooks that only compute.
    Answer(Response),
    Lifecycle(Box<LifecycleWork>),
    Patches(Box<GeneratePatchesRequest>),
}

/// An owned lifecycle request whose cluster has the addon on.
pub struct LifecycleWork {
    pub hook: Hook,
    pub request: LifecycleRequest,
    pub cluster: Cluster,
    pub registry: RegistryConfig,
}

/// Decodes a request and answers whatever needs no I/O. Cheap and synchronous, so the
/// server can run it on the connection's task and spawn only for real work.
///
/// The body is decoded straight into typed structs; fields the addon does not read are skipped
/// without being built, which keeps large Cluster objects cheap. A well-formed lifecycle
/// request is decoded in one pass; anything else goes through the checks that name what is
/// wrong.
pub fn prepare(ctx: &HookContext, hook: Hook, body: &[u8]) -> Prepared {
    // serde would read a struct from a JSON array too: only an object is a request.
    if let Some(&first) = body.iter().find(|b| !b.is_ascii_whitespace())
        && first != b'{'
        && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
    {
        return Prepared::Answer(Response::failure(
            hook,
            format!(
                "request body must be a {} object, not a JSON {}",
                hook.request_kind(),
                match first {
                    b'[' => "array",
                    b'"' => "string",
                    b'n' => "null",
                    b't' | b'f' => "boolean",
                    _ => "number",
                }
            ),
        ));
    }
    if hook.is_lifecycle()
        && let Ok(whole) = serde_json::from_slice::<WholeLifecycle>(body)
        && check_header(hook, &whole.api_version, &whole.kind).is_ok()
        && let Some(cluster) = whole.cluster
        && cluster.check().is_ok()
    {
        let request = LifecycleRequest {
            settings: whole.settings,
            from_kubernetes_version: whole.from_kubernetes_version,
            to_kubernetes_version: whole.to_kubernetes_version,
        };
        return lifecycle_work(ctx, hook, request, cluster);
    }
    let envelope = match serde_json::from_slice::<Envelope>(body) {
        Ok(envelope) => envelope,
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            return Prepared::Answer(Response::failure(
                hook,
                format!("request body must be a {} object: {e}", hook.request_kind()),
            ));
        }
        Err(e) => {
            return Prepared::Answer(Response::failure(
                hook,
                format!("request body is not valid JSON: {e}"),
            ));
        }
    };
    if let Err(message) = envelope.check(hook) {
        return Prepared::Answer(Response::failure(hook, message));
    }
    match hook {
        Hook::BeforeClusterCreate
        | Hook::AfterControlPlaneInitialized
        | Hook::BeforeClusterUpgrade
        | Hook::BeforeClusterDelete => lifecycle_request(ctx, hook, body, envelope),
        Hook::GeneratePatches => match serde_json::from_slice(body) {
            Ok(request) => Prepared::Patches(Box::new(request)),
            Err(e) => Prepared::Answer(Response::failure(
                hook,
                format!("malformed GeneratePatchesRequest: {e}"),
            )),
        },
        Hook::ValidateTopology => Prepared::Answer(match serde_json::from_slice(body) {
            Ok(request) => variables::validate_topology(ctx, &request),
            Err(e) => Response::failure(hook, format!("malformed ValidateTopologyRequest: {e}")),
        }),
        Hook::DiscoverVariables => Prepared::Answer(variables::discover_variables(ctx)),
    }
}

/// Does the work [`prepare`] left; `budget` is how long the caller waits.
pub async fn run(ctx: &HookContext, work: Prepared, budget: Duration) -> Response {
    match work {
        Prepared::Answer(response) => response,
        Prepared::Lifecycle(work) => {
            let call = LifecycleCall {
                hook: work.hook,
                request: &work.request,
                cluster: &work.cluster,
                registry: &work.registry,
                budget,
            };
            lifecycle::handle(ctx, call).await
        }
        Prepared::Patches(request) => patches::generate_patches(ctx, &request).await,
    }
}

/// A whole lifecycle request in one pass: what [`Envelope`] checks, the request's own fields
/// and the typed cluster.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WholeLifecycle {
    #[serde(default)]
    api_version: Option<Value>,
    #[serde(default)]
    kind: Option<Value>,
    #[serde(default)]
    settings: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "cluster_object")]
    cluster: Option<Cluster>,
    #[serde(default)]
    from_kubernetes_version: Option<String>,
    #[serde(default)]
    to_kubernetes_version: Option<String>,
}

/// A cluster that must be a JSON object: a derived struct would also take an array.
fn cluster_object<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cluster>, D::Error> {
    struct ObjectOnly;
    impl<'de> serde::de::Visitor<'de> for ObjectOnly {
        type Value = Option<Cluster>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a Cluster object")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            Cluster::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    d.deserialize_any(ObjectOnly)
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
    fn check(&self, hook: Hook) -> Result<(), String> {
        check_header(hook, &self.api_version, &self.kind)
    }
}

/// `apiVersion` and `kind` may be absent; when present they must name this hook's request.
fn check_header(
    hook: Hook,
    api_version: &Option<Value>,
    kind: &Option<Value>,
) -> Result<(), String> {
    let field = |name: &str, value: &Option<Value>| match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{name}: must be a string")),
    };
    if let Some(api_version) = field("apiVersion", api_version)?
        && api_version != crate::names::HOOKS_API_VERSION
    {
        return Err(format!(
            "apiVersion {api_version:?} is not {:?}",
            crate::names::HOOKS_API_VERSION
        ));
    }
    if let Some(kind) = field("kind", kind)?
        && kind != hook.request_kind()
    {
        return Err(format!(
            "kind {kind:?} sent to the {hook} handler, expected {:?}",
            hook.request_kind()
        ));
    }
    Ok(())
}

/// A parsed lifecycle request whose cluster has the addon on.
pub struct LifecycleCall<'a> {
    pub hook: Hook,
    pub request: &'a LifecycleRequest,
    pub cluster: &'a Cluster,
    pub registry: &'a RegistryConfig,
    pub budget: Duration,
}

fn lifecycle_request(
    ctx: &HookContext,
    hook: Hook,
    body: &[u8],
    envelope: Envelope<'_>,
) -> Prepared {
    let cluster = match envelope.cluster.map(|raw| raw.get()) {
        None | Some("null") => {
            return Prepared::Answer(Response::failure(hook, "cluster: required"));
        }
        Some(raw) => match Cluster::from_json(raw) {
            Ok(cluster) => cluster,
            Err(message) => return Prepared::Answer(Response::failure(hook, message)),
        },
    };
    let request = match serde_json::from_slice::<LifecycleRequest>(body) {
        Ok(request) => request,
        Err(e) => {
            return Prepared::Answer(Response::failure(
                hook,
                format!("malformed {}: {e}", hook.request_kind()),
            ));
        }
    };
    lifecycle_work(ctx, hook, request, cluster)
}

/// The work for a lifecycle request, or the answer when the addon is off or its variable bad.
fn lifecycle_work(
    ctx: &HookContext,
    hook: Hook,
    request: LifecycleRequest,
    cluster: Cluster,
) -> Prepared {
    let variable = &ctx.config.addon.variable_name;
    let registry = match registry_from_config(cluster.variable(variable)) {
        Ok(Some(registry)) => registry,
        Ok(None) => {
            return Prepared::Answer(Response::success(
                hook,
                format!("registry addon is off for cluster {}", cluster.key()),
            ));
        }
        Err(e) => {
            return Prepared::Answer(Response::failure(
                hook,
                format!(
                    "cluster {}: invalid variable {variable}: {e}",
                    cluster.key()
                ),
            ));
        }
    };
    Prepared::Lifecycle(Box::new(LifecycleWork {
        hook,
        request,
        cluster,
        registry,
    }))
}
