//! The registry workload (SPEC §6) as Kubernetes objects, and the same inputs as the values
//! of the registry Helm chart under `helm/registry`. The chart renders the same objects from
//! these values; a test (`tests/chart_values.rs` with `tests/charts/`) holds the two together.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cli::AddonOptions;
use crate::names;
use crate::wire::variable::RegistryConfig;

/// The registry chart's values, exactly as `helm/registry/values.yaml` names them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryValues {
    /// CNCF Distribution image.
    pub image: String,
    /// Image of the `registry-addon sync` sidecar.
    pub sync_image: String,
    pub image_pull_policy: String,
    pub replicas: u8,
    /// The fixed ClusterIP nodes pull from.
    #[serde(rename = "serviceIP")]
    pub service_ip: String,
    /// SHA-256 of the server certificate: a pod-template annotation, so a renewal rolls the pods.
    pub certificate_hash: String,
    /// Go duration between two sync rounds.
    pub sync_interval: String,
    pub storage: StorageValues,
    pub control_plane: ControlPlaneValues,
    pub resources: ResourceValues,
    /// Push notifications to the sync sidecar; left out of the values while off.
    #[serde(default, skip_serializing_if = "NotificationValues::is_off")]
    pub notifications: NotificationValues,
}

/// The registry notifies the sync sidecar of every tag pushed, which copies it to the
/// other replicas at once; the rounds stay as the safety net.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationValues {
    /// Secret (in the registry's namespace) holding the bearer token the registry sends
    /// and the sidecar checks; empty: notifications off.
    pub token_secret: String,
    /// Key of the token in that Secret.
    pub token_key: String,
}

impl Default for NotificationValues {
    fn default() -> Self {
        NotificationValues {
            token_secret: String::new(),
            token_key: "token".into(),
        }
    }
}

impl NotificationValues {
    pub fn is_off(&self) -> bool {
        *self == NotificationValues::default()
    }
}

/// Where the sync sidecar listens, on the pod's loopback, for the registry's notifications.
pub const SYNC_NOTIFY_ADDR: &str = "127.0.0.1:5002";

/// The registry's `notifications.endpoints` (Distribution parses YAML in the variable):
/// tag pushes only, no blob or pull events. `$(REGISTRY_NOTIFY_TOKEN)` is expanded by the
/// kubelet from the variable defined before it.
pub fn notification_endpoints() -> String {
    format!(
        "- name: sync\n  url: http://{SYNC_NOTIFY_ADDR}/events\n  headers:\n    \
         Authorization: [\"Bearer $(REGISTRY_NOTIFY_TOKEN)\"]\n  timeout: 5s\n  \
         threshold: 3\n  backoff: 1s\n  ignore:\n    \
         mediatypes: [application/octet-stream]\n    actions: [pull, delete]\n"
    )
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageValues {
    pub size: String,
    /// Empty: the cluster's default StorageClass.
    pub storage_class_name: String,
}

/// Where the replicas may run: at AfterControlPlaneInitialized only control-plane nodes
/// exist, so they are tolerated by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlaneValues {
    /// Tolerate the control-plane `NoSchedule` taint.
    pub tolerate: bool,
    /// Prefer control-plane nodes (soft node affinity).
    pub prefer: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceValues {
    pub registry: ContainerResources,
    pub front: ContainerResources,
    pub sync: ContainerResources,
}

/// Requests and limits of one container. An empty map is written as `null`: Helm merges an
/// empty map with the chart's defaults, while `null` removes them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerResources {
    #[serde(
        default,
        serialize_with = "empty_as_null",
        deserialize_with = "null_as_empty"
    )]
    pub requests: BTreeMap<String, String>,
    #[serde(
        default,
        serialize_with = "empty_as_null",
        deserialize_with = "null_as_empty"
    )]
    pub limits: BTreeMap<String, String>,
}

fn empty_as_null<S: serde::Serializer>(
    map: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    if map.is_empty() {
        s.serialize_none()
    } else {
        map.serialize(s)
    }
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default())
}

impl ContainerResources {
    fn new(requests: &[(&str, &str)]) -> Self {
        ContainerResources {
            requests: requests
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            limits: BTreeMap::new(),
        }
    }

