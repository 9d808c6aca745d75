//! Lifecycle hooks against two in-memory API servers (management and workload), driven
//! through `hooks::dispatch` with realistic requests. The workload client is built from the
//! kubeconfig Secret and talks to the workload stand-in over loopback HTTP.

mod support;

use std::process::Command;
use std::time::Duration;

use axum::http::Method;
use registry_addon::certs::{self, CertInfo, CertificateAuthority};
use registry_addon::cli::KeyAlgorithm;
use registry_addon::hooks::{HookConfig, HookContext, Management, dispatch};
use registry_addon::k8s::{ClusterApi, Place};
use registry_addon::names;
use registry_addon::render::objects;
use registry_addon::render::registry::{RegistryValues, registry_objects};
use registry_addon::wire::cluster::Cluster;
use registry_addon::wire::runtime::Hook;
use registry_addon::wire::variable::registry_from_config;
use serde_json::{Value, json};
use support::*;
use time::OffsetDateTime;

const LIFECYCLE: [Hook; 4] = [
    Hook::BeforeClusterCreate,
    Hook::AfterControlPlaneInitialized,
    Hook::BeforeClusterUpgrade,
    Hook::BeforeClusterDelete,
];

fn assert_success(response: &Value) {
    assert_eq!(response["status"], "Success", "{response:#}");
}

fn assert_failure(response: &Value, needle: &str) {
    assert_eq!(response["status"], "Failure", "{response:#}");
    let message = response["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    assert!(!message.contains("PRIVATE KEY"), "{message}");
}

fn root_ca(env: &Env) -> CertificateAuthority {
    let secret = env.management.get(&root_ca_path()).expect("root CA secret");
    CertificateAuthority::from_pem(
        &unb64(&secret["data"]["tls.crt"]),
        &unb64(&secret["data"]["tls.key"]),
    )
    .expect("root CA")
}

/// The registry-tls Secret replaced by a certificate of the given names and issue date.
fn plant_certificate(
    env: &Env,
    ca: &CertificateAuthority,
    replicas: u8,
    ip: &str,
    issued: OffsetDateTime,
) -> String {
    let names = certs::registry_subject_names(replicas, ip.parse().unwrap());
    let cert = ca
        .issue_server(&names, KeyAlgorithm::EcdsaP256, issued)
        .unwrap();
    env.workload.update(&tls_path(), |secret| {
        secret["data"]["tls.crt"] = json!(b64(&cert.cert_pem));
        secret["data"]["tls.key"] = json!(b64(cert.key_pem.expose()));
    });
    cert.cert_pem
}

#[tokio::test]
async fn before_cluster_create_generates_the_root_ca_and_copies_it() {
    let env = Env::new().await;
    let response = env.call(Hook::BeforeClusterCreate).await;
    assert_success(&response);
    assert_eq!(response["retryAfterSeconds"], 0);

    let root = env.management.get(&root_ca_path()).unwrap();
    assert_eq!(root["type"], "kubernetes.io/tls");
    for key in ["ca.crt", "tls.crt", "tls.key"] {
        assert!(root["data"][key].is_string(), "{key}");
    }
    let ca = root_ca(&env);
    let info = CertInfo::from_pem(ca.cert_pem()).unwrap();
    assert!(info.lifetime() >= time::Duration::days(3650));

    let copy = env.management.get(&cluster_ca_path()).unwrap();
    let data = copy["data"].as_object().unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["ca.crt"]);
    assert_eq!(unb64(&copy["data"]["ca.crt"]), ca.cert_pem());
    assert_eq!(
        copy["metadata"]["ownerReferences"],
        json!([{"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Cluster", "name": "wl-1", "uid": "00000000-0000-0000-0000-000000001234"}])
    );
    // Nothing happens on the workload cluster before it exists.
    assert!(env.workload.requests().is_empty());

    env.clear_logs();
    assert_success(&env.call(Hook::BeforeClusterCreate).await);
    assert_eq!(env.writes(), 0, "{:?}", env.management.requests());
}

#[tokio::test]
async fn owner_reference_follows_the_request_api_version() {
    let env = Env::with(&[], "cluster-v1beta1.json").await;
    assert_success(&env.call(Hook::BeforeClusterCreate).await);
    let copy = env.management.get(&cluster_ca_path()).unwrap();
    assert_eq!(
        copy["metadata"]["ownerReferences"][0]["apiVersion"],
        "cluster.x-k8s.io/v1beta1"
    );
}

#[tokio::test]
async fn an_existing_root_ca_is_used_as_is() {
    // cert-manager style: openssl-made CA with a SEC1 key, ca.crt beside tls.crt.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ca.key");
    let crt = dir.path().join("ca.crt");
    let ok = Command::new("openssl")
        .args([
            "ecparam",
            "-genkey",
            "-name",
            "prime256v1",
            "-noout",
            "-out",
        ])
        .arg(&key)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-new",
            "-subj",
            "/CN=operator CA",
            "-days",
            "30",
            "-key",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let cert_pem = std::fs::read_to_string(&crt).unwrap();
    let key_pem = std::fs::read_to_string(&key).unwrap();
    assert!(key_pem.contains("EC PRIVATE KEY"));

    let env = Env::new().await;
    env.management.put(
        &format!("/api/v1/namespaces/{EXTENSION_NAMESPACE}/secrets"),
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": names::ROOT_CA_SECRET},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": b64(&cert_pem), "tls.key": b64(&key_pem), "ca.crt": b64(&cert_pem)},
        }),
    );
    let before = env.management.get(&root_ca_path()).unwrap();
    assert_success(&env.call(Hook::BeforeClusterCreate).await);
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert_eq!(
        env.management.get(&root_ca_path()).unwrap(),
        before,
        "never regenerated"
    );
    let copy = env.management.get(&cluster_ca_path()).unwrap();
    assert_eq!(
        certs::pem_certificates(&unb64(&copy["data"]["ca.crt"])).unwrap(),
        certs::pem_certificates(&cert_pem).unwrap()
    );
    let server = CertInfo::from_pem(&env.tls_cert_pem()).unwrap();
    assert!(server.is_signed_by(&root_ca(&env)));
}

#[tokio::test]
async fn rsa_keys_on_request() {
    let env = Env::with(&["--key-algorithm", "rsa2048"], "cluster-v1beta2.json").await;
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let root = env.management.get(&root_ca_path()).unwrap();
    let out = openssl_text(&unb64(&root["data"]["tls.crt"]));
    assert!(
        out.contains("rsaEncryption") && out.contains("2048 bit"),
        "{out}"
    );
    let out = openssl_text(&env.tls_cert_pem());
    assert!(out.contains("rsaEncryption"), "{out}");
}

