//! The controller with the addon's reconciler, between hooks: a management and a workload
//! in-memory API server, the Cluster stored in the management one with its kubeconfig Secret
//! pointing at the workload one, and an injected clock.

mod support;
mod sync_support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::events::v1::Event;
use kube::api::Api;
use registry_addon::addon::reconcile::AddonReconciler;
use registry_addon::controller::clock::ManualClock;
use registry_addon::controller::metrics::ControllerMetrics;
use registry_addon::controller::queue::QueueConfig;
use registry_addon::controller::{Controller, ControllerConfig, Reconciler, StatusReport};
use registry_addon::hooks::{HookContext, Management, dispatch};
use registry_addon::names;
use registry_addon::wire::runtime::Hook;
use serde_json::{Value, json};

use support::crd::{printed_columns, validate_against_crd};
use support::{
    CLUSTER, CLUSTER_NS, EXTENSION_NAMESPACE, Env, cluster_ca_path, hcp_path, root_ca_path,
    secret_path, statefulset_path, tls_path,
};

const WAIT: Duration = Duration::from_secs(30);
const CLUSTERS: &str = "/apis/cluster.x-k8s.io/v1beta2/namespaces/default/clusters";
const FAST_RESYNC: Duration = Duration::from_millis(200);

fn cluster_path() -> String {
    format!("{CLUSTERS}/{CLUSTER}")
}

fn creg_path() -> String {
    format!("/apis/registry-addon.io/v1alpha1/namespaces/{CLUSTER_NS}/clusterregistries/{CLUSTER}")
}

fn pvc_path() -> String {
    "/api/v1/namespaces/registry-system/persistentvolumeclaims/data-registry-0".into()
}

/// Polls `check` until it holds (the readiness check instead of a sleep).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn root_ca(env: &Env) -> registry_addon::certs::CertificateAuthority {
    let secret = env.management.get(&root_ca_path()).expect("root CA secret");
    registry_addon::certs::CertificateAuthority::from_pem(
        &support::unb64(&secret["data"]["tls.crt"]),
        &support::unb64(&secret["data"]["tls.key"]),
    )
    .expect("root CA")
}

fn condition(object: &Value, type_: &str) -> Value {
    object["status"]["conditions"]
        .as_array()
        .and_then(|items| items.iter().find(|c| c["type"] == type_).cloned())
        .unwrap_or(Value::Null)
}

