//! The two-phase rollout of the nodes' mirror configuration (SPEC §9.4), as the controller
//! drives it through the workload Secret `registry-system/registry-node-config`.
//!
//! A *side* is one state of the mirror as nodes see it: its address, the CA its certificate
//! is signed by, and the `ro` credentials. When the side a cluster should have differs from
//! the one its nodes carry (a rotated root CA, a new `ro` password), the change goes out so
//! that no node is ever left without a working mirror:
//!
//! 1. `transition`: the registry accepts the old and the new credentials and trusts both CAs
//!    (its sync sidecars included), and keeps serving the certificate of the old CA; the
//!    nodes get both CAs and the old credentials. Once every Ready node carries this
//!    configuration's hash, the registry is switched to a certificate of the new CA.
//! 2. `final`: once the registry serves the new certificate on every replica, the nodes get
//!    the new side only. The old side stays accepted by the registry (`retiring`) until every
//!    Ready node carries the final hash; then it is dropped.
//!
//! A node that is not Ready holds the rollout back for at most the rollout timeout, counted
//! from the start of the phase; after that it is skipped, and its agent applies whatever is
//! current when it comes back. A Ready node that has not acked holds it back until it does:
//! moving on without it could leave it unable to pull. A further change that arrives during a
//! rollout waits for it to finish.
//!
//! The state lives in the Secret itself (key `rollout.json`), beside the files it renders, so
//! a restarted or another controller replica continues where the last one stopped.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::agent::desired;
use crate::hooks::patches::containerd::{self, MirrorSide, NodeConfig, Rollout, Route};
use crate::names;
use crate::oci::auth::Credentials;
use crate::render::objects::{b64, secret_data};

/// Key of the node-config Secret holding the rollout state; the agent does not read it.
pub const STATE_KEY: &str = "rollout.json";

/// Default of `serve --node-rollout-timeout`.
pub const DEFAULT_NODE_ROLLOUT_TIMEOUT: Duration = Duration::from_secs(600);

/// A side as stored in the rollout state.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSide {
    pub host: String,
    /// PEM of the CA (or CAs) the mirror's certificate is checked against.
    pub ca: String,
    pub username: String,
    pub password: String,
    /// Which images go through the mirror; `None`: none (Unmanaged).
    pub route: Option<Route>,
}

impl fmt::Debug for StoredSide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredSide")
            .field("host", &self.host)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl From<&MirrorSide> for StoredSide {
    fn from(side: &MirrorSide) -> Self {
        StoredSide {
            host: side.host.clone(),
            ca: side.ca_pem.clone(),
            username: side.ro.username.clone(),
            password: side.ro.password.clone(),
            route: side.route.clone(),
        }
    }
}

impl StoredSide {
    pub fn mirror_side(&self) -> MirrorSide {
        MirrorSide {
            host: self.host.clone(),
            ca_pem: self.ca.clone(),
            ro: self.credentials(),
            route: self.route.clone(),
        }
    }

    pub fn credentials(&self) -> Credentials {
        Credentials {
            username: self.username.clone(),
            password: self.password.clone(),
        }
    }
}

/// Where a cluster's node rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "camelCase")]
pub enum RolloutState {
    /// Nodes get `side`; `retiring` is still accepted by the registry until every Ready node
    /// acked the final configuration.
    Final {
        side: StoredSide,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retiring: Option<StoredSide>,
        /// When this phase began (RFC 3339).
        since: String,
    },
    /// Nodes get both sides, and the old credentials.
    Transition {
        old: StoredSide,
        new: StoredSide,
        since: String,
    },
}

impl RolloutState {
    /// When the current phase began.
    pub fn since(&self) -> Option<OffsetDateTime> {
        let (RolloutState::Final { since, .. } | RolloutState::Transition { since, .. }) = self;
        OffsetDateTime::parse(since, &Rfc3339).ok()
    }