fn openssl_text(pem: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.pem");
    std::fs::write(&path, pem).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn after_control_plane_initialized_deploys_with_a_helmchartproxy() {
    let env = Env::new().await;
    assert_success(&env.call(Hook::BeforeClusterCreate).await);
    env.clear_logs();

    let response = env.call(Hook::AfterControlPlaneInitialized).await;
    assert_success(&response);
    assert!(response.get("retryAfterSeconds").is_none());
    let (first_mgmt, first_wl) = env.request_counts();

    let namespace = env
        .workload
        .get("/api/v1/namespaces/registry-system")
        .unwrap();
    assert_eq!(namespace["kind"], "Namespace");
    let tls = env.workload.get(&tls_path()).unwrap();
    assert_eq!(tls["type"], "kubernetes.io/tls");
    let mut keys: Vec<_> = tls["data"].as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
    let ca = root_ca(&env);
    assert_eq!(unb64(&tls["data"]["ca.crt"]), ca.cert_pem());

    // The real openssl trusts the chain and sees every SAN.
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    let cert_file = dir.path().join("tls.crt");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    std::fs::write(&cert_file, unb64(&tls["data"]["tls.crt"])).unwrap();
    let verify = Command::new("openssl")
        .args(["verify", "-purpose", "sslserver", "-CAfile"])
        .arg(&ca_file)
        .arg(&cert_file)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let sans = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&cert_file)
        .output()
        .unwrap();
    let sans = String::from_utf8_lossy(&sans.stdout);
    for expected in [
        "DNS:registry.registry-system.svc.cluster.local",
        "DNS:registry-2.registry-headless.registry-system.svc",
        "DNS:registry-0",
        "IP Address:10.128.0.20",
        "IP Address:127.0.0.1",
    ] {
        assert!(sans.contains(expected), "{expected} missing in {sans}");
    }
    assert!(!sans.contains("registry-3"), "{sans}");
    let text = openssl_text(&unb64(&tls["data"]["tls.crt"]));
    assert!(text.contains("TLS Web Server Authentication"), "{text}");

    // The HelmChartProxy: owned by the Cluster, selecting it, values carrying the hash.
    let hcp = env.management.get(&hcp_path()).unwrap();
    assert_eq!(
        hcp["metadata"]["ownerReferences"][0]["uid"],
        "00000000-0000-0000-0000-000000001234"
    );
    assert_eq!(
        hcp["spec"]["clusterSelector"]["matchLabels"]["cluster.x-k8s.io/cluster-name"],
        "wl-1"
    );
    assert_eq!(hcp["spec"]["releaseName"], "registry");
    assert_eq!(hcp["spec"]["namespace"], "registry-system");
    assert_eq!(
        hcp["spec"]["repoURL"],
        "oci://ghcr.io/registry-addon/charts"
    );
    let values: Value =
        serde_yaml::from_str(hcp["spec"]["valuesTemplate"].as_str().unwrap()).unwrap();
    let hash = CertInfo::from_pem(&env.tls_cert_pem())
        .unwrap()
        .sha256_hex();
    assert_eq!(values["certificateHash"], hash);
    assert_eq!(values["replicas"], 3);
    assert_eq!(values["serviceIP"], "10.128.0.20");

    // The nodes' desired configuration, final from the start, as the agent reads it: the
    // Service address, the root CA and the `ro` header.
    let node_config = env
        .workload
        .get(&secret_path(
            names::REGISTRY_NAMESPACE,
            names::NODE_CONFIG_SECRET,
        ))
        .unwrap();
    assert_eq!(
        unb64(&node_config["data"][names::NODE_CONFIG_PHASE_KEY]),
        "final"
    );
    assert_eq!(
        unb64(&node_config["data"][names::NODE_CONFIG_CA_KEY]),
        ca.cert_pem()
    );
    let hosts = unb64(&node_config["data"][names::NODE_CONFIG_HOSTS_KEY]);
    assert!(hosts.contains("https://10.128.0.20"), "{hosts}");
    assert!(hosts.contains("Authorization"), "{hosts}");
    let data: std::collections::BTreeMap<String, k8s_openapi::ByteString> = node_config["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), k8s_openapi::ByteString(unb64(v).into_bytes())))
        .collect();
    let parsed = registry_addon::agent::desired::parse(
        names::NODE_CONFIG_SECRET,
        &data,
        names::CONTAINERD_CERTS_DIR,
    )
    .unwrap();
    assert_eq!(
        unb64(&node_config["data"][names::NODE_CONFIG_HASH_KEY]),
        parsed.hash
    );

    // Every write is server-side apply (or the create of the root CA).
    for request in env
        .management
        .requests()
        .iter()
        .chain(&env.workload.requests())
    {
        if request.method == Method::PATCH {
            assert_eq!(request.content_type, "application/apply-patch+yaml");
            assert!(
                request.query.contains("fieldManager=registry-addon"),
                "{request:?}"
            );
            assert!(request.query.contains("force=true"), "{request:?}");
        }
    }

    env.clear_logs();
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert_eq!(
        env.writes(),
        0,
        "{:?} {:?}",
        env.management.requests(),
        env.workload.requests()
    );
    let (again_mgmt, again_wl) = env.request_counts();
    assert_eq!(
        env.tls_cert_pem(),
        unb64(&tls["data"]["tls.crt"]),
        "a valid certificate is kept"
    );

    env.make_registry_ready(3);
    env.clear_logs();
    assert_success(&env.call(Hook::BeforeClusterUpgrade).await);
    assert_eq!(env.writes(), 0);
    let (bcu_mgmt, bcu_wl) = env.request_counts();
    println!(
        "API requests per hook call (management + workload): first ACPI {first_mgmt} + {first_wl}, \
         repeated ACPI {again_mgmt} + {again_wl}, BCU with nothing to renew {bcu_mgmt} + {bcu_wl}"
    );
}

#[tokio::test]
async fn helmchartproxy_validates_against_its_crd() {
    let crd: Value = serde_yaml::from_str(
        &std::fs::read_to_string(fixture_path(
            "addons.cluster.x-k8s.io_helmchartproxies.yaml",
        ))
        .unwrap(),
    )
    .unwrap();
    let version = crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "v1alpha1")
        .unwrap();
    let schema = version["schema"]["openAPIV3Schema"].clone();
    let validator = jsonschema::validator_for(&strip_k8s_extensions(schema)).unwrap();

    let cluster = Cluster::from_value(&cluster_fixture("cluster-v1beta2.json")).unwrap();
    let registry = registry_from_config(cluster.variable("clusterConfig"))
        .unwrap()
        .unwrap();
    let options = options(&["--chart-repository", "https://charts.example.com"]);
    let ip = registry
        .resolve_service_ip(cluster.service_cidrs())
        .unwrap();
    let values = RegistryValues::new(&options, &registry, ip, "abc".into());
    let hcp = objects::helm_chart_proxy(&cluster, &options, &values).unwrap();
    let errors: Vec<String> = validator.iter_errors(&hcp).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}");
}

