//! Real registries for the sync tests: CNCF Distribution (`docker-registry`) processes on
//! loopback, a throw-away CA, and images built and pushed by the tests.

#![allow(dead_code)]

pub mod containerd;
pub mod front;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use registry_addon::oci::{
    ClientOptions, Credentials, Manifest, Registry, UploadStart, build_http_clients, dependencies,
    is_index,
};
use sha2::Digest as _;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Deterministic incompressible bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A CA and a server certificate for 127.0.0.1 and localhost, as PEM files.
pub struct TestTls {
    pub dir: PathBuf,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// A directory holding only `ca.crt`, for skopeo's `--dest-cert-dir`.
    pub cert_dir: PathBuf,
}

impl TestTls {
    pub fn new(dir: &Path) -> TestTls {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        std::fs::create_dir_all(dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "sync test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "registry");
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        let ca_file = dir.join("ca.pem");
        let cert_file = dir.join("tls.crt");
        let key_file = dir.join("tls.key");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let cert_dir = dir.join("certs.d");
        std::fs::create_dir_all(&cert_dir).unwrap();
        std::fs::write(cert_dir.join("ca.crt"), ca.pem()).unwrap();
        TestTls {
            dir: dir.to_path_buf(),
            ca_file,
            cert_file,
            key_file,
            cert_dir,
        }
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.ca_file).unwrap()
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Default)]
pub struct RegistryOptions<'a> {
    pub tls: Option<&'a TestTls>,
    /// An htpasswd file: Basic auth.
    pub htpasswd: Option<&'a Path>,
    /// Write the access log to `registry.log` (for counting requests).
    pub access_log: bool,
    /// Upload URLs relative to the request (`http.relativeurls`), as behind the front.
    pub relative_urls: bool,
    /// Push notifications: (endpoint URL, bearer token), configured exactly as the chart
    /// does, through `REGISTRY_NOTIFICATIONS_ENDPOINTS`.
    pub notify: Option<(&'a str, &'a str)>,
    /// The `auth:` section's content as YAML indented by two spaces (e.g. token auth);
    /// instead of `htpasswd`.
    pub auth_yaml: Option<&'a str>,
}