/// Requests other than the Lease's and the Cluster watch's.
fn counted(server: &support::apiserver::ApiServer) -> Vec<String> {
    server
        .requests()
        .iter()
        .filter(|r| !r.path.contains("/leases/") && !r.query.contains("watch=true"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

fn counted_writes(server: &support::apiserver::ApiServer) -> Vec<String> {
    server
        .requests()
        .iter()
        .filter(|r| r.is_write() && !r.path.contains("/leases/"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

struct Setup {
    env: Env,
    ctx: Arc<HookContext>,
    clock: ManualClock,
    metrics: Arc<ControllerMetrics>,
    reconciler: Arc<AddonReconciler>,
}

impl Setup {
    /// The direct deployer; the Cluster stored with its control plane initialized.
    async fn new() -> Setup {
        Setup::with(&["--deployer", "direct"]).await
    }

    async fn with(flags: &[&str]) -> Setup {
        let env = Env::with(flags, "cluster-v1beta2.json").await;
        let ctx = Arc::new(HookContext::new(
            env.ctx.config.clone(),
            Management::Client(env.management.client()),
        ));
        let clock = ManualClock::new(SystemTime::now());
        let reconciler = Arc::new(AddonReconciler::new(ctx.clone(), Arc::new(clock.clone())));
        let setup = Setup {
            env,
            ctx,
            clock,
            metrics: Arc::new(ControllerMetrics::unregistered()),
            reconciler,
        };
        setup.store_cluster(true);
        setup
    }

    fn store_cluster(&self, control_plane_initialized: bool) {
        let mut cluster = self.env.cluster.clone();
        if control_plane_initialized {
            cluster["status"] = json!({
                "initialization": {"controlPlaneInitialized": true},
                "conditions": [{"type": "ControlPlaneInitialized", "status": "True"}],
            });
        }
        self.env.management.put(CLUSTERS, cluster);
    }

    /// Changes the Cluster's `addons.registry` (a spec change: the generation moves).
    fn set_registry(&self, registry: Value) {
        self.env.management.update(&cluster_path(), |c| {
            let vars = c["spec"]["topology"]["variables"].as_array_mut().unwrap();
            let config = vars
                .iter_mut()
                .find(|v| v["name"] == "clusterConfig")
                .unwrap();
            config["value"]["addons"]["registry"] = registry;
            let generation = c["metadata"]["generation"].as_i64().unwrap();
            c["metadata"]["generation"] = json!(generation + 1);
        });
    }

    async fn start(&self, resync: Duration) -> Controller {
        let mut config = ControllerConfig::new(EXTENSION_NAMESPACE, Vec::new(), resync);
        config.lease.identity = "a".into();
        config.lease.retry_period = Duration::from_millis(20);
        config.queue = QueueConfig {
            concurrency: 4,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
        };
        Controller::start(
            self.env.management.client(),
            config,
            self.reconciler.clone(),
            self.metrics.clone(),
            Arc::new(self.clock.clone()),
        )
        .await
        .expect("controller starts")
    }

    fn creg(&self) -> Option<Value> {
        self.env.management.get(&creg_path())
    }

    fn creg_condition(&self, type_: &str) -> Value {
        self.creg().map_or(Value::Null, |c| condition(&c, type_))
    }

    /// Reason of the ClusterRegistry's condition, or "" while there is none.
    fn reason(&self, type_: &str) -> String {
        self.creg_condition(type_)["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn events(&self) -> Vec<Event> {
        let api: Api<Event> = Api::namespaced(self.env.management.client(), CLUSTER_NS);
        api.list(&Default::default()).await.expect("events").items
    }

    async fn event_reasons(&self) -> Vec<String> {
        self.events()
            .await
            .into_iter()
            .filter_map(|e| e.reason)
            .collect()
    }

    /// Starts a controller and waits until the registry is deployed and shown ready.
    async fn converged(&self) -> Controller {
        let controller = self.start(FAST_RESYNC).await;
        eventually("the registry StatefulSet applied", || {
            self.env.workload.get(&statefulset_path()).is_some()
        })
        .await;
        self.env.make_registry_ready(3);
        eventually("Ready=True", || {
            self.creg_condition("Ready")["status"] == "True"
        })
        .await;
        controller
    }

    /// The Cluster's `addons.registry` as stored.
    fn registry_variable(&self) -> Value {
        self.cluster_value()["spec"]["topology"]["variables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "clusterConfig")
            .unwrap()["value"]["addons"]["registry"]
            .clone()
    }

    fn cluster_value(&self) -> Value {
        self.env.management.get(&cluster_path()).expect("Cluster")
    }
}

#[tokio::test]
async fn enabling_on_an_existing_cluster_deploys_and_shows_the_statefulset() {
    let setup = Setup::new().await;
    let env = &setup.env;
    let controller = setup.start(FAST_RESYNC).await;
    eventually("the registry StatefulSet applied", || {
        env.workload.get(&statefulset_path()).is_some()
    })
    .await;
    for path in [
        tls_path(),
        secret_path("registry-system", names::REGISTRY_AUTH_SECRET),
        "/api/v1/namespaces/registry-system/services/registry".into(),
        "/api/v1/namespaces/registry-system/services/registry-headless".into(),
        "/apis/policy/v1/namespaces/registry-system/poddisruptionbudgets/registry".into(),
        cluster_ca_path(),
    ] {
        let server = if path == cluster_ca_path() {
            &env.management
        } else {
            &env.workload
        };
        assert!(server.get(&path).is_some(), "{path} applied");
    }
    eventually("RegistryReady=False while no replica is ready", || {
        setup.creg_condition("RegistryReady")["status"] == "False"
    })
    .await;
    assert!(
        setup.creg_condition("RegistryReady")["message"]
            .as_str()
            .unwrap()
            .starts_with("0 of 3 replicas ready"),
        "{}",
        setup.creg_condition("RegistryReady")
    );

    env.make_registry_ready(3);
    eventually("Ready=True", || {
        setup.creg_condition("Ready")["status"] == "True"
    })
    .await;
    let object = setup.creg().unwrap();
    let status = &object["status"];
    assert_eq!(status["mode"], "Local");
    assert_eq!(status["replicas"], 3);
    assert_eq!(status["readyReplicas"], 3);
    assert_eq!(status["observedGeneration"], 3);
    assert_eq!(
        condition(&object, "RegistryReady")["message"],
        "3 of 3 replicas ready"
    );
    let certificate = condition(&object, "CertificateReady");
    assert_eq!(certificate["reason"], "CertificateValid");
    let message = certificate["message"].as_str().unwrap();
    assert!(
        message.starts_with("certificate expires ") && message.contains("; renewal starts "),
        "{message}"
    );
    let cert = registry_addon::certs::CertInfo::from_pem(&env.tls_cert_pem()).unwrap();
    let not_after = cert
        .not_after
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert_eq!(status["certificate"]["notAfter"], json!(not_after));
    assert!(
        status["certificate"]["renewAfter"].as_str().unwrap() < not_after.as_str(),
        "{status}"
    );
    validate_against_crd(&object);
    let columns = printed_columns(&object);
    assert_eq!(
        columns,
        vec![
            "Local",
            "True",
            "3/3",
            "0/0",
            not_after.as_str(),
            "2026-01-01T00:00:00Z"
        ]
    );
    assert!(
        setup
            .event_reasons()
            .await
            .contains(&"Deployed".to_string())
    );

    // A hook on the converged cluster, with the same context, finds nothing to do.
    env.clear_logs();
    let body = env.request(Hook::BeforeClusterUpgrade);
    let answer = dispatch(
        &setup.ctx,
        Hook::BeforeClusterUpgrade,
        &body,
        Duration::from_secs(10),
    )
    .await;
    let answer = serde_json::to_value(answer).unwrap();
    assert_eq!(answer["status"], "Success", "{answer}");
    assert_eq!(counted_writes(&env.management), Vec::<String>::new());
    assert_eq!(counted_writes(&env.workload), Vec::<String>::new());
    controller.shutdown().await;
}

#[tokio::test]
async fn an_up_to_date_resync_writes_nothing_on_either_cluster() {
    let setup = Setup::new().await;
    let env = &setup.env;
    let controller = setup.converged().await;
    // The Ready write may still be in flight: let one resync pass after it.
    let after = setup.metrics.reconciles(true) + 1;
    eventually("a resync", || setup.metrics.reconciles(true) > after).await;
    env.clear_logs();
    let before = setup.metrics.reconciles(true);
    eventually("five resyncs", || {
        setup.metrics.reconciles(true) >= before + 5
    })
    .await;
    controller.shutdown().await;
    let reconciles = setup.metrics.reconciles(true) - before;
    assert_eq!(counted_writes(&env.management), Vec::<String>::new());
    assert_eq!(counted_writes(&env.workload), Vec::<String>::new());
    let (management, workload) = (counted(&env.management).len(), counted(&env.workload).len());
    println!(
        "requests per reconcile of an up-to-date cluster (direct deployer), controller included: \
         management {:.1}, workload {:.1} ({reconciles} reconciles)",
        management as f64 / reconciles as f64,
        workload as f64 / reconciles as f64
    );

    // The reconciler alone, once: only reads, and the same on every call.
    env.clear_logs();
    let outcome = setup
        .reconciler
        .reconcile(&setup.cluster_value())
        .await
        .unwrap();
    assert!(matches!(outcome.status, StatusReport::Present(_)));
    assert!(outcome.events.is_empty(), "{:?}", outcome.events);
    assert_eq!(env.writes(), 0);
    let (management, workload) = env.request_counts();
    println!("requests of one reconcile: management {management}, workload {workload}");
    assert!(
        management <= 8 && workload <= 17,
        "{:?} {:?}",
        env.management.requests(),
        env.workload.requests()
    );
}

#[tokio::test]
async fn a_replicas_change_is_applied() {
    let setup = Setup::new().await;
    let env = &setup.env;
    let controller = setup.converged().await;
    setup.set_registry(json!({"replicas": 5}));
    eventually("5 replicas on the StatefulSet", || {
        env.workload
            .get(&statefulset_path())
            .is_some_and(|s| s["spec"]["replicas"] == 5)
    })
    .await;
    eventually("the ClusterRegistry showing 3/5", || {
        setup
            .creg()
            .is_some_and(|c| c["status"]["replicasReady"] == "3/5")
    })
    .await;
    assert_eq!(setup.reason("RegistryReady"), "ReplicasNotReady");
    assert_eq!(setup.creg().unwrap()["status"]["observedGeneration"], 4);
    // The certificate names every replica: a new one for five.
    let cert = registry_addon::certs::CertInfo::from_pem(&env.tls_cert_pem()).unwrap();
    assert!(
        cert.names.dns.iter().any(|n| n.starts_with("registry-4.")),
        "{:?}",
        cert.names
    );
    env.make_registry_ready(5);
    eventually("Ready=True with 5", || {
        setup
            .creg()
            .is_some_and(|c| c["status"]["replicasReady"] == "5/5")
            && setup.creg_condition("Ready")["status"] == "True"
    })
    .await;
    controller.shutdown().await;
}

#[tokio::test]
async fn a_renewal_window_opening_renews_the_certificate() {
    let setup = Setup::new().await;
    let env = &setup.env;
    let controller = setup.converged().await;
    let before = env.tls_cert_pem();
    let not_after = setup.creg().unwrap()["status"]["certificate"]["notAfter"].clone();
    assert!(
        !setup
            .event_reasons()
            .await
            .contains(&"CertificateRenewed".to_string())
    );
    // 730 days, renewed in the last third: 490 days on, the window is open.
    setup.clock.advance(Duration::from_secs(490 * 86_400));
    eventually("a new registry certificate", || {
        env.tls_cert_pem() != before
    })
    .await;
    eventually("the new expiry shown", || {
        setup
            .creg()
            .is_some_and(|c| c["status"]["certificate"]["notAfter"] != not_after)
    })
    .await;
    let events = setup.events().await;
    let renewed = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("CertificateRenewed"))
        .expect("a CertificateRenewed event");
    assert!(
        renewed
            .note
            .as_deref()
            .unwrap()
            .contains("it is inside its renewal window"),
        "{renewed:?}"
    );
    assert_eq!(
        renewed.regarding.as_ref().unwrap().name.as_deref(),
        Some(CLUSTER)
    );
    controller.shutdown().await;
}

#[tokio::test]
async fn a_deleted_registry_tls_and_an_edited_object_are_repaired() {
    let setup = Setup::new().await;
    let env = &setup.env;
    let controller = setup.converged().await;
    let pdb = "/apis/policy/v1/namespaces/registry-system/poddisruptionbudgets/registry";
    env.workload.remove(&tls_path());
    env.workload
        .update(pdb, |p| p["spec"]["maxUnavailable"] = json!(3));
    eventually("registry-tls back", || {
        env.workload.get(&tls_path()).is_some()
    })
    .await;
    eventually("the PodDisruptionBudget repaired", || {
        env.workload
            .get(pdb)
            .is_some_and(|p| p["spec"]["maxUnavailable"] == 1)
    })
    .await;
    let cert = registry_addon::certs::CertInfo::from_pem(&env.tls_cert_pem()).unwrap();
    assert!(cert.is_signed_by(&root_ca(env)));
    controller.shutdown().await;
}

#[tokio::test]
async fn turning_the_addon_off_removes_the_workload_objects_and_keeps_pvcs() {
    let setup = Setup::new().await;
    let env = &setup.env;
    let controller = setup.converged().await;
    env.workload.put(
        "/api/v1/namespaces/registry-system/persistentvolumeclaims",
        json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data-registry-0", "namespace": "registry-system"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}},
        }),
    );
    setup.set_registry(Value::Null);
    eventually("the ClusterRegistry removed", || setup.creg().is_none()).await;
    for path in [
        statefulset_path(),
        tls_path(),
        secret_path("registry-system", names::REGISTRY_AUTH_SECRET),
        "/api/v1/namespaces/registry-system/services/registry".into(),
        "/api/v1/namespaces/registry-system/services/registry-headless".into(),
        "/apis/policy/v1/namespaces/registry-system/poddisruptionbudgets/registry".into(),
        // The mode record: on again, the variable's mode is taken as a first deploy.
        "/api/v1/namespaces/registry-system/configmaps/registry-mode".into(),
    ] {
        assert!(env.workload.get(&path).is_none(), "{path} removed");
    }
    assert!(env.workload.get(&pvc_path()).is_some(), "the PVC is kept");
    assert!(
        env.workload
            .get("/api/v1/namespaces/registry-system")
            .is_some(),
        "the Namespace holding the PVCs is kept"
    );
    let events = setup.events().await;
    let removed = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("Removed"))
        .expect("a Removed event");
    assert!(
        removed
            .note
            .as_deref()
            .unwrap()
            .contains("statefulset registry-system/registry")
    );

    // Off and cleaned up: resyncs do not ask the workload cluster again.
    env.clear_logs();
    let before = setup.metrics.reconciles(true);
    eventually("three resyncs", || {
        setup.metrics.reconciles(true) >= before + 3
    })
    .await;
    assert_eq!(counted(&env.workload), Vec::<String>::new());
    assert_eq!(counted_writes(&env.management), Vec::<String>::new());

    // On again: deployed again, on the kept PVC's namespace.
    setup.set_registry(json!({"replicas": 3}));
    eventually("deployed again", || {
        env.workload.get(&statefulset_path()).is_some()
    })
    .await;
    controller.shutdown().await;
}

/// With a HelmChartProxy, Helm's uninstall leaves the workload objects it keeps
/// (`helm.sh/resource-policy: keep`): turning the addon off deletes them too.
#[tokio::test]
async fn turning_the_addon_off_with_a_helm_chart_proxy_deletes_the_kept_objects() {
    let setup = Setup::with(&[]).await;
    let env = &setup.env;
    let controller = setup.start(FAST_RESYNC).await;
    eventually("the HelmChartProxy applied", || {
        env.management.get(&hcp_path()).is_some()
    })
    .await;
    // What the release installed, as Helm leaves it after an uninstall.
    env.make_registry_ready(3);
    env.workload.update(&statefulset_path(), |sts| {
        sts["metadata"]["labels"] = json!({"app.kubernetes.io/name": "registry",
                                           "app.kubernetes.io/part-of": "registry-addon"});
        sts["metadata"]["annotations"] = json!({"helm.sh/resource-policy": "keep"});
    });
    setup.set_registry(Value::Null);
    eventually("the ClusterRegistry removed", || setup.creg().is_none()).await;
    eventually("the HelmChartProxy deleted", || {
        env.management.get(&hcp_path()).is_none()
    })
    .await;
    eventually("the kept StatefulSet deleted", || {
        env.workload.get(&statefulset_path()).is_none()
    })
    .await;
    controller.shutdown().await;
}

#[tokio::test]
async fn an_invalid_variable_is_shown_with_the_hooks_message_and_nothing_reaches_the_workload() {
    let mut setup = Setup::new().await;
    setup.env.set_registry(json!({"replicas": 0}));
    setup.store_cluster(true);
    let env = &setup.env;
    let controller = setup.start(FAST_RESYNC).await;
    eventually("Ready=False InvalidConfiguration", || {
        setup.reason("Ready") == "InvalidConfiguration"
    })
    .await;
    let hook = env.call(Hook::BeforeClusterUpgrade).await;
    assert_eq!(hook["status"], "Failure");
    assert_eq!(setup.creg_condition("Ready")["message"], hook["message"]);
    assert_eq!(
        hook["message"],
        "cluster default/wl-1: invalid variable clusterConfig: addons.registry.replicas: must be \
         an integer from 1 to 7"
    );
    assert_eq!(setup.creg_condition("Ready")["status"], "False");
    assert_eq!(counted(&env.workload), Vec::<String>::new());
    controller.shutdown().await;
}

#[tokio::test]
async fn before_the_control_plane_is_initialized_only_the_management_side_is_set_up() {
    let setup = Setup::new().await;
    setup.store_cluster(false);
    let env = &setup.env;
    let controller = setup.start(FAST_RESYNC).await;
    eventually("waiting for the control plane", || {
        setup.reason("RegistryReady") == "WaitingForControlPlane"
    })
    .await;
    assert_eq!(setup.creg_condition("Ready")["status"], "False");
    assert!(env.management.get(&root_ca_path()).is_some());
    assert!(env.management.get(&cluster_ca_path()).is_some());
    for user in [names::READ_ONLY_USER, names::READ_WRITE_USER] {
        let path = secret_path(CLUSTER_NS, &names::user_secret(CLUSTER, user));
        assert!(env.management.get(&path).is_some(), "{path}");
    }
    let hosts = secret_path(CLUSTER_NS, &names::containerd_hosts_secret(CLUSTER));
    assert!(env.management.get(&hosts).is_some());
    assert_eq!(counted(&env.workload), Vec::<String>::new());

    // Turned off before the control plane answered: nothing to remove, no request at all.
    let mut off = setup.cluster_value();
    for var in off["spec"]["topology"]["variables"].as_array_mut().unwrap() {
        if var["name"] == "clusterConfig" {
            var["value"]["addons"]["registry"] = Value::Null;
        }
    }
    env.clear_logs();
    let outcome = setup.reconciler.reconcile(&off).await.unwrap();
    assert_eq!(outcome.status, StatusReport::Absent);
    assert_eq!(env.request_counts(), (0, 0));

    // Initialized (a status change): picked up without a spec change.
    setup.store_cluster(true);
    eventually("deployed", || {
        env.workload.get(&statefulset_path()).is_some()
    })
    .await;
    controller.shutdown().await;
}

#[tokio::test]
async fn without_a_kubeconfig_secret_the_cluster_waits_without_errors() {
    let setup = Setup::new().await;
    let env = &setup.env;
    env.management
        .remove(&secret_path(CLUSTER_NS, &names::kubeconfig_secret(CLUSTER)));
    let controller = setup.start(FAST_RESYNC).await;
    eventually("waiting for the kubeconfig", || {
        setup.reason("RegistryReady") == "WaitingForKubeconfig"
    })
    .await;
    let message = setup.creg_condition("RegistryReady")["message"].clone();
    assert_eq!(
        message,
        "secret default/wl-1-kubeconfig on the management cluster: not found; the workload \
         cluster cannot be reached without it"
    );
    let before = setup.metrics.reconciles(true);
    eventually("resyncs", || setup.metrics.reconciles(true) >= before + 2).await;
    assert_eq!(
        setup.metrics.reconciles(false),
        0,
        "waiting is not an error"
    );
    assert_eq!(counted(&env.workload), Vec::<String>::new());

    env.put_kubeconfig(&env.workload.kubeconfig());
    eventually("deployed once the kubeconfig exists", || {
        env.workload.get(&statefulset_path()).is_some()
    })
    .await;
    controller.shutdown().await;
}

#[tokio::test]
async fn a_lost_root_ca_is_not_replaced_and_the_cluster_registry_says_so() {
    let setup = Setup::new().await;
    let env = &setup.env;
    let controller = setup.converged().await;
    let original = env.management.get(&root_ca_path()).unwrap();
    env.management.remove(&root_ca_path());
    eventually("Ready=False RootCAMissing", || {
        setup.reason("Ready") == "RootCAMissing"
    })
    .await;
    let message = setup.creg_condition("CertificateReady")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("registry-addon-root-ca on the management cluster is missing")
            && message.contains("SHA-256 fingerprint")
            && message.contains("restore that Secret"),
        "{message}"
    );
    assert!(
        env.management.get(&root_ca_path()).is_none(),
        "no new root CA"
    );
    env.management.put(
        &format!("/api/v1/namespaces/{EXTENSION_NAMESPACE}/secrets"),
        original,
    );
    eventually("Ready again once restored", || {
        setup.creg_condition("Ready")["status"] == "True"
    })
    .await;
    controller.shutdown().await;
}

#[tokio::test]
async fn the_helmchartproxy_deployer_applies_and_removes_its_own_proxy_never_a_foreign_one() {
    let setup = Setup::with(&[]).await;
    let env = &setup.env;
    let controller = setup.start(FAST_RESYNC).await;
    eventually("the HelmChartProxy applied", || {
        env.management.get(&hcp_path()).is_some()
    })
    .await;
    eventually("Deploying: CAAPH has not installed the chart yet", || {
        setup.reason("RegistryReady") == "Deploying"
    })
    .await;
    assert!(env.workload.get(&tls_path()).is_some());
    assert!(env.workload.get(&statefulset_path()).is_none());

    setup.set_registry(Value::Null);
    eventually("the HelmChartProxy deleted", || {
        env.management.get(&hcp_path()).is_none()
    })
    .await;
    eventually("the ClusterRegistry removed", || setup.creg().is_none()).await;
    assert!(env.workload.get(&tls_path()).is_none());

    // Someone else's HelmChartProxy under the addon's name: refused while on, kept when off.
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
            "spec": {"clusterSelector": {"matchLabels": {"team": "a"}}, "chartName": "other"},
        }),
    );
    let foreign = env.management.get(&hcp_path()).unwrap();
    setup.set_registry(json!({"replicas": 3}));
    eventually("Ready=False DeployerConflict", || {
        setup.reason("Ready") == "DeployerConflict"
    })
    .await;
    assert!(
        setup.creg_condition("Ready")["message"]
            .as_str()
            .unwrap()
            .contains("exists but is not the registry addon's"),
        "{}",
        setup.creg_condition("Ready")
    );
    setup.set_registry(Value::Null);
    eventually("the ClusterRegistry removed", || setup.creg().is_none()).await;
    assert_eq!(env.management.get(&hcp_path()).unwrap(), foreign);
    controller.shutdown().await;
}