/// Kubernetes' `x-kubernetes-*` keywords are not JSON Schema; `int-or-string` becomes "any".
fn strip_k8s_extensions(mut schema: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                if map.get("x-kubernetes-int-or-string") == Some(&json!(true)) {
                    map.remove("type");
                }
                map.retain(|k, _| !k.starts_with("x-kubernetes-"));
                map.values_mut().for_each(walk);
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut schema);
    schema
}

/// The API path of an object, as the stand-in stores it.
fn object_path(object: &Value) -> String {
    let id = registry_addon::k8s::ObjectId::of(object);
    let resource = registry_addon::k8s::api_resource(&id.api_version, &id.kind);
    let prefix = if resource.group.is_empty() {
        "/api/v1".to_string()
    } else {
        format!("/apis/{}/{}", resource.group, resource.version)
    };
    match &id.namespace {
        Some(ns) => format!("{prefix}/namespaces/{ns}/{}/{}", resource.plural, id.name),
        None => format!("{prefix}/{}/{}", resource.plural, id.name),
    }
}

/// The chart values the hooks derive for the env's Cluster and current certificate.
fn current_values(env: &Env) -> RegistryValues {
    let cluster = Cluster::from_value(&env.cluster).unwrap();
    let registry = registry_from_config(cluster.variable("clusterConfig"))
        .unwrap()
        .unwrap();
    let hash = CertInfo::from_pem(&env.tls_cert_pem())
        .unwrap()
        .sha256_hex();
    RegistryValues::new(
        &env.ctx.config.addon,
        &registry,
        "10.128.0.20".parse().unwrap(),
        hash,
    )
}

#[tokio::test]
async fn direct_deployer_applies_every_registry_object() {
    let mut env = Env::new().await;
    env.settings = json!({"deployer": "direct"});
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert!(env.management.get(&hcp_path()).is_none());

    for object in registry_objects(&current_values(&env)) {
        let id = registry_addon::k8s::ObjectId::of(&object);
        let stored = env
            .workload
            .get(&object_path(&object))
            .unwrap_or_else(|| panic!("{id} not applied"));
        assert!(registry_addon::k8s::contains(&stored, &object), "{id}");
    }

    env.make_registry_ready(3);
    env.clear_logs();
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert_eq!(env.writes(), 0, "{:?}", env.workload.requests());
    let (again_mgmt, again_wl) = env.request_counts();
    env.clear_logs();
    assert_success(&env.call(Hook::BeforeClusterUpgrade).await);
    assert_eq!(env.writes(), 0);
    let (bcu_mgmt, bcu_wl) = env.request_counts();
    println!(
        "API requests per hook call with the direct deployer (management + workload): repeated \
         ACPI {again_mgmt} + {again_wl}, BCU with nothing to renew {bcu_mgmt} + {bcu_wl}"
    );
}

/// Helm installs over an existing object only when it names the release (its
/// `checkOwnership`): the direct deployer marks every object of the chart so, with the release
/// name and namespace the HelmChartProxy uses, and nothing else.
#[tokio::test]
async fn direct_deployer_marks_the_chart_objects_for_helm_to_adopt() {
    let mut env = Env::new().await;
    env.settings = json!({"deployer": "direct"});
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);

    let values = current_values(&env);
    let cluster = Cluster::from_value(&env.cluster).unwrap();
    let proxy = objects::helm_chart_proxy(&cluster, &env.ctx.config.addon, &values).unwrap();
    let release = proxy["spec"]["releaseName"].as_str().unwrap();
    let release_namespace = proxy["spec"]["namespace"].as_str().unwrap();
    assert_eq!(
        (release, release_namespace),
        ("registry", "registry-system")
    );

    let chart_objects = registry_objects(&values);
    // The registry's four, and the node agent's six.
    assert_eq!(chart_objects.len(), 10);
    for object in &chart_objects {
        let id = registry_addon::k8s::ObjectId::of(object);
        let stored = env.workload.get(&object_path(object)).unwrap();
        let metadata = &stored["metadata"];
        assert_eq!(
            metadata["labels"]["app.kubernetes.io/managed-by"], "Helm",
            "{id}"
        );
        assert_eq!(
            metadata["annotations"]["meta.helm.sh/release-name"], release,
            "{id}"
        );
        assert_eq!(
            metadata["annotations"]["meta.helm.sh/release-namespace"], release_namespace,
            "{id}"
        );
        // The chart's own labels are there too.
        assert!(
            registry_addon::k8s::contains(&metadata["labels"], &object["metadata"]["labels"]),
            "{id}"
        );
    }

    // Not in the chart: Helm never sees them, and they stay the addon's.
    for path in ["/api/v1/namespaces/registry-system".to_string(), tls_path()] {
        let stored = env.workload.get(&path).unwrap();
        let metadata = &stored["metadata"];
        assert_eq!(
            metadata["labels"]["app.kubernetes.io/managed-by"], "registry-addon",
            "{path}"
        );
        let annotations = metadata["annotations"].as_object();
        assert!(
            annotations.is_none_or(|a| a.keys().all(|k| !k.starts_with("meta.helm.sh/"))),
            "{path}: {metadata:#}"
        );
    }
}

/// Without the add-on provider the management cluster has no HelmChartProxy API:
/// kube-apiserver answers a plain-text "404 page not found", not a NotFound Status (here: a
/// Status of another reason). The direct deployer and the cleanup take it as "no
/// HelmChartProxy".
#[tokio::test]
async fn direct_deployer_needs_no_helmchartproxy_api() {
    let mut env = Env::new().await;
    env.settings = json!({"deployer": "direct"});
    env.management
        .fail_next(Some(Method::GET), &hcp_path(), 100, 404);
    assert_success(&env.call(Hook::BeforeClusterCreate).await);
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert!(env.workload.get(&statefulset_path()).is_some());
    env.make_registry_ready(3);
    assert_success(&env.call(Hook::BeforeClusterUpgrade).await);
    assert_success(&env.call(Hook::BeforeClusterDelete).await);
    let hcp_gets = env
        .management
        .requests()
        .iter()
        .filter(|r| r.path == hcp_path())
        .count();
    assert_eq!(hcp_gets, 3);
}