    /// A container's `resources` without empty maps, or none at all (as the chart's `with`
    /// blocks do).
    fn to_value(&self) -> Option<Value> {
        let mut resources = serde_json::Map::new();
        if !self.requests.is_empty() {
            resources.insert("requests".into(), json!(self.requests));
        }
        if !self.limits.is_empty() {
            resources.insert("limits".into(), json!(self.limits));
        }
        (!resources.is_empty()).then_some(Value::Object(resources))
    }
}

impl RegistryValues {
    pub fn new(
        options: &AddonOptions,
        registry: &RegistryConfig,
        service_ip: IpAddr,
        certificate_hash: String,
    ) -> Self {
        RegistryValues {
            image: options.registry_image.clone(),
            sync_image: options.sync_image.clone(),
            image_pull_policy: "IfNotPresent".into(),
            replicas: registry.replicas,
            service_ip: service_ip.to_string(),
            certificate_hash,
            sync_interval: registry.sync_interval.clone(),
            storage: StorageValues {
                size: registry.storage.size.clone(),
                storage_class_name: registry
                    .storage
                    .storage_class_name
                    .clone()
                    .unwrap_or_default(),
            },
            control_plane: ControlPlaneValues {
                tolerate: true,
                prefer: false,
            },
            resources: ResourceValues {
                registry: ContainerResources::new(&[("cpu", "100m"), ("memory", "128Mi")]),
                front: ContainerResources::new(&[("cpu", "50m"), ("memory", "32Mi")]),
                sync: ContainerResources::new(&[("cpu", "20m"), ("memory", "64Mi")]),
            },
            notifications: NotificationValues {
                token_secret: names::REGISTRY_AUTH_SECRET.into(),
                token_key: names::AUTH_NOTIFY_TOKEN_KEY.into(),
            },
        }
    }
}

/// Labels of every object; the first two also select the pods.
fn labels() -> Value {
    json!({
        "app.kubernetes.io/name": names::REGISTRY_NAME,
        "app.kubernetes.io/part-of": "registry-addon",
        "app.kubernetes.io/component": "registry",
    })
}

fn selector_labels() -> Value {
    json!({
        "app.kubernetes.io/name": names::REGISTRY_NAME,
        "app.kubernetes.io/part-of": "registry-addon",
    })
}

fn metadata(name: &str) -> Value {
    json!({
        "name": name,
        "namespace": names::REGISTRY_NAMESPACE,
        "labels": labels(),
    })
}

/// Every object of the registry workload in namespace `registry-system`, in apply order
/// (not the Namespace and not the `registry-tls` Secret, which the hooks manage).
pub fn registry_objects(values: &RegistryValues) -> Vec<Value> {
    vec![
        headless_service(),
        service(values),
        pod_disruption_budget(),
        stateful_set(values),
    ]
    .into_iter()
    .chain(node_agent_objects(values))
    .collect()
}

fn headless_service() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(names::REGISTRY_HEADLESS_SERVICE),
        "spec": {
            "clusterIP": "None",
            // Peers must find each other while they start, before they are Ready.
            "publishNotReadyAddresses": true,
            "selector": selector_labels(),
            "ports": [{
                "name": "registry",
                "port": names::REGISTRY_PORT,
                "targetPort": "registry",
                "protocol": "TCP",
            }],
        },
    })
}

fn service(values: &RegistryValues) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(names::REGISTRY_NAME),
        "spec": {
            "type": "ClusterIP",
            "clusterIP": values.service_ip,
            // The replicas keep uploads in their own storage: a push must reach one replica
            // from its first request to its last.
            "sessionAffinity": "ClientIP",
            "selector": selector_labels(),
            "ports": [{
                "name": "https",
                "port": names::REGISTRY_SERVICE_PORT,
                "targetPort": "registry",
                "protocol": "TCP",
            }],
        },
    })
}

fn pod_disruption_budget() -> Value {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(names::REGISTRY_NAME),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels()},
        },
    })
}

fn push(array: &mut Value, item: Value) {
    if let Some(items) = array.as_array_mut() {
        items.push(item);
    }
}

