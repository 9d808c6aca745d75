//! Runtime SDK (`hooks.runtime.cluster.x-k8s.io/v1alpha1`) requests and responses, typed only
//! as far as the addon reads or writes them. Unknown request fields are ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::names::HOOKS_API_VERSION;

/// Every hook this addon can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    BeforeClusterCreate,
    AfterControlPlaneInitialized,
    BeforeClusterUpgrade,
    BeforeClusterDelete,
    GeneratePatches,
    ValidateTopology,
    DiscoverVariables,
}

impl Hook {
    pub const ALL: [Hook; 7] = [
        Hook::BeforeClusterCreate,
        Hook::AfterControlPlaneInitialized,
        Hook::BeforeClusterUpgrade,
        Hook::BeforeClusterDelete,
        Hook::GeneratePatches,
        Hook::ValidateTopology,
        Hook::DiscoverVariables,
    ];

    /// The hook's name as CAPI spells it in `requestHook.hook`.
    pub fn name(self) -> &'static str {
        match self {
            Hook::BeforeClusterCreate => "BeforeClusterCreate",
            Hook::AfterControlPlaneInitialized => "AfterControlPlaneInitialized",
            Hook::BeforeClusterUpgrade => "BeforeClusterUpgrade",
            Hook::BeforeClusterDelete => "BeforeClusterDelete",
            Hook::GeneratePatches => "GeneratePatches",
            Hook::ValidateTopology => "ValidateTopology",
            Hook::DiscoverVariables => "DiscoverVariables",
        }
    }

    /// Path segment: the lowercased hook name.
    pub fn path_segment(self) -> String {
        self.name().to_ascii_lowercase()
    }

    pub fn request_kind(self) -> String {
        format!("{}Request", self.name())
    }

    pub fn response_kind(self) -> String {
        format!("{}Response", self.name())
    }

    /// Blocking hooks carry `retryAfterSeconds` in their response.
    pub fn is_blocking(self) -> bool {
        matches!(
            self,
            Hook::BeforeClusterCreate | Hook::BeforeClusterUpgrade | Hook::BeforeClusterDelete
        )
    }

    /// Lifecycle hooks carry the Cluster in their request.
    pub fn is_lifecycle(self) -> bool {
        matches!(
            self,
            Hook::BeforeClusterCreate
                | Hook::AfterControlPlaneInitialized
                | Hook::BeforeClusterUpgrade
                | Hook::BeforeClusterDelete
        )
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Hook {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Hook::ALL
            .into_iter()
            .find(|h| h.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let known: Vec<_> = Hook::ALL.iter().map(|h| h.name()).collect();
                format!("unknown hook {s:?}; known hooks: {}", known.join(", "))
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Success,
    Failure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailurePolicy {
    Fail,
    Ignore,
}

/// BeforeClusterCreate, AfterControlPlaneInitialized, BeforeClusterUpgrade and
/// BeforeClusterDelete requests, but for `cluster`, which is read on its own
/// (`Cluster::from_value`) so its errors name the field.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleRequest {
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// BeforeClusterUpgrade only.
    #[serde(default)]
    pub from_kubernetes_version: Option<String>,
    #[serde(default)]
    pub to_kubernetes_version: Option<String>,
}

/// One `{name, value}` of `builtin` or a user variable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Variable {
    pub name: String,
    #[serde(default)]
    pub value: Value,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HolderReference {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub field_path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GeneratePatchesRequest {
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    #[serde(default)]
    pub variables: Vec<Variable>,
    #[serde(default)]
    pub items: Vec<GeneratePatchesRequestItem>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GeneratePatchesRequestItem {
    pub uid: String,
    #[serde(default)]
    pub holder_reference: HolderReference,
    /// The template object (e.g. a KubeadmConfigTemplate) as raw JSON.
    #[serde(default)]
    pub object: Value,
    /// Item-level variables: per-topology overrides already applied by CAPI.
    #[serde(default)]
    pub variables: Vec<Variable>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PatchType {
    JSONPatch,
    JSONMergePatch,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GeneratePatchesResponseItem {
    pub uid: String,
    pub patch_type: PatchType,
    /// Base64 on the wire (Go `[]byte`).
    #[serde(serialize_with = "base64_bytes")]
    pub patch: Vec<u8>,
}

fn base64_bytes<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    use base64::Engine;
    s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidateTopologyRequest {
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    #[serde(default)]
    pub variables: Vec<Variable>,
    #[serde(default)]
    pub items: Vec<ValidateTopologyRequestItem>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidateTopologyRequestItem {
    #[serde(default)]
    pub holder_reference: HolderReference,
    #[serde(default)]
    pub variables: Vec<Variable>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoverVariablesRequest {
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

/// A published variable: `{name, required, schema: {openAPIV3Schema}}`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterClassVariable {
    pub name: String,
    pub required: bool,
    pub schema: VariableSchema,
}

#[derive(Debug, Clone, Serialize)]
pub struct VariableSchema {
    #[serde(rename = "openAPIV3Schema")]
    pub open_api_v3_schema: Value,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupVersionHook {
    pub api_version: String,
    pub hook: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionHandler {
    pub name: String,
    pub request_hook: GroupVersionHook,
    pub timeout_seconds: i32,
    pub failure_policy: FailurePolicy,
}

/// Any hook response: the common fields plus the hook-specific ones that apply.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub api_version: &'static str,
    pub kind: String,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handlers: Option<Vec<ExtensionHandler>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<GeneratePatchesResponseItem>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variables: Option<Vec<ClusterClassVariable>>,
}

impl Response {
    /// A response of the right kind for `hook`; blocking hooks get `retryAfterSeconds: 0`.
    pub fn new(hook: Hook, status: Status, message: impl Into<String>) -> Self {
        Response {
            api_version: HOOKS_API_VERSION,
            kind: hook.response_kind(),
            status,
            message: message.into(),
            retry_after_seconds: hook.is_blocking().then_some(0),
            handlers: None,
            items: None,
            variables: None,
        }
    }

    pub fn success(hook: Hook, message: impl Into<String>) -> Self {
        Self::new(hook, Status::Success, message)
    }

    pub fn failure(hook: Hook, message: impl Into<String>) -> Self {
        Self::new(hook, Status::Failure, message)
    }

    /// A blocking answer: Success with a retry delay, so CAPI calls again later.
    pub fn retry(hook: Hook, seconds: i32, message: impl Into<String>) -> Self {
        let mut response = Self::new(hook, Status::Success, message);
        if hook.is_blocking() {
            response.retry_after_seconds = Some(seconds);
        }
        response
    }

    pub fn discovery(handlers: Vec<ExtensionHandler>) -> Self {
        Response {
            api_version: HOOKS_API_VERSION,
            kind: "DiscoveryResponse".into(),
            status: Status::Success,
            message: String::new(),
            retry_after_seconds: None,
            handlers: Some(handlers),
            items: None,
            variables: None,
        }
    }

    /// A Failure for the discovery endpoint.
    pub fn discovery_failure(message: impl Into<String>) -> Self {
        let mut response = Self::discovery(Vec::new());
        response.status = Status::Failure;
        response.message = message.into();
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_names_round_trip() {
        for hook in Hook::ALL {
            assert_eq!(hook.name().parse::<Hook>(), Ok(hook));
            assert_eq!(hook.path_segment().parse::<Hook>(), Ok(hook));
        }
        assert!("AfterClusterUpgrade".parse::<Hook>().is_err());
    }

    #[test]
    fn blocking_responses_carry_retry_after() {
        let r = serde_json::to_value(Response::success(Hook::BeforeClusterDelete, "")).unwrap();
        assert_eq!(r["retryAfterSeconds"], 0);
        assert_eq!(r["kind"], "BeforeClusterDeleteResponse");
        let r = serde_json::to_value(Response::success(Hook::AfterControlPlaneInitialized, ""))
            .unwrap();
        assert!(r.get("retryAfterSeconds").is_none());
    }

    #[test]
    fn patch_is_base64_on_the_wire() {
        let item = GeneratePatchesResponseItem {
            uid: "u".into(),
            patch_type: PatchType::JSONPatch,
            patch: b"[]".to_vec(),
        };
        assert_eq!(serde_json::to_value(item).unwrap()["patch"], "W10=");
    }
}
