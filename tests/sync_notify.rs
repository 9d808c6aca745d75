//! Replication within seconds: real `docker-registry` replicas send push notifications to
//! their `registry-addon sync` sidecars, which push the tag out to the other replicas.

mod sync_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use registry_addon::oci::Registry;
use sync_support::*;

const TOKEN: &str = "notify-test-token-0123456789abcdef";

/// Kills the sidecar when dropped.
struct Sidecar {
    child: Child,
    metrics: String,
    notify: String,
    log: PathBuf,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sidecar {
    async fn metrics(&self) -> String {
        match reqwest::get(format!("http://{}/metrics", self.metrics)).await {
            Ok(resp) => resp.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    async fn value(&self, series: &str) -> f64 {
        metric(&self.metrics().await, series)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
        .unwrap_or(0.0)
}

struct Replica {
    registry: RegistryProcess,
    client: Arc<Registry>,
    notify_port: u16,
    state: PathBuf,
    dir: PathBuf,
}

/// `n` registries, each notifying the sidecar port it will have (`with_notify`: which do).
fn start_registries(dir: &Path, n: usize, with_notify: &[bool]) -> Vec<Replica> {
    (0..n)
        .map(|i| {
            let dir = dir.join(format!("r{i}"));
            let notify_port = free_port();
            let url = format!("http://127.0.0.1:{notify_port}/events");
            let registry = RegistryProcess::start(
                &dir,
                &RegistryOptions {
                    access_log: true,
                    notify: with_notify[i].then_some((url.as_str(), TOKEN)),
                    ..Default::default()
                },
            );
            let client = client(&registry.url, None, None);
            Replica {
                registry,
                client,
                notify_port,
                state: dir.join("agreed.json"),
                dir,
            }
        })
        .collect()
}

/// The sidecar of replica `i`, syncing from all the others every 2 minutes (the default),
/// once its first round is done.
async fn start_sidecar(replicas: &[Replica], i: usize) -> Sidecar {
    let me = &replicas[i];
    let metrics = format!("127.0.0.1:{}", free_port());
    let notify = format!("127.0.0.1:{}", me.notify_port);
    let log = me.dir.join("sidecar.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_registry-addon"));
    cmd.args(["sync", "--local", &me.registry.url])
        .args([
            "--interval",
            "2m",
            "--attempts",
            "2",
            "--retry-backoff",
            "100ms",
        ])
        .args(["--metrics-listen", &metrics, "--notify-listen", &notify])
        .arg("--state-file")
        .arg(&me.state);
    for (j, peer) in replicas.iter().enumerate() {
        if j != i {
            cmd.args(["--peer", &peer.registry.url]);
        }
    }
    let out = std::fs::File::create(&log).unwrap();
    let child = cmd
        .env("RUST_LOG", "info,registry_addon::sync=debug")
        .env("REGISTRY_NOTIFY_TOKEN", TOKEN)
        .env_remove("REGISTRY_USERNAME")
        .env_remove("REGISTRY_PASSWORD")
        .env_remove("REGISTRY_NOTIFY_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let sidecar = Sidecar {
        child,
        metrics,
        notify,
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while sidecar.value("registry_sync_rounds_total").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "sidecar {i} did not finish its first round; log:\n{}",
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sidecar
}

async fn digest_of(reg: &Registry, repo: &str, tag: &str) -> Option<String> {
    reg.head_manifest(repo, tag)
        .await
        .ok()
        .flatten()
        .and_then(|h| h.digest)
        .map(|d| d.to_string())
}

/// Waits until every registry serves `repo:tag` as `digest`; returns how long it took.
async fn served_by(
    regs: &[&Registry],
    repo: &str,
    tag: &str,
    digest: &str,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let mut all = true;
        for reg in regs {
            if digest_of(reg, repo, tag).await.as_deref() != Some(digest) {
                all = false;
                break;
            }
        }
        if all {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{repo}:{tag} not served as {digest} by every replica within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a sidecar metric reaches `at_least`.
async fn wait_metric(sidecar: &Sidecar, series: &str, at_least: f64, limit: Duration) {
    let start = Instant::now();
    loop {
        let text = sidecar.metrics().await;
        if metric(&text, series) >= at_least {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{series} did not reach {at_least} within {limit:?}; metrics:\n{text}\nlog:\n{}",
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn layout_of(dir: &Path, tag: &str, seed: u64) -> (PathBuf, String) {
    let base = random_bytes(seed, 200_000);
    let amd = Image::new(
        "amd64",
        vec![base.clone(), random_bytes(seed + 1, 50_000)],
        false,
    );
    let arm = Image::new("arm64", vec![base, random_bytes(seed + 2, 60_000)], false);
    let layout = dir.join(format!("layout-{seed}"));
    write_oci_layout(&layout, tag, &[("amd64", &amd), ("arm64", &arm)]);
    let digest = sha256(&index_body(&[("amd64", &amd), ("arm64", &arm)], false));
    (layout, digest)
}

/// Requests in a registry's access log matching every one of `parts`.
fn requests(replica: &Replica, parts: &[&str]) -> usize {
    std::fs::read_to_string(&replica.registry.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_one_replica_is_served_by_all_within_seconds_without_ping_pong() {
    let tmp = tempfile::tempdir().unwrap();
    let replicas = start_registries(tmp.path(), 3, &[true, true, true]);
    let mut sidecars = Vec::new();
    for i in 0..3 {
        sidecars.push(start_sidecar(&replicas, i).await);
    }

    let (layout, digest) = layout_of(tmp.path(), "1.0", 10);
    skopeo_push(&layout, "1.0", &replicas[0].registry, "apps/web", None);
    let took = served_by(
        &[&replicas[1].client, &replicas[2].client],
        "apps/web",
        "1.0",
        &digest,
        Duration::from_secs(5),
    )
    .await;
    eprintln!("served by the other replicas {took:?} after the push");
    for r in &replicas[1..] {
        assert_eq!(assert_pullable(&r.client).await, 3);
    }

    // Each receiver hears of the syncer's push and only checks its peers.
    for s in &sidecars[1..] {
        wait_metric(
            s,
            "registry_sync_notify_events_total{outcome=\"own\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
    }
    // Once they are done, nothing went back or round again.
    for (i, s) in sidecars.iter().enumerate().skip(1) {
        for (j, peer) in replicas.iter().enumerate() {
            if j != i {
                wait_metric(s, &checked(peer, "agreed"), 1.0, Duration::from_secs(5)).await;
            }
        }
    }
    let ua = "registry-addon-sync/";
    let pushed = &sidecars[0].metrics().await;
    assert_eq!(
        metric(
            pushed,
            "registry_sync_notify_events_total{outcome=\"queued\"}"
        ),
        1.0,
        "{pushed}"
    );
    for peer in &replicas[1..] {
        let series = format!(
            "registry_sync_notified_pushes_total{{peer=\"{}\",outcome=\"copied\"}}",
            peer.registry.url
        );
        assert_eq!(metric(pushed, &series), 1.0, "{series}\n{pushed}");
    }
    for s in &sidecars[1..] {
        let text = s.metrics().await;
        assert_eq!(
            metric(
                &text,
                "registry_sync_notify_events_total{outcome=\"queued\"}"
            ),
            0.0,
            "{text}"
        );
    }
    // No manifest written back to the replica pushed to; one tag write per receiver.
    assert_eq!(
        requests(&replicas[0], &["\"PUT /v2/apps/web/manifests/", ua]),
        0
    );
    for r in &replicas[1..] {
        assert_eq!(
            requests(r, &["\"PUT /v2/apps/web/manifests/1.0 ", ua]),
            1,
            "{}",
            r.registry.log.display()
        );
        assert_eq!(
            requests(r, &["\"PUT /v2/apps/web/manifests/sha256:", ua]),
            2
        );
    }

    // The pusher remembers both peers agreeing on the digest: its next round keeps it.
    let state = std::fs::read_to_string(&replicas[0].state).unwrap();
    assert_eq!(state.matches(&digest).count(), 2, "{state}");

    // A second tag of the same content from another replica: HEADs, no blob moved.
    skopeo_push(&layout, "1.0", &replicas[1].registry, "apps/web2", None);
    served_by(
        &[&replicas[0].client, &replicas[2].client],
        "apps/web2",
        "1.0",
        &digest,
        Duration::from_secs(5),
    )
    .await;
}

fn checked(peer: &Replica, outcome: &str) -> String {
    format!(
        "registry_sync_notify_checks_total{{peer=\"{}\",outcome=\"{outcome}\"}}",
        peer.registry.url
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_without_the_token_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // The first registry does not notify: this test sends the events itself.
    let replicas = start_registries(tmp.path(), 2, &[false, true]);
    let sidecar = start_sidecar(&replicas, 0).await;
    let img = Image::new("amd64", vec![random_bytes(7, 30_000)], false);
    let digest = img.push(&replicas[0].client, "forged/app", "v1").await;

    let url = format!("http://{}/events", sidecar.notify);
    let body = serde_json::json!({"events": [{
        "action": "push",
        "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "repository": "forged/app", "tag": "v1", "digest": digest},
        "request": {"useragent": "skopeo/1.9.3"},
    }]})
    .to_string();
    let http = reqwest::Client::new();
    let post = |auth: Option<String>| {
        let mut req = http
            .post(&url)
            .header(
                "content-type",
                "application/vnd.docker.distribution.events.v1+json",
            )
            .body(body.clone());
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        req.send()
    };
    for auth in [
        None,
        Some(format!("Bearer {TOKEN}x")),
        Some("Bearer ".to_string()),
        Some(format!("Basic {TOKEN}")),
    ] {
        let resp = post(auth.clone()).await.unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED, "{auth:?}");
        let text = resp.text().await.unwrap();
        assert!(!text.contains(TOKEN), "{text}");
    }
    let text = sidecar.metrics().await;
    assert_eq!(
        metric(
            &text,
            "registry_sync_notify_events_total{outcome=\"refused\"}"
        ),
        4.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "registry_sync_notify_events_total{outcome=\"queued\"}"
        ),
        0.0,
        "{text}"
    );
    assert_eq!(
        digest_of(&replicas[1].client, "forged/app", "v1").await,
        None
    );
    assert!(!sidecar.log().contains(TOKEN));

    // Not an envelope, or not POST: refused too, without queueing anything.
    let resp = http
        .post(&url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .body("[1,")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::BAD_REQUEST);
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::METHOD_NOT_ALLOWED);

    // The same event with the token is taken.
    let resp = post(Some(format!("Bearer {TOKEN}"))).await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    served_by(
        &[&replicas[1].client],
        "forged/app",
        "v1",
        &digest,
        Duration::from_secs(5),
    )
    .await;
    let text = sidecar.metrics().await;
    assert_eq!(
        metric(
            &text,
            "registry_sync_notify_events_total{outcome=\"queued\"}"
        ),
        1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_replica_does_not_hold_back_the_others_and_its_round_catches_up() {
    let tmp = tempfile::tempdir().unwrap();
    let mut replicas = start_registries(tmp.path(), 3, &[true, true, true]);
    let mut sidecars = Vec::new();
    for i in 0..3 {
        sidecars.push(start_sidecar(&replicas, i).await);
    }
    // Two images for one tag, the later one's digest the smaller: the tie-break alone would
    // take the earlier one back.
    let (later, earlier) = loop_images();
    let d1 = earlier
        .push(&replicas[0].client, "apps/api", "latest")
        .await;
    let all: Vec<&Registry> = replicas.iter().map(|r| &*r.client).collect();
    served_by(&all, "apps/api", "latest", &d1, Duration::from_secs(5)).await;
    // The receivers have checked their peers: each remembers agreeing on the earlier digest.
    for (i, s) in sidecars.iter().enumerate().skip(1) {
        for (j, peer) in replicas.iter().enumerate() {
            if j != i {
                wait_metric(s, &checked(peer, "agreed"), 1.0, Duration::from_secs(5)).await;
            }
        }
    }

    replicas[2].registry.stop();
    let d2 = later.push(&replicas[0].client, "apps/api", "latest").await;
    assert!(d2 < d1);
    let took = served_by(
        &[&replicas[1].client],
        "apps/api",
        "latest",
        &d2,
        Duration::from_secs(5),
    )
    .await;
    eprintln!("served by the replica up {took:?} after the push");
    let series = format!(
        "registry_sync_notified_push_errors_total{{peer=\"{}\"}}",
        replicas[2].registry.url
    );
    wait_metric(&sidecars[0], &series, 1.0, Duration::from_secs(15)).await;
    assert_eq!(
        digest_of(&replicas[1].client, "apps/api", "latest")
            .await
            .as_deref(),
        Some(d2.as_str())
    );

    // Back with the earlier digest; its own round (a restarted sidecar starts with one)
    // takes the later one, and no replica takes the earlier one back.
    replicas[2].registry.restart();
    assert_eq!(
        digest_of(&replicas[2].client, "apps/api", "latest")
            .await
            .as_deref(),
        Some(d1.as_str())
    );
    // Restarted sidecars start with a round, with the memory the notifications left; the
    // replica that only received the tags goes first.
    sidecars.clear();
    for i in [1, 0, 2] {
        sidecars.push(start_sidecar(&replicas, i).await);
    }
    for r in &replicas {
        assert_eq!(
            digest_of(&r.client, "apps/api", "latest").await.as_deref(),
            Some(d2.as_str()),
            "{}",
            r.registry.url
        );
    }
}

/// Two one-layer images, the first with the smaller manifest digest.
fn loop_images() -> (Image, Image) {
    let a = Image::new("amd64", vec![random_bytes(500, 4000)], false);
    let da = sha256(&a.manifest());
    let b = (501..)
        .map(|s| Image::new("amd64", vec![random_bytes(s, 4000)], false))
        .find(|img| sha256(&img.manifest()) > da)
        .unwrap();
    (a, b)
}
