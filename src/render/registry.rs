//! The registry workload (SPEC §6) as Kubernetes objects, and the same inputs as the values
//! of the registry Helm chart under `helm/registry`. The chart renders the same objects from
//! these values; a test (`tests/chart_values.rs` with `tests/charts/`) holds the two together.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cli::AddonOptions;
use crate::names;
use crate::wire::variable::{Mode, RegistryConfig};

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
    /// Push notifications to the sync sidecar (Local only); left out of the values while off.
    #[serde(default, skip_serializing_if = "NotificationValues::is_off")]
    pub notifications: NotificationValues,
    /// What is deployed: Local (StatefulSet with its copy), Proxy (StatefulSet caching the
    /// upstream), Direct (Deployment of the front forwarding to the upstream) or Unmanaged
    /// (only the node agent).
    pub mode: Mode,
    /// The upstream of Proxy and Direct.
    pub upstream: UpstreamValues,
}

/// Where Proxy and Direct take images from, and what of its Secret the pods mount.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamValues {
    /// `https://host[:port]`, without the URL's path: repositories pass through unchanged.
    pub url: String,
    /// Secret in the release namespace with the upstream's `username`, `password` and
    /// `ca.crt`.
    pub secret_name: String,
    /// Whether the Secret holds credentials.
    pub credentials: bool,
    /// Whether the Secret holds the CA the upstream is verified with.
    pub ca: bool,
    /// Proxy's `proxy.ttl` (Go duration); empty: the registry's own expiry. Only set for
    /// registry images that know the setting (Distribution 3.0 and later).
    #[serde(rename = "cacheTTL")]
    pub cache_ttl: String,
    /// Proxy: a hash of the upstream Secret's content. Distribution reads the credentials from
    /// its environment at start, so the pods carry it and restart when the Secret changes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret_hash: String,
}

impl Default for UpstreamValues {
    fn default() -> Self {
        UpstreamValues {
            url: String::new(),
            secret_name: names::REGISTRY_UPSTREAM_SECRET.into(),
            credentials: false,
            ca: false,
            cache_ttl: String::new(),
            secret_hash: String::new(),
        }
    }
}

