//! Proxy mode end to end with real processes on loopback: an upstream `docker-registry`
//! behind TLS (haproxy, with the upstream's own CA) and token authentication for a user and
//! password (the tests' token front); a `docker-registry` configured from the rendered Proxy
//! StatefulSet's
//! registry container (its environment, with the Secret references resolved as the kubelet
//! would, from the `registry-upstream` Secret the converge writes); `registry-addon front`
//! before it; and containerd pulling through the Proxy-mode hosts.toml of `node_config`.
//!
//! The upstream authenticates with Bearer tokens, as Docker Hub, Harbor or GHCR do: CNCF
//! Distribution 2.8 (the default registry image) sends the proxy credentials only to a token
//! realm, never as Basic auth to the registry itself.
//!
//! Needs root (containerd), `containerd`, `ctr`, `docker-registry` and `haproxy` on PATH.

mod sync_support;

use sync_support::containerd::start_containerd;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use registry_addon::addon::modes::{UpstreamSecrets, upstream_secret};
use registry_addon::hooks::patches::containerd::{MirrorSide, Rollout, Route, node_config};
use registry_addon::oci::{Credentials, Registry, dependencies};
use registry_addon::render::objects::secret_data;
use registry_addon::render::registry::{RegistryValues, registry_objects};
use registry_addon::wire::variable::registry_from_config;
use serde_json::{Value, json};
use sha2::Digest as _;

use sync_support::*;

const UPSTREAM_USER: &str = "puller";
const UPSTREAM_PASSWORD: &str = "upstream-pass";
const RO_PASSWORD: &str = "ro-password-1234";
const RW_PASSWORD: &str = "rw-password-1234";

fn tools_present() {
    let missing: Vec<_> = ["containerd", "ctr", "docker-registry", "haproxy"]
        .into_iter()
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
        "the Proxy tests need root and containerd, ctr, docker-registry, haproxy on PATH \
         (apt-get install containerd docker-registry haproxy): missing {missing:?}, root: {root}"
    );
}

/// The chart values of a Proxy cluster whose upstream is `upstream_url`, with credentials
/// and a CA, as the hooks derive them.
fn proxy_values(upstream_url: &str) -> RegistryValues {
    #[derive(clap::Parser)]
    struct Options {
        #[command(flatten)]
        addon: registry_addon::cli::AddonOptions,
    }
    let options = <Options as clap::Parser>::parse_from(["test"]).addon;
    let config = json!({"addons": {"registry": {"mode": "Proxy", "upstream": {
        "url": upstream_url,
        "credentialsSecretRef": {"name": "upstream-creds"},
        "caSecretRef": {"name": "upstream-ca"},
    }}}});
    let registry = registry_from_config(Some(&config)).unwrap().unwrap();
    RegistryValues::new(
        &options,
        &registry,
        "10.96.0.20".parse().unwrap(),
        "h".into(),
    )
}

/// A child process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Proxy replica as the rendered StatefulSet runs it, the kubelet's part done here: the
/// front with its rendered flags (the `registry-upstream` Secret's files, the relay's port and
/// spool, the images-in-use file moved under `dir`), its postStart hook (`registry-addon
/// wait`), then the registry container's environment (Secret references resolved) under
/// `dir`.
struct ProxyPod {
    registry: Option<Running>,
    front: FrontProcess,
    registry_env: BTreeMap<String, String>,
    registry_port: u16,
    /// The relay's address.
    relay: String,
    tls: TestTls,
    dir: PathBuf,
    root: PathBuf,
    images: PathBuf,
}

