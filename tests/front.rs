//! `registry-addon front` in front of real `docker-registry` replicas: who may pull and push,
//! what bad credentials get, pushes through a real TCP balancer (haproxy) configured as
//! kube-proxy treats the rendered `registry` Service, and the syncer between fronts.
//!
//! Needs `docker-registry`, `skopeo` and `haproxy` on PATH (`.ci/run` installs them).

mod sync_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use sync_support::*;

const RO: (&str, &str) = ("ro", "ro-password-0123456789abcdefghijklmnop");
const RW: (&str, &str) = ("rw", "rw-password-0123456789abcdefghijklmnop");
const SYNC: (&str, &str) = ("sync", "sync-password-0123456789abcdefghijklmno");

fn users() -> [FrontUser<'static>; 3] {
    [
        FrontUser {
            name: RO.0,
            password: RO.1,
            push: false,
        },
        FrontUser {
            name: RW.0,
            password: RW.1,
            push: true,
        },
        FrontUser {
            name: SYNC.0,
            password: SYNC.1,
            push: true,
        },
    ]
}

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

fn replica(dir: &Path, tls: &TestTls) -> Replica {
    Replica::start(dir, tls, &users(), false)
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn http(tls: &TestTls) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(&tls.ca_pem()).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap()
}

/// A directory with `ca.crt` and an OCI layout of a three-layer image, for skopeo.
fn layout(dir: &Path, seed: u64) -> PathBuf {
    let layers = (0..3)
        .map(|i| random_bytes(seed * 10 + i, 200_000 + (i as usize) * 150_000))
        .collect();
    let image = Image::new("amd64", layers, false);
    let path = dir.join(format!("layout-{seed}"));
    write_oci_layout(&path, "v1", &[("amd64", &image)]);
    path
}

/// `skopeo copy` between `from` and `to` (docker:// or oci: references) with `creds`.
fn skopeo(
    tls: &TestTls,
    from: &str,
    to: &str,
    creds: Option<(&str, &str)>,
) -> std::process::Output {
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "--insecure-policy",
        "copy",
        "--all",
        "-q",
        "--retry-times",
        "0",
    ]);
    for side in ["src", "dest"] {
        cmd.arg(format!("--{side}-cert-dir")).arg(&tls.cert_dir);
        match creds {
            Some((u, p)) => {
                cmd.arg(format!("--{side}-creds")).arg(format!("{u}:{p}"));
            }
            None => {
                cmd.arg(format!("--{side}-no-creds"));
            }
        }
    }
    cmd.arg(from).arg(to);
    cmd.output().expect("skopeo (Debian package skopeo)")
}

fn host(url: &str) -> &str {
    url.trim_start_matches("https://")
}