#[tokio::test]
async fn a_cluster_a_hook_deployed_directly_stays_direct_whatever_the_flag_says() {
    let mut setup = Setup::with(&[]).await;
    setup.env.settings = json!({"deployer": "direct"});
    let body = setup.env.request(Hook::AfterControlPlaneInitialized);
    let answer = dispatch(
        &setup.ctx,
        Hook::AfterControlPlaneInitialized,
        &body,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(serde_json::to_value(answer).unwrap()["status"], "Success");
    let env = &setup.env;
    env.make_registry_ready(3);
    let controller = setup.start(FAST_RESYNC).await;
    eventually("Ready=True", || {
        setup.creg_condition("Ready")["status"] == "True"
    })
    .await;
    assert!(
        env.management.get(&hcp_path()).is_none(),
        "no HelmChartProxy over a direct deployment"
    );
    controller.shutdown().await;
}

fn node_config_path() -> String {
    secret_path(names::REGISTRY_NAMESPACE, names::NODE_CONFIG_SECRET)
}

fn node_path(name: &str) -> String {
    format!("/api/v1/nodes/{name}")
}

/// A Node as the kubelet shows it, without the agent's annotation yet.
fn put_node(env: &Env, name: &str, ready: bool) {
    env.workload.put(
        "/api/v1/nodes",
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name},
            "status": {"conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }},
            ]},
        }),
    );
}