/// Whether `image` is CNCF Distribution 3.0 or later by its tag (`registry:3.0.0`,
/// `…/distribution:v3.1`): only those read `proxy.ttl`. Images without a version tag are taken
/// for older ones, so the setting is left out rather than refused at start.
pub fn image_supports_proxy_ttl(image: &str) -> bool {
    let name = image.split('@').next().unwrap_or(image);
    let last = name.rsplit('/').next().unwrap_or(name);
    let Some((_, tag)) = last.rsplit_once(':') else {
        return false;
    };
    let major = tag
        .trim_start_matches('v')
        .split(['.', '-'])
        .next()
        .unwrap_or("");
    major.parse::<u32>().is_ok_and(|m| m >= 3)
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
            mode: registry.mode,
            upstream: match &registry.upstream {
                None => UpstreamValues::default(),
                Some(upstream) => UpstreamValues {
                    url: upstream.origin(),
                    credentials: upstream.credentials_secret.is_some(),
                    ca: upstream.ca_secret.is_some(),
                    cache_ttl: registry
                        .cache_ttl
                        .clone()
                        .filter(|_| image_supports_proxy_ttl(&options.registry_image))
                        .unwrap_or_default(),
                    ..UpstreamValues::default()
                },
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

/// Labels shared by the pods that serve the fixed address in every mode: the StatefulSet's
/// (which carry them already) and Direct's. The Service selects on them.
fn serving_labels() -> Value {
    json!({
        "app.kubernetes.io/part-of": "registry-addon",
        "app.kubernetes.io/component": "registry",
    })
}

/// Labels of Direct's objects; the first two select its pods, which the StatefulSet's
/// selector (immutable) does not match.
fn direct_labels() -> Value {
    json!({
        "app.kubernetes.io/name": names::REGISTRY_DIRECT_NAME,
        "app.kubernetes.io/part-of": "registry-addon",
        "app.kubernetes.io/component": "registry",
    })
}

fn direct_selector_labels() -> Value {
    json!({
        "app.kubernetes.io/name": names::REGISTRY_DIRECT_NAME,
        "app.kubernetes.io/part-of": "registry-addon",
    })
}

/// Annotations of the workload objects of a mode. A change of mode drops some of them from a
/// HelmChartProxy's release: Helm leaves them, and the converge deletes them once the switch
/// is complete, so that the previous mode keeps serving beside the new one until then.
fn keep() -> Value {
    json!({"helm.sh/resource-policy": "keep"})
}

fn metadata(name: &str) -> Value {
    json!({
        "name": name,
        "namespace": names::REGISTRY_NAMESPACE,
        "labels": labels(),
        "annotations": keep(),
    })
}

fn direct_metadata() -> Value {
    json!({
        "name": names::REGISTRY_DIRECT_NAME,
        "namespace": names::REGISTRY_NAMESPACE,
        "labels": direct_labels(),
        "annotations": keep(),
    })
}

/// Every object of the registry workload of the values' mode, in apply order (not the
/// Namespace nor the `registry-tls` and `registry-upstream` Secrets, which the hooks manage).
/// The Service keeps its address in every mode but Unmanaged; the node agent runs in every
/// mode, Unmanaged included, so that it can remove the addon's node files.
pub fn registry_objects(values: &RegistryValues) -> Vec<Value> {
    let workload = match values.mode {
        Mode::Local | Mode::Proxy => vec![
            headless_service(),
            service(values),
            pod_disruption_budget(),
            stateful_set(values),
        ],
        Mode::Direct => vec![
            service(values),
            direct_pod_disruption_budget(),
            direct_deployment(values),
        ],
        Mode::Unmanaged => Vec::new(),
    };
    workload
        .into_iter()
        .chain(node_agent_objects(values))
        .collect()
}

/// Replicas of Direct's Deployment: at least 2, so the fixed address survives a node.
pub fn direct_replicas(values: &RegistryValues) -> u8 {
    values.replicas.max(2)
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
            // The serving pods of every mode: the address stays while the mode changes.
            "selector": serving_labels(),
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

fn direct_pod_disruption_budget() -> Value {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": direct_metadata(),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": direct_selector_labels()},
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

fn container_security() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

fn front_probe(path: &str, initial_delay: u32, period: u32) -> Value {
    json!({
        "httpGet": {"path": path, "port": "front-metrics", "scheme": "HTTP"},
        "initialDelaySeconds": initial_delay,
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    })
}

/// The front container: TLS and the users as in every mode; `backend` the flags saying where
/// it sends requests (the local registry, or the upstream in Direct).
fn front_container(values: &RegistryValues, backend: Vec<Value>, pull_only: bool) -> Value {
    let mut args = vec![
        json!("front"),
        json!("--listen"),
        json!(format!("0.0.0.0:{}", names::REGISTRY_PORT)),
        json!("--tls-cert-file"),
        json!("/certs/tls.crt"),
        json!("--tls-key-file"),
        json!("/certs/tls.key"),
    ];
    args.extend(backend);
    if pull_only {
        args.push(json!("--pull-only"));
    }
    args.extend([
        json!("--pull-users"),
        json!(format!("{FRONT_AUTH_DIR}/{}", names::AUTH_PULL_USERS_KEY)),
        json!("--push-users"),
        json!(format!("{FRONT_AUTH_DIR}/{}", names::AUTH_PUSH_USERS_KEY)),
        json!("--metrics-listen"),
        json!(format!("0.0.0.0:{}", names::FRONT_METRICS_PORT)),
    ]);
    let mut front = json!({
        "name": "front",
        "image": values.sync_image,
        "imagePullPolicy": values.image_pull_policy,
        "args": args,
        "ports": [
            {"name": "registry", "containerPort": names::REGISTRY_PORT, "protocol": "TCP"},
            {"name": "front-metrics", "containerPort": names::FRONT_METRICS_PORT, "protocol": "TCP"},
        ],
        // Ready once the registry behind it answers.
        "readinessProbe": front_probe("/readyz", 1, 10),
        "livenessProbe": front_probe("/healthz", 5, 20),
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "tls", "mountPath": "/certs", "readOnly": true},
            {"name": "front-auth", "mountPath": FRONT_AUTH_DIR, "readOnly": true},
        ],
    });
    if let Some(resources) = values.resources.front.to_value() {
        front["resources"] = resources;
    }
    front
}

/// The volume of `registry-upstream` with only `keys`, mounted at `REGISTRY_UPSTREAM_DIR`.
fn upstream_volume(values: &RegistryValues, keys: &[&str]) -> Value {
    json!({"name": "upstream", "secret": {
        "secretName": values.upstream.secret_name,
        "items": keys.iter().map(|k| json!({"key": k, "path": k})).collect::<Vec<_>>(),
    }})
}

fn upstream_mount() -> Value {
    json!({"name": "upstream", "mountPath": names::REGISTRY_UPSTREAM_DIR, "readOnly": true})
}

/// Soft anti-affinity between the pods `selector` matches, and the control-plane preference.
fn affinity(values: &RegistryValues, selector: Value) -> Value {
    let mut affinity = json!({
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 100,
                "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": selector},
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
    affinity
}

/// The pod spec shared by the StatefulSet and Direct's Deployment.
fn pod_spec(
    values: &RegistryValues,
    selector: Value,
    containers: Vec<Value>,
    volumes: Vec<Value>,
) -> Value {
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
        "affinity": affinity(values, selector),
        "containers": containers,
        "volumes": volumes,
    });
    if values.control_plane.tolerate {
        pod_spec["tolerations"] = json!([{
            "key": names::CONTROL_PLANE_NODE_ROLE,
            "operator": "Exists",
            "effect": "NoSchedule",
        }]);
    }
    pod_spec
}