/// A `docker-registry` process, killed when dropped.
pub struct RegistryProcess {
    child: Child,
    config: PathBuf,
    env: Vec<(String, String)>,
    pub url: String,
    pub port: u16,
    pub root: PathBuf,
    pub log: PathBuf,
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RegistryProcess {
    /// Starts a registry storing under `dir` and waits until it answers.
    pub fn start(dir: &Path, options: &RegistryOptions<'_>) -> RegistryProcess {
        std::fs::create_dir_all(dir).unwrap();
        let root = dir.join("storage");
        let log = dir.join("registry.log");
        for _try in 0..5 {
            let port = free_port();
            let mut config = format!(
                "version: 0.1\n\
                 log:\n  level: info\n  accesslog:\n    disabled: {}\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: sync-test-secret\n  relativeurls: {}\n",
                !options.access_log,
                root.display(),
                options.relative_urls
            );
            if let Some(tls) = options.tls {
                config.push_str(&format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    tls.cert_file.display(),
                    tls.key_file.display()
                ));
            }
            let mut env = Vec::new();
            if let Some((url, token)) = options.notify {
                // The kubelet expands the token; the sidecar's address differs here.
                let endpoints = registry_addon::render::registry::notification_endpoints()
                    .replace("$(REGISTRY_NOTIFY_TOKEN)", token)
                    .replace(
                        &format!(
                            "http://{}/events",
                            registry_addon::render::registry::SYNC_NOTIFY_ADDR
                        ),
                        url,
                    );
                assert!(endpoints.contains(url) && endpoints.contains(token));
                env.push(("REGISTRY_NOTIFICATIONS_ENDPOINTS".to_string(), endpoints));
            }
            if let Some(htpasswd) = options.htpasswd {
                config.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: sync-test\n    path: {}\n",
                    htpasswd.display()
                ));
            }
            if let Some(auth) = options.auth_yaml {
                config.push_str("auth:\n");
                config.push_str(auth);
            }
            let config_file = dir.join("config.yml");
            std::fs::write(&config_file, config).unwrap();
            let child = spawn_registry(&config_file, &log, &env);
            let scheme = if options.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let mut process = RegistryProcess {
                child,
                config: config_file.clone(),
                env,
                url: format!("{scheme}://127.0.0.1:{port}"),
                port,
                root: root.clone(),
                log: log.clone(),
            };
            if process.wait_ready() {
                return process;
            }
        }
        panic!(
            "docker-registry did not start; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the registry (a replica going down); its storage stays.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the registry again, same port and storage, and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn_registry(&self.config, &self.log, &self.env);
        assert!(
            self.wait_ready(),
            "docker-registry did not start again on port {}; log:\n{}",
            self.port,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Waits for this process to listen. Its own log says so: a connection alone could reach
    /// another test's registry that took the port first.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false; // e.g. the port was taken meanwhile
            }
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains(&format!("listening on 127.0.0.1:{}", self.port)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

fn spawn_registry(config_file: &Path, log: &Path, env: &[(String, String)]) -> Child {
    let log_file = std::fs::File::create(log).unwrap();
    Command::new("/usr/bin/docker-registry")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("serve")
        .arg(config_file)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("docker-registry must be installed (Debian package docker-registry)")
}

/// An htpasswd file with one bcrypt entry (distribution takes no other hash; cost 5, as the
/// registry checks it on every request), made with
/// `htpasswd` (Debian apache2-utils) or, without it, Python's `crypt` over the system's
/// libcrypt.
pub fn write_htpasswd(path: &Path, user: &str, password: &str) {
    let line = match Command::new("htpasswd")
        .args(["-nbB", user, password])
        .output()
    {
        Ok(out) => {
            assert!(out.status.success(), "htpasswd failed");
            String::from_utf8(out.stdout).unwrap()
        }
        Err(_) => {
            let out = Command::new("python3")
                .args([
                    "-W",
                    "ignore",
                    "-c",
                    "import crypt, sys; print(sys.argv[1] + ':' + crypt.crypt(sys.argv[2], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=32)))",
                    user,
                    password,
                ])
                .output()
                .expect("htpasswd (Debian apache2-utils) or python3 is needed for bcrypt");
            assert!(
                out.status.success(),
                "python3 crypt failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    };
    assert!(line.contains(":$2"), "not a bcrypt entry: {line}");
    std::fs::write(path, line).unwrap();
}

/// A client to push test content and inspect registries.
pub fn client(url: &str, ca: Option<&[u8]>, creds: Option<Credentials>) -> Arc<Registry> {
    let http = build_http_clients(ca).unwrap();
    let options = ClientOptions {
        credentials: creds,
        attempts: 1,
        ..ClientOptions::default()
    };
    Arc::new(Registry::new(url, http, &options).unwrap())
}

pub async fn push_blob(reg: &Registry, repo: &str, data: &[u8]) -> String {
    let digest = sha256(data);
    let parsed = digest.parse().unwrap();
    if reg.blob_exists(repo, &parsed).await.unwrap() {
        return digest;
    }
    match reg.start_upload(repo, None).await.unwrap() {
        UploadStart::Session(url) => reg
            .upload_monolithic(
                repo,
                url,
                &parsed,
                Some(data.len() as u64),
                reqwest::Body::from(data.to_vec()),
            )
            .await
            .unwrap(),
        UploadStart::Mounted => {}
    }
    digest
}

pub async fn push_manifest(
    reg: &Registry,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> String {
    let digest = sha256(body);
    let manifest = Manifest {
        media_type: media_type.to_string(),
        digest: digest.parse().unwrap(),
        bytes: bytes::Bytes::copy_from_slice(body),
    };
    reg.put_manifest(repo, reference, &manifest).await.unwrap();
    digest
}

/// A descriptor as JSON.
pub fn descriptor(media_type: &str, data: &[u8]) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": sha256(data), "size": data.len()})
}

/// An image: config and layers, as a manifest body (OCI or Docker types).
pub struct Image {
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
    pub docker: bool,
}

impl Image {
    pub fn new(arch: &str, layers: Vec<Vec<u8>>, docker: bool) -> Image {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch, "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {}
        }))
        .unwrap();
        Image {
            config,
            layers,
            docker,
        }
    }

    pub fn media_type(&self) -> &'static str {
        if self.docker {
            DOCKER_MANIFEST
        } else {
            OCI_MANIFEST
        }
    }

    pub fn manifest(&self) -> Vec<u8> {
        let (config_type, layer_type) = if self.docker {
            (DOCKER_CONFIG, DOCKER_LAYER)
        } else {
            (OCI_CONFIG, OCI_LAYER)
        };
        let layers: Vec<_> = self
            .layers
            .iter()
            .map(|l| descriptor(layer_type, l))
            .collect();
        serde_json::to_vec_pretty(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": self.media_type(),
            "config": descriptor(config_type, &self.config),
            "layers": layers,
        }))
        .unwrap()
    }

    /// Pushes blobs, then the manifest under `reference`; returns the manifest digest.
    pub async fn push(&self, reg: &Registry, repo: &str, reference: &str) -> String {
        push_blob(reg, repo, &self.config).await;
        for layer in &self.layers {
            push_blob(reg, repo, layer).await;
        }
        push_manifest(reg, repo, reference, self.media_type(), &self.manifest()).await
    }
}