    /// The node configuration this state renders.
    pub fn node_config(&self) -> NodeConfig {
        match self {
            RolloutState::Final { side, .. } => containerd::node_config(
                names::CONTAINERD_CERTS_DIR,
                &Rollout::Final(&side.mirror_side()),
            ),
            RolloutState::Transition { old, new, .. } => containerd::node_config(
                names::CONTAINERD_CERTS_DIR,
                &Rollout::Transition {
                    old: &old.mirror_side(),
                    new: &new.mirror_side(),
                },
            ),
        }
    }

    /// The phase's name, as the Secret's `phase` key holds it.
    pub fn phase(&self) -> &'static str {
        match self {
            RolloutState::Final { .. } => "final",
            RolloutState::Transition { .. } => "transition",
        }
    }

    /// The CAs the registry side trusts: the sync sidecars' `ca.crt` and the cluster's CA
    /// copy that bootstraps new machines. Newest first.
    pub fn trusted_cas(&self) -> Vec<&str> {
        let mut cas: Vec<&str> = match self {
            RolloutState::Final { side, retiring, .. } => {
                let mut cas = vec![side.ca.as_str()];
                cas.extend(retiring.iter().map(|r| r.ca.as_str()));
                cas
            }
            RolloutState::Transition { old, new, .. } => vec![new.ca.as_str(), old.ca.as_str()],
        };
        cas.dedup();
        cas
    }

    /// The `ro` credentials the registry accepts, newest first.
    pub fn accepted_ro(&self) -> Vec<Credentials> {
        let sides: Vec<&StoredSide> = match self {
            RolloutState::Final { side, retiring, .. } => {
                std::iter::once(side).chain(retiring.iter()).collect()
            }
            RolloutState::Transition { old, new, .. } => vec![new, old],
        };
        let mut out: Vec<Credentials> = Vec::new();
        for side in sides {
            let credentials = side.credentials();
            if !out.contains(&credentials) {
                out.push(credentials);
            }
        }
        out
    }
}

/// One Node as the rollout looks at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub ready: bool,
    /// The hash of the configuration its agent applied last.
    pub applied: Option<String>,
    /// `RegistryMirrorReady`: `Some((true, _))` when the node reaches the mirror, with the
    /// reason when it does not.
    pub mirror: Option<(bool, String)>,
}

impl NodeView {
    pub fn from_node(node: &Value) -> NodeView {
        let conditions = node["status"]["conditions"].as_array();
        let condition = |type_: &str| {
            conditions.and_then(|items| items.iter().find(|c| c["type"] == type_).cloned())
        };
        let ready = condition("Ready").is_some_and(|c| c["status"] == "True");
        let mirror = condition(names::MIRROR_READY_CONDITION).map(|c| {
            (
                c["status"] == "True",
                c["reason"].as_str().unwrap_or("Unknown").to_string(),
            )
        });
        NodeView {
            name: node["metadata"]["name"].as_str().unwrap_or("").to_string(),
            ready,
            applied: node["metadata"]["annotations"][names::NODE_CONFIG_ANNOTATION]
                .as_str()
                .map(str::to_string),
            mirror,
        }
    }
}

/// How far the nodes are with the configuration of the current phase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acks {
    pub total: usize,
    pub acked: usize,
    /// Nodes holding the phase back: Ready ones that have not acked, and NotReady ones
    /// within the timeout.
    pub waiting: Vec<String>,
    /// NotReady nodes skipped after the timeout.
    pub skipped: Vec<String>,
}