/// Plays a node's agent: acks the desired config it was given.
fn ack(env: &Env, node: &str, hash: &str) {
    env.workload.update(&node_path(node), |n| {
        n["metadata"]["annotations"][names::NODE_CONFIG_ANNOTATION] = json!(hash);
    });
}

fn node_config_key(env: &Env, key: &str) -> String {
    env.workload
        .get(&node_config_path())
        .map(|s| support::unb64(&s["data"][key]))
        .unwrap_or_default()
}

/// The hosts files of the node-config Secret, decoded.
fn node_hosts_files(env: &Env) -> Vec<String> {
    let secret = env.workload.get(&node_config_path()).unwrap();
    secret["data"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.ends_with(".toml"))
        .map(|(_, v)| support::unb64(v))
        .collect()
}

fn certificates(pem: &str) -> usize {
    registry_addon::certs::pem_certificates(pem).map_or(0, |c| c.len())
}

#[tokio::test]
async fn a_root_ca_rotation_rolls_out_to_the_nodes_in_two_phases() {
    let setup = Setup::new().await;
    let env = &setup.env;
    put_node(env, "n1", true);
    put_node(env, "n2", true);
    put_node(env, "down", false);
    let controller = setup.converged().await;
    let old = root_ca(env);
    let pod_hash = || {
        env.workload.get(&statefulset_path()).unwrap()["spec"]["template"]["metadata"]
            ["annotations"][names::CERTIFICATE_HASH_ANNOTATION]
            .clone()
    };
    let hash_before = pod_hash();
    eventually("the node config, final", || {
        node_config_key(env, names::NODE_CONFIG_PHASE_KEY) == "final"
    })
    .await;
    let first = node_config_key(env, names::NODE_CONFIG_HASH_KEY);
    ack(env, "n1", &first);
    ack(env, "n2", &first);
    eventually("2 of 3 nodes shown", || {
        setup
            .creg()
            .is_some_and(|c| c["status"]["nodes"]["configured"] == "2/3")
    })
    .await;

    // The documented trigger: the new CA in tls.crt/tls.key, the old one kept in ca.crt.
    let new = registry_addon::certs::CertificateAuthority::generate(
        registry_addon::cli::KeyAlgorithm::EcdsaP256,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    env.management.update(&root_ca_path(), |s| {
        s["data"]["tls.crt"] = json!(support::b64(new.cert_pem()));
        s["data"]["tls.key"] = json!(support::b64(new.key_pem().expose()));
        s["data"]["ca.crt"] = json!(support::b64(&format!(
            "{}{}",
            new.cert_pem(),
            old.cert_pem()
        )));
    });

    // Phase 1: both CAs everywhere; the registry keeps the old CA's certificate.
    eventually("the transition phase", || {
        node_config_key(env, names::NODE_CONFIG_PHASE_KEY) == "transition"
    })
    .await;
    assert_eq!(
        certificates(&node_config_key(env, names::NODE_CONFIG_CA_KEY)),
        2
    );
    let tls = env.workload.get(&tls_path()).unwrap();
    assert_eq!(certificates(&support::unb64(&tls["data"]["ca.crt"])), 2);
    let serving = registry_addon::certs::CertInfo::from_pem(&env.tls_cert_pem()).unwrap();
    assert!(serving.is_signed_by(&old), "no node trusts the new CA yet");
    // The replicas restart to trust both: their sync sidecars read the CA file at start.
    eventually("the pods rolled for the new trust", || {
        pod_hash() != hash_before
    })
    .await;
    // Written right after the node config, in the same step.
    eventually(
        "both CAs in the cluster's CA copy, for new machines",
        || {
            let copy = env.management.get(&cluster_ca_path()).unwrap();
            certificates(&support::unb64(&copy["data"]["ca.crt"])) == 2
        },
    )
    .await;
    let transition = node_config_key(env, names::NODE_CONFIG_HASH_KEY);
    eventually("phase 1 progress shown", || {
        setup.reason(registry_addon::controller::status::NODES_CONFIGURED) == "TransitionPhase"
    })
    .await;
    let message = setup.creg_condition("NodesConfigured")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("phase 1 of 2"), "{message}");
    assert!(message.contains("0 of 3 nodes"), "{message}");

    // The Ready nodes ack; the NotReady one holds the phase until the rollout timeout.
    ack(env, "n1", &transition);
    ack(env, "n2", &transition);
    eventually("the NotReady node named", || {
        let message = setup.creg_condition("NodesConfigured")["message"].clone();
        message
            .as_str()
            .is_some_and(|m| m.contains("2 of 3") && m.contains("waiting for down"))
    })
    .await;
    assert!(
        registry_addon::certs::CertInfo::from_pem(&env.tls_cert_pem())
            .unwrap()
            .is_signed_by(&old)
    );
    setup.clock.advance(Duration::from_secs(601));

    // Past the timeout: the registry switches to the new CA, then the nodes go final.
    eventually("a certificate of the new CA", || {
        registry_addon::certs::CertInfo::from_pem(&env.tls_cert_pem())
            .unwrap()
            .is_signed_by(&new)
    })
    .await;
    assert_eq!(
        node_config_key(env, names::NODE_CONFIG_PHASE_KEY),
        "transition"
    );
    eventually("the final phase once the replicas serve it", || {
        env.make_registry_ready(3);
        node_config_key(env, names::NODE_CONFIG_PHASE_KEY) == "final"
    })
    .await;
    assert_eq!(
        node_config_key(env, names::NODE_CONFIG_CA_KEY),
        new.cert_pem(),
        "nodes trust the new CA only"
    );
    // The sync sidecars and new machines still trust both until the nodes ack.
    let tls = env.workload.get(&tls_path()).unwrap();
    assert_eq!(certificates(&support::unb64(&tls["data"]["ca.crt"])), 2);
    let last = node_config_key(env, names::NODE_CONFIG_HASH_KEY);
    ack(env, "n1", &last);
    ack(env, "n2", &last);
    setup.clock.advance(Duration::from_secs(601));
    eventually("the old CA dropped everywhere", || {
        env.make_registry_ready(3);
        let tls = env.workload.get(&tls_path()).unwrap();
        let copy = env.management.get(&cluster_ca_path()).unwrap();
        support::unb64(&tls["data"]["ca.crt"]) == new.cert_pem()
            && support::unb64(&copy["data"]["ca.crt"]) == new.cert_pem()
    })
    .await;
    eventually("the rollout shown done but for the skipped node", || {
        let message = setup.creg_condition("NodesConfigured")["message"].clone();
        message
            .as_str()
            .is_some_and(|m| m.contains("2 of 3") && m.contains("skipped") && m.contains("down"))
    })
    .await;
    controller.shutdown().await;
}

