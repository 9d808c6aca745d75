//! `registry-addon render`, run as a process. The output is compared with `tests/golden/` after
//! the fields that change on every run (the issued certificate and its hash) are normalised.
//! Regenerate the golden files with `UPDATE_GOLDEN=1 cargo test --test render`.

use std::process::Command;

use base64::Engine;
use registry_addon::certs::CertInfo;
use serde::Deserialize;
use serde_json::{Value, json};

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn render(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_registry-addon"))
        .arg("render")
        .args(args)
        .output()
        .expect("run registry-addon render");
    assert!(
        out.status.success(),
        "render {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

fn unb64(value: &Value) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.as_str().expect("string"))
        .expect("base64");
    String::from_utf8(bytes).expect("UTF-8")
}

/// Replaces what differs between runs: the issued certificate and its hash.
fn normalise(docs: &mut [Value]) {
    for doc in docs.iter_mut() {
        if doc["kind"] == "Secret" && doc["metadata"]["name"] == "registry-tls" {
            doc["data"]["tls.crt"] = json!("<issued certificate>");
        }
        // Digest of freshly generated (and redacted) hashes.
        if doc["kind"] == "Secret" && doc["metadata"]["name"] == "registry-auth" {
            doc["metadata"]["annotations"]["registry-addon/users-source"] = json!("<source>");
        }
        if doc["kind"] == "HelmChartProxy"
            && let Some(values) = doc["spec"]["valuesTemplate"].as_str()
        {
            let values: String = values
                .lines()
                .map(|line| match line.split_once("certificateHash:") {
                    Some((indent, _)) => format!("{indent}certificateHash: <sha256>\n"),
                    None => format!("{line}\n"),
                })
                .collect();
            doc["spec"]["valuesTemplate"] = json!(values);
        }
    }
}

fn check_golden(name: &str, docs: &[Value]) {
    let mut text = String::new();
    for doc in docs {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(doc).expect("YAML"));
    }
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(format!("{}/tests/golden", env!("CARGO_MANIFEST_DIR")))
            .expect("golden dir");
        std::fs::write(&path, &text).expect("write golden");
        return;
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        golden == text,
        "render output differs from {path} (regenerate with UPDATE_GOLDEN=1 cargo test --test render):\n{text}"
    );
}

#[test]
fn helmchartproxy_golden() {
    // Versions pinned so the golden file does not change with the crate version.
    let out = render(&[
        "-f",
        &fixture("cluster.yaml"),
        "--root-ca-dir",
        &fixture("root-ca"),
        "--chart-version",
        "1.0.0",
        "--sync-image",
        "example.com/registry-addon:1.0.0",
    ]);
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    let mut docs = documents(&out);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Secret",
            "Secret",
            "Secret",
            "Secret",
            "Namespace",
            "Secret",
            "Secret",
            "HelmChartProxy"
        ]
    );
    // Passwords, hashes and the node file holding the ro password are redacted.
    for doc in &docs {
        if doc["kind"] == "Secret" {
            for (key, value) in doc["data"].as_object().unwrap() {
                if !(key.ends_with(".crt") || key == "username") {
                    assert_eq!(value, "<redacted>", "{key} of {}", doc["metadata"]["name"]);
                }
            }
        }
    }

    // The certificate chains to the given root CA and carries the hooks' SANs.
    let tls = &docs[6];
    assert_eq!(tls["data"]["tls.key"], "<redacted>");
    let info = CertInfo::from_pem(&unb64(&tls["data"]["tls.crt"])).unwrap();
    let root =
        registry_addon::render::load_root_ca(std::path::Path::new(&fixture("root-ca"))).unwrap();
    assert!(info.is_signed_by(&root));
    assert!(info.names.ips.contains(&"10.96.0.20".parse().unwrap()));

    normalise(&mut docs);
    check_golden("render-helmchartproxy.yaml", &docs);
}

#[test]
fn generated_root_ca_is_printed_redacted() {
    let out = render(&["-f", &fixture("cluster-v1beta1.json")]);
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    let docs = documents(&out);
    assert_eq!(docs[0]["metadata"]["name"], "registry-addon-root-ca");
    assert_eq!(docs[0]["data"]["tls.key"], "<redacted>");
    assert_eq!(
        docs[1]["metadata"]["ownerReferences"][0]["apiVersion"],
        "cluster.x-k8s.io/v1beta1"
    );
    assert_eq!(
        docs[1]["metadata"]["ownerReferences"][0]["uid"],
        "00000000-0000-0000-0000-000000005678"
    );
}

#[test]
fn show_secrets_prints_matching_keys() {
    let out = render(&["-f", &fixture("cluster-v1beta2.json"), "--show-secrets"]);
    let docs = documents(&out);
    let tls = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "registry-tls")
        .unwrap();
    let key = unb64(&tls["data"]["tls.key"]);
    assert!(key.contains("PRIVATE KEY"));
    let info = CertInfo::from_pem(&unb64(&tls["data"]["tls.crt"])).unwrap();
    assert!(info.key_matches(&key));
    // The node's hosts.toml carries the ro password shown in the ro Secret.
    let secret = |name: &str| docs.iter().find(|d| d["metadata"]["name"] == name).unwrap();
    let ro = unb64(&secret("wl-1-registry-addon-ro")["data"]["password"]);
    assert_eq!(ro.len(), 40);
    let hosts = unb64(&secret("wl-1-registry-addon-containerd")["data"]["hosts.toml"]);
    let header = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("ro:{ro}"))
    );
    assert!(hosts.contains(&header), "{hosts}");
}