/// Where Proxy keeps its cache on the replica's volume: beside Local's tree, not in it. The
/// cache's expiry deletes blobs by digest, and a blob of an expired cached image may also be
/// one of a Local image; and Local's data stays as it was for a return to Local.
pub const PROXY_CACHE_DIR: &str = "/var/lib/registry/proxy-cache";

/// Where the replica's volume is mounted: read-write in the registry, read-only in the front.
pub const REGISTRY_DATA_DIR: &str = "/var/lib/registry";

/// The StatefulSet of Local and Proxy. Both keep the same volumeClaimTemplates, so the PVCs
/// (and Local's data) stay through a change of mode.
fn stateful_set(values: &RegistryValues) -> Value {
    let proxy = values.mode == Mode::Proxy;
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
            {"name": "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY",
             "value": if proxy { PROXY_CACHE_DIR } else { REGISTRY_DATA_DIR }},
        ],
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "data", "mountPath": REGISTRY_DATA_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    });
    let mut volumes = vec![
        json!({"name": "tls", "secret": {"secretName": names::REGISTRY_TLS_SECRET}}),
        json!({"name": "front-auth", "secret": {
            "secretName": names::REGISTRY_AUTH_SECRET,
            "items": [
                {"key": names::AUTH_PULL_USERS_KEY, "path": names::AUTH_PULL_USERS_KEY},
                {"key": names::AUTH_PUSH_USERS_KEY, "path": names::AUTH_PUSH_USERS_KEY},
            ],
        }}),
    ];
    if proxy {
        // A pull-through cache of the upstream, reached through the front's relay on the
        // pod's loopback (which adds the credentials and downloads each blob once); each
        // replica caches on its own, so there is no sync sidecar and no notification.
        push(
            &mut registry["env"],
            json!({"name": "REGISTRY_PROXY_REMOTEURL", "value": format!("http://{}", proxy_relay_addr())}),
        );
        if !values.upstream.cache_ttl.is_empty() {
            push(
                &mut registry["env"],
                json!({"name": "REGISTRY_PROXY_TTL", "value": values.upstream.cache_ttl}),
            );
        }
    }
    if let Some(resources) = values.resources.registry.to_value() {
        registry["resources"] = resources;
    }
    // During a switch to Local or Proxy, a replica is ready only once its registry serves the
    // images in use (Local: holds them; Proxy: fetches them from the upstream).
    let mut backend = vec![
        json!("--upstream"),
        json!(format!("http://{loopback}")),
        json!("--require-images"),
        json!(format!(
            "{}/{}",
            names::IMAGES_IN_USE_DIR,
            names::IMAGES_IN_USE_KEY
        )),
    ];
    // The front reads the blobs the registry holds from its storage, mounted read-only.
    backend.extend([
        json!("--blob-store"),
        json!(if proxy {
            PROXY_CACHE_DIR
        } else {
            REGISTRY_DATA_DIR
        }),
    ]);
    let mut upstream_keys = Vec::new();
    if proxy {
        // The relay to the upstream, and the images of the upstream's host only (the
        // remote's host): never its image of another registry's name.
        let (remote, keys) = remote_args(values);
        backend.extend(remote);
        backend.extend([
            json!("--relay-listen"),
            json!(proxy_relay_addr()),
            json!("--relay-spool"),
            json!(RELAY_SPOOL_DIR),
        ]);
        upstream_keys = keys;
    }
    let mut front = front_container(values, backend, proxy);
    push(
        &mut front["volumeMounts"],
        json!({"name": "images-in-use", "mountPath": names::IMAGES_IN_USE_DIR, "readOnly": true}),
    );
    push(
        &mut front["volumeMounts"],
        json!({"name": "data", "mountPath": REGISTRY_DATA_DIR, "readOnly": true}),
    );
    if proxy {
        // Distribution 2.8 reads its upstream's /v2/ when it starts and exits when it cannot:
        // the kubelet starts the registry only once this hook returns, the relay listening.
        front["lifecycle"] = json!({"postStart": {"exec": {"command": [
            IMAGE_BINARY, "wait", "--tcp", proxy_relay_addr(),
        ]}}});
        // The relay's spool: its own directory of the replica's volume (sized for the cache),
        // beside the cache, which never looks at it.
        push(
            &mut front["volumeMounts"],
            json!({"name": "data", "mountPath": RELAY_SPOOL_DIR, "subPath": RELAY_SPOOL_SUBPATH}),
        );
        if !upstream_keys.is_empty() {
            push(&mut front["volumeMounts"], upstream_mount());
            volumes.push(upstream_volume(values, &upstream_keys));
        }
    }
    // The kubelet starts a pod's containers in order: in Proxy the front (whose relay the
    // registry needs) comes first.
    let mut containers = if proxy {
        vec![front, registry]
    } else {
        vec![registry, front]
    };
    if !proxy {
        let mut sync_container = sync_container(values, &loopback);
        let notify = &values.notifications;
        if !notify.token_secret.is_empty() {
            let token = json!({"name": "REGISTRY_NOTIFY_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": notify.token_secret, "key": notify.token_key,
            }}});
            let registry = &mut containers[0];
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
            push(&mut sync_container["env"], token);
            push(&mut sync_container["args"], json!("--notify-listen"));
            push(&mut sync_container["args"], json!(SYNC_NOTIFY_ADDR));
        }
        if let Some(resources) = values.resources.sync.to_value() {
            sync_container["resources"] = resources;
        }
        containers.push(sync_container);
        volumes.push(json!({"name": "sync-auth", "secret": {
            "secretName": names::REGISTRY_AUTH_SECRET,
            "items": [
                {"key": names::AUTH_SYNC_CREDENTIALS_KEY, "path": names::AUTH_SYNC_CREDENTIALS_KEY},
            ],
        }}));
    }
    // Written only during a switch to Local or Proxy: absent, it requires nothing.
    volumes.push(json!({"name": "images-in-use", "configMap": {
        "name": names::IMAGES_IN_USE_CONFIGMAP,
        "optional": true,
    }}));
    volumes.push(json!({"name": "tmp", "emptyDir": {}}));
    // Each container sees only its part of `registry-auth`.
    let pod_spec = pod_spec(values, selector_labels(), containers, volumes);

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
            // The PVCs stay when the StatefulSet goes (Direct, Unmanaged, addon off) or shrinks:
            // they hold Local's data.
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
            "selector": {"matchLabels": selector_labels()},
            "template": {
                "metadata": {
                    "labels": labels(),
                    "annotations": statefulset_annotations(values),
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

fn sync_container(values: &RegistryValues, loopback: &str) -> Value {
    json!({
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
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "tls", "mountPath": "/certs", "readOnly": true},
            {"name": "sync-auth", "mountPath": SYNC_AUTH_DIR, "readOnly": true},
            // Only its own directory of the registry's volume, beside Distribution's
            // docker/registry/v2 tree, which never looks at it.
            {"name": "data", "mountPath": SYNC_STATE_DIR, "subPath": SYNC_STATE_SUBPATH},
        ],
    })
}

