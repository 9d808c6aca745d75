//! The node configuration of GeneratePatches against a real containerd (Debian `containerd`,
//! `ctr`) and a real registry (Debian `docker-registry`), both started here on loopback:
//! an image is fetched through the generated `hosts.toml` with the CA of the extension, and
//! not with another CA; the configure script makes containerd read `config_path`.
//!
//! Needs root (containerd), `containerd`, `ctr`, `docker-registry` and `skopeo` on PATH
//! (`.ci/run` installs them); without them the tests fail, saying what is missing.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod sync_support;

use sync_support::containerd::start_containerd;

use registry_addon::addon::users::Credentials;
use registry_addon::certs::{CertificateAuthority, registry_subject_names};
use registry_addon::cli::KeyAlgorithm;
use registry_addon::hooks::patches::containerd;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

const TOOLS: [&str; 4] = ["containerd", "ctr", "docker-registry", "skopeo"];

fn tools_present() -> bool {
    let missing: Vec<_> = TOOLS
        .iter()
        .filter(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
        })
        .collect();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if missing.is_empty() && root {
        return true;
    }
    panic!(
        "containerd tests need root and {TOOLS:?} on PATH (apt-get install containerd \
         docker-registry skopeo): missing {missing:?}, root: {root}"
    );
}

fn write(path: &Path, content: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An OCI image layout holding `v1`: one layer, its config and manifest.
fn image_layout(dir: &Path) {
    let blob = |bytes: &[u8]| {
        let d = digest(bytes);
        write(&dir.join("blobs/sha256").join(&d[7..]), bytes);
        d
    };
    let layer = b"registry-addon test layer".to_vec();
    let layer_digest = blob(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]}
    }))
    .unwrap();
    let config_digest = blob(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}]
    }))
    .unwrap();
    let manifest_digest = blob(&manifest);
    write(&dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "v1"}
        }]
    });
    write(&dir.join("index.json"), serde_json::to_vec(&index).unwrap());
}

/// A registry replica as the chart runs it: Distribution on the loopback, the front before it
/// serving a certificate issued by `ca` with the users ro and rw, holding `app:v1` (pushed as
/// rw).
struct Replica {
    front: sync_support::FrontProcess,
    _registry: sync_support::RegistryProcess,
}

const RO_PASSWORD: &str = "ro-password-for-the-nodes-0123456789";
const RW_PASSWORD: &str = "rw-password-for-pushing-0123456789ab";

fn start_registry(dir: &Path, ca: &CertificateAuthority) -> (Replica, u16) {
    let subject = registry_subject_names(2, IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20)));
    let server = ca
        .issue_server(&subject, KeyAlgorithm::EcdsaP256, OffsetDateTime::now_utc())
        .unwrap();
    write(&dir.join("tls.crt"), &server.cert_pem);
    write(&dir.join("tls.key"), server.key_pem.expose());
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
    let port = front.port;

    let layout = dir.join("layout");
    image_layout(&layout);
    let certs = dir.join("push-certs");
    write(&certs.join("ca.crt"), ca.cert_pem());
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--insecure-policy",
            "--dest-cert-dir",
            certs.to_str().unwrap(),
            "--dest-creds",
            &format!("rw:{RW_PASSWORD}"),
        ])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://127.0.0.1:{port}/app:v1"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        Replica {
            front,
            _registry: registry,
        },
        port,
    )
}

/// `certs.d` as GeneratePatches writes it (the `hosts.toml` of the management Secret), with
/// the loopback registry as the mirror and `ro` as the credentials, when given.
fn hosts_dir(dir: &Path, port: u16, ca_pem: &str, ro: Option<&Credentials>) -> PathBuf {
    let certs = dir.join("certs.d");
    let ca_file = certs.join(format!("127.0.0.1:{port}")).join("ca.crt");
    write(&ca_file, ca_pem);
    let authorization = ro.map(Credentials::basic_header);
    let hosts = containerd::hosts_toml(
        &format!("https://127.0.0.1:{port}"),
        ca_file.to_str().unwrap(),
        authorization.as_deref(),
    );
    write(&certs.join("_default/hosts.toml"), hosts);
    certs
}