impl Acks {
    pub fn complete(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// Which nodes carry `hash`, the configuration of a phase that began at `since`.
pub fn acks(
    nodes: &[NodeView],
    hash: &str,
    since: Option<OffsetDateTime>,
    now: OffsetDateTime,
    timeout: Duration,
) -> Acks {
    let timed_out = since.is_none_or(|since| now - since >= timeout);
    let mut acks = Acks {
        total: nodes.len(),
        ..Acks::default()
    };
    for node in nodes {
        if node.applied.as_deref() == Some(hash) {
            acks.acked += 1;
        } else if !node.ready && timed_out {
            acks.skipped.push(node.name.clone());
        } else {
            acks.waiting.push(node.name.clone());
        }
    }
    acks
}

/// What the registry runs, as a rollout step needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryNow {
    /// Some replica does not run the current spec yet.
    NotReady,
    /// Every replica runs the current spec, with a certificate of an earlier root CA.
    Ready,
    /// Every replica runs the current spec and serves a certificate of the current root CA.
    ServesNew,
}

/// The rollout of one reconcile: what is stored, what the cluster should have, and the nodes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The node-config Secret as read.
    pub secret: Option<Value>,
    /// The state the Secret holds, or the one the nodes are known to have when it holds none.
    pub current: RolloutState,
    /// Whether `current` is what the Secret holds, rendered the same way.
    pub stored: bool,
    pub desired: StoredSide,
    pub nodes: Vec<NodeView>,
    pub timeout: Duration,
}

/// What a plan decides for the registry's serving certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signer {
    /// The certificate must be signed by this CA (PEM): kept while it is, issued from the
    /// root CA otherwise.
    Keep(String),
    /// A certificate of the root CA.
    Root,
}

/// What a step of the rollout did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub state: RolloutState,
    /// The node configuration's hash in the Secret after this step.
    pub hash: String,
    pub acks: Acks,
    /// A change waits for the registry: its replicas rolling to the new certificate, or the
    /// new mode's registry getting ready before nodes are routed to it.
    pub waiting_for_registry: bool,
    /// The Secret was written.
    pub written: bool,
    /// The state renders the side the cluster should have now (not one a later change is
    /// still waiting to replace).
    pub desired: bool,
}

impl Plan {
    /// The plan from the node-config Secret (if any), the side derived from the cluster's
    /// objects, and the Nodes. `fallback` is what the nodes carry when no state is stored: the
    /// side their bootstrap files were made from.
    pub fn new(
        secret: Option<&Value>,
        desired: &MirrorSide,
        fallback: &MirrorSide,
        nodes: &[Value],
        now: OffsetDateTime,
        timeout: Duration,
    ) -> Plan {
        let stored_state = secret
            .and_then(|s| secret_data(s, STATE_KEY))
            .and_then(|text| serde_json::from_str::<RolloutState>(&text).ok());
        let (current, stored) = match stored_state {
            Some(state) => {
                // The files must be the state's own rendering: a hand edit is repaired.
                let rendered = secret.is_some_and(|s| secret_matches(s, &state));
                (state, rendered)
            }
            None => (
                RolloutState::Final {
                    side: StoredSide::from(fallback),
                    retiring: None,
                    since: rfc3339(now),
                },
                false,
            ),
        };
        Plan {
            secret: secret.cloned(),
            current,
            stored,
            desired: StoredSide::from(desired),
            nodes: nodes.iter().map(NodeView::from_node).collect(),
            timeout,
        }
    }

    /// Acks of the current state's configuration.
    pub fn acks(&self, now: OffsetDateTime) -> Acks {
        acks(
            &self.nodes,
            &self.current.node_config().hash,
            self.current.since(),
            now,
            self.timeout,
        )
    }

    /// The state the registry side is deployed for: the current one, or the transition this
    /// reconcile starts. The registry accepts the new credentials and trusts the new CA before
    /// any node is told about them.
    pub fn registry_state(&self, now: OffsetDateTime) -> RolloutState {
        // Whether a transition starts, whatever holds it back: the registry side goes first.
        let (next, _) = self.next(now, RegistryNow::Ready);
        match (&self.current, &next) {
            (RolloutState::Final { .. }, RolloutState::Transition { .. }) => next,
            _ => self.current.clone(),
        }
    }

    /// The CA whose certificate the registry serves in the current state.
    pub fn signer(&self, now: OffsetDateTime) -> Signer {
        let serving = match &self.current {
            RolloutState::Final { side, .. } => &side.ca,
            RolloutState::Transition { old, new, .. } => {
                if old.ca != new.ca && !self.acks(now).complete() {
                    &old.ca
                } else {
                    &new.ca
                }
            }
        };
        if *serving == self.desired.ca {
            Signer::Root
        } else {
            Signer::Keep(serving.clone())
        }
    }