/// The StatefulSet pods' annotations: the certificate's hash, and in Proxy the upstream
/// Secret's (see [`UpstreamValues::secret_hash`]).
fn statefulset_annotations(values: &RegistryValues) -> Value {
    let mut annotations = json!({names::CERTIFICATE_HASH_ANNOTATION: values.certificate_hash});
    if !values.upstream.secret_hash.is_empty() {
        annotations[names::UPSTREAM_HASH_ANNOTATION] = json!(values.upstream.secret_hash);
    }
    annotations
}

/// Where Direct's front finds the upstream's credentials (files `username` and `password`,
/// as `front --remote-credentials` reads them) and CA.
pub const DIRECT_CREDENTIALS_DIR: &str = names::REGISTRY_UPSTREAM_DIR;
pub const DIRECT_CA_FILE: &str = "/etc/registry-upstream/ca.crt";

/// The front's flags for the upstream (`--remote` and, with their Secret references,
/// `--remote-credentials` and `--remote-ca`), and the keys of `registry-upstream` they read.
fn remote_args(values: &RegistryValues) -> (Vec<Value>, Vec<&'static str>) {
    let upstream = &values.upstream;
    let mut args = vec![json!("--remote"), json!(upstream.url)];
    let mut keys = Vec::new();
    if upstream.credentials {
        args.extend([json!("--remote-credentials"), json!(DIRECT_CREDENTIALS_DIR)]);
        keys.extend(["username", "password"]);
    }
    if upstream.ca {
        args.extend([json!("--remote-ca"), json!(DIRECT_CA_FILE)]);
        keys.push("ca.crt");
    }
    (args, keys)
}