impl ProxyPod {
    fn start(
        dir: &Path,
        values: &RegistryValues,
        secret: &Value,
        users: &[FrontUser<'_>],
    ) -> ProxyPod {
        let objects = registry_objects(values);
        let sts = objects
            .iter()
            .find(|o| o["kind"] == "StatefulSet")
            .expect("Proxy renders the StatefulSet");
        let containers = sts["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(containers[0]["name"], "front", "the front starts first");
        assert_eq!(containers[1]["name"], "registry");
        let (front, registry) = (&containers[0], &containers[1]);

        // The mounted Secret, the spool and the images-in-use ConfigMap.
        let upstream_dir = dir.join("upstream");
        std::fs::create_dir_all(&upstream_dir).unwrap();
        for key in ["username", "password", "ca.crt"] {
            if let Some(value) = secret_data(secret, key) {
                std::fs::write(upstream_dir.join(key), value).unwrap();
            }
        }
        let spool = dir.join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        let images = dir.join("images-in-use");
        // The replica's volume.
        let root = dir.join("data");
        let (registry_port, relay_port) = (free_port(), free_port());
        let relay = format!("127.0.0.1:{relay_port}");
        let map = |value: &str| -> String {
            if value
                == format!(
                    "http://127.0.0.1:{}",
                    registry_addon::names::REGISTRY_LOOPBACK_PORT
                )
            {
                format!("http://127.0.0.1:{registry_port}")
            } else if value == registry_addon::render::registry::proxy_relay_addr() {
                relay.clone()
            } else if let Some(rest) = value.strip_prefix("/etc/registry-upstream") {
                format!("{}{rest}", upstream_dir.display())
            } else if value == registry_addon::render::registry::RELAY_SPOOL_DIR {
                spool.display().to_string()
            } else if value.starts_with(registry_addon::names::IMAGES_IN_USE_DIR) {
                images.display().to_string()
            } else if let Some(sub) =
                value.strip_prefix(registry_addon::render::registry::REGISTRY_DATA_DIR)
            {
                format!("{}{sub}", root.display())
            } else {
                value.to_string()
            }
        };
        // The flags of the front that the test's front does not set itself.
        let args: Vec<String> = front["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let own = [
            "--listen",
            "--tls-cert-file",
            "--tls-key-file",
            "--upstream",
            "--pull-users",
            "--push-users",
            "--metrics-listen",
        ];
        let mut extra = Vec::new();
        let mut i = 1;
        while i < args.len() {
            let flag = &args[i];
            let takes_value = i + 1 < args.len() && !args[i + 1].starts_with("--");
            if !own.contains(&flag.as_str()) {
                extra.push(flag.clone());
                if takes_value {
                    extra.push(map(&args[i + 1]));
                }
            }
            i += if takes_value { 2 } else { 1 };
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let front_tls = TestTls::new(&dir.join("front-tls"));
        let front_process = FrontProcess::start_unready(
            &dir.join("front"),
            &format!("http://127.0.0.1:{registry_port}"),
            &front_tls.cert_file,
            &front_tls.key_file,
            users,
            &extra,
        );
        // The postStart hook, as rendered.
        let hook: Vec<String> = front["lifecycle"]["postStart"]["exec"]["command"]
            .as_array()
            .expect("the front holds the registry back with a postStart hook")
            .iter()
            .map(|w| map(w.as_str().unwrap()))
            .collect();
        assert_eq!(hook[0], registry_addon::render::registry::IMAGE_BINARY);
        let status = Command::new(env!("CARGO_BIN_EXE_registry-addon"))
            .args(&hook[1..])
            .status()
            .unwrap();
        assert!(status.success(), "the postStart hook failed");

        let mut registry_env = BTreeMap::new();
        for var in registry["env"].as_array().unwrap() {
            let name = var["name"].as_str().unwrap().to_string();
            let value = match (&var["value"], &var["valueFrom"]["secretKeyRef"]) {
                (Value::String(v), _) => v.clone(),
                (_, r) if r["name"] == "registry-auth" => "proxy-test-http-secret".into(),
                other => panic!("unexpected env {name}: {other:?}"),
            };
            let value = match name.as_str() {
                "REGISTRY_HTTP_ADDR" => format!("127.0.0.1:{registry_port}"),
                "REGISTRY_PROXY_REMOTEURL" => {
                    assert_eq!(
                        value,
                        format!(
                            "http://{}",
                            registry_addon::render::registry::proxy_relay_addr()
                        )
                    );
                    format!("http://{relay}")
                }
                "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY" => {
                    // Under the volume, as in the pod.
                    let sub = value.strip_prefix("/var/lib/registry").unwrap();
                    format!("{}{sub}", root.display())
                }
                _ => value,
            };
            registry_env.insert(name, value);
        }
        let mut pod = ProxyPod {
            registry: None,
            front: front_process,
            registry_env,
            registry_port,
            relay,
            tls: front_tls,
            dir: dir.to_path_buf(),
            root,
            images,
        };
        pod.start_registry();
        pod
    }

    /// Starts the registry container (again).
    fn start_registry(&mut self) {
        self.registry = None;
        let config = self.dir.join("config.yml");
        std::fs::write(
            &config,
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: /nonexistent\nhttp:\n  addr: 127.0.0.1:1\n",
        )
        .unwrap();
        let log = self.dir.join("registry.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .env_clear()
            .envs(&self.registry_env)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("docker-registry must be installed (Debian package docker-registry)");
        let mut child = Running(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        let listening = format!("listening on 127.0.0.1:{}", self.registry_port);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(&listening) {
                self.registry = Some(child);
                return;
            }
            let exited = matches!(child.0.try_wait(), Ok(Some(_)));
            assert!(
                !exited && Instant::now() < deadline,
                "the Proxy registry did not start; log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop_registry(&mut self) {
        self.registry = None;
    }

    /// A client of the replica's front as `username`.
    fn client_as(&self, username: &str, password: &str) -> std::sync::Arc<Registry> {
        client(
            &self.front.url,
            Some(&self.tls.ca_pem()),
            Some(Credentials {
                username: username.into(),
                password: password.into(),
            }),
        )
    }
}

/// One plain HTTP/1.1 request to the relay at `addr`, without a body, sent: the connection
/// to read its answer from (each read waiting at most 10 s).
fn relay_send(addr: &str, method: &str, path: &str) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: relay\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    stream
}

/// One plain HTTP/1.1 request to the relay at `addr`, without a body: the whole answer as
/// read until the relay closed the connection (or 10 s passed).
fn relay_answer(addr: &str, method: &str, path: &str) -> Vec<u8> {
    let mut stream = relay_send(addr, method, path);
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stream, &mut answer);
    answer
}

/// [`relay_answer`] as text.
fn relay_request(addr: &str, method: &str, path: &str) -> String {
    String::from_utf8_lossy(&relay_answer(addr, method, path)).into_owned()
}

/// [`relay_answer`] split: its head, lowercase, and its body (as sent: the relay's blobs have
/// a Content-Length).
fn relay_head_body(addr: &str, method: &str, path: &str) -> (String, Vec<u8>) {
    let answer = relay_answer(addr, method, path);
    let at = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer: {}", String::from_utf8_lossy(&answer)));
    let head = String::from_utf8_lossy(&answer[..at]).to_ascii_lowercase();
    (head, answer[at + 4..].to_vec())
}

/// Pulls `repo:tag` whole (manifest, config and layers, digests checked); the bytes read.
async fn pull(reg: &Registry, repo: &str, tag: &str) -> Result<u64, String> {
    let manifest = reg
        .get_manifest(repo, tag)
        .await
        .map_err(|e| format!("manifest {repo}:{tag}: {e}"))?;
    let deps = dependencies(&manifest.media_type, &manifest.bytes).map_err(|e| e.to_string())?;
    let mut bytes = manifest.bytes.len() as u64;
    for blob in deps.blobs {
        let mut download = reg
            .get_blob(repo, &blob.digest)
            .await
            .map_err(|e| format!("blob {}: {e}", blob.digest))?;
        let mut hasher = sha2::Sha256::new();
        while let Some(chunk) = download.stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            bytes += chunk.len() as u64;
            hasher.update(&chunk);
        }
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        if got != blob.digest.to_string() {
            return Err(format!("blob {}: content hashes to {got}", blob.digest));
        }
    }
    Ok(bytes)
}

/// Blob GETs the upstream answered so far (its access log).
fn upstream_blob_gets(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
        .count()
}

fn ctr_fetch(socket: &Path, hosts: &Path, image: &str) -> std::process::Output {
    Command::new("ctr")
        .args(["--address", socket.to_str().unwrap()])
        .args([
            "--namespace",
            "registry-addon-proxy-test",
            "content",
            "fetch",
        ])
        .args(["--hosts-dir", hosts.to_str().unwrap()])
        .arg(image)
        .output()
        .unwrap()
}

fn front_requests(front: &FrontProcess) -> u64 {
    front
        .metrics()
        .lines()
        .filter(|l| l.starts_with("registry_addon_front_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_mode_end_to_end() {
    tools_present();
    let dir = tempfile::Builder::new()
        .prefix("rp")
        .tempdir_in("/tmp")
        .unwrap();
    let keep = std::env::var_os("PROXY_TEST_KEEP").is_some();
    let dir = if keep {
        dir.keep()
    } else {
        dir.path().to_path_buf()
    };
    let dir = dir.as_path();

    // The upstream: a registry behind token authentication, behind TLS with its own CA.
    let mut registry = RegistryProcess::start(
        &dir.join("upstream"),
        &RegistryOptions {
            access_log: true,
            ..RegistryOptions::default()
        },
    );
    let push_client = client(&registry.url, None, None);
    let large = Image::new("amd64", vec![random_bytes(1, 8 << 20)], false);
    let small = Image::new(
        "amd64",
        (0..12).map(|i| random_bytes(100 + i, 4096)).collect(),
        true,
    );
    large.push(&push_client, "team/large", "v1").await;
    small.push(&push_client, "library/small", "v1").await;
    let tokens = sync_support::front::Front::start(
        &registry.url,
        sync_support::front::FrontOptions {
            bearer: Some((UPSTREAM_USER.into(), UPSTREAM_PASSWORD.into())),
            ..Default::default()
        },
    )
    .await;
    let upstream_tls = TestTls::new(&dir.join("upstream-tls"));
    let mut upstream = TlsHaproxy::start(&dir.join("haproxy"), &upstream_tls, &tokens.url);
    let upstream_log = registry.log.clone();

    // The mirror, exactly as rendered, and the Secret the converge copies.
    let upstream_host = format!("127.0.0.1:{}", upstream.port);
    // The upstream refuses anonymous pulls.
    let anonymous = client(
        &format!("https://{upstream_host}"),
        Some(&upstream_tls.ca_pem()),
        None,
    );
    assert!(pull(&anonymous, "team/large", "v1").await.is_err());
    let values = proxy_values(&format!("https://{upstream_host}/team"));
    assert_eq!(values.upstream.url, format!("https://{upstream_host}"));
    let secret = upstream_secret(&UpstreamSecrets {
        credentials: Some((UPSTREAM_USER.into(), UPSTREAM_PASSWORD.into())),
        ca_pem: Some(String::from_utf8(upstream_tls.ca_pem()).unwrap()),
    });
    let mut pod = ProxyPod::start(
        &dir.join("proxy"),
        &values,
        &secret,
        &[
            FrontUser {
                name: "ro",
                password: RO_PASSWORD,
                push: false,
            },
            FrontUser {
                name: "rw",
                password: RW_PASSWORD,
                push: true,
            },
        ],
    );
    pod.front.wait_readyz(200);
    let ro = pod.client_as("ro", RO_PASSWORD);

    // The relay pulls and nothing else, and answers the cache's check of the upstream itself.
    let relay_port: u16 = pod.relay.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(http_status(relay_port, "/v2/"), Some(200));
    let answer = relay_request(&pod.relay, "POST", "/v2/team/large/blobs/uploads/");
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");

    // Cold pull: from the upstream, through the cache.
    let before = upstream_blob_gets(&upstream_log);
    let cold = pull(&ro, "team/large", "v1").await.expect("cold pull");
    assert!(cold > 8 << 20);
    pull(&ro, "library/small", "v1")
        .await
        .expect("cold pull of many layers");
    assert!(
        pod.root
            .join("proxy-cache/docker/registry/v2/blobs")
            .exists(),
        "the cache lies under proxy-cache, beside Local's tree"
    );

    // Distribution 2.8 stores a blob in the cache by a second download of its own, in the
    // background: wait until every blob is linked into its repository of the cache.
    let cache = pod.root.join("proxy-cache/docker/registry/v2/repositories");
    let linked = |repo: &str, image: &Image| {
        std::iter::once(&image.config)
            .chain(&image.layers)
            .all(|blob| {
                let hex = sha256(blob);
                let hex = hex.trim_start_matches("sha256:");
                cache
                    .join(repo)
                    .join("_layers/sha256")
                    .join(hex)
                    .join("link")
                    .exists()
            })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(linked("team/large", &large) && linked("library/small", &small)) {
        assert!(
            Instant::now() < deadline,
            "the cache did not store the pulled blobs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Distribution 2.8 asks for every cold blob twice (once to answer, once to store it, each a
    // HEAD then a GET); the front's relay downloads it once from the upstream, from the first
    // HEAD on, and serves both GETs from that download.
    let cold_gets = upstream_blob_gets(&upstream_log) - before;
    assert_eq!(
        cold_gets,
        2 + 13,
        "the cold pulls fetched {cold_gets} blobs upstream, not each of the 15 once"
    );
    assert_eq!(
        pod.front
            .counter("registry_addon_front_relay_blob_downloads_total"),
        15
    );
    assert_eq!(
        pod.front
            .counter("registry_addon_front_relay_blob_shared_total"),
        30
    );
    // A HEAD of a blob just downloaded (answered from the download) gives its size.
    let layer = sha256(&large.layers[0]);
    let answer = relay_request(&pod.relay, "HEAD", &format!("/v2/team/large/blobs/{layer}"));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains(&format!("content-length: {}\r\n", 8 << 20)),
        "{answer}"
    );

    // Warm pull: no blob from the upstream again, and every blob read by the front from the
    // cache's storage (--blob-store, as rendered), none before.
    let from_store = || {
        pod.front
            .counter("registry_addon_front_blobs_from_store_total")
    };
    // Cold blobs: each read by the front from the relay's download of it (the cache storing
    // it from that same download, as the wait above shows), none from the store.
    assert_eq!(from_store(), 0, "no cold blob comes from the store");
    assert_eq!(
        pod.front
            .counter("registry_addon_front_blobs_from_relay_total"),
        2 + 13
    );
    let before = upstream_blob_gets(&upstream_log);
    pull(&ro, "team/large", "v1").await.expect("warm pull");
    pull(&ro, "library/small", "v1").await.expect("warm pull");
    assert_eq!(
        upstream_blob_gets(&upstream_log),
        before,
        "warm pulls hit the upstream"
    );
    assert_eq!(from_store(), 2 + 13);

    // A blob the upstream does not have: the client's 404 is the cache's, and the upstream is
    // asked once (the cache, asking right after the client, gets the relay's same answer).
    let missing = format!("sha256:{}", "e".repeat(64));
    let asked = || {
        std::fs::read_to_string(&upstream_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&missing) && l.contains(" HTTP/1.1\" "))
            .count()
    };
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pod.tls.ca_pem()).unwrap())
        .build()
        .unwrap();
    let answer = http
        .get(format!("{}/v2/team/large/blobs/{missing}", pod.front.url))
        .basic_auth("ro", Some(RO_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 404);
    let body = answer.text().await.unwrap();
    assert!(body.contains("BLOB_UNKNOWN"), "{body}");
    assert_eq!(
        asked(),
        1,
        "the upstream was asked for the missing blob more than once"
    );

    // Pushes are refused: Distribution's proxy mode answers UNSUPPORTED itself.
    let rw = pod.client_as("rw", RW_PASSWORD);
    let pushed = rw
        .start_upload("team/large", None)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    // Refused by the front (as rendered, `--pull-only`), before Distribution sees it.
    assert!(
        pushed.contains("pull-through cache") && pushed.contains("405"),
        "a push was not refused by the front: {pushed:?}"
    );

    // The node: only the upstream host's images through the mirror.
    let hosts = dir.join("certs.d");
    let side = MirrorSide {
        host: format!("127.0.0.1:{}", pod.front.port),
        ca_pem: String::from_utf8(pod.tls.ca_pem()).unwrap(),
        ro: registry_addon::addon::users::Credentials {
            username: "ro".into(),
            password: RO_PASSWORD.into(),
        },
        route: Route::of(
            &registry_from_config(Some(&json!({"addons": {"registry": {
                "mode": "Proxy", "upstream": {"url": format!("https://{upstream_host}")},
            }}})))
            .unwrap()
            .unwrap(),
        ),
    };
    let config = node_config(hosts.to_str().unwrap(), &Rollout::Final(&side));
    assert!(
        config
            .files
            .contains_key(&format!("{upstream_host}/hosts.toml"))
    );
    assert!(!config.files.contains_key("_default/hosts.toml"));
    for (path, content) in &config.files {
        let path = hosts.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    let (_containerd, socket) = start_containerd(&dir.join("containerd"));

    // The upstream stopped: the cached images are still served, to clients and to containerd.
    upstream.stop();
    registry.stop();
    pull(&ro, "team/large", "v1")
        .await
        .expect("cached image with the upstream down");
    let out = ctr_fetch(
        &socket,
        &hosts,
        &format!("{upstream_host}/library/small:v1"),
    );
    assert!(
        out.status.success(),
        "containerd could not pull through the Proxy mirror: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A replica restarted while the upstream is down starts (the relay answers its check of
    // the upstream) and serves its cache.
    pod.stop_registry();
    pod.start_registry();
    pod.front.wait_readyz(200);
    pull(&ro, "library/small", "v1")
        .await
        .expect("cached image from a registry restarted with the upstream down");
    // Another registry's image does not go through the mirror.
    let requests = front_requests(&pod.front);
    let out = ctr_fetch(&socket, &hosts, "127.0.0.1:9/other:v1");
    assert!(!out.status.success());
    assert_eq!(
        front_requests(&pod.front),
        requests,
        "another registry's image reached the mirror"
    );
    // An image never cached is not there while the upstream is down.
    assert!(pull(&ro, "team/never-pulled", "v1").await.is_err());
}

/// During a switch to Proxy its replicas must fetch the images in use from the upstream
/// before they are ready (`front --require-images`). Here the upstream has plain Basic auth,
/// to which Distribution 2.8's own proxy never sends credentials (only to a token realm): the
/// front's relay answers the challenge, so the replica fetches the images and gets ready. With
/// refused credentials it stays unready, naming the image it cannot serve, so the switch waits
/// instead of sending nodes to a mirror that cannot pull.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_replicas_get_ready_once_they_fetch_the_images_in_use_from_a_basic_auth_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let upstream_tls = TestTls::new(&dir.join("upstream-tls"));
    let htpasswd = dir.join("htpasswd");
    write_htpasswd(&htpasswd, UPSTREAM_USER, UPSTREAM_PASSWORD);
    let upstream = RegistryProcess::start(
        &dir.join("upstream"),
        &RegistryOptions {
            tls: Some(&upstream_tls),
            htpasswd: Some(&htpasswd),
            ..RegistryOptions::default()
        },
    );
    let image = Image::new("amd64", vec![random_bytes(7, 300 << 10)], false);
    image
        .push(
            &client(
                &upstream.url,
                Some(&upstream_tls.ca_pem()),
                Some(Credentials {
                    username: UPSTREAM_USER.into(),
                    password: UPSTREAM_PASSWORD.into(),
                }),
            ),
            "team/app",
            "1",
        )
        .await;
    let values = proxy_values(&upstream.url);
    let users = [FrontUser {
        name: "ro",
        password: RO_PASSWORD,
        push: false,
    }];
    let pod_with = |name: &str, password: &str| {
        let secret = upstream_secret(&UpstreamSecrets {
            credentials: Some((UPSTREAM_USER.into(), password.into())),
            ca_pem: Some(String::from_utf8(upstream_tls.ca_pem()).unwrap()),
        });
        ProxyPod::start(&dir.join(name), &values, &secret, &users)
    };

    // Refused credentials: unready, the image named.
    let refused = pod_with("refused", "not-the-password");
    std::fs::write(&refused.images, "team/app:1\n").unwrap();
    refused.front.wait_readyz(503);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&refused.front.log).unwrap();
        if log.contains("1 of 1 images in use are missing from the registry; first: team/app:1")
            && log.contains("refused the mirror's credentials")
        {
            assert!(
                !log.contains("not-the-password"),
                "the password was logged: {log}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The right ones: unready while an image in use is missing upstream, ready once the list
    // holds only what the upstream has.
    let pod = pod_with("proxy", UPSTREAM_PASSWORD);
    std::fs::write(&pod.images, "team/app:1\nteam/gone:1\n").unwrap();
    pod.front.wait_readyz(503);
    std::fs::write(&pod.images, "team/app:1\n").unwrap();
    pod.front.wait_readyz(200);
    let ro = pod.client_as("ro", RO_PASSWORD);
    pull(&ro, "team/app", "1")
        .await
        .expect("a pull through the cache of a Basic-auth upstream");
}

/// The relay adds the upstream's credentials and authenticates nobody: the front refuses to
/// serve it anywhere but on a loopback address.
#[test]
fn the_relay_listens_on_the_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let tls = TestTls::new(&dir.path().join("tls"));
    let users = dir.path().join("pull.htpasswd");
    write_htpasswd(&users, "ro", RO_PASSWORD);
    let out = Command::new(env!("CARGO_BIN_EXE_registry-addon"))
        .arg("front")
        .arg("--pull-users")
        .arg(&users)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--tls-cert-file")
        .arg(&tls.cert_file)
        .arg("--tls-key-file")
        .arg(&tls.key_file)
        .args([
            "--remote",
            "https://upstream.example",
            "--relay-listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--relay-listen 0.0.0.0:0: must be a loopback address"),
        "{stderr}"
    );
}

/// A front with its relay whose upstream is the Python HTTP server `script` (run with its
/// port, then `args`) behind TLS: what keeps them running, and the relay's address.
fn relay_before_python(
    dir: &Path,
    script: &str,
    args: &[&str],
) -> (Running, TlsHaproxy, FrontProcess, String) {
    let port = free_port();
    let server = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(port.to_string())
        .args(args)
        .spawn()
        .unwrap();
    let server = Running(server);
    let upstream_tls = TestTls::new(&dir.join("upstream-tls"));
    let upstream = TlsHaproxy::start(
        &dir.join("haproxy"),
        &upstream_tls,
        &format!("http://127.0.0.1:{port}"),
    );
    let relay = format!("127.0.0.1:{}", free_port());
    let spool = dir.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let front_tls = TestTls::new(&dir.join("front-tls"));
    let front = FrontProcess::start_unready(
        &dir.join("front"),
        "http://127.0.0.1:9",
        &front_tls.cert_file,
        &front_tls.key_file,
        &[FrontUser {
            name: "ro",
            password: RO_PASSWORD,
            push: false,
        }],
        &[
            "--remote",
            &format!("https://127.0.0.1:{}", upstream.port),
            "--remote-ca",
            upstream_tls.ca_file.to_str().unwrap(),
            "--relay-listen",
            &relay,
            "--relay-spool",
            spool.to_str().unwrap(),
        ],
    );
    (server, upstream, front, relay)
}

/// A Python HTTP/1.1 server for [`relay_before_python`] answering every GET 200 with the bytes
/// of the expression `body` (over `self`), sent by the statements `send` (eight spaces in;
/// `body` is bound).
fn python_blob_server(body: &str, send: &str) -> String {
    format!(
        r#"
import http.server, os, sys, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = {body}
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
{send}
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#
    )
}

/// A request keeping up with a download gets the blob's bytes as they arrive, not once a
/// spool write is full or the blob is whole: the upstream sends 60 000 of its 100 000 bytes
/// and waits; the reader has those meanwhile, then the rest, the whole blob checked.
#[test]
fn the_relay_gives_out_a_blobs_bytes_as_they_arrive() {
    tools_present();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let release = dir.join("release");
    let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&content)));
    let (_server, _upstream, _front, relay) = relay_before_python(
        dir,
        &python_blob_server(
            "bytes(i % 251 for i in range(100000))",
            "        self.wfile.write(body[:60000])
        self.wfile.flush()
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.01)
        self.wfile.write(body[60000:])",
        ),
        &[release.to_str().unwrap()],
    );
    let mut stream = relay_send(&relay, "GET", &format!("/v2/team/app/blobs/{digest}"));
    let mut answer = Vec::new();
    let mut buf = vec![0; 65536];
    let body_start = loop {
        let n = std::io::Read::read(&mut stream, &mut buf)
            .expect("the relay gave out nothing of what had arrived within 10 s");
        assert!(n > 0, "the relay closed the connection: {answer:?}");
        answer.extend_from_slice(&buf[..n]);
        if let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let body = &answer[at + 4..];
            // Chunked or not, the first 60 000 bytes are there once the answer holds them.
            if body.len() >= 60_000 {
                break at + 4;
            }
        }
    };
    let head = String::from_utf8_lossy(&answer[..body_start]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-length: 100000"), "{head}");
    assert_eq!(&answer[body_start..], &content[..answer.len() - body_start]);
    std::fs::write(&release, b"").unwrap();
    let _ = std::io::Read::read_to_end(&mut stream, &mut answer);
    assert!(
        answer[body_start..] == content[..],
        "the blob as given out differs: {} bytes",
        answer.len() - body_start
    );
}

/// A forgotten download's spool file is kept and written over by the next download, which
/// gives out its own bytes only: a failed 3 MiB download leaves its file kept; a 1.5 MiB blob
/// then spooled into it comes out whole and exact, to a request keeping up and to one
/// reading the spool after the download finished.
#[test]
fn the_relay_writes_a_later_blob_over_a_kept_spool_file() {
    tools_present();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let content: Vec<u8> = (0..1_572_864u32).map(|i| (i * 7 % 253) as u8).collect();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&content)));
    let (_server, _upstream, front, relay) = relay_before_python(
        dir,
        &python_blob_server(
            r#"bytes(i * 7 % 253 for i in range(1572864)) if self.path.endswith(sys.argv[2]) else b"x" * (3 << 20)"#,
            "        self.wfile.write(body)",
        ),
        &[&digest],
    );
    let wrong = format!("sha256:{}", "cd".repeat(32));
    let answer = relay_request(&relay, "GET", &format!("/v2/team/app/blobs/{wrong}"));
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    // The failed download is forgotten at once; its file is kept once its reader is done.
    let deadline = Instant::now() + Duration::from_secs(10);
    while front.counter("registry_addon_front_relay_spools_idle") != 1 {
        assert!(
            Instant::now() < deadline,
            "no spool file was kept:\n{}",
            front.metrics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for reader in ["keeping up", "after the download"] {
        let (head, body) = relay_head_body(&relay, "GET", &format!("/v2/team/app/blobs/{digest}"));
        assert!(head.starts_with("http/1.1 200"), "{reader}: {head}");
        assert!(head.contains("content-length: 1572864"), "{reader}: {head}");
        assert!(
            body == content,
            "{reader}: the blob as given out differs: {} bytes",
            body.len()
        );
    }
    assert_eq!(
        front.counter("registry_addon_front_relay_spools_reused_total"),
        1
    );
    assert_eq!(front.counter("registry_addon_front_relay_spools_idle"), 0);
    // Both requests shared one download.
    assert_eq!(
        front.counter("registry_addon_front_relay_blob_downloads_total"),
        2
    );
}

/// A blob whose content does not match its digest is never given out whole: the relay's
/// reader gets fewer bytes than announced (the connection cut before the last), and the next
/// request downloads anew instead of sharing the failed download.
#[test]
fn the_relay_never_completes_a_blob_that_fails_its_digest() {
    tools_present();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // An upstream answering every blob with the same wrong bytes.
    let (_server, _upstream, front, relay) = relay_before_python(
        dir,
        r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Length", "9")
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            self.wfile.write(b"corrupted")
    def do_GET(self):
        self.answer(True)
    def do_HEAD(self):
        self.answer(False)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#,
        &[],
    );
    let digest = format!("sha256:{}", "ab".repeat(32));
    let get = || relay_request(&relay, "GET", &format!("/v2/team/app/blobs/{digest}"));
    for round in 1..=2 {
        let answer = get();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            head.to_ascii_lowercase().contains("content-length: 9"),
            "{head}"
        );
        assert!(
            body.len() < 9,
            "round {round}: the wrong blob was given out whole: {body:?}"
        );
        assert_eq!(
            front.counter("registry_addon_front_relay_blob_downloads_total"),
            round,
            "a failed download was shared"
        );
    }
    let log = std::fs::read_to_string(&front.log).unwrap();
    assert!(log.contains("hashes to sha256:"), "{log}");
}

