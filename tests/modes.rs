//! The registry modes through the hooks, against in-memory management and workload API
//! servers: the upstream Secrets of Proxy and Direct copied (and checked) once, each mode's
//! objects applied by the direct deployer and the other modes' removed, PVCs kept.

mod support;
mod sync_support;

use serde_json::{Value, json};

use support::{CLUSTER_NS, Env, b64, secret_path, statefulset_path, tls_path, unb64};

use registry_addon::wire::runtime::Hook;

const UPSTREAM_SECRET: &str = "/api/v1/namespaces/registry-system/secrets/registry-upstream";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/registry-system/deployments/registry-direct";
const SERVICE: &str = "/api/v1/namespaces/registry-system/services/registry";
const DAEMONSET: &str = "/apis/apps/v1/namespaces/registry-system/daemonsets/registry-node-agent";
const PVC: &str = "/api/v1/namespaces/registry-system/persistentvolumeclaims/data-registry-0";

fn assert_success(response: &Value) {
    assert_eq!(response["status"], "Success", "{response:#}");
}

fn assert_failure(response: &Value, needle: &str) -> String {
    assert_eq!(response["status"], "Failure", "{response:#}");
    let message = response["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    message
}

fn ca_pem() -> String {
    registry_addon::certs::CertificateAuthority::generate(
        registry_addon::cli::KeyAlgorithm::EcdsaP256,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap()
    .cert_pem()
    .to_string()
}

fn put_secret(env: &Env, name: &str, kind: &str, data: &[(&str, &str)]) {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), json!(b64(v))))
        .collect();
    env.management.put(
        &format!("/api/v1/namespaces/{CLUSTER_NS}/secrets"),
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": kind,
            "metadata": {"name": name, "namespace": CLUSTER_NS},
            "data": data,
        }),
    );
}

fn upstream() -> Value {
    json!({
        "url": "https://upstream.example:5443/team",
        "credentialsSecretRef": {"name": "up-creds"},
        "caSecretRef": {"name": "up-ca"},
    })
}

/// A real upstream registry over TLS under `dir`, its CA in Secret `up-ca` beside the Cluster.
fn tls_upstream(
    env: &Env,
    dir: &std::path::Path,
) -> (sync_support::TestTls, sync_support::RegistryProcess) {
    let tls = sync_support::TestTls::new(&dir.join("tls"));
    let upstream = sync_support::RegistryProcess::start(
        &dir.join("upstream"),
        &sync_support::RegistryOptions {
            tls: Some(&tls),
            ..Default::default()
        },
    );
    put_secret(
        env,
        "up-ca",
        "Opaque",
        &[("ca.crt", &String::from_utf8(tls.ca_pem()).unwrap())],
    );
    (tls, upstream)
}

async fn direct_env() -> Env {
    let mut env = Env::new().await;
    env.settings = json!({"deployer": "direct"});
    env
}

#[tokio::test]
async fn proxy_copies_the_upstream_secrets_once() {
    let mut env = direct_env().await;
    let ca = ca_pem();
    put_secret(
        &env,
        "up-creds",
        "kubernetes.io/basic-auth",
        &[("username", "puller"), ("password", "s3cret")],
    );
    put_secret(&env, "up-ca", "Opaque", &[("ca.crt", &ca)]);
    env.set_registry(json!({"mode": "Proxy", "upstream": upstream()}));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);

    let copy = env
        .workload
        .get(UPSTREAM_SECRET)
        .expect("registry-upstream");
    assert_eq!(unb64(&copy["data"]["username"]), "puller");
    assert_eq!(unb64(&copy["data"]["password"]), "s3cret");
    assert_eq!(unb64(&copy["data"]["ca.crt"]), ca);
    let sts = env.workload.get(&statefulset_path()).expect("StatefulSet");
    // The front's relay reaches the upstream, the registry reaches the relay.
    let containers = &sts["spec"]["template"]["spec"]["containers"];
    let args = containers[0]["args"].as_array().unwrap();
    let remote = args.iter().position(|a| a == "--remote").unwrap();
    assert_eq!(args[remote + 1], "https://upstream.example:5443");
    assert!(
        containers[1]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "REGISTRY_PROXY_REMOTEURL"
                && e["value"] == "http://127.0.0.1:5003")
    );

    // A repeat writes nothing.
    env.make_registry_ready(2);
    env.clear_logs();
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert_eq!(env.writes(), 0, "{:?}", env.workload.requests());

    // A rotated password is copied, and the Proxy pods (which read it at start) restart.
    let upstream_hash = |env: &Env| {
        env.workload.get(&statefulset_path()).unwrap()["spec"]["template"]["metadata"]
            ["annotations"]["registry-addon/upstream-hash"]
            .as_str()
            .map(str::to_string)
    };
    let before = upstream_hash(&env).expect("Proxy pods carry the upstream Secret's hash");
    assert!(!before.contains("s3cret"));
    put_secret(
        &env,
        "up-creds",
        "kubernetes.io/basic-auth",
        &[("username", "puller"), ("password", "n3w")],
    );
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let copy = env.workload.get(UPSTREAM_SECRET).unwrap();
    assert_eq!(unb64(&copy["data"]["password"]), "n3w");
    assert_ne!(
        upstream_hash(&env).unwrap(),
        before,
        "the pods restart for it"
    );
    env.set_registry(json!({"mode": "Proxy", "upstream": {"url": "https://upstream.example:5443/team", "caSecretRef": {"name": "up-ca"}}}));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let copy = env.workload.get(UPSTREAM_SECRET).unwrap();
    let keys: Vec<_> = copy["data"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["ca.crt"]);

    // Proxy to Local goes through Unmanaged (directly it is refused); the copy goes.
    env.set_registry(json!({}));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert!(
        env.workload.get(UPSTREAM_SECRET).is_some(),
        "Proxy → Local refused: nothing changed"
    );
    env.set_registry(json!({"mode": "Unmanaged"}));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert!(
        env.workload.get(UPSTREAM_SECRET).is_some(),
        "kept for Proxy's pods while they serve"
    );
    complete_switch(&env, &statefulset_path()).await;
    assert!(
        env.workload.get(UPSTREAM_SECRET).is_none(),
        "gone with Proxy"
    );
    env.set_registry(json!({}));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert!(env.workload.get(UPSTREAM_SECRET).is_none());
}