#[tokio::test]
async fn a_new_ro_password_is_accepted_before_nodes_send_it_and_the_old_one_after() {
    let setup = Setup::new().await;
    let env = &setup.env;
    put_node(env, "n1", true);
    let controller = setup.converged().await;
    eventually("the node config", || {
        !node_config_key(env, names::NODE_CONFIG_HASH_KEY).is_empty()
    })
    .await;
    ack(
        env,
        "n1",
        &node_config_key(env, names::NODE_CONFIG_HASH_KEY),
    );
    let auth = || secret_path("registry-system", names::REGISTRY_AUTH_SECRET);
    let pull_users = || {
        env.workload
            .get(&auth())
            .map(|s| support::unb64(&s["data"][names::AUTH_PULL_USERS_KEY]))
            .unwrap_or_default()
    };
    assert_eq!(pull_users().lines().count(), 1);
    let old_hosts = node_config_key(env, names::NODE_CONFIG_HOSTS_KEY);

    // The operator deletes the ro Secret: a new password is generated.
    env.management.remove(&secret_path(
        CLUSTER_NS,
        &names::user_secret(CLUSTER, names::READ_ONLY_USER),
    ));
    eventually("old and new accepted, nodes in transition", || {
        pull_users().lines().count() == 2
            && node_config_key(env, names::NODE_CONFIG_PHASE_KEY) == "transition"
    })
    .await;
    // Nodes keep sending the old header while the new one rolls out.
    let hosts = node_config_key(env, names::NODE_CONFIG_HOSTS_KEY);
    let header = |text: &str| {
        text.lines()
            .find(|l| l.contains("Authorization"))
            .map(str::to_string)
            .unwrap()
    };
    assert_eq!(header(&hosts), header(&old_hosts));
    ack(
        env,
        "n1",
        &node_config_key(env, names::NODE_CONFIG_HASH_KEY),
    );
    eventually("the new header final", || {
        node_config_key(env, names::NODE_CONFIG_PHASE_KEY) == "final"
    })
    .await;
    let hosts = node_config_key(env, names::NODE_CONFIG_HOSTS_KEY);
    assert_ne!(header(&hosts), header(&old_hosts));
    assert_eq!(
        pull_users().lines().count(),
        2,
        "old kept until the node acks"
    );
    ack(
        env,
        "n1",
        &node_config_key(env, names::NODE_CONFIG_HASH_KEY),
    );
    eventually("the old password dropped", || {
        pull_users().lines().count() == 1
    })
    .await;
    eventually("NodesConfigured", || {
        setup.creg_condition("NodesConfigured")["status"] == "True"
    })
    .await;
    controller.shutdown().await;
}

/// A real upstream registry over TLS whose CA is Secret `up-ca` beside the Cluster, and a Pod
/// in the workload cluster running `<upstream>/team/app:1` (pushed by [`AppUpstream::push`]).
struct AppUpstream {
    dir: tempfile::TempDir,
    tls: sync_support::TestTls,
    upstream: sync_support::RegistryProcess,
    host: String,
}

impl AppUpstream {
    fn start(env: &Env) -> AppUpstream {
        let dir = tempfile::tempdir().unwrap();
        let tls = sync_support::TestTls::new(&dir.path().join("tls"));
        let upstream = sync_support::RegistryProcess::start(
            &dir.path().join("upstream"),
            &sync_support::RegistryOptions {
                tls: Some(&tls),
                ..Default::default()
            },
        );
        env.management.put(
            &format!("/api/v1/namespaces/{CLUSTER_NS}/secrets"),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "up-ca"},
                   "data": {"ca.crt": support::b64(&String::from_utf8(tls.ca_pem()).unwrap())}}),
        );
        let host = upstream.url.trim_start_matches("https://").to_string();
        env.workload.put(
            "/api/v1/namespaces/default/pods",
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app"},
                   "spec": {"containers": [{"name": "c", "image": format!("{host}/team/app:1")}]},
                   "status": {"phase": "Running"}}),
        );
        AppUpstream {
            dir,
            tls,
            upstream,
            host,
        }
    }

    /// Pushes the image the Pod runs.
    fn push(&self) {
        let layout = self.dir.path().join("layout");
        let image = sync_support::Image::new("amd64", vec![b"layer".to_vec()], false);
        sync_support::write_oci_layout(&layout, "1", &[("amd64", &image)]);
        sync_support::skopeo_push(&layout, "1", &self.upstream, "team/app", Some(&self.tls));
    }
}

#[tokio::test]
async fn mode_switches_are_shown_refused_held_and_completed() {
    let setup = Setup::new().await;
    let env = &setup.env;
    put_node(env, "n1", true);
    let controller = setup.converged().await;
    let status = |field: &str| {
        setup
            .creg()
            .map(|c| c["status"][field].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(status("mode"), "Local");
    let ack_current = || {
        ack(
            env,
            "n1",
            &node_config_key(env, names::NODE_CONFIG_HASH_KEY),
        )
    };
    ack_current();

    // Local → Proxy directly: refused, nothing changes.
    let registry = |mode: Value| {
        let mut value = setup.registry_variable();
        for (k, v) in mode.as_object().unwrap() {
            value[k] = v.clone();
        }
        if mode.get("upstream").is_none() {
            value.as_object_mut().unwrap().remove("upstream");
        }
        value
    };
    setup.set_registry(registry(
        json!({"mode": "Proxy", "upstream": {"url": "https://upstream.example"}}),
    ));
    eventually("TransitionNotSupported", || {
        setup.reason("ModeReady") == "TransitionNotSupported"
    })
    .await;
    assert_eq!(status("mode"), "Local");
    assert_eq!(status("targetMode"), "Proxy");
    let message = setup.creg_condition("ModeReady")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("Direct or Unmanaged"), "{message}");
    assert!(env.workload.get(&statefulset_path()).is_some());

    // Local → Direct with an image in use missing at the upstream: held, Local serving.
    let app = AppUpstream::start(env);
    let (upstream, host) = (&app.upstream, app.host.clone());
    setup.set_registry(registry(json!({"mode": "Direct", "upstream": {"url": upstream.url, "caSecretRef": {"name": "up-ca"}}})));
    eventually("TargetReady=False", || {
        setup.reason("TargetReady") == "ImagesMissing"
    })
    .await;
    let message = setup.creg_condition("TargetReady")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("1 of 1 images in use are missing") && message.contains("team/app:1"),
        "{message}"
    );
    assert_eq!(status("mode"), "Local");
    assert_eq!(status("targetMode"), "Direct");
    assert!(
        env.workload.get(&statefulset_path()).is_some(),
        "Local keeps serving"
    );

    // Pushed: the switch starts; it completes once Direct is ready and the node is final.
    app.push();
    eventually("switching", || setup.reason("ModeReady") == "Switching").await;
    assert_eq!(status("mode"), "Local", "not complete yet");
    assert_eq!(status("targetMode"), "Direct");
    assert_eq!(setup.creg_condition("TargetReady")["status"], "True");
    eventually("the switch complete", || {
        env.make_direct_ready();
        ack_current();
        status("mode") == "Direct"
    })
    .await;
    assert_eq!(status("targetMode"), Value::Null);
    assert_eq!(setup.reason("ModeReady"), "ModeActive");
    // The nodes' route moved to the upstream's host only, through the two phases.
    assert_eq!(node_config_key(env, names::NODE_CONFIG_PHASE_KEY), "final");
    let hosts_files = node_hosts_files(env);
    assert!(
        hosts_files.len() == 1 && hosts_files[0].contains(&format!("server = \"https://{host}\"")),
        "{hosts_files:?}"
    );
    controller.shutdown().await;
}

