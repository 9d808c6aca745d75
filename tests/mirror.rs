//! `registry-addon mirror pull` and `mirror push` against real registries: Debian
//! `docker-registry` on loopback with TLS as the upstreams; as the mirror, replicas as the
//! chart runs them (`docker-registry` on the loopback behind `registry-addon front`, with the
//! `ro` and `rw` users); real `skopeo` to make layouts and to read the results back.
//!
//! Needs `docker-registry`, `skopeo` and `htpasswd` (apache2-utils) on PATH; the tests fail,
//! saying what to install, without them.

mod sync_support;

use sync_support::containerd::start_containerd;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use registry_addon::oci::{Credentials, Registry};
use sync_support::front::{Front, FrontOptions};
use sync_support::*;

const USER: &str = "rw";
const PASSWORD: &str = "correct-horse-battery-staple-0123456789";
const RO_USER: &str = "ro";
const RO_PASSWORD: &str = "ro-password-0123456789abcdefghijklmnop";

/// The mirror's users, as the addon creates them: `ro` pulls, `rw` pulls and pushes.
fn mirror_users() -> [FrontUser<'static>; 2] {
    [
        FrontUser {
            name: RO_USER,
            password: RO_PASSWORD,
            push: false,
        },
        FrontUser {
            name: USER,
            password: PASSWORD,
            push: true,
        },
    ]
}

fn ro_credentials() -> Credentials {
    Credentials {
        username: RO_USER.into(),
        password: RO_PASSWORD.into(),
    }
}

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_registry-addon"));
    cmd.arg("mirror")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `mirror push` as `rw`, giving the password on stdin.
fn push_cmd(from: &Path, to: &str, ca: &Path, password: Option<&str>, extra: &[&str]) -> Output {
    push_cmd_as(USER, from, to, ca, password, extra)
}

/// Runs `mirror push` as `user`, giving the password on stdin.
fn push_cmd_as(
    user: &str,
    from: &Path,
    to: &str,
    ca: &Path,
    password: Option<&str>,
    extra: &[&str],
) -> Output {
    let mut cmd = bin();
    cmd.arg("push")
        .arg("--from")
        .arg(from)
        .args(["--to", to])
        .arg("--ca-file")
        .arg(ca)
        .args(extra);
    if password.is_some() {
        cmd.args(["--username", user, "--password-stdin"])
            .stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("registry-addon binary");
    if let Some(pw) = password {
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{pw}").unwrap();
    }
    child.wait_with_output().unwrap()
}

fn pull_cmd(to: &Path, ca: &Path, images: &[String], extra: &[&str]) -> Output {
    bin()
        .arg("pull")
        .args(images)
        .arg("--to")
        .arg(to)
        .arg("--ca-file")
        .arg(ca)
        .args(extra)
        .output()
        .expect("registry-addon binary")
}

/// The number before `what` in the summary (`sent 123 bytes`).
fn summary_bytes(out: &Output, what: &str) -> u64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let after = stdout
        .split(&format!("{what} "))
        .nth(1)
        .unwrap_or_else(|| panic!("no {what:?} in the summary: {}", text(out)));
    after
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad summary: {stdout}"))
}

fn tools() {
    for (tool, package) in [
        ("docker-registry", "docker-registry"),
        ("skopeo", "skopeo"),
        ("htpasswd", "apache2-utils"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(found, "{tool} is needed: apt-get install {package}");
    }
}

/// Two upstream registries (the second with Basic auth) and a mirror replica (the front with
/// the `ro` and `rw` users before a registry), all TLS with one test CA.
struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    tls: TestTls,
    up1: RegistryProcess,
    up2: RegistryProcess,
    mirror: Replica,
    auth_file: PathBuf,
}