/// An index (or Docker manifest list) body over platform images.
pub fn index_body(images: &[(&str, &Image)], docker: bool) -> Vec<u8> {
    let manifests: Vec<_> = images
        .iter()
        .map(|(arch, img)| {
            let mut d = descriptor(img.media_type(), &img.manifest());
            d["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
            d
        })
        .collect();
    serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": if docker { DOCKER_LIST } else { OCI_INDEX },
        "manifests": manifests,
    }))
    .unwrap()
}

/// Pushes a multi-platform image: each platform by digest, then the index under `tag`.
pub async fn push_index(
    reg: &Registry,
    repo: &str,
    tag: &str,
    images: &[(&str, &Image)],
    docker: bool,
) -> String {
    for (_, img) in images {
        let digest = sha256(&img.manifest());
        img.push(reg, repo, &digest).await;
    }
    let body = index_body(images, docker);
    push_manifest(
        reg,
        repo,
        tag,
        if docker { DOCKER_LIST } else { OCI_INDEX },
        &body,
    )
    .await
}

/// Writes an OCI image layout holding a multi-platform index tagged `tag`.
pub fn write_oci_layout(dir: &Path, tag: &str, images: &[(&str, &Image)]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let d = sha256(data);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), data).unwrap();
    };
    for (_, img) in images {
        put(&img.config);
        for l in &img.layers {
            put(l);
        }
        put(&img.manifest());
    }
    let index = index_body(images, false);
    put(&index);
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut top = descriptor(OCI_INDEX, &index);
    top["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let layout_index = serde_json::json!({"schemaVersion": 2, "manifests": [top]});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&layout_index).unwrap(),
    )
    .unwrap();
}

/// Copies `oci:<layout>:<tag>` into the registry with skopeo, all platforms, digests kept.
pub fn skopeo_push(
    layout: &Path,
    tag: &str,
    registry: &RegistryProcess,
    repo: &str,
    tls: Option<&TestTls>,
) {
    let dest = format!("docker://127.0.0.1:{}/{repo}:{tag}", registry.port);
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "--insecure-policy",
        "copy",
        "--all",
        "--preserve-digests",
        "-q",
    ]);
    match tls {
        Some(tls) => {
            cmd.arg("--dest-cert-dir").arg(&tls.cert_dir);
        }
        None => {
            cmd.arg("--dest-tls-verify=false");
        }
    }
    cmd.arg(format!("oci:{}:{tag}", layout.display()))
        .arg(&dest);
    let out = cmd
        .output()
        .expect("skopeo must be installed (Debian package skopeo)");
    assert!(
        out.status.success(),
        "skopeo copy to {dest} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every (repository, tag) → manifest digest of a registry.
pub async fn tag_digests(reg: &Registry) -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    for repo in reg.catalog().await.unwrap() {
        for tag in reg.tags(&repo).await.unwrap() {
            let head = reg.head_manifest(&repo, &tag).await.unwrap().unwrap();
            out.insert((repo.clone(), tag), head.digest.unwrap().to_string());
        }
    }
    out
}