/// `ctr content fetch` of an image whose own registry is unreachable (nothing listens on
/// 127.0.0.1:9), so only the mirror can serve it.
fn fetch(socket: &Path, hosts: &Path) -> std::process::Output {
    Command::new("ctr")
        .args([
            "--address",
            socket.to_str().unwrap(),
            "--namespace",
            "registry-addon-test",
            "content",
            "fetch",
        ])
        .args(["--hosts-dir", hosts.to_str().unwrap()])
        .arg("127.0.0.1:9/app:v1")
        .output()
        .unwrap()
}

#[test]
fn containerd_pulls_through_the_generated_hosts_toml() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("ra")
        .tempdir_in("/tmp")
        .unwrap();
    let ca =
        CertificateAuthority::generate(KeyAlgorithm::EcdsaP256, OffsetDateTime::now_utc()).unwrap();
    let (replica, port) = start_registry(&dir.path().join("registry"), &ca);
    let (_containerd, socket) = start_containerd(&dir.path().join("containerd"));
    let ro = Credentials {
        username: "ro".into(),
        password: RO_PASSWORD.into(),
    };

    // Without the ro credentials, or with a wrong password, the mirror refuses the node.
    let wrong = Credentials {
        username: "ro".into(),
        password: "not-the-password".into(),
    };
    for (case, creds) in [("no credentials", None), ("a wrong password", Some(&wrong))] {
        let hosts = hosts_dir(&dir.path().join(case), port, ca.cert_pem(), creds);
        let out = fetch(&socket, &hosts);
        assert!(
            !out.status.success(),
            "fetch with {case} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let refused = replica.front.metrics();
    assert!(
        refused.contains("registry_addon_front_refused_total{reason=\"unauthenticated\"}"),
        "{refused}"
    );

    let good = hosts_dir(&dir.path().join("good"), port, ca.cert_pem(), Some(&ro));
    let out = fetch(&socket, &good);
    assert!(
        out.status.success(),
        "fetch through the mirror failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let other =
        CertificateAuthority::generate(KeyAlgorithm::EcdsaP256, OffsetDateTime::now_utc()).unwrap();
    let bad = hosts_dir(&dir.path().join("bad"), port, other.cert_pem(), Some(&ro));
    let out = Command::new("ctr")
        .args([
            "--address",
            socket.to_str().unwrap(),
            "--namespace",
            "registry-addon-test",
            "images",
            "rm",
            "127.0.0.1:9/app:v1",
        ])
        .output()
        .unwrap();
    let _ = out;
    let out = Command::new("ctr")
        .args([
            "--address",
            socket.to_str().unwrap(),
            "--namespace",
            "registry-addon-test",
            "content",
            "prune",
            "references",
        ])
        .output()
        .unwrap();
    let _ = out;
    let out = fetch(&socket, &bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("x509") || stderr.contains("certificate"),
        "the mirror was not refused for its certificate: {stderr}"
    );
    assert!(
        !out.status.success(),
        "fetch with a CA that did not sign the registry's certificate succeeded"
    );
}

/// Runs the configure script on a node tree under `root` with `config` as containerd's main
/// configuration (none when `None`), twice, and returns what `containerd config dump` reads.
fn configure_node(root: &Path, config: Option<&str>) -> String {
    let ip = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20));
    let hosts = containerd::default_hosts_toml(
        ip,
        &Credentials {
            username: "ro".into(),
            password: "pw".into(),
        },
    );
    configure_node_with(root, config, &hosts)
}

