//! The controller machinery against the in-memory API server: watch (closed streams, 410,
//! slow consumers), leader election with an injected clock, and the controller itself with a
//! small real reconciler: ClusterRegistry written on change only, leadership, resync.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use registry_addon::cli::{Cli, Command};
use registry_addon::controller::clock::{Clock, ManualClock};
use registry_addon::controller::lease::{LeaderElector, LeaseConfig};
use registry_addon::controller::metrics::ControllerMetrics;
use registry_addon::controller::queue::QueueConfig;
use registry_addon::controller::status::{
    self, CERTIFICATE_READY, ClusterRegistryStatus, Conditions, REGISTRY_READY,
};
use registry_addon::controller::{
    Controller, ControllerConfig, ReconcileError, ReconcileOutcome, Reconciler, StatusReport,
};
use serde_json::{Value, json};

use support::apiserver::ApiServer;
use support::crd::{crd, printed_columns, validate_against_crd};

const NS: &str = "registry-addon-system";
const WAIT: Duration = Duration::from_secs(20);

fn configmaps(server: &ApiServer) -> Api<ConfigMap> {
    Api::namespaced(server.client(), "default")
}

fn put_configmap(server: &ApiServer, name: &str, value: &str) {
    server.put(
        "/api/v1/namespaces/default/configmaps",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"v": value}}),
    );
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

/// A watcher's view: name → value of `data.v`, and how many relists it went through.
#[derive(Default)]
struct View {
    objects: BTreeMap<String, String>,
    inits: usize,
}

fn start_view(server: &ApiServer, per_event: Duration) -> Arc<std::sync::Mutex<View>> {
    let view = Arc::new(std::sync::Mutex::new(View::default()));
    let stream = watcher::watcher(configmaps(server), watcher::Config::default()).default_backoff();
    let sink = view.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut buffer = BTreeMap::new();
        while let Some(event) = stream.next().await {
            if !per_event.is_zero() {
                tokio::time::sleep(per_event).await;
            }
            let Ok(event) = event else { continue };
            let mut view = sink.lock().unwrap();
            let value = |cm: &ConfigMap| {
                cm.data
                    .as_ref()
                    .and_then(|d| d.get("v").cloned())
                    .unwrap_or_default()
            };
            match event {
                Event::Init => {
                    view.inits += 1;
                    buffer.clear();
                }
                Event::InitApply(cm) => {
                    buffer.insert(cm.metadata.name.clone().unwrap(), value(&cm));
                }
                Event::InitDone => view.objects = std::mem::take(&mut buffer),
                Event::Apply(cm) => {
                    view.objects
                        .insert(cm.metadata.name.clone().unwrap(), value(&cm));
                }
                Event::Delete(cm) => {
                    view.objects.remove(cm.metadata.name.as_deref().unwrap());
                }
            }
        }
    });
    view
}

fn server_view(server: &ApiServer) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in ["a", "b", "c", "d", "e"] {
        if let Some(cm) = server.get(&format!("/api/v1/namespaces/default/configmaps/{name}")) {
            out.insert(
                name.to_string(),
                cm["data"]["v"].as_str().unwrap().to_string(),
            );
        }
    }
    out
}

#[tokio::test]
async fn watch_lists_then_streams_additions_changes_and_deletions() {
    let server = ApiServer::start().await;
    put_configmap(&server, "a", "1");
    let view = start_view(&server, Duration::ZERO);
    eventually("the initial list", || {
        view.lock().unwrap().objects.len() == 1
    })
    .await;
    put_configmap(&server, "b", "1");
    put_configmap(&server, "a", "2");
    server.remove("/api/v1/namespaces/default/configmaps/b");
    put_configmap(&server, "c", "1");
    eventually("the watched changes", || {
        view.lock().unwrap().objects == server_view(&server)
    })
    .await;
    assert_eq!(
        view.lock().unwrap().objects.get("a").map(String::as_str),
        Some("2")
    );
    assert_eq!(view.lock().unwrap().inits, 1);
    let watches: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.query.contains("watch=true"))
        .collect();
    assert!(!watches.is_empty());
    assert!(
        watches[0].query.contains("resourceVersion=1"),
        "{:?}",
        watches[0]
    );
}

