//! The container image as `hack/build-image.sh` writes it (an OCI archive), imported into a
//! real containerd (Debian `containerd`, `ctr`, runc) started here with its own root, state
//! and socket, and run with a read-only root filesystem as the image's user: every command
//! starts, `serve` answers discovery on its defaults and with mounted TLS files, `sync --once`
//! copies between two `docker-registry` processes, `render -f` reads a mounted Cluster.
//!
//! The archive is `$REGISTRY_ADDON_IMAGE_ARCHIVE`, else `image/registry-addon.tar` under the
//! target dir; `.ci/run` builds it first. Needs root, `containerd`, `ctr`, `runc`, `buildah`,
//! `docker-registry`, `curl` and `nsenter` (util-linux); without them the tests fail, saying
//! what is missing.

mod sync_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use sync_support::{
    Image, RegistryOptions, RegistryProcess, TestTls, client, free_port, random_bytes, tag_digests,
};

/// Every subcommand of the binary: each must start in the image (`--help`).
const COMMANDS: &[&[&str]] = &[
    &["serve"],
    &["sync"],
    &["front"],
    &["render"],
    &["mirror", "pull"],
    &["mirror", "push"],
    &["node-agent"],
];

const TOOLS: [&str; 7] = [
    "containerd",
    "ctr",
    "runc",
    "buildah",
    "docker-registry",
    "curl",
    "nsenter",
];

/// Compressed size the image must stay under (layers and config, as a registry stores them).
const MAX_COMPRESSED: u64 = 25 << 20;

const NAMESPACE: &str = "registry-addon-image-test";

const DISCOVERY: &str = "/hooks.runtime.cluster.x-k8s.io/v1alpha1/discovery";

fn archive_path() -> PathBuf {
    if let Some(path) = std::env::var_os("REGISTRY_ADDON_IMAGE_ARCHIVE") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("image/registry-addon.tar")
}

/// The archive, once the tools are known to be there.
fn archive() -> PathBuf {
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
        "image tests need root and {TOOLS:?} on PATH (apt-get install containerd runc buildah \
         docker-registry curl util-linux): missing {missing:?}, root: {root}"
    );
    let path = archive_path();
    assert!(
        path.is_file(),
        "no image archive at {}: build it with hack/build-image.sh (needs buildah), or set \
         REGISTRY_ADDON_IMAGE_ARCHIVE",
        path.display()
    );
    path
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The archive unpacked: its index, the image's manifest and config, and its layers.
struct Unpacked {
    dir: tempfile::TempDir,
    name: String,
    manifest: Value,
    config: Value,
}

impl Unpacked {
    fn new(archive: &Path) -> Unpacked {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tar -xf {}: {}",
            archive.display(),
            text(&out)
        );
        let blob = |digest: &Value| -> Vec<u8> {
            let digest = digest.as_str().unwrap();
            std::fs::read(dir.path().join("blobs/sha256").join(&digest[7..])).unwrap()
        };
        let json = |bytes: Vec<u8>| -> Value { serde_json::from_slice(&bytes).unwrap() };
        let index = json(std::fs::read(dir.path().join("index.json")).unwrap());
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1, "one image in the archive: {index}");
        let name = manifests[0]["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .expect("the archive names its image")
            .to_string();
        let manifest = json(blob(&manifests[0]["digest"]));
        let config = json(blob(&manifest["config"]["digest"]));
        Unpacked {
            dir,
            name,
            manifest,
            config,
        }
    }

    fn layer_files(&self) -> Vec<PathBuf> {
        self.manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let digest = l["digest"].as_str().unwrap();
                self.dir.path().join("blobs/sha256").join(&digest[7..])
            })
            .collect()
    }

    /// The image's entrypoint followed by `args`: `ctr run` with arguments replaces the
    /// whole command, where `docker run` keeps the entrypoint.
    fn command(&self, args: &[&str]) -> Vec<String> {
        let mut command: Vec<String> = self.config["config"]["Entrypoint"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        command.extend(args.iter().map(|a| a.to_string()));
        command
    }
}