/// helmchartproxy → direct: the HelmChartProxy's release and the direct deployer would own the
/// same objects, and deleting the HelmChartProxy later would uninstall them.
#[tokio::test]
async fn direct_deployer_refuses_while_the_helmchartproxy_exists() {
    let mut env = Env::new().await;
    assert_success(&env.call(Hook::BeforeClusterCreate).await);
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let proxy = env.management.get(&hcp_path()).unwrap();
    let statefulset = registry_objects(&current_values(&env))
        .into_iter()
        .find(|o| o["kind"] == "StatefulSet")
        .unwrap();

    env.settings = json!({"deployer": "direct"});
    env.clear_logs();
    let response = env.call(Hook::AfterControlPlaneInitialized).await;
    assert_failure(
        &response,
        "cluster default/wl-1: HelmChartProxy default/wl-1-registry still deploys the registry; \
         switching to the direct deployer needs it gone first: delete it",
    );
    assert!(
        env.workload.requests().is_empty(),
        "{:?}",
        env.workload.requests()
    );
    assert_eq!(
        env.management.writes(),
        0,
        "{:?}",
        env.management.requests()
    );
    assert!(
        env.management
            .requests()
            .iter()
            .any(|r| r.method == Method::GET && r.path == hcp_path())
    );
    assert_eq!(env.management.get(&hcp_path()).unwrap(), proxy);

    // An upgrade fails too rather than waiting: only the operator can remove it.
    env.make_registry_ready(3);
    env.clear_logs();
    let response = env.call(Hook::BeforeClusterUpgrade).await;
    assert_failure(
        &response,
        "HelmChartProxy default/wl-1-registry still deploys",
    );
    assert_eq!(response["retryAfterSeconds"], 0, "{response:#}");
    assert!(env.workload.requests().is_empty());
    assert_eq!(env.writes(), 0);

    // Deleted but held by CAAPH's finalizer: the release is being uninstalled.
    env.management.update(&hcp_path(), |hcp| {
        hcp["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
        hcp["metadata"]["finalizers"] = json!(["addons.cluster.x-k8s.io"]);
    });
    env.clear_logs();
    let response = env.call(Hook::AfterControlPlaneInitialized).await;
    assert_failure(
        &response,
        "HelmChartProxy default/wl-1-registry is being deleted (CAAPH uninstalls its release)",
    );
    assert!(env.workload.requests().is_empty());
    assert_eq!(env.writes(), 0);

    // Gone: the direct deployer takes over.
    env.management.remove(&hcp_path());
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let stored = env.workload.get(&object_path(&statefulset)).unwrap();
    assert!(registry_addon::k8s::contains(&stored, &statefulset));
    assert_eq!(
        stored["metadata"]["annotations"]["meta.helm.sh/release-name"],
        "registry"
    );
}

/// A HelmChartProxy under the addon's name but without its labels is someone else's. The
/// direct deployer refuses beside it as well: a release it installs may claim the same
/// objects, and the helmchartproxy deployer would take it over. It is left as it is.
#[tokio::test]
async fn direct_deployer_refuses_beside_a_foreign_helmchartproxy_of_that_name() {
    let mut env = Env::new().await;
    env.settings = json!({"deployer": "direct"});
    assert_success(&env.call(Hook::BeforeClusterCreate).await);
    plant_foreign_helmchartproxy(&env);
    let foreign = env.management.get(&hcp_path()).unwrap();
    env.clear_logs();

    let response = env.call(Hook::AfterControlPlaneInitialized).await;
    assert_failure(
        &response,
        "HelmChartProxy default/wl-1-registry exists but is not the registry addon's (it lacks \
         the labels app.kubernetes.io/managed-by=registry-addon and \
         cluster.x-k8s.io/cluster-name=wl-1)",
    );
    assert_failure(&response, "rename or delete it");
    assert!(env.workload.requests().is_empty());
    assert_eq!(env.writes(), 0);
    assert_eq!(env.management.get(&hcp_path()).unwrap(), foreign);
}

/// The HelmChartProxy deployer does not force-apply over someone else's HelmChartProxy that
/// holds the addon's name, and BeforeClusterDelete does not delete it.
#[tokio::test]
async fn helmchartproxy_deployer_leaves_a_foreign_helmchartproxy_alone() {
    let env = Env::new().await;
    assert_success(&env.call(Hook::BeforeClusterCreate).await);
    plant_foreign_helmchartproxy(&env);
    let foreign = env.management.get(&hcp_path()).unwrap();
    env.clear_logs();

    let response = env.call(Hook::AfterControlPlaneInitialized).await;
    assert_failure(
        &response,
        "HelmChartProxy default/wl-1-registry exists but is not the registry addon's",
    );
    assert_failure(&response, "the addon does not apply over it");
    assert_eq!(env.management.get(&hcp_path()).unwrap(), foreign);

    env.clear_logs();
    assert_success(&env.call(Hook::BeforeClusterDelete).await);
    assert_eq!(env.writes(), 0);
    assert_eq!(env.management.get(&hcp_path()).unwrap(), foreign);
}

fn plant_foreign_helmchartproxy(env: &Env) {
    env.management.put(
        &format!("/apis/addons.cluster.x-k8s.io/v1alpha1/namespaces/{CLUSTER_NS}/helmchartproxies"),
        json!({
            "apiVersion": "addons.cluster.x-k8s.io/v1alpha1",
            "kind": "HelmChartProxy",
            "metadata": {
                "name": format!("{CLUSTER}-registry"),
                "namespace": CLUSTER_NS,
                "labels": {"app.kubernetes.io/managed-by": "someone-else"},
            },
            "spec": {
                "clusterSelector": {"matchLabels": {"team": "a"}},
                "repoURL": "https://charts.example.com",
                "chartName": "other",
            },
        }),
    );
}

#[tokio::test]
async fn concurrent_calls_converge() {
    let env = Env::new().await;
    let calls = (0..6).map(|i| {
        let hook = if i % 2 == 0 {
            Hook::AfterControlPlaneInitialized
        } else {
            Hook::BeforeClusterCreate
        };
        env.call(hook)
    });
    for response in futures::future::join_all(calls).await {
        assert_success(&response);
    }
    let cert = env.tls_cert_pem();
    assert!(
        CertInfo::from_pem(&cert)
            .unwrap()
            .is_signed_by(&root_ca(&env))
    );
    env.clear_logs();
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert_eq!(env.writes(), 0);
    assert_eq!(env.tls_cert_pem(), cert);
}

#[tokio::test]
async fn concurrent_clusters_share_one_root_ca() {
    let env = Env::new().await;
    let mut other = cluster_fixture("cluster-v1beta2.json");
    other["metadata"]["name"] = json!("wl-2");
    other["metadata"]["uid"] = json!("uid-wl-2");
    let body = |cluster: &Value| {
        serde_json::to_vec(&json!({"kind": "BeforeClusterCreateRequest", "cluster": cluster}))
            .unwrap()
    };
    let (a, b) = (body(&env.cluster), body(&other));
    let (ra, rb) = tokio::join!(
        dispatch(
            &env.ctx,
            Hook::BeforeClusterCreate,
            &a,
            Duration::from_secs(10)
        ),
        dispatch(
            &env.ctx,
            Hook::BeforeClusterCreate,
            &b,
            Duration::from_secs(10)
        ),
    );
    assert_success(&serde_json::to_value(ra).unwrap());
    assert_success(&serde_json::to_value(rb).unwrap());
    let ca = root_ca(&env);
    for name in ["wl-1", "wl-2"] {
        let copy = env
            .management
            .get(&secret_path("default", &names::cluster_ca_secret(name)))
            .unwrap();
        assert_eq!(unb64(&copy["data"]["ca.crt"]), ca.cert_pem(), "{name}");
    }
}

#[tokio::test]
async fn addon_off_writes_nothing() {
    let mut env = Env::new().await;
    env.set_registry(Value::Null);
    for hook in LIFECYCLE {
        let response = env.call(hook).await;
        assert_success(&response);
        assert!(response["message"].as_str().unwrap().contains("off"));
    }
    assert!(env.management.requests().is_empty());
    assert!(env.workload.requests().is_empty());
}

#[tokio::test]
async fn invalid_variable_fails_naming_the_field() {
    let mut env = Env::new().await;
    env.set_registry(json!({"replicas": 9}));
    for hook in LIFECYCLE {
        assert_failure(
            &env.call(hook).await,
            "addons.registry.replicas: must be an integer from 1 to 7",
        );
    }
    assert!(env.management.requests().is_empty());
    env.set_registry(json!({"serviceIP": "192.168.1.1"}));
    assert_failure(
        &env.call(Hook::AfterControlPlaneInitialized).await,
        "addons.registry.serviceIP",
    );
    assert!(
        env.workload.get(&tls_path()).is_none(),
        "nothing half-applied"
    );
}

#[tokio::test]
async fn management_unreachable_fails() {
    let env = Env::new().await;
    let ctx = HookContext::new(
        HookConfig {
            namespace: EXTENSION_NAMESPACE.into(),
            addon: options(&[]),
        },
        Management::Unavailable("no kubeconfig".into()),
    );
    let response = dispatch(
        &ctx,
        Hook::BeforeClusterCreate,
        &env.request(Hook::BeforeClusterCreate),
        Duration::from_secs(10),
    )
    .await;
    assert_failure(
        &serde_json::to_value(response).unwrap(),
        "management cluster unreachable",
    );
}

#[tokio::test]
async fn missing_kubeconfig_secret_is_named() {
    let env = Env::new().await;
    env.management
        .remove(&secret_path(CLUSTER_NS, "wl-1-kubeconfig"));
    for hook in [
        Hook::AfterControlPlaneInitialized,
        Hook::BeforeClusterUpgrade,
    ] {
        assert_failure(
            &env.call(hook).await,
            "secret default/wl-1-kubeconfig on the management cluster: not found",
        );
    }
}

#[tokio::test]
async fn workload_api_errors() {
    let env = Env::new().await;
    // ACPI cannot finish: Failure naming the object and the cluster, CAPI calls again.
    env.workload
        .fail_next(Some(Method::GET), "/secrets/registry-tls", 1, 500);
    assert_failure(
        &env.call(Hook::AfterControlPlaneInitialized).await,
        "cluster default/wl-1: secret registry-system/registry-tls on the workload cluster: get: 500",
    );
    env.workload
        .fail_next(Some(Method::PATCH), "/secrets/registry-tls", 1, 403);
    assert_failure(
        &env.call(Hook::AfterControlPlaneInitialized).await,
        "apply: 403",
    );
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);

    // BCU: an unavailable workload API is waited for, not a failure.
    env.workload
        .fail_next(None, "/secrets/registry-tls", 1, 500);
    let response = env.call(Hook::BeforeClusterUpgrade).await;
    assert_eq!(response["status"], "Success", "{response}");
    let retry = response["retryAfterSeconds"].as_i64().unwrap();
    assert!((10..=30).contains(&retry), "{response}");

    // A workload API that does not answer at all.
    let mut env = Env::new().await;
    assert_success(&env.call(Hook::BeforeClusterCreate).await);
    env.put_kubeconfig(
        &env.workload
            .kubeconfig()
            .replace(&env.workload.url, "http://127.0.0.1:9"),
    );
    assert_failure(
        &env.call(Hook::AfterControlPlaneInitialized).await,
        "on the workload cluster",
    );
    let response = env.call(Hook::BeforeClusterUpgrade).await;
    assert_eq!(response["status"], "Success", "{response}");
    assert!(response["retryAfterSeconds"].as_i64().unwrap() > 0);
    env.set_registry(json!({}));
}

