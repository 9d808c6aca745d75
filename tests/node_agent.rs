//! `registry-addon node-agent`, the binary, against the in-memory API server (a Node and the
//! desired-config Secret), a temporary hosts directory, a real registry behind the real front
//! and a real containerd fetching through the files the agent wrote.
//!
//! Needs root (containerd), `containerd`, `ctr`, `docker-registry` and `skopeo` on PATH; the
//! test fails, saying what to install, without them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;
mod sync_support;

use sync_support::containerd::start_containerd;

use base64::Engine;
use registry_addon::addon::users::Credentials;
use registry_addon::certs::{CertificateAuthority, registry_subject_names};
use registry_addon::cli::KeyAlgorithm;
use registry_addon::hooks::patches::containerd::{
    self, MirrorSide, NodeConfig, Rollout, node_config,
};
use registry_addon::names;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::apiserver::ApiServer;
use time::OffsetDateTime;

const TOOLS: [&str; 4] = ["containerd", "ctr", "docker-registry", "skopeo"];
const RO_PASSWORD: &str = "ro-password-for-the-nodes-0123456789";
const RW_PASSWORD: &str = "rw-password-for-pushing-0123456789ab";
const NODE: &str = "node-1";
const SECRETS: &str = "/api/v1/namespaces/registry-system/secrets";
const NODE_PATH: &str = "/api/v1/nodes/node-1";

fn require_tools() {
    let missing: Vec<_> = TOOLS
        .iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n");
    assert!(
        missing.is_empty() && root,
        "node agent tests need root and {TOOLS:?} on PATH (apt-get install containerd \
         docker-registry skopeo): missing {missing:?}, root: {root}"
    );
}

/// A child process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write(path: impl AsRef<Path>, content: impl AsRef<[u8]>) {
    let path = path.as_ref();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// Waits up to `limit` for `check`, polling every 50 ms; the time it took.
async fn within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// An OCI image layout holding `v1`.
fn image_layout(dir: &Path) {
    let blob = |bytes: &[u8]| {
        let d = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        write(dir.join("blobs/sha256").join(&d[7..]), bytes);
        d
    };
    let layer = b"registry-addon node agent test layer".to_vec();
    let layer_digest = blob(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]}
    }))
    .unwrap();
    let config_digest = blob(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}]
    }))
    .unwrap();
    let manifest_digest = blob(&manifest);
    write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "v1"}
        }]
    });
    write(dir.join("index.json"), serde_json::to_vec(&index).unwrap());
}

/// Distribution behind the front (users ro and rw), holding `app:v1`.
fn start_replica(
    dir: &Path,
    ca: &CertificateAuthority,
) -> (sync_support::FrontProcess, sync_support::RegistryProcess) {
    let subject = registry_subject_names(2, "10.96.0.20".parse().unwrap());
    let server = ca
        .issue_server(&subject, KeyAlgorithm::EcdsaP256, OffsetDateTime::now_utc())
        .unwrap();
    write(dir.join("tls.crt"), &server.cert_pem);
    write(dir.join("tls.key"), server.key_pem.expose());
    let registry = sync_support::RegistryProcess::start(
        &dir.join("registry"),
        &sync_support::RegistryOptions {
            relative_urls: true,
            ..Default::default()
        },
    );
    let users = [
        sync_support::FrontUser {
            name: "ro",
            password: RO_PASSWORD,
            push: false,
        },
        sync_support::FrontUser {
            name: "rw",
            password: RW_PASSWORD,
            push: true,
        },
    ];
    let front = sync_support::FrontProcess::start(
        &dir.join("front"),
        &registry.url,
        &dir.join("tls.crt"),
        &dir.join("tls.key"),
        &users,
    );
    let layout = dir.join("layout");
    image_layout(&layout);
    let certs = dir.join("push-certs");
    write(certs.join("ca.crt"), ca.cert_pem());
    let out = Command::new("skopeo")
        .args(["copy", "--insecure-policy", "--dest-cert-dir"])
        .arg(&certs)
        .args(["--dest-creds", &format!("rw:{RW_PASSWORD}")])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://127.0.0.1:{}/app:v1", front.port))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (front, registry)
}

/// `ctr content fetch` of an image whose own registry is unreachable, so only the mirror
/// configured in `hosts` can serve it.
fn fetch(socket: &Path, hosts: &Path) -> std::process::Output {
    Command::new("ctr")
        .args(["--address", socket.to_str().unwrap()])
        .args(["--namespace", "registry-addon-test", "content", "fetch"])
        .arg("--hosts-dir")
        .arg(hosts)
        .arg("127.0.0.1:9/app:v1")
        .output()
        .unwrap()
}