/// A private containerd holding the imported image.
struct Containerd {
    socket: PathBuf,
    image: Unpacked,
    // Dropped after every container of the test, since those are declared later.
    _process: sync_support::containerd::Containerd,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        let archive = archive();
        let image = Unpacked::new(&archive);
        // A short path: containerd's socket paths must fit in 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("ri")
            .tempdir_in("/tmp")
            .unwrap();
        let (process, socket) = sync_support::containerd::start_containerd(dir.path());
        let containerd = Containerd {
            socket,
            image,
            _process: process,
            dir,
        };
        let out = containerd
            .ctr()
            .args(["images", "import"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctr images import {}: {}",
            archive.display(),
            text(&out)
        );
        containerd
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE]);
        cmd
    }

    /// `ctr run --rm OPTIONS IMAGE ID [COMMAND]`; no command runs the image's own.
    fn run_command(&self, id: &str, options: &[String], command: Option<&[&str]>) -> Command {
        let mut cmd = self.ctr();
        cmd.args(["run", "--rm"]).args(options);
        cmd.arg(&self.image.name).arg(id);
        if let Some(args) = command {
            cmd.args(self.image.command(args));
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs a container to its end, as `docker run --read-only --network host`.
    fn run(&self, id: &str, mounts: &[String], args: &[&str]) -> Output {
        let mut options = vec!["--read-only".to_string(), "--net-host".to_string()];
        options.extend(mounts.iter().cloned());
        self.run_command(id, &options, Some(args)).output().unwrap()
    }

    /// Starts a long-running container; its output goes to files in the test's directory.
    fn spawn(&self, id: &str, options: &[String], command: Option<&[&str]>) -> Container<'_> {
        let pid_file = self.dir.path().join(format!("{id}.pid"));
        let log = self.dir.path().join(format!("{id}.log"));
        let mut options = options.to_vec();
        options.push(format!("--pid-file={}", pid_file.display()));
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .run_command(id, &options, command)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut container = Container {
            containerd: self,
            id: id.to_string(),
            child: Some(child),
            log,
            pid: 0,
        };
        wait_for(&format!("container {id}"), Duration::from_secs(20), || {
            container.assert_running();
            std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .map(|pid| container.pid = pid)
                .is_some()
        });
        container
    }
}

/// A running container, killed when dropped.
struct Container<'a> {
    containerd: &'a Containerd,
    id: String,
    child: Option<Child>,
    log: PathBuf,
    pid: u32,
}

impl Container<'_> {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("container {} ended ({status}):\n{}", self.id, self.log());
        }
    }

    /// The user and group the container's process runs as, from `/proc`.
    fn ids(&self) -> (String, String) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_else(|e| {
                panic!(
                    "container {}: process {} gone ({e}):\n{}",
                    self.id,
                    self.pid,
                    self.log()
                )
            });
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        (field("Uid:"), field("Gid:"))
    }

    /// A file inside the container, read through the process's root.
    fn file(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.pid))
    }

    fn signal(&self, signal: &str) {
        let _ = self
            .containerd
            .ctr()
            .args(["task", "kill", "--signal", signal, &self.id])
            .output();
    }

    /// Sends SIGTERM, as `docker stop` does, and returns how the container ended.
    fn stop(mut self) -> std::process::ExitStatus {
        self.signal("SIGTERM");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                self.child = Some(child);
                panic!(
                    "container {} did not stop within 10s of SIGTERM:\n{}",
                    self.id,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.signal("SIGKILL");
            // `ctr run --rm` deletes the task and container once the process is gone.
            let _ = child.wait();
        }
    }
}

fn bind(src: &Path, dst: &str) -> String {
    format!(
        "--mount=type=bind,src={},dst={dst},options=rbind:ro",
        src.display()
    )
}