/// The path of the workload serving `mode`, if it has one.
fn workload_of(mode: &str) -> Option<String> {
    match mode {
        "Local" | "Proxy" => Some(statefulset_path()),
        "Direct" => {
            Some("/apis/apps/v1/namespaces/registry-system/deployments/registry-direct".into())
        }
        _ => None,
    }
}

/// The whole walk of the modes on one running cluster, each step complete before the next:
/// Local → Direct → Proxy → Unmanaged → Direct → Local. The address and the PVC stay; the
/// nodes' route follows every step through the two-phase rollout, once the new mode's
/// registry is ready; the previous mode's workload serves until the switch completes.
#[tokio::test]
async fn the_full_walk_of_modes_keeps_the_address_and_the_data() {
    let setup = Setup::new().await;
    let env = &setup.env;
    put_node(env, "n1", true);
    let controller = setup.converged().await;
    let service = "/api/v1/namespaces/registry-system/services/registry";
    let address = env.workload.get(service).unwrap()["spec"]["clusterIP"].clone();
    env.workload.put(
        "/api/v1/namespaces/registry-system/persistentvolumeclaims",
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "data-registry-0"},
               "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}),
    );
    let app = AppUpstream::start(env);
    app.push();
    let (upstream, host) = (&app.upstream, app.host.clone());
    let base = setup.registry_variable();
    let upstream_ref = json!({"url": upstream.url, "caSecretRef": {"name": "up-ca"}});
    let status = |field: &str| {
        setup
            .creg()
            .map(|c| c["status"][field].clone())
            .unwrap_or(Value::Null)
    };
    for mode in ["Direct", "Proxy", "Unmanaged", "Direct", "Local"] {
        let mut registry = base.clone();
        registry["mode"] = json!(mode);
        if mode == "Direct" || mode == "Proxy" {
            registry["upstream"] = upstream_ref.clone();
        }
        let before = status("mode").as_str().unwrap().to_string();
        setup.set_registry(registry);
        // Under way: the previous mode's workload keeps serving beside the new one, and the
        // nodes keep their route until the new registry is ready.
        eventually(&format!("the switch to {mode} under way"), || {
            setup.reason("ModeReady") == "Switching"
        })
        .await;
        if let Some(previous) = workload_of(&before) {
            assert!(
                env.workload.get(&previous).is_some(),
                "{before} → {mode}: {previous} still serves"
            );
        }
        if before != "Unmanaged" && mode != "Unmanaged" {
            assert_eq!(
                node_config_key(env, names::NODE_CONFIG_PHASE_KEY),
                "final",
                "{before} → {mode}: no node moves before the new registry is ready"
            );
        }
        eventually(&format!("the switch to {mode} complete"), || {
            if env.workload.get(&statefulset_path()).is_some() {
                env.make_registry_ready(3);
            }
            env.make_direct_ready();
            ack(
                env,
                "n1",
                &node_config_key(env, names::NODE_CONFIG_HASH_KEY),
            );
            status("mode") == mode && status("targetMode").is_null()
        })
        .await;
        assert_eq!(setup.reason("ModeReady"), "ModeActive", "{mode}");
        assert_eq!(node_config_key(env, names::NODE_CONFIG_PHASE_KEY), "final");
        if let Some(previous) =
            workload_of(&before).filter(|p| Some(p) != workload_of(mode).as_ref())
        {
            assert!(
                env.workload.get(&previous).is_none(),
                "{before} → {mode}: {previous} goes once the switch is complete"
            );
        }
        let hosts = node_hosts_files(env);
        match mode {
            "Unmanaged" => assert!(hosts.is_empty(), "{mode}: {hosts:?}"),
            "Local" => assert!(
                hosts.len() == 1 && !hosts[0].contains("server ="),
                "{mode}: {hosts:?}"
            ),
            _ => assert!(
                hosts.len() == 1 && hosts[0].contains(&format!("server = \"https://{host}\"")),
                "{mode}: {hosts:?}"
            ),
        }
        if mode != "Unmanaged" {
            assert_eq!(
                env.workload.get(service).unwrap()["spec"]["clusterIP"],
                address,
                "{mode}: the fixed address"
            );
        }
        assert!(
            env.workload
                .get("/api/v1/namespaces/registry-system/persistentvolumeclaims/data-registry-0")
                .is_some(),
            "{mode}: the PVC stays"
        );
    }
    assert!(
        env.workload.get(&statefulset_path()).is_some(),
        "Local again"
    );
    controller.shutdown().await;
}

/// A copy of the hosts directory `from` at one instant, as containerd would see it at `to`
/// (the hosts files' `ca` paths name containerd's directory): what one pull resolves with.
/// The warning and error lines in the logs of every pod the kubelet stand-in ran.
fn pod_complaints(kubelet_dir: &std::path::Path) -> String {
    let mut out = String::new();
    for pod in std::fs::read_dir(kubelet_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        for log in std::fs::read_dir(pod.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if log.path().extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                for line in text.lines().filter(|l| {
                    l.contains("WARN") || l.contains("ERROR") || l.contains("level=error")
                }) {
                    out.push_str(&format!("{}: {line}\n", log.path().display()));
                }
            }
        }
    }
    out
}

fn snapshot(from: &std::path::Path, to: &std::path::Path) {
    let _ = std::fs::remove_dir_all(to);
    copy_hosts(from, to, to);
}

fn copy_hosts(from: &std::path::Path, to: &std::path::Path, root: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).into_iter().flatten().flatten() {
        let path = entry.path();
        let target = to.join(entry.file_name());
        if path.is_dir() {
            copy_hosts(&path, &target, root);
        } else if let Ok(content) = std::fs::read_to_string(&path) {
            let content = content.replace(
                &format!("{}/", names::CONTAINERD_CERTS_DIR),
                &format!("{}/", root.display()),
            );
            std::fs::write(target, content).unwrap();
        }
    }
}

/// A node's own configuration for the upstream, outside the addon: its hosts file, HTTPS
/// with the upstream's CA.
fn trust_upstream(hosts: &std::path::Path, host: &str, ca_pem: &[u8]) {
    let dir = hosts.join(host);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("upstream-ca.crt"), ca_pem).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"https://{host}\"\n\n[host.\"https://{host}\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
            dir.join("upstream-ca.crt").display()
        ),
    )
    .unwrap();
}

/// Whether the hosts directory sends pulls of `host`'s images through the addon's mirror.
fn routed_through_mirror(certs: &std::path::Path, host: &str) -> bool {
    [host, "_default"].iter().any(|dir| {
        std::fs::read_to_string(certs.join(dir).join("hosts.toml"))
            .is_ok_and(|text| text.starts_with("# Managed by registry-addon"))
    })
}

struct PullRecord {
    start: std::time::Instant,
    end: std::time::Instant,
    /// Through the addon's mirror, without the node's own credentials for the upstream.
    through_mirror: bool,
    error: Option<String>,
}