/// [`configure_node`] with `hosts` as the bootstrap hosts Secret's content.
fn configure_node_with(root: &Path, config: Option<&str>, hosts: &str) -> String {
    let ip = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20));
    let files = containerd::node_files(
        ip,
        "wl-1-registry-addon-ca",
        "wl-1-registry-addon-containerd",
    );
    for file in files {
        let content = match &file.content {
            containerd::FileContent::Content(text) => text.clone(),
            // What the bootstrap provider would read from the Secrets.
            containerd::FileContent::ContentFrom { secret } => match secret.key.as_str() {
                "hosts.toml" => hosts.to_string(),
                "ca.crt" => "ca".to_string(),
                other => panic!("unexpected Secret key {other}"),
            },
        };
        write(&root.join(file.path.trim_start_matches('/')), &content);
    }
    let main = root.join("etc/containerd/config.toml");
    if let Some(config) = config {
        write(&main, config.replace("@ROOT@", root.to_str().unwrap()));
    }
    let script = root.join(containerd::script_path().trim_start_matches('/'));
    let mut after_first = String::new();
    for run in 0..2 {
        let out = Command::new("sh")
            .arg(&script)
            .env("REGISTRY_ADDON_ROOT", root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "configure script: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let now = std::fs::read_to_string(&main).unwrap();
        if run == 0 {
            after_first = now;
        } else {
            assert_eq!(now, after_first, "a second run changed the configuration");
        }
    }
    let out = Command::new("containerd")
        .args(["--config", main.to_str().unwrap(), "config", "dump"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "containerd refused the configuration:\n{after_first}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn configure_script_makes_containerd_read_config_path() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("no-config", None),
        (
            "no-imports",
            Some(
                "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.9\"\n",
            ),
        ),
        ("empty-imports", Some("version = 2\nimports = []\n")),
        (
            "other-imports",
            Some("version = 2\nimports = [\"@ROOT@/etc/containerd/other.toml\"]\n"),
        ),
        (
            "image-builder-glob",
            Some("version = 2\nimports = [\"@ROOT@/etc/containerd/conf.d/*.toml\"]\n"),
        ),
    ];
    for (name, config) in cases {
        let root = dir.path().join(name);
        if name == "other-imports" {
            write(&root.join("etc/containerd/other.toml"), "version = 2\n");
        }
        let dump: toml::Table = toml::from_str(&configure_node(&root, config)).unwrap();
        let path = &dump["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"];
        assert_eq!(path.as_str(), Some("/etc/containerd/certs.d"), "{name}");
        // Local's hosts file placed in _default, root only.
        let placed = root.join("etc/containerd/certs.d/_default/hosts.toml");
        let mode = std::fs::metadata(&placed).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
}

/// The bootstrap files are the same in every mode: the configure script places the hosts
/// file where its `server` says, and places nothing for an empty one (Unmanaged).
#[test]
fn configure_script_places_the_hosts_file_of_every_mode() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ip = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20));
    let ro = Credentials {
        username: "ro".into(),
        password: "pw".into(),
    };
    let route = containerd::Route::Host("harbor.example.com:5443".into());
    let proxy = containerd::bootstrap_hosts_toml(Some(&route), ip, &ro);
    let root = dir.path().join("proxy");
    configure_node_with(&root, None, &proxy);
    let certs = root.join("etc/containerd/certs.d");
    assert_eq!(
        std::fs::read_to_string(certs.join("harbor.example.com:5443/hosts.toml")).unwrap(),
        proxy
    );
    assert!(!certs.join("_default").exists());

    // Docker Hub as the upstream: containerd looks its images up under docker.io.
    let route = containerd::Route::Host("registry-1.docker.io".into());
    let hub = containerd::bootstrap_hosts_toml(Some(&route), ip, &ro);
    assert!(
        hub.contains("server = \"https://registry-1.docker.io\""),
        "{hub}"
    );
    let root = dir.path().join("hub");
    configure_node_with(&root, None, &hub);
    let certs = root.join("etc/containerd/certs.d");
    assert_eq!(
        std::fs::read_to_string(certs.join("docker.io/hosts.toml")).unwrap(),
        hub
    );

    let root = dir.path().join("unmanaged");
    configure_node_with(&root, None, "");
    let certs = root.join("etc/containerd/certs.d");
    let dirs: Vec<_> = std::fs::read_dir(&certs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(dirs, ["10.96.0.20"], "only the CA's directory");
}