    /// The next state, and whether a change waits for the registry: nodes drop the old CA
    /// only once every replica serves a certificate of the new one, and nodes are sent to
    /// another route (a switch of modes) only once the registry of the new mode is ready.
    pub fn next(&self, now: OffsetDateTime, registry: RegistryNow) -> (RolloutState, bool) {
        let acks = self.acks(now);
        match &self.current {
            RolloutState::Final {
                side,
                retiring,
                since,
            } => {
                if retiring.is_some() {
                    if acks.complete() {
                        let state = RolloutState::Final {
                            side: side.clone(),
                            retiring: None,
                            since: since.clone(),
                        };
                        return (state, false);
                    }
                    // A further change waits for this rollout.
                    return (self.current.clone(), false);
                }
                if side == &self.desired {
                    return (self.current.clone(), false);
                }
                if side.route != self.desired.route && registry == RegistryNow::NotReady {
                    return (self.current.clone(), true);
                }
                let state = RolloutState::Transition {
                    old: side.clone(),
                    new: self.desired.clone(),
                    since: rfc3339(now),
                };
                (state, false)
            }
            RolloutState::Transition { old, new, .. } => {
                if !acks.complete() {
                    return (self.current.clone(), false);
                }
                if old.ca != new.ca && registry != RegistryNow::ServesNew {
                    return (self.current.clone(), true);
                }
                let state = RolloutState::Final {
                    side: new.clone(),
                    retiring: Some(old.clone()),
                    since: rfc3339(now),
                };
                (state, false)
            }
        }
    }
}

fn rfc3339(time: OffsetDateTime) -> String {
    time.replace_nanosecond(0)
        .unwrap_or(time)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// Whether the Secret's files are what `state` renders.
fn secret_matches(secret: &Value, state: &RolloutState) -> bool {
    desired::secret_data(&state.node_config())
        .iter()
        .all(|(key, value)| secret_data(secret, key).as_deref() == Some(value.as_str()))
}

/// The node-config Secret for `state`.
pub fn node_config_secret(state: &RolloutState) -> Value {
    let config = state.node_config();
    let mut data: BTreeMap<String, String> = desired::secret_data(&config)
        .into_iter()
        .map(|(k, v)| (k, b64(&v)))
        .collect();
    let state_json = serde_json::to_string(state).expect("a rollout state serializes");
    data.insert(STATE_KEY.to_string(), b64(&state_json));
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": names::NODE_CONFIG_SECRET,
            "namespace": names::REGISTRY_NAMESPACE,
            "labels": {names::MANAGED_BY_LABEL: names::FIELD_MANAGER},
        },
        "type": "Opaque",
        "data": data,
    })
}

impl Progress {
    /// The final configuration of the side wanted now, nothing retiring, on every node that
    /// counts.
    pub fn settled(&self) -> bool {
        self.desired
            && matches!(self.state, RolloutState::Final { retiring: None, .. })
            && self.acks.complete()
    }
}

/// "phase 1: 5 of 7 nodes" and who holds it back.
pub fn describe(progress: &Progress) -> String {
    let acks = &progress.acks;
    let phase = match &progress.state {
        RolloutState::Transition { .. } => "phase 1 of 2 (old and new accepted)",
        RolloutState::Final {
            retiring: Some(_), ..
        } => "phase 2 of 2 (new only)",
        RolloutState::Final { .. } => "current",
    };
    let mut message = format!(
        "node configuration {phase}: {} of {} nodes carry it",
        acks.acked, acks.total
    );
    if !acks.waiting.is_empty() {
        message.push_str(&format!("; waiting for {}", list(&acks.waiting)));
    }
    if !acks.skipped.is_empty() {
        message.push_str(&format!(
            "; skipped (NotReady past the rollout timeout): {}",
            list(&acks.skipped)
        ));
    }
    if progress.waiting_for_registry {
        message.push_str(match progress.state {
            RolloutState::Transition { .. } => {
                "; waiting for every registry replica to serve the new certificate"
            }
            // A new route waits for the new mode's registry.
            RolloutState::Final { .. } => "; waiting for the new mode's registry to be ready",
        });
    }
    message
}

