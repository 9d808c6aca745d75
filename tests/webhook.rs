//! The Runtime SDK server as CAPI's runtime client calls it: TLS verified against the CA,
//! HTTP/2 and HTTP/1.1, no Content-Type, `?timeout=10s`. Every response is checked against
//! both Runtime SDK schemas.

mod schema;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use registry_addon::cli::{Cli, Command};
use registry_addon::hooks::Management;
use registry_addon::webhook::server::{Running, start_with};
use schema::assert_valid_response;
use serde_json::{Value, json};

const PREFIX: &str = "/hooks.runtime.cluster.x-k8s.io/v1alpha1";

fn serve_args(extra: &[&str]) -> registry_addon::cli::ServeArgs {
    let mut argv = vec![
        "registry-addon",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).expect("valid flags").command {
        Command::Serve(args) => args,
        _ => unreachable!(),
    }
}

struct Server {
    running: Running,
    ca_pem: String,
    _dir: tempfile::TempDir,
}

async fn start(extra: &[&str]) -> Server {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    let mut args: Vec<&str> = vec!["--self-signed-ca-file", ca_file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let running = start_with(
        serve_args(&args),
        Management::Unavailable("no management cluster in this test".into()),
    )
    .await
    .expect("server starts");
    let ca_pem = std::fs::read_to_string(&ca_file).unwrap();
    Server {
        running,
        ca_pem,
        _dir: dir,
    }
}

/// A client that trusts only `ca_pem` and offers `h2` (or only `http/1.1`) through ALPN.
fn client(ca_pem: &str, http2: bool) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let builder = reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20));
    let builder = if http2 { builder } else { builder.http1_only() };
    builder.build().unwrap()
}

use rustls_pki_types::pem::PemObject;

fn url(server: &Server, path: &str) -> String {
    format!(
        "https://localhost:{}{PREFIX}/{path}",
        server.running.addr.port()
    )
}

/// POSTs like CAPI: no Content-Type header, the timeout in the query.
async fn post(
    client: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    client
        .post(format!("{url}?timeout=10s"))
        .body(body)
        .send()
        .await
        .expect("request reaches the server")
}

async fn post_json(client: &reqwest::Client, url: &str, body: Vec<u8>) -> Value {
    let response = post(client, url, body).await;
    assert_eq!(response.status(), 200, "{url}");
    assert!(
        response
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/json")
    );
    let value: Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).expect("JSON response");
    assert_valid_response(&value);
    value
}