#[tokio::test]
async fn missing_or_malformed_upstream_secrets_are_named_and_nothing_is_applied() {
    let mut env = direct_env().await;
    env.set_registry(json!({"mode": "Direct", "upstream": upstream()}));
    assert_failure(
        &env.call(Hook::AfterControlPlaneInitialized).await,
        "secret default/up-creds on the management cluster (addons.registry.upstream.credentialsSecretRef): not found",
    );
    assert!(
        env.workload.get(&tls_path()).is_none(),
        "nothing half-applied"
    );
    assert!(env.workload.get(UPSTREAM_SECRET).is_none());

    put_secret(
        &env,
        "up-creds",
        "Opaque",
        &[("user", "puller"), ("password", "s3cret")],
    );
    let message = assert_failure(
        &env.call(Hook::AfterControlPlaneInitialized).await,
        "secret default/up-creds on the management cluster (addons.registry.upstream.credentialsSecretRef): key username is missing",
    );
    assert!(!message.contains("s3cret"), "{message}");

    put_secret(
        &env,
        "up-creds",
        "Opaque",
        &[("username", "puller"), ("password", "s3cret")],
    );
    assert_failure(
        &env.call(Hook::AfterControlPlaneInitialized).await,
        "secret default/up-ca on the management cluster (addons.registry.upstream.caSecretRef): not found",
    );
    put_secret(&env, "up-ca", "Opaque", &[("ca.crt", "not a certificate")]);
    assert_failure(
        &env.call(Hook::AfterControlPlaneInitialized).await,
        "(addons.registry.upstream.caSecretRef): key ca.crt holds no PEM certificate",
    );
    put_secret(&env, "up-ca", "Opaque", &[("tls.crt", "x")]);
    assert_failure(
        &env.call(Hook::AfterControlPlaneInitialized).await,
        "key ca.crt is missing",
    );
    assert!(
        env.workload.get(&tls_path()).is_none(),
        "nothing half-applied"
    );
    assert!(env.workload.get(DEPLOYMENT).is_none());

    put_secret(&env, "up-ca", "Opaque", &[("ca.crt", &ca_pem())]);
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert!(env.workload.get(DEPLOYMENT).is_some());
    let copy = env.workload.get(UPSTREAM_SECRET).unwrap();
    assert_eq!(unb64(&copy["data"]["username"]), "puller");
    assert_eq!(unb64(&copy["data"]["password"]), "s3cret");
}