#[tokio::test]
async fn a_closed_stream_resumes_from_its_resource_version_without_relisting() {
    let server = ApiServer::start().await;
    put_configmap(&server, "a", "1");
    let view = start_view(&server, Duration::ZERO);
    eventually("the initial list", || {
        view.lock().unwrap().objects.len() == 1
    })
    .await;
    eventually("the watch", || server.open_watches() > 0).await;
    server.close_watches();
    put_configmap(&server, "b", "1");
    put_configmap(&server, "a", "2");
    eventually("the changes made while the stream was closed", || {
        view.lock().unwrap().objects == server_view(&server)
    })
    .await;
    assert_eq!(
        view.lock().unwrap().inits,
        1,
        "no relist after a closed stream"
    );
    let lists = server
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/configmaps") && !r.query.contains("watch=true"))
        .count();
    assert_eq!(lists, 1);
}

#[tokio::test]
async fn a_compacted_resource_version_gets_410_and_the_watcher_relists() {
    let server = ApiServer::start().await;
    put_configmap(&server, "a", "1");
    let view = start_view(&server, Duration::ZERO);
    eventually("the initial list", || {
        view.lock().unwrap().objects.len() == 1
    })
    .await;
    eventually("the watch", || server.open_watches() > 0).await;
    // The watch's resourceVersion is lost; the next stream from it answers 410 Expired.
    server.compact();
    server.close_watches();
    put_configmap(&server, "b", "1");
    server.compact();
    eventually("a relist after 410", || {
        let view = view.lock().unwrap();
        view.inits >= 2 && view.objects == server_view(&server)
    })
    .await;
}

#[tokio::test]
async fn a_raw_watch_from_an_expired_version_sees_410_expired() {
    let server = ApiServer::start().await;
    put_configmap(&server, "a", "1");
    put_configmap(&server, "a", "2");
    server.compact();
    let api = configmaps(&server);
    let mut stream = api
        .watch(&kube::api::WatchParams::default(), "1")
        .await
        .expect("the watch starts")
        .boxed();
    match stream.next().await {
        Some(Ok(kube::api::WatchEvent::Error(status))) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        stream.next().await.is_none(),
        "the stream ends after the 410"
    );
}

#[tokio::test]
async fn a_slow_consumer_ends_up_with_the_servers_state() {
    let server = ApiServer::start().await;
    server.set_watch_history(3);
    for name in ["a", "b", "c"] {
        put_configmap(&server, name, "0");
    }
    let view = start_view(&server, Duration::from_millis(20));
    eventually("the initial list", || {
        view.lock().unwrap().objects.len() == 3
    })
    .await;
    // Far more changes than the history keeps, faster than the consumer reads.
    for round in 1..=30 {
        for name in ["a", "b", "c", "d"] {
            put_configmap(&server, name, &round.to_string());
        }
    }
    server.remove("/api/v1/namespaces/default/configmaps/b");
    eventually("the consumer to catch up", || {
        view.lock().unwrap().objects == server_view(&server)
    })
    .await;
}

#[tokio::test]
async fn metadata_lists_and_watches_return_partial_objects() {
    let server = ApiServer::start().await;
    put_configmap(&server, "a", "1");
    let client = server.client();
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let list = api.list_metadata(&Default::default()).await.expect("list");
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].metadata.name.as_deref(), Some("a"));
    let raw = reqwest_free_get(&server, "/api/v1/namespaces/default/configmaps").await;
    assert_eq!(raw["kind"], "PartialObjectMetadataList");
    assert!(raw["items"][0].get("data").is_none(), "{raw}");
}

/// A GET with kube's metadata Accept header, as raw JSON.
async fn reqwest_free_get(server: &ApiServer, path: &str) -> Value {
    let request = http::Request::get(path)
        .header(
            "accept",
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        )
        .body(Vec::new())
        .unwrap();
    server
        .client()
        .request::<Value>(request)
        .await
        .expect("GET")
}

// ---- Leader election ----

fn lease_config(identity: &str) -> LeaseConfig {
    LeaseConfig::new("registry-addon", NS, identity.to_string())
}

fn lease_holder(server: &ApiServer) -> Option<String> {
    server
        .get(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/registry-addon"
        ))
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}