#[test]
fn direct_deployer_prints_the_registry_objects() {
    let out = render(&[
        "-f",
        &fixture("cluster.yaml"),
        "--root-ca-dir",
        &fixture("root-ca"),
        "--deployer",
        "direct",
    ]);
    let docs = documents(&out);
    assert!(docs.iter().all(|d| d["kind"] != "HelmChartProxy"));
    let kinds: Vec<&str> = docs
        .iter()
        .take(7)
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "Secret",
            "Secret",
            "Secret",
            "Secret",
            "Namespace",
            "Secret",
            "Secret"
        ]
    );
    for doc in &docs[7..] {
        // The node agent's ClusterRole and its binding are cluster-scoped.
        if doc["kind"] != "ClusterRole" && doc["kind"] != "ClusterRoleBinding" {
            assert_eq!(doc["metadata"]["namespace"], "registry-system", "{doc}");
        }
        // What `serve` applies, so a later switch to the HelmChartProxy deployer adopts it.
        let meta = &doc["metadata"];
        assert_eq!(
            meta["labels"]["app.kubernetes.io/managed-by"], "Helm",
            "{doc}"
        );
        assert_eq!(
            meta["annotations"]["meta.helm.sh/release-name"], "registry",
            "{doc}"
        );
        assert_eq!(
            meta["annotations"]["meta.helm.sh/release-namespace"], "registry-system",
            "{doc}"
        );
    }
}

#[test]
fn stdin_and_errors() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_registry-addon"))
        .args(["render", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"kind: Cluster\nmetadata: {name: c1}\nspec:\n  clusterNetwork: {services: {cidrBlocks: [10.96.0.0/12]}}\n  topology:\n    variables: [{name: clusterConfig, value: {addons: {registry: {replicas: 9}}}}]\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("addons.registry.replicas"), "{stderr}");
}

/// The fixture Cluster with `registry` as its variable's `addons.registry`.
fn cluster_with(registry: Value) -> String {
    let text = std::fs::read_to_string(fixture("cluster.yaml")).expect("fixture");
    let mut cluster: Value = serde_yaml::from_str(&text).expect("fixture YAML");
    cluster["spec"]["topology"]["variables"][0]["value"]["addons"]["registry"] = registry;
    serde_json::to_string(&cluster).expect("JSON")
}

fn render_stdin(input: &str, args: &[&str]) -> String {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_registry-addon"))
        .args(["render", "-f", "-", "--root-ca-dir", &fixture("root-ca")])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run registry-addon render");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("render output");
    assert!(
        out.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn every_mode_renders_with_both_deployers() {
    let upstream = json!({
        "url": "https://upstream.example:5443/team",
        "credentialsSecretRef": {"name": "upstream-creds"},
        "caSecretRef": {"name": "upstream-ca"},
    });
    let cases = [
        (
            "Local",
            json!({}),
            vec![
                "Service registry-headless",
                "Service registry",
                "PodDisruptionBudget registry",
                "StatefulSet registry",
            ],
        ),
        (
            "Proxy",
            json!({"mode": "Proxy", "upstream": upstream, "cache": {"ttl": "72h"}}),
            vec![
                "Service registry-headless",
                "Service registry",
                "PodDisruptionBudget registry",
                "StatefulSet registry",
            ],
        ),
        (
            "Direct",
            json!({"mode": "Direct", "upstream": upstream}),
            vec![
                "Service registry",
                "PodDisruptionBudget registry-direct",
                "Deployment registry-direct",
            ],
        ),
        ("Unmanaged", json!({"mode": "Unmanaged"}), vec![]),
    ];
    for (mode, registry, workload) in cases {
        let input = cluster_with(registry);
        let docs = documents(&render_stdin(&input, &["--deployer", "direct"]));
        let names: Vec<String> = docs
            .iter()
            .filter(|d| {
                d["metadata"]["name"] != "registry-node-agent"
                    && d["kind"] != "Secret"
                    && d["kind"] != "Namespace"
            })
            .map(|d| {
                format!(
                    "{} {}",
                    d["kind"].as_str().unwrap(),
                    d["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(names, workload, "{mode}");
        // The node agent in every mode.
        assert!(docs.iter().any(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "registry-node-agent"), "{mode}");
        let upstream_secret = docs
            .iter()
            .find(|d| d["metadata"]["name"] == "registry-upstream");
        assert_eq!(
            upstream_secret.is_some(),
            mode == "Proxy" || mode == "Direct",
            "{mode}"
        );
        if let Some(secret) = upstream_secret {
            assert_eq!(secret["data"]["password"], "<redacted>");
            assert_eq!(
                unb64(&secret["data"]["ca.crt"]),
                "<key ca.crt of secret team-a/upstream-ca>"
            );
        }
        // The nodes' hosts file: the _default mirror in Local, the upstream host's otherwise.
        let proxy = documents(&render_stdin(&input, &[]));
        let hcp = proxy
            .iter()
            .find(|d| d["kind"] == "HelmChartProxy")
            .unwrap();
        let values: Value =
            serde_yaml::from_str(hcp["spec"]["valuesTemplate"].as_str().unwrap()).unwrap();
        assert_eq!(values["mode"], mode);
        if mode == "Proxy" || mode == "Direct" {
            assert_eq!(values["upstream"]["url"], "https://upstream.example:5443");
            // registry:2.8.3 by default: no proxy.ttl.
            assert_eq!(values["upstream"]["cacheTTL"], "");
        }
    }
    let bad = cluster_with(json!({"mode": "Proxy"}));
    let out = Command::new(env!("CARGO_BIN_EXE_registry-addon"))
        .args(["render", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(bad.as_bytes())?;
            child.wait_with_output()
        })
        .expect("render");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("addons.registry.upstream: required in mode Proxy"),
        "{stderr}"
    );
}
