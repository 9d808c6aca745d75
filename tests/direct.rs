//! `registry-addon front --remote` (Direct mode) before real `docker-registry` upstreams over
//! TLS: one with htpasswd (Basic), one with token authentication answered by a token server
//! in this test that signs ES256 JWTs the registry verifies; nginx as an upstream redirecting
//! blobs to storage elsewhere; a real containerd pulling through. And `--pull-only` (Proxy
//! mode).
//!
//! Needs `docker-registry`, `skopeo`, `nginx`, `containerd` and `ctr` on PATH (`.ci/run`
//! installs them), and root for containerd.

mod sync_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sync_support::*;

const RO: (&str, &str) = ("ro", "ro-password-0123456789abcdefghijklmnop");
const RW: (&str, &str) = ("rw", "rw-password-0123456789abcdefghijklmnop");
/// The mirror's account at the upstream.
const UPSTREAM_USER: (&str, &str) = ("mirror", "upstream-secret-Zq8v2kLw");
const WRONG_PASSWORD: &str = "wrong-secret-Xy7Pq3Rt";

fn need(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is needed (apt-get install {package}); .ci/run installs it"
    );
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A `kubernetes.io/basic-auth` Secret as mounted: files `username` and `password`.
fn credentials_dir(dir: &Path, user: &str, password: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("username"), user).unwrap();
    std::fs::write(dir.join("password"), password).unwrap();
    dir.to_path_buf()
}

/// `registry-addon front` started with `args` after the usual ones, its working directory
/// `cwd`, its log in `dir`.
struct Front {
    child: Child,
    port: u16,
    metrics_port: u16,
    log: PathBuf,
}

impl Drop for Front {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Front {
    fn start(dir: &Path, tls: &TestTls, cwd: &Path, args: &[String]) -> Front {
        Front::start_with_env(dir, tls, cwd, args, &[])
    }

    /// [`Front::start`] with more environment variables.
    fn start_with_env(
        dir: &Path,
        tls: &TestTls,
        cwd: &Path,
        args: &[String],
        env: &[(&str, &Path)],
    ) -> Front {
        std::fs::create_dir_all(dir).unwrap();
        let line = |(name, password): (&str, &str)| {
            registry_addon::addon::users::htpasswd_line(
                &registry_addon::addon::users::Credentials {
                    username: name.into(),
                    password: password.into(),
                },
            )
            .unwrap()
                + "\n"
        };
        std::fs::write(dir.join("pull.htpasswd"), line(RO)).unwrap();
        std::fs::write(dir.join("push.htpasswd"), line(RW)).unwrap();
        let log = dir.join("front.log");
        for _try in 0..5 {
            let (port, metrics_port) = (free_port(), free_port());
            let log_file = std::fs::File::create(&log).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_registry-addon"))
                .current_dir(cwd)
                .arg("front")
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
                .arg("--tls-cert-file")
                .arg(&tls.cert_file)
                .arg("--tls-key-file")
                .arg(&tls.key_file)
                .arg("--pull-users")
                .arg(dir.join("pull.htpasswd"))
                .arg("--push-users")
                .arg(dir.join("push.htpasswd"))
                .args(["--reload-interval", "200ms"])
                .args(args)
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .unwrap();
            let mut front = Front {
                child,
                port,
                metrics_port,
                log: log.clone(),
            };
            if front.wait_serving() {
                return front;
            }
        }
        panic!(
            "registry-addon front did not start; log:\n{}",
            front_log(&log)
        );
    }