/// "6 of 7 nodes reach the mirror; node-4: CertificateUntrusted".
pub fn describe_health(nodes: &[NodeView]) -> (bool, String) {
    let reporting: Vec<&NodeView> = nodes.iter().filter(|n| n.mirror.is_some()).collect();
    let ok = reporting
        .iter()
        .filter(|n| n.mirror.as_ref().is_some_and(|(ok, _)| *ok))
        .count();
    let failing: Vec<String> = reporting
        .iter()
        .filter_map(|n| match &n.mirror {
            Some((false, reason)) => Some(format!("{}: {reason}", n.name)),
            _ => None,
        })
        .collect();
    let mut message = format!("{ok} of {} nodes reach the mirror", nodes.len());
    let silent = nodes.len() - reporting.len();
    if silent > 0 {
        message.push_str(&format!("; {silent} not reporting yet"));
    }
    if !failing.is_empty() {
        message.push_str(&format!("; {}", list(&failing)));
    }
    (failing.is_empty() && silent == 0, message)
}

/// At most five names, then how many more.
fn list(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(ca: &str, password: &str) -> MirrorSide {
        MirrorSide {
            host: "10.96.0.20".into(),
            ca_pem: format!("-----BEGIN CERTIFICATE-----\n{ca}\n-----END CERTIFICATE-----\n"),
            ro: Credentials {
                username: "ro".into(),
                password: password.into(),
            },
            route: Some(Route::Default),
        }
    }

    fn node(name: &str, ready: bool, applied: Option<&str>) -> Value {
        let mut node = json!({
            "metadata": {"name": name, "annotations": {}},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        });
        if let Some(hash) = applied {
            node["metadata"]["annotations"][names::NODE_CONFIG_ANNOTATION] = json!(hash);
        }
        node
    }

    fn at(minutes: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
            + time::Duration::minutes(minutes)
    }

    const TIMEOUT: Duration = Duration::from_secs(600);

    fn plan(
        state: &RolloutState,
        desired: &MirrorSide,
        nodes: &[Value],
        now: OffsetDateTime,
    ) -> Plan {
        let secret = node_config_secret(state);
        let plan = Plan::new(Some(&secret), desired, desired, nodes, now, TIMEOUT);
        assert!(plan.stored);
        plan
    }

    #[test]
    fn a_fresh_cluster_starts_final_with_its_bootstrap_side() {
        // The agent checks the CA bundle: a real one.
        let ca = crate::certs::CertificateAuthority::generate(
            crate::cli::KeyAlgorithm::EcdsaP256,
            at(0),
        )
        .unwrap();
        let a = MirrorSide {
            ca_pem: ca.cert_pem().to_string(),
            ..side("A", "pw")
        };
        let plan = Plan::new(None, &a, &a, &[], at(0), TIMEOUT);
        assert!(!plan.stored);
        let (next, _) = plan.next(at(0), RegistryNow::ServesNew);
        assert!(
            matches!(&next, RolloutState::Final { side, retiring: None, .. } if side.ca == a.ca_pem)
        );
        // The Secret round-trips: stored, and the agent reads it.
        let secret = node_config_secret(&next);
        let again = Plan::new(Some(&secret), &a, &a, &[], at(1), TIMEOUT);
        assert!(again.stored);
        assert_eq!(again.current, next);
        let data: BTreeMap<String, k8s_openapi::ByteString> = secret["data"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                use base64::Engine;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap())
                    .unwrap();
                (k.clone(), k8s_openapi::ByteString(bytes))
            })
            .collect();
        let parsed = desired::parse("s", &data, names::CONTAINERD_CERTS_DIR).unwrap();
        assert_eq!(parsed.hash, next.node_config().hash);
    }

    #[test]
    fn a_ca_rotation_goes_through_both_phases_in_order() {
        let old = side("OLD", "pw");
        let new = side("NEW", "pw");
        let start = RolloutState::Final {
            side: StoredSide::from(&old),
            retiring: None,
            since: rfc3339(at(0)),
        };
        // The root CA changed: a transition starts, the registry keeps the old certificate.
        let p = plan(&start, &new, &[node("n1", true, None)], at(1));
        assert_eq!(p.signer(at(1)), Signer::Keep(old.ca_pem.clone()));
        let (transition, _) = p.next(at(1), RegistryNow::Ready);
        let RolloutState::Transition { .. } = &transition else {
            panic!("expected a transition, got {transition:?}");
        };
        assert_eq!(
            transition.trusted_cas(),
            [new.ca_pem.as_str(), old.ca_pem.as_str()]
        );
        let t_hash = transition.node_config().hash;

        // One Ready node has not acked: the transition holds, old certificate still served.
        let nodes = [node("n1", true, Some(&t_hash)), node("n2", true, None)];
        let p = plan(&transition, &new, &nodes, at(30));
        assert_eq!(p.signer(at(30)), Signer::Keep(old.ca_pem.clone()));
        assert_eq!(p.next(at(30), RegistryNow::Ready).0, transition);
        assert_eq!(p.acks(at(30)).waiting, ["n2"]);

        // Every node acked: the registry switches to the new CA, then the nodes follow.
        let nodes = [
            node("n1", true, Some(&t_hash)),
            node("n2", true, Some(&t_hash)),
        ];
        let p = plan(&transition, &new, &nodes, at(31));
        assert_eq!(p.signer(at(31)), Signer::Root);
        let (held, waiting) = p.next(at(31), RegistryNow::Ready);
        assert_eq!(held, transition);
        assert!(
            waiting,
            "the final phase waits for the registry's new certificate"
        );
        let (final_state, _) = p.next(at(32), RegistryNow::ServesNew);
        let RolloutState::Final {
            side,
            retiring: Some(retiring),
            ..
        } = &final_state
        else {
            panic!("expected final with the old side retiring, got {final_state:?}");
        };
        assert_eq!(side.ca, new.ca_pem);
        assert_eq!(retiring.ca, old.ca_pem);
        // Old and new both still trusted by the registry side until every node is final.
        assert_eq!(final_state.trusted_cas().len(), 2);

        let f_hash = final_state.node_config().hash;
        let nodes = [
            node("n1", true, Some(&f_hash)),
            node("n2", true, Some(&f_hash)),
        ];
        let p = plan(&final_state, &new, &nodes, at(33));
        let (done, _) = p.next(at(33), RegistryNow::ServesNew);
        assert!(matches!(&done, RolloutState::Final { retiring: None, .. }));
        assert_eq!(done.trusted_cas(), [new.ca_pem.as_str()]);
        // Steady: nothing changes any more.
        let p = plan(&done, &new, &nodes, at(40));
        assert_eq!(p.next(at(40), RegistryNow::ServesNew).0, done);
    }

    #[test]
    fn new_credentials_are_accepted_before_nodes_use_them() {
        let old = side("CA", "old-password");
        let new = side("CA", "new-password");
        let start = RolloutState::Final {
            side: StoredSide::from(&old),
            retiring: None,
            since: rfc3339(at(0)),
        };
        let (transition, _) = plan(&start, &new, &[], at(1)).next(at(1), RegistryNow::Ready);
        let accepted = transition.accepted_ro();
        assert_eq!(accepted.len(), 2);
        // Nodes still send the old credentials in the transition.
        let hosts = &transition.node_config().files[containerd::DEFAULT_HOSTS_FILE];
        assert!(hosts.contains(&old.ro.basic_header()));
        assert!(!hosts.contains(&new.ro.basic_header()));
        // Same CA: no certificate switch to wait for.
        let (final_state, waiting) =
            plan(&transition, &new, &[], at(2)).next(at(2), RegistryNow::Ready);
        assert!(!waiting);
        assert!(
            final_state.node_config().files[containerd::DEFAULT_HOSTS_FILE]
                .contains(&new.ro.basic_header())
        );
        assert_eq!(
            final_state.accepted_ro().len(),
            2,
            "old kept until nodes ack final"
        );
    }

    #[test]
    fn not_ready_nodes_hold_the_rollout_only_until_the_timeout() {
        let nodes = [
            NodeView {
                name: "up".into(),
                ready: true,
                applied: Some("h".into()),
                mirror: None,
            },
            NodeView {
                name: "down".into(),
                ready: false,
                applied: None,
                mirror: None,
            },
        ];
        let within = acks(&nodes, "h", Some(at(0)), at(9), TIMEOUT);
        assert_eq!(within.waiting, ["down"]);
        let after = acks(&nodes, "h", Some(at(0)), at(10), TIMEOUT);
        assert!(after.complete());
        assert_eq!(after.skipped, ["down"]);
        // A Ready node that never acks is never skipped.
        let stuck = [NodeView {
            ready: true,
            applied: Some("other".into()),
            ..nodes[0].clone()
        }];
        assert!(!acks(&stuck, "h", Some(at(0)), at(600), TIMEOUT).complete());
    }

    #[test]
    fn a_change_during_a_rollout_waits_for_it() {
        let a = side("A", "pw");
        let b = side("B", "pw");
        let c = side("C", "pw");
        let transition = RolloutState::Transition {
            old: StoredSide::from(&a),
            new: StoredSide::from(&b),
            since: rfc3339(at(0)),
        };
        // Desired moved on to C: the A→B transition completes first.
        let t_hash = transition.node_config().hash;
        let p = plan(&transition, &c, &[node("n", true, Some(&t_hash))], at(1));
        let (next, _) = p.next(at(1), RegistryNow::ServesNew);
        assert!(matches!(&next, RolloutState::Final { side, .. } if side.ca == b.ca_pem));
        let f_hash = next.node_config().hash;
        let p = plan(&next, &c, &[node("n", true, Some(&f_hash))], at(2));
        let (done, _) = p.next(at(2), RegistryNow::ServesNew);
        let p = plan(&done, &c, &[node("n", true, Some(&f_hash))], at(3));
        let (again, _) = p.next(at(3), RegistryNow::ServesNew);
        assert!(
            matches!(&again, RolloutState::Transition { old, new, .. } if old.ca == b.ca_pem && new.ca == c.ca_pem)
        );
    }

    #[test]
    fn a_hand_edited_secret_is_not_taken_as_stored() {
        let a = side("A", "pw");
        let state = RolloutState::Final {
            side: StoredSide::from(&a),
            retiring: None,
            since: rfc3339(at(0)),
        };
        let mut secret = node_config_secret(&state);
        secret["data"][names::NODE_CONFIG_HOSTS_KEY] = json!(b64("edited"));
        let plan = Plan::new(Some(&secret), &a, &a, &[], at(1), TIMEOUT);
        assert!(!plan.stored);
        assert_eq!(plan.current, state);
    }

    #[test]
    fn health_summary_names_failing_nodes() {
        let view = |name: &str, mirror: Option<(bool, &str)>| NodeView {
            name: name.into(),
            ready: true,
            applied: None,
            mirror: mirror.map(|(ok, r)| (ok, r.to_string())),
        };
        let (ok, message) = describe_health(&[
            view("node-1", Some((true, "Reachable"))),
            view("node-4", Some((false, "CertificateUntrusted"))),
        ]);
        assert!(!ok);
        assert_eq!(
            message,
            "1 of 2 nodes reach the mirror; node-4: CertificateUntrusted"
        );
        let (ok, _) = describe_health(&[view("node-1", Some((true, "Reachable")))]);
        assert!(ok);
    }
}