#[tokio::test]
async fn ca_mismatch_fails_and_issues_nothing() {
    let env = Env::new().await;
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let cert = env.tls_cert_pem();
    // As after `clusterctl move` without the root CA: a new management cluster, another root
    // CA Secret (the operator's or cert-manager's).
    env.management.remove(&root_ca_path());
    let other =
        CertificateAuthority::generate(KeyAlgorithm::EcdsaP256, OffsetDateTime::now_utc()).unwrap();
    env.management.put(
        &format!("/api/v1/namespaces/{EXTENSION_NAMESPACE}/secrets"),
        objects::root_ca_secret(EXTENSION_NAMESPACE, &other),
    );
    env.clear_logs();
    for hook in [
        Hook::AfterControlPlaneInitialized,
        Hook::BeforeClusterUpgrade,
    ] {
        assert_failure(&env.call(hook).await, "CA mismatch");
    }
    assert_eq!(env.tls_cert_pem(), cert);
    assert_eq!(env.workload.writes(), 0);
    let copy = env.management.get(&cluster_ca_path()).unwrap();
    assert!(!root_ca(&env).is_in_bundle(&unb64(&copy["data"]["ca.crt"])));
}

#[tokio::test]
async fn renewal() {
    let env = Env::new().await;
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    env.make_registry_ready(3);
    let ca = root_ca(&env);
    let now = OffsetDateTime::now_utc();

    // 600 days left: kept.
    let kept = plant_certificate(&env, &ca, 3, "10.128.0.20", now - time::Duration::days(130));
    assert_success(&env.call(Hook::BeforeClusterUpgrade).await);
    assert_eq!(env.tls_cert_pem(), kept);

    // 100 days left: ACPI keeps it (still usable), BCU renews.
    let old = plant_certificate(&env, &ca, 3, "10.128.0.20", now - time::Duration::days(630));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert_eq!(env.tls_cert_pem(), old);
    let response = env.call(Hook::BeforeClusterUpgrade).await;
    assert_eq!(response["status"], "Success");
    let renewed = env.tls_cert_pem();
    assert_ne!(renewed, old);
    let info = CertInfo::from_pem(&renewed).unwrap();
    assert!(info.remaining(now) > time::Duration::days(729));
    // The new hash reaches the chart values, so the pods roll.
    let hcp = env.management.get(&hcp_path()).unwrap();
    assert!(
        hcp["spec"]["valuesTemplate"]
            .as_str()
            .unwrap()
            .contains(&info.sha256_hex())
    );

    // Wrong SANs (a replica missing, another service IP): renewed, by ACPI too.
    for (replicas, ip) in [(2, "10.128.0.20"), (3, "10.128.0.21")] {
        let wrong = plant_certificate(&env, &ca, replicas, ip, now);
        assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
        assert_ne!(env.tls_cert_pem(), wrong);
        assert!(
            CertInfo::from_pem(&env.tls_cert_pem()).unwrap().names
                == certs::registry_subject_names(3, "10.128.0.20".parse().unwrap())
        );
    }

    // Signed by another CA: renewed.
    let stranger = CertificateAuthority::generate(KeyAlgorithm::EcdsaP256, now).unwrap();
    let foreign = plant_certificate(&env, &stranger, 3, "10.128.0.20", now);
    assert_success(&env.call(Hook::BeforeClusterUpgrade).await);
    assert_ne!(env.tls_cert_pem(), foreign);
    assert!(
        CertInfo::from_pem(&env.tls_cert_pem())
            .unwrap()
            .is_signed_by(&ca)
    );
}