/// Where the sync sidecar mounts its directory of the registry's volume, and that directory.
const SYNC_STATE_DIR: &str = "/var/lib/registry-addon-sync";
const SYNC_STATE_SUBPATH: &str = "registry-addon-sync";
/// Where the front and the sync sidecar find their parts of `registry-auth`.
const FRONT_AUTH_DIR: &str = "/etc/registry-addon/front";
const SYNC_AUTH_DIR: &str = "/etc/registry-addon/sync";

fn stateful_set(values: &RegistryValues) -> Value {
    let probe = |path: &str, initial_delay: u32, period: u32| {
        json!({
            "httpGet": {"path": path, "port": "front-metrics", "scheme": "HTTP"},
            "initialDelaySeconds": initial_delay,
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        })
    };
    let container_security = json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    });
    let loopback = format!("127.0.0.1:{}", names::REGISTRY_LOOPBACK_PORT);
    // Distribution serves plain HTTP on the pod's loopback only; the front is its one way in.
    let mut registry = json!({
        "name": "registry",
        "image": values.image,
        "imagePullPolicy": values.image_pull_policy,
        "env": [
            {"name": "REGISTRY_HTTP_ADDR", "value": loopback},
            // Upload URLs relative to the request, whatever host the client used.
            {"name": "REGISTRY_HTTP_RELATIVEURLS", "value": "true"},
            {"name": "REGISTRY_HTTP_SECRET", "valueFrom": {"secretKeyRef": {
                "name": names::REGISTRY_AUTH_SECRET, "key": names::AUTH_HTTP_SECRET_KEY,
            }}},
            {"name": "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY", "value": "/var/lib/registry"},
        ],
        "securityContext": container_security,
        "volumeMounts": [
            {"name": "data", "mountPath": "/var/lib/registry"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    });
    let mut front = json!({
        "name": "front",
        "image": values.sync_image,
        "imagePullPolicy": values.image_pull_policy,
        "args": [
            "front",
            "--listen", format!("0.0.0.0:{}", names::REGISTRY_PORT),
            "--tls-cert-file", "/certs/tls.crt",
            "--tls-key-file", "/certs/tls.key",
            "--upstream", format!("http://{loopback}"),
            "--pull-users", format!("{FRONT_AUTH_DIR}/{}", names::AUTH_PULL_USERS_KEY),
            "--push-users", format!("{FRONT_AUTH_DIR}/{}", names::AUTH_PUSH_USERS_KEY),
            "--metrics-listen", format!("0.0.0.0:{}", names::FRONT_METRICS_PORT),
        ],
        "ports": [
            {"name": "registry", "containerPort": names::REGISTRY_PORT, "protocol": "TCP"},
            {"name": "front-metrics", "containerPort": names::FRONT_METRICS_PORT, "protocol": "TCP"},
        ],
        // Ready once the registry behind it answers.
        "readinessProbe": probe("/readyz", 1, 10),
        "livenessProbe": probe("/healthz", 5, 20),
        "securityContext": container_security,
        "volumeMounts": [
            {"name": "tls", "mountPath": "/certs", "readOnly": true},
            {"name": "front-auth", "mountPath": FRONT_AUTH_DIR, "readOnly": true},
        ],
    });
    let mut sync = json!({
        "name": "sync",
        "image": values.sync_image,
        "imagePullPolicy": values.image_pull_policy,
        "args": [
            "sync",
            "--statefulset-peers",
            "--headless-service", names::REGISTRY_HEADLESS_SERVICE,
            "--replicas", values.replicas.to_string(),
            "--interval", values.sync_interval,
            "--ca-file", "/certs/ca.crt",
            // Its own registry straight on the loopback; the peers through their fronts, as
            // the sync user.
            "--local", format!("http://{loopback}"),
            "--credentials-file", format!("{SYNC_AUTH_DIR}/{}", names::AUTH_SYNC_CREDENTIALS_KEY),
            "--metrics-listen", format!("0.0.0.0:{}", names::SYNC_METRICS_PORT),
            // On the replica's volume, so that the digests agreed with the peers survive
            // restarts and a push just before one is not reverted.
            "--state-file", format!("{SYNC_STATE_DIR}/agreed.json"),
        ],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ],
        "ports": [{"name": "sync-metrics", "containerPort": names::SYNC_METRICS_PORT, "protocol": "TCP"}],
        "securityContext": container_security,
        "volumeMounts": [
            {"name": "tls", "mountPath": "/certs", "readOnly": true},
            {"name": "sync-auth", "mountPath": SYNC_AUTH_DIR, "readOnly": true},
            // Only its own directory of the registry's volume, beside Distribution's
            // docker/registry/v2 tree, which never looks at it.
            {"name": "data", "mountPath": SYNC_STATE_DIR, "subPath": SYNC_STATE_SUBPATH},
        ],
    });

    let notify = &values.notifications;
    if !notify.token_secret.is_empty() {
        let token = json!({"name": "REGISTRY_NOTIFY_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": notify.token_secret, "key": notify.token_key,
        }}});
        push(&mut registry["env"], token.clone());
        push(
            &mut registry["env"],
            json!({"name": "REGISTRY_NOTIFICATIONS_ENDPOINTS", "value": notification_endpoints()}),
        );
        // Distribution logs its endpoints, headers and so the token included, at info.
        push(
            &mut registry["env"],
            json!({"name": "REGISTRY_LOG_LEVEL", "value": "warn"}),
        );
        push(&mut sync["env"], token);
        push(&mut sync["args"], json!("--notify-listen"));
        push(&mut sync["args"], json!(SYNC_NOTIFY_ADDR));
    }

    for (container, resources) in [
        (&mut registry, &values.resources.registry),
        (&mut front, &values.resources.front),
        (&mut sync, &values.resources.sync),
    ] {
        if let Some(resources) = resources.to_value() {
            container["resources"] = resources;
        }
    }

    let mut affinity = json!({
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 100,
                "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": selector_labels()},
                },
            }],
        },
    });
    if values.control_plane.prefer {
        affinity["nodeAffinity"] = json!({
            "preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 50,
                "preference": {"matchExpressions": [
                    {"key": names::CONTROL_PLANE_NODE_ROLE, "operator": "Exists"},
                ]},
            }],
        });
    }

    let mut pod_spec = json!({
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "fsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "affinity": affinity,
        "containers": [registry, front, sync],
        // Each container sees only its part of `registry-auth`.
        "volumes": [
            {"name": "tls", "secret": {"secretName": names::REGISTRY_TLS_SECRET}},
            {"name": "front-auth", "secret": {
                "secretName": names::REGISTRY_AUTH_SECRET,
                "items": [
                    {"key": names::AUTH_PULL_USERS_KEY, "path": names::AUTH_PULL_USERS_KEY},
                    {"key": names::AUTH_PUSH_USERS_KEY, "path": names::AUTH_PUSH_USERS_KEY},
                ],
            }},
            {"name": "sync-auth", "secret": {
                "secretName": names::REGISTRY_AUTH_SECRET,
                "items": [
                    {"key": names::AUTH_SYNC_CREDENTIALS_KEY, "path": names::AUTH_SYNC_CREDENTIALS_KEY},
                ],
            }},
            {"name": "tmp", "emptyDir": {}},
        ],
    });
    if values.control_plane.tolerate {
        pod_spec["tolerations"] = json!([{
            "key": names::CONTROL_PLANE_NODE_ROLE,
            "operator": "Exists",
            "effect": "NoSchedule",
        }]);
    }

    let mut claim_spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": values.storage.size}},
    });
    if !values.storage.storage_class_name.is_empty() {
        claim_spec["storageClassName"] = json!(values.storage.storage_class_name);
    }

    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(names::REGISTRY_NAME),
        "spec": {
            "replicas": values.replicas,
            "serviceName": names::REGISTRY_HEADLESS_SERVICE,
            // Replicas are peers, not a chain: start and replace them all at once.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": selector_labels()},
            "template": {
                "metadata": {
                    "labels": labels(),
                    "annotations": {names::CERTIFICATE_HASH_ANNOTATION: values.certificate_hash},
                },
                "spec": pod_spec,
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data", "labels": labels()},
                "spec": claim_spec,
            }],
        },
    })
}