/// Checks that every tagged manifest of a registry can be pulled completely: its bytes
/// match their digest, and every child manifest and blob can be fetched and matches its
/// digest. Returns the number of manifests checked.
pub async fn assert_pullable(reg: &Registry) -> usize {
    use futures::StreamExt;
    let mut checked = 0;
    for repo in reg.catalog().await.unwrap() {
        let mut pending: Vec<String> = Vec::new();
        for tag in reg.tags(&repo).await.unwrap() {
            // A tag listed while the registry is still writing it (a PUT whose client was
            // killed) is not found yet: absent, not dangling.
            if reg.head_manifest(&repo, &tag).await.unwrap().is_some() {
                pending.push(tag);
            }
        }
        let mut seen = std::collections::HashSet::new();
        while let Some(reference) = pending.pop() {
            let manifest = reg
                .get_manifest(&repo, &reference)
                .await
                .unwrap_or_else(|e| panic!("dangling: {repo}:{reference}: {e}"));
            if !seen.insert(manifest.digest.to_string()) {
                continue;
            }
            checked += 1;
            let deps = dependencies(&manifest.media_type, &manifest.bytes).unwrap();
            assert!(
                !is_index(&manifest.media_type) || !deps.manifests.is_empty(),
                "{repo}:{reference}: empty index"
            );
            for child in deps.manifests {
                pending.push(child.digest.to_string());
            }
            for blob in deps.blobs {
                let mut dl = reg.get_blob(&repo, &blob.digest).await.unwrap_or_else(|e| {
                    panic!("dangling: {repo}:{reference} needs {}: {e}", blob.digest)
                });
                let mut h = sha2::Sha256::new();
                while let Some(chunk) = dl.stream.next().await {
                    h.update(chunk.unwrap());
                }
                assert_eq!(
                    format!("sha256:{}", hex::encode(h.finalize())),
                    blob.digest.to_string(),
                    "{repo}:{reference}: blob content"
                );
            }
        }
    }
    checked
}

/// `registry-addon front`, the binary, before a plain-HTTP registry, as in a registry pod.
pub struct FrontProcess {
    child: Child,
    pub port: u16,
    pub url: String,
    pub metrics_port: u16,
    pub log: PathBuf,
}

impl Drop for FrontProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A user of a front: name, password, and whether it may push.
pub struct FrontUser<'a> {
    pub name: &'a str,
    pub password: &'a str,
    pub push: bool,
}