/// `curl` of the discovery endpoint, optionally from inside the network namespace of `pid`.
fn discovery(netns_of: Option<u32>, port: u16, ca_file: &Path) -> Option<String> {
    let mut cmd = match netns_of {
        Some(pid) => {
            let mut cmd = Command::new("nsenter");
            cmd.args(["--target", &pid.to_string(), "--net", "--", "curl"]);
            cmd
        }
        None => Command::new("curl"),
    };
    let out = cmd
        .args(["-sS", "--max-time", "5", "-X", "POST", "--cacert"])
        .arg(ca_file)
        .arg(format!("https://127.0.0.1:{port}{DISCOVERY}"))
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn dockerfile_builds_both_images_from_one_image_stage() {
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    // Stages: (FROM line, instructions after it).
    let mut stages: Vec<(&str, Vec<&str>)> = Vec::new();
    let mut preamble = Vec::new();
    for line in &lines {
        if line.starts_with("FROM ") {
            stages.push((line, Vec::new()));
        } else if let Some((_, body)) = stages.last_mut() {
            body.push(line);
        } else {
            preamble.push(*line);
        }
    }
    assert_eq!(preamble, ["ARG ROOTFS=compiled"], "{dockerfile}");
    let stage = |from: &str| {
        stages
            .iter()
            .find(|(f, _)| *f == from)
            .unwrap_or_else(|| panic!("no stage `{from}` in the Dockerfile"))
            .1
            .clone()
    };
    // The two sources of the root filesystem add nothing but the tree hack/image-rootfs.sh
    // laid out; everything else about the image is in the one last stage.
    assert_eq!(
        stage("FROM scratch AS rootfs-compiled"),
        ["COPY --from=build /rootfs/ /"]
    );
    assert_eq!(stage("FROM scratch AS rootfs-prebuilt"), ["COPY rootfs/ /"]);
    let (last_from, last) = stages.last().unwrap();
    assert_eq!(*last_from, "FROM rootfs-${ROOTFS}");
    for line in last {
        let instruction = line.split_whitespace().next().unwrap();
        assert!(
            [
                "USER",
                "EXPOSE",
                "ENTRYPOINT",
                "CMD",
                "ENV",
                "LABEL",
                "WORKDIR"
            ]
            .contains(&instruction),
            "the image stage adds files, which one of its builds would not have: {line}"
        );
    }
    assert!(
        stages
            .iter()
            .find(|(from, _)| from.ends_with(" AS build"))
            .expect("a stage `build`")
            .1
            .iter()
            .any(|l| l.starts_with("RUN image-rootfs.sh /rootfs ")),
        "the build stage lays out /rootfs with hack/image-rootfs.sh"
    );
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/build-image.sh"))
            .unwrap();
    assert!(script.contains("hack/image-rootfs.sh \"$out/context/rootfs\""));
    assert!(script.contains("--build-arg ROOTFS=prebuilt"));
}

#[test]
fn image_holds_what_its_commands_need_and_stays_small() {
    let image = Unpacked::new(&archive());
    let config = &image.config["config"];
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/registry-addon"])
    );
    assert_eq!(
        config["Cmd"],
        serde_json::json!([
            "serve",
            "--listen=0.0.0.0:9443",
            "--metrics-listen=0.0.0.0:9440"
        ])
    );
    for port in ["9443/tcp", "9440/tcp"] {
        assert!(config["ExposedPorts"].get(port).is_some(), "{config}");
    }
    assert_eq!(image.config["architecture"], "amd64");

    let compressed: u64 = image.manifest["config"]["size"].as_u64().unwrap()
        + image.manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .sum::<u64>();
    eprintln!(
        "image {}: {:.1} MiB compressed",
        image.name,
        compressed as f64 / (1 << 20) as f64
    );
    assert!(
        compressed <= MAX_COMPRESSED,
        "the image is {compressed} bytes compressed, over {MAX_COMPRESSED}"
    );

    // Every file of every layer, with its mode and owner, e.g.
    // `drwxrwxrwt 0/0 0 2026-01-01 00:00 tmp`.
    let mut entries = Vec::new();
    let rootfs = image.dir.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    for layer in image.layer_files() {
        let out = Command::new("tar")
            .arg("-tvzf")
            .arg(&layer)
            .output()
            .unwrap();
        assert!(out.status.success(), "tar -tvzf: {}", text(&out));
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let path = fields[5].trim_start_matches("./").trim_end_matches('/');
            entries.push((
                path.to_string(),
                fields[0].to_string(),
                fields[1].to_string(),
            ));
        }
        let out = Command::new("tar")
            .arg("-xzf")
            .arg(&layer)
            .arg("-C")
            .arg(&rootfs)
            .output()
            .unwrap();
        assert!(out.status.success(), "tar -xzf: {}", text(&out));
    }
    entries.sort();
    let paths: Vec<&str> = entries.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "etc",
            "etc/group",
            "etc/passwd",
            "etc/ssl",
            "etc/ssl/certs",
            "etc/ssl/certs/ca-certificates.crt",
            "tmp",
            "usr",
            "usr/local",
            "usr/local/bin",
            "usr/local/bin/registry-addon",
        ]
    );
    let mode = |path: &str| {
        let (_, mode, owner) = entries.iter().find(|(p, _, _)| p == path).unwrap();
        format!("{mode} {owner}")
    };
    assert_eq!(mode("tmp"), "drwxrwxrwt 0/0");
    assert_eq!(mode("usr/local/bin/registry-addon"), "-rwxr-xr-x 0/0");
    let read = |path: &str| std::fs::read_to_string(rootfs.join(path)).unwrap();
    assert!(
        read("etc/passwd")
            .lines()
            .any(|l| l.starts_with("nonroot:x:65532:65532:"))
    );
    assert!(read("etc/group").lines().any(|l| l == "nonroot:x:65532:"));
    let roots = read("etc/ssl/certs/ca-certificates.crt")
        .matches("-----BEGIN CERTIFICATE-----")
        .count();
    assert!(roots > 50, "only {roots} CA roots in the image");
}