/// Labels of the node agent's objects; the first two select its pods.
fn node_agent_labels() -> Value {
    json!({
        "app.kubernetes.io/name": names::NODE_AGENT_NAME,
        "app.kubernetes.io/part-of": "registry-addon",
        "app.kubernetes.io/component": "node-agent",
    })
}

fn node_agent_selector_labels() -> Value {
    json!({
        "app.kubernetes.io/name": names::NODE_AGENT_NAME,
        "app.kubernetes.io/part-of": "registry-addon",
    })
}

fn node_agent_metadata(namespaced: bool) -> Value {
    let mut metadata = json!({"name": names::NODE_AGENT_NAME, "labels": node_agent_labels()});
    if namespaced {
        metadata["namespace"] = json!(names::REGISTRY_NAMESPACE);
    }
    metadata
}

/// The node agent (`registry-addon node-agent`) on every node, and its permissions: read the
/// desired-config Secret only (by name), record refusals as Events, and patch Nodes (the
/// applied-config annotation) and their status (the conditions). Reading Nodes (get, list,
/// watch) is what a watch of its own Node needs; list and watch cannot be narrowed by name in
/// a ClusterRole whose node names are unknown.
pub fn node_agent_objects(values: &RegistryValues) -> Vec<Value> {
    let subject = json!([{
        "kind": "ServiceAccount",
        "name": names::NODE_AGENT_NAME,
        "namespace": names::REGISTRY_NAMESPACE,
    }]);
    vec![
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": node_agent_metadata(true),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": node_agent_metadata(true),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "resourceNames": [names::NODE_CONFIG_SECRET],
                    "verbs": ["get", "list", "watch"],
                },
                {
                    "apiGroups": [""],
                    "resources": ["events"],
                    "verbs": ["create"],
                },
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": node_agent_metadata(true),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": names::NODE_AGENT_NAME,
            },
            "subjects": subject,
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": node_agent_metadata(false),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["nodes"],
                    "verbs": ["get", "list", "watch", "patch"],
                },
                {
                    "apiGroups": [""],
                    "resources": ["nodes/status"],
                    "verbs": ["patch"],
                },
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": node_agent_metadata(false),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": names::NODE_AGENT_NAME,
            },
            "subjects": subject,
        }),
        node_agent_daemon_set(values),
    ]
}