/// A download whose spool cannot be written ends there, its readers never given a whole blob
/// that was not checked, and the requests after it are sent to the upstream unshared and
/// answered whole: the spool directory is gone here, so its first write finds no file.
#[test]
fn the_relay_fetches_unshared_once_its_spool_cannot_be_written() {
    tools_present();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&content)));
    let (_server, _upstream, front, relay) = relay_before_python(
        dir,
        &python_blob_server(
            "bytes(i % 241 for i in range(300000))",
            "        self.wfile.write(body)",
        ),
        &[],
    );
    std::fs::remove_dir_all(dir.join("spool")).unwrap();
    let path = format!("/v2/team/app/blobs/{digest}");
    let (head, body) = relay_head_body(&relay, "GET", &path);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        body.len() < content.len(),
        "a download that could not be spooled was given out whole"
    );
    for attempt in 0..2 {
        let (head, body) = relay_head_body(&relay, "GET", &path);
        assert!(head.starts_with("http/1.1 200"), "{attempt}: {head}");
        assert!(body == content, "{attempt}: {} bytes", body.len());
    }
    // Only the first was a shared download.
    assert_eq!(
        front.counter("registry_addon_front_relay_blob_downloads_total"),
        1
    );
    assert_eq!(front.counter("registry_addon_front_relay_spools_idle"), 0);
}