#[test]
fn every_command_starts_in_the_image() {
    let containerd = Containerd::start();
    let out = containerd.run("version", &[], &["--version"]);
    assert!(out.status.success(), "--version: {}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("registry-addon {}\n", env!("CARGO_PKG_VERSION"))
    );
    for command in COMMANDS {
        let id = format!("help-{}", command.join("-"));
        let mut args = command.to_vec();
        args.push("--help");
        let out = containerd.run(&id, &[], &args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        let usage = format!("Usage: registry-addon {}", command.join(" "));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&usage),
            "{args:?}: {}",
            text(&out)
        );
    }
}

/// `docker run IMAGE`: the image's own command, in a network namespace of its own (so its
/// fixed ports stay off the host), reached with `nsenter`.
#[test]
fn serve_answers_discovery_on_its_defaults() {
    let containerd = Containerd::start();
    let ca_in_tmp = "/tmp/registry-addon-serving-ca.crt";

    // The image's /tmp, writable by its user.
    let serve = containerd.spawn("defaults", &[], None);
    assert_eq!(serve.ids(), ("65532".to_string(), "65532".to_string()));
    let ca = serve.file(ca_in_tmp);
    wait_for("serve on its defaults", Duration::from_secs(20), || {
        ca.exists() && discovery(Some(serve.pid), 9443, &ca).is_some()
    });
    let body = discovery(Some(serve.pid), 9443, &ca).unwrap();
    assert!(body.contains(r#""kind":"DiscoveryResponse""#), "{body}");
    assert!(serve.log().contains(ca_in_tmp), "{}", serve.log());
    let status = serve.stop();
    assert!(
        status.success(),
        "serve did not exit cleanly on SIGTERM: {status}"
    );

    // `docker run --read-only --tmpfs /tmp IMAGE`.
    let tmpfs = "--mount=type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev:mode=1777".to_string();
    let serve = containerd.spawn("read-only", &["--read-only".into(), tmpfs], None);
    let ca = serve.file(ca_in_tmp);
    wait_for(
        "serve read-only with a tmpfs",
        Duration::from_secs(20),
        || ca.exists() && discovery(Some(serve.pid), 9443, &ca).is_some(),
    );
    drop(serve);

    // Read-only without a writable /tmp: the error names the file.
    let out = containerd
        .run_command("no-tmp", &["--read-only".into()], None)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot write the self-signed CA to {ca_in_tmp}")),
        "{}",
        text(&out)
    );
}

#[test]
fn serve_with_mounted_tls_answers_over_the_host_network() {
    let containerd = Containerd::start();
    let tmp = tempfile::tempdir().unwrap();
    let tls = TestTls::new(&tmp.path().join("tls"));
    let (port, metrics_port) = (free_port(), free_port());
    let listen = format!("--listen=127.0.0.1:{port}");
    let metrics = format!("--metrics-listen=127.0.0.1:{metrics_port}");
    let options = [
        "--read-only".to_string(),
        "--net-host".to_string(),
        bind(&tls.dir, "/tls"),
    ];
    let serve = containerd.spawn(
        "tls",
        &options,
        Some(&[
            "serve",
            &listen,
            &metrics,
            "--tls-cert-file=/tls/tls.crt",
            "--tls-key-file=/tls/tls.key",
        ]),
    );
    assert_eq!(serve.ids(), ("65532".to_string(), "65532".to_string()));
    wait_for("serve with mounted TLS", Duration::from_secs(20), || {
        discovery(None, port, &tls.ca_file).is_some()
    });
    let body = discovery(None, port, &tls.ca_file).unwrap();
    assert!(body.contains(r#""kind":"DiscoveryResponse""#), "{body}");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{metrics_port}/healthz"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok\n",
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_once_copies_between_registries() {
    let containerd = Containerd::start();
    let tmp = tempfile::tempdir().unwrap();
    let tls = TestTls::new(&tmp.path().join("tls"));
    let options = RegistryOptions {
        tls: Some(&tls),
        ..RegistryOptions::default()
    };
    let peer = RegistryProcess::start(&tmp.path().join("peer"), &options);
    let local = RegistryProcess::start(&tmp.path().join("local"), &options);
    let ca = tls.ca_pem();
    let p = client(&peer.url, Some(&ca), None);
    let image = Image::new(
        "amd64",
        vec![random_bytes(1, 1 << 20), random_bytes(2, 300_000)],
        false,
    );
    image.push(&p, "team/app", "v1").await;
    let expected = tag_digests(&p).await;

    // As the registry's sync sidecar runs it: the registry CA from a mounted Secret.
    let out = containerd.run(
        "sync",
        &[bind(&tls.dir, "/tls")],
        &[
            "sync",
            "--once",
            "--local",
            &local.url,
            "--peer",
            &peer.url,
            "--ca-file=/tls/ca.pem",
        ],
    );
    assert!(out.status.success(), "sync --once: {}", text(&out));
    let l = client(&local.url, Some(&ca), None);
    assert_eq!(tag_digests(&l).await, expected);

    // Without --ca-file the image's CA roots are used: they do not hold the test CA, and
    // once it is mounted in their place, the same sync succeeds.
    let second = RegistryProcess::start(&tmp.path().join("second"), &options);
    let args = [
        "sync",
        "--once",
        "--local",
        &second.url,
        "--peer",
        &peer.url,
        "--attempts=1",
    ];
    let out = containerd.run("sync-roots", &[], &args);
    assert!(
        !out.status.success(),
        "a registry of an unknown CA was trusted: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("UnknownIssuer"),
        "{}",
        text(&out)
    );
    let roots = bind(&tls.ca_file, "/etc/ssl/certs/ca-certificates.crt");
    let out = containerd.run("sync-mounted-roots", &[roots], &args);
    assert!(
        out.status.success(),
        "sync --once with the CA as the roots: {}",
        text(&out)
    );
    let s = client(&second.url, Some(&ca), None);
    assert_eq!(tag_digests(&s).await, expected);
}

#[test]
fn render_reads_a_mounted_cluster() {
    let containerd = Containerd::start();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let out = containerd.run(
        "render",
        &[bind(&fixtures, "/fixtures")],
        &["render", "-f", "/fixtures/cluster.yaml"],
    );
    assert!(out.status.success(), "render: {}", text(&out));
    let host = Command::new(env!("CARGO_BIN_EXE_registry-addon"))
        .args(["render", "-f"])
        .arg(fixtures.join("cluster.yaml"))
        .output()
        .unwrap();
    assert!(host.status.success(), "render on the host: {}", text(&host));
    // The same objects as the binary built here (certificates differ: each run makes a CA).
    let objects = |yaml: &[u8]| -> Vec<(String, String)> {
        serde_yaml::Deserializer::from_slice(yaml)
            .map(|doc| {
                let doc = Value::deserialize(doc).unwrap();
                (
                    doc["kind"].as_str().unwrap_or_default().to_string(),
                    doc["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
    };
    let objects_in_image = objects(&out.stdout);
    assert!(
        objects_in_image
            .iter()
            .any(|(kind, _)| kind == "HelmChartProxy"),
        "{objects_in_image:?}"
    );
    assert_eq!(objects_in_image, objects(&host.stdout));
}