impl Env {
    fn new() -> Env {
        tools();
        let tmp = tempfile::Builder::new()
            .prefix("mirror")
            .tempdir_in("/tmp")
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let tls = TestTls::new(&dir.join("tls"));
        let up1 = RegistryProcess::start(
            &dir.join("up1"),
            &RegistryOptions {
                tls: Some(&tls),
                ..Default::default()
            },
        );
        let up2_htpasswd = dir.join("up2-htpasswd");
        write_htpasswd(&up2_htpasswd, "puller", "upstream-secret");
        let up2 = RegistryProcess::start(
            &dir.join("up2"),
            &RegistryOptions {
                tls: Some(&tls),
                htpasswd: Some(&up2_htpasswd),
                ..Default::default()
            },
        );
        let mirror = Replica::start(&dir.join("mirror"), &tls, &mirror_users(), false);
        // A Docker config.json for the second upstream.
        let auth_file = dir.join("config.json");
        let auth = base64_encode("puller:upstream-secret");
        std::fs::write(
            &auth_file,
            format!(
                r#"{{"auths": {{"127.0.0.1:{}": {{"auth": "{auth}"}}}}}}"#,
                up2.port
            ),
        )
        .unwrap();
        Env {
            _tmp: tmp,
            dir,
            tls,
            up1,
            up2,
            mirror,
            auth_file,
        }
    }

    fn ca(&self) -> Vec<u8> {
        self.tls.ca_pem()
    }

    fn up1(&self) -> std::sync::Arc<Registry> {
        client(&self.up1.url, Some(&self.ca()), None)
    }

    fn up2(&self) -> std::sync::Arc<Registry> {
        client(
            &self.up2.url,
            Some(&self.ca()),
            Some(Credentials {
                username: "puller".into(),
                password: "upstream-secret".into(),
            }),
        )
    }

    fn mirror(&self) -> std::sync::Arc<Registry> {
        client(
            &self.mirror.front.url,
            Some(&self.ca()),
            Some(Credentials {
                username: USER.into(),
                password: PASSWORD.into(),
            }),
        )
    }

    fn ref1(&self, name: &str) -> String {
        format!("127.0.0.1:{}/{name}", self.up1.port)
    }

    fn ref2(&self, name: &str) -> String {
        format!("127.0.0.1:{}/{name}", self.up2.port)
    }

    /// Upstream 1: `pause:3.10` (one platform) and `multi:v1` (two platforms sharing a
    /// layer); upstream 2: `library/app:1.0` (Docker types), sharing a layer with `pause`.
    /// Returns the manifest digests by image reference.
    async fn corpus(&self) -> Vec<(String, String)> {
        let shared = random_bytes(1, 300_000);
        let pause = Image::new(
            "amd64",
            vec![shared.clone(), random_bytes(2, 50_000)],
            false,
        );
        let pause_digest = pause.push(&self.up1(), "pause", "3.10").await;
        let base = random_bytes(3, 400_000);
        let amd = Image::new("amd64", vec![base.clone(), random_bytes(4, 100_000)], false);
        let arm = Image::new("arm64", vec![base, random_bytes(5, 120_000)], false);
        let multi_digest = push_index(
            &self.up1(),
            "multi",
            "v1",
            &[("amd64", &amd), ("arm64", &arm)],
            false,
        )
        .await;
        let app = Image::new("amd64", vec![shared, random_bytes(6, 70_000)], true);
        let app_digest = app.push(&self.up2(), "library/app", "1.0").await;
        vec![
            (self.ref1("pause:3.10"), pause_digest),
            (self.ref1("multi:v1"), multi_digest),
            (self.ref2("library/app:1.0"), app_digest),
        ]
    }

    fn skopeo(&self, args: &[&str]) -> Output {
        Command::new("skopeo")
            .args(args)
            .output()
            .expect("skopeo must be installed (Debian package skopeo)")
    }

    /// The digest of a mirror manifest as skopeo reads it back.
    fn skopeo_digest(&self, repo_tag: &str) -> String {
        let cert_dir = self.tls.cert_dir.to_str().unwrap();
        let creds = format!("{USER}:{PASSWORD}");
        let image = format!("docker://127.0.0.1:{}/{repo_tag}", self.mirror.front.port);
        let out = self.skopeo(&[
            "inspect",
            "--raw",
            "--cert-dir",
            cert_dir,
            "--creds",
            &creds,
            &image,
        ]);
        assert!(
            out.status.success(),
            "skopeo inspect {image}: {}",
            text(&out)
        );
        sha256(&out.stdout)
    }
}

fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Manifest digest by ref name, from a layout's index.json.
fn ref_digests(layout: &Path) -> std::collections::BTreeMap<String, String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["annotations"]["org.opencontainers.image.ref.name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                d["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn ref_names(layout: &Path) -> Vec<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mut names: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_two_upstreams_push_to_the_mirror_and_read_back_with_skopeo() {
    let env = Env::new();
    let corpus = env.corpus().await;
    let images: Vec<String> = corpus.iter().map(|(r, _)| r.clone()).collect();
    let ca = env.tls.ca_file.clone();
    let auth = env.auth_file.to_str().unwrap().to_string();

    // Into a layout directory, the images named in a file.
    let list = env.dir.join("images.txt");
    std::fs::write(
        &list,
        format!(
            "# test images\n{}\n\n{} # second upstream\n",
            images[0], images[2]
        ),
    )
    .unwrap();
    let layout = env.dir.join("layout");
    let out = pull_cmd(
        &layout,
        &ca,
        &images[1..2],
        &["--images", list.to_str().unwrap(), "--auth-file", &auth],
    );
    assert!(out.status.success(), "pull: {}", text(&out));
    let mut expected: Vec<String> = images.clone();
    expected.sort();
    assert_eq!(ref_names(&layout), expected);
    assert!(summary_bytes(&out, "fetched") > 1_000_000);

    // The same into an archive.
    let archive = env.dir.join("bundle.tar");
    let out = pull_cmd(&archive, &ca, &images, &["--auth-file", &auth, "--quiet"]);
    assert!(out.status.success(), "pull into an archive: {}", text(&out));
    assert!(archive.is_file());
    assert!(!env.dir.join("bundle.tar.partial").exists());

    // Pushed to the mirror, at the paths containerd's `_default` mirror is asked for.
    let out = push_cmd(&layout, &env.mirror.front.url, &ca, Some(PASSWORD), &[]);
    assert!(out.status.success(), "push: {}", text(&out));
    assert!(
        !text(&out).contains(PASSWORD),
        "the password reached the output"
    );
    let sent = summary_bytes(&out, "sent");
    assert!(sent > 1_000_000, "{}", text(&out));
    assert!(
        text(&out).contains("1 blobs mounted"),
        "the layer shared by pause and library/app was not mounted: {}",
        text(&out)
    );
    for ((_, digest), path) in corpus
        .iter()
        .zip(["pause:3.10", "multi:v1", "library/app:1.0"])
    {
        assert_eq!(&env.skopeo_digest(path), digest, "{path}");
    }
    assert_eq!(assert_pullable(&env.mirror()).await, 5);
    // skopeo pulls every platform back.
    let back = env.dir.join("back");
    let out = env.skopeo(&[
        "copy",
        "--all",
        "--src-cert-dir",
        env.tls.cert_dir.to_str().unwrap(),
        "--src-creds",
        &format!("{USER}:{PASSWORD}"),
        &format!("docker://127.0.0.1:{}/multi:v1", env.mirror.front.port),
        &format!("oci:{}:v1", back.display()),
    ]);
    assert!(out.status.success(), "skopeo copy back: {}", text(&out));

    // Pushing again sends nothing.
    let out = push_cmd(&layout, &env.mirror.front.url, &ca, Some(PASSWORD), &[]);
    assert!(out.status.success(), "second push: {}", text(&out));
    assert_eq!(summary_bytes(&out, "sent"), 0, "{}", text(&out));

    // `ro` pulls the images back with `mirror pull`, digests unchanged.
    let ro_auth = env.dir.join("ro-config.json");
    std::fs::write(
        &ro_auth,
        format!(
            r#"{{"auths": {{"127.0.0.1:{}": {{"auth": "{}"}}}}}}"#,
            env.mirror.front.port,
            base64_encode(&format!("{RO_USER}:{RO_PASSWORD}"))
        ),
    )
    .unwrap();
    let pulled_back = env.dir.join("pulled-back");
    let mirror_refs: Vec<String> = ["pause:3.10", "multi:v1", "library/app:1.0"]
        .iter()
        .map(|p| format!("127.0.0.1:{}/{p}", env.mirror.front.port))
        .collect();
    let out = pull_cmd(
        &pulled_back,
        &ca,
        &mirror_refs,
        &["--auth-file", ro_auth.to_str().unwrap()],
    );
    assert!(out.status.success(), "pull back as ro: {}", text(&out));
    assert!(
        !text(&out).contains(RO_PASSWORD),
        "the password reached the output"
    );
    let back_digests = ref_digests(&pulled_back);
    for ((_, digest), reference) in corpus.iter().zip(&mirror_refs) {
        assert_eq!(back_digests.get(reference), Some(digest), "{reference}");
    }

    // The archive pushes the same content into a fresh replica; `ro` reads it back.
    let fresh = Replica::start(&env.dir.join("fresh"), &env.tls, &mirror_users(), false);
    let out = push_cmd(&archive, &fresh.front.url, &ca, Some(PASSWORD), &[]);
    assert!(out.status.success(), "push of the archive: {}", text(&out));
    let fresh_client = client(&fresh.front.url, Some(&env.ca()), Some(ro_credentials()));
    let digests = tag_digests(&fresh_client).await;
    for ((_, digest), (repo, tag)) in
        corpus
            .iter()
            .zip([("pause", "3.10"), ("multi", "v1"), ("library/app", "1.0")])
    {
        assert_eq!(
            digests.get(&(repo.into(), tag.into())),
            Some(digest),
            "{repo}:{tag}"
        );
    }
    assert_eq!(assert_pullable(&fresh_client).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_filter_and_skopeo_layouts() {
    let env = Env::new();
    let corpus = env.corpus().await;
    let ca = env.tls.ca_file.clone();

    // One platform of an index: the platform's own manifest is recorded.
    let layout = env.dir.join("arm");
    let out = pull_cmd(
        &layout,
        &ca,
        &[corpus[1].0.clone()],
        &["--platform", "linux/arm64"],
    );
    assert!(out.status.success(), "pull --platform: {}", text(&out));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let out = pull_cmd(
        &layout,
        &ca,
        &[corpus[1].0.clone()],
        &["--platform", "linux/s390x"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no manifest for platform linux/s390x")
            && text(&out).contains("linux/amd64"),
        "{}",
        text(&out)
    );

    // A layout made by skopeo: its ref names are only tags.
    let skopeo_layout = env.dir.join("skopeo-layout");
    let out = env.skopeo(&[
        "copy",
        "--all",
        "--preserve-digests",
        "--src-cert-dir",
        env.tls.cert_dir.to_str().unwrap(),
        &format!("docker://{}", corpus[1].0),
        &format!("oci:{}:v1", skopeo_layout.display()),
    ]);
    assert!(out.status.success(), "skopeo copy: {}", text(&out));
    let out = push_cmd(
        &skopeo_layout,
        &env.mirror.front.url,
        &ca,
        Some(PASSWORD),
        &[],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("--repository"), "{}", text(&out));
    let out = push_cmd(
        &skopeo_layout,
        &env.mirror.front.url,
        &ca,
        Some(PASSWORD),
        &["--repository", "registry.k8s.io/multi"],
    );
    assert!(out.status.success(), "push --repository: {}", text(&out));
    assert_eq!(env.skopeo_digest("multi:v1"), corpus[1].1);
    assert_eq!(assert_pullable(&env.mirror()).await, 3);
}

/// Waits until `done` or the child exits; returns whether the child was still running.
fn until(child: &mut Child, what: &str, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if done() {
            return true;
        }
        assert!(Instant::now() < deadline, "{what} did not happen");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn kill9(child: &mut Child) {
    let status = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pull_and_push_resume_with_fewer_bytes() {
    let env = Env::new();
    let ca = env.tls.ca_file.clone();
    let small = random_bytes(10, 8 << 20);
    let big = random_bytes(11, 64 << 20);
    let image = Image::new("amd64", vec![small.clone(), big.clone()], false);
    image.push(&env.up1(), "big", "v1").await;
    let total = (small.len() + big.len()) as u64;
    let reference = env.ref1("big:v1");
    let layout = env.dir.join("layout");
    let blob_file = |data: &[u8]| layout.join("blobs/sha256").join(&sha256(data)[7..]);

    // Pull, killed once the small layer is in and the big one is not.
    let mut child = bin()
        .arg("pull")
        .arg(&reference)
        .arg("--to")
        .arg(&layout)
        .arg("--ca-file")
        .arg(&ca)
        .spawn()
        .unwrap();
    let running = until(&mut child, "the small layer landing", || {
        blob_file(&small).exists()
    });
    let big_done = blob_file(&big).exists();
    kill9(&mut child);
    assert!(
        running && !big_done,
        "the pull finished before it could be killed"
    );
    assert!(
        !layout.join("index.json").exists() || ref_names(&layout).is_empty(),
        "an unfinished image was recorded"
    );
    let out = pull_cmd(&layout, &ca, std::slice::from_ref(&reference), &[]);
    assert!(out.status.success(), "resumed pull: {}", text(&out));
    let fetched = summary_bytes(&out, "fetched");
    assert!(
        fetched < total && summary_bytes(&out, "present") >= small.len() as u64,
        "the resumed pull fetched {fetched} of {total} bytes: {}",
        text(&out)
    );

    // Push, killed once the small layer is in the mirror and before the tag is.
    let mirror = env.mirror();
    let small_digest = sha256(&small).parse().unwrap();
    let mut cmd = bin();
    cmd.arg("push")
        .arg("--from")
        .arg(&layout)
        .args([
            "--to",
            &env.mirror.front.url,
            "--username",
            USER,
            "--password-stdin",
        ])
        .arg("--ca-file")
        .arg(&ca)
        .stdin(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    writeln!(child.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    let handle = tokio::runtime::Handle::current();
    let running = until(&mut child, "the small layer reaching the mirror", || {
        tokio::task::block_in_place(|| {
            handle
                .block_on(mirror.blob_exists("big", &small_digest))
                .unwrap_or(false)
        })
    });
    kill9(&mut child);
    assert!(running, "the push finished before it could be killed");
    // No tag points at a manifest whose blobs are missing.
    if mirror.head_manifest("big", "v1").await.unwrap().is_some() {
        assert_pullable(&mirror).await;
    }
    let out = push_cmd(&layout, &env.mirror.front.url, &ca, Some(PASSWORD), &[]);
    assert!(out.status.success(), "resumed push: {}", text(&out));
    let sent = summary_bytes(&out, "sent");
    assert!(
        sent < total && summary_bytes(&out, "skipped") >= small.len() as u64,
        "the resumed push sent {sent} of {total} bytes: {}",
        text(&out)
    );
    assert_eq!(assert_pullable(&mirror).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_clear_errors() {
    let env = Env::new();
    let corpus = env.corpus().await;
    let ca = env.tls.ca_file.clone();
    let layout = env.dir.join("layout");

    // Unknown image, next to a good one: the good one is copied, the bad one named.
    let unknown = env.ref1("nope:1");
    let out = pull_cmd(&layout, &ca, &[corpus[0].0.clone(), unknown.clone()], &[]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains(&format!("failed: {unknown}")) && t.contains("not found"),
        "{t}"
    );
    assert_eq!(ref_names(&layout), vec![corpus[0].0.clone()]);

    // Bad digests: malformed, and well-formed but absent.
    let out = pull_cmd(&layout, &ca, &[env.ref1("pause@sha256:abc")], &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("bad digest"), "{}", text(&out));
    let absent = format!("{}@sha256:{}", env.ref1("pause"), "0".repeat(64));
    let out = pull_cmd(&layout, &ca, &[absent], &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not found"), "{}", text(&out));

    // A registry that needs credentials none were given for.
    let out = pull_cmd(&layout, &ca, &[corpus[2].0.clone()], &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("credentials"), "{}", text(&out));

    // Unreachable registries.
    let out = pull_cmd(&layout, &ca, &["127.0.0.1:9/x:1".to_string()], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("failed: 127.0.0.1:9/x:1"),
        "{}",
        text(&out)
    );
    let out = push_cmd(&layout, "https://127.0.0.1:9", &ca, Some(PASSWORD), &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot reach the registry"),
        "{}",
        text(&out)
    );

    // Wrong and missing passwords.
    let out = push_cmd(
        &layout,
        &env.mirror.front.url,
        &ca,
        Some("wrong-password"),
        &[],
    );
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("credentials refused"), "{t}");
    assert!(
        !t.contains("wrong-password"),
        "the password reached the output"
    );
    let out = push_cmd(&layout, &env.mirror.front.url, &ca, None, &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("asks for credentials"),
        "{}",
        text(&out)
    );

    // `ro` may pull but not push: the front refuses with 403, the image is named, and
    // nothing reaches the registry behind it.
    let out = push_cmd_as(
        RO_USER,
        &layout,
        &env.mirror.front.url,
        &ca,
        Some(RO_PASSWORD),
        &[],
    );
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains(&format!("failed: {}", corpus[0].0))
            && t.contains("refused (HTTP 403)")
            && t.contains("may only pull"),
        "{t}"
    );
    assert!(!t.contains(RO_PASSWORD), "the password reached the output");
    let ro = client(
        &env.mirror.front.url,
        Some(&env.ca()),
        Some(ro_credentials()),
    );
    assert!(ro.head_manifest("pause", "3.10").await.unwrap().is_none());
    assert!(
        ro.catalog().await.unwrap().is_empty(),
        "a repository was created"
    );
    let storage = env
        .mirror
        .registry
        .root
        .join("docker/registry/v2/repositories");
    assert!(
        std::fs::read_dir(&storage).map_or(true, |mut d| d.next().is_none()),
        "the refused push left something in {}",
        storage.display()
    );

    // `--to` not a registry URL.
    for to in [
        format!("127.0.0.1:{}", env.mirror.front.port),
        format!("{}/v2/pause", env.mirror.front.url),
    ] {
        let out = push_cmd(&layout, &to, &ca, Some(PASSWORD), &[]);
        assert!(!out.status.success());
        assert!(text(&out).contains("registry URL"), "{to}: {}", text(&out));
    }

    // Layouts not found or corrupt.
    let out = push_cmd(
        &env.dir.join("none"),
        &env.mirror.front.url,
        &ca,
        Some(PASSWORD),
        &[],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("not found"), "{}", text(&out));
    let empty = env.dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = push_cmd(&empty, &env.mirror.front.url, &ca, Some(PASSWORD), &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("index.json missing"), "{}", text(&out));

    // A blob whose content does not match its digest: the image fails, and no tag is left.
    let manifest: serde_json::Value = {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let digest = index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        serde_json::from_slice(
            &std::fs::read(layout.join("blobs/sha256").join(&digest[7..])).unwrap(),
        )
        .unwrap()
    };
    let layer = manifest["layers"][1]["digest"].as_str().unwrap();
    let path = layout.join("blobs/sha256").join(&layer[7..]);
    let mut content = std::fs::read(&path).unwrap();
    content[100] ^= 0xff;
    std::fs::write(&path, content).unwrap();
    let out = push_cmd(&layout, &env.mirror.front.url, &ca, Some(PASSWORD), &[]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains(&format!("failed: {}", corpus[0].0))
            && t.contains(layer)
            && t.contains("does not match its digest"),
        "{t}"
    );
    assert!(
        env.mirror()
            .head_manifest("pause", "3.10")
            .await
            .unwrap()
            .is_none()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_a_pushed_image_through_the_default_mirror() {
    tools();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n");
    assert!(root, "this test runs containerd: it needs root");
    let tmp = tempfile::Builder::new()
        .prefix("mirror")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path();
    let tls = TestTls::new(&dir.join("tls"));
    // The registry logs what containerd asks for through the front.
    let mirror = Replica::start(&dir.join("mirror"), &tls, &mirror_users(), true);
    // A layout with an oras-style full name, as if pulled from registry.k8s.io.
    let layout = dir.join("layout");
    let image = Image::new("amd64", vec![random_bytes(20, 200_000)], false);
    write_oci_layout(&layout, "registry.k8s.io/pause:3.10", &[("amd64", &image)]);
    let out = push_cmd(
        &layout,
        &mirror.front.url,
        &tls.ca_file,
        Some(PASSWORD),
        &[],
    );
    assert!(out.status.success(), "push: {}", text(&out));

    // The node's `_default` hosts.toml as GeneratePatches writes it, with the `ro` user.
    let hosts = dir.join("certs.d");
    std::fs::create_dir_all(hosts.join("_default")).unwrap();
    let authorization = format!(
        "Basic {}",
        base64_encode(&format!("{RO_USER}:{RO_PASSWORD}"))
    );
    let toml = registry_addon::hooks::patches::containerd::hosts_toml(
        &mirror.front.url,
        tls.ca_file.to_str().unwrap(),
        Some(&authorization),
    );
    std::fs::write(hosts.join("_default/hosts.toml"), toml).unwrap();

    let (_containerd, socket) = start_containerd(&dir.join("containerd"));
    let out = Command::new("ctr")
        .args(["--address", socket.to_str().unwrap()])
        .args([
            "--namespace",
            "mirror-test",
            "content",
            "fetch",
            "--all-platforms",
        ])
        .arg("--hosts-dir")
        .arg(&hosts)
        .arg("registry.k8s.io/pause:3.10")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctr fetch through the mirror: {}",
        text(&out)
    );
    let log = std::fs::read_to_string(&mirror.registry.log).unwrap();
    assert!(
        log.contains("/v2/pause/manifests/3.10?ns=registry.k8s.io"),
        "containerd did not ask the mirror for pause:3.10: {log}"
    );
    let layer = sha256(&image.layers[0]);
    assert!(
        log.contains(&format!("GET /v2/pause/blobs/{layer}?ns=registry.k8s.io")),
        "the layer did not come from the mirror: {log}"
    );
}

/// haproxy in TCP mode over `backends`, with source affinity: what kube-proxy does for the
/// `registry` Service with `sessionAffinity: ClientIP`.
fn start_balancer(dir: &Path, backends: &[u16]) -> (Running, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, p)| format!("  server r{i} 127.0.0.1:{p}\n"))
        .collect();
    let config = format!(
        "global\n  maxconn 512\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n\
         frontend registry\n  bind 127.0.0.1:{port}\n  default_backend replicas\n\
         backend replicas\n  balance source\n{servers}"
    );
    let file = dir.join("haproxy.cfg");
    std::fs::write(&file, config).unwrap();
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy must be installed (Debian package haproxy)");
    let running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "haproxy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (running, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_through_a_balancer_over_three_replicas() {
    let env = Env::new();
    let corpus = env.corpus().await;
    let ca = env.tls.ca_file.clone();
    let replicas: Vec<Replica> = (0..3)
        .map(|i| {
            Replica::start(
                &env.dir.join(format!("replica{i}")),
                &env.tls,
                &mirror_users(),
                false,
            )
        })
        .collect();
    let ports: Vec<u16> = replicas.iter().map(|r| r.front.port).collect();
    let (_balancer, port) = start_balancer(&env.dir.join("haproxy"), &ports);
    let layout = env.dir.join("layout");
    let images: Vec<String> = corpus.iter().map(|(r, _)| r.clone()).collect();
    let auth = env.auth_file.to_str().unwrap().to_string();
    let out = pull_cmd(&layout, &ca, &images, &["--auth-file", &auth]);
    assert!(out.status.success(), "pull: {}", text(&out));

    let url = format!("https://127.0.0.1:{port}");
    let out = push_cmd(&layout, &url, &ca, Some(PASSWORD), &[]);
    assert!(
        out.status.success(),
        "push through the balancer: {}",
        text(&out)
    );
    // Read back through the balancer, as nodes would: as `ro`.
    let creds = ro_credentials();
    let through = client(&url, Some(&env.ca()), Some(creds.clone()));
    for ((_, digest), (repo, tag)) in
        corpus
            .iter()
            .zip([("pause", "3.10"), ("multi", "v1"), ("library/app", "1.0")])
    {
        let head = through.head_manifest(repo, tag).await.unwrap();
        assert_eq!(
            head.and_then(|h| h.digest).map(|d| d.to_string()).as_ref(),
            Some(digest),
            "{repo}:{tag}"
        );
    }
    // The whole push reached one replica: none holds half an image.
    let mut holding = 0;
    for r in &replicas {
        let c = client(&r.front.url, Some(&env.ca()), Some(creds.clone()));
        let n = assert_pullable(&c).await;
        assert!(
            n == 0 || n == 5,
            "replica {} holds {n} manifests",
            r.front.url
        );
        holding += usize::from(n == 5);
    }
    assert_eq!(holding, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_bearer_and_corrupting_upstreams() {
    let env = Env::new();
    let ca = env.tls.ca_file.clone();
    let plain = RegistryProcess::start(&env.dir.join("plain"), &RegistryOptions::default());
    let plain_client = client(&plain.url, None, None);
    let image = Image::new("amd64", vec![random_bytes(30, 200_000)], false);
    image.push(&plain_client, "pause", "3.10").await;
    let layout = env.dir.join("layout");
    // The fronts below run on this test's runtime: wait for the binary off it.
    let pull = |image: String, extra: Vec<String>| {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        tokio::task::block_in_place(|| pull_cmd(&layout, &ca, &[image], &extra))
    };

    // A plain-HTTP registry on loopback.
    let out = pull(format!("127.0.0.1:{}/pause:3.10", plain.port), vec![]);
    assert!(out.status.success(), "pull over plain HTTP: {}", text(&out));

    // Bearer tokens, as Docker Hub hands out, for the credentials of a config.json.
    let bearer = Front::start(
        &plain.url,
        FrontOptions {
            bearer: Some(("bob".into(), "t0ken-pw".into())),
            ..FrontOptions::default()
        },
    )
    .await;
    let host = bearer.url.trim_start_matches("http://").to_string();
    let auth_file = env.dir.join("bearer.json");
    std::fs::write(
        &auth_file,
        format!(r#"{{"auths": {{"{host}": {{"username": "bob", "password": "t0ken-pw"}}}}}}"#),
    )
    .unwrap();
    let reference = format!("{host}/pause:3.10");
    let out = pull(reference.clone(), vec![]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("failed: {reference}")),
        "{}",
        text(&out)
    );
    let out = pull(
        reference.clone(),
        vec!["--auth-file".into(), auth_file.display().to_string()],
    );
    assert!(
        out.status.success(),
        "pull with Bearer tokens: {}",
        text(&out)
    );
    assert!(bearer.tokens_issued() > 0);
    assert!(ref_names(&layout).contains(&reference));

    // An upstream whose blobs do not match their digest.
    let corrupt = Front::start(
        &plain.url,
        FrontOptions {
            corrupt_blobs: true,
            ..FrontOptions::default()
        },
    )
    .await;
    let fresh = env.dir.join("fresh");
    let reference = format!("{}/pause:3.10", corrupt.url.trim_start_matches("http://"));
    let out = tokio::task::block_in_place(|| {
        pull_cmd(&fresh, &ca, std::slice::from_ref(&reference), &[])
    });
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains(&format!("failed: {reference}")) && t.contains("digest mismatch"),
        "{t}"
    );
    let layer = sha256(&image.layers[0]);
    assert!(!fresh.join("blobs/sha256").join(&layer[7..]).exists());
    assert!(!fresh.join("index.json").exists() || ref_names(&fresh).is_empty());
}