#[tokio::test]
async fn one_of_two_electors_leads_and_the_other_takes_over_when_it_stops_renewing() {
    let server = ApiServer::start().await;
    let clock = ManualClock::new(SystemTime::now());
    let shared: Arc<dyn Clock> = Arc::new(clock.clone());
    let mut a = LeaderElector::new(server.client(), lease_config("a"), shared.clone());
    let mut b = LeaderElector::new(server.client(), lease_config("b"), shared.clone());

    let (la, lb) = tokio::join!(a.step(), b.step());
    assert!(la ^ lb, "exactly one leads: a={la} b={lb}");
    let (mut leader, mut follower) = if la { (a, b) } else { (b, a) };
    assert_eq!(lease_holder(&server).as_deref(), Some(leader.identity()));

    // Renewals keep the lease however long it runs.
    for _ in 0..10 {
        clock.advance(Duration::from_secs(5));
        assert!(leader.step().await);
        assert!(!follower.step().await);
    }

    // The leader stops renewing: after a full lease duration seen unchanged, the follower
    // takes over.
    clock.advance(Duration::from_secs(10));
    assert!(!follower.step().await, "10 s is within the 15 s lease");
    clock.advance(Duration::from_secs(6));
    assert!(follower.step().await);
    assert_eq!(lease_holder(&server).as_deref(), Some(follower.identity()));
    // The old leader finds the Lease held by the other and follows.
    assert!(!leader.step().await);
    let lease = server
        .get(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/registry-addon"
        ))
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);
}

#[tokio::test]
async fn a_stale_update_gets_409_and_leaves_one_leader() {
    let server = ApiServer::start().await;
    let clock = ManualClock::new(SystemTime::now());
    let shared: Arc<dyn Clock> = Arc::new(clock.clone());
    let mut old = LeaderElector::new(server.client(), lease_config("old"), shared.clone());
    assert!(old.step().await);
    let mut electors: Vec<LeaderElector> = (0..4)
        .map(|i| {
            LeaderElector::new(
                server.client(),
                lease_config(&format!("f{i}")),
                shared.clone(),
            )
        })
        .collect();
    for e in &mut electors {
        assert!(!e.step().await);
    }
    clock.advance(Duration::from_secs(16));
    // All four race for the expired Lease with the same resourceVersion.
    let results = futures::future::join_all(electors.iter_mut().map(|e| e.step())).await;
    assert_eq!(results.iter().filter(|l| **l).count(), 1, "{results:?}");
    let conflicts = server
        .requests()
        .iter()
        .filter(|r| r.method == http::Method::PUT && r.path.ends_with("/leases/registry-addon"))
        .count();
    assert!(conflicts >= 2, "every racer wrote: {conflicts}");
}

#[tokio::test]
async fn a_leader_that_cannot_renew_steps_down_at_the_deadline() {
    let server = ApiServer::start().await;
    let clock = ManualClock::new(SystemTime::now());
    let mut a = LeaderElector::new(server.client(), lease_config("a"), Arc::new(clock.clone()));
    assert!(a.step().await);
    server.fail_next(None, "/leases/registry-addon", 100, 500);
    clock.advance(Duration::from_secs(5));
    assert!(
        a.step().await,
        "one failed renewal within the deadline keeps leadership"
    );
    clock.advance(Duration::from_secs(6));
    assert!(
        !a.step().await,
        "11 s without renewal is past the 10 s deadline"
    );
}

#[tokio::test]
async fn release_lets_the_follower_take_over_at_once() {
    let server = ApiServer::start().await;
    let clock = ManualClock::new(SystemTime::now());
    let shared: Arc<dyn Clock> = Arc::new(clock.clone());
    let mut a = LeaderElector::new(server.client(), lease_config("a"), shared.clone());
    let mut b = LeaderElector::new(server.client(), lease_config("b"), shared.clone());
    assert!(a.step().await);
    assert!(!b.step().await);
    a.release().await;
    assert!(b.step().await);
}

// ---- The controller ----

const CLUSTERS: &str = "/apis/cluster.x-k8s.io/v1beta2/namespaces";

/// A small real reconciler: reads the kubeconfig Secret as the converge path does, and
/// reports the variable's replicas with every replica ready.
struct TestReconciler {
    client: kube::Client,
    clock: ManualClock,
    calls: AtomicUsize,
    fail: std::sync::Mutex<Vec<String>>,
}