#[tokio::test]
async fn renew_fraction_is_configurable() {
    let env = Env::with(&["--renew-fraction", "0.1"], "cluster-v1beta2.json").await;
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    env.make_registry_ready(3);
    let ca = root_ca(&env);
    let kept = plant_certificate(
        &env,
        &ca,
        3,
        "10.128.0.20",
        OffsetDateTime::now_utc() - time::Duration::days(630),
    );
    assert_success(&env.call(Hook::BeforeClusterUpgrade).await);
    assert_eq!(env.tls_cert_pem(), kept);
}

#[tokio::test]
async fn replicas_one_three_seven() {
    for replicas in [1u8, 3, 7] {
        let mut env = Env::new().await;
        env.set_registry(json!({"replicas": replicas}));
        assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
        let info = CertInfo::from_pem(&env.tls_cert_pem()).unwrap();
        assert_eq!(
            info.names,
            certs::registry_subject_names(replicas, "10.128.0.20".parse().unwrap())
        );
        let last = format!(
            "registry-{}.registry-headless.registry-system.svc.cluster.local",
            replicas - 1
        );
        assert!(info.names.dns.contains(&last));
        assert!(!info.names.dns.contains(&format!("registry-{replicas}")));
        // 4 service names x 2 services + per replica 1 + 3, as DNS SANs.
        assert_eq!(info.names.dns.len(), 7 + 4 * usize::from(replicas));
    }
}

#[tokio::test]
async fn ipv6_service_cidr() {
    let mut env = Env::new().await;
    env.set_service_cidr("fd00:10:96::/108");
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let info = CertInfo::from_pem(&env.tls_cert_pem()).unwrap();
    assert!(
        info.names.ips.contains(&"fd00:10:96::14".parse().unwrap()),
        "{:?}",
        info.names.ips
    );
    let hcp = env.management.get(&hcp_path()).unwrap();
    assert!(
        hcp["spec"]["valuesTemplate"]
            .as_str()
            .unwrap()
            .contains("fd00:10:96::14")
    );
}

#[tokio::test]
async fn before_cluster_upgrade_blocks_until_the_registry_is_ready() {
    let env = Env::new().await;
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);

    let response = env.call(Hook::BeforeClusterUpgrade).await;
    assert_eq!(response["status"], "Success");
    assert_eq!(response["retryAfterSeconds"], 15);
    assert!(
        response["message"]
            .as_str()
            .unwrap()
            .contains("statefulset registry-system/registry"),
        "{response}"
    );

    env.make_registry_ready(3);
    env.workload.update(&statefulset_path(), |sts| {
        sts["status"]["readyReplicas"] = json!(2);
    });
    let response = env.call(Hook::BeforeClusterUpgrade).await;
    assert!(
        response["message"]
            .as_str()
            .unwrap()
            .contains("2/3 replicas ready"),
        "{response}"
    );
    assert_eq!(response["retryAfterSeconds"], 15);

    env.make_registry_ready(3);
    env.workload.update(&statefulset_path(), |sts| {
        sts["metadata"]["generation"] = json!(5);
    });
    let response = env.call(Hook::BeforeClusterUpgrade).await;
    assert!(
        response["message"]
            .as_str()
            .unwrap()
            .contains("not yet observed"),
        "{response}"
    );

    // The add-on provider has not rolled the chart with the current certificate yet.
    env.workload.update(&statefulset_path(), |sts| {
        sts["spec"]["template"]["metadata"]["annotations"] =
            json!({(names::CERTIFICATE_HASH_ANNOTATION): "an-older-certificate"});
    });
    env.make_registry_ready(3);
    let response = env.call(Hook::BeforeClusterUpgrade).await;
    assert!(
        response["message"]
            .as_str()
            .unwrap()
            .contains("current certificate"),
        "{response}"
    );
    let hash = CertInfo::from_pem(&env.tls_cert_pem())
        .unwrap()
        .sha256_hex();
    env.workload.update(&statefulset_path(), |sts| {
        sts["spec"]["template"]["metadata"]["annotations"] =
            json!({(names::CERTIFICATE_HASH_ANNOTATION): hash});
    });

    env.make_registry_ready(3);
    let response = env.call(Hook::BeforeClusterUpgrade).await;
    assert_success(&response);
    assert_eq!(response["retryAfterSeconds"], 0);
}

#[tokio::test]
async fn before_cluster_delete_removes_the_helmchartproxy() {
    let env = Env::new().await;
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert_eq!(env.ctx.state.cached_workload_clients(), 1);
    assert!(env.management.get(&hcp_path()).is_some());

    let response = env.call(Hook::BeforeClusterDelete).await;
    assert_success(&response);
    assert_eq!(response["retryAfterSeconds"], 0);
    assert!(env.management.get(&hcp_path()).is_none());
    assert_eq!(env.ctx.state.cached_workload_clients(), 0);
    // The root CA stays (other clusters use it); the CA copy goes with its ownerReference.
    assert!(env.management.get(&root_ca_path()).is_some());
    assert!(
        env.workload
            .requests()
            .iter()
            .all(|r| !r.is_write() || !r.path.contains("delete"))
    );

    env.clear_logs();
    assert_success(&env.call(Hook::BeforeClusterDelete).await);
    assert_eq!(env.writes(), 0);
}

#[tokio::test]
async fn kubeconfig_change_rebuilds_the_workload_client() {
    let env = Env::new().await;
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let replacement = support::apiserver::ApiServer::start().await;
    env.put_kubeconfig(&replacement.kubeconfig());
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert!(
        replacement.get(&tls_path()).is_some(),
        "the new kubeconfig is used"
    );
}

