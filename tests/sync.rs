//! `registry-addon sync` against real registries (Debian `docker-registry`, pushed to with
//! skopeo and with the crate's own client).

mod sync_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use registry_addon::oci::{ClientOptions, Credentials, Registry, build_http_clients};
use registry_addon::sync::Syncer;
use sync_support::front::{Front, FrontOptions};
use sync_support::*;

fn syncer(local: &str, peers: &[&str], ca: Option<&[u8]>, options: ClientOptions) -> Syncer {
    let http = build_http_clients(ca).unwrap();
    let reg = |url: &str| Arc::new(Registry::new(url, http.clone(), &options).unwrap());
    Syncer::new(
        reg(local),
        peers.iter().map(|p| reg(p)).collect(),
        options.concurrency,
        options.attempts,
        options.backoff,
    )
}

/// Peer A: multi-platform OCI index (pushed by skopeo from an OCI layout), another index
/// pushed directly and tagged twice, a Docker manifest list, a Docker v2 image sharing a layer
/// with another repository, and a bigger layer.
async fn seed_peer_a(a: &Registry, process: &RegistryProcess, tls: &TestTls, dir: &Path) {
    let base = random_bytes(1, 300_000);
    let amd = Image::new("amd64", vec![base.clone(), random_bytes(2, 70_000)], false);
    let arm = Image::new("arm64", vec![base.clone(), random_bytes(3, 80_000)], false);
    let layout = dir.join("layout");
    write_oci_layout(&layout, "1.0", &[("amd64", &amd), ("arm64", &arm)]);
    skopeo_push(&layout, "1.0", process, "skopeo/hello", Some(tls));

    let d1 = Image::new("amd64", vec![base.clone(), random_bytes(4, 50_000)], false);
    let d2 = Image::new("arm64", vec![base.clone(), random_bytes(5, 50_000)], false);
    push_index(
        a,
        "library/alpine",
        "3.19",
        &[("amd64", &d1), ("arm64", &d2)],
        false,
    )
    .await;
    push_index(
        a,
        "library/alpine",
        "latest",
        &[("amd64", &d1), ("arm64", &d2)],
        false,
    )
    .await;

    let w1 = Image::new("amd64", vec![base.clone(), random_bytes(6, 10_000)], true);
    let w2 = Image::new("arm", vec![random_bytes(7, 20_000)], true);
    push_index(a, "apps/web", "v2", &[("amd64", &w1), ("arm", &w2)], true).await;
    w1.push(a, "apps/web", "v1").await;

    Image::new(
        "amd64",
        vec![random_bytes(8, 3 * 1024 * 1024 + 17), base],
        false,
    )
    .push(a, "tools/big", "1")
    .await;
}