impl Reconciler for TestReconciler {
    async fn reconcile(&self, cluster: &Value) -> Result<ReconcileOutcome, ReconcileError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let name = cluster["metadata"]["name"].as_str().unwrap_or_default();
        let namespace = cluster["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default();
        if self.fail.lock().unwrap().iter().any(|n| n == name) {
            return Err(ReconcileError::new(anyhow::anyhow!(
                "cluster {namespace}/{name}: injected failure"
            )));
        }
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.client.clone(), namespace);
        secrets.get_opt(&format!("{name}-kubeconfig")).await?;
        let registry = cluster["spec"]["topology"]["variables"]
            .as_array()
            .and_then(|vars| vars.iter().find(|v| v["name"] == "clusterConfig"))
            .map(|v| v["value"]["addons"]["registry"].clone())
            .unwrap_or(Value::Null);
        if registry.is_null() {
            return Ok(ReconcileOutcome::new(StatusReport::Absent));
        }
        let replicas = registry["replicas"].as_i64().unwrap_or(2) as i32;
        let generation = cluster["metadata"]["generation"].as_i64();
        let mut conditions = Conditions::new(generation, self.clock.now());
        conditions
            .set(
                CERTIFICATE_READY,
                true,
                "CertificateValid",
                "certificate expires 2028-11-20; renewal starts 2028-03-21",
            )
            .set(
                REGISTRY_READY,
                true,
                "ReplicasReady",
                format!("{replicas} of {replicas} replicas ready"),
            )
            .summarize();
        Ok(ReconcileOutcome::new(StatusReport::Present(
            ClusterRegistryStatus {
                observed_generation: generation,
                mode: Some("Local".into()),
                replicas: Some(replicas),
                ready_replicas: Some(replicas),
                certificate: Some(status::CertificateStatus {
                    not_after: Some(registry_addon::controller::clock::to_k8s_time(
                        SystemTime::UNIX_EPOCH + Duration::from_secs(1_858_000_000),
                    )),
                    renew_after: None,
                }),
                conditions: conditions.build(),
                ..Default::default()
            },
        )))
    }
}

fn put_cluster(server: &ApiServer, namespace: &str, name: &str, registry: Value) {
    let mut cluster = support::cluster_fixture("cluster-v1beta2.json");
    cluster["metadata"] = json!({"name": name, "namespace": namespace, "generation": 1});
    let vars = cluster["spec"]["topology"]["variables"]
        .as_array_mut()
        .unwrap();
    let config = vars
        .iter_mut()
        .find(|v| v["name"] == "clusterConfig")
        .unwrap();
    config["value"]["addons"]["registry"] = registry;
    server.put(&format!("{CLUSTERS}/{namespace}/clusters"), cluster);
    server.put(
        &format!("/api/v1/namespaces/{namespace}/secrets"),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("{name}-kubeconfig")}, "data": {"value": ""}}),
    );
}

fn creg(server: &ApiServer, namespace: &str, name: &str) -> Option<Value> {
    server.get(&format!(
        "/apis/registry-addon.io/v1alpha1/namespaces/{namespace}/clusterregistries/{name}"
    ))
}