#[tokio::test]
async fn each_mode_applies_its_objects_and_keeps_the_address_and_the_pvcs() {
    let mut env = direct_env().await;
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert!(env.workload.get(&statefulset_path()).is_some());
    let address = env.workload.get(SERVICE).unwrap()["spec"]["clusterIP"].clone();
    // The StatefulSet controller's PVC, holding Local's data.
    env.workload.put(
        "/api/v1/namespaces/registry-system/persistentvolumeclaims",
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "data-registry-0", "namespace": "registry-system",
                            "labels": {"app.kubernetes.io/name": "registry", "app.kubernetes.io/part-of": "registry-addon"}},
               "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}),
    );

    // A switch to Direct waits for its upstream: a real one, answering /v2/.
    let dir = tempfile::tempdir().unwrap();
    let (_tls, upstream) = tls_upstream(&env, dir.path());
    env.set_registry(json!({"mode": "Direct", "upstream": {"url": upstream.url, "caSecretRef": {"name": "up-ca"}}}));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert!(
        env.workload.get(&statefulset_path()).is_some(),
        "Local serves beside Direct until the switch completes"
    );
    complete_switch(&env, &statefulset_path()).await;
    assert!(
        env.workload.get(&statefulset_path()).is_none(),
        "no StatefulSet in Direct"
    );
    assert!(
        env.workload
            .get("/api/v1/namespaces/registry-system/services/registry-headless")
            .is_none()
    );
    let deployment = env
        .workload
        .get(DEPLOYMENT)
        .expect("Deployment registry-direct");
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        env.workload.get(SERVICE).unwrap()["spec"]["clusterIP"],
        address
    );
    assert!(env.workload.get(PVC).is_some(), "the PVC stays");
    let copy = env.workload.get(UPSTREAM_SECRET).expect("the CA copied");
    let keys: Vec<_> = copy["data"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["ca.crt"], "no credentials: the CA only");

    env.set_registry(json!({"mode": "Unmanaged"}));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert!(
        env.workload.get(DEPLOYMENT).is_some(),
        "Direct serves until the nodes are off it"
    );
    complete_switch(&env, DEPLOYMENT).await;
    assert!(env.workload.get(DEPLOYMENT).is_none());
    assert!(env.workload.get(SERVICE).is_none());
    assert!(
        env.workload.get(DAEMONSET).is_some(),
        "the node agent stays to clean the nodes"
    );
    assert!(env.workload.get(PVC).is_some(), "the PVC stays");
    // BeforeClusterUpgrade has nothing to wait for.
    assert_success(&env.call(Hook::BeforeClusterUpgrade).await);

    env.set_registry(json!({}));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let sts = env
        .workload
        .get(&statefulset_path())
        .expect("StatefulSet back");
    assert_eq!(
        sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"],
        "Retain"
    );
    assert!(env.workload.get(DEPLOYMENT).is_none());
    assert_eq!(
        env.workload.get(SERVICE).unwrap()["spec"]["clusterIP"],
        address
    );
    assert!(env.workload.get(PVC).is_some());
    let _ = secret_path;
}

/// Calls BeforeClusterUpgrade, with Direct's Deployment ready, until the switch under way
/// completes and the previous mode's `workload` is gone (there are no Nodes to ack).
async fn complete_switch(env: &Env, workload: &str) {
    for _ in 0..5 {
        env.make_direct_ready();
        env.call(Hook::BeforeClusterUpgrade).await;
        if env.workload.get(workload).is_none() {
            assert!(mode_record(env).get("switchingFrom").is_none());
            return;
        }
        assert!(mode_record(env).get("switchingFrom").is_some());
    }
    panic!("the switch did not complete: {workload} is still there");
}