/// Where Proxy's registry reaches the front's relay to the upstream (its `proxy.remoteurl`).
pub fn proxy_relay_addr() -> String {
    format!("127.0.0.1:{}", names::PROXY_RELAY_PORT)
}

/// This binary in its image.
pub const IMAGE_BINARY: &str = "/usr/local/bin/registry-addon";

/// Where the relay spools the blobs it downloads, and its directory of the replica's volume.
pub const RELAY_SPOOL_DIR: &str = "/var/cache/registry-addon-relay";
const RELAY_SPOOL_SUBPATH: &str = "registry-addon-relay";

/// Direct: the front alone, forwarding to the upstream and storing nothing; at least two
/// replicas behind the same Service.
fn direct_deployment(values: &RegistryValues) -> Value {
    let (backend, keys) = remote_args(values);
    let mut front = front_container(values, backend, false);
    let mut volumes = vec![
        json!({"name": "tls", "secret": {"secretName": names::REGISTRY_TLS_SECRET}}),
        json!({"name": "front-auth", "secret": {
            "secretName": names::REGISTRY_AUTH_SECRET,
            "items": [
                {"key": names::AUTH_PULL_USERS_KEY, "path": names::AUTH_PULL_USERS_KEY},
                {"key": names::AUTH_PUSH_USERS_KEY, "path": names::AUTH_PUSH_USERS_KEY},
            ],
        }}),
    ];
    if !keys.is_empty() {
        push(&mut front["volumeMounts"], upstream_mount());
        volumes.push(upstream_volume(values, &keys));
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": direct_metadata(),
        "spec": {
            "replicas": direct_replicas(values),
            "selector": {"matchLabels": direct_selector_labels()},
            // Never fewer serving pods than wanted while the pods are replaced.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": direct_labels(),
                    "annotations": {names::CERTIFICATE_HASH_ANNOTATION: values.certificate_hash},
                },
                "spec": pod_spec(values, direct_selector_labels(), vec![front], volumes),
            },
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
        // The front reads blobs from Local's storage, which it mounts read-only.
        let front = &sts["spec"]["template"]["spec"]["containers"][1];
        assert_eq!(front["name"], "front");
        let front_args = front["args"].as_array().unwrap();
        let i = front_args.iter().position(|a| a == "--blob-store").unwrap();
        assert_eq!(front_args[i + 1], REGISTRY_DATA_DIR);
        let store = front["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "data")
            .unwrap();
        assert_eq!(store["mountPath"], REGISTRY_DATA_DIR);
        assert_eq!(store["readOnly"], true);
        let annotations = &sts["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations[names::CERTIFICATE_HASH_ANNOTATION], "abc");
        let svc = objects
            .iter()
            .find(|o| o["metadata"]["name"] == "registry" && o["kind"] == "Service")
            .unwrap();
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.20");
    }

    fn kinds(objects: &[Value]) -> Vec<String> {
        objects
            .iter()
            .filter(|o| o["metadata"]["name"] != names::NODE_AGENT_NAME)
            .map(|o| {
                format!(
                    "{} {}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect()
    }

    fn upstream() -> Value {
        json!({"url": "https://up.example:5443/mirror", "credentialsSecretRef": {"name": "c"}, "caSecretRef": {"name": "ca"}})
    }

    #[test]
    fn each_mode_renders_its_workload_and_keeps_the_node_agent() {
        let local = registry_objects(&values(json!({})));
        let proxy = registry_objects(&values(json!({"mode": "Proxy", "upstream": upstream()})));
        let direct = registry_objects(&values(json!({"mode": "Direct", "upstream": upstream()})));
        let unmanaged = registry_objects(&values(json!({"mode": "Unmanaged"})));
        let sts = [
            "Service registry-headless",
            "Service registry",
            "PodDisruptionBudget registry",
            "StatefulSet registry",
        ];
        assert_eq!(kinds(&local), sts);
        assert_eq!(kinds(&proxy), sts);
        assert_eq!(
            kinds(&direct),
            [
                "Service registry",
                "PodDisruptionBudget registry-direct",
                "Deployment registry-direct"
            ]
        );
        assert!(kinds(&unmanaged).is_empty());
        for objects in [&local, &proxy, &direct, &unmanaged] {
            assert_eq!(
                objects
                    .iter()
                    .filter(|o| o["metadata"]["name"] == names::NODE_AGENT_NAME)
                    .count(),
                6
            );
        }
        // One address in every mode, selecting that mode's serving pods.
        for objects in [&local, &proxy, &direct] {
            let service = objects
                .iter()
                .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "registry")
                .unwrap();
            assert_eq!(service["spec"]["clusterIP"], "10.96.0.20");
            let workload = objects
                .iter()
                .find(|o| o["kind"] == "StatefulSet" || o["kind"] == "Deployment")
                .unwrap();
            let labels = workload["spec"]["template"]["metadata"]["labels"]
                .as_object()
                .unwrap();
            for (k, v) in service["spec"]["selector"].as_object().unwrap() {
                assert_eq!(&labels[k], v);
            }
        }
    }

    #[test]
    fn proxy_caches_the_upstream_origin() {
        let v = values(json!({"mode": "Proxy", "upstream": upstream(), "cache": {"ttl": "72h"}}));
        assert_eq!(v.upstream.url, "https://up.example:5443");
        // The default image is Distribution 2.8, which has no proxy.ttl.
        assert_eq!(v.upstream.cache_ttl, "");
        let objects = registry_objects(&v);
        let sts = objects.iter().find(|o| o["kind"] == "StatefulSet").unwrap();
        let local = registry_objects(&values(json!({})));
        let local_sts = local.iter().find(|o| o["kind"] == "StatefulSet").unwrap();
        assert_eq!(
            sts["spec"]["volumeClaimTemplates"],
            local_sts["spec"]["volumeClaimTemplates"]
        );
        assert_eq!(
            sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"],
            "Retain"
        );
        let containers = sts["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(containers.len(), 2, "no sync sidecar");
        // The front first: the registry starts once its postStart hook sees the relay listen.
        assert_eq!(containers[0]["name"], "front");
        assert_eq!(
            containers[0]["lifecycle"]["postStart"]["exec"]["command"],
            json!([IMAGE_BINARY, "wait", "--tcp", "127.0.0.1:5003"])
        );
        let (front, registry) = (&containers[0], &containers[1]);
        let env = registry["env"].as_array().unwrap();
        let get = |n: &str| env.iter().find(|e| e["name"] == n);
        // The registry reaches the upstream through the front's relay on the loopback, and
        // holds neither the upstream's credentials nor its CA.
        assert_eq!(
            get("REGISTRY_PROXY_REMOTEURL").unwrap()["value"],
            "http://127.0.0.1:5003"
        );
        assert!(get("REGISTRY_PROXY_PASSWORD").is_none());
        assert!(get("SSL_CERT_FILE").is_none());
        assert!(
            registry["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["name"] != "upstream")
        );
        assert!(get("REGISTRY_PROXY_TTL").is_none());
        assert!(get("REGISTRY_NOTIFICATIONS_ENDPOINTS").is_none());
        let args = front["args"].as_array().unwrap();
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .map(|i| args[i + 1].as_str().unwrap())
        };
        assert!(args.contains(&json!("--pull-only")));
        assert_eq!(after("--remote"), Some("https://up.example:5443"));
        assert_eq!(after("--relay-listen"), Some("127.0.0.1:5003"));
        assert_eq!(after("--remote-credentials"), Some(DIRECT_CREDENTIALS_DIR));
        assert_eq!(after("--remote-ca"), Some(DIRECT_CA_FILE));
        assert_eq!(after("--relay-spool"), Some(RELAY_SPOOL_DIR));
        let mounts = front["volumeMounts"].as_array().unwrap();
        let mounted =
            |name: &str| mounts.iter().find(|m| m["name"] == name).unwrap()["mountPath"].clone();
        assert_eq!(mounted("upstream"), "/etc/registry-upstream");
        let data: Vec<&Value> = mounts.iter().filter(|m| m["name"] == "data").collect();
        // The spool, writable; the cache's storage, read-only, which the front reads blobs from.
        assert_eq!(data.len(), 2, "{data:?}");
        let spool = data
            .iter()
            .find(|m| m["mountPath"] == RELAY_SPOOL_DIR)
            .unwrap();
        assert_eq!(spool["subPath"], RELAY_SPOOL_SUBPATH);
        assert_ne!(spool["readOnly"], true);
        let store = data
            .iter()
            .find(|m| m["mountPath"] == REGISTRY_DATA_DIR)
            .unwrap();
        assert_eq!(store["readOnly"], true);
        assert!(store.get("subPath").is_none());
        assert_eq!(after("--blob-store"), Some(PROXY_CACHE_DIR));
        let volumes = sts["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap();
        let upstream = volumes.iter().find(|v| v["name"] == "upstream").unwrap();
        assert_eq!(upstream["secret"]["secretName"], "registry-upstream");
        assert!(volumes.iter().all(|v| v["name"] != "relay-spool"));
    }

    #[test]
    fn proxy_ttl_only_for_distribution_3() {
        for (image, yes) in [
            ("registry:2.8.3", false),
            ("registry:3.0.0", true),
            ("mirror.example:5000/distribution/distribution:v3.1", true),
            ("registry", false),
            ("mirror.example:5000/registry", false),
            ("registry@sha256:abcd", false),
            ("registry:latest", false),
        ] {
            assert_eq!(image_supports_proxy_ttl(image), yes, "{image}");
        }
    }

    #[test]
    fn direct_forwards_with_two_replicas_or_more() {
        let objects = registry_objects(&values(
            json!({"mode": "Direct", "replicas": 1, "upstream": upstream()}),
        ));
        let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
        assert_eq!(deployment["spec"]["replicas"], 2);
        let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap();
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .map(|i| args[i + 1].clone())
        };
        assert_eq!(after("--remote").unwrap(), "https://up.example:5443");
        assert_eq!(
            after("--remote-credentials").unwrap(),
            DIRECT_CREDENTIALS_DIR
        );
        assert_eq!(after("--remote-ca").unwrap(), DIRECT_CA_FILE);
        let anonymous = registry_objects(&values(
            json!({"mode": "Direct", "replicas": 3, "upstream": {"url": "https://up.example"}}),
        ));
        let deployment = anonymous
            .iter()
            .find(|o| o["kind"] == "Deployment")
            .unwrap();
        assert_eq!(deployment["spec"]["replicas"], 3);
        let pod = &deployment["spec"]["template"]["spec"];
        assert!(
            !pod["containers"][0]["args"]
                .as_array()
                .unwrap()
                .contains(&json!("--remote-ca"))
        );
        assert!(
            pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|v| v["name"] != "upstream")
        );
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