    fn wait_serving(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if front_log(&self.log).contains("registry front serving")
                && http_status(self.metrics_port, "/healthz") == Some(200)
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits until /readyz says `want`; false on timeout.
    fn wait_ready(&self, want: bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if (http_status(self.metrics_port, "/readyz") == Some(200)) == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics").unwrap_or_default()
    }

    fn log(&self) -> String {
        front_log(&self.log)
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }
}

/// A TLS upstream with htpasswd (`UPSTREAM_USER`), a client pushing to it, and the front's TLS.
struct BasicUpstream {
    upstream_tls: TestTls,
    front_tls: TestTls,
    upstream: RegistryProcess,
    seed: Arc<registry_addon::oci::client::Registry>,
}

impl BasicUpstream {
    fn start(dir: &Path) -> BasicUpstream {
        let upstream_tls = TestTls::new(&dir.join("upstream-tls"));
        let front_tls = TestTls::new(&dir.join("front-tls"));
        let htpasswd = dir.join("upstream.htpasswd");
        write_htpasswd(&htpasswd, UPSTREAM_USER.0, UPSTREAM_USER.1);
        let upstream = RegistryProcess::start(
            &dir.join("upstream"),
            &RegistryOptions {
                tls: Some(&upstream_tls),
                htpasswd: Some(&htpasswd),
                ..RegistryOptions::default()
            },
        );
        let seed = client(
            &upstream.url,
            Some(&upstream_tls.ca_pem()),
            Some(registry_addon::oci::Credentials {
                username: UPSTREAM_USER.0.into(),
                password: UPSTREAM_USER.1.into(),
            }),
        );
        BasicUpstream {
            upstream_tls,
            front_tls,
            upstream,
            seed,
        }
    }
}

/// The front's Direct flags: `--remote url`, its CA, and its credentials directory.
fn remote_args(url: &str, ca: &Path, credentials: &Path) -> Vec<String> {
    vec![
        "--remote".into(),
        url.into(),
        "--remote-ca".into(),
        ca.display().to_string(),
        "--remote-credentials".into(),
        credentials.display().to_string(),
    ]
}

fn front_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The value of a metric sample (`name{labels}`) in Prometheus text, 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A client trusting `tls`'s CA.
fn http(tls: &TestTls) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&tls.ca_pem()).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A three-layer image.
fn image(seed: u64) -> Image {
    let layers = (0..3)
        .map(|i| random_bytes(seed * 10 + i, 100_000 + (i as usize) * 150_000))
        .collect();
    Image::new("amd64", layers, false)
}

/// `skopeo copy docker://<front>/<reference> dir:<out>` as `ro`; the output on failure.
async fn skopeo_pull(tls: &TestTls, port: u16, reference: &str, out: &Path) -> Result<(), String> {
    let output = tokio::process::Command::new("skopeo")
        .args(["--insecure-policy", "copy", "-q", "--retry-times", "0"])
        .arg("--src-cert-dir")
        .arg(&tls.cert_dir)
        .arg("--src-creds")
        .arg(format!("{}:{}", RO.0, RO.1))
        .arg(format!("docker://127.0.0.1:{port}/{reference}"))
        .arg(format!("dir:{}", out.display()))
        .output()
        .await
        .expect("skopeo (Debian package skopeo)");
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Checks that `dir` (skopeo's `dir:` output) holds exactly `image`.
fn assert_pulled(dir: &Path, image: &Image) {
    assert_eq!(
        std::fs::read(dir.join("manifest.json")).unwrap(),
        image.manifest()
    );
    for blob in image.layers.iter().chain([&image.config]) {
        let file = dir.join(sha256(blob).trim_start_matches("sha256:"));
        assert_eq!(&std::fs::read(&file).unwrap(), blob, "{}", file.display());
    }
}

/// Every file under `dir`, for "nothing written" checks.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    out
}

async fn assert_push_refused(front: &Front, tls: &TestTls, message: &str) {
    let http = http(tls);
    for (method, path) in [
        (reqwest::Method::POST, "/v2/library/app/blobs/uploads/"),
        (reqwest::Method::PUT, "/v2/library/app/manifests/v9"),
        (reqwest::Method::DELETE, "/v2/library/app/manifests/v1"),
    ] {
        let resp = http
            .request(method.clone(), front.url(path))
            .header(header::AUTHORIZATION, basic(RW.0, RW.1))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 405, "{method} {path}");
        let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"errors": [{"code": "UNSUPPORTED", "message": message}]}),
            "{method} {path}"
        );
    }
}