/// The whole walk Local → Direct → Proxy → Unmanaged → Direct → Local with the real programs:
/// the controller against the in-memory API servers, the workloads it applies run by the
/// kubelet stand-in (`docker-registry` and the front, haproxy for the Service on a loopback
/// ClusterIP), the node agent writing containerd's hosts directory, and a pull loop through it
/// all the time. The upstream (token authentication) lets in the addon's credentials and, in
/// Unmanaged, the node's own; a pull the hosts directory sends through the mirror carries no
/// credentials of the node, so it cannot succeed through containerd's fallback to the
/// upstream: every one of them succeeds only if the fixed address serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_full_walk_of_modes_with_a_pull_loop_fails_no_pull() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    for tool in ["containerd", "ctr", "docker-registry", "haproxy"] {
        assert!(
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "{tool} is needed (apt-get install containerd docker-registry haproxy)"
        );
    }
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n");
    assert!(root, "containerd and haproxy on port 443 need root");

    let setup = Setup::new().await;
    let env = &setup.env;
    let dir = tempfile::Builder::new()
        .prefix("walk")
        .tempdir_in("/tmp")
        .unwrap();
    // The Service's ClusterIP on this machine's loopback (127.0.0.0/8), where haproxy stands
    // in for kube-proxy; one replica, since peers would need the headless Service's DNS.
    // A /16 of its own per run, so that two runs at once never share an address.
    let second = 64 + std::process::id() % 160;
    let cidr = format!("127.{second}.0.0/16");
    env.management.update(&cluster_path(), |c| {
        c["spec"]["clusterNetwork"]["services"]["cidrBlocks"] = json!([cidr]);
    });
    let mut base = setup.registry_variable();
    base["replicas"] = json!(1);
    base.as_object_mut().unwrap().remove("serviceIP");
    setup.set_registry(base.clone());
    put_node(env, "n1", true);

    // The upstream, as Docker Hub, Harbor or GHCR are: TLS, token authentication for the
    // user `mirror` (the addon's, and a node's own outside the addon), no anonymous pull.
    let origin = sync_support::RegistryProcess::start(
        &dir.path().join("upstream"),
        &sync_support::RegistryOptions::default(),
    );
    let image = sync_support::Image::new("amd64", vec![b"app layer".to_vec()], false);
    let other = sync_support::Image::new("amd64", vec![b"other layer".to_vec()], false);
    image
        .push(
            &sync_support::client(&origin.url, None, None),
            "team/app",
            "1",
        )
        .await;
    let tokens = sync_support::front::Front::start(
        &origin.url,
        sync_support::front::FrontOptions {
            bearer: Some(("mirror".into(), "mirror-pass".into())),
            ..Default::default()
        },
    )
    .await;
    let tls = sync_support::TestTls::new(&dir.path().join("tls"));
    let upstream = sync_support::TlsHaproxy::start(&dir.path().join("up"), &tls, &tokens.url);
    let host = format!("127.0.0.1:{}", upstream.port);
    let upstream_url = format!("https://{host}");
    let creds = |user: &str, password: &str| registry_addon::oci::Credentials {
        username: user.into(),
        password: password.into(),
    };
    let secrets = format!("/api/v1/namespaces/{CLUSTER_NS}/secrets");
    env.management.put(
        &secrets,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "up-ca"},
               "data": {"ca.crt": support::b64(&String::from_utf8(tls.ca_pem()).unwrap())}}),
    );
    env.management.put(
        &secrets,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "up-creds"},
               "type": "kubernetes.io/basic-auth",
               "data": {"username": support::b64("mirror"), "password": support::b64("mirror-pass")}}),
    );
    let reference = format!("{host}/team/app:1");
    env.workload.put(
        "/api/v1/namespaces/default/pods",
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app"},
               "spec": {"containers": [{"name": "c", "image": reference}]},
               "status": {"phase": "Running"}}),
    );

    let mut kubelet =
        support::kubelet::Kubelet::new(&dir.path().join("k"), env!("CARGO_BIN_EXE_registry-addon"));
    let controller = setup.start(FAST_RESYNC).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while setup.creg_condition("RegistryReady")["status"] != "True" {
        assert!(
            Instant::now() < deadline,
            "Local never got ready: {}\n{}",
            setup.creg_condition("RegistryReady"),
            kubelet.logs()
        );
        kubelet.sync(&env.workload);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let address = env
        .workload
        .get("/api/v1/namespaces/registry-system/services/registry")
        .unwrap()["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(address.starts_with(&format!("127.{second}.")), "{address}");

    // Local holds the image in use, pushed through the fixed address as `rw`.
    let rw = env
        .management
        .get(&secret_path(
            CLUSTER_NS,
            &format!("{CLUSTER}-registry-addon-rw"),
        ))
        .expect("the rw Secret");
    let rw = creds(
        &support::unb64(&rw["data"]["username"]),
        &support::unb64(&rw["data"]["password"]),
    );
    let ca_pem = root_ca(env).cert_pem().as_bytes().to_vec();
    let local_store = sync_support::client(
        &format!("https://{address}"),
        Some(&ca_pem),
        Some(rw.clone()),
    );
    image.push(&local_store, "team/app", "1").await;
    // The registry's own images are in use too once its pods run (here they stand in for them).
    for own in [
        names::DEFAULT_REGISTRY_IMAGE.to_string(),
        format!(
            "ghcr.io/registry-addon/registry-addon:{}",
            env!("CARGO_PKG_VERSION")
        ),
    ] {
        let path = registry_addon::oci::ImageReference::parse(&own)
            .unwrap()
            .mirror_path();
        image
            .push(&local_store, &path.repository, &path.reference)
            .await;
    }

    // The node: its agent and containerd.
    let node_dir = dir.path().join("n");
    let certs = node_dir.join("certs.d");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(node_dir.join("kubeconfig"), env.workload.kubeconfig()).unwrap();
    let agent_log = std::fs::File::create(node_dir.join("agent.log")).unwrap();
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_registry-addon"))
        .arg("node-agent")
        .arg("--certs-dir")
        .arg(&certs)
        // containerd sees the directory at its usual path, as on a node; the snapshots below
        // are its view.
        .args(["--containerd-certs-dir", names::CONTAINERD_CERTS_DIR])
        .args(["--node-name", "n1"])
        .arg("--kubeconfig")
        .arg(node_dir.join("kubeconfig"))
        .args(["--probe-interval", "200ms"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stdout(agent_log.try_clone().unwrap())
        .stderr(agent_log)
        .spawn()
        .unwrap();
    let (_containerd, socket) = sync_support::containerd::start_containerd(&dir.path().join("c"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !routed_through_mirror(&certs, &host) {
        assert!(
            Instant::now() < deadline,
            "the agent wrote no hosts file: {:?}\n{}",
            std::fs::read_dir(&certs)
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>()),
            std::fs::read_to_string(node_dir.join("agent.log")).unwrap_or_default()
        );
        kubelet.sync(&env.workload);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The pull loop: a fetch of the image in use after another, its content removed after
    // each so that the blobs are fetched again, not only the manifest resolved.
    let stop = Arc::new(AtomicBool::new(false));
    // Two pullers, each with its own containerd namespace, so that a pull is under way at
    // nearly every moment.
    let pullers: Vec<_> = (0..2)
        .map(|worker| {
            let (stop, certs, socket, reference, host) = (
                stop.clone(),
                certs.clone(),
                socket.clone(),
                reference.clone(),
                host.clone(),
            );
            let upstream_ca = tls.ca_pem();
            let snapshot_dir = dir.path().join(format!("pull-hosts-{worker}"));
            let namespace = format!("walk-{worker}");
            std::thread::spawn(move || {
                let mut records = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    snapshot(&certs, &snapshot_dir);
                    let through_mirror = routed_through_mirror(&snapshot_dir, &host);
                    let start = Instant::now();
                    let mut fetch = std::process::Command::new("ctr");
                    fetch
                        .args(["--address", socket.to_str().unwrap()])
                        .args(["--namespace", &namespace, "content", "fetch"])
                        .arg("--hosts-dir")
                        .arg(&snapshot_dir);
                    if !through_mirror {
                        // A node outside the addon pulls with its own credentials and trust.
                        trust_upstream(&snapshot_dir, &host, &upstream_ca);
                        fetch.args(["--user", "mirror:mirror-pass"]);
                    }
                    let out = fetch.arg(&reference).output().unwrap();
                    let end = Instant::now();
                    let error = (!out.status.success())
                        .then(|| String::from_utf8_lossy(&out.stderr).into_owned());
                    records.push(PullRecord {
                        start,
                        end,
                        through_mirror,
                        error,
                    });
                    let listed = std::process::Command::new("ctr")
                        .args(["--address", socket.to_str().unwrap()])
                        .args(["--namespace", &namespace, "content", "ls", "-q"])
                        .output()
                        .unwrap();
                    let digests: Vec<String> = String::from_utf8_lossy(&listed.stdout)
                        .split_whitespace()
                        .map(str::to_string)
                        .collect();
                    if !digests.is_empty() {
                        let _ = std::process::Command::new("ctr")
                            .args(["--address", socket.to_str().unwrap()])
                            .args(["--namespace", &namespace, "content", "rm"])
                            .args(&digests)
                            .output();
                    }
                }
                records
            })
        })
        .collect();

    let status = |field: &str| {
        setup
            .creg()
            .map(|c| c["status"][field].clone())
            .unwrap_or(Value::Null)
    };
    let upstream_ref = json!({"url": upstream_url, "credentialsSecretRef": {"name": "up-creds"},
                              "caSecretRef": {"name": "up-ca"}});
    let mut windows = Vec::new();
    for mode in ["Direct", "Proxy", "Unmanaged", "Direct", "Local"] {
        let mut registry = base.clone();
        registry["mode"] = json!(mode);
        if mode == "Direct" || mode == "Proxy" {
            registry["upstream"] = upstream_ref.clone();
        }
        let start = Instant::now();
        if mode == "Local" {
            // A second image in use, at the upstream (Direct serves it) but not in the local
            // store: the switch back to Local waits for it.
            other
                .push(
                    &sync_support::client(&origin.url, None, None),
                    "team/other",
                    "2",
                )
                .await;
            env.workload.put(
                "/api/v1/namespaces/default/pods",
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "other"},
                       "spec": {"containers": [{"name": "c", "image": format!("{host}/team/other:2")}]},
                       "status": {"phase": "Running"}}),
            );
        }
        setup.set_registry(registry);
        if mode == "Local" {
            let deadline = start + Duration::from_secs(60);
            while setup.reason("TargetReady") != "WaitingForImages"
                || !kubelet.pod_names().contains(&"registry-0".to_string())
            {
                assert!(
                    Instant::now() < deadline,
                    "no WaitingForImages: {}",
                    setup.creg_condition("TargetReady")
                );
                kubelet.sync(&env.workload);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Held: Local's replica runs but is not ready, Direct keeps serving.
            let held = Instant::now() + Duration::from_secs(2);
            while Instant::now() < held {
                kubelet.sync(&env.workload);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(status("mode"), "Direct");
            assert_eq!(status("targetMode"), "Local");
            let message = setup.creg_condition("TargetReady")["message"].to_string();
            assert!(message.contains("all 4 images in use"), "{message}");
            let front_log = kubelet.logs();
            assert!(
                front_log.contains(
                    "1 of 4 images in use are missing from the registry; first: team/other:2"
                ),
                "{front_log}"
            );
            // The operator pushes it to the replica (through a port-forward, say).
            let port = kubelet.front_port("registry-0").unwrap();
            other
                .push(
                    &sync_support::client(
                        &format!("https://127.0.0.1:{port}"),
                        Some(&ca_pem),
                        Some(rw.clone()),
                    ),
                    "team/other",
                    "2",
                )
                .await;
        }
        let deadline = start + Duration::from_secs(90);
        while !(status("mode") == mode && status("targetMode").is_null()) {
            assert!(
                Instant::now() < deadline,
                "the switch to {mode} did not complete: ModeReady {}, NodesConfigured {}, \
                 TargetReady {}\npods {:?}\n{}\nagent:\n{}",
                setup.creg_condition("ModeReady"),
                setup.creg_condition("NodesConfigured"),
                setup.creg_condition("TargetReady"),
                kubelet.pod_names(),
                kubelet.logs(),
                std::fs::read_to_string(node_dir.join("agent.log")).unwrap_or_default()
            );
            kubelet.sync(&env.workload);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The pods of the previous mode are gone with it.
        kubelet.sync(&env.workload);
        windows.push((mode, start, Instant::now()));
        assert_eq!(
            routed_through_mirror(&certs, &host),
            mode != "Unmanaged",
            "{mode}: the node's hosts files"
        );
    }
    // Back in Local: its data survived the walk; pulls go on for a moment through it.
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        kubelet.sync(&env.workload);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let records: Vec<PullRecord> = tokio::task::spawn_blocking(move || {
        pullers
            .into_iter()
            .flat_map(|p| p.join().unwrap())
            .collect()
    })
    .await
    .unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    controller.shutdown().await;

    let failed: Vec<String> = records
        .iter()
        .filter_map(|r| {
            r.error.as_ref().map(|e| {
                let phase = windows
                    .iter()
                    .find(|(_, s, e)| r.start >= *s && r.start <= *e)
                    .map_or("between switches", |(mode, ..)| mode);
                format!(
                    "during the switch to {phase} (through mirror: {}): {e}",
                    r.through_mirror
                )
            })
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} pulls failed:\n{}\nwarnings and errors of every pod:\n{}",
        failed.len(),
        records.len(),
        failed.join("\n"),
        pod_complaints(&dir.path().join("k"))
    );
    for (mode, start, end) in &windows {
        let during = records
            .iter()
            .filter(|r| r.start < *end && r.end > *start)
            .count();
        assert!(
            during > 0,
            "no pull was under way during the switch to {mode}"
        );
    }
    let direct = records.iter().filter(|r| !r.through_mirror).count();
    assert!(
        direct > 0 && direct < records.len(),
        "pulls through the mirror and, in Unmanaged, straight: {direct} of {}",
        records.len()
    );
    eprintln!(
        "{} pulls over the walk, {direct} straight from the upstream; {} pods started",
        records.len(),
        kubelet.started()
    );
}

/// Back to the mode a switch started from while nodes are half-way to the new route: the
/// abandoned target keeps serving until every node is back on the old route, then goes.
#[tokio::test]
async fn switching_back_mid_way_keeps_the_abandoned_target_until_the_nodes_are_back() {
    let setup = Setup::new().await;
    let env = &setup.env;
    put_node(env, "n1", true);
    let controller = setup.converged().await;
    let ack_current = || {
        ack(
            env,
            "n1",
            &node_config_key(env, names::NODE_CONFIG_HASH_KEY),
        )
    };
    ack_current();
    let app = AppUpstream::start(env);
    app.push();
    let local = setup.registry_variable();
    let mut direct = local.clone();
    direct["mode"] = json!("Direct");
    direct["upstream"] = json!({"url": app.upstream.url, "caSecretRef": {"name": "up-ca"}});
    setup.set_registry(direct);
    let deployment = "/apis/apps/v1/namespaces/registry-system/deployments/registry-direct";
    eventually("Direct ready and the node in transition", || {
        env.make_direct_ready();
        node_config_key(env, names::NODE_CONFIG_PHASE_KEY) == "transition"
    })
    .await;
    // The node carries the transition (both routes).
    ack_current();
    let status = |field: &str| {
        setup
            .creg()
            .map(|c| c["status"][field].clone())
            .unwrap_or(Value::Null)
    };
    setup.set_registry(local);
    eventually("returning to Local shown", || {
        setup.creg_condition("ModeReady")["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("returning to Local"))
    })
    .await;
    assert_eq!(status("mode"), "Local");
    assert_eq!(status("targetMode"), "Local");
    assert!(
        env.workload.get(deployment).is_some(),
        "Direct serves while the node may send to it"
    );
    eventually("back to Local, complete", || {
        env.make_registry_ready(3);
        ack_current();
        status("targetMode").is_null()
    })
    .await;
    assert_eq!(status("mode"), "Local");
    assert!(
        env.workload.get(deployment).is_none(),
        "Direct gone at the end"
    );
    let hosts = node_hosts_files(env);
    assert!(
        hosts.len() == 1 && !hosts[0].contains("server ="),
        "only Local's _default route: {hosts:?}"
    );
    controller.shutdown().await;
}
