//! Replication within seconds: the local registry's push notifications.
//!
//! CNCF Distribution posts an envelope of events
//! (`application/vnd.docker.distribution.events.v1+json`) to each configured endpoint after
//! every push. The sidecar listens on the pod's loopback, checks the static
//! `Authorization: Bearer <token>` header the endpoint is configured to send, answers 200 at
//! once (Distribution delivers one endpoint's events in order and retries until a 2xx: a
//! slow answer holds back every later event) and queues each pushed tag. Workers then push
//! the tag out to every peer concurrently ([`Syncer::push_out`]): children and blobs first,
//! one HEAD when the peer has it already.
//!
//! No loops: the syncer's own pushes carry [`SYNC_USER_AGENT`], which Distribution reports
//! in the event's `request.useragent`; they are never pushed on. A push the syncer makes to
//! a peer notifies that peer's sidecar, which only HEADs its own peers for the tag and
//! remembers those that hold the same digest ([`Syncer::learn`]): it never writes, so
//! nothing can bounce, and its memory of agreed digests is as a round would leave it. Without
//! that, a replica that received a tag this way would settle a later difference with a peer
//! that was down by the tie-break alone, and could take an older digest back.
//!
//! Bounded work: a tag is queued at most once; a burst of pushes to one tag while it is
//! being pushed out leads to one more push-out, of the digest the tag holds then. Beyond
//! [`MAX_QUEUED`] tags, events are dropped (and counted): the periodic round is the safety
//! net for those, and for peers that were down.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use oci_spec::image::Digest;
use serde::Deserialize;
use tokio::sync::Notify;

use super::metrics::SyncMetrics;
use super::round::Syncer;
use crate::oci::{valid_repository, valid_tag};

/// `User-Agent` of every request the syncer sends.
pub const SYNC_USER_AGENT: &str = concat!("registry-addon-sync/", env!("CARGO_PKG_VERSION"));

/// Tags waiting to be pushed out, at most.
pub const MAX_QUEUED: usize = 10_000;

/// Largest notification body read; Distribution sends a few events per request.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// The shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// What to do with a pushed tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Job {
    /// Pushed by someone else: push it out to the peers.
    Push,
    /// Pushed here by a peer's syncer: remember which peers hold it.
    Learn,
}

/// A pushed tag: repository, tag, and what to do.
type TagKey = (String, String, Job);