fn node_agent_daemon_set(values: &RegistryValues) -> Value {
    let port = names::NODE_AGENT_METRICS_PORT;
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": node_agent_metadata(true),
        "spec": {
            "selector": {"matchLabels": node_agent_selector_labels()},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
            "template": {
                "metadata": {"labels": node_agent_labels()},
                "spec": {
                    "serviceAccountName": names::NODE_AGENT_NAME,
                    // The probe takes the node's own network path to the mirror, as containerd does.
                    "hostNetwork": true,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "priorityClassName": "system-node-critical",
                    // Every node, whatever its taints: a node the agent skips is a node nobody watches.
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{
                        "name": "node-agent",
                        "image": values.sync_image,
                        "imagePullPolicy": values.image_pull_policy,
                        "args": [
                            "node-agent",
                            "--certs-dir", names::CONTAINERD_CERTS_DIR,
                            "--metrics-listen", format!("0.0.0.0:{port}"),
                        ],
                        "env": [{
                            "name": "NODE_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
                        }],
                        "ports": [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": port}},
                        "resources": {
                            "requests": {"cpu": "10m", "memory": "16Mi"},
                            "limits": {"memory": "64Mi"},
                        },
                        // Root, only for the hostPath: containerd's hosts directory and its files
                        // belong to root (the hosts file is 0600), and no capability is needed
                        // to write files one owns.
                        "securityContext": {
                            "runAsUser": 0,
                            "runAsNonRoot": false,
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "volumeMounts": [{
                            "name": "containerd-hosts",
                            "mountPath": names::CONTAINERD_CERTS_DIR,
                        }],
                    }],
                    "volumes": [{
                        "name": "containerd-hosts",
                        "hostPath": {"path": names::CONTAINERD_CERTS_DIR, "type": "DirectoryOrCreate"},
                    }],
                },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::variable::registry_from_config;
    use clap::Parser;

    #[derive(Parser)]
    struct Options {
        #[command(flatten)]
        addon: AddonOptions,
    }

    fn values(registry: Value) -> RegistryValues {
        let options = Options::parse_from(["test"]).addon;
        let config = json!({"addons": {"registry": registry}});
        let registry = registry_from_config(Some(&config)).unwrap().unwrap();
        RegistryValues::new(
            &options,
            &registry,
            "10.96.0.20".parse().unwrap(),
            "abc".into(),
        )
    }

    #[test]
    fn every_namespaced_object_is_in_registry_system() {
        for object in registry_objects(&values(json!({}))) {
            assert!(object["apiVersion"].is_string() && object["kind"].is_string());
            assert!(object["metadata"]["name"].is_string());
            if object["kind"] == "ClusterRole" || object["kind"] == "ClusterRoleBinding" {
                assert!(object["metadata"].get("namespace").is_none());
            } else {
                assert_eq!(object["metadata"]["namespace"], names::REGISTRY_NAMESPACE);
            }
        }
    }

    #[test]
    fn values_follow_the_variable() {
        let v = values(
            json!({"replicas": 3, "storage": {"size": "5Gi", "storageClassName": "fast"}, "syncInterval": "30s"}),
        );
        let objects = registry_objects(&v);
        let sts = objects.iter().find(|o| o["kind"] == "StatefulSet").unwrap();
        assert_eq!(sts["spec"]["replicas"], 3);
        let claim = &sts["spec"]["volumeClaimTemplates"][0]["spec"];
        assert_eq!(claim["storageClassName"], "fast");
        assert_eq!(claim["resources"]["requests"]["storage"], "5Gi");
        let args = sts["spec"]["template"]["spec"]["containers"][2]["args"]
            .as_array()
            .unwrap();
        let after = |flag: &str| args.iter().position(|a| a == flag).map(|i| &args[i + 1]);
        assert_eq!(after("--replicas").unwrap(), "3");
        assert_eq!(after("--interval").unwrap(), "30s");
        // The sync state lies on the PVC, in a directory of its own.
        let state = after("--state-file").unwrap().as_str().unwrap();
        let sync = &sts["spec"]["template"]["spec"]["containers"][2];
        let mount = sync["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "data")
            .unwrap();
        assert!(state.starts_with(&format!("{}/", mount["mountPath"].as_str().unwrap())));
        assert_eq!(mount["subPath"], "registry-addon-sync");
        assert!(mount.get("readOnly").is_none());
        let annotations = &sts["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations[names::CERTIFICATE_HASH_ANNOTATION], "abc");
        let svc = objects
            .iter()
            .find(|o| o["metadata"]["name"] == "registry" && o["kind"] == "Service")
            .unwrap();
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.20");
    }

    #[test]
    fn default_storage_class_is_omitted() {
        let objects = registry_objects(&values(json!({})));
        let sts = objects.iter().find(|o| o["kind"] == "StatefulSet").unwrap();
        assert!(
            sts["spec"]["volumeClaimTemplates"][0]["spec"]
                .get("storageClassName")
                .is_none()
        );
    }

    #[test]
    fn node_agent_is_confined_to_the_hosts_directory() {
        let objects = node_agent_objects(&values(json!({})));
        let ds = objects.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
        assert_eq!(ds["metadata"]["name"], names::NODE_AGENT_NAME);
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
        assert_eq!(
            pod["volumes"],
            json!([{"name": "containerd-hosts", "hostPath": {"path": "/etc/containerd/certs.d", "type": "DirectoryOrCreate"}}])
        );
        let container = &pod["containers"][0];
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(
            container["securityContext"]["capabilities"]["drop"],
            json!(["ALL"])
        );
        assert_eq!(
            container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.nodeName"
        );
        let role = objects.iter().find(|o| o["kind"] == "Role").unwrap();
        assert_eq!(
            role["rules"][0]["resourceNames"],
            json!([names::NODE_CONFIG_SECRET])
        );
        let cluster_role = objects.iter().find(|o| o["kind"] == "ClusterRole").unwrap();
        for rule in cluster_role["rules"].as_array().unwrap() {
            for verb in rule["verbs"].as_array().unwrap() {
                assert!(["get", "list", "watch", "patch"].contains(&verb.as_str().unwrap()));
            }
        }
    }
}