#[tokio::test(flavor = "multi_thread")]
async fn only_rw_pushes_ro_pulls_and_anonymous_gets_a_challenge() {
    need("docker-registry", "docker-registry");
    need("skopeo", "skopeo");
    let dir = tempfile::tempdir().unwrap();
    let tls = TestTls::new(&dir.path().join("tls"));
    let r = replica(&dir.path().join("r0"), &tls);
    let client = http(&tls);
    let url = |path: &str| format!("{}{path}", r.front.url);

    // Anonymous: 401 with a Basic challenge, for reads and writes alike.
    let anonymous = client.get(url("/v2/")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(
        anonymous.headers()["www-authenticate"],
        "Basic realm=\"registry-addon\""
    );
    let anonymous_body = anonymous.text().await.unwrap();
    assert!(anonymous_body.contains("UNAUTHORIZED"), "{anonymous_body}");
    let post = client
        .post(url("/v2/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 401);

    // rw pushes (skopeo, a multi-layer image); anonymous and ro pushes are refused.
    let layout = layout(dir.path(), 1);
    let src = format!("oci:{}:v1", layout.display());
    let dest = format!("docker://{}/app:v1", host(&r.front.url));
    let out = skopeo(&tls, &src, &dest, None);
    assert!(!out.status.success(), "anonymous push succeeded");
    let out = skopeo(&tls, &src, &dest, Some(RO));
    assert!(!out.status.success(), "ro push succeeded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("denied")
            || String::from_utf8_lossy(&out.stderr).contains("403")
            || String::from_utf8_lossy(&out.stderr).contains("unauthorized"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = skopeo(&tls, &src, &dest, Some(RW));
    assert!(
        out.status.success(),
        "rw push: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // ro pulls; anonymous pulls are refused.
    let back = dir.path().join("back");
    let out = skopeo(&tls, &dest, &format!("oci:{}:v1", back.display()), None);
    assert!(!out.status.success(), "anonymous pull succeeded");
    let out = skopeo(&tls, &dest, &format!("oci:{}:v1", back.display()), Some(RO));
    assert!(
        out.status.success(),
        "ro pull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = client
        .head(url("/v2/app/manifests/v1"))
        .header("authorization", basic(RO.0, RO.1))
        .header("accept", format!("{OCI_MANIFEST}, {OCI_INDEX}"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    let digest = head.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string();

    // ro may not delete or start an upload: 403, and nothing changed.
    for request in [
        client.delete(url(&format!("/v2/app/manifests/{digest}"))),
        client.post(url("/v2/app/blobs/uploads/")),
        client.put(url("/v2/app/manifests/v2")),
        client.patch(url("/v2/app/blobs/uploads/x")),
    ] {
        let response = request
            .header("authorization", basic(RO.0, RO.1))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403);
        assert!(response.text().await.unwrap().contains("DENIED"));
    }
    let still = client
        .head(url("/v2/app/manifests/v1"))
        .header("authorization", basic(RW.0, RW.1))
        .header("accept", format!("{OCI_MANIFEST}, {OCI_INDEX}"))
        .send()
        .await
        .unwrap();
    assert_eq!(still.status(), 200);

    // Wrong password, unknown user, malformed headers: the same 401 as anonymous, never a
    // 500, and nothing saying which part was wrong.
    let bad: Vec<reqwest::header::HeaderValue> = vec![
        basic(RO.0, "wrong").parse().unwrap(),
        basic("nobody", RO.1).parse().unwrap(),
        basic("", "").parse().unwrap(),
        "Basic !!!notbase64".parse().unwrap(),
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("no-colon")
        )
        .parse()
        .unwrap(),
        "Bearer abc.def".parse().unwrap(),
        "Basic".parse().unwrap(),
        reqwest::header::HeaderValue::from_bytes(b"Basic \xff\xfe").unwrap(),
    ];
    for value in bad {
        let response = client
            .get(url("/v2/"))
            .header("authorization", value.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{value:?}");
        assert!(response.headers().contains_key("www-authenticate"));
        assert_eq!(response.text().await.unwrap(), anonymous_body, "{value:?}");
    }

    // The front counted what it refused.
    let metrics = r.front.metrics();
    assert!(
        metrics.contains("registry_addon_front_refused_total{reason=\"forbidden\"}"),
        "{metrics}"
    );
    drop(r.registry);
}

/// haproxy in TCP mode, spreading connections over `backends` as kube-proxy does for the
/// rendered Service: by client IP when the Service asks for ClientIP affinity, else per
/// connection.
struct Balancer {
    child: Child,
    port: u16,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn balancer(dir: &Path, backends: &[u16], session_affinity: Option<&str>) -> Balancer {
    need("haproxy", "haproxy");
    std::fs::create_dir_all(dir).unwrap();
    let balance = match session_affinity {
        Some("ClientIP") => "source",
        Some(other) => panic!("unknown session affinity {other}"),
        None => "roundrobin",
    };
    for _try in 0..5 {
        let port = free_port();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, p)| format!("    server r{i} 127.0.0.1:{p}\n"))
            .collect();
        let config = format!(
            "global\n    maxconn 256\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n\
             frontend registry\n    bind 127.0.0.1:{port}\n    default_backend replicas\n\
             backend replicas\n    balance {balance}\n    hash-type consistent\n{servers}"
        );
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, config).unwrap();
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&file)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut balancer = Balancer { child, port };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = balancer.child.try_wait() {
                break;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return balancer;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = balancer.child.kill();
    }
    panic!("haproxy did not start");
}

/// The `sessionAffinity` of the `registry` Service the addon renders.
fn rendered_session_affinity() -> Option<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_registry-addon"))
        .args([
            "render",
            "-f",
            &format!("{}/tests/fixtures/cluster.yaml", env!("CARGO_MANIFEST_DIR")),
            "--deployer",
            "direct",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        if value["kind"] == "Service" && value["metadata"]["name"] == "registry" {
            return value["spec"]["sessionAffinity"].as_str().map(String::from);
        }
    }
    panic!("no registry Service rendered")
}

/// Pushes through the Service reach one replica for the whole push: 20 of 20 multi-layer
/// pushes through a balancer over three replicas; the same balancer without the affinity
/// shows why it is needed. The syncer, authenticating to the peers' fronts, then makes every
/// replica serve every image.
#[tokio::test(flavor = "multi_thread")]
async fn pushes_through_the_service_and_sync_with_auth() {
    need("docker-registry", "docker-registry");
    need("skopeo", "skopeo");
    let dir = tempfile::tempdir().unwrap();
    let tls = TestTls::new(&dir.path().join("tls"));
    let replicas: Vec<Replica> = (0..3)
        .map(|i| replica(&dir.path().join(format!("r{i}")), &tls))
        .collect();
    let fronts: Vec<u16> = replicas.iter().map(|r| r.front.port).collect();

    let affinity = rendered_session_affinity();
    assert_eq!(affinity.as_deref(), Some("ClientIP"));
    let service = balancer(&dir.path().join("lb"), &fronts, affinity.as_deref());
    let mut failures = Vec::new();
    for i in 0..20 {
        let layout = layout(dir.path(), 100 + i);
        let out = skopeo(
            &tls,
            &format!("oci:{}:v1", layout.display()),
            &format!("docker://127.0.0.1:{}/team/app:{i}", service.port),
            Some(RW),
        );
        if !out.status.success() {
            failures.push(format!(
                "push {i}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 20 failed: {failures:?}",
        failures.len()
    );

    // The balancer does spread connections: without the affinity, uploads break.
    let spread = balancer(&dir.path().join("lb-spread"), &fronts, None);
    let mut broken = 0;
    for i in 0..4 {
        let layout = layout(dir.path(), 200 + i);
        let out = skopeo(
            &tls,
            &format!("oci:{}:v1", layout.display()),
            &format!("docker://127.0.0.1:{}/team/spread:{i}", spread.port),
            Some(RW),
        );
        if !out.status.success() {
            broken += 1;
        }
    }
    assert!(
        broken > 0,
        "every push succeeded without session affinity: the balancer did not spread them"
    );

    // The syncer of replica 0: its registry straight, the peers through their fronts as sync.
    let creds = dir.path().join("sync.credentials");
    std::fs::write(&creds, format!("{}:{}\n", SYNC.0, SYNC.1)).unwrap();
    let before = tag_digests(&client(&replicas[0].registry.url, None, None)).await;
    let out = Command::new(env!("CARGO_BIN_EXE_registry-addon"))
        .args(["sync", "--once", "--local", &replicas[0].registry.url])
        .args(["--peer", &replicas[1].front.url])
        .args(["--peer", &replicas[2].front.url])
        .arg("--ca-file")
        .arg(&tls.ca_file)
        .arg("--credentials-file")
        .arg(&creds)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = tag_digests(&client(&replicas[0].registry.url, None, None)).await;
    let mut all = std::collections::BTreeMap::new();
    for r in &replicas[1..] {
        all.extend(tag_digests(&client(&r.registry.url, None, None)).await);
    }
    all.extend(before);
    assert_eq!(after, all);
    assert!(after.len() >= 20);

    // Without credentials the peers refuse the syncer.
    let out = Command::new(env!("CARGO_BIN_EXE_registry-addon"))
        .args(["sync", "--once", "--local", &replicas[0].registry.url])
        .args(["--peer", &replicas[1].front.url])
        .arg("--ca-file")
        .arg(&tls.ca_file)
        .env_remove("REGISTRY_USERNAME")
        .env_remove("REGISTRY_PASSWORD")
        .output()
        .unwrap();
    assert!(!out.status.success(), "sync without credentials succeeded");
}

/// The whole replica as the chart runs it (registry notifying its sync sidecar, the front,
/// the sidecar reaching its peers through their fronts as `sync`): an image pushed through one
/// replica's front is served by the other replicas' fronts within 5 s, with rounds every 2m.
#[tokio::test(flavor = "multi_thread")]
async fn a_push_is_served_by_every_replica_within_seconds() {
    need("docker-registry", "docker-registry");
    need("skopeo", "skopeo");
    const TOKEN: &str = "notify-token-0123456789abcdef";
    let dir = tempfile::tempdir().unwrap();
    let tls = TestTls::new(&dir.path().join("tls"));
    let creds = dir.path().join("sync.credentials");
    std::fs::write(&creds, format!("{}:{}\n", SYNC.0, SYNC.1)).unwrap();
    let mut replicas = Vec::new();
    for i in 0..3 {
        let rdir = dir.path().join(format!("r{i}"));
        let notify_port = free_port();
        let url = format!("http://127.0.0.1:{notify_port}/events");
        let registry = RegistryProcess::start(
            &rdir.join("registry"),
            &RegistryOptions {
                relative_urls: true,
                notify: Some((url.as_str(), TOKEN)),
                ..RegistryOptions::default()
            },
        );
        let front = FrontProcess::start(
            &rdir.join("front"),
            &registry.url,
            &tls.cert_file,
            &tls.key_file,
            &users(),
        );
        replicas.push((Replica { front, registry }, notify_port, rdir));
    }
    let mut sidecars = Vec::new();
    for (i, (me, notify_port, rdir)) in replicas.iter().enumerate() {
        let metrics_port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_registry-addon"));
        cmd.args(["sync", "--local", &me.registry.url, "--interval", "2m"])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--notify-listen", &format!("127.0.0.1:{notify_port}")])
            .arg("--ca-file")
            .arg(&tls.ca_file)
            .arg("--credentials-file")
            .arg(&creds)
            .arg("--state-file")
            .arg(rdir.join("agreed.json"));
        for (j, (peer, _, _)) in replicas.iter().enumerate() {
            if j != i {
                cmd.args(["--peer", &peer.front.url]);
            }
        }
        let log = std::fs::File::create(rdir.join("sidecar.log")).unwrap();
        let child = cmd
            .env("REGISTRY_NOTIFY_TOKEN", TOKEN)
            .env_remove("REGISTRY_NOTIFY_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        sidecars.push(KillOnDrop(child));
        // Its first round done: from here on only notifications move images quickly.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = http_get(metrics_port, "/metrics").unwrap_or_default();
            let rounds = text
                .lines()
                .find(|l| l.starts_with("registry_sync_rounds_total"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if rounds >= 1.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sidecar {i} did not finish its first round: {}",
                std::fs::read_to_string(rdir.join("sidecar.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let client = http(&tls);
    let layout = layout(dir.path(), 300);
    let out = skopeo(
        &tls,
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/team/fresh:v1", host(&replicas[0].0.front.url)),
        Some(RW),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pushed = Instant::now();
    for (replica, _, rdir) in &replicas[1..] {
        loop {
            let head = client
                .head(format!("{}/v2/team/fresh/manifests/v1", replica.front.url))
                .header("authorization", basic(RO.0, RO.1))
                .header("accept", format!("{OCI_MANIFEST}, {OCI_INDEX}"))
                .send()
                .await
                .unwrap();
            if head.status() == 200 {
                break;
            }
            assert!(
                pushed.elapsed() < Duration::from_secs(5),
                "not served by {} within 5 s; sidecar log:\n{}",
                replica.front.url,
                std::fs::read_to_string(rdir.join("sidecar.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!(
        "served by every replica {:.0} ms after the push",
        pushed.elapsed().as_secs_f64() * 1000.0
    );
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--require-images`: the front reports ready only while the registry behind holds every
/// image the file lists (Local's replicas during a switch to Local); the file is reread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_images_holds_readiness_until_the_registry_has_them() {
    need("docker-registry", "docker-registry");
    let tmp = tempfile::tempdir().unwrap();
    let tls = TestTls::new(&tmp.path().join("tls"));
    let registry = RegistryProcess::start(&tmp.path().join("registry"), &Default::default());
    let list = tmp.path().join("images");
    let list_arg = list.display().to_string();
    // No file yet: nothing required, ready.
    let front = FrontProcess::start_with(
        &tmp.path().join("front"),
        &registry.url,
        &tls.cert_file,
        &tls.key_file,
        &users(),
        &["--require-images", &list_arg],
    );
    let ready = || http_status(front.metrics_port, "/readyz");
    let within = |want: u16| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while ready() != Some(want) {
            assert!(
                Instant::now() < deadline,
                "/readyz never answered {want}; log:\n{}",
                std::fs::read_to_string(&front.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let reg = client(&registry.url, None, None);
    let app = Image::new("amd64", vec![random_bytes(1, 1000)], false);
    let other = Image::new("amd64", vec![random_bytes(2, 1000)], true);
    let digest = app.push(&reg, "team/app", "1").await;

    std::fs::write(
        &list,
        format!("# in use\nteam/app@{digest}\nlibrary/other:2\n"),
    )
    .unwrap();
    within(503);
    let log = std::fs::read_to_string(&front.log).unwrap();
    assert!(
        log.contains("1 of 2 images in use are missing from the registry; first: library/other:2"),
        "{log}"
    );
    // Pulls are still served meanwhile (only the Service's endpoints follow readiness).
    let through = client(
        &front.url,
        Some(&tls.ca_pem()),
        Some(registry_addon::oci::Credentials {
            username: RO.0.into(),
            password: RO.1.into(),
        }),
    );
    assert!(
        through
            .head_manifest("team/app", "1")
            .await
            .unwrap()
            .is_some()
    );

    other.push(&reg, "library/other", "2").await;
    within(200);
    // A new image in use: not ready again until it is there.
    std::fs::write(&list, "library/third:1\n").unwrap();
    within(503);
    app.push(&reg, "library/third", "1").await;
    within(200);
    // An unreadable list keeps it unready, naming the line.
    std::fs::write(&list, "Not A Reference\n").unwrap();
    within(503);
    let log = std::fs::read_to_string(&front.log).unwrap();
    assert!(log.contains("line 1:"), "{log}");
    std::fs::write(&list, "").unwrap();
    within(200);
}

/// A registry under `dir` and a front before it with the test users and `extra` flags.
fn registry_and_front(dir: &Path, extra: &[&str]) -> (TestTls, RegistryProcess, FrontProcess) {
    let tls = TestTls::new(&dir.join("tls"));
    let registry = RegistryProcess::start(&dir.join("registry"), &Default::default());
    let front = FrontProcess::start_with(
        &dir.join("front"),
        &registry.url,
        &tls.cert_file,
        &tls.key_file,
        &users(),
        extra,
    );
    (tls, registry, front)
}

/// `--registry-host` (Proxy): only that registry's images, as containerd's `ns` names them;
/// another registry's image of the same name is a 404, never the one here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_host_refuses_other_registries_images() {
    need("docker-registry", "docker-registry");
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("registry/storage");
    let (tls, registry, front) = registry_and_front(
        tmp.path(),
        &[
            "--pull-only",
            "--registry-host",
            "registry-1.docker.io",
            "--blob-store",
            store.to_str().unwrap(),
        ],
    );
    let app = Image::new("amd64", vec![random_bytes(3, 1000)], false);
    app.push(&client(&registry.url, None, None), "library/app", "1")
        .await;
    let http = http(&tls);
    let status = |query: &'static str| {
        let http = http.clone();
        let url = format!("{}/v2/library/app/manifests/1{query}", front.url);
        async move {
            http.head(url)
                .header("authorization", basic(RO.0, RO.1))
                .header("accept", "application/vnd.oci.image.manifest.v1+json")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        status("").await,
        200,
        "no ns: a client of the mirror itself"
    );
    assert_eq!(status("?ns=docker.io").await, 200, "Docker Hub's images");
    assert_eq!(status("?ns=registry-1.docker.io").await, 200);
    assert_eq!(
        status("?ns=quay.io").await,
        404,
        "another registry's image of the same name"
    );
    // Its blobs too, though the store holds them.
    let layer = sha256(&app.layers[0]);
    let blob = |query: &'static str| {
        let http = http.clone();
        let url = format!("{}/v2/library/app/blobs/{layer}{query}", front.url);
        async move {
            http.get(url)
                .header("authorization", basic(RO.0, RO.1))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(blob("?ns=quay.io").await, 404);
    assert_eq!(
        front.counter("registry_addon_front_blobs_from_store_total"),
        0
    );
    assert_eq!(blob("?ns=docker.io").await, 200);
    assert_eq!(
        front.counter("registry_addon_front_blobs_from_store_total"),
        1
    );
    // Authentication comes first: without credentials, 401 whatever the registry asked for.
    let anonymous = http
        .head(format!(
            "{}/v2/library/app/manifests/1?ns=quay.io",
            front.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
}

/// With `--blob-store`, a blob the registry's repository holds is read from its storage by the
/// front; everything else is still the registry's to answer, and nobody unauthenticated
/// gets anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_come_from_the_registrys_storage_only_where_the_registry_serves_them() {
    need("docker-registry", "docker-registry");
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("registry/storage");
    let (tls, registry, front) =
        registry_and_front(tmp.path(), &["--blob-store", store.to_str().unwrap()]);
    assert_eq!(registry.root, store);
    let app = Image::new(
        "amd64",
        vec![random_bytes(21, 700_000), random_bytes(22, 0)],
        false,
    );
    app.push(&client(&registry.url, None, None), "library/app", "1")
        .await;
    Image::new("amd64", vec![random_bytes(23, 100)], false)
        .push(&client(&registry.url, None, None), "library/other", "1")
        .await;
    let http = http(&tls);
    let from_store = || front.counter("registry_addon_front_blobs_from_store_total");
    let layer = &app.layers[0];
    let digest = sha256(layer);
    let url = |repo: &str, digest: &str| format!("{}/v2/{repo}/blobs/{digest}", front.url);
    let get = |url: String| {
        http.get(url)
            .header("authorization", basic(RO.0, RO.1))
            .send()
    };

    let answer = get(url("library/app", &digest)).await.unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let header = |a: &reqwest::Response, name: &str| {
        a.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(
        header(&answer, "docker-content-digest"),
        Some(digest.clone())
    );
    assert_eq!(
        header(&answer, "content-length"),
        Some(layer.len().to_string())
    );
    assert_eq!(
        header(&answer, "content-type").as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(answer.bytes().await.unwrap().as_ref(), layer.as_slice());
    assert_eq!(from_store(), 1);
    // An empty blob, and a HEAD.
    let empty = get(url("library/app", &sha256(&app.layers[1])))
        .await
        .unwrap();
    assert_eq!(empty.status().as_u16(), 200);
    assert!(empty.bytes().await.unwrap().is_empty());
    let head = http
        .head(url("library/app", &digest))
        .header("authorization", basic(RO.0, RO.1))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(
        header(&head, "content-length"),
        Some(layer.len().to_string())
    );
    assert_eq!(from_store(), 3);

    // The registry's: a repository that does not hold the blob (404 as the registry says),
    // and a range.
    let elsewhere = get(url("library/other", &digest)).await.unwrap();
    assert_eq!(elsewhere.status().as_u16(), 404);
    let range = http
        .get(url("library/app", &digest))
        .header("authorization", basic(RO.0, RO.1))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(range.status().as_u16(), 206);
    assert_eq!(range.bytes().await.unwrap().as_ref(), &layer[10..20]);
    assert_eq!(from_store(), 3, "none of these came from the store");

    // Refused: no credentials, whatever the store holds.
    let anonymous = http.get(url("library/app", &digest)).send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    assert_eq!(from_store(), 3);

    // A link naming another digest (as while Distribution rewrites it): the registry's.
    let link = registry.root.join(format!(
        "docker/registry/v2/repositories/library/app/_layers/sha256/{}/link",
        digest.trim_start_matches("sha256:")
    ));
    std::fs::write(&link, format!("sha256:{}", "0".repeat(64))).unwrap();
    let rewritten = get(url("library/app", &digest)).await.unwrap();
    assert_ne!(rewritten.status().as_u16(), 200);
    assert_eq!(from_store(), 3);

    // The registry no longer linking the blob into the repository (deleted there): the
    // registry answers, and its 404 is what the client gets.
    std::fs::remove_file(&link).unwrap();
    let gone = get(url("library/app", &digest)).await.unwrap();
    assert_eq!(gone.status().as_u16(), 404);
    assert_eq!(from_store(), 3);
}

/// A read the registry behind fails with 500 (Distribution does, for a moment, while it
/// rewrites a file another request reads) is asked once more, and the client gets the second
/// answer; a second 500 is the client's, and a write is never sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_the_registry_fails_with_500_is_asked_once_more() {
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let tls = TestTls::new(&tmp.path().join("tls"));
    // The registry behind: each path fails its first `fails` requests with 500.
    let asked: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
    let seen = asked.clone();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let seen = seen.clone();
        async move {
            let key = format!("{} {}", request.method(), request.uri().path());
            let n = {
                let mut seen = seen.lock().unwrap();
                let n = seen.entry(key).or_default();
                *n += 1;
                *n
            };
            let fails = match request.uri().path() {
                "/v2/" => 0,
                "/v2/app/manifests/always" => usize::MAX,
                _ => 1,
            };
            if n <= fails {
                (
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    r#"{"errors":[{"code":"UNKNOWN","message":"unknown error"}]}"#,
                )
            } else {
                (axum::http::StatusCode::OK, "{}")
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let front = FrontProcess::start(
        &tmp.path().join("front"),
        &format!("http://127.0.0.1:{port}"),
        &tls.cert_file,
        &tls.key_file,
        &users(),
    );
    let http = http(&tls);
    let send = |method: reqwest::Method, path: &'static str| {
        let request = http
            .request(method, format!("{}{path}", front.url))
            .header("authorization", basic(RW.0, RW.1));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let count = |key: &str| asked.lock().unwrap().get(key).copied().unwrap_or(0);
    assert_eq!(send(reqwest::Method::GET, "/v2/app/manifests/1").await, 200);
    assert_eq!(count("GET /v2/app/manifests/1"), 2);
    assert_eq!(
        send(reqwest::Method::HEAD, "/v2/app/blobs/sha256:1").await,
        200
    );
    assert_eq!(count("HEAD /v2/app/blobs/sha256:1"), 2);
    assert_eq!(
        send(reqwest::Method::GET, "/v2/app/manifests/always").await,
        500
    );
    assert_eq!(
        count("GET /v2/app/manifests/always"),
        2,
        "asked more than twice"
    );
    assert_eq!(
        send(reqwest::Method::POST, "/v2/app/blobs/uploads/").await,
        500
    );
    assert_eq!(
        count("POST /v2/app/blobs/uploads/"),
        1,
        "a write was sent twice"
    );
    let log = std::fs::read_to_string(&front.log).unwrap();
    assert!(log.contains("asking once more"), "{log}");
}