fn side(port: u16, ca_pem: &str, password: &str) -> MirrorSide {
    MirrorSide {
        host: format!("127.0.0.1:{port}"),
        ca_pem: ca_pem.to_string(),
        ro: Credentials {
            username: "ro".into(),
            password: password.into(),
        },
        route: Some(containerd::Route::Default),
    }
}

fn secret(data: &std::collections::BTreeMap<String, String>) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| (k.clone(), json!(b64.encode(v))))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": names::NODE_CONFIG_SECRET},
        "type": "Opaque",
        "data": data,
    })
}

fn put_config(api: &ApiServer, config: &NodeConfig) {
    api.put(
        SECRETS,
        secret(&registry_addon::agent::desired::secret_data(config)),
    );
}

fn annotation(api: &ApiServer) -> Option<String> {
    api.get(NODE_PATH)?["metadata"]["annotations"][names::NODE_CONFIG_ANNOTATION]
        .as_str()
        .map(str::to_string)
}

fn condition(api: &ApiServer, type_: &str) -> Option<(String, String, String)> {
    let node = api.get(NODE_PATH)?;
    let c = node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?
        .clone();
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        c["message"].as_str().unwrap_or_default().to_string(),
    ))
}

fn mirror(api: &ApiServer) -> Option<(String, String)> {
    condition(api, names::MIRROR_READY_CONDITION).map(|(s, r, _)| (s, r))
}