fn fixture_cluster(version: &str) -> Value {
    let path = format!(
        "{}/../shared/capi/fixtures/cluster-{version}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn with_registry(mut cluster: Value, registry: Value) -> Value {
    let vars = cluster["spec"]["topology"]["variables"]
        .as_array_mut()
        .unwrap();
    for var in vars.iter_mut() {
        if var["name"] == "clusterConfig" {
            var["value"]["addons"]["registry"] = registry.clone();
        }
    }
    cluster
}

fn lifecycle_body(kind: &str, cluster: Value) -> Vec<u8> {
    let mut body = json!({
        "apiVersion": "hooks.runtime.cluster.x-k8s.io/v1alpha1",
        "kind": kind,
        "settings": {"deployer": "direct"},
        "cluster": cluster,
    });
    if kind == "BeforeClusterUpgradeRequest" {
        body["fromKubernetesVersion"] = json!("v1.33.1");
        body["toKubernetesVersion"] = json!("v1.34.0");
    }
    serde_json::to_vec(&body).unwrap()
}

const LIFECYCLE: [(&str, &str); 4] = [
    (
        "beforeclustercreate/before-cluster-create",
        "BeforeClusterCreate",
    ),
    (
        "aftercontrolplaneinitialized/after-control-plane-initialized",
        "AfterControlPlaneInitialized",
    ),
    (
        "beforeclusterupgrade/before-cluster-upgrade",
        "BeforeClusterUpgrade",
    ),
    (
        "beforeclusterdelete/before-cluster-delete",
        "BeforeClusterDelete",
    ),
];

#[tokio::test]
async fn discovery_over_http2_and_http1_with_a_verified_ca() {
    let server = start(&[]).await;
    for http2 in [true, false] {
        let client = client(&server.ca_pem, http2);
        let response = post(&client, &url(&server, "discovery"), "{}").await;
        let expected = if http2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(response.version(), expected);
        assert_eq!(response.status(), 200);
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_valid_response(&body);
        assert_eq!(body["status"], "Success");
        let handlers = body["handlers"].as_array().unwrap();
        assert_eq!(handlers.len(), 7);
        for handler in handlers {
            let hook = handler["requestHook"]["hook"].as_str().unwrap();
            let name = handler["name"].as_str().unwrap();
            assert_eq!(handler["failurePolicy"], "Fail");
            // Every advertised handler is routed.
            let path = format!("{}/{name}", hook.to_ascii_lowercase());
            let answer = post_json(&client, &url(&server, &path), b"{}".to_vec()).await;
            assert_eq!(answer["kind"], format!("{hook}Response"));
        }
    }
    // An empty body is an empty DiscoveryRequest.
    let body = post_json(
        &client(&server.ca_pem, true),
        &url(&server, "discovery"),
        Vec::new(),
    )
    .await;
    assert_eq!(body["status"], "Success");

    // A client that does not trust the CA is refused at the handshake.
    let other = registry_addon::webhook::tls::self_signed(&[]).unwrap();
    let untrusting = client(&other.ca_pem, true);
    assert!(
        untrusting
            .post(url(&server, "discovery"))
            .send()
            .await
            .is_err()
    );
    server.running.shutdown().await;
}

#[tokio::test]
async fn lifecycle_hooks_answer_capi_requests() {
    let server = start(&[]).await;
    let client = client(&server.ca_pem, true);
    for version in ["v1beta1", "v1beta2"] {
        for (path, hook) in LIFECYCLE {
            let kind = format!("{hook}Request");
            // Addon on, management cluster unreachable: Failure saying so, never a fake Success.
            let body = lifecycle_body(&kind, fixture_cluster(version));
            let answer = post_json(&client, &url(&server, path), body).await;
            assert_eq!(answer["status"], "Failure", "{answer}");
            assert!(
                answer["message"]
                    .as_str()
                    .unwrap()
                    .contains("management cluster unreachable"),
                "{answer}"
            );

            // Addon off: a no-op success.
            let mut off = fixture_cluster(version);
            off["spec"]["topology"]["variables"] = json!([]);
            let answer = post_json(&client, &url(&server, path), lifecycle_body(&kind, off)).await;
            assert_eq!(answer["status"], "Success", "{answer}");

            // Invalid variable: Failure naming the field.
            let bad = with_registry(fixture_cluster(version), json!({"replicas": 9}));
            let answer = post_json(&client, &url(&server, path), lifecycle_body(&kind, bad)).await;
            assert_eq!(answer["status"], "Failure");
            assert_eq!(
                answer["message"],
                "cluster default/wl-1: invalid variable clusterConfig: addons.registry.replicas: must be an integer from 1 to 7"
            );
        }
    }
    server.running.shutdown().await;
}

#[tokio::test]
async fn topology_hooks_answer() {
    let server = start(&[]).await;
    let client = client(&server.ca_pem, false);

    let answer = post_json(
        &client,
        &url(&server, "discovervariables/discover-variables"),
        br#"{"apiVersion":"hooks.runtime.cluster.x-k8s.io/v1alpha1","kind":"DiscoverVariablesRequest","settings":{}}"#.to_vec(),
    )
    .await;
    assert_eq!(answer["variables"][0]["name"], "clusterConfig");

    let validate = |registry: Value| {
        serde_json::to_vec(&json!({
            "kind": "ValidateTopologyRequest",
            "variables": [{"name": "clusterConfig", "value": {"addons": {"registry": registry}}}],
            "items": [],
        }))
        .unwrap()
    };
    let path = url(&server, "validatetopology/validate-topology");
    let ok = post_json(&client, &path, validate(json!({"replicas": 3}))).await;
    assert_eq!(ok["status"], "Success");
    let bad = post_json(
        &client,
        &path,
        validate(json!({"storage": {"size": "huge"}})),
    )
    .await;
    assert_eq!(bad["status"], "Failure");
    assert!(
        bad["message"]
            .as_str()
            .unwrap()
            .contains("addons.registry.storage.size")
    );

    // GeneratePatches with the addon off: no patches.
    let answer = post_json(
        &client,
        &url(&server, "generatepatches/generate-patches"),
        br#"{"kind":"GeneratePatchesRequest","variables":[],"items":[]}"#.to_vec(),
    )
    .await;
    assert_eq!(answer["status"], "Success");
    server.running.shutdown().await;
}

/// What CAPI could send wrong, and what each gets.
#[tokio::test]
async fn bad_inputs_get_clear_answers_and_the_server_stays_up() {
    let server = start(&[]).await;
    let client = client(&server.ca_pem, true);
    let bcc = url(&server, "beforeclustercreate/before-cluster-create");
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let valid = lifecycle_body("BeforeClusterCreateRequest", fixture_cluster("v1beta2"));
    let truncated = valid[..valid.len() / 2].to_vec();
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes();
    let deep_object = format!(
        "{{\"cluster\":{}1{}}}",
        "{\"a\":".repeat(5000),
        "}".repeat(5000)
    )
    .into_bytes();
    let wrong_kind = lifecycle_body("BeforeClusterDeleteRequest", fixture_cluster("v1beta2"));
    let mut wrong_version: Value = serde_json::from_slice(&valid).unwrap();
    wrong_version["apiVersion"] = json!("hooks.runtime.cluster.x-k8s.io/v1beta9");
    let no_cluster = br#"{"kind":"BeforeClusterCreateRequest"}"#.to_vec();
    let cluster_not_object = br#"{"cluster":"wl-1"}"#.to_vec();
    // Positional fields in an array: a derived struct would take them, the addon must not.
    let cluster_array = serde_json::to_vec(&json!({
        "cluster": ["cluster.x-k8s.io/v1beta2", {"name": "c", "namespace": "n", "uid": "u"}]
    }))
    .unwrap();
    let no_uid =
        serde_json::to_vec(&json!({"cluster": {"metadata": {"name": "c", "namespace": "n"}}}))
            .unwrap();
    let bad_name = serde_json::to_vec(
        &json!({"cluster": {"metadata": {"name": "Bad_Name", "namespace": "n", "uid": "u"}}}),
    )
    .unwrap();
    let bad_variable = lifecycle_body(
        "BeforeClusterCreateRequest",
        with_registry(
            fixture_cluster("v1beta1"),
            json!({"serviceIP": "not-an-ip"}),
        ),
    );
    let registry_not_object = lifecycle_body(
        "BeforeClusterCreateRequest",
        with_registry(fixture_cluster("v1beta1"), json!("yes")),
    );
    let json_scalar = b"42".to_vec();

    let table: Vec<(&str, Vec<u8>, &str)> = vec![
        ("random bytes", random, "request body is not valid JSON"),
        (
            "truncated JSON",
            truncated,
            "request body is not valid JSON",
        ),
        (
            "5,000-deep array",
            deep,
            "request body must be a BeforeClusterCreateRequest object, not a JSON array",
        ),
        // Skipped without recursion: the answer names what is really missing.
        (
            "5,000-deep object",
            deep_object,
            "cluster.metadata.name: required",
        ),
        (
            "wrong kind",
            wrong_kind,
            "kind \"BeforeClusterDeleteRequest\" sent to the BeforeClusterCreate handler",
        ),
        (
            "wrong apiVersion",
            serde_json::to_vec(&wrong_version).unwrap(),
            "apiVersion \"hooks.runtime.cluster.x-k8s.io/v1beta9\"",
        ),
        ("no cluster", no_cluster, "cluster: required"),
        (
            "cluster not an object",
            cluster_not_object,
            "cluster: must be an object",
        ),
        (
            "cluster as an array",
            cluster_array,
            "cluster: must be an object",
        ),
        (
            "cluster without uid",
            no_uid,
            "cluster.metadata.uid: required",
        ),
        (
            "cluster with a bad name",
            bad_name,
            "cluster.metadata.name: \"Bad_Name\" is not a DNS-1123 subdomain",
        ),
        (
            "bad serviceIP",
            bad_variable,
            "addons.registry.serviceIP: \"not-an-ip\" is not an IP address",
        ),
        (
            "registry not an object",
            registry_not_object,
            "addons.registry: must be an object",
        ),
        (
            "JSON scalar",
            json_scalar,
            "request body must be a BeforeClusterCreateRequest object",
        ),
    ];
    for (case, body, expected) in table {
        let answer = post_json(&client, &bcc, body).await;
        assert_eq!(answer["status"], "Failure", "{case}: {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(
            message.contains(expected),
            "{case}: {message:?} lacks {expected:?}"
        );
    }

    // Valid JSON that is not an object is refused by every hook, not only the lifecycle ones.
    for path in [
        "beforeclustercreate/before-cluster-create",
        "afterControlPlaneInitialized/after-control-plane-initialized",
        "generatepatches/generate-patches",
        "validatetopology/validate-topology",
        "discovervariables/discover-variables",
    ] {
        let path = path.to_lowercase();
        for body in ["[]", "\"x\"", "5", " [1, 2]", "null", "true"] {
            let answer = post_json(&client, &url(&server, &path), body.as_bytes().to_vec()).await;
            assert_eq!(answer["status"], "Failure", "{path} {body}: {answer}");
            assert!(
                answer["message"]
                    .as_str()
                    .unwrap()
                    .contains("request body must be a"),
                "{path} {body}: {answer}"
            );
        }
    }

    // Over the body limit: a clean 413, declared or streamed.
    let big = vec![b' '; 11 * 1024 * 1024];
    let response = post(&client, &bcc, big.clone()).await;
    assert_eq!(response.status(), 413);
    let stream = futures::stream::iter(
        big.chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let response = post(&client, &bcc, reqwest::Body::wrap_stream(stream)).await;
    assert_eq!(response.status(), 413);

    // Unknown paths and methods are not hooks.
    let response = post(&client, &url(&server, "beforeclustercreate/nope"), "{}").await;
    assert_eq!(response.status(), 404);
    let response = post(
        &client,
        &format!("https://localhost:{}/other", server.running.addr.port()),
        "{}",
    )
    .await;
    assert_eq!(response.status(), 404);
    let response = client.get(url(&server, "discovery")).send().await.unwrap();
    assert_eq!(response.status(), 405);

    // Still serving, on a new connection too.
    drop(client);
    for http2 in [true, false] {
        let answer = post_json(
            &crate::client(&server.ca_pem, http2),
            &url(&server, "discovery"),
            b"{}".to_vec(),
        )
        .await;
        assert_eq!(answer["status"], "Success");
    }
    server.running.shutdown().await;
}

#[tokio::test]
async fn hooks_flag_limits_what_is_advertised_and_routed() {
    let server = start(&["--hooks", "BeforeClusterCreate,GeneratePatches"]).await;
    let client = client(&server.ca_pem, true);
    let answer = post_json(&client, &url(&server, "discovery"), b"{}".to_vec()).await;
    let hooks: Vec<&str> = answer["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["requestHook"]["hook"].as_str().unwrap())
        .collect();
    assert_eq!(hooks, ["BeforeClusterCreate", "GeneratePatches"]);
    let response = post(
        &client,
        &url(&server, "beforeclusterdelete/before-cluster-delete"),
        "{}",
    )
    .await;
    assert_eq!(response.status(), 404);
    server.running.shutdown().await;

    assert!(
        Cli::try_parse_from(["registry-addon", "serve", "--hooks", "AfterClusterUpgrade"]).is_err()
    );
}

#[tokio::test]
async fn metrics_and_probes() {
    let server = start(&[]).await;
    let client = client(&server.ca_pem, true);
    post_json(&client, &url(&server, "discovery"), b"{}".to_vec()).await;
    let bcc = url(&server, "beforeclustercreate/before-cluster-create");
    post_json(&client, &bcc, b"nonsense".to_vec()).await;

    let plain = reqwest::Client::new();
    let base = format!("http://{}", server.running.metrics_addr);
    for probe in ["healthz", "readyz"] {
        let response = plain.get(format!("{base}/{probe}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{probe}");
    }
    let metrics = plain
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .contains(r#"registry_addon_hook_requests_total{hook="Discovery",status="Success"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"registry_addon_hook_requests_total{hook="BeforeClusterCreate",status="Failure"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains("registry_addon_hook_request_duration_seconds_bucket"));
    assert!(metrics.contains("registry_addon_certificate_reloads_total 0"));
    server.running.shutdown().await;
}

fn write_pair(dir: &Path, pair: &registry_addon::webhook::tls::SelfSigned) {
    // Overwrite in place, as cert-manager's secret volume update appears to a reader.
    std::fs::write(dir.join("tls.crt"), &pair.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &pair.key_pem).unwrap();
}

#[tokio::test]
async fn rotated_certificate_is_served_to_new_connections() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let first = registry_addon::webhook::tls::self_signed(&[]).unwrap();
    write_pair(dir.path(), &first);
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    let running = start_with(
        serve_args(&[
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
        ]),
        Management::Unavailable("none".into()),
    )
    .await
    .unwrap();
    let discovery = format!(
        "https://localhost:{}{PREFIX}/discovery",
        running.addr.port()
    );
    let old_client = client(&first.ca_pem, true);
    let answer = post_json(&old_client, &discovery, b"{}".to_vec()).await;
    assert_eq!(answer["status"], "Success");

    // A new certificate from a new CA.
    let second = registry_addon::webhook::tls::self_signed(&[]).unwrap();
    write_pair(dir.path(), &second);
    let started = Instant::now();
    loop {
        // A fresh client makes a fresh connection.
        let new_client = client(&second.ca_pem, true);
        if let Ok(response) = new_client.post(&discovery).body("{}").send().await {
            assert_eq!(response.status(), 200);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "new certificate not served within 10s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // New connections no longer verify against the old CA.
    assert!(
        client(&first.ca_pem, false)
            .post(&discovery)
            .send()
            .await
            .is_err()
    );
    assert!(running.metrics.cert_reloads.get() >= 1);

    // A broken rewrite keeps serving the last good certificate.
    std::fs::write(&cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let answer = post_json(&client(&second.ca_pem, true), &discovery, b"{}".to_vec()).await;
    assert_eq!(answer["status"], "Success");
    assert!(running.metrics.cert_reload_errors.get() >= 1);
    running.shutdown().await;
}

/// The binary with only the ports changed: self-signed certificate, CA file named in the
/// log, answers discovery.
#[tokio::test]
async fn binary_serves_discovery_on_its_defaults() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_registry-addon"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .env("TMPDIR", dir.path())
        .env("KUBECONFIG", dir.path().join("missing-kubeconfig"))
        .env_remove("POD_NAMESPACE")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut ca_file = None;
    let mut addr = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while addr.is_none() {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .expect("server logs its address in time")
            .unwrap()
            .expect("server keeps running");
        if let Some(rest) = line.split("ca_file=").nth(1) {
            ca_file = Some(rest.split_whitespace().next().unwrap().to_string());
        }
        if line.contains("serving Runtime SDK hooks") {
            addr = line
                .split("addr=")
                .nth(1)
                .map(|r| r.split_whitespace().next().unwrap().to_string());
        }
    }
    let ca_file = ca_file.expect("the log names the CA file");
    assert!(
        ca_file.starts_with(dir.path().to_str().unwrap()),
        "{ca_file}"
    );
    let ca_pem = std::fs::read_to_string(&ca_file).unwrap();
    let port = addr.unwrap().rsplit(':').next().unwrap().to_string();
    let answer = post_json(
        &client(&ca_pem, true),
        &format!("https://localhost:{port}{PREFIX}/discovery"),
        Vec::new(),
    )
    .await;
    assert_eq!(answer["status"], "Success");
    child.kill().await.unwrap();
}

/// The schema check itself rejects what CAPI would reject.
#[test]
fn schema_check_rejects_bad_responses() {
    let good = json!({"apiVersion": "hooks.runtime.cluster.x-k8s.io/v1alpha1", "kind": "BeforeClusterDeleteResponse", "status": "Success", "message": "", "retryAfterSeconds": 0});
    assert_valid_response(&good);
    let mut cases = Vec::new();
    let mut bad_status = good.clone();
    bad_status["status"] = json!("Bogus");
    cases.push(bad_status);
    let mut no_retry = good.clone();
    no_retry
        .as_object_mut()
        .unwrap()
        .remove("retryAfterSeconds");
    cases.push(no_retry);
    let mut extra = good.clone();
    extra["handlers"] = json!([]);
    cases.push(extra);
    let mut string_retry = good.clone();
    string_retry["retryAfterSeconds"] = json!("10");
    cases.push(string_retry);
    for case in cases {
        assert!(
            std::panic::catch_unwind(|| assert_valid_response(&case)).is_err(),
            "accepted {case}"
        );
    }
}

/// A kubeconfig that points nowhere: hooks say the management cluster is unreachable.
#[tokio::test]
async fn unreachable_management_cluster_is_named() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
    let management = Management::Client(kube::Client::try_from(config).unwrap());
    let running = start_with(
        serve_args(&["--self-signed-ca-file", ca_file.to_str().unwrap()]),
        management,
    )
    .await
    .unwrap();
    let ca_pem = std::fs::read_to_string(&ca_file).unwrap();
    let url = format!(
        "https://localhost:{}{PREFIX}/beforeclustercreate/before-cluster-create",
        running.addr.port()
    );
    let body = lifecycle_body("BeforeClusterCreateRequest", fixture_cluster("v1beta2"));
    let answer = post_json(&client(&ca_pem, true), &url, body).await;
    // A blocking hook waits for a passing outage: CAPI calls it again.
    assert_eq!(answer["status"], "Success", "{answer}");
    assert!(
        answer["retryAfterSeconds"].as_i64().unwrap_or(0) > 0,
        "{answer}"
    );
    let message = answer["message"].as_str().unwrap();
    assert!(
        message.starts_with("cluster default/wl-1: management cluster unreachable: "),
        "{message}"
    );
    running.shutdown().await;
}
