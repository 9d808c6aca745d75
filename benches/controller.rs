//! Benchmark of `registry-addon serve`'s controller with the addon's real reconciler (run by
//! hack/bench-controller.sh: `cargo bench --profile dev --bench controller`; not a test, so
//! not in the test run). One in-memory management API
//! server holds N Clusters (default 1,000, `BENCH_CLUSTERS`) and their kubeconfig Secrets, each
//! pointing at its own in-memory workload API server. `serve` runs as a child process (`BIN`, or
//! this build's binary), so the RSS read from /proc is the controller's own:
//!
//! 1. prepare: a first `serve` deploys every cluster (the bcrypt hashes are the slow part), the
//!    StatefulSets are made ready, and it stops once every ClusterRegistry shows `Ready=True`;
//! 2. cold start: a second `serve`, timed until every cluster was reconciled once (its
//!    `registry_addon_reconcile_total`), writes counted on every server;
//! 3. resync: the same process, until every cluster was reconciled a second time: no write.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use registry_addon::certs::CertificateAuthority;
use registry_addon::cli::KeyAlgorithm;
use serde_json::json;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use support::apiserver::ApiServer;
use support::b64;

/// Spread over namespaces, as a real fleet is.
const NAMESPACES: usize = 20;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn namespace(i: usize) -> String {
    format!("ns-{}", i % NAMESPACES)
}

fn name(i: usize) -> String {
    format!("c-{i}")
}

fn creg_path(i: usize) -> String {
    format!(
        "/apis/registry-addon.io/v1alpha1/namespaces/{}/clusterregistries/{}",
        namespace(i),
        name(i)
    )
}

const STATEFULSET: &str = "/apis/apps/v1/namespaces/registry-system/statefulsets/registry";

/// A port free right now on loopback, for `serve`'s listeners.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn binary() -> PathBuf {
    match std::env::var_os("BIN") {
        Some(bin) => PathBuf::from(bin),
        None => PathBuf::from(env!("CARGO_BIN_EXE_registry-addon")),
    }
}

struct Serve {
    child: Child,
    metrics: String,
    log: PathBuf,
}

impl Serve {
    async fn start(dir: &Path, kubeconfig: &Path, resync: &str, label: &str) -> Serve {
        let metrics = format!("127.0.0.1:{}", free_port());
        let log = dir.join(format!("serve-{label}.log"));
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary())
            .args(["serve", "--listen"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .args(["--metrics-listen", &metrics, "--resync", resync])
            .args(["--deployer", "direct", "--self-signed-ca-file"])
            .arg(dir.join("serving-ca.crt"))
            .env("KUBECONFIG", kubeconfig)
            .env_remove("POD_NAMESPACE")
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary().display()));
        Serve {
            child,
            metrics,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("serve is running")
    }