fn on_disk(certs: &Path, config: &NodeConfig) -> bool {
    config.files.iter().all(|(path, content)| {
        std::fs::read_to_string(certs.join(path)).ok().as_deref() == Some(content)
    })
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The agent binary for `node-1`, its log in `dir/agent.log`, its kubeconfig `dir/kubeconfig`.
fn start_agent(dir: &Path, certs: &Path, metrics_port: u16) -> Running {
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    Running(
        Command::new(env!("CARGO_BIN_EXE_registry-addon"))
            .arg("node-agent")
            .arg("--certs-dir")
            .arg(certs)
            .args(["--node-name", NODE])
            .arg("--kubeconfig")
            .arg(dir.join("kubeconfig"))
            .args(["--probe-interval", "200ms"])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// A CA rotation in two phases with containerd pulling throughout: the nodes first trust
/// both CAs (transition), then the registry serves a certificate of the new CA, then the
/// nodes trust the new CA only (final). No pull fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_in_two_phases_fails_no_pull() {
    require_tools();
    let dir = tempfile::Builder::new()
        .prefix("ra")
        .tempdir_in("/tmp")
        .unwrap();
    let old_ca =
        CertificateAuthority::generate(KeyAlgorithm::EcdsaP256, OffsetDateTime::now_utc()).unwrap();
    let new_ca =
        CertificateAuthority::generate(KeyAlgorithm::EcdsaP256, OffsetDateTime::now_utc()).unwrap();
    let replica_dir = dir.path().join("replica");
    let (front, _registry) = start_replica(&replica_dir, &old_ca);
    let port = front.port;
    let (_containerd, socket) = start_containerd(&dir.path().join("containerd"));
    let certs = dir.path().join("certs.d");
    let certs_str = certs.to_str().unwrap().to_string();

    // Bootstrap wrote the files already (the same rendering); the agent takes them over.
    let old = side(port, old_ca.cert_pem(), RO_PASSWORD);
    let first = node_config(&certs_str, &Rollout::Final(&old));
    for (path, content) in &first.files {
        write(certs.join(path), content);
    }
    let api = ApiServer::start().await;
    api.put(
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}),
    );
    put_config(&api, &first);
    write(dir.path().join("kubeconfig"), api.kubeconfig());
    let _agent = start_agent(dir.path(), &certs, sync_support::free_port());
    within(Duration::from_secs(10), "first config acked", || {
        annotation(&api).as_deref() == Some(first.hash.as_str())
    })
    .await;

    // containerd pulls in a loop from here on.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pulls = {
        let (stop, socket, certs) = (stop.clone(), socket.clone(), certs.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = fetch(&socket, &certs);
                if out.status.success() {
                    ok += 1;
                } else {
                    failed.push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
            }
            (ok, failed)
        })
    };

    // Phase 1: both CAs trusted.
    let new = side(port, new_ca.cert_pem(), RO_PASSWORD);
    let transition = node_config(
        &certs_str,
        &Rollout::Transition {
            old: &old,
            new: &new,
        },
    );
    put_config(&api, &transition);
    within(Duration::from_secs(5), "transition acked", || {
        annotation(&api).as_deref() == Some(transition.hash.as_str())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The registry switches to a certificate of the new CA (the front reloads it).
    let subject = registry_subject_names(2, "10.96.0.20".parse().unwrap());
    let server = new_ca
        .issue_server(&subject, KeyAlgorithm::EcdsaP256, OffsetDateTime::now_utc())
        .unwrap();
    write(replica_dir.join("tls.key.new"), server.key_pem.expose());
    write(replica_dir.join("tls.crt.new"), &server.cert_pem);
    std::fs::rename(replica_dir.join("tls.key.new"), replica_dir.join("tls.key")).unwrap();
    std::fs::rename(replica_dir.join("tls.crt.new"), replica_dir.join("tls.crt")).unwrap();
    let new_only =
        registry_addon::oci::client::build_http_client(Some(new_ca.cert_pem().as_bytes())).unwrap();
    let start = Instant::now();
    while new_only
        .get(format!("https://127.0.0.1:{port}/v2/"))
        .send()
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the front did not reload its certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Phase 2: the new CA only.
    let last = node_config(&certs_str, &Rollout::Final(&new));
    put_config(&api, &last);
    within(Duration::from_secs(5), "final acked", || {
        annotation(&api).as_deref() == Some(last.hash.as_str())
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(certs.join(format!("127.0.0.1:{port}/ca.crt"))).unwrap(),
        new_ca.cert_pem()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = pulls.join().unwrap();
    println!(
        "pulls during the rotation: {ok} succeeded, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} pulls failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(ok >= 5, "only {ok} pulls ran");
    within(
        Duration::from_secs(5),
        "mirror ready after the rotation",
        || mirror(&api) == Some(("True".into(), "MirrorReachable".into())),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_agent_keeps_the_mirror_files_and_reports_health() {
    require_tools();
    let dir = tempfile::Builder::new()
        .prefix("ra")
        .tempdir_in("/tmp")
        .unwrap();
    let ca =
        CertificateAuthority::generate(KeyAlgorithm::EcdsaP256, OffsetDateTime::now_utc()).unwrap();
    let (front, _registry) = start_replica(&dir.path().join("replica"), &ca);
    let port = front.port;
    let (_containerd, socket) = start_containerd(&dir.path().join("containerd"));

    // certs.d with another registry's configuration already in it.
    let certs = dir.path().join("certs.d");
    write(
        certs.join("docker.io/hosts.toml"),
        "server = \"https://registry-1.docker.io\"\n",
    );
    let certs_str = certs.to_str().unwrap();

    let api = ApiServer::start().await;
    api.put(
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}, "status": {"conditions": []}}),
    );
    let good = node_config(
        certs_str,
        &Rollout::Final(&side(port, ca.cert_pem(), RO_PASSWORD)),
    );
    put_config(&api, &good);
    write(dir.path().join("kubeconfig"), api.kubeconfig());

    let metrics_port = sync_support::free_port();
    let agent = start_agent(dir.path(), &certs, metrics_port);
    let agent_log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();

    // Files written, the Node acked, the mirror reachable; a real fetch goes through them.
    within(Duration::from_secs(10), "first config acked", || {
        annotation(&api).as_deref() == Some(good.hash.as_str())
    })
    .await;
    assert!(on_disk(&certs, &good), "{}", agent_log());
    within(Duration::from_secs(5), "mirror ready", || {
        mirror(&api) == Some(("True".into(), "MirrorReachable".into()))
    })
    .await;
    let out = fetch(&socket, &certs);
    assert!(
        out.status.success(),
        "fetch through the agent's files failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = sync_support::http_get(metrics_port, "/metrics").unwrap_or_default();
    assert!(
        metrics.contains("registry_addon_node_agent_mirror_ready{reason=\"MirrorReachable\"} 1"),
        "{metrics}"
    );

    // Steady state: no API write over several probe intervals, the probe included.
    api.clear_log();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let writes: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.is_write())
        .take(5)
        .collect();
    assert!(
        writes.is_empty(),
        "writes in steady state: {} ({writes:?}...)",
        api.writes()
    );
    // The memory the agent itself holds; the binary's mapped code (RssFile) is shared with
    // the page cache and, in a test (debug) build, several times its release size.
    let rss = rss_kib(agent.0.id(), "RssAnon:");
    println!(
        "node agent idle memory: RssAnon {rss} KiB, VmRSS {} KiB",
        rss_kib(agent.0.id(), "VmRSS:")
    );

    // Hand-deleted and hand-edited owned files come back; the foreign file stays.
    let hosts_file = certs.join(containerd::DEFAULT_HOSTS_FILE);
    std::fs::remove_file(&hosts_file).unwrap();
    let ca_file = certs.join(format!("127.0.0.1:{port}/ca.crt"));
    std::fs::write(&ca_file, "edited by hand").unwrap();
    within(Duration::from_secs(2), "owned files repaired", || {
        on_disk(&certs, &good)
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(certs.join("docker.io/hosts.toml")).unwrap(),
        "server = \"https://registry-1.docker.io\"\n"
    );

    // A wrong password: applied within 5 s, then Unauthorized.
    let wrong_password = node_config(
        certs_str,
        &Rollout::Final(&side(port, ca.cert_pem(), "not-it")),
    );
    put_config(&api, &wrong_password);
    let latency = within(Duration::from_secs(5), "changed config acked", || {
        annotation(&api).as_deref() == Some(wrong_password.hash.as_str())
    })
    .await;
    println!("config change applied and acked in {latency:?}");
    assert!(on_disk(&certs, &wrong_password));
    within(Duration::from_secs(5), "Unauthorized", || {
        mirror(&api) == Some(("False".into(), "Unauthorized".into()))
    })
    .await;

    // A CA that did not sign the registry's certificate: CertificateUntrusted.
    let other =
        CertificateAuthority::generate(KeyAlgorithm::EcdsaP256, OffsetDateTime::now_utc()).unwrap();
    let wrong_ca = node_config(
        certs_str,
        &Rollout::Final(&side(port, other.cert_pem(), RO_PASSWORD)),
    );
    put_config(&api, &wrong_ca);
    let start = Instant::now();
    while mirror(&api) != Some(("False".into(), "CertificateUntrusted".into())) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "not CertificateUntrusted: {:?}",
            condition(&api, names::MIRROR_READY_CONDITION)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A malformed desired config: refused, files unchanged, an Event and a condition.
    put_config(&api, &good);
    within(Duration::from_secs(5), "good config back", || {
        mirror(&api) == Some(("True".into(), "MirrorReachable".into()))
    })
    .await;
    let mut broken = registry_addon::agent::desired::secret_data(&good);
    broken.insert("ca.crt".into(), "not a certificate".into());
    api.put(SECRETS, secret(&broken));
    within(Duration::from_secs(5), "refusal on the Node", || {
        condition(&api, names::NODE_CONFIG_CONDITION).is_some_and(|(s, r, m)| {
            s == "False" && r == "InvalidDesiredConfig" && m.contains("ca.crt")
        })
    })
    .await;
    assert!(on_disk(&certs, &good));
    let events = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/namespaces/registry-system/events"))
        .count();
    assert_eq!(events, 1, "{:?}", api.requests());
    assert_eq!(annotation(&api).as_deref(), Some(good.hash.as_str()));

    // The registry down: Unreachable.
    drop(front);
    within(Duration::from_secs(5), "Unreachable", || {
        mirror(&api) == Some(("False".into(), "Unreachable".into()))
    })
    .await;

    // The API server gone: the agent keeps the last applied config and still repairs it.
    drop(api);
    std::fs::write(&hosts_file, "edited while the API is down").unwrap();
    let start = Instant::now();
    while !on_disk(&certs, &good) {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "not repaired without the API: {}",
            agent_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut agent = agent;
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "agent exited: {}",
        agent_log()
    );
    assert!(
        !agent_log().contains(RO_PASSWORD),
        "the log shows a password"
    );

    // Restarted while the API server is still gone: the last applied config was recorded,
    // so the new process repairs the files before it ever reads the Secret.
    drop(agent);
    let record = certs.join(names::NODE_AGENT_APPLIED);
    let mode = std::fs::metadata(&record).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the record holds the ro header");
    std::fs::remove_file(&hosts_file).unwrap();
    let _restarted = start_agent(dir.path(), &certs, sync_support::free_port());
    let start = Instant::now();
    while !on_disk(&certs, &good) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a restarted agent without the API did not repair: {}",
            agent_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(agent_log().contains("resuming from the last applied config"));
    assert!(rss <= 16 * 1024, "idle anonymous memory {rss} KiB > 16 MiB");
}

/// The node files of each mode through the agent: Local's `_default` mirror, then Proxy's
/// upstream-host hosts.toml (the `_default` one removed), then Unmanaged's nothing (every
/// owned file removed, the foreign one left), each acked; containerd pulls the upstream
/// host's image through the mirror while a mode routes it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_files_follow_the_mode() {
    require_tools();
    let dir = tempfile::Builder::new()
        .prefix("ra")
        .tempdir_in("/tmp")
        .unwrap();
    let ca =
        CertificateAuthority::generate(KeyAlgorithm::EcdsaP256, OffsetDateTime::now_utc()).unwrap();
    let (front, _registry) = start_replica(&dir.path().join("replica"), &ca);
    let (_containerd, socket) = start_containerd(&dir.path().join("containerd"));
    let certs = dir.path().join("certs.d");
    write(
        certs.join("docker.io/hosts.toml"),
        "server = \"https://registry-1.docker.io\"\n",
    );
    let certs_str = certs.to_str().unwrap();
    let api = ApiServer::start().await;
    api.put(
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}, "status": {"conditions": []}}),
    );
    write(dir.path().join("kubeconfig"), api.kubeconfig());
    let local = side(front.port, ca.cert_pem(), RO_PASSWORD);
    // `fetch` pulls 127.0.0.1:9/app:v1: the "upstream" host of Proxy here.
    let proxy = MirrorSide {
        route: Some(containerd::Route::Host("127.0.0.1:9".into())),
        ..local.clone()
    };
    let unmanaged = MirrorSide {
        route: None,
        ..local.clone()
    };
    let metrics_port = sync_support::free_port();
    let _agent = start_agent(dir.path(), &certs, metrics_port);
    let agent_log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();

    for (mode, side, hosts_file) in [
        ("Local", &local, Some("_default/hosts.toml")),
        ("Proxy", &proxy, Some("127.0.0.1:9/hosts.toml")),
        ("Unmanaged", &unmanaged, None),
    ] {
        let config = node_config(certs_str, &Rollout::Final(side));
        put_config(&api, &config);
        within(Duration::from_secs(10), &format!("{mode} acked"), || {
            annotation(&api).as_deref() == Some(config.hash.as_str())
        })
        .await;
        assert!(on_disk(&certs, &config), "{mode}: {}", agent_log());
        let owned = |p: &str| certs.join(p).exists();
        assert_eq!(owned("_default/hosts.toml"), mode == "Local", "{mode}");
        assert_eq!(owned("127.0.0.1:9/hosts.toml"), mode == "Proxy", "{mode}");
        assert!(
            owned("docker.io/hosts.toml"),
            "{mode}: the foreign file stays"
        );
        let out = fetch(&socket, &certs);
        match hosts_file {
            Some(file) => {
                assert!(
                    out.status.success(),
                    "{mode}: fetch through {file} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                within(
                    Duration::from_secs(5),
                    &format!("{mode} mirror ready"),
                    || mirror(&api) == Some(("True".into(), "MirrorReachable".into())),
                )
                .await;
            }
            None => {
                let left: Vec<_> = std::fs::read_dir(&certs)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .filter(|n| !n.starts_with('.'))
                    .collect();
                assert_eq!(
                    left,
                    ["docker.io"],
                    "{mode}: only the foreign directory is left"
                );
                within(Duration::from_secs(5), "Unmanaged: no mirror", || {
                    mirror(&api) == Some(("False".into(), "NotConfigured".into()))
                })
                .await;
                // The image's own registry (nothing at 127.0.0.1:9) is all there is now;
                // content fetched before stays in containerd's store, so only the manifest
                // resolution is asked of the registry: it fails.
                let out = Command::new("ctr")
                    .args(["--address", socket.to_str().unwrap()])
                    .args([
                        "--namespace",
                        "registry-addon-unmanaged",
                        "content",
                        "fetch",
                    ])
                    .args(["--hosts-dir", certs_str])
                    .arg("127.0.0.1:9/app:v1")
                    .output()
                    .unwrap();
                assert!(
                    !out.status.success(),
                    "{mode}: the mirror still served the pull"
                );
            }
        }
    }
}