/// One event of a notification envelope, only the fields used.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Event {
    action: String,
    target: Target,
    request: RequestInfo,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Target {
    repository: String,
    tag: String,
    digest: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RequestInfo {
    useragent: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Envelope {
    events: Vec<Event>,
}

/// What an event asks for.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// A tag pushed by someone else (`Job::Push`), or by a syncer (`Job::Learn`), and the
    /// digest pushed.
    Queue(TagKey, Digest),
    /// Not a tag push (a pull, a delete, a blob, a push by digest) or not a valid name.
    Ignore,
}

fn decide(event: &Event) -> Decision {
    if event.action != "push" || event.target.tag.is_empty() {
        return Decision::Ignore;
    }
    let (repo, tag) = (&event.target.repository, &event.target.tag);
    if !valid_repository(repo) || !valid_tag(tag) {
        return Decision::Ignore;
    }
    // The event's digest, not a HEAD of the tag: Distribution sends the event once the
    // manifest is stored, before it points the tag at it.
    let Ok(digest) = event.target.digest.parse::<Digest>() else {
        return Decision::Ignore;
    };
    let job = if event.request.useragent.starts_with("registry-addon-sync/") {
        Job::Learn
    } else {
        Job::Push
    };
    Decision::Queue((repo.clone(), tag.clone(), job), digest)
}

/// The digest last pushed to a tag, and when the first event not yet handled came.
type Pushed = (Digest, Instant);

#[derive(Default)]
struct Queue {
    pending: VecDeque<TagKey>,
    /// The tags in `pending`; a later event replaces the digest.
    queued: HashMap<TagKey, Pushed>,
    running: HashSet<TagKey>,
    /// Notified again while being handled: run once more afterwards, with this digest.
    again: HashMap<TagKey, Pushed>,
}

/// Pushes each tag the local registry reports pushed out to the peers.
pub struct Notifier {
    syncer: Arc<Syncer>,
    metrics: Arc<SyncMetrics>,
    token: String,
    queue: Mutex<Queue>,
    wake: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update leaves the queue consistent: keep going after a panic elsewhere.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Notifier {
    /// Binds `addr`, then serves notifications and runs `workers` push-out tasks until the
    /// process ends.
    pub async fn start(
        syncer: Arc<Syncer>,
        metrics: Arc<SyncMetrics>,
        addr: SocketAddr,
        token: String,
        workers: usize,
    ) -> std::io::Result<Arc<Notifier>> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let notifier = Arc::new(Notifier {
            syncer,
            metrics,
            token,
            queue: Mutex::default(),
            wake: Notify::new(),
        });
        tracing::info!(%addr, "accepting push notifications");
        for _ in 0..workers.max(1) {
            tokio::spawn(notifier.clone().work());
        }
        tokio::spawn(notifier.clone().serve(listener));
        Ok(notifier)
    }

    async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        crate::metrics::serve_http1(listener, "notifications", move |req| {
            let this = self.clone();
            async move { this.handle(req).await }
        })
        .await
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, body: &'static str| {
            let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *resp.status_mut() = status;
            resp
        };
        if req.uri().path() != "/events" {
            return reply(StatusCode::NOT_FOUND, "not found\n");
        }
        if req.method() != Method::POST {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "POST only\n");
        }
        let authorized = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| same(t.trim().as_bytes(), self.token.as_bytes()));
        if !authorized {
            self.metrics.notify_event("refused");
            tracing::warn!("push notification refused: missing or wrong bearer token");
            let mut resp = reply(StatusCode::UNAUTHORIZED, "unauthorized\n");
            resp.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer"),
            );
            return resp;
        }
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                tracing::warn!(error = %e, "push notification: cannot read the body");
                return reply(StatusCode::BAD_REQUEST, "unreadable body\n");
            }
        };
        let envelope: Envelope = match serde_json::from_slice(&body) {
            Ok(envelope) => envelope,
            Err(e) => {
                tracing::warn!(error = %e, "push notification: not an event envelope");
                return reply(StatusCode::BAD_REQUEST, "not an event envelope\n");
            }
        };
        let received = Instant::now();
        for event in &envelope.events {
            match decide(event) {
                Decision::Queue(key, digest) => {
                    let job = key.2;
                    let outcome = self.enqueue(key, digest, received);
                    self.metrics.notify_event(match (job, outcome) {
                        (Job::Learn, "queued") => "own",
                        (_, outcome) => outcome,
                    });
                }
                Decision::Ignore => self.metrics.notify_event("ignored"),
            }
        }
        reply(StatusCode::OK, "ok\n")
    }

    /// Queues a tag; says what became of it.
    fn enqueue(&self, key: TagKey, digest: Digest, received: Instant) -> &'static str {
        let mut q = lock(&self.queue);
        if let Some(pushed) = q.queued.get_mut(&key) {
            pushed.0 = digest;
            return "coalesced";
        }
        if q.running.contains(&key) {
            let since = q.again.get(&key).map_or(received, |p| p.1);
            q.again.insert(key, (digest, since));
            return "coalesced";
        }
        if q.queued.len() >= MAX_QUEUED {
            tracing::warn!(
                repo = key.0,
                tag = key.1,
                "push notification dropped: too many tags queued; the next round copies it"
            );
            return "dropped";
        }
        q.queued.insert(key.clone(), (digest, received));
        q.pending.push_back(key);
        drop(q);
        self.wake.notify_one();
        "queued"
    }

    fn next(&self) -> Option<(TagKey, Pushed)> {
        let mut q = lock(&self.queue);
        let key = q.pending.pop_front()?;
        let pushed = q.queued.remove(&key)?;
        q.running.insert(key.clone());
        Some((key, pushed))
    }

    fn finished(&self, key: TagKey) {
        let mut q = lock(&self.queue);
        q.running.remove(&key);
        if let Some((digest, since)) = q.again.remove(&key) {
            drop(q);
            self.enqueue(key, digest, since);
        }
    }

    async fn work(self: Arc<Self>) {
        loop {
            let Some((key, (digest, received))) = self.next() else {
                self.wake.notified().await;
                continue;
            };
            // The local tag holds it now, or will in a moment: the rounds need not HEAD it.
            self.syncer.saw_local(&key.0, &key.1, &digest);
            match key.2 {
                Job::Push => self.push_out(&key.0, &key.1, &digest, received).await,
                Job::Learn => self.learn(&key.0, &key.1, &digest).await,
            }
            self.finished(key);
        }
    }

    /// Remembers the peers whose tag holds the digest a peer's syncer just pushed here. The
    /// pushing syncer writes to all its peers at once, so a peer may get it a moment later:
    /// those are asked again, twice.
    async fn learn(&self, repo: &str, tag: &str, digest: &Digest) {
        futures::future::join_all(self.syncer.peers().iter().map(|peer| async move {
            let mut outcome = "differs";
            for delay_ms in [0u64, 500, 1500] {
                tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
                match self.syncer.learn(peer, repo, tag, digest).await {
                    Ok(true) => {
                        outcome = "agreed";
                        break;
                    }
                    Err(_) => {
                        outcome = "error";
                        break;
                    }
                    Ok(false) => {}
                }
            }
            self.metrics.checked(peer.name(), outcome);
        }))
        .await;
        if let Err(error) = self.syncer.agreements().save_if_changed().await {
            tracing::warn!(error = %error, "cannot write the sync state file; trying again later");
        }
    }

    /// The digest pushed to the tag, to every peer at once; a failing peer does not hold
    /// the others back.
    async fn push_out(&self, repo: &str, tag: &str, digest: &Digest, received: Instant) {
        futures::future::join_all(self.syncer.peers().iter().map(|peer| {
            async move {
                match self.syncer.push_out(peer, repo, tag, digest).await {
                    Ok(report) => {
                        tracing::debug!(peer = peer.name(), repo, tag, %digest, outcome = report.outcome.as_str(), bytes = report.bytes_copied, "tag pushed out");
                        self.metrics.notified(peer.name(), &report);
                    }
                    Err(err) => {
                        tracing::warn!(peer = peer.name(), repo, tag, %digest, error = %err, "tag not pushed out; the rounds copy it");
                        self.metrics.notified_error(peer.name());
                    }
                }
            }
        }))
        .await;
        self.metrics
            .notified_duration(received.elapsed().as_secs_f64());
        if let Err(error) = self.syncer.agreements().save_if_changed().await {
            tracing::warn!(error = %error, "cannot write the sync state file; trying again later");
        }
    }
}