/// Writes other than the Lease's.
fn controller_writes(server: &ApiServer) -> Vec<String> {
    server
        .requests()
        .iter()
        .filter(|r| r.is_write() && !r.path.contains("/leases/"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

struct Setup {
    server: ApiServer,
    clock: ManualClock,
    reconciler: Arc<TestReconciler>,
    metrics: Arc<ControllerMetrics>,
}

impl Setup {
    async fn new() -> Setup {
        let server = ApiServer::start().await;
        let clock = ManualClock::new(SystemTime::now());
        let reconciler = Arc::new(TestReconciler {
            client: server.client(),
            clock: clock.clone(),
            calls: AtomicUsize::new(0),
            fail: Default::default(),
        });
        Setup {
            server,
            clock,
            reconciler,
            metrics: Arc::new(ControllerMetrics::unregistered()),
        }
    }

    fn config(&self, identity: &str, namespaces: &[&str], resync: Duration) -> ControllerConfig {
        let mut config = ControllerConfig::new(
            NS,
            namespaces.iter().map(|s| s.to_string()).collect(),
            resync,
        );
        config.lease.identity = identity.into();
        config.lease.retry_period = Duration::from_millis(20);
        config.queue = QueueConfig {
            concurrency: 4,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
        };
        config
    }

    async fn start(&self, identity: &str, namespaces: &[&str], resync: Duration) -> Controller {
        Controller::start(
            self.server.client(),
            self.config(identity, namespaces, resync),
            self.reconciler.clone(),
            self.metrics.clone(),
            Arc::new(self.clock.clone()),
        )
        .await
        .expect("controller starts")
    }
}

#[tokio::test]
async fn enabling_on_an_existing_cluster_creates_its_cluster_registry_and_a_resync_writes_nothing()
{
    let setup = Setup::new().await;
    let server = &setup.server;
    put_cluster(server, "default", "c1", json!({"replicas": 3}));
    put_cluster(server, "default", "off", Value::Null);
    let controller = setup.start("a", &[], Duration::from_millis(300)).await;
    eventually("the ClusterRegistry", || {
        creg(server, "default", "c1").is_some_and(|c| c.get("status").is_some())
    })
    .await;
    let object = creg(server, "default", "c1").unwrap();
    assert_eq!(object["metadata"]["ownerReferences"][0]["kind"], "Cluster");
    assert_eq!(object["metadata"]["ownerReferences"][0]["name"], "c1");
    assert_eq!(object["status"]["replicasReady"], "3/3");
    assert_eq!(object["status"]["observedGeneration"], 1);
    assert!(
        creg(server, "default", "off").is_none(),
        "addon off: no ClusterRegistry"
    );
    validate_against_crd(&object);
    let columns = printed_columns(&object);
    assert_eq!(
        columns,
        vec![
            "Local",
            "True",
            "3/3",
            "",
            "2028-11-16T15:06:40Z",
            "2026-01-01T00:00:00Z"
        ]
    );

    // Up to date: resyncs reconcile again, and write nothing.
    server.clear_log();
    let calls = setup.reconciler.calls.load(Ordering::SeqCst);
    setup.clock.advance(Duration::from_secs(3600));
    eventually("two resyncs", || {
        setup.reconciler.calls.load(Ordering::SeqCst) >= calls + 4
    })
    .await;
    assert_eq!(controller_writes(server), Vec::<String>::new());
    assert!(setup.metrics.reconciles(true) >= 4);

    // A status-only change of the Cluster is not a spec change: not queued for it.
    controller.shutdown().await;
}

#[tokio::test]
async fn a_spec_change_is_reconciled_and_turning_the_addon_off_removes_the_cluster_registry() {
    let setup = Setup::new().await;
    let server = &setup.server;
    put_cluster(server, "default", "c1", json!({"replicas": 3}));
    let controller = setup.start("a", &[], Duration::from_secs(600)).await;
    eventually("the ClusterRegistry", || {
        creg(server, "default", "c1").is_some_and(|c| c["status"]["replicas"] == 3)
    })
    .await;
    let before = creg(server, "default", "c1").unwrap();

    let path = format!("{CLUSTERS}/default/clusters/c1");
    server.update(&path, |c| {
        c["spec"]["topology"]["variables"][3]["value"]["addons"]["registry"]["replicas"] = json!(5);
        c["metadata"]["generation"] = json!(2);
    });
    eventually("the new replicas", || {
        creg(server, "default", "c1").is_some_and(|c| c["status"]["replicas"] == 5)
    })
    .await;
    let after = creg(server, "default", "c1").unwrap();
    assert_eq!(after["status"]["observedGeneration"], 2);
    // Ready stayed True: its transition time is kept.
    assert_eq!(
        before["status"]["conditions"][0]["lastTransitionTime"],
        after["status"]["conditions"][0]["lastTransitionTime"]
    );

    server.update(&path, |c| {
        c["spec"]["topology"]["variables"][3]["value"]["addons"]["registry"] = Value::Null;
        c["metadata"]["generation"] = json!(3);
    });
    eventually("the ClusterRegistry removed", || {
        creg(server, "default", "c1").is_none()
    })
    .await;
    controller.shutdown().await;
}

#[tokio::test]
async fn only_the_leader_writes_and_the_other_takes_over_when_it_stops_renewing() {
    let setup = Setup::new().await;
    let server = &setup.server;
    put_cluster(server, "default", "c1", json!({}));
    let a = setup.start("a", &[], Duration::from_secs(600)).await;
    eventually("a leads", || a.is_leading()).await;
    let b = setup.start("b", &[], Duration::from_secs(600)).await;
    eventually("c1 reconciled", || {
        creg(server, "default", "c1").is_some_and(|c| c.get("status").is_some())
    })
    .await;
    assert!(!b.is_leading());
    assert_eq!(lease_holder(server).as_deref(), Some("a"));

    // a crashes: its Lease is not released. b takes over once the lease duration has passed
    // on its clock, and reconciles what appears since.
    a.abort();
    server.clear_log();
    put_cluster(server, "default", "c2", json!({}));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        creg(server, "default", "c2").is_none(),
        "no leader, nothing written"
    );
    assert!(
        controller_writes(server)
            .iter()
            .all(|w| !w.contains("clusterregistries"))
    );
    setup.clock.advance(Duration::from_secs(16));
    eventually("b leads", || b.is_leading()).await;
    eventually("c2 reconciled by b", || {
        creg(server, "default", "c2").is_some_and(|c| c.get("status").is_some())
    })
    .await;
    assert_eq!(lease_holder(server).as_deref(), Some("b"));
    b.shutdown().await;
    assert_eq!(lease_holder(server), None, "released on shutdown");
}

#[tokio::test]
async fn watch_namespaces_limit_the_clusters_and_v1beta1_is_used_when_v1beta2_is_not_served() {
    let setup = Setup::new().await;
    let server = &setup.server;
    // Only v1beta1 is served: every v1beta2 request answers 404.
    server.fail_next(
        None,
        "/apis/cluster.x-k8s.io/v1beta2/namespaces/team-a/clusters",
        1,
        404,
    );
    for (ns, name) in [("team-a", "a1"), ("team-b", "b1")] {
        let mut cluster = support::cluster_fixture("cluster-v1beta1.json");
        cluster["metadata"] = json!({"name": name, "namespace": ns, "generation": 1});
        server.put(
            &format!("/apis/cluster.x-k8s.io/v1beta1/namespaces/{ns}/clusters"),
            cluster,
        );
        server.put(
            &format!("/api/v1/namespaces/{ns}/secrets"),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("{name}-kubeconfig")}}),
        );
    }
    let controller = setup
        .start("a", &["team-a"], Duration::from_secs(600))
        .await;
    eventually("a1 reconciled", || {
        creg(server, "team-a", "a1").is_some_and(|c| c.get("status").is_some())
    })
    .await;
    let object = creg(server, "team-a", "a1").unwrap();
    assert_eq!(
        object["metadata"]["ownerReferences"][0]["apiVersion"],
        "cluster.x-k8s.io/v1beta1"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        creg(server, "team-b", "b1").is_none(),
        "team-b is not watched"
    );
    controller.shutdown().await;
}