#[tokio::test]
async fn registry_tls_of_the_wrong_type_is_replaced() {
    let env = Env::new().await;
    env.workload.put(
        "/api/v1/namespaces/registry-system/secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "registry-tls"}, "type": "Opaque", "data": {}}),
    );
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert_eq!(
        env.workload.get(&tls_path()).unwrap()["type"],
        "kubernetes.io/tls"
    );
}

/// Exact protocol: the apply request and how API errors are classified.
mod protocol {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;

    async fn respond(
        handle: &mut tower_test::mock::Handle<Request<Body>, Response<Body>>,
        status: u16,
        body: Value,
    ) -> Request<Body> {
        let (request, send) = handle.next_request().await.expect("a request");
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        send.send_response(response);
        request
    }

    fn status(code: u16) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "busy", "reason": "TooManyRequests", "code": code})
    }

    #[tokio::test]
    async fn apply_is_server_side_apply_with_force() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = ClusterApi::new(kube::Client::new(service, "default"), Place::Workload);
        let secret = objects::registry_namespace();
        let task = tokio::spawn(async move { api.apply(&secret).await });
        let request = tokio::time::timeout(
            Duration::from_secs(5),
            respond(&mut handle, 200, objects::registry_namespace()),
        )
        .await
        .unwrap();
        assert_eq!(request.method(), "PATCH");
        assert_eq!(request.uri().path(), "/api/v1/namespaces/registry-system");
        let query = request.uri().query().unwrap();
        assert!(query.contains("fieldManager=registry-addon"), "{query}");
        assert!(query.contains("force=true"), "{query}");
        assert_eq!(
            request.headers()["content-type"],
            "application/apply-patch+yaml"
        );
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn throttling_and_unavailability_are_transient() {
        for (code, transient) in [
            (429, true),
            (503, true),
            (500, true),
            (403, false),
            (422, false),
        ] {
            let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let api = ClusterApi::new(kube::Client::new(service, "default"), Place::Workload);
            let task = tokio::spawn(async move {
                api.get("v1", "Secret", Some("registry-system"), "registry-tls")
                    .await
            });
            tokio::time::timeout(
                Duration::from_secs(5),
                respond(&mut handle, code, status(code)),
            )
            .await
            .unwrap();
            let error = task.await.unwrap().unwrap_err();
            assert_eq!(error.is_transient(), transient, "{code}");
            assert_eq!(error.code(), Some(code));
            assert!(
                error.to_string().starts_with(
                    "secret registry-system/registry-tls on the workload cluster: get: "
                ),
                "{error}"
            );
        }
    }

    #[tokio::test]
    async fn ensure_skips_the_write_when_nothing_differs() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = ClusterApi::new(kube::Client::new(service, "default"), Place::Workload);
        let mut current = objects::registry_namespace();
        current["metadata"]["uid"] = json!("u");
        current["metadata"]["resourceVersion"] = json!("7");
        current["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!("registry-system");
        current["spec"] = json!({"finalizers": ["kubernetes"]});
        let task = tokio::spawn(async move { api.ensure(&objects::registry_namespace()).await });
        let request = respond(&mut handle, 200, current).await;
        assert_eq!(request.method(), "GET");
        // No second request: the mock would hang, the task must finish on its own.
        let outcome = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(outcome, registry_addon::k8s::Outcome::Unchanged);
    }
}

#[tokio::test]
async fn a_hanging_workload_api_is_answered_inside_the_budget() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let env = Env::new().await;
    env.put_kubeconfig(&env.workload.kubeconfig().replace(&env.workload.url, &url));
    let budget = Duration::from_secs(2);
    for hook in [
        Hook::AfterControlPlaneInitialized,
        Hook::BeforeClusterUpgrade,
    ] {
        let started = std::time::Instant::now();
        let response = dispatch(&env.ctx, hook, &env.request(hook), budget).await;
        assert!(
            started.elapsed() < budget,
            "{hook} took {:?}",
            started.elapsed()
        );
        let response = serde_json::to_value(response).unwrap();
        if hook == Hook::BeforeClusterUpgrade {
            assert_eq!(response["status"], "Success", "{response}");
            assert_eq!(response["retryAfterSeconds"], 15);
        } else {
            // Either the client's read timeout or the hook's own deadline answers first.
            assert_eq!(response["status"], "Failure", "{response}");
            let message = response["message"].as_str().unwrap();
            assert!(
                message.contains("on the workload cluster")
                    || message.contains("did not finish within"),
                "{message}"
            );
        }
    }
}

fn bcrypt_ok(htpasswd: &str, user: &str, password: &str) -> bool {
    htpasswd
        .lines()
        .filter_map(|l| l.split_once(':'))
        .any(|(u, hash)| u == user && bcrypt::verify(password, hash).unwrap_or(false))
}

/// `ro` and `rw` are created once on the management cluster, the workload cluster gets only
/// hashes and the sync identity, repeats write nothing, and an operator's new password is
/// hashed anew.
#[tokio::test]
async fn registry_users_are_created_once_and_kept() {
    let env = Env::new().await;
    assert_success(&env.call(Hook::BeforeClusterCreate).await);
    let user_path = |user: &str| secret_path(CLUSTER_NS, &names::user_secret(CLUSTER, user));
    let ro = env.management.get(&user_path("ro")).unwrap();
    let rw = env.management.get(&user_path("rw")).unwrap();
    for (secret, user) in [(&ro, "ro"), (&rw, "rw")] {
        assert_eq!(secret["type"], "kubernetes.io/basic-auth");
        assert_eq!(unb64(&secret["data"]["username"]), user);
        assert!(unb64(&secret["data"]["password"]).len() >= 32);
        assert_eq!(
            secret["metadata"]["ownerReferences"][0]["uid"],
            "00000000-0000-0000-0000-000000001234"
        );
    }
    let ro_password = unb64(&ro["data"]["password"]);
    let rw_password = unb64(&rw["data"]["password"]);
    assert_ne!(ro_password, rw_password);
    // The nodes' hosts.toml, with the ro credentials, for contentFrom.
    let hosts = env
        .management
        .get(&secret_path(
            CLUSTER_NS,
            &names::containerd_hosts_secret(CLUSTER),
        ))
        .unwrap();
    let hosts = unb64(&hosts["data"]["hosts.toml"]);
    assert!(hosts.contains(&format!("Basic {}", b64(&format!("ro:{ro_password}")))));

    env.clear_logs();
    assert_success(&env.call(Hook::BeforeClusterCreate).await);
    assert_eq!(env.writes(), 0, "{:?}", env.management.requests());

    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let auth_path = secret_path(names::REGISTRY_NAMESPACE, names::REGISTRY_AUTH_SECRET);
    let auth = env.workload.get(&auth_path).unwrap();
    let pull = unb64(&auth["data"]["pull.htpasswd"]);
    let push = unb64(&auth["data"]["push.htpasswd"]);
    assert!(bcrypt_ok(&pull, "ro", &ro_password));
    assert!(!bcrypt_ok(&push, "ro", &ro_password));
    assert!(bcrypt_ok(&push, "rw", &rw_password));
    let sync = unb64(&auth["data"]["sync.credentials"]);
    let (sync_user, sync_password) = sync.split_once(':').unwrap();
    assert_eq!(sync_user, "sync");
    assert!(bcrypt_ok(&push, "sync", sync_password));
    assert!(unb64(&auth["data"]["http.secret"]).len() >= 32);
    // No plain ro/rw password anywhere on the workload cluster.
    let everything = format!("{:?}", env.workload.requests()) + &auth.to_string() + &pull + &push;
    assert!(!everything.contains(&ro_password) && !everything.contains(&rw_password));

    env.clear_logs();
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert_eq!(env.writes(), 0, "{:?}", env.workload.requests());

    // The operator sets a new rw password: hashed anew, sync identity and HTTP secret kept.
    env.management.update(&user_path("rw"), |s| {
        s["data"]["password"] = json!(b64("a-new-password-chosen-by-the-operator"));
    });
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let after = env.workload.get(&auth_path).unwrap();
    let push = unb64(&after["data"]["push.htpasswd"]);
    assert!(bcrypt_ok(
        &push,
        "rw",
        "a-new-password-chosen-by-the-operator"
    ));
    assert_eq!(
        after["data"]["sync.credentials"],
        auth["data"]["sync.credentials"]
    );
    assert_eq!(after["data"]["http.secret"], auth["data"]["http.secret"]);
}