/// Peer B (plain HTTP): some of A's content again, and its own repositories with enough
/// tags to need several pages.
async fn seed_peer_b(b: &Registry) {
    let base = random_bytes(1, 300_000);
    let w1 = Image::new("amd64", vec![base.clone(), random_bytes(6, 10_000)], true);
    w1.push(b, "apps/web", "v1").await;
    let api = Image::new("amd64", vec![base.clone(), random_bytes(9, 40_000)], false);
    for tag in ["v1", "v1.1", "v1.2", "stable", "edge"] {
        api.push(b, "apps/api", tag).await;
    }
    Image::new("amd64", vec![random_bytes(10, 1000)], false)
        .push(b, "b-only/thing", "t1")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_copies_everything_and_a_second_copies_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = TestTls::new(&tmp.path().join("tls"));
    let ca = tls.ca_pem();
    let tls_opts = RegistryOptions {
        tls: Some(&tls),
        ..Default::default()
    };
    let peer_a = RegistryProcess::start(&tmp.path().join("a"), &tls_opts);
    let peer_b = RegistryProcess::start(&tmp.path().join("b"), &RegistryOptions::default());
    let local = RegistryProcess::start(&tmp.path().join("local"), &tls_opts);
    let a = client(&peer_a.url, Some(&ca), None);
    let b = client(&peer_b.url, None, None);
    let l = client(&local.url, Some(&ca), None);
    seed_peer_a(&a, &peer_a, &tls, tmp.path()).await;
    seed_peer_b(&b).await;

    // Small pages: the real registry's Link pagination is followed.
    let options = ClientOptions {
        page_size: 2,
        ..ClientOptions::default()
    };
    let s = syncer(&local.url, &[&peer_a.url, &peer_b.url], Some(&ca), options);
    let first = s.round().await;
    assert!(first.is_success(), "{first:#?}");

    let mut expected = tag_digests(&a).await;
    let from_b = tag_digests(&b).await;
    for (key, digest) in &from_b {
        if let Some(other) = expected.insert(key.clone(), digest.clone()) {
            assert_eq!(&other, digest, "test corpus: peers agree on shared tags");
        }
    }
    assert_eq!(tag_digests(&l).await, expected);
    assert!(expected.contains_key(&("skopeo/hello".into(), "1.0".into())));
    assert_eq!(expected.len(), 12);
    // Content types are kept (Docker ones included), and every manifest is complete.
    for (repo, tag) in [
        ("apps/web", "v2"),
        ("apps/web", "v1"),
        ("library/alpine", "3.19"),
    ] {
        let want = a.get_manifest(repo, tag).await.unwrap();
        let got = l.get_manifest(repo, tag).await.unwrap();
        assert_eq!(got.media_type, want.media_type, "{repo}:{tag}");
        assert_eq!(got.bytes, want.bytes, "{repo}:{tag}");
    }
    assert_eq!(
        l.get_manifest("apps/web", "v2").await.unwrap().media_type,
        DOCKER_LIST
    );
    assert!(assert_pullable(&l).await >= 12);
    // Shared layers were mounted across repositories, not transferred again.
    assert!(first.blobs_mounted > 0, "{first:#?}");
    assert_eq!(first.repositories, 6);
    assert_eq!(
        first.tags,
        expected.len() + 1,
        "apps/web:v1 is on both peers"
    );

    let second = s.round().await;
    assert!(second.is_success(), "{second:#?}");
    assert_eq!(second.blob_gets, 0, "{second:#?}");
    assert_eq!(second.bytes_copied, 0);
    assert_eq!(second.manifests_copied, 0);
    assert_eq!(second.blobs_copied + second.blobs_mounted, 0);
    // One manifest HEAD per tag per peer; no local HEAD: the first round saw every local tag.
    assert_eq!(second.peer_manifest_heads as usize, second.tags);
    assert_eq!(second.local_manifest_heads, 0);

    // A tag deleted locally behind the syncer's back is copied again by the next round that
    // HEADs every local tag.
    let big = digest_of(&l, "tools/big", "1").await.unwrap();
    let resp = registry_addon::oci::build_http_client(Some(&ca))
        .unwrap()
        .delete(format!("{}/v2/tools/big/manifests/{big}", local.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED, "{resp:?}");
    assert_eq!(digest_of(&l, "tools/big", "1").await, None);
    let mut rounds = 2;
    while digest_of(&l, "tools/big", "1").await.is_none() {
        assert!(
            rounds <= registry_addon::sync::round::FULL_CHECK_EVERY,
            "not restored after {rounds} rounds"
        );
        let report = s.round().await;
        assert!(report.is_success(), "{report:#?}");
        rounds += 1;
    }
    assert_eq!(rounds, registry_addon::sync::round::FULL_CHECK_EVERY + 1);
    assert_eq!(digest_of(&l, "tools/big", "1").await, Some(big));
}

/// A peer and an empty local registry, both serving TLS from one test CA.
fn tls_peer_and_local(dir: &std::path::Path) -> (TestTls, RegistryProcess, RegistryProcess) {
    let tls = TestTls::new(&dir.join("tls"));
    let opts = RegistryOptions {
        tls: Some(&tls),
        ..Default::default()
    };
    let peer = RegistryProcess::start(&dir.join("p"), &opts);
    let local = RegistryProcess::start(&dir.join("l"), &opts);
    (tls, peer, local)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_uploads_copy_large_blobs() {
    let tmp = tempfile::tempdir().unwrap();
    let (tls, peer, local) = tls_peer_and_local(tmp.path());
    let ca = tls.ca_pem();
    let p = client(&peer.url, Some(&ca), None);
    let img = Image::new(
        "amd64",
        vec![random_bytes(11, 2_500_000), random_bytes(12, 10)],
        false,
    );
    let digest = img.push(&p, "chunked/img", "1").await;
    let options = ClientOptions {
        chunked_uploads: true,
        chunk_size: 1024 * 1024,
        ..ClientOptions::default()
    };
    let report = syncer(&local.url, &[&peer.url], Some(&ca), options)
        .round()
        .await;
    assert!(report.is_success(), "{report:#?}");
    assert_eq!(report.bytes_copied, 2_500_010 + img.config.len() as u64);
    let l = client(&local.url, Some(&ca), None);
    assert_eq!(
        tag_digests(&l).await.into_values().collect::<Vec<_>>(),
        vec![digest]
    );
    assert_pullable(&l).await;
}

fn sync_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_registry-addon"));
    cmd.arg("sync")
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("REGISTRY_USERNAME")
        .env_remove("REGISTRY_PASSWORD")
        .env_remove("POD_NAME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Kills a child process when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_rounds_leave_no_dangling_manifest_and_the_next_round_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let (tls, peer, local) = tls_peer_and_local(tmp.path());
    let ca = tls.ca_pem();
    let p = client(&peer.url, Some(&ca), None);
    let l = client(&local.url, Some(&ca), None);
    // Enough data that a round takes a while: indexes over images with several MiB layers.
    for r in 0..8u64 {
        let repo = format!("kill/repo{r}");
        let imgs: Vec<Image> = (0..2u64)
            .map(|i| {
                let seed = 100 + r * 10 + i;
                Image::new(
                    "amd64",
                    vec![
                        random_bytes(seed, 4 << 20),
                        random_bytes(seed + 1000, 3 << 20),
                    ],
                    r % 2 == 0,
                )
            })
            .collect();
        push_index(
            &p,
            &repo,
            "multi",
            &[("amd64", &imgs[0]), ("arm64", &imgs[1])],
            r % 2 == 0,
        )
        .await;
        imgs[0].push(&p, &repo, "single").await;
    }
    let expected = tag_digests(&p).await;
    let ca_file = tls.ca_file.to_str().unwrap();
    let args = [
        "--once",
        "--local",
        &local.url,
        "--peer",
        &peer.url,
        "--ca-file",
        ca_file,
        "--concurrency",
        "2",
    ];

    let mut killed_mid_round = 0;
    for delay_ms in [100u64, 200, 300, 400, 500] {
        let mut child = Killed(sync_command(&args).spawn().unwrap());
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        if child.0.try_wait().unwrap().is_none() {
            killed_mid_round += 1;
        }
        drop(child);
        // Let the registry finish requests the killed client had already sent.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Whatever the kill interrupted, nothing visible locally is half there.
        assert_pullable(&l).await;
    }
    assert!(
        killed_mid_round >= 2,
        "the syncer finished too fast to be interrupted"
    );
    let partial = tag_digests(&l).await.len();
    eprintln!(
        "{killed_mid_round} kills mid-round; {partial} of {} tags there before the last round",
        expected.len()
    );

    let out = sync_command(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        tag_digests(&l).await,
        expected,
        "converged after {partial} tags were there"
    );
    assert_eq!(assert_pullable(&l).await, 8 * 3);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("sync round finished"), "{log}");
}

async fn fetch_metrics(addr: &str) -> Option<String> {
    let resp = reqwest::get(format!("http://{addr}/metrics")).await.ok()?;
    resp.text().await.ok()
}

fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_peer_is_reported_while_the_others_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let peer = RegistryProcess::start(&tmp.path().join("p"), &RegistryOptions::default());
    let local = RegistryProcess::start(&tmp.path().join("l"), &RegistryOptions::default());
    let p = client(&peer.url, None, None);
    let l = client(&local.url, None, None);
    Image::new("amd64", vec![random_bytes(20, 5000)], false)
        .push(&p, "up/img", "1")
        .await;
    // On 127.0.0.2, where the other tests' servers never listen: reliably down.
    let down_port = std::net::TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = format!("http://127.0.0.2:{down_port}");
    let args = [
        "--local",
        &local.url,
        "--peer",
        &down,
        "--peer",
        &peer.url,
        "--attempts",
        "2",
        "--retry-backoff",
        "50ms",
    ];

    let mut once = args.to_vec();
    once.push("--once");
    let out = sync_command(&once).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "--once must fail when a peer is down: {log}"
    );
    assert!(log.contains(&down), "the down peer is named: {log}");
    assert_eq!(tag_digests(&l).await, tag_digests(&p).await);

    // A local registry that does not answer is reported as such, not as failing peers.
    let out = sync_command(&[
        "--once",
        "--local",
        &down,
        "--peer",
        &peer.url,
        "--attempts",
        "1",
    ])
    .output()
    .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(log.contains("the local registry does not answer"), "{log}");

    // The loop keeps going, and the metrics say which peer fails.
    Image::new("amd64", vec![random_bytes(21, 5000)], false)
        .push(&p, "up/img", "2")
        .await;
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut looping = args.to_vec();
    looping.extend(["--interval", "300ms", "--metrics-listen", &metrics_addr]);
    let _child = Killed(sync_command(&looping).spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let errors_series = format!("registry_sync_errors_total{{peer=\"{down}\"}}");
    let up_series = format!("registry_sync_peer_up{{peer=\"{}\"}}", peer.url);
    loop {
        if let Some(m) = fetch_metrics(&metrics_addr).await {
            let rounds = metric_value(&m, "registry_sync_rounds_total").unwrap_or(0.0);
            let errors = metric_value(&m, &errors_series).unwrap_or(0.0);
            if rounds >= 2.0 && errors >= 2.0 {
                assert_eq!(metric_value(&m, &up_series), Some(1.0), "{m}");
                assert!(m.contains("registry_sync_round_duration_seconds"), "{m}");
                assert!(
                    metric_value(&m, "registry_sync_copied_manifests_total").unwrap_or(0.0) >= 1.0,
                    "{m}"
                );
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed the failing peer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tag_digests(&l).await, tag_digests(&p).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registries_with_basic_auth() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = TestTls::new(&tmp.path().join("tls"));
    let ca = tls.ca_pem();
    let htpasswd = tmp.path().join("htpasswd");
    write_htpasswd(&htpasswd, "syncer", "s3cret:pw");
    let opts = RegistryOptions {
        tls: Some(&tls),
        htpasswd: Some(&htpasswd),
        ..Default::default()
    };
    let peer = RegistryProcess::start(&tmp.path().join("p"), &opts);
    let local = RegistryProcess::start(&tmp.path().join("l"), &opts);
    let creds = Credentials {
        username: "syncer".into(),
        password: "s3cret:pw".into(),
    };
    let p = client(&peer.url, Some(&ca), Some(creds.clone()));
    let l = client(&local.url, Some(&ca), Some(creds));
    let base = random_bytes(30, 100_000);
    let i1 = Image::new("amd64", vec![base.clone(), random_bytes(31, 1000)], true);
    let i2 = Image::new("arm64", vec![base, random_bytes(32, 1000)], true);
    push_index(
        &p,
        "secure/app",
        "v1",
        &[("amd64", &i1), ("arm64", &i2)],
        true,
    )
    .await;
    i1.push(&p, "secure/other", "v1").await;

    let ca_file = tls.ca_file.to_str().unwrap();
    let args = [
        "--once",
        "--local",
        &local.url,
        "--peer",
        &peer.url,
        "--ca-file",
        ca_file,
        "--attempts",
        "1",
    ];
    // Without credentials: refused, and said so.
    let out = sync_command(&args).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(log.contains("credentials"), "{log}");

    let creds_file = tmp.path().join("creds");
    std::fs::write(&creds_file, "syncer:s3cret:pw\n").unwrap();
    let mut with_file = args.to_vec();
    with_file.extend(["--credentials-file", creds_file.to_str().unwrap()]);
    let out = sync_command(&with_file).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains("s3cret"), "the password must never be logged");
    assert_eq!(tag_digests(&l).await, tag_digests(&p).await);
    assert_pullable(&l).await;

    // The same through the environment.
    let local2 = RegistryProcess::start(&tmp.path().join("l2"), &opts);
    let out = sync_command(&[
        "--once",
        "--local",
        &local2.url,
        "--peer",
        &peer.url,
        "--ca-file",
        ca_file,
    ])
    .env("REGISTRY_USERNAME", "syncer")
    .env("REGISTRY_PASSWORD", "s3cret:pw")
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registries_with_bearer_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = RegistryOptions::default();
    let peer_reg = RegistryProcess::start(&tmp.path().join("p"), &opts);
    let local_reg = RegistryProcess::start(&tmp.path().join("l"), &opts);
    let bearer = FrontOptions {
        bearer: Some(("bob".into(), "t0ken-pw".into())),
        ..FrontOptions::default()
    };
    let peer = Front::start(&peer_reg.url, bearer.clone()).await;
    let local = Front::start(&local_reg.url, bearer).await;
    let creds = Credentials {
        username: "bob".into(),
        password: "t0ken-pw".into(),
    };
    let p = client(&peer.url, None, Some(creds.clone()));
    let base = random_bytes(40, 50_000);
    let i1 = Image::new("amd64", vec![base.clone(), random_bytes(41, 1000)], false);
    let i2 = Image::new("arm64", vec![base.clone(), random_bytes(42, 1000)], false);
    push_index(
        &p,
        "tok/app",
        "v1",
        &[("amd64", &i1), ("arm64", &i2)],
        false,
    )
    .await;
    i2.push(&p, "tok/other", "v1").await;

    // Wrong password: the token service refuses, and the round says so.
    let wrong = ClientOptions {
        credentials: Some(Credentials {
            username: "bob".into(),
            password: "nope".into(),
        }),
        attempts: 1,
        ..ClientOptions::default()
    };
    let report = syncer(&local.url, &[&peer.url], None, wrong.clone())
        .round()
        .await;
    assert!(!report.is_success());
    let local_error = report.local_error.clone().unwrap_or_default();
    assert!(local_error.contains("authentication failed"), "{report:#?}");
    // The same for a peer, with the right credentials for the local registry.
    let http = build_http_clients(None).unwrap();
    let right = ClientOptions {
        credentials: Some(creds.clone()),
        ..wrong.clone()
    };
    let s = Syncer::new(
        Arc::new(Registry::new(&local.url, http.clone(), &right).unwrap()),
        vec![Arc::new(Registry::new(&peer.url, http, &wrong).unwrap())],
        4,
        1,
        Duration::from_millis(10),
    );
    let report = s.round().await;
    assert!(
        report.peers[0].errors[0].contains("authentication failed"),
        "{report:#?}"
    );

    let options = ClientOptions {
        credentials: Some(creds.clone()),
        ..ClientOptions::default()
    };
    let report = syncer(&local.url, &[&peer.url], None, options)
        .round()
        .await;
    assert!(report.is_success(), "{report:#?}");
    // The blob shared by both repositories was mounted: the token covered both.
    assert!(report.blobs_mounted >= 1, "{report:#?}");
    let l = client(&local.url, None, Some(creds));
    assert_eq!(tag_digests(&l).await, tag_digests(&p).await);
    assert_pullable(&l).await;
    assert!(local.tokens_issued() > 0 && peer.tokens_issued() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blobs_are_refused_and_nothing_dangles() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = RegistryOptions::default();
    let peer_reg = RegistryProcess::start(&tmp.path().join("p"), &opts);
    let local = RegistryProcess::start(&tmp.path().join("l"), &opts);
    let p = client(&peer_reg.url, None, None);
    let img = Image::new(
        "amd64",
        vec![random_bytes(50, 200_000), random_bytes(51, 10)],
        false,
    );
    img.push(&p, "bad/img", "1").await;
    let corrupting = Front::start(
        &peer_reg.url,
        FrontOptions {
            corrupt_blobs: true,
            ..FrontOptions::default()
        },
    )
    .await;
    let options = ClientOptions {
        attempts: 2,
        backoff: Duration::from_millis(10),
        ..ClientOptions::default()
    };
    let report = syncer(&local.url, &[&corrupting.url], None, options)
        .round()
        .await;
    assert!(!report.is_success());
    assert!(
        report.peers[0]
            .errors
            .iter()
            .any(|e| e.contains("digest mismatch")),
        "{report:#?}"
    );
    assert_eq!(report.blobs_copied, 0);
    let l = client(&local.url, None, None);
    // Neither the corrupt blobs nor the manifest that needs them exist locally.
    assert!(tag_digests(&l).await.is_empty());
    for blob in [&img.config, &img.layers[0], &img.layers[1]] {
        assert!(
            !l.blob_exists("bad/img", &sha256(blob).parse().unwrap())
                .await
                .unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_refusing_monolithic_uploads_gets_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = RegistryOptions::default();
    let peer = RegistryProcess::start(&tmp.path().join("p"), &opts);
    let local_reg = RegistryProcess::start(&tmp.path().join("l"), &opts);
    let local = Front::start(
        &local_reg.url,
        FrontOptions {
            refuse_monolithic: true,
            ..FrontOptions::default()
        },
    )
    .await;
    let p = client(&peer.url, None, None);
    Image::new(
        "amd64",
        vec![random_bytes(60, 1_500_000), random_bytes(61, 100)],
        true,
    )
    .push(&p, "patch/img", "1")
    .await;
    let options = ClientOptions {
        chunk_size: 512 * 1024,
        ..ClientOptions::default()
    };
    let report = syncer(&local.url, &[&peer.url], None, options)
        .round()
        .await;
    assert!(report.is_success(), "{report:#?}");
    assert!(local.refused_uploads() >= 1);
    assert_eq!(report.blobs_copied, 3);
    let l = client(&local.url, None, None);
    assert_eq!(tag_digests(&l).await, tag_digests(&p).await);
    assert_pullable(&l).await;
}

/// Two replicas, each syncing from the other, as the StatefulSet runs them.
struct Replicas {
    a: RegistryProcess,
    b: RegistryProcess,
}

impl Replicas {
    fn start(dir: &Path) -> Replicas {
        let opts = RegistryOptions::default();
        Replicas {
            a: RegistryProcess::start(&dir.join("a"), &opts),
            b: RegistryProcess::start(&dir.join("b"), &opts),
        }
    }

    /// The syncer of replica A (peer B), remembering agreements in `state` when given.
    fn syncer_a(&self, state: Option<&Path>) -> Syncer {
        with_state(
            syncer(&self.a.url, &[&self.b.url], None, ClientOptions::default()),
            state,
        )
    }

    fn syncer_b(&self, state: Option<&Path>) -> Syncer {
        with_state(
            syncer(&self.b.url, &[&self.a.url], None, ClientOptions::default()),
            state,
        )
    }
}

fn with_state(s: Syncer, state: Option<&Path>) -> Syncer {
    match state {
        Some(path) => s.with_state_file(path),
        None => s,
    }
}

async fn round_ok(s: &Syncer) -> registry_addon::sync::RoundReport {
    let report = s.round().await;
    assert!(report.is_success(), "{report:#?}");
    assert_eq!(report.state_error, None);
    report
}

/// An image whose manifest digest sorts below (or above) `bound`, found by trying seeds.
fn image_beside(bound: &str, below: bool, seed: u64) -> Image {
    (seed..)
        .map(|s| Image::new("amd64", vec![random_bytes(s, 2000)], false))
        .find(|img| (sha256(&img.manifest()).as_str() < bound) == below)
        .unwrap()
}

/// Two images whose manifest digests sort as asked: the first greater, or smaller.
fn two_images(seed: u64, first_greater: bool) -> (Image, Image) {
    let one = Image::new("amd64", vec![random_bytes(seed, 2000)], false);
    let two = image_beside(&sha256(&one.manifest()), first_greater, seed + 1_000_000);
    (one, two)
}

/// Deletes a manifest by digest (the test registries allow deletes).
async fn delete_manifest(registry: &str, repo: &str, digest: &str) {
    let resp = reqwest::Client::new()
        .delete(format!("{registry}/v2/{repo}/manifests/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED, "{resp:?}");
}

async fn digest_of(reg: &Registry, repo: &str, tag: &str) -> Option<String> {
    reg.head_manifest(repo, tag)
        .await
        .unwrap()
        .map(|h| h.digest.unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_just_before_a_restart_is_kept_and_propagates() {
    let tmp = tempfile::tempdir().unwrap();
    let replicas = Replicas::start(tmp.path());
    let (a, b) = (
        client(&replicas.a.url, None, None),
        client(&replicas.b.url, None, None),
    );
    // As in the chart: the state beside Distribution's own tree on the registry's volume.
    let state_a = replicas.a.root.join("registry-addon-sync/agreed.json");
    let state_b = replicas.b.root.join("registry-addon-sync/agreed.json");
    // The older image has the greater digest: the tie-break alone would bring it back.
    let (old, fresh) = two_images(200, true);
    let old_digest = old.push(&a, "app/web", "stable").await;

    let sa = replicas.syncer_a(Some(&state_a));
    let sb = replicas.syncer_b(Some(&state_b));
    round_ok(&sa).await;
    round_ok(&sb).await;
    round_ok(&sa).await;
    assert_eq!(
        digest_of(&b, "app/web", "stable").await,
        Some(old_digest.clone())
    );
    assert_eq!(sa.agreements().len(), 1, "A remembers agreeing with B");
    assert!(state_a.is_file());

    // Pushed to A, whose syncer restarts before B copied it.
    let fresh_digest = fresh.push(&a, "app/web", "stable").await;
    assert!(old_digest > fresh_digest);
    drop(sa);
    let sa = replicas.syncer_a(Some(&state_a));
    assert_eq!(
        sa.agreements().len(),
        1,
        "loaded from {}",
        state_a.display()
    );
    let report = round_ok(&sa).await;
    assert_eq!(report.tags_copied, 0, "{report:#?}");
    assert_eq!(
        digest_of(&a, "app/web", "stable").await,
        Some(fresh_digest.clone())
    );
    round_ok(&sb).await;
    assert_eq!(
        digest_of(&b, "app/web", "stable").await,
        Some(fresh_digest.clone())
    );
    round_ok(&sa).await;
    assert_eq!(
        digest_of(&a, "app/web", "stable").await,
        Some(fresh_digest.clone())
    );
    assert_pullable(&b).await;

    // The file next to docker/registry/v2 does not disturb Distribution.
    assert_eq!(a.catalog().await.unwrap(), ["app/web"]);
    let text = std::fs::read_to_string(&state_a).unwrap();
    assert!(
        text.contains(&replicas.b.url) && text.contains(&fresh_digest),
        "{text}"
    );

    // Without the file, a restarted syncer has no memory, and the tie-break reverts a push
    // whose digest happens to be the smaller: what the state file is for.
    image_beside(&fresh_digest, true, 300)
        .push(&a, "app/web", "stable")
        .await;
    round_ok(&replicas.syncer_a(None)).await;
    assert_eq!(digest_of(&a, "app/web", "stable").await, Some(fresh_digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rounds_settle_a_new_tag_pushed_to_both_replicas_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let replicas = Replicas::start(tmp.path());
    let (a, b) = (
        client(&replicas.a.url, None, None),
        client(&replicas.b.url, None, None),
    );
    // The winner on A's side, then on B's.
    for (case, seed, first_greater) in [("one", 400, true), ("two", 500, false)] {
        let (on_a, on_b) = two_images(seed, first_greater);
        let da = on_a.push(&a, "race/app", case).await;
        let db = on_b.push(&b, "race/app", case).await;
        let winner = da.clone().max(db.clone());
        let sa = replicas.syncer_a(None);
        let sb = replicas.syncer_b(None);
        for round in 0..3 {
            let (ra, rb) = tokio::join!(sa.round(), sb.round());
            assert!(ra.is_success() && rb.is_success(), "{ra:#?} {rb:#?}");
            assert_eq!(
                digest_of(&a, "race/app", case).await.as_ref(),
                Some(&winner),
                "{case}: round {round} on A"
            );
            assert_eq!(
                digest_of(&b, "race/app", case).await.as_ref(),
                Some(&winner),
                "{case}: round {round} on B"
            );
            if round == 0 {
                // Exactly one side copied.
                assert_eq!(ra.tags_copied + rb.tags_copied, 1, "{ra:#?} {rb:#?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_is_reported_and_the_round_still_works() {
    let tmp = tempfile::tempdir().unwrap();
    let peer = RegistryProcess::start(&tmp.path().join("p"), &RegistryOptions::default());
    let local = RegistryProcess::start(&tmp.path().join("l"), &RegistryOptions::default());
    let p = client(&peer.url, None, None);
    let l = client(&local.url, None, None);
    Image::new("amd64", vec![random_bytes(70, 3000)], false)
        .push(&p, "state/img", "1")
        .await;
    let state = tmp.path().join("state").join("agreed.json");
    std::fs::create_dir_all(state.parent().unwrap()).unwrap();
    std::fs::write(&state, "{\"version\":1,\"agreed\":{\"trunc").unwrap();
    let state_arg = state.to_str().unwrap();
    let args = [
        "--once",
        "--local",
        &local.url,
        "--peer",
        &peer.url,
        "--state-file",
        state_arg,
    ];

    let out = sync_command(&args).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("state file"))
        .unwrap_or_else(|| panic!("no warning: {log}"));
    assert!(warning.contains(state_arg), "{warning}");
    assert!(warning.contains("EOF"), "the reason is given: {warning}");
    assert_eq!(tag_digests(&l).await, tag_digests(&p).await);
    // Replaced by a good one.
    let text = std::fs::read_to_string(&state).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        parsed["agreed"][&peer.url]["state/img"]["1"].is_string(),
        "{text}"
    );

    // Unreadable (a directory where the file should be): the same.
    let dir_state = tmp.path().join("a-directory");
    std::fs::create_dir(&dir_state).unwrap();
    let out = sync_command(&[
        "--once",
        "--local",
        &local.url,
        "--peer",
        &peer.url,
        "--state-file",
        dir_state.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "a state file that cannot be written fails no round: {log}"
    );
    assert!(log.contains("cannot read the sync state file"), "{log}");
    assert!(log.contains("cannot write the sync state file"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_changes_nothing_does_not_write_the_state_file() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let replicas = Replicas::start(tmp.path());
    let (a, b) = (
        client(&replicas.a.url, None, None),
        client(&replicas.b.url, None, None),
    );
    Image::new("amd64", vec![random_bytes(80, 3000)], false)
        .push(&a, "quiet/img", "1")
        .await;
    Image::new("amd64", vec![random_bytes(81, 3000)], true)
        .push(&b, "quiet/other", "v1")
        .await;
    let state = tmp.path().join("agreed-a.json");
    let sa = replicas.syncer_a(Some(&state));
    let sb = replicas.syncer_b(None);
    round_ok(&sa).await;
    round_ok(&sb).await;
    round_ok(&sa).await;
    assert_eq!(sa.agreements().len(), 2);
    let before = std::fs::metadata(&state).unwrap();
    let text = std::fs::read_to_string(&state).unwrap();
    // Coarse timestamps would hide a rewrite within the same tick.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..2 {
        let report = round_ok(&sa).await;
        assert_eq!(report.tags_copied, 0);
    }
    let after = std::fs::metadata(&state).unwrap();
    assert_eq!(
        (after.ino(), after.mtime_nsec(), after.mtime()),
        (before.ino(), before.mtime_nsec(), before.mtime())
    );
    assert_eq!(std::fs::read_to_string(&state).unwrap(), text);

    // A tag deleted on both sides is forgotten, and that change is written.
    for (reg, url) in [(&a, &replicas.a.url), (&b, &replicas.b.url)] {
        let digest = digest_of(reg, "quiet/other", "v1").await.unwrap();
        delete_manifest(url, "quiet/other", &digest).await;
    }
    round_ok(&sa).await;
    assert_eq!(sa.agreements().len(), 1);
    let after = std::fs::metadata(&state).unwrap();
    assert_ne!(after.ino(), before.ino(), "rewritten by rename");
    assert!(
        !std::fs::read_to_string(&state)
            .unwrap()
            .contains("quiet/other")
    );
}

/// Manifest HEADs in a registry's access log after its first `from` lines.
fn manifest_heads_in_log(process: &RegistryProcess, from: usize) -> usize {
    std::fs::read_to_string(&process.log)
        .unwrap()
        .lines()
        .skip(from)
        .filter(|l| l.contains("\"HEAD /v2/") && l.contains("/manifests/"))
        .count()
}

fn log_lines(process: &RegistryProcess) -> usize {
    std::fs::read_to_string(&process.log)
        .unwrap()
        .lines()
        .count()
}

/// The `name=N` field of the "sync round finished" line of a `sync --once` run.
fn round_field(out: &std::process::Output, name: &str) -> u64 {
    let log = String::from_utf8_lossy(&out.stderr);
    let line = log
        .lines()
        .find(|l| l.contains("sync round finished"))
        .unwrap_or_else(|| panic!("no round line: {log}"));
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

fn once_ok(args: &[&str]) -> std::process::Output {
    let out = sync_command(args).output().unwrap();
    assert!(
        out.status.success(),
        "sync --once: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_process_with_a_state_file_skips_the_local_heads_and_still_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let local = RegistryProcess::start(
        &tmp.path().join("local"),
        &RegistryOptions {
            access_log: true,
            ..RegistryOptions::default()
        },
    );
    let peer = RegistryProcess::start(&tmp.path().join("peer"), &RegistryOptions::default());
    let (l, p) = (
        client(&local.url, None, None),
        client(&peer.url, None, None),
    );
    for (i, (repo, tag)) in [
        ("keep/one", "1"),
        ("keep/two", "1"),
        ("keep/two", "2"),
        ("moving/img", "1"),
    ]
    .into_iter()
    .enumerate()
    {
        Image::new("amd64", vec![random_bytes(900 + i as u64, 3000)], false)
            .push(&p, repo, tag)
            .await;
    }
    let state = tmp.path().join("state/agreed.json");
    let state_arg = state.to_str().unwrap();
    let with_state = [
        "--once",
        "--local",
        &local.url,
        "--peer",
        &peer.url,
        "--state-file",
        state_arg,
    ];

    // No state file yet: the first round HEADs every local tag.
    let mark = log_lines(&local);
    let out = once_ok(&with_state);
    assert_eq!(round_field(&out, "local_manifest_heads"), 4);
    assert_eq!(manifest_heads_in_log(&local, mark), 4);
    assert_eq!(tag_digests(&l).await, tag_digests(&p).await);
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.contains("\"local_checked\":"), "{text}");

    // A fresh process with that state: nothing changed, no local HEAD at all.
    let mark = log_lines(&local);
    let out = once_ok(&with_state);
    assert_eq!(round_field(&out, "local_manifest_heads"), 0);
    assert_eq!(round_field(&out, "tags_copied"), 0);
    assert_eq!(manifest_heads_in_log(&local, mark), 0);

    // The peer gets a new tag and moves another: only those two are HEADed locally, and the
    // local registry follows the peer.
    Image::new("amd64", vec![random_bytes(950, 3000)], false)
        .push(&p, "fresh/new", "1")
        .await;
    Image::new("amd64", vec![random_bytes(951, 3000)], true)
        .push(&p, "moving/img", "1")
        .await;
    let mark = log_lines(&local);
    let out = once_ok(&with_state);
    assert_eq!(round_field(&out, "tags_copied"), 2);
    assert_eq!(round_field(&out, "local_manifest_heads"), 2);
    assert_eq!(manifest_heads_in_log(&local, mark), 2);
    assert_eq!(tag_digests(&l).await, tag_digests(&p).await);
    assert_eq!(assert_pullable(&l).await, 5);

    // Without the state file a fresh process knows nothing and HEADs every tag again.
    let out = once_ok(&with_state[..5]);
    assert_eq!(round_field(&out, "local_manifest_heads"), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_tag_deleted_behind_a_restarted_syncer_is_restored_by_the_full_check() {
    use registry_addon::sync::round::FULL_CHECK_EVERY;
    let tmp = tempfile::tempdir().unwrap();
    let replicas = Replicas::start(tmp.path());
    let (a, b) = (
        client(&replicas.a.url, None, None),
        client(&replicas.b.url, None, None),
    );
    Image::new("amd64", vec![random_bytes(960, 3000)], false)
        .push(&b, "behind/back", "1")
        .await;
    Image::new("amd64", vec![random_bytes(961, 3000)], false)
        .push(&b, "behind/other", "1")
        .await;
    let state = tmp.path().join("agreed-a.json");
    round_ok(&replicas.syncer_a(Some(&state))).await;
    let digest = digest_of(&a, "behind/back", "1").await.unwrap();

    // Deleted on A while no syncer runs. A restarted syncer trusts its state at first, and
    // restores the tag in the round that HEADs every local tag again.
    delete_manifest(&replicas.a.url, "behind/back", &digest).await;
    let restarted = replicas.syncer_a(Some(&state));
    let first = round_ok(&restarted).await;
    assert_eq!(first.local_manifest_heads, 0, "{first:#?}");
    assert_eq!(digest_of(&a, "behind/back", "1").await, None);
    let mut rounds = 1;
    while digest_of(&a, "behind/back", "1").await.is_none() {
        assert!(
            rounds <= FULL_CHECK_EVERY,
            "not restored after {rounds} rounds"
        );
        round_ok(&restarted).await;
        rounds += 1;
    }
    assert_eq!(rounds, FULL_CHECK_EVERY + 1);
    assert_eq!(
        digest_of(&a, "behind/back", "1").await,
        Some(digest.clone())
    );
    drop(restarted);

    // A state file whose last full check is older than FULL_CHECK_EVERY intervals is not
    // trusted: the first round of a fresh syncer checks every local tag and restores it.
    delete_manifest(&replicas.a.url, "behind/back", &digest).await;
    let mut file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let checked = file["local_checked"].as_u64().unwrap();
    let interval = Duration::from_secs(30);
    let age = interval.as_secs() * FULL_CHECK_EVERY + 5;
    file["local_checked"] = (checked - age).into();
    std::fs::write(&state, serde_json::to_vec(&file).unwrap()).unwrap();
    let stale = replicas
        .syncer_a(None)
        .with_round_interval(interval)
        .with_state_file(&state);
    let first = round_ok(&stale).await;
    assert_eq!(first.local_manifest_heads, 2, "{first:#?}");
    assert_eq!(digest_of(&a, "behind/back", "1").await, Some(digest));
    // That full check is recorded, so the next fresh syncer trusts the state again.
    let again = replicas
        .syncer_a(None)
        .with_round_interval(interval)
        .with_state_file(&state);
    assert_eq!(round_ok(&again).await.local_manifest_heads, 0);
}

/// Eight manifests in one repository share a blob that a round brings into another
/// repository first. The blob is mounted into the first repository once, not once per
/// manifest: Distribution 2.8 rewrites a blob's link in place, and a manifest push reading it
/// during a second mount failed with `MANIFEST_BLOB_UNKNOWN`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_shared_by_many_manifests_is_mounted_once_per_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let (tls, peer, local) = tls_peer_and_local(tmp.path());
    let ca = tls.ca_pem();
    let p = client(&peer.url, Some(&ca), None);
    let l = client(&local.url, Some(&ca), None);
    let shared_layer = random_bytes(40, 200_000);
    // Listed first, and one level shallower: this repository reaches the shared blob first.
    Image::new(
        "amd64",
        vec![shared_layer.clone(), random_bytes(41, 500)],
        false,
    )
    .push(&p, "a/first", "v1")
    .await;
    let images: Vec<(String, Image)> = (0..8u64)
        .map(|i| {
            let arch = format!("arch{i}");
            let layers = vec![shared_layer.clone(), random_bytes(50 + i, 500)];
            let image = Image::new(&arch, layers, false);
            (arch, image)
        })
        .collect();
    let platforms: Vec<(&str, &Image)> = images.iter().map(|(a, i)| (a.as_str(), i)).collect();
    push_index(&p, "b/many", "v1", &platforms, false).await;

    let s = syncer(
        &local.url,
        &[&peer.url],
        Some(&ca),
        ClientOptions::default(),
    );
    let report = round_ok(&s).await;
    // a/first: the shared layer, its own layer, its config; b/many: the shared layer, eight
    // layers, eight configs. Each made present once.
    assert_eq!(
        report.blobs_copied + report.blobs_mounted,
        20,
        "{report:#?}"
    );
    assert_eq!(report.blobs_mounted, 1, "{report:#?}");
    assert_eq!(tag_digests(&l).await, tag_digests(&p).await);
    assert_pullable(&l).await;
}