    /// `registry_addon_reconcile_total` by result: (success, error); None until it answers.
    async fn reconciles(&self) -> Option<(u64, u64)> {
        let mut stream = tokio::net::TcpStream::connect(&self.metrics).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        let count = |result: &str| {
            let prefix = format!("registry_addon_reconcile_total{{result=\"{result}\"}} ");
            body.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        body.contains("registry_addon_reconcile")
            .then(|| (count("success"), count("error")))
    }

    /// Polls the metrics until `done` holds for (success, error), or panics after `limit`.
    async fn wait(&mut self, what: &str, limit: Duration, done: impl Fn(u64, u64) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((ok, err)) = self.reconciles().await
                && done(ok, err)
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "serve exited ({status}) while waiting for {what}; log: {}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?} waiting for {what} (reconciles {:?}); log: {}",
                self.reconciles().await,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// (VmRSS, VmHWM) in KiB.
    fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("serve's /proc status");
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

    /// SIGTERM, as the kubelet stops it, and waits for the exit (the Lease is released).
    async fn stop(mut self) {
        let pid = self.pid().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -TERM {pid}");
        let exit = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("serve stops within 30 s of SIGTERM")
            .expect("serve's exit status");
        assert!(
            exit.success(),
            "serve exited with {exit}: {}",
            self.log_tail()
        );
    }
}

struct Fleet {
    management: ApiServer,
    workloads: Vec<ApiServer>,
}

impl Fleet {
    fn clear_logs(&self) {
        self.management.clear_log();
        for w in &self.workloads {
            w.clear_log();
        }
    }

    /// (management requests, workload requests, writes), the Lease's and the watch's apart.
    fn requests(&self) -> (usize, usize, Vec<String>) {
        let counted = |server: &ApiServer| -> Vec<support::apiserver::Logged> {
            server
                .requests()
                .into_iter()
                .filter(|r| !r.path.contains("/leases/") && !r.query.contains("watch=true"))
                .collect()
        };
        let management = counted(&self.management);
        let mut writes: Vec<String> = management
            .iter()
            .filter(|r| r.is_write())
            .map(|r| format!("management {} {}", r.method, r.path))
            .collect();
        let mut workload = 0;
        for (i, server) in self.workloads.iter().enumerate() {
            let requests = counted(server);
            workload += requests.len();
            writes.extend(
                requests
                    .iter()
                    .filter(|r| r.is_write())
                    .map(|r| format!("workload {} {} {}", name(i), r.method, r.path)),
            );
        }
        (management.len(), workload, writes)
    }

    fn ready(&self, i: usize) -> bool {
        self.management.get(&creg_path(i)).is_some_and(|c| {
            c["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
    }
}

/// A workload kubeconfig as CAPI writes it: the cluster's CA and a client certificate inline
/// (the URL is plain HTTP, so neither is used on the wire, but the client is built with them).
/// `BENCH_KUBECONFIG=plain`: no CA, so every client falls back to the platform's trust store.
fn workload_kubeconfig(server: &ApiServer, ca: Option<&CertificateAuthority>) -> String {
    let Some(ca) = ca else {
        return server.kubeconfig();
    };
    let cert = b64(ca.cert_pem());
    let key = b64(ca.key_pem().expose());
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: workload\n  cluster:\n    server: {}\n    certificate-authority-data: {cert}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- name: workload\n  context:\n    cluster: workload\n    user: admin\ncurrent-context: workload\n",
        server.url
    )
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn rss_of_test_process() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(bench_controller_1000_clusters());
}

async fn bench_controller_1000_clusters() {
    let n: usize = env_or("BENCH_CLUSTERS", 1000);
    let resync: String = env_or("BENCH_RESYNC", "30s".to_string());
    let dir = tempfile::tempdir().expect("temp dir");

    let started = Instant::now();
    let management = ApiServer::start().await;
    let mut workloads = Vec::with_capacity(n);
    for _ in 0..n {
        workloads.push(ApiServer::start().await);
    }
    let fixture = support::cluster_fixture("cluster-v1beta2.json");
    let kubeconfig_shape: String = env_or("BENCH_KUBECONFIG", "capi".to_string());
    let ca = (kubeconfig_shape != "plain").then(|| {
        CertificateAuthority::generate(KeyAlgorithm::EcdsaP256, OffsetDateTime::now_utc())
            .expect("workload CA")
    });
    for (i, workload) in workloads.iter().enumerate() {
        let (ns, name) = (namespace(i), name(i));
        let mut cluster = fixture.clone();
        cluster["metadata"]["name"] = json!(name);
        cluster["metadata"]["namespace"] = json!(ns);
        cluster["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{i:012}"));
        cluster["metadata"]["labels"] = json!({"cluster.x-k8s.io/cluster-name": name});
        cluster["status"] = json!({
            "initialization": {"controlPlaneInitialized": true},
            "conditions": [{"type": "ControlPlaneInitialized", "status": "True"}],
        });
        management.put(
            &format!("/apis/cluster.x-k8s.io/v1beta2/namespaces/{ns}/clusters"),
            cluster,
        );
        management.put(
            &format!("/api/v1/namespaces/{ns}/secrets"),
            json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": format!("{name}-kubeconfig")},
                "type": "cluster.x-k8s.io/secret",
                "data": {"value": b64(&workload_kubeconfig(workload, ca.as_ref()))},
            }),
        );
    }
    let fleet = Fleet {
        management,
        workloads,
    };
    let kubeconfig = dir.path().join("management.kubeconfig");
    std::fs::write(&kubeconfig, fleet.management.kubeconfig()).expect("kubeconfig");
    let setup = started.elapsed();
    let servers_rss = rss_of_test_process();

    // Prepare: the first writes, then every StatefulSet ready and shown so.
    let prepare_started = Instant::now();
    let limit = Duration::from_secs(env_or("BENCH_PREPARE_TIMEOUT", 3600));
    let mut serve = Serve::start(dir.path(), &kubeconfig, "10m", "prepare").await;
    serve
        .wait("every cluster deployed", limit, |ok, _| ok >= n as u64)
        .await;
    let deadline = Instant::now() + limit;
    loop {
        let mut pending = 0;
        for (i, workload) in fleet.workloads.iter().enumerate() {
            if fleet.ready(i) {
                continue;
            }
            pending += 1;
            let Some(sts) = workload.get(STATEFULSET) else {
                continue;
            };
            let ready = sts["status"]["readyReplicas"] == sts["spec"]["replicas"]
                && sts["status"]["observedGeneration"] == sts["metadata"]["generation"];
            if !ready {
                workload.update(STATEFULSET, |sts| {
                    let replicas = sts["spec"]["replicas"].clone();
                    sts["status"] = json!({
                        "observedGeneration": sts["metadata"]["generation"].clone(),
                        "replicas": replicas,
                        "readyReplicas": replicas,
                        "updatedReplicas": replicas,
                        "availableReplicas": replicas,
                    });
                });
            }
        }
        if pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{pending} ClusterRegistries not Ready=True after {limit:?}; log: {}",
            serve.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, prepare_errors) = serve.reconciles().await.unwrap_or_default();
    let (pm, pw, prepare_writes) = fleet.requests();
    serve.stop().await;
    let prepare = prepare_started.elapsed();

    // Cold start of a second process against the converged fleet.
    fleet.clear_logs();
    let cold_started = Instant::now();
    let mut serve = Serve::start(dir.path(), &kubeconfig, &resync, "run").await;
    serve
        .wait("every cluster reconciled once", limit, |ok, err| {
            ok + err >= n as u64
        })
        .await;
    let cold = cold_started.elapsed();
    let (cold_ok, cold_err) = serve.reconciles().await.unwrap_or_default();
    let (cm, cw, cold_writes) = fleet.requests();
    let (cold_rss, _) = serve.rss_kib();

    // Resync: every cluster reconciled a second time.
    fleet.clear_logs();
    let resync_started = Instant::now();
    serve
        .wait("every cluster reconciled twice", limit, |ok, err| {
            ok + err >= 2 * n as u64
        })
        .await;
    let resync_wait = resync_started.elapsed();
    // The last reconciles' status comparisons have finished once the count moved; nothing is
    // in flight that could still write.
    let (rm, rw, resync_writes) = fleet.requests();
    let (resync_rss, hwm) = serve.rss_kib();
    let (total_ok, total_err) = serve.reconciles().await.unwrap_or_default();
    serve.stop().await;

    let per =
        |m: usize, w: usize| format!("{:.1} + {:.1}", m as f64 / n as f64, w as f64 / n as f64);
    println!(
        "registry-addon serve ({}), {n} Clusters, direct deployer, one workload API server each, {kubeconfig_shape} kubeconfigs",
        binary().display()
    );
    println!(
        "setup: {n} workload + 1 management in-memory API servers in the test process: {:.1} s, test process RSS {} MiB",
        setup.as_secs_f64(),
        mib(servers_rss)
    );
    println!(
        "| phase | time | reconciles ok/error | requests per cluster (management + workload) | writes | serve RSS |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| prepare (first deploy, bcrypt) | {:.1} s | {n}+/{prepare_errors} | {} | {} | |",
        prepare.as_secs_f64(),
        per(pm, pw),
        prepare_writes.len()
    );
    println!(
        "| cold start, every cluster reconciled | {:.1} s | {cold_ok}/{cold_err} | {} | {} | {} MiB |",
        cold.as_secs_f64(),
        per(cm, cw),
        cold_writes.len(),
        mib(cold_rss)
    );
    println!(
        "| resync ({resync}) of every cluster | {:.1} s wait | {}/{} | {} | {} | {} MiB (peak {} MiB) |",
        resync_wait.as_secs_f64(),
        total_ok - cold_ok,
        total_err - cold_err,
        per(rm, rw),
        resync_writes.len(),
        mib(resync_rss),
        mib(hwm)
    );
    for write in cold_writes.iter().chain(&resync_writes).take(20) {
        println!("write: {write}");
    }
    assert!(
        resync_writes.is_empty(),
        "a resync of converged clusters wrote: {resync_writes:?}"
    );
    assert!(
        cold_writes.is_empty(),
        "a cold start on converged clusters wrote: {cold_writes:?}"
    );
    assert_eq!((cold_err, total_err), (0, 0), "reconcile errors");
}