/// A user Secret edited into an unusable state is named, and nothing is generated over it.
#[tokio::test]
async fn unusable_user_secrets_fail_naming_the_secret() {
    let env = Env::new().await;
    assert_success(&env.call(Hook::BeforeClusterCreate).await);
    let rw_path = secret_path(CLUSTER_NS, &names::user_secret(CLUSTER, "rw"));
    for (edit, complaint) in [
        (
            json!({"username": b64("rw"), "password": ""}),
            "key password is empty",
        ),
        (json!({"password": b64("x")}), "key username is missing"),
        (
            json!({"username": b64("ro"), "password": b64("x")}),
            "must have different names",
        ),
    ] {
        env.management
            .update(&rw_path, |s| s["data"] = edit.clone());
        let before = env.management.get(&rw_path).unwrap();
        env.clear_logs();
        for hook in [
            Hook::BeforeClusterCreate,
            Hook::AfterControlPlaneInitialized,
        ] {
            let response = env.call(hook).await;
            assert_failure(
                &response,
                "secret default/wl-1-registry-addon-rw on the management cluster",
            );
            assert_failure(&response, complaint);
        }
        assert_eq!(env.writes(), 0, "{:?}", env.management.requests());
        assert_eq!(env.management.get(&rw_path).unwrap(), before);
    }
}

/// A root CA Secret deleted after clusters were set up is not silently replaced: the hooks of
/// those clusters, and of a cluster created meanwhile, fail naming the CA the clusters trust,
/// until the Secret is restored.
#[tokio::test]
async fn a_lost_root_ca_is_not_replaced() {
    let env = Env::new().await;
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let original = env.management.get(&root_ca_path()).unwrap();
    let fingerprint = CertInfo::from_pem(&unb64(&original["data"]["ca.crt"]))
        .unwrap()
        .sha256_hex()
        .to_uppercase();
    // The Cluster as the management cluster holds it, for the look-up of other clusters.
    let mut stored = env.cluster.clone();
    stored["apiVersion"] = json!("cluster.x-k8s.io/v1beta2");
    stored["kind"] = json!("Cluster");
    env.management.put(
        "/apis/cluster.x-k8s.io/v1beta2/namespaces/default/clusters",
        stored,
    );
    env.management.remove(&root_ca_path());

    for hook in [
        Hook::BeforeClusterCreate,
        Hook::AfterControlPlaneInitialized,
        Hook::BeforeClusterUpgrade,
    ] {
        let response = env.call(hook).await;
        assert_failure(
            &response,
            "registry-addon-root-ca on the management cluster is missing",
        );
        assert_failure(&response, "cluster default/wl-1 trusts a root CA");
        assert_failure(
            &response,
            &format!("{}:{}", &fingerprint[..2], &fingerprint[2..4]),
        );
        assert_failure(&response, "restore that Secret");
    }
    assert!(env.management.get(&root_ca_path()).is_none());

    // A cluster created while the Secret is gone is not issued an interim CA either.
    let mut other = Env::new().await;
    other.cluster["metadata"]["name"] = json!("wl-2");
    other.cluster["metadata"]["uid"] = json!("00000000-0000-0000-0000-000000009999");
    let mut wl1 = env.cluster.clone();
    wl1["apiVersion"] = json!("cluster.x-k8s.io/v1beta2");
    wl1["kind"] = json!("Cluster");
    other.management.put(
        "/apis/cluster.x-k8s.io/v1beta2/namespaces/default/clusters",
        wl1,
    );
    other.management.put(
        "/api/v1/namespaces/default/secrets",
        env.management.get(&cluster_ca_path()).unwrap(),
    );
    let response = other.call(Hook::BeforeClusterCreate).await;
    assert_failure(&response, "cluster default/wl-1 trusts a root CA");
    assert!(other.management.get(&root_ca_path()).is_none());

    // Restored: everything works again, with the original CA.
    env.management.put(
        &format!("/api/v1/namespaces/{EXTENSION_NAMESPACE}/secrets"),
        original,
    );
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
}

/// BeforeClusterCreate asks CAPI to call again when the management API has a passing
/// failure (an etcd restart), instead of failing the cluster's creation.
#[tokio::test]
async fn before_cluster_create_retries_on_transient_errors() {
    let env = Env::new().await;
    env.management
        .fail_next(Some(Method::GET), "/secrets/registry-addon-root-ca", 1, 500);
    let response = env.call(Hook::BeforeClusterCreate).await;
    assert_eq!(response["status"], "Success", "{response}");
    assert!(
        response["retryAfterSeconds"].as_i64().unwrap() > 0,
        "{response}"
    );
    assert!(
        response["message"].as_str().unwrap().contains("get: 500"),
        "{response}"
    );
    assert_success(&env.call(Hook::BeforeClusterCreate).await);
    // A permanent error is still a Failure.
    env.management
        .fail_next(Some(Method::GET), "/secrets/registry-addon-root-ca", 1, 403);
    assert_failure(&env.call(Hook::BeforeClusterCreate).await, "get: 403");
}