#[tokio::test]
async fn a_failing_cluster_backs_off_while_the_others_are_reconciled() {
    let setup = Setup::new().await;
    let server = &setup.server;
    setup.reconciler.fail.lock().unwrap().push("broken".into());
    put_cluster(server, "default", "broken", json!({}));
    for i in 0..20 {
        put_cluster(server, "default", &format!("ok-{i}"), json!({}));
    }
    let controller = setup.start("a", &[], Duration::from_secs(600)).await;
    eventually("every healthy cluster", || {
        (0..20).all(|i| {
            creg(server, "default", &format!("ok-{i}")).is_some_and(|c| c.get("status").is_some())
        })
    })
    .await;
    eventually("retries of the broken one", || {
        setup.metrics.reconciles(false) >= 3
    })
    .await;
    assert!(creg(server, "default", "broken").is_none());
    setup.reconciler.fail.lock().unwrap().clear();
    eventually("the broken one recovered", || {
        creg(server, "default", "broken").is_some()
    })
    .await;
    controller.shutdown().await;
}

#[test]
fn serve_flags() {
    let parse = |args: &[&str]| {
        let mut argv = vec!["registry-addon", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("flags").command {
            Command::Serve(args) => args,
            _ => unreachable!(),
        }
    };
    let defaults = parse(&[]);
    assert!(defaults.controller);
    assert!(defaults.watch_namespaces.is_empty());
    assert_eq!(defaults.resync, Duration::from_secs(600));
    let set = parse(&[
        "--controller=false",
        "--watch-namespace",
        "a",
        "--watch-namespace=b",
        "--resync",
        "90s",
    ]);
    assert!(!set.controller);
    assert_eq!(set.watch_namespaces, vec!["a", "b"]);
    assert_eq!(set.resync, Duration::from_secs(90));
    let bad = Cli::try_parse_from(["registry-addon", "serve", "--resync", "soon"]);
    assert!(bad.unwrap_err().to_string().contains("soon"));
}

// ---- The CRD ----

#[test]
fn the_crd_names_are_the_binding_ones() {
    let crd = crd();
    assert_eq!(
        crd["metadata"]["name"],
        "clusterregistries.registry-addon.io"
    );
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["creg"]));
    assert_eq!(crd["spec"]["versions"][0]["name"], "v1alpha1");
    assert_eq!(
        crd["spec"]["versions"][0]["subresources"],
        json!({"status": {}})
    );
    let _ = DynamicObject::new("x", &status::api_resource());
}
