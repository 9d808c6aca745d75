//! Benchmark of the controller against the in-memory API server (run by
//! hack/bench-controller.sh; ignored in the normal test run): 1,000 converged Clusters, a cold
//! start until every one is reconciled, then a resync that must write nothing.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use registry_addon::controller::clock::{Clock, SystemClock};
use registry_addon::controller::metrics::ControllerMetrics;
use registry_addon::controller::status::{
    CERTIFICATE_READY, ClusterRegistryStatus, Conditions, REGISTRY_READY,
};
use registry_addon::controller::{
    Controller, ControllerConfig, ReconcileError, ReconcileOutcome, Reconciler, StatusReport,
};
use serde_json::{Value, json};

use support::apiserver::ApiServer;

/// Reads what the converge path reads for a converged cluster (the kubeconfig Secret, the
/// cluster CA Secret, the root CA) and reports a Ready status.
struct ReadOnly {
    client: kube::Client,
    calls: AtomicUsize,
}

impl Reconciler for ReadOnly {
    async fn reconcile(&self, cluster: &Value) -> Result<ReconcileOutcome, ReconcileError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let name = cluster["metadata"]["name"].as_str().unwrap_or_default();
        let namespace = cluster["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        secrets.get_opt(&format!("{name}-kubeconfig")).await?;
        secrets
            .get_opt(&format!("{name}-registry-addon-ca"))
            .await?;
        let root: Api<Secret> = Api::namespaced(self.client.clone(), "registry-addon-system");
        root.get_opt("registry-addon-root-ca").await?;
        let mut conditions = Conditions::new(
            cluster["metadata"]["generation"].as_i64(),
            SystemClock.now(),
        );
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
                "2 of 2 replicas ready",
            )
            .summarize();
        Ok(ReconcileOutcome::new(StatusReport::Present(
            ClusterRegistryStatus {
                observed_generation: cluster["metadata"]["generation"].as_i64(),
                mode: Some("Local".into()),
                replicas: Some(2),
                ready_replicas: Some(2),
                conditions: conditions.build(),
                ..Default::default()
            },
        )))
    }
}

fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: hack/bench-controller.sh"]
async fn bench_controller_1000_clusters() {
    let clusters: usize = std::env::var("BENCH_CLUSTERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let server = ApiServer::start().await;
    let fixture = support::cluster_fixture("cluster-v1beta2.json");
    for i in 0..clusters {
        let ns = format!("ns-{}", i % 50);
        let name = format!("c-{i}");
        let mut cluster = fixture.clone();
        cluster["metadata"] = json!({"name": name, "namespace": ns, "generation": 1});
        server.put(
            &format!("/apis/cluster.x-k8s.io/v1beta2/namespaces/{ns}/clusters"),
            cluster,
        );
        for secret in [
            format!("{name}-kubeconfig"),
            format!("{name}-registry-addon-ca"),
        ] {
            server.put(
                &format!("/api/v1/namespaces/{ns}/secrets"),
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret}, "data": {"value": "eA=="}}),
            );
        }
    }
    let (rss_before, _) = rss_kib();
    let reconciler = Arc::new(ReadOnly {
        client: server.client(),
        calls: AtomicUsize::new(0),
    });
    let mut config =
        ControllerConfig::new("registry-addon-system", vec![], Duration::from_secs(20));
    config.lease.identity = "bench".into();
    let started = Instant::now();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let controller = Controller::start(
        server.client(),
        config,
        reconciler.clone(),
        Arc::new(ControllerMetrics::unregistered()),
        clock,
    )
    .await
    .expect("controller starts");
    while reconciler.calls.load(Ordering::SeqCst) < clusters {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every status written, not only every reconcile called.
    let all_written = || {
        (0..clusters).all(|i| {
            server
                .get(&format!(
                    "/apis/registry-addon.io/v1alpha1/namespaces/ns-{}/clusterregistries/c-{i}",
                    i % 50
                ))
                .is_some_and(|c| c.get("status").is_some())
        })
    };
    while !all_written() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cold = started.elapsed();
    let cold_writes = server.writes();
    server.clear_log();
    let resync_start = Instant::now();
    while reconciler.calls.load(Ordering::SeqCst) < 2 * clusters {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the last resyncs' status comparisons finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resync = resync_start.elapsed();
    let resync_writes: Vec<String> = server
        .requests()
        .iter()
        .filter(|r| r.is_write() && !r.path.contains("/leases/"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    let (rss_after, hwm) = rss_kib();
    println!("clusters: {clusters}");
    println!(
        "cold start, every cluster reconciled: {:.2} s ({cold_writes} writes: ClusterRegistry create + status each, Lease)",
        cold.as_secs_f64()
    );
    println!(
        "resync of converged clusters: {} writes (after {:.1} s wait for the 20 s resync)",
        resync_writes.len(),
        resync.as_secs_f64()
    );
    println!(
        "RSS of the whole test process (API server with {clusters} Clusters and their objects included): before controller {} MiB, after {} MiB, peak {} MiB",
        rss_before / 1024,
        rss_after / 1024,
        hwm / 1024
    );
    println!(
        "controller's share (after - before): {} MiB",
        rss_after.saturating_sub(rss_before) / 1024
    );
    assert!(resync_writes.is_empty(), "{resync_writes:?}");
    controller.shutdown().await;
}