/// Basic upstream: pulls through the front with the path prefix and `?ns=`, headers passed
/// through, anonymous refused, pushes refused, and nothing written anywhere by the front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_pulls_from_a_basic_upstream_and_stores_nothing() {
    need("docker-registry", "docker-registry");
    need("skopeo", "skopeo");
    let tmp = tempfile::tempdir().unwrap();
    let BasicUpstream {
        upstream_tls,
        front_tls,
        upstream,
        seed,
    } = BasicUpstream::start(tmp.path());
    let app = image(1);
    let digest = app.push(&seed, "mirror/library/app", "v1").await;

    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let creds = credentials_dir(&tmp.path().join("creds"), UPSTREAM_USER.0, UPSTREAM_USER.1);
    let front = Front::start(
        &tmp.path().join("front"),
        &front_tls,
        &cwd,
        &remote_args(
            &format!("{}/mirror", upstream.url),
            &upstream_tls.ca_file,
            &creds,
        ),
    );
    assert!(front.wait_ready(true), "not ready; log:\n{}", front.log());

    // skopeo pulls manifest and blobs; mirror repository library/app is mirror/library/app.
    let out = tmp.path().join("pulled");
    skopeo_pull(&front_tls, front.port, "library/app:v1", &out)
        .await
        .unwrap_or_else(|e| panic!("pull through the front: {e}\nlog:\n{}", front.log()));
    assert_pulled(&out, &app);

    // What containerd sends: `?ns=` (the image's registry, the upstream's host for a node
    // routing it here), HEAD then GET; the upstream's headers come through.
    let http = http(&front_tls);
    let upstream_host = upstream
        .url
        .trim_start_matches("https://")
        .replace(':', "%3A");
    let other = http
        .head(front.url("/v2/library/app/manifests/v1?ns=registry.example.com"))
        .header(header::AUTHORIZATION, basic(RO.0, RO.1))
        .send()
        .await
        .unwrap();
    assert_eq!(
        other.status().as_u16(),
        404,
        "another registry's image is never the upstream's of the same name"
    );
    let path = format!("/v2/library/app/manifests/v1?ns={upstream_host}");
    let path = path.as_str();
    let head = http
        .head(front.url(path))
        .header(header::AUTHORIZATION, basic(RO.0, RO.1))
        .header(header::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(head.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(head.headers()[header::CONTENT_TYPE], OCI_MANIFEST);
    assert_eq!(
        head.headers()[header::CONTENT_LENGTH],
        app.manifest().len().to_string().as_str()
    );
    let layer = &app.layers[2];
    let blob = http
        .get(front.url(&format!("/v2/library/app/blobs/{}", sha256(layer))))
        .header(header::AUTHORIZATION, basic(RO.0, RO.1))
        .send()
        .await
        .unwrap();
    assert_eq!(blob.status().as_u16(), 200);
    assert_eq!(
        blob.headers()[header::CONTENT_LENGTH],
        layer.len().to_string().as_str()
    );
    assert_eq!(&blob.bytes().await.unwrap()[..], &layer[..]);
    // A repository outside the prefix is not reachable: `..` is refused, not normalized.
    let escape = http
        .get(front.url("/v2/library/%2e%2e/app/manifests/v1"))
        .header(header::AUTHORIZATION, basic(RO.0, RO.1))
        .send()
        .await
        .unwrap();
    assert_eq!(escape.status().as_u16(), 404);

    // The front's own users are still required.
    let anonymous = http.get(front.url(path)).send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    let wrong = http
        .get(front.url(path))
        .header(header::AUTHORIZATION, basic(RO.0, "nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);

    // Pushes are refused whoever asks, with the OCI error naming the upstream.
    let host = upstream.url.trim_start_matches("https://");
    assert_push_refused(
        &front,
        &front_tls,
        &format!("this mirror forwards to {host}; pushes are refused"),
    )
    .await;
    let pushed = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "-q", "--retry-times", "0"])
        .arg("--dest-cert-dir")
        .arg(&front_tls.cert_dir)
        .arg("--dest-creds")
        .arg(format!("{}:{}", RW.0, RW.1))
        .arg(format!("dir:{}", out.display()))
        .arg(format!(
            "docker://127.0.0.1:{}/library/other:v1",
            front.port
        ))
        .output()
        .unwrap();
    assert!(!pushed.status.success(), "a push through Direct succeeded");

    // Stored nothing: its working directory is still empty; nothing new in the upstream's
    // repository either (the refused push reached nobody).
    assert!(files_under(&cwd).is_empty(), "{:?}", files_under(&cwd));
    assert!(
        !upstream
            .root
            .join("docker/registry/v2/repositories/mirror/library/other")
            .exists()
    );
    let log = front.log();
    assert!(
        !log.contains(UPSTREAM_USER.1),
        "upstream password in the log"
    );
    assert!(
        sample(
            &front.metrics(),
            "registry_addon_front_remote_errors_total{reason=\"credentials_refused\"}"
        ) == 0.0
    );
}

/// Wrong upstream credentials get a clear, quick error naming the upstream's refusal, in the
/// answer, the metrics and the log, never the password; new credentials are picked up
/// without a restart. An upstream whose CA is not the one given is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_refusals_are_clear_and_credentials_reload() {
    need("docker-registry", "docker-registry");
    let tmp = tempfile::tempdir().unwrap();
    let BasicUpstream {
        upstream_tls,
        front_tls,
        upstream,
        seed,
    } = BasicUpstream::start(tmp.path());
    let app = image(2);
    app.push(&seed, "library/app", "v1").await;
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let http = http(&front_tls);
    let manifest = "/v2/library/app/manifests/v1";

    let creds = credentials_dir(&tmp.path().join("creds"), UPSTREAM_USER.0, WRONG_PASSWORD);
    let front = Front::start(
        &tmp.path().join("front"),
        &front_tls,
        &cwd,
        &remote_args(&upstream.url, &upstream_tls.ca_file, &creds),
    );
    // /v2/ answers 401 to anyone: the upstream is up, the front is ready.
    assert!(front.wait_ready(true), "not ready; log:\n{}", front.log());
    let started = Instant::now();
    let resp = http
        .get(front.url(manifest))
        .header(header::AUTHORIZATION, basic(RO.0, RO.1))
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(resp.status().as_u16(), 502);
    let body = resp.text().await.unwrap();
    let host = upstream.url.trim_start_matches("https://");
    assert!(
        body.contains(&format!("remote registry {host}"))
            && body.contains("refused the mirror's credentials"),
        "{body}"
    );
    let metrics = front.metrics();
    assert!(
        sample(
            &metrics,
            "registry_addon_front_remote_errors_total{reason=\"credentials_refused\"}"
        ) >= 1.0,
        "{metrics}"
    );
    let log = front.log();
    assert!(log.contains("refused the mirror's credentials"), "{log}");
    for secret in [WRONG_PASSWORD, UPSTREAM_USER.1, RO.1] {
        assert!(!log.contains(secret) && !body.contains(secret) && !metrics.contains(secret));
    }

    // The Secret is updated: the next pulls work, no restart.
    std::fs::write(creds.join("password"), UPSTREAM_USER.1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = http
            .get(front.url(manifest))
            .header(header::AUTHORIZATION, basic(RO.0, RO.1))
            .header(header::ACCEPT, OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        if resp.status().as_u16() == 200 {
            assert_eq!(&resp.bytes().await.unwrap()[..], &app.manifest()[..]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new credentials not used: {}",
            resp.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(front);

    // The upstream's certificate is not signed by the given CA: refused, never skipped.
    let untrusting = Front::start(
        &tmp.path().join("front-untrusting"),
        &front_tls,
        &cwd,
        &remote_args(&upstream.url, &front_tls.ca_file, &creds),
    );
    assert!(untrusting.wait_ready(false));
    let resp = http
        .get(untrusting.url(manifest))
        .header(header::AUTHORIZATION, basic(RO.0, RO.1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 502);
    let body = resp.text().await.unwrap();
    assert!(body.contains("certificate"), "{body}");
    assert!(
        sample(
            &untrusting.metrics(),
            "registry_addon_front_remote_errors_total{reason=\"tls\"}"
        ) >= 1.0,
        "{}",
        untrusting.metrics()
    );
    assert_eq!(http_status(untrusting.metrics_port, "/readyz"), Some(503));

    // Bad flags are refused at start, naming the flag.
    for (args, expected) in [
        (vec!["--remote", "http://127.0.0.1:1"], "--remote"),
        (
            vec![
                "--remote",
                "https://127.0.0.1:1",
                "--remote-ca",
                "/nonexistent/ca.pem",
            ],
            "--remote-ca",
        ),
        (
            vec![
                "--remote",
                "https://127.0.0.1:1",
                "--remote-credentials",
                "/nonexistent",
            ],
            "--remote-credentials",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_registry-addon"))
            .current_dir(&cwd)
            .arg("front")
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .arg("--tls-cert-file")
            .arg(&front_tls.cert_file)
            .arg("--tls-key-file")
            .arg(&front_tls.key_file)
            .arg("--pull-users")
            .arg(tmp.path().join("front/pull.htpasswd"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    assert!(files_under(&cwd).is_empty(), "{:?}", files_under(&cwd));
}

/// A token server as Docker's: Basic credentials in, ES256 JWTs out, with the requested
/// access; the registry verifies them against the certificate in `x5c`. Counts tokens issued
/// per scope.
struct TokenServer {
    realm: String,
    issued: Arc<Mutex<HashMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct TokenState {
    key: rcgen::KeyPair,
    cert_der: Vec<u8>,
    issued: Arc<Mutex<HashMap<String, u64>>>,
}

const TOKEN_SERVICE: &str = "direct-test-registry";
const TOKEN_ISSUER: &str = "direct-test-issuer";

impl TokenServer {
    /// Starts the server; writes the signing certificate to `bundle` for the registry.
    async fn start(bundle: &Path) -> TokenServer {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "token signer");
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(bundle, cert.pem()).unwrap();
        let issued = Arc::new(Mutex::new(HashMap::new()));
        let state = Arc::new(TokenState {
            key,
            cert_der: cert.der().to_vec(),
            issued: issued.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/token", axum::routing::get(issue_token))
            .with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TokenServer {
            realm,
            issued,
            task,
        }
    }

    fn issued(&self) -> HashMap<String, u64> {
        self.issued.lock().unwrap().clone()
    }

    fn auth_yaml(&self, bundle: &Path) -> String {
        format!(
            "  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            self.realm,
            bundle.display()
        )
    }
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// An ASN.1 ECDSA signature (what rcgen signs) as JWS wants it: r and s, 32 bytes each.
fn jws_signature(der: &[u8]) -> Vec<u8> {
    let mut i = if der[1] & 0x80 != 0 {
        2 + (der[1] & 0x7f) as usize
    } else {
        2
    };
    let mut out = Vec::new();
    for _ in 0..2 {
        assert_eq!(der[i], 0x02, "not an ASN.1 INTEGER");
        let len = der[i + 1] as usize;
        let value = &der[i + 2..i + 2 + len];
        let value = &value[value.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0, 32 - value.len()));
        out.extend_from_slice(value);
        i += 2 + len;
    }
    out
}

async fn issue_token(State(s): State<Arc<TokenState>>, req: Request) -> Response {
    use rcgen::SigningKey;
    let expected = basic(UPSTREAM_USER.0, UPSTREAM_USER.1);
    if req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(expected.as_str())
    {
        return (StatusCode::UNAUTHORIZED, "bad credentials").into_response();
    }
    let url = reqwest::Url::parse(&format!("http://token{}", req.uri())).unwrap();
    let mut access = Vec::new();
    let mut scopes = Vec::new();
    for (k, v) in url.query_pairs() {
        if k == "service" && v != TOKEN_SERVICE {
            return (StatusCode::BAD_REQUEST, "wrong service").into_response();
        }
        if k == "scope" {
            scopes.push(v.to_string());
            let (kind, rest) = v.split_once(':').unwrap();
            let (name, actions) = rest.rsplit_once(':').unwrap();
            access.push(serde_json::json!({
                "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()
            }));
        }
    }
    {
        let mut issued = s.issued.lock().unwrap();
        *issued.entry(scopes.join(" ")).or_default() += 1;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({
        "typ": "JWT", "alg": "ES256",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(&s.cert_der)],
    });
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": UPSTREAM_USER.0, "aud": TOKEN_SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", scopes.len()),
        "access": access,
    });
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature = jws_signature(&s.key.sign(input.as_bytes()).unwrap());
    let token = format!("{input}.{}", b64url(&signature));
    axum::Json(serde_json::json!({"token": token, "expires_in": 300})).into_response()
}

/// Token upstream: pulls work, and across many requests, concurrent ones included, the front
/// fetches one token per scope. Wrong credentials at the token service are named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_pulls_through_token_auth_with_one_token_per_scope() {
    need("docker-registry", "docker-registry");
    need("skopeo", "skopeo");
    let tmp = tempfile::tempdir().unwrap();
    let upstream_tls = TestTls::new(&tmp.path().join("upstream-tls"));
    let front_tls = TestTls::new(&tmp.path().join("front-tls"));
    let bundle = tmp.path().join("token-signer.pem");
    let tokens = TokenServer::start(&bundle).await;
    let auth = tokens.auth_yaml(&bundle);
    let upstream = RegistryProcess::start(
        &tmp.path().join("upstream"),
        &RegistryOptions {
            tls: Some(&upstream_tls),
            auth_yaml: Some(&auth),
            ..RegistryOptions::default()
        },
    );
    let seed = client(
        &upstream.url,
        Some(&upstream_tls.ca_pem()),
        Some(registry_addon::oci::Credentials {
            username: UPSTREAM_USER.0.into(),
            password: UPSTREAM_USER.1.into(),
        }),
    );
    let (one, two) = (image(3), image(4));
    one.push(&seed, "team/one", "v1").await;
    two.push(&seed, "team/two", "v1").await;
    assert!(
        !tokens.issued().is_empty(),
        "the upstream did not ask for tokens"
    );
    tokens.issued.lock().unwrap().clear();

    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let creds = credentials_dir(&tmp.path().join("creds"), UPSTREAM_USER.0, UPSTREAM_USER.1);
    let front = Front::start(
        &tmp.path().join("front"),
        &front_tls,
        &cwd,
        &remote_args(&upstream.url, &upstream_tls.ca_file, &creds),
    );
    assert!(front.wait_ready(true), "not ready; log:\n{}", front.log());

    // Many concurrent first requests for one scope: one token fetch. `/v2/` first, so the
    // front knows the token service and has checked the `ro` password (bcrypt would
    // otherwise space the requests out).
    let http = http(&front_tls);
    let ping = http
        .get(front.url("/v2/"))
        .header(header::AUTHORIZATION, basic(RO.0, RO.1))
        .send()
        .await
        .unwrap();
    assert_eq!(ping.status().as_u16(), 200);
    let requests = (0..16).map(|i| {
        let http = http.clone();
        let url = if i % 2 == 0 {
            front.url("/v2/team/one/manifests/v1")
        } else {
            front.url(&format!(
                "/v2/team/one/blobs/{}",
                sha256(&one.layers[i % 3])
            ))
        };
        async move {
            http.get(url)
                .header(header::AUTHORIZATION, basic(RO.0, RO.1))
                .header(header::ACCEPT, OCI_MANIFEST)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let statuses = futures::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{statuses:?}; log:\n{}",
        front.log()
    );

    for round in 0..3 {
        for (repo, img) in [("team/one", &one), ("team/two", &two)] {
            let out = tmp
                .path()
                .join(format!("pulled-{round}-{}", repo.replace('/', "-")));
            skopeo_pull(&front_tls, front.port, &format!("{repo}:v1"), &out)
                .await
                .unwrap_or_else(|e| {
                    panic!("pull {repo} through the front: {e}\nlog:\n{}", front.log())
                });
            assert_pulled(&out, img);
        }
    }
    let issued = tokens.issued();
    for scope in ["repository:team/one:pull", "repository:team/two:pull"] {
        assert_eq!(issued.get(scope), Some(&1), "{issued:?}");
    }
    assert!(issued.values().all(|n| *n == 1), "{issued:?}");
    let metrics = front.metrics();
    assert_eq!(
        sample(&metrics, "registry_addon_front_remote_token_fetches_total"),
        issued.values().sum::<u64>() as f64,
        "{metrics}"
    );
    assert!(files_under(&cwd).is_empty(), "{:?}", files_under(&cwd));
    drop(front);

    // Wrong password: the token service refuses, and the client is told so at once.
    let wrong = credentials_dir(
        &tmp.path().join("wrong-creds"),
        UPSTREAM_USER.0,
        WRONG_PASSWORD,
    );
    let front = Front::start(
        &tmp.path().join("front-wrong"),
        &front_tls,
        &cwd,
        &remote_args(&upstream.url, &upstream_tls.ca_file, &wrong),
    );
    let resp = http
        .get(front.url("/v2/team/one/manifests/v1"))
        .header(header::AUTHORIZATION, basic(RO.0, RO.1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 502);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("token service") && body.contains("HTTP 401"),
        "{body}"
    );
    let metrics = front.metrics();
    assert!(
        sample(
            &metrics,
            "registry_addon_front_remote_errors_total{reason=\"credentials_refused\"}"
        ) >= 1.0,
        "{metrics}"
    );
    assert!(!front.log().contains(WRONG_PASSWORD) && !body.contains(WRONG_PASSWORD));
}

/// `--pull-only` (Proxy mode): pulls go to the registry behind, every write gets 405.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_only_front_refuses_pushes() {
    need("docker-registry", "docker-registry");
    let tmp = tempfile::tempdir().unwrap();
    let front_tls = TestTls::new(&tmp.path().join("front-tls"));
    let registry = RegistryProcess::start(
        &tmp.path().join("registry"),
        &RegistryOptions {
            relative_urls: true,
            ..RegistryOptions::default()
        },
    );
    let app = image(5);
    app.push(&client(&registry.url, None, None), "library/app", "v1")
        .await;
    let front = Front::start(
        &tmp.path().join("front"),
        &front_tls,
        tmp.path(),
        &[
            "--upstream".into(),
            registry.url.clone(),
            "--pull-only".into(),
        ],
    );
    assert!(front.wait_ready(true), "not ready; log:\n{}", front.log());
    let http = http(&front_tls);
    let resp = http
        .get(front.url("/v2/library/app/manifests/v1"))
        .header(header::AUTHORIZATION, basic(RO.0, RO.1))
        .header(header::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(&resp.bytes().await.unwrap()[..], &app.manifest()[..]);
    assert_push_refused(
        &front,
        &front_tls,
        "this mirror is a pull-through cache; pushes are refused",
    )
    .await;
    let anonymous = http
        .post(front.url("/v2/library/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    assert!(
        !registry
            .root
            .join("docker/registry/v2/repositories/library/app/_uploads")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "an upload session reached the registry"
    );
}

/// nginx before the upstream as an object-storage-backed registry looks: blob requests get a
/// 307 to another host (`localhost` instead of `127.0.0.1`), whose "storage" refuses any
/// request carrying credentials.
struct RedirectingUpstream {
    child: Child,
    url: String,
    storage_log: PathBuf,
}

impl Drop for RedirectingUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RedirectingUpstream {
    /// The registry's API with `tls`; its storage with `storage_tls`.
    fn start(
        dir: &Path,
        tls: &TestTls,
        storage_tls: &TestTls,
        registry: &RegistryProcess,
    ) -> RedirectingUpstream {
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let storage_log = dir.join("storage.log");
        for _try in 0..5 {
            let (front_port, storage_port) = (free_port(), free_port());
            let d = dir.display();
            let (cert, key) = (tls.cert_file.display(), tls.key_file.display());
            let (storage_cert, storage_key) = (
                storage_tls.cert_file.display(),
                storage_tls.key_file.display(),
            );
            let storage_auth = basic(UPSTREAM_USER.0, UPSTREAM_USER.1);
            let config = format!(
                "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{}}\nhttp {{\n  access_log {d}/access.log;\n\
                 client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;\n\
                 uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n\
                 server {{\n    listen 127.0.0.1:{front_port} ssl;\n\
                 ssl_certificate {cert}; ssl_certificate_key {key};\n\
                 location ~ ^/v2/(.+)/blobs/(sha256:[0-9a-f]+)$ {{\n\
                 return 307 https://localhost:{storage_port}/storage/$1/$2?signature=s3cr3t;\n    }}\n\
                 location / {{ proxy_pass https://127.0.0.1:{}; }}\n  }}\n\
                 server {{\n    listen 127.0.0.1:{storage_port} ssl;\n\
                 ssl_certificate {storage_cert}; ssl_certificate_key {storage_key};\n\
                 access_log {};\n\
                 location /storage/ {{\n\
                 if ($http_authorization) {{ return 403; }}\n\
                 rewrite ^/storage/(.+)/(sha256:[0-9a-f]+)$ /v2/$1/blobs/$2 break;\n\
                 proxy_set_header Authorization \"{storage_auth}\";\n\
                 proxy_pass https://127.0.0.1:{};\n    }}\n  }}\n}}\n",
                registry.port,
                storage_log.display(),
                registry.port,
            );
            std::fs::write(dir.join("nginx.conf"), config).unwrap();
            let mut child = Command::new("nginx")
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nginx (Debian package nginx)");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                let up = [front_port, storage_port]
                    .iter()
                    .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok());
                if up {
                    return RedirectingUpstream {
                        child,
                        url: format!("https://127.0.0.1:{front_port}"),
                        storage_log,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "nginx did not start; log:\n{}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
    }
}

/// Blob redirects are followed inside the front, to another host, without credentials: the
/// node only ever talks to the mirror. The storage's certificate is signed by a CA of the
/// system's roots (here `SSL_CERT_FILE`), not by the upstream's CA: `--remote-ca` is trusted
/// besides the system's roots, as a public object store behind a private registry needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_follows_blob_redirects_without_credentials() {
    need("docker-registry", "docker-registry");
    need("skopeo", "skopeo");
    need("nginx", "nginx");
    let tmp = tempfile::tempdir().unwrap();
    let upstream_tls = TestTls::new(&tmp.path().join("upstream-tls"));
    let front_tls = TestTls::new(&tmp.path().join("front-tls"));
    let htpasswd = tmp.path().join("upstream.htpasswd");
    write_htpasswd(&htpasswd, UPSTREAM_USER.0, UPSTREAM_USER.1);
    let registry = RegistryProcess::start(
        &tmp.path().join("registry"),
        &RegistryOptions {
            tls: Some(&upstream_tls),
            htpasswd: Some(&htpasswd),
            ..RegistryOptions::default()
        },
    );
    let app = image(6);
    app.push(
        &client(
            &registry.url,
            Some(&upstream_tls.ca_pem()),
            Some(registry_addon::oci::Credentials {
                username: UPSTREAM_USER.0.into(),
                password: UPSTREAM_USER.1.into(),
            }),
        ),
        "library/app",
        "v1",
    )
    .await;
    let storage_tls = TestTls::new(&tmp.path().join("storage-tls"));
    let upstream = RedirectingUpstream::start(
        &tmp.path().join("nginx"),
        &upstream_tls,
        &storage_tls,
        &registry,
    );
    let creds = credentials_dir(&tmp.path().join("creds"), UPSTREAM_USER.0, UPSTREAM_USER.1);
    let front = Front::start_with_env(
        &tmp.path().join("front"),
        &front_tls,
        tmp.path(),
        &remote_args(&upstream.url, &upstream_tls.ca_file, &creds),
        &[("SSL_CERT_FILE", storage_tls.ca_file.as_path())],
    );
    assert!(front.wait_ready(true), "not ready; log:\n{}", front.log());
    let out = tmp.path().join("pulled");
    skopeo_pull(&front_tls, front.port, "library/app:v1", &out)
        .await
        .unwrap_or_else(|e| panic!("pull through the front: {e}\nlog:\n{}", front.log()));
    assert_pulled(&out, &app);
    let storage = std::fs::read_to_string(&upstream.storage_log).unwrap_or_default();
    for blob in app.layers.iter().chain([&app.config]) {
        assert!(
            storage.contains(&format!("/storage/library/app/{}?", sha256(blob))),
            "blob {} not fetched from storage:\n{storage}",
            sha256(blob)
        );
    }
    assert!(
        !storage.contains("\" 403 "),
        "credentials reached storage:\n{storage}"
    );
}

/// containerd, configured as a node in Direct mode (a `hosts.toml` for the upstream's host
/// naming the mirror, with `ro`'s header), pulls an image whose own registry is unreachable:
/// only the front, forwarding to the upstream, can serve it. Needs root, containerd and ctr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_the_direct_front() {
    need("docker-registry", "docker-registry");
    need("containerd", "containerd");
    need("ctr", "containerd");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n");
    assert!(root, "containerd needs root to run");
    let tmp = tempfile::tempdir().unwrap();
    let upstream_tls = TestTls::new(&tmp.path().join("upstream-tls"));
    let front_tls = TestTls::new(&tmp.path().join("front-tls"));
    let bundle = tmp.path().join("token-signer.pem");
    let tokens = TokenServer::start(&bundle).await;
    let auth = tokens.auth_yaml(&bundle);
    let upstream = RegistryProcess::start(
        &tmp.path().join("upstream"),
        &RegistryOptions {
            tls: Some(&upstream_tls),
            auth_yaml: Some(&auth),
            ..RegistryOptions::default()
        },
    );
    let app = image(7);
    let digest = app
        .push(
            &client(
                &upstream.url,
                Some(&upstream_tls.ca_pem()),
                Some(registry_addon::oci::Credentials {
                    username: UPSTREAM_USER.0.into(),
                    password: UPSTREAM_USER.1.into(),
                }),
            ),
            "mirror/library/app",
            "v1",
        )
        .await;
    tokens.issued.lock().unwrap().clear();
    let creds = credentials_dir(&tmp.path().join("creds"), UPSTREAM_USER.0, UPSTREAM_USER.1);
    let front = Front::start(
        &tmp.path().join("front"),
        &front_tls,
        tmp.path(),
        &remote_args(
            &format!("{}/mirror", upstream.url),
            &upstream_tls.ca_file,
            &creds,
        ),
    );
    assert!(front.wait_ready(true), "not ready; log:\n{}", front.log());

    let dir = tmp.path().join("containerd");
    let (containerd, socket) = sync_support::containerd::start_containerd(&dir);
    let ctr = || {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&socket);
        cmd
    };

    // The image is the upstream's, which lets no one in without a token: only the mirror its
    // hosts.toml names can serve it.
    let upstream_host = upstream.url.trim_start_matches("https://").to_string();
    let certs = dir.join("certs.d");
    let host_dir = certs.join(&upstream_host);
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(host_dir.join("ca.crt"), front_tls.ca_pem()).unwrap();
    let mirror = format!("https://127.0.0.1:{}", front.port);
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"https://{upstream_host}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  \
             ca = \"{}\"\n  [host.\"{mirror}\".header]\n    Authorization = [\"{}\"]\n",
            host_dir.join("ca.crt").display(),
            basic(RO.0, RO.1)
        ),
    )
    .unwrap();
    let out = ctr()
        .args(["--namespace", "registry-addon-test", "content", "fetch"])
        .arg("--hosts-dir")
        .arg(&certs)
        .arg(format!("{upstream_host}/library/app:v1"))
        .output()
        .unwrap();
    let listed = ctr()
        .args(["--namespace", "registry-addon-test", "content", "ls", "-q"])
        .output()
        .unwrap();
    drop(containerd);
    assert!(
        out.status.success(),
        "ctr content fetch through the Direct front failed: {}\nfront log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        front.log()
    );
    let listed = String::from_utf8_lossy(&listed.stdout);
    for wanted in [digest.clone(), sha256(&app.config)]
        .into_iter()
        .chain(app.layers.iter().map(|l| sha256(l)))
    {
        assert!(
            listed.contains(&wanted),
            "{wanted} not in containerd:\n{listed}"
        );
    }
    let issued = tokens.issued();
    assert_eq!(
        issued.get("repository:mirror/library/app:pull"),
        Some(&1),
        "{issued:?}"
    );
}

/// The Direct Deployment exactly as rendered, run as the kubelet would run it: its front
/// container's arguments, with each volume mount a directory holding the Secret keys the
/// volume selects (`registry-upstream` as the converge writes it, `registry-tls`,
/// `registry-auth`), and the pull works with the upstream's credentials and CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_direct_deployment_pulls_with_its_mounted_secrets() {
    use registry_addon::addon::modes::{UpstreamSecrets, upstream_secret};
    use registry_addon::render::registry::{RegistryValues, registry_objects};
    need("docker-registry", "docker-registry");
    need("skopeo", "skopeo");
    let tmp = tempfile::tempdir().unwrap();
    let BasicUpstream {
        upstream_tls,
        front_tls,
        upstream,
        seed,
    } = BasicUpstream::start(tmp.path());
    let app = image(7);
    app.push(&seed, "team/app", "v1").await;

    let registry = registry_addon::wire::variable::registry_from_config(Some(&serde_json::json!({
        "addons": {"registry": {"mode": "Direct", "upstream": {
            "url": upstream.url,
            "credentialsSecretRef": {"name": "up-creds"},
            "caSecretRef": {"name": "up-ca"},
        }}}
    })))
    .unwrap()
    .unwrap();
    let options = match <registry_addon::cli::Cli as clap::Parser>::try_parse_from([
        "registry-addon",
        "render",
        "-f",
        "-",
    ])
    .unwrap()
    .command
    {
        registry_addon::cli::Command::Render(args) => args.addon,
        _ => unreachable!(),
    };
    let values = RegistryValues::new(
        &options,
        &registry,
        "10.96.0.20".parse().unwrap(),
        "hash".into(),
    );
    let objects = registry_objects(&values);
    let deployment = objects
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "registry-direct")
        .expect("the Direct Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let front = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["args"][0] == "front")
        .expect("the front container");

    // What each Secret holds, as the kubelet would see it.
    let upstream_secret = upstream_secret(&UpstreamSecrets {
        credentials: Some((UPSTREAM_USER.0.into(), UPSTREAM_USER.1.into())),
        ca_pem: Some(String::from_utf8(upstream_tls.ca_pem()).unwrap()),
    });
    let decode = |v: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    };
    let line = |(name, password): (&str, &str)| {
        registry_addon::addon::users::htpasswd_line(&registry_addon::addon::users::Credentials {
            username: name.into(),
            password: password.into(),
        })
        .unwrap()
            + "\n"
    };
    let secret_files = |name: &str| -> HashMap<String, Vec<u8>> {
        match name {
            "registry-upstream" => upstream_secret["data"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), decode(v)))
                .collect(),
            "registry-tls" => HashMap::from([
                (
                    "tls.crt".into(),
                    std::fs::read(&front_tls.cert_file).unwrap(),
                ),
                (
                    "tls.key".into(),
                    std::fs::read(&front_tls.key_file).unwrap(),
                ),
                ("ca.crt".into(), front_tls.ca_pem()),
            ]),
            "registry-auth" => HashMap::from([
                ("pull.htpasswd".into(), line(RO).into_bytes()),
                ("push.htpasswd".into(), line(RW).into_bytes()),
            ]),
            other => panic!("the Direct pod mounts an unexpected Secret {other}"),
        }
    };
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for mount in front["volumeMounts"].as_array().unwrap() {
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let secret = volume["secret"]["secretName"].as_str().unwrap();
        let files = secret_files(secret);
        let dir = tmp
            .path()
            .join("mounts")
            .join(mount["name"].as_str().unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        match volume["secret"]["items"].as_array() {
            Some(items) => {
                for item in items {
                    let key = item["key"].as_str().unwrap();
                    let content = files
                        .get(key)
                        .unwrap_or_else(|| panic!("{secret} has no key {key}"));
                    std::fs::write(dir.join(item["path"].as_str().unwrap()), content).unwrap();
                }
            }
            None => {
                for (key, content) in &files {
                    std::fs::write(dir.join(key), content).unwrap();
                }
            }
        }
        mounts.push((mount["mountPath"].as_str().unwrap().to_string(), dir));
    }
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    let (port, metrics_port) = (free_port(), free_port());
    let args: Vec<String> = front["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let arg = a.as_str().unwrap();
            if arg == "0.0.0.0:5000" {
                return format!("127.0.0.1:{port}");
            }
            if arg.ends_with(":9442") {
                return format!("127.0.0.1:{metrics_port}");
            }
            for (path, dir) in &mounts {
                if let Some(rest) = arg.strip_prefix(path.as_str()) {
                    return format!("{}{rest}", dir.display());
                }
            }
            arg.to_string()
        })
        .collect();
    let log = tmp.path().join("front.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_registry-addon"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while http_status(metrics_port, "/readyz") != Some(200) {
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the rendered front did not get ready: {args:?}\n{}",
                front_log(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = tmp.path().join("pulled");
    let pulled = skopeo_pull(&front_tls, port, "team/app:v1", &out).await;
    let _ = child.kill();
    let _ = child.wait();
    pulled.unwrap_or_else(|e| panic!("pull through the rendered front: {e}\n{}", front_log(&log)));
    assert_pulled(&out, &app);
}