/// Compares in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the notification token: the file's content when given, else `REGISTRY_NOTIFY_TOKEN`.
/// Surrounding white space is dropped; the token is never logged.
pub fn read_token(file: Option<&std::path::Path>) -> Result<String, String> {
    let (token, source) = match file {
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| format!("notification token file {}: {e}", path.display()))?,
            format!("notification token file {}", path.display()),
        ),
        None => (
            std::env::var("REGISTRY_NOTIFY_TOKEN").map_err(|_| {
                "--notify-listen needs a token: --notify-token-file or REGISTRY_NOTIFY_TOKEN"
                    .to_string()
            })?,
            "REGISTRY_NOTIFY_TOKEN".to_string(),
        ),
    };
    let token = token.trim().to_string();
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "{source}: the token must be at least {MIN_TOKEN_LEN} characters"
        ));
    }
    // RFC 6750's b64token characters: safe in the header and in the registry's YAML.
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
    {
        return Err(format!(
            "{source}: the token may hold only A-Z a-z 0-9 - . _ ~ + / ="
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: &str) -> Event {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn queues_tag_pushes_of_others_only() {
        let hex = "ab".repeat(32);
        let d: Digest = format!("sha256:{hex}").parse().unwrap();
        let push = r#"{"action":"push","target":{"mediaType":"application/vnd.oci.image.index.v1+json","repository":"library/nginx","tag":"1.27","digest":"sha256:HEX"},"request":{"useragent":"skopeo/1.9.3"}}"#.replace("HEX", &hex);
        let push = push.as_str();
        assert_eq!(
            decide(&event(push)),
            Decision::Queue(
                ("library/nginx".into(), "1.27".into(), Job::Push),
                d.clone()
            )
        );
        let own = push.replace("skopeo/1.9.3", SYNC_USER_AGENT);
        assert_eq!(
            decide(&event(&own)),
            Decision::Queue(
                ("library/nginx".into(), "1.27".into(), Job::Learn),
                d.clone()
            )
        );
        // `mirror push` and other tools of this project are pushed out like any client.
        let addon = push.replace("skopeo/1.9.3", crate::oci::client::DEFAULT_USER_AGENT);
        assert_eq!(
            decide(&event(&addon)),
            Decision::Queue(
                ("library/nginx".into(), "1.27".into(), Job::Push),
                d.clone()
            )
        );
        let by_digest = r#"{"action":"push","target":{"repository":"a","digest":"sha256:00"}}"#;
        assert_eq!(decide(&event(by_digest)), Decision::Ignore);
        let pull = push.replace("\"push\"", "\"pull\"");
        assert_eq!(decide(&event(&pull)), Decision::Ignore);
        let bad = push.replace("library/nginx", "Library/../x");
        assert_eq!(decide(&event(&bad)), Decision::Ignore);
        let bad = push.replace(&hex, "00");
        assert_eq!(decide(&event(&bad)), Decision::Ignore);
        // Unknown fields and a missing request block are fine.
        let envelope: Envelope =
            serde_json::from_str(&r#"{"events":[{"action":"push","target":{"repository":"a","tag":"b","digest":"sha256:HEX"},"extra":1}]}"#.replace("HEX", &hex))
                .unwrap();
        assert_eq!(
            decide(&envelope.events[0]),
            Decision::Queue(("a".into(), "b".into(), Job::Push), d.clone())
        );
    }

    #[test]
    fn compares_tokens_exactly() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"a"));
    }

    #[test]
    fn token_file_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        assert_eq!(read_token(Some(&path)).unwrap(), "0123456789abcdef0123");
        std::fs::write(&path, "short").unwrap();
        let err = read_token(Some(&path)).unwrap_err();
        assert!(err.contains("at least 16"), "{err}");
        assert!(!err.contains("short"), "{err}");
        std::fs::write(&path, "0123456789 abcdef0123").unwrap();
        assert!(read_token(Some(&path)).is_err());
        assert!(read_token(Some(&dir.path().join("missing"))).is_err());
    }
}
