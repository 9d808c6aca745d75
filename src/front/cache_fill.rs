//! Proxy mode: when the cache is told to store a blob a client pulled through the relay.
//!
//! Storing a blob costs the cache about what serving it costs the front: it reads the blob
//! from the relay's spool (twice: Distribution 2.8 reads it through once to answer the HEAD
//! that tells it), hashes it, writes it and syncs it to disk. Told at once, it does that while
//! the node is still pulling the image's other blobs, on the replica's same CPUs and disk, and
//! the pull is slower for it. So the front tells the cache once no client request has been
//! under way (its answer not yet sent whole) for [`QUIET`], and at the latest [`LATEST`] after
//! the blob's download finished. That is well within the time the relay keeps a finished
//! download shared (10 s), so the cache reads the blob from the spool, not from the upstream
//! again; and meanwhile the relay gives it to every client that asks.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How long no client request must have been under way before the cache is told.
pub const QUIET: Duration = Duration::from_millis(200);
/// How long a blob waits at most, however busy the clients are.
pub const LATEST: Duration = Duration::from_secs(3);

/// The blobs the cache is to be told to store, and the client requests under way.
pub struct CacheFill {
    start: Instant,
    /// Client requests whose answers are not yet sent whole.
    answering: AtomicUsize,
    /// When `answering` last changed, in milliseconds since `start`.
    changed: AtomicU64,
    waiting: Mutex<Waiting>,
    wake: Notify,
    quiet: Duration,
    latest: Duration,
}

#[derive(Default)]
struct Waiting {
    paths: HashSet<String>,
    /// When the first of `paths` came.
    since: Option<Instant>,
}

/// Held while a client request is answered, until its answer is sent whole or dropped.
pub struct Answering(Arc<CacheFill>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.stamp();
        self.0.answering.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for CacheFill {
    fn default() -> Self {
        CacheFill::new(QUIET, LATEST)
    }
}

impl CacheFill {
    pub fn new(quiet: Duration, latest: Duration) -> Self {
        CacheFill {
            start: Instant::now(),
            answering: AtomicUsize::new(0),
            changed: AtomicU64::new(0),
            waiting: Mutex::new(Waiting::default()),
            wake: Notify::new(),
            quiet,
            latest,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // Every change under this lock is complete before it is released.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stamp(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.changed.fetch_max(ms, Ordering::Relaxed);
    }

    /// A client request came: under way until the returned guard is dropped.
    pub fn answering(self: &Arc<Self>) -> Answering {
        self.answering.fetch_add(1, Ordering::AcqRel);
        self.stamp();
        Answering(self.clone())
    }

    /// The blob at `path` (a client's request path) is to be stored by the cache: told once,
    /// however many ask before.
    pub fn store_later(&self, path: String) {
        let mut waiting = self.lock();
        waiting.since.get_or_insert_with(Instant::now);
        waiting.paths.insert(path);
        drop(waiting);
        self.wake.notify_one();
    }

    /// Calls `tell` with each waiting path when it is time; runs for as long as the front.
    pub async fn run(&self, tell: impl Fn(String)) {
        loop {
            let since = self.lock().since;
            let Some(since) = since else {
                self.wake.notified().await;
                continue;
            };
            let due = since + self.latest;
            let now = Instant::now();
            // While requests are under way, looked at again every `quiet`.
            let quiet_at = if self.answering.load(Ordering::Acquire) > 0 {
                now + self.quiet
            } else {
                self.start
                    + Duration::from_millis(self.changed.load(Ordering::Relaxed))
                    + self.quiet
            };
            if now < due && now < quiet_at {
                tokio::time::sleep_until(due.min(quiet_at)).await;
                continue;
            }
            let paths = {
                let mut waiting = self.lock();
                waiting.since = None;
                std::mem::take(&mut waiting.paths)
            };
            for path in paths {
                tell(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::mpsc;

    fn started(quiet_ms: u64, latest_ms: u64) -> (Arc<CacheFill>, mpsc::UnboundedReceiver<String>) {
        let fill = Arc::new(CacheFill::new(
            Duration::from_millis(quiet_ms),
            Duration::from_millis(latest_ms),
        ));
        let (tx, rx) = mpsc::unbounded_channel();
        let running = fill.clone();
        tokio::spawn(async move {
            running
                .run(move |path| {
                    let _ = tx.send(path);
                })
                .await
        });
        (fill, rx)
    }

    #[tokio::test(start_paused = true)]
    async fn told_once_no_request_is_under_way_and_once_per_path() {
        let (fill, mut told) = started(200, 3000);
        let answering = fill.answering();
        fill.store_later("/v2/a/blobs/sha256:1".into());
        fill.store_later("/v2/a/blobs/sha256:1".into());
        // A request whose answer is still being sent holds it back.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(
            told.try_recv().is_err(),
            "told while a request was under way"
        );
        drop(answering);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            told.try_recv().is_err(),
            "told before the clients were quiet"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(told.try_recv().unwrap(), "/v2/a/blobs/sha256:1");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(told.try_recv().is_err(), "told twice");
    }

    #[tokio::test(start_paused = true)]
    async fn told_at_the_latest_however_busy_the_clients() {
        let (fill, mut told) = started(200, 3000);
        fill.store_later("/v2/a/blobs/sha256:1".into());
        let mut waited = Duration::ZERO;
        while told.try_recv().is_err() {
            // Requests one after another, each 50 ms long.
            let answering = fill.answering();
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(answering);
            waited += Duration::from_millis(50);
            assert!(waited <= Duration::from_millis(3300), "never told");
        }
        assert!(
            waited >= Duration::from_millis(3000),
            "told after {waited:?}"
        );
        // A blob that comes later waits its own time.
        fill.store_later("/v2/a/blobs/sha256:2".into());
        drop(fill.answering());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(told.try_recv().is_err());
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(told.try_recv().unwrap(), "/v2/a/blobs/sha256:2");
    }
}