impl FrontProcess {
    /// Starts a front serving `cert_file`/`key_file`, with `users`, before `upstream` (an
    /// `http://` registry URL), and waits until it is ready (the registry answers through it).
    pub fn start(
        dir: &Path,
        upstream: &str,
        cert_file: &Path,
        key_file: &Path,
        users: &[FrontUser<'_>],
    ) -> FrontProcess {
        Self::start_with(dir, upstream, cert_file, key_file, users, &[])
    }

    /// [`FrontProcess::start`] with more arguments (e.g. `--pull-only`).
    pub fn start_with(
        dir: &Path,
        upstream: &str,
        cert_file: &Path,
        key_file: &Path,
        users: &[FrontUser<'_>],
        extra: &[&str],
    ) -> FrontProcess {
        Self::launch(dir, upstream, cert_file, key_file, users, extra, true)
    }

    /// As [`FrontProcess::start_with`], but returns once the front listens, ready or not (the
    /// registry behind it may start after it).
    pub fn start_unready(
        dir: &Path,
        upstream: &str,
        cert_file: &Path,
        key_file: &Path,
        users: &[FrontUser<'_>],
        extra: &[&str],
    ) -> FrontProcess {
        Self::launch(dir, upstream, cert_file, key_file, users, extra, false)
    }

    fn launch(
        dir: &Path,
        upstream: &str,
        cert_file: &Path,
        key_file: &Path,
        users: &[FrontUser<'_>],
        extra: &[&str],
        ready: bool,
    ) -> FrontProcess {
        std::fs::create_dir_all(dir).unwrap();
        let (mut pull, mut push) = (String::new(), String::new());
        for user in users {
            let line = registry_addon::addon::users::htpasswd_line(
                &registry_addon::addon::users::Credentials {
                    username: user.name.into(),
                    password: user.password.into(),
                },
            )
            .unwrap();
            let file = if user.push { &mut push } else { &mut pull };
            file.push_str(&line);
            file.push('\n');
        }
        std::fs::write(dir.join("pull.htpasswd"), pull).unwrap();
        std::fs::write(dir.join("push.htpasswd"), push).unwrap();
        let log = dir.join("front.log");
        for _try in 0..5 {
            let (port, metrics_port) = (free_port(), free_port());
            let log_file = std::fs::File::create(&log).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_registry-addon"))
                .arg("front")
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
                .arg("--tls-cert-file")
                .arg(cert_file)
                .arg("--tls-key-file")
                .arg(key_file)
                .args(["--upstream", upstream])
                .arg("--pull-users")
                .arg(dir.join("pull.htpasswd"))
                .arg("--push-users")
                .arg(dir.join("push.htpasswd"))
                .args(["--reload-interval", "200ms"])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .unwrap();
            let mut front = FrontProcess {
                child,
                port,
                url: format!("https://127.0.0.1:{port}"),
                metrics_port,
                log: log.clone(),
            };
            if front.wait_started(ready) {
                return front;
            }
        }
        panic!(
            "registry-addon front did not start; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Whether the front came up listening within 15 s, and ready too if `ready`.
    fn wait_started(&mut self, ready: bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains(&format!("127.0.0.1:{}", self.port))
                && (!ready || http_status(self.metrics_port, "/readyz") == Some(200))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits up to 15 s for `/readyz` to answer `status`.
    pub fn wait_readyz(&self, status: u16) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while http_status(self.metrics_port, "/readyz") != Some(status) {
            assert!(
                Instant::now() < deadline,
                "the front's /readyz did not answer {status}; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A counter of the front's metrics (the sum over its labels).
    pub fn counter(&self, name: &str) -> u64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The front's Prometheus metrics.
    pub fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics").unwrap_or_default()
    }
}

/// A registry replica as the chart runs it: Distribution on the loopback (plain HTTP, upload
/// URLs relative to the request), `registry-addon front` before it with TLS and the users.
pub struct Replica {
    pub front: FrontProcess,
    pub registry: RegistryProcess,
}

impl Replica {
    /// Starts both under `dir`; `access_log` makes the registry log every request it gets
    /// from the front (`registry.log`).
    pub fn start(dir: &Path, tls: &TestTls, users: &[FrontUser<'_>], access_log: bool) -> Replica {
        let registry = RegistryProcess::start(
            &dir.join("registry"),
            &RegistryOptions {
                relative_urls: true,
                access_log,
                ..RegistryOptions::default()
            },
        );
        let front = FrontProcess::start(
            &dir.join("front"),
            &registry.url,
            &tls.cert_file,
            &tls.key_file,
            users,
        );
        Replica { front, registry }
    }
}

/// Status of a plain-HTTP GET on 127.0.0.1:`port`.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let text = http_raw(port, path)?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// Body of a plain-HTTP GET on 127.0.0.1:`port`.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let text = http_raw(port, path)?;
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

fn http_raw(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// haproxy terminating TLS (the certificate of `tls`) before `backend` (`http://host:port`).
pub struct TlsHaproxy {
    child: Option<Child>,
    pub port: u16,
}

impl Drop for TlsHaproxy {
    fn drop(&mut self) {
        self.stop();
    }
}

impl TlsHaproxy {
    pub fn start(dir: &Path, tls: &TestTls, backend: &str) -> TlsHaproxy {
        std::fs::create_dir_all(dir).unwrap();
        let pem = dir.join("server.pem");
        let mut combined = std::fs::read(&tls.cert_file).unwrap();
        combined.extend(std::fs::read(&tls.key_file).unwrap());
        std::fs::write(&pem, combined).unwrap();
        let backend = backend.trim_start_matches("http://");
        for _try in 0..5 {
            let port = free_port();
            let config = format!(
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                 frontend tls\n  bind 127.0.0.1:{port} ssl crt {}\n  default_backend plain\n\
                 backend plain\n  server upstream {backend}\n",
                pem.display()
            );
            let file = dir.join("haproxy.cfg");
            std::fs::write(&file, config).unwrap();
            let log = std::fs::File::create(dir.join("haproxy.log")).unwrap();
            let mut child = Command::new("haproxy")
                .args(["-db", "-f"])
                .arg(&file)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("haproxy must be installed (Debian package haproxy)");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return TlsHaproxy {
                        child: Some(child),
                        port,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "haproxy did not start: {}",
            std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default()
        );
    }

    /// Stops it: the upstream becomes unreachable.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
