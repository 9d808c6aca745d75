//! What the agent writes on its Node: the applied-config annotation and two conditions
//! (`RegistryMirrorReady`, `RegistryNodeConfigApplied`), each only when the Node as last seen
//! says otherwise, and an Event when a desired config is refused.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Event, Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::probe::ProbeResult;
use crate::names;

/// A Node condition as the agent wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: String,
    pub message: String,
}

impl Condition {
    pub fn mirror(result: &ProbeResult) -> Condition {
        Condition {
            type_: names::MIRROR_READY_CONDITION,
            status: if result.ready { "True" } else { "False" },
            reason: result.reason.to_string(),
            message: result.message.clone(),
        }
    }

    pub fn config(ok: bool, reason: &str, message: String) -> Condition {
        Condition {
            type_: names::NODE_CONFIG_CONDITION,
            status: if ok { "True" } else { "False" },
            reason: reason.to_string(),
            message,
        }
    }
}

/// Writes the Node's annotation and conditions when they differ from the Node last seen;
/// what could not be written is retried at the next [`NodeWriter::flush`].
pub struct NodeWriter {
    nodes: Api<Node>,
    events: Api<Event>,
    name: String,
    /// The Node as last seen (watch or patch answer); nothing is written before it is known.
    node: Option<Node>,
    want_annotation: Option<String>,
    want_conditions: BTreeMap<&'static str, Condition>,
}

impl NodeWriter {
    pub fn new(client: kube::Client, name: &str, namespace: &str) -> NodeWriter {
        NodeWriter {
            nodes: Api::all(client.clone()),
            events: Api::namespaced(client, namespace),
            name: name.to_string(),
            node: None,
            want_annotation: None,
            want_conditions: BTreeMap::new(),
        }
    }

    pub fn seen(&mut self, node: Node) {
        self.node = Some(node);
    }

    pub async fn annotation(&mut self, hash: &str) {
        self.want_annotation = Some(hash.to_string());
        self.flush().await;
    }

    pub async fn condition(&mut self, condition: Condition) {
        self.want_conditions.insert(condition.type_, condition);
        self.flush().await;
    }

    /// Writes whatever the Node does not show yet.
    pub async fn flush(&mut self) {
        let Some(node) = &self.node else { return };
        if let Some(hash) = &self.want_annotation
            && node.annotations().get(names::NODE_CONFIG_ANNOTATION) != Some(hash)
        {
            let patch = json!({"metadata": {"annotations": {names::NODE_CONFIG_ANNOTATION: hash}}});
            match self
                .nodes
                .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(updated) => self.node = Some(updated),
                Err(e) => {
                    tracing::warn!(node = %self.name, error = %e, "cannot annotate the Node; retrying later")
                }
            }
        }
        let Some(node) = &self.node else { return };
        let current = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .cloned()
            .unwrap_or_default();
        // Every condition of the agent goes in the patch, the unchanged ones as they are, so
        // that a server merging the list whole (not by `type`) keeps them too.
        let mut conditions = Vec::new();
        let mut changed = false;
        for want in self.want_conditions.values() {
            let existing = current.iter().find(|c| c.type_ == want.type_);
            let same = existing.is_some_and(|c| {
                c.status == want.status
                    && c.reason.as_deref() == Some(want.reason.as_str())
                    && c.message.as_deref() == Some(want.message.as_str())
            });
            if same {
                if let Some(c) = existing.and_then(|c| serde_json::to_value(c).ok()) {
                    conditions.push(c);
                }
                continue;
            }
            changed = true;
            let now =
                serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or_default();
            let transition = match existing {
                Some(c) if c.status == want.status => c
                    .last_transition_time
                    .as_ref()
                    .and_then(|t| serde_json::to_value(t).ok())
                    .unwrap_or_else(|| now.clone()),
                _ => now.clone(),
            };
            conditions.push(json!({
                "type": want.type_,
                "status": want.status,
                "reason": want.reason,
                "message": want.message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": transition,
            }));
        }
        if !changed {
            return;
        }
        // Strategic merge: Node conditions merge by `type`, the kubelet's stay as they are.
        let patch = json!({"status": {"conditions": conditions}});
        match self
            .nodes
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            Ok(updated) => self.node = Some(updated),
            Err(e) => {
                tracing::warn!(node = %self.name, error = %e, "cannot write the Node's conditions; retrying later")
            }
        }
    }

    /// A Warning Event on the refused Secret.
    pub async fn event(&self, secret: &Secret, message: &str) {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let event = Event {
            metadata: kube::api::ObjectMeta {
                generate_name: Some(format!("{}.", names::NODE_CONFIG_SECRET)),
                ..Default::default()
            },
            involved_object: secret.object_ref(&()),
            reason: Some("InvalidDesiredConfig".into()),
            message: Some(format!("node {}: {message}", self.name)),
            type_: Some("Warning".into()),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some(names::NODE_AGENT_NAME.into()),
                host: Some(self.name.clone()),
            }),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Default::default()
        };
        if let Err(e) = self.events.create(&PostParams::default(), &event).await {
            tracing::warn!(error = %e, "cannot record the refusal as an Event");
        }
    }
}