fn mode_record(env: &Env) -> Value {
    let configmap = env
        .workload
        .get("/api/v1/namespaces/registry-system/configmaps/registry-mode")
        .expect("the mode record");
    serde_json::from_str(configmap["data"]["mode.json"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn local_to_proxy_directly_is_refused_and_changes_nothing() {
    let mut env = direct_env().await;
    env.set_registry(json!({}));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert_eq!(mode_record(&env)["mode"], "Local");
    let sts = env.workload.get(&statefulset_path()).unwrap();
    env.set_registry(json!({"mode": "Proxy", "upstream": {"url": "https://upstream.example"}}));
    env.clear_logs();
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert_eq!(env.writes(), 0, "{:?}", env.workload.requests());
    assert_eq!(
        env.workload.get(&statefulset_path()).unwrap()["spec"],
        sts["spec"]
    );
    assert_eq!(mode_record(&env)["mode"], "Local");
}

#[tokio::test]
async fn a_switch_waits_for_an_image_in_use_missing_at_the_target() {
    let mut env = direct_env().await;
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let dir = tempfile::tempdir().unwrap();
    let (tls, upstream) = tls_upstream(&env, dir.path());
    // A Pod in the workload cluster runs an image of the upstream's host, and one elsewhere.
    let host = upstream.url.trim_start_matches("https://").to_string();
    env.workload.put(
        "/api/v1/namespaces/default/pods",
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app"},
               "spec": {"initContainers": [{"name": "init", "image": format!("{host}/team/app:1")}],
                        "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]},
               "status": {"phase": "Running"}}),
    );
    env.set_registry(json!({"mode": "Direct", "upstream": {"url": upstream.url, "caSecretRef": {"name": "up-ca"}}}));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert!(
        env.workload.get(DEPLOYMENT).is_none(),
        "held: the upstream lacks team/app:1"
    );
    assert!(
        env.workload.get(&statefulset_path()).is_some(),
        "Local keeps serving"
    );
    assert_eq!(mode_record(&env)["mode"], "Local");

    // The image pushed to the upstream: the switch goes ahead.
    let layout = dir.path().join("layout");
    let image = sync_support::Image::new("amd64", vec![b"layer".to_vec()], false);
    sync_support::write_oci_layout(&layout, "1", &[("amd64", &image)]);
    sync_support::skopeo_push(&layout, "1", &upstream, "team/app", Some(&tls));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert!(env.workload.get(DEPLOYMENT).is_some(), "switched to Direct");
    let record = mode_record(&env);
    assert_eq!(record["mode"], "Direct");
    assert_eq!(record["switchingFrom"], "Local");

    // Back to Local before the switch completed: allowed, and under way until the nodes are
    // back; the abandoned Direct serves meanwhile (nodes may carry its route).
    env.set_registry(json!({}));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert!(env.workload.get(&statefulset_path()).is_some());
    assert!(
        env.workload.get(DEPLOYMENT).is_some(),
        "Direct serves until the switch back completes"
    );
    let record = mode_record(&env);
    assert_eq!(record["mode"], "Local");
    assert_eq!(record["switchingFrom"], "Local", "{record}");
    // Local's replicas never stopped serving: nothing is required of them.
    assert!(
        env.workload
            .get("/api/v1/namespaces/registry-system/configmaps/registry-images-in-use")
            .is_none()
    );
    env.make_registry_ready(3);
    complete_switch(&env, DEPLOYMENT).await;
    assert!(env.workload.get(&statefulset_path()).is_some());
}

/// With a HelmChartProxy, Helm keeps the workload objects a change of mode drops from the
/// release (`helm.sh/resource-policy: keep`): the previous mode serves beside the new one, and
/// its objects are deleted once the switch completes. Helm is played here: the objects its
/// release would hold are put into the workload cluster.
#[tokio::test]
async fn with_a_helm_chart_proxy_the_kept_objects_of_the_previous_mode_go_at_the_end() {
    let mut env = Env::new().await;
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let values = |proxy: &Value| -> Value {
        serde_yaml::from_str(proxy["spec"]["valuesTemplate"].as_str().unwrap()).unwrap()
    };
    let proxy = env
        .management
        .get(&support::hcp_path())
        .expect("the HelmChartProxy");
    assert_eq!(values(&proxy)["mode"], "Local");
    // Helm installs Local: its StatefulSet, kept across upgrades.
    let statefulset = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "registry", "namespace": "registry-system",
                     "labels": {"app.kubernetes.io/name": "registry", "app.kubernetes.io/part-of": "registry-addon"},
                     "annotations": {"helm.sh/resource-policy": "keep"}},
        "spec": {"replicas": 3},
    });
    env.workload.put(
        "/apis/apps/v1/namespaces/registry-system/statefulsets",
        statefulset,
    );

    let dir = tempfile::tempdir().unwrap();
    let (_tls, upstream) = tls_upstream(&env, dir.path());
    env.set_registry(json!({"mode": "Direct", "upstream": {"url": upstream.url, "caSecretRef": {"name": "up-ca"}}}));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let proxy = env.management.get(&support::hcp_path()).unwrap();
    assert_eq!(values(&proxy)["mode"], "Direct");
    // Helm's upgrade: the Deployment is new, the StatefulSet dropped from the release but kept.
    env.workload.put(
        "/apis/apps/v1/namespaces/registry-system/deployments",
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "registry-direct", "namespace": "registry-system",
                            "labels": {"app.kubernetes.io/name": "registry-direct", "app.kubernetes.io/part-of": "registry-addon"}},
               "spec": {"replicas": 2}}),
    );
    assert!(
        env.workload.get(&statefulset_path()).is_some(),
        "Local serves until Direct is ready"
    );
    complete_switch(&env, &statefulset_path()).await;
    assert!(env.workload.get(DEPLOYMENT).is_some());
}

/// A registry deployed before modes were recorded (only Local existed) has no record: its
/// StatefulSet tells it is Local, so a change of mode is a switch with its checks, and Local →
/// Proxy is refused rather than applied.
#[tokio::test]
async fn an_unrecorded_registry_is_taken_as_local() {
    let mut env = direct_env().await;
    env.set_registry(json!({}));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    let sts = env.workload.get(&statefulset_path()).unwrap();
    env.workload
        .remove("/api/v1/namespaces/registry-system/configmaps/registry-mode");
    env.set_registry(json!({"mode": "Proxy", "upstream": {"url": "https://upstream.example"}}));
    assert_success(&env.call(Hook::AfterControlPlaneInitialized).await);
    assert_eq!(
        env.workload.get(&statefulset_path()).unwrap()["spec"],
        sts["spec"],
        "Local → Proxy refused: nothing changed"
    );
    assert_eq!(mode_record(&env)["mode"], "Local");
}
