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

/// The Proxy registry as the rendered StatefulSet runs it: the registry container's
/// environment with the kubelet's part done here (Secret references resolved from `secret`,
/// the mounted CA written to a file) and the pod's paths moved under `dir`.
struct ProxyRegistry {
    _child: Running,
    port: u16,
    root: PathBuf,
}

impl ProxyRegistry {
    fn start(dir: &Path, values: &RegistryValues, secret: &Value) -> ProxyRegistry {
        let objects = registry_objects(values);
        let sts = objects
            .iter()
            .find(|o| o["kind"] == "StatefulSet")
            .expect("Proxy renders the StatefulSet");
        let container = &sts["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["name"], "registry");
        let mounted_ca = dir.join("upstream/ca.crt");
        std::fs::create_dir_all(mounted_ca.parent().unwrap()).unwrap();
        std::fs::write(&mounted_ca, secret_data(secret, "ca.crt").unwrap()).unwrap();
        let root = dir.join("data");
        let log = dir.join("registry.log");
        for _try in 0..5 {
            let port = free_port();
            let mut env = BTreeMap::new();
            for var in container["env"].as_array().unwrap() {
                let name = var["name"].as_str().unwrap().to_string();
                let value = match (&var["value"], &var["valueFrom"]["secretKeyRef"]) {
                    (Value::String(v), _) => v.clone(),
                    (_, r) if r["name"] == "registry-upstream" => {
                        secret_data(secret, r["key"].as_str().unwrap()).unwrap()
                    }
                    (_, r) if r["name"] == "registry-auth" => "proxy-test-http-secret".into(),
                    other => panic!("unexpected env {name}: {other:?}"),
                };
                let value = match name.as_str() {
                    "REGISTRY_HTTP_ADDR" => format!("127.0.0.1:{port}"),
                    "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY" => {
                        // Under the volume, as in the pod.
                        let sub = value.strip_prefix("/var/lib/registry").unwrap();
                        format!("{}{sub}", root.display())
                    }
                    "SSL_CERT_FILE" => {
                        assert_eq!(value, "/etc/registry-upstream/ca.crt");
                        mounted_ca.display().to_string()
                    }
                    _ => value,
                };
                env.insert(name, value);
            }
            let config = dir.join("config.yml");
            std::fs::write(
                &config,
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: /nonexistent\nhttp:\n  addr: 127.0.0.1:1\n",
            )
            .unwrap();
            let log_file = std::fs::File::create(&log).unwrap();
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .env_clear()
                .envs(&env)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .expect("docker-registry must be installed (Debian package docker-registry)");
            let mut child = Running(child);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.0.try_wait() {
                    break;
                }
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains(&format!("listening on 127.0.0.1:{port}")) {
                    return ProxyRegistry {
                        _child: child,
                        port,
                        root,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!(
            "the Proxy registry did not start; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
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
    let proxy = ProxyRegistry::start(&dir.join("proxy"), &values, &secret);

    // The front before it, with the args the StatefulSet gives it, pull-only included.
    let objects = registry_objects(&values);
    let sts = objects.iter().find(|o| o["kind"] == "StatefulSet").unwrap();
    let front_args = &sts["spec"]["template"]["spec"]["containers"][1]["args"];
    assert!(
        front_args
            .as_array()
            .unwrap()
            .contains(&json!("--pull-only"))
    );
    let front_tls = TestTls::new(&dir.join("front-tls"));
    let front = FrontProcess::start_with(
        &dir.join("front"),
        &format!("http://127.0.0.1:{}", proxy.port),
        &front_tls.cert_file,
        &front_tls.key_file,
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
        &["--pull-only"],
    );
    let ro = client(
        &front.url,
        Some(&front_tls.ca_pem()),
        Some(Credentials {
            username: "ro".into(),
            password: RO_PASSWORD.into(),
        }),
    );

    // Cold pull: from the upstream, through the cache.
    let before = upstream_blob_gets(&upstream_log);
    let cold = pull(&ro, "team/large", "v1").await.expect("cold pull");
    assert!(cold > 8 << 20);
    pull(&ro, "library/small", "v1")
        .await
        .expect("cold pull of many layers");
    let cold_gets = upstream_blob_gets(&upstream_log) - before;
    assert!(
        cold_gets >= 2 + 13,
        "the cold pull fetched {cold_gets} blobs upstream"
    );
    assert!(
        proxy
            .root
            .join("proxy-cache/docker/registry/v2/blobs")
            .exists(),
        "the cache lies under proxy-cache, beside Local's tree"
    );

    // Distribution 2.8 stores a blob in the cache by a second download of its own, in the
    // background: wait until every blob is linked into its repository of the cache.
    let cache = proxy
        .root
        .join("proxy-cache/docker/registry/v2/repositories");
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

    // Warm pull: no blob from the upstream again.
    let before = upstream_blob_gets(&upstream_log);
    pull(&ro, "team/large", "v1").await.expect("warm pull");
    pull(&ro, "library/small", "v1").await.expect("warm pull");
    assert_eq!(
        upstream_blob_gets(&upstream_log),
        before,
        "warm pulls hit the upstream"
    );

    // Pushes are refused: Distribution's proxy mode answers UNSUPPORTED itself.
    let rw = client(
        &front.url,
        Some(&front_tls.ca_pem()),
        Some(Credentials {
            username: "rw".into(),
            password: RW_PASSWORD.into(),
        }),
    );
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
        host: format!("127.0.0.1:{}", front.port),
        ca_pem: String::from_utf8(front_tls.ca_pem()).unwrap(),
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
    // Another registry's image does not go through the mirror.
    let requests = front_requests(&front);
    let out = ctr_fetch(&socket, &hosts, "127.0.0.1:9/other:v1");
    assert!(!out.status.success());
    assert_eq!(
        front_requests(&front),
        requests,
        "another registry's image reached the mirror"
    );
    // An image never cached is not there while the upstream is down.
    assert!(pull(&ro, "team/never-pulled", "v1").await.is_err());
}

/// During a switch to Proxy its replicas must fetch the images in use from the upstream
/// before they are ready (`front --require-images`). Against an upstream with plain Basic
/// auth, Distribution 2.8's proxy never sends the credentials (only to a token realm): the
/// replica stays unready, naming the image it cannot serve, so the switch waits instead of
/// sending nodes to a mirror that cannot pull. (With a token upstream the walk of modes in
/// tests/controller_converge.rs gets its Proxy replica ready the same way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_replicas_stay_unready_when_they_cannot_fetch_the_images_in_use() {
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
    let image = Image::new("amd64", vec![random_bytes(7, 4096)], false);
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
    let secret = upstream_secret(&UpstreamSecrets {
        credentials: Some((UPSTREAM_USER.into(), UPSTREAM_PASSWORD.into())),
        ca_pem: Some(String::from_utf8(upstream_tls.ca_pem()).unwrap()),
    });
    let proxy = ProxyRegistry::start(&dir.join("proxy"), &values, &secret);
    let list = dir.join("images");
    let list_arg = list.display().to_string();
    let front_tls = TestTls::new(&dir.join("front-tls"));
    let front = FrontProcess::start_with(
        &dir.join("front"),
        &format!("http://127.0.0.1:{}", proxy.port),
        &front_tls.cert_file,
        &front_tls.key_file,
        &[FrontUser {
            name: "ro",
            password: RO_PASSWORD,
            push: false,
        }],
        &["--pull-only", "--require-images", &list_arg],
    );
    // The StatefulSet gives its front the same requirement.
    let objects = registry_objects(&values);
    let sts = objects.iter().find(|o| o["kind"] == "StatefulSet").unwrap();
    let args = &sts["spec"]["template"]["spec"]["containers"][1]["args"];
    assert!(
        args.as_array()
            .unwrap()
            .contains(&json!("--require-images"))
    );

    std::fs::write(&list, "team/app:1\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_status(front.metrics_port, "/readyz") != Some(503) {
        assert!(Instant::now() < deadline, "the front stayed ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(&front.log).unwrap();
    assert!(
        log.contains("1 of 1 images in use are missing from the registry; first: team/app:1"),
        "{log}"
    );
}
