//! Test harness: a management and a workload API stand-in, a HookContext talking to the
//! management one, and realistic hook requests.
#![allow(dead_code)]

pub mod apiserver;
pub mod crd;
pub mod kubelet;

use std::time::Duration;

use base64::Engine;
use clap::Parser;
use registry_addon::cli::{AddonOptions, Cli, Command};
use registry_addon::hooks::{HookConfig, HookContext, Management, dispatch};
use registry_addon::names;
use registry_addon::wire::runtime::Hook;
use serde_json::{Value, json};

use apiserver::ApiServer;

pub const EXTENSION_NAMESPACE: &str = "registry-addon-system";
pub const CLUSTER_NS: &str = "default";
pub const CLUSTER: &str = "wl-1";

pub fn fixture_path(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A Cluster as CAPI embeds it in requests: `cluster-v1beta1.json` or `cluster-v1beta2.json`.
pub fn cluster_fixture(file: &str) -> Value {
    let text = std::fs::read_to_string(fixture_path(file)).expect("fixture");
    serde_json::from_str(&text).expect("fixture JSON")
}

/// The addon options `serve` would have with these extra flags.
pub fn options(flags: &[&str]) -> AddonOptions {
    let mut argv = vec!["registry-addon", "render", "-f", "-"];
    argv.extend_from_slice(flags);
    match Cli::try_parse_from(argv).expect("flags").command {
        Command::Render(args) => args.addon,
        _ => unreachable!("render"),
    }
}

pub fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

pub fn unb64(value: &Value) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.as_str().expect("base64 string"))
        .expect("base64");
    String::from_utf8(bytes).expect("utf-8")
}

pub fn secret_path(namespace: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/secrets/{name}")
}

pub fn root_ca_path() -> String {
    secret_path(EXTENSION_NAMESPACE, names::ROOT_CA_SECRET)
}

pub fn cluster_ca_path() -> String {
    secret_path(CLUSTER_NS, &names::cluster_ca_secret(CLUSTER))
}

pub fn tls_path() -> String {
    secret_path(names::REGISTRY_NAMESPACE, names::REGISTRY_TLS_SECRET)
}

pub fn hcp_path() -> String {
    format!(
        "/apis/addons.cluster.x-k8s.io/v1alpha1/namespaces/{CLUSTER_NS}/helmchartproxies/{CLUSTER}-registry"
    )
}

pub fn statefulset_path() -> String {
    "/apis/apps/v1/namespaces/registry-system/statefulsets/registry".into()
}

pub struct Env {
    pub management: ApiServer,
    pub workload: ApiServer,
    pub ctx: HookContext,
    pub cluster: Value,
    pub settings: Value,
}

impl Env {
    /// Default flags, the v1beta2 Cluster, its kubeconfig Secret in place.
    pub async fn new() -> Env {
        Env::with(&[], "cluster-v1beta2.json").await
    }

    pub async fn with(flags: &[&str], cluster_file: &str) -> Env {
        let management = ApiServer::start().await;
        let workload = ApiServer::start().await;
        let config = HookConfig {
            namespace: EXTENSION_NAMESPACE.into(),
            addon: options(flags),
        };
        let ctx = HookContext::new(config, Management::Client(management.client()));
        let env = Env {
            management,
            workload,
            ctx,
            cluster: cluster_fixture(cluster_file),
            settings: json!({}),
        };
        env.put_kubeconfig(&env.workload.kubeconfig());
        env
    }

    pub fn put_kubeconfig(&self, kubeconfig: &str) {
        self.management.put(
            &format!("/api/v1/namespaces/{CLUSTER_NS}/secrets"),
            json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": names::kubeconfig_secret(CLUSTER), "namespace": CLUSTER_NS},
                "type": "cluster.x-k8s.io/secret",
                "data": {"value": b64(kubeconfig)},
            }),
        );
    }

    /// Sets `clusterConfig.addons.registry` in the Cluster's topology (`null`: addon off).
    pub fn set_registry(&mut self, registry: Value) {
        let variables = self.cluster["spec"]["topology"]["variables"]
            .as_array_mut()
            .expect("variables");
        let config = variables
            .iter_mut()
            .find(|v| v["name"] == "clusterConfig")
            .expect("clusterConfig");
        config["value"]["addons"]["registry"] = registry;
    }

    pub fn set_service_cidr(&mut self, cidr: &str) {
        self.cluster["spec"]["clusterNetwork"]["services"]["cidrBlocks"] = json!([cidr]);
    }

    pub fn request(&self, hook: Hook) -> Vec<u8> {
        let mut request = json!({
            "apiVersion": names::HOOKS_API_VERSION,
            "kind": hook.request_kind(),
            "settings": self.settings,
            "cluster": self.cluster,
        });
        if hook == Hook::BeforeClusterUpgrade {
            request["fromKubernetesVersion"] = json!("v1.33.1");
            request["toKubernetesVersion"] = json!("v1.34.0");
        }
        serde_json::to_vec(&request).expect("request")
    }

    /// Calls a hook through `dispatch` with CAPI's default 10 s budget; the JSON response.
    pub async fn call(&self, hook: Hook) -> Value {
        let body = self.request(hook);
        let response = dispatch(&self.ctx, hook, &body, Duration::from_secs(10)).await;
        serde_json::to_value(response).expect("response JSON")
    }

    pub fn clear_logs(&self) {
        self.management.clear_log();
        self.workload.clear_log();
    }

    pub fn writes(&self) -> usize {
        self.management.writes() + self.workload.writes()
    }

    /// (management, workload) request counts since the last clear.
    pub fn request_counts(&self) -> (usize, usize) {
        (
            self.management.requests().len(),
            self.workload.requests().len(),
        )
    }

    /// Plays the StatefulSet controller: the registry StatefulSet exists and every replica is
    /// ready and updated for the current generation.
    /// Marks Direct's Deployment, when it exists, as running every replica of its spec.
    pub fn make_direct_ready(&self) {
        let path = "/apis/apps/v1/namespaces/registry-system/deployments/registry-direct";
        if self.workload.get(path).is_none() {
            return;
        }
        self.workload.update(path, |d| {
            let generation = d["metadata"]["generation"].clone();
            let replicas = d["spec"]["replicas"].clone();
            d["status"] = json!({
                "observedGeneration": generation,
                "replicas": replicas,
                "readyReplicas": replicas,
                "updatedReplicas": replicas,
            });
        });
    }

    pub fn make_registry_ready(&self, replicas: u64) {
        let path = statefulset_path();
        if self.workload.get(&path).is_none() {
            self.workload.put(
                "/apis/apps/v1/namespaces/registry-system/statefulsets",
                json!({
                    "apiVersion": "apps/v1",
                    "kind": "StatefulSet",
                    "metadata": {"name": "registry", "namespace": "registry-system", "generation": 1},
                    "spec": {"replicas": replicas},
                }),
            );
        }
        self.workload.update(&path, |sts| {
            let generation = sts["metadata"]["generation"].clone();
            let replicas = sts["spec"]["replicas"].clone();
            sts["status"] = json!({
                "observedGeneration": generation,
                "replicas": replicas,
                "readyReplicas": replicas,
                "updatedReplicas": replicas,
                "availableReplicas": replicas,
            });
        });
    }

    pub fn tls_cert_pem(&self) -> String {
        let secret = self.workload.get(&tls_path()).expect("registry-tls");
        unb64(&secret["data"]["tls.crt"])
    }
}
